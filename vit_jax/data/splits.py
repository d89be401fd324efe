"""Random-access splits: the one interface every source (digits, folders, tfds) provides.

A `Split` holds N examples addressed by index 0..N-1 and gives, inside a tf.data graph, the
decoded uint8 RGB image and int64 label of any index. Random access is what lets the pipeline
compute any training step's batch from (seed, step) alone, without reading what came before.
"""

import abc
import re
import types
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vit_jax.data import preprocess
from vit_jax.data.errors import DataError

__all__ = [
    "ArraySplit",
    "ClassSubsetSplit",
    "EncodedSplit",
    "FileSplit",
    "resolve_split_spec",
    "Split",
]


class Split(abc.ABC):
    """N examples with random access; `description` names the dataset and split in messages."""

    description: str
    class_names: tuple[str, ...]

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of examples."""

    @abc.abstractmethod
    def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(uint8 image [h, w, 3], int64 label) of example `index` (int64 scalar); graph-safe."""

    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """int64 [N] labels of all examples (may read every record of a large dataset)."""

    def name_of(self, index: int) -> str:
        """What to call example `index` in an error message (a file path where there is one)."""
        return f"{self.description} example {index}"

    def find_unreadable(self, indices: Sequence[int]) -> tuple[int, str] | None:
        """First of `indices` whose image cannot be loaded, with the reason; None if all load."""
        for index in indices:
            try:
                self.load(tf.constant(index, tf.int64))
            except (tf.errors.OpError, OSError, ValueError) as e:
                return index, _short_reason(e)
        return None


def _short_reason(error: Exception) -> str:
    """The informative part of a TF error message (without node names and op tags)."""
    text = str(getattr(error, "message", error))
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\].*|Traceback.*", " ", text, flags=re.DOTALL)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


class ArraySplit(Split):
    """Decoded uint8 images held in memory (the embedded digits)."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], description: str
    ):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{description}: expected uint8 [N, h, w, 3], got {images.dtype}")
        self.description = description
        self.class_names = tuple(class_names)
        self._labels = np.asarray(labels, np.int64)
        self._images_tf = tf.constant(images)
        self._labels_tf = tf.constant(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.gather(self._images_tf, index), tf.gather(self._labels_tf, index)

    def labels(self) -> np.ndarray:
        return self._labels


class EncodedSplit(Split):
    """Encoded image bytes (PNG/JPEG...) held in memory, decoded on access (small tfds splits)."""

    def __init__(
        self,
        encoded: Sequence[bytes],
        labels: np.ndarray,
        class_names: Sequence[str],
        description: str,
    ):
        self.description = description
        self.class_names = tuple(class_names)
        self._labels = np.asarray(labels, np.int64)
        self._encoded_tf = tf.constant(np.asarray(encoded, dtype=object), tf.string)
        self._labels_tf = tf.constant(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = preprocess.decode_image(tf.gather(self._encoded_tf, index))
        return image, tf.gather(self._labels_tf, index)

    def labels(self) -> np.ndarray:
        return self._labels


class FileSplit(Split):
    """Image files on disk, read and decoded on access (folder datasets)."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray,
        class_names: Sequence[str],
        description: str,
    ):
        self.description = description
        self.class_names = tuple(class_names)
        self.paths = list(paths)
        self._labels = np.asarray(labels, np.int64)
        self._paths_tf = tf.constant(self.paths, tf.string)
        self._labels_tf = tf.constant(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        encoded = tf.io.read_file(tf.gather(self._paths_tf, index))
        return preprocess.decode_image(encoded), tf.gather(self._labels_tf, index)

    def labels(self) -> np.ndarray:
        return self._labels

    def name_of(self, index: int) -> str:
        return self.paths[index]


class ClassSubsetSplit(Split):
    """The examples of `base` whose label is in `classes`, relabelled 0..k-1 in that order."""

    def __init__(self, base: Split, classes: Sequence[int]):
        classes = [int(c) for c in classes]
        num_classes = len(base.class_names)
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad or len(set(classes)) != len(classes) or not classes:
            raise DataError(
                f"config.class_subset={tuple(classes)} is not a non-empty list of distinct class "
                f"indices in 0..{num_classes - 1} of {base.description}"
            )
        self.base = base
        self.description = f"{base.description} classes {tuple(classes)}"
        self.class_names = tuple(base.class_names[c] for c in classes)
        relabel = np.full(num_classes, -1, np.int64)
        relabel[classes] = np.arange(len(classes))
        base_labels = base.labels()
        self._indices = np.flatnonzero(relabel[base_labels] >= 0).astype(np.int64)
        self._labels = relabel[base_labels[self._indices]]
        self._indices_tf = tf.constant(self._indices)
        self._relabel_tf = tf.constant(relabel)

    def __len__(self) -> int:
        return len(self._indices)

    def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = self.base.load(tf.gather(self._indices_tf, index))
        return image, tf.gather(self._relabel_tf, label)

    def labels(self) -> np.ndarray:
        return self._labels

    def name_of(self, index: int) -> str:
        return self.base.name_of(int(self._indices[index]))


def resolve_split_spec(
    spec: str, sizes: dict[str, int], dataset: str
) -> list[tuple[str, int, int]]:
    """tfds split syntax ('train', 'train[:90%]', 'train[10:]+test') -> [(split, start, stop)].

    Used for sources that are not tfds (digits, folders) so all sources slice the same way.
    """
    infos = {
        name: types.SimpleNamespace(num_examples=n, shard_lengths=[n]) for name, n in sizes.items()
    }
    try:
        instructions = tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise DataError(
            f"{dataset}: cannot use split {spec!r} ({e}); available splits: {sorted(sizes)}, "
            "sliceable as e.g. 'train[:90%]'"
        ) from e
    out = []
    for instruction in instructions:
        size = sizes[instruction.splitname]
        start = 0 if instruction.from_ is None else instruction.from_
        stop = size if instruction.to is None else instruction.to
        out.append((instruction.splitname, start, stop))
    logging.debug("%s split %r -> %s", dataset, spec, out)
    return out
