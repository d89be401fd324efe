"""`digits`, the embedded offline default: scikit-learn's copy of the UCI handwritten digits.

1,797 grayscale 8x8 images (values 0..16, ink bright), 10 classes, no network needed. The fixed,
stratified split puts every 5th example of each class (in scikit-learn's order) in `test`:
train 1,442 / test 355 examples (140-147 resp. 34-36 per class). Images are stored as uint8
0..255 RGB and upscaled by the usual resize/crop preprocessing to the configured resolution.
"""

import functools

import numpy as np
from sklearn import datasets

from vit_jax.data.splits import ArraySplit, resolve_split_spec

__all__ = [
    "NAME",
    "NUM_TEST",
    "NUM_TRAIN",
    "TEST_EVERY",
    "open_split",
]


NAME = "digits"
TEST_EVERY = 5  # example r of a class (r = 0, 1, ...) is in test iff r % TEST_EVERY == TEST_EVERY-1
NUM_TRAIN = 1442
NUM_TEST = 355


@functools.cache
def _load() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images uint8 [N, 8, 8, 3], labels int64 [N]), 'test': (...)}."""
    bunch = datasets.load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = bunch.target.astype(np.int64)
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    is_test = rank % TEST_EVERY == TEST_EVERY - 1
    return {
        "train": (images[~is_test], labels[~is_test]),
        "test": (images[is_test], labels[is_test]),
    }


def open_split(spec: str) -> ArraySplit:
    """The digits examples selected by `spec` ('train', 'test', 'train[:90%]', ...)."""
    parts = _load()
    ranges = resolve_split_spec(spec, {k: len(v[1]) for k, v in parts.items()}, NAME)
    images = np.concatenate([parts[name][0][start:stop] for name, start, stop in ranges])
    labels = np.concatenate([parts[name][1][start:stop] for name, start, stop in ranges])
    class_names = [str(c) for c in range(10)]
    return ArraySplit(images, labels, class_names, f"{NAME} {spec!r}")
