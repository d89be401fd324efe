"""Input pipeline: tfds datasets, image folders and the embedded `digits`, as sharded global
batches in a deterministic, resumable order.

    info = data.get_info(config)
    it = data.train_iterator(config, sharding, start_step=step)   # it.step: next step
    for batch in data.eval_iterator(config, sharding): ...        # batch['mask'] marks padding

Importing the package loads neither TensorFlow nor jax: the pipeline's names load on first use,
so a CLI can read `data.image_header` while parsing its flags. TensorFlow runs on the CPU only
when the program called `vit_jax.cli.start()` first (every CLI does).
"""

import importlib
from typing import TYPE_CHECKING

from vit_jax.data.errors import (
    BadImageError,
    DataError,
    DatasetNotPreparedError,
    UnknownDatasetError,
)

if TYPE_CHECKING:
    from vit_jax.data.pipeline import BatchIterator, eval_iterator, train_iterator
    from vit_jax.data.sources import DatasetInfo, get_info

# name -> the module that defines it, imported when the name is first used
_LAZY = {
    "BatchIterator": "vit_jax.data.pipeline",
    "eval_iterator": "vit_jax.data.pipeline",
    "train_iterator": "vit_jax.data.pipeline",
    "DatasetInfo": "vit_jax.data.sources",
    "get_info": "vit_jax.data.sources",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vit_jax.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "BadImageError",
    "BatchIterator",
    "DataError",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "UnknownDatasetError",
    "eval_iterator",
    "get_info",
    "train_iterator",
]
