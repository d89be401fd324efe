"""Input pipeline: tfds datasets, image folders and the embedded `digits`, as sharded global
batches in a deterministic, resumable order.

    info = data.get_info(config)
    it = data.train_iterator(config, sharding, start_step=step)   # it.step: next step
    for batch in data.eval_iterator(config, sharding): ...        # batch['mask'] marks padding
"""

import tensorflow as tf
from absl import logging

from vit_jax.data.errors import (
    BadImageError,
    DataError,
    DatasetNotPreparedError,
    UnknownDatasetError,
)
from vit_jax.data.pipeline import BatchIterator, eval_iterator, train_iterator
from vit_jax.data.sources import DatasetInfo, get_info

# tf.data needs only the CPU; a GPU build of TensorFlow would otherwise reserve memory on the
# accelerators JAX uses. This must happen before TF initialises its devices.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:
    if tf.config.list_logical_devices("GPU"):
        logging.warning("TensorFlow already uses the GPU; import vit_jax.data before using TF")

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
