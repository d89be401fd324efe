"""Trainer defaults shared by every config, and the reference datasets' fine-tuning presets.

The definition lives in the package (`vit_jax.configs`); the recipes here import it from this
module, as they always have.
"""

from vit_jax import models  # noqa: F401 - recipes reach the zoo as `common.models`
from vit_jax.configs import DATASET_PRESETS, get_config, with_dataset, with_model

__all__ = ["DATASET_PRESETS", "get_config", "models", "with_dataset", "with_model"]
