"""The trainer's config schema: every key with its default, dataset presets, and readers of it.

The top-level `configs/*.py` are user-facing recipes built on `get_config()`; the trainer, the
benchmark and the tests read the same definition from here.
"""

from vit_jax.configs.schema import (
    DATASET_PRESETS,
    get_config,
    image_size,
    with_dataset,
    with_model,
)

__all__ = ["DATASET_PRESETS", "get_config", "image_size", "with_dataset", "with_model"]
