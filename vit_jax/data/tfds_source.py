"""tfds image-classification datasets as random-access splits.

How random access is obtained depends on how the dataset was prepared:
- array_record files (`tfds build --file_format=array_record`, or `tfds convert_format`):
  `builder.as_data_source`, reading single records on demand -- works for any size;
- tfrecord files (tfds' default) up to `MAX_IN_MEMORY_BYTES` per split: the split's *encoded*
  records are read once into memory (cifar10/100 ~130 MB, oxford_iiit_pet ~0.8 GB) and decoded
  on access;
- larger tfrecord splits (imagenet2012): refused with the command that converts them once to
  array_record. We chose that over a streaming reader because a stream cannot jump to step k
  without reading everything before it, nor let each host read only its own examples.

The image feature is read undecoded (`SkipDecoding`) and decoded by `preprocess.decode_image`.
"""

import difflib
import re

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from vit_jax.data import preprocess
from vit_jax.data.errors import DataError, DatasetNotPreparedError, UnknownDatasetError
from vit_jax.data.splits import EncodedSplit, Split, resolve_split_spec

__all__ = [
    "MAX_IN_MEMORY_BYTES",
    "NAME_PATTERN",
    "builder",
    "DataSourceSplit",
    "has_random_access",
    "looks_like_name",
    "open_split",
]


MAX_IN_MEMORY_BYTES = 4 * 2**30
# 'cifar10', 'cifar10:3.*.*', 'imagenet2012_subset/10pct', 'cifar10_corrupted/brightness_5:1.0.0'
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9.*]+)?$")


def looks_like_name(name: str) -> bool:
    """Whether `name` has the form of a tfds name (as opposed to a path)."""
    return bool(NAME_PATTERN.match(name))


def builder(name: str, data_dir: str | None, manual_dir: str | None) -> tfds.core.DatasetBuilder:
    """The prepared builder of `name`; downloads and prepares it if needed and possible."""
    try:
        result = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        base = name.split(":")[0].split("/")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownDatasetError(
            f"config.dataset={name!r} is not 'digits', not an existing folder and not a tfds "
            f"dataset{hint}"
        ) from e
    except Exception as e:  # bad version/config: tfds raises various types
        raise DataError(f"tfds cannot load dataset {name!r}: {e}") from e
    if not result.is_prepared():
        logging.info("tfds dataset %s is not in %s; preparing it", name, result.data_dir)
        try:
            result.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
            )
        except Exception as e:  # no network, missing manual files, missing extras...
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DatasetNotPreparedError(
                f"tfds dataset {name!r} is not prepared in {result.data_dir} and preparing it "
                f"failed ({type(e).__name__}: {first_line}). On a machine with network run "
                f"`tfds build {name} --data_dir <dir>` (manual-download datasets need their files "
                "in config.tfds_manual_dir) and point config.tfds_data_dir at <dir>"
            ) from e
    return result


def _keys(b: tfds.core.DatasetBuilder) -> tuple[str, str]:
    """(image key, label key), checked to be an Image and a ClassLabel feature."""
    features = b.info.features
    image_key, label_key = b.info.supervised_keys or ("image", "label")
    if not isinstance(image_key, str) or not isinstance(label_key, str):
        image_key, label_key = "image", "label"
    if image_key not in features or not isinstance(features[image_key], tfds.features.Image):
        raise DataError(f"tfds dataset {b.name!r} has no Image feature {image_key!r}: {features}")
    if label_key not in features or not isinstance(features[label_key], tfds.features.ClassLabel):
        raise DataError(f"tfds dataset {b.name!r} has no ClassLabel feature {label_key!r}")
    return image_key, label_key


def _split_bytes(b: tfds.core.DatasetBuilder, spec: str) -> int | None:
    """Size in bytes of the (whole) splits `spec` reads; None when tfds does not know them yet
    (checks the split names on the way)."""
    splits = dict(b.info.splits)
    if not splits:  # unknown before preparation (or mocked): tfds itself will check
        return None
    ranges = resolve_split_spec(
        spec, {k: v.num_examples for k, v in splits.items()}, f"tfds {b.name}"
    )
    return sum(splits[name].num_bytes for name in {r[0] for r in ranges})


def has_random_access(b: tfds.core.DatasetBuilder) -> bool:
    """Whether the prepared files support random access (array_record)."""
    formats = b.info.available_file_formats()
    return bool(set(formats) & set(tfds.core.FileFormat.with_random_access()))


class DataSourceSplit(Split):
    """A tfds split read record by record through `tfds.data_source` (array_record files)."""

    def __init__(self, b: tfds.core.DatasetBuilder, spec: str):
        self._image_key, self._label_key = _keys(b)
        self.description = f"tfds {b.name} {spec!r}"
        self.class_names = tuple(b.info.features[self._label_key].names)
        self._source = b.as_data_source(
            split=spec, decoders={self._image_key: tfds.decode.SkipDecoding()}
        )
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._source)

    def _record(self, index: np.ndarray) -> tuple[bytes, np.int64]:
        example = self._source[int(index)]
        return example[self._image_key], np.int64(example[self._label_key])

    def load(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        encoded, label = tf.numpy_function(
            self._record, [index], (tf.string, tf.int64), stateful=False
        )
        label.set_shape([])
        return preprocess.decode_image(tf.ensure_shape(encoded, [])), label

    def labels(self) -> np.ndarray:
        if self._labels is None:
            logging.info("%s: reading the labels of all %d records", self.description, len(self))
            self._labels = np.array(
                [self._source[i][self._label_key] for i in range(len(self))], np.int64
            )
        return self._labels

    def name_of(self, index: int) -> str:
        return f"{self.description} record {index}"


def _read_encoded(b: tfds.core.DatasetBuilder, spec: str) -> EncodedSplit:
    """Reads the split's encoded images and labels into memory, in the canonical record order."""
    image_key, label_key = _keys(b)
    num_bytes = _split_bytes(b, spec)
    if num_bytes is not None and num_bytes > MAX_IN_MEMORY_BYTES:
        raise DataError(
            f"tfds dataset {b.name!r} split {spec!r} is {num_bytes / 2**30:.1f} GiB of "
            "tfrecord files, too large to hold in memory for random access; convert it once with "
            f"`tfds convert_format --dataset_version_dir={b.data_dir} "
            "--out_file_format=array_record`"
        )
    logging.info("reading the encoded images of tfds %s %r into memory", b.name, spec)
    ds = b.as_dataset(
        split=spec,
        decoders={image_key: tfds.decode.SkipDecoding()},
        shuffle_files=False,
        read_config=tfds.ReadConfig(interleave_cycle_length=1),
    )
    ds = ds.map(lambda ex: (ex[image_key], ex[label_key])).batch(4096)
    encoded: list[bytes] = []
    labels: list[np.ndarray] = []
    for images, batch_labels in ds.as_numpy_iterator():
        encoded.extend(images)
        labels.append(batch_labels)
    labels_np = np.concatenate(labels) if labels else np.zeros([0], np.int64)
    names = b.info.features[label_key].names
    return EncodedSplit(encoded, labels_np, names, f"tfds {b.name} {spec!r}")


def open_split(name: str, spec: str, *, data_dir: str | None, manual_dir: str | None) -> Split:
    """The examples of tfds dataset `name` selected by `spec` (tfds split syntax)."""
    b = builder(name, data_dir, manual_dir)
    _split_bytes(b, spec)
    try:
        if has_random_access(b):
            return DataSourceSplit(b, spec)
        return _read_encoded(b, spec)
    except (ValueError, KeyError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"tfds dataset {name!r}: cannot read split {spec!r}: {e}") from e
