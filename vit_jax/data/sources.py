"""Chooses the source named by `config.dataset` and describes the configured dataset.

`config.dataset` is 'digits' (embedded default), a path to an image folder, or a tfds name
(optionally with config/version: 'cifar10:3.*.*'). `config.class_subset` (original class indices)
keeps those classes only, relabelled 0..k-1 in the given order, for any source.
"""

import dataclasses
import functools
import os

import ml_collections

from vit_jax.data import digits, folders, tfds_source
from vit_jax.data.errors import UnknownDatasetError
from vit_jax.data.splits import ClassSubsetSplit, Split

__all__ = [
    "clear_cache",
    "dataset_name",
    "DatasetInfo",
    "get_info",
    "open_split",
]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about the configured dataset (after class_subset)."""

    name: str
    num_classes: int
    class_names: list[str]
    num_train: int  # examples in config.pp.train
    num_test: int  # examples in config.pp.test


@functools.lru_cache(maxsize=8)
def _open_packaged(
    dataset: str, spec: str, tfds_data_dir: str | None, tfds_manual_dir: str | None
) -> Split:
    """digits or tfds: immutable once prepared, so cached per process (get_info, the train
    iterator and every eval share one read)."""
    if dataset == digits.NAME:
        return digits.open_split(spec)
    if not tfds_source.looks_like_name(dataset):
        raise UnknownDatasetError(
            f"config.dataset={dataset!r} is not 'digits', not a tfds name and no such folder "
            "exists; a folder dataset needs <dir>/train/<class>/*.jpg and <dir>/test/..."
        )
    return tfds_source.open_split(dataset, spec, data_dir=tfds_data_dir, manual_dir=tfds_manual_dir)


def open_split(config: ml_collections.ConfigDict, spec: str) -> Split:
    """The examples of `spec` (e.g. config.pp.train) of config.dataset, after class_subset.

    Folders are listed afresh on each call (files may change); digits and tfds splits are cached.
    """
    dataset = str(config.dataset)
    path = os.path.expanduser(dataset)
    if dataset != digits.NAME and os.path.isdir(path):
        split = folders.open_split(
            path, str(spec), skip_bad_images=bool(config.get("skip_bad_images", False))
        )
    else:
        split = _open_packaged(
            dataset, str(spec), config.get("tfds_data_dir"), config.get("tfds_manual_dir")
        )
    subset = config.get("class_subset")
    if subset is not None:
        split = ClassSubsetSplit(split, [int(c) for c in subset])
    return split


def clear_cache() -> None:
    """Forgets the opened digits/tfds splits (e.g. after re-preparing a tfds dataset)."""
    _open_packaged.cache_clear()


def dataset_name(config: ml_collections.ConfigDict) -> str:
    """'digits', the tfds name, or the folder's absolute path."""
    dataset = str(config.dataset)
    path = os.path.expanduser(dataset)
    if dataset != digits.NAME and os.path.isdir(path):
        return os.path.abspath(path)
    return dataset


def get_info(config: ml_collections.ConfigDict) -> DatasetInfo:
    """Classes and split sizes of the configured dataset (opens, and caches, both splits)."""
    train = open_split(config, config.pp.train)
    test = open_split(config, config.pp.test)
    return DatasetInfo(
        name=dataset_name(config),
        num_classes=len(train.class_names),
        class_names=list(train.class_names),
        num_train=len(train),
        num_test=len(test),
    )
