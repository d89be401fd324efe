"""Image-folder datasets: `<root>/<split>/<class>/*.{jpg,jpeg,png,bmp,gif}`.

Classes are the sub-folders of `train/` (or of the requested split when there is no `train/`),
sorted by name. Split `test` falls back to `validation/` when there is no `test/`. Within a split,
files are ordered by an MD5 of their `<class>/<file>` path: a fixed, class-mixed order, so slices
like `train[:90%]` / `train[90%:]` are stable random subsets (adding files does not reorder the
others). Hidden files are ignored; other files with non-image extensions are listed in a warning.

With `skip_bad_images`, every file of the split is decoded once when the split is opened and the
unreadable ones are left out, with a warning that gives their count and first paths. Without it,
a bad file stops training with a `BadImageError` naming it (see pipeline.py).
"""

import hashlib
import os

import numpy as np
import tensorflow as tf
from absl import logging

from vit_jax.data import preprocess
from vit_jax.data.errors import DataError
from vit_jax.data.splits import FileSplit, resolve_split_spec

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PATHS_IN_WARNING",
    "TEST_FALLBACKS",
    "class_names",
    "open_split",
]


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
TEST_FALLBACKS = ("test", "validation")
MAX_PATHS_IN_WARNING = 5


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _subdirs(path: str) -> list[str]:
    return [n for n in _visible(os.listdir(path)) if os.path.isdir(os.path.join(path, n))]


def _split_dir(root: str, split: str) -> str:
    """Folder of `split` under root; 'test' may be 'validation/'."""
    candidates = TEST_FALLBACKS if split == "test" else (split,)
    for name in candidates:
        if os.path.isdir(os.path.join(root, name)):
            return name
    present = _subdirs(root)
    wanted = " or ".join(f"{c}/" for c in candidates)
    hint = ""
    if split == "test" and "train" in present:
        hint = (
            "; create it, or set config.pp.test to a held-out slice of train such as "
            "'train[90%:]' (and config.pp.train to 'train[:90%]')"
        )
    raise DataError(
        f"image folder {root} has no {wanted} sub-folder for split {split!r} "
        f"(found: {', '.join(present) or 'nothing'}){hint}"
    )


def class_names(root: str, split_dirname: str) -> list[str]:
    """Sorted class folder names, taken from train/ when it exists."""
    source = "train" if os.path.isdir(os.path.join(root, "train")) else split_dirname
    names = _subdirs(os.path.join(root, source))
    if not names:
        raise DataError(
            f"image folder {os.path.join(root, source)} has no class sub-folders; expected "
            f"<class>/*{{{','.join(IMAGE_EXTENSIONS)}}}"
        )
    return names


def _sort_key(relative_path: str) -> str:
    return hashlib.md5(relative_path.encode("utf-8"), usedforsecurity=False).hexdigest()


def _fingerprint(paths: list[str]) -> str:
    """Changes when any file is added, removed, rewritten or touched."""
    digest = hashlib.sha1()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


_unreadable_cache: dict[str, list[int]] = {}


def _find_unreadable_files(paths: list[str]) -> list[int]:
    """Indices of files that cannot be read and decoded. Decodes every file once, in parallel;
    the answer is remembered (per process) until a file changes."""
    key = _fingerprint(paths)
    if key not in _unreadable_cache:
        _unreadable_cache[key] = _decode_all(paths)
    return _unreadable_cache[key]


def _decode_all(paths: list[str]) -> list[int]:
    logging.info("skip_bad_images: decoding all %d files once to find unreadable ones", len(paths))
    paths_tf = tf.constant(paths, tf.string)

    def decode(i: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = preprocess.decode_image(tf.io.read_file(paths_tf[i]))
        return i, tf.shape(image)

    ds = tf.data.Dataset.range(len(paths)).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    readable = {int(i) for i, _ in ds.ignore_errors().as_numpy_iterator()}
    return [i for i in range(len(paths)) if i not in readable]


def _list_split(
    root: str, dirname: str, classes: tuple[str, ...], skip_bad_images: bool
) -> tuple[list[str], list[int]]:
    """(paths, labels) of one split folder in its fixed order; validates the layout."""
    split_path = os.path.join(root, dirname)
    unknown = [c for c in _subdirs(split_path) if c not in classes]
    if unknown:
        raise DataError(
            f"{split_path} has class folders {unknown} that train/ does not have "
            f"(classes: {list(classes)}); add them to train/ or remove them"
        )
    entries: list[tuple[str, str, int]] = []  # (sort key, path, label)
    ignored: list[str] = []
    for name in _visible(os.listdir(split_path)):
        if not os.path.isdir(os.path.join(split_path, name)):
            ignored.append(os.path.join(split_path, name))
    for label, cls in enumerate(classes):
        class_path = os.path.join(split_path, cls)
        if not os.path.isdir(class_path):
            logging.warning("%s: no folder for class %r (0 examples)", split_path, cls)
            continue
        found = 0
        for name in _visible(os.listdir(class_path)):
            path = os.path.join(class_path, name)
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                entries.append((_sort_key(f"{cls}/{name}"), path, label))
                found += 1
            else:
                ignored.append(path)
        if not found:
            raise DataError(
                f"class folder {class_path} contains no images "
                f"(*{', *'.join(IMAGE_EXTENSIONS)}, any case); add images or remove the folder"
            )
    if ignored:
        logging.warning(
            "%s: ignoring %d entries that are not <class>/<image file> (e.g. %s)",
            split_path,
            len(ignored),
            ignored[:MAX_PATHS_IN_WARNING],
        )
    entries.sort()
    paths = [p for _, p, _ in entries]
    labels = [lbl for _, _, lbl in entries]
    if skip_bad_images:
        paths, labels = _without_unreadable(split_path, classes, paths, labels)
    return paths, labels


def _without_unreadable(
    split_path: str, classes: tuple[str, ...], paths: list[str], labels: list[int]
) -> tuple[list[str], list[int]]:
    """`skip_bad_images`: drops files that do not decode (warned); an emptied class is an error."""
    bad = _find_unreadable_files(paths)
    if not bad:
        return paths, labels
    logging.warning(
        "skip_bad_images: skipping %d unreadable image files of %d in %s, first: %s",
        len(bad),
        len(paths),
        split_path,
        [paths[i] for i in bad[:MAX_PATHS_IN_WARNING]],
    )
    bad_set = set(bad)
    keep = [i for i in range(len(paths)) if i not in bad_set]
    paths = [paths[i] for i in keep]
    labels = [labels[i] for i in keep]
    left = np.bincount(labels, minlength=len(classes))
    for label, cls in enumerate(classes):
        if os.path.isdir(os.path.join(split_path, cls)) and left[label] == 0:
            raise DataError(
                f"class folder {os.path.join(split_path, cls)} has no readable images "
                "left after skip_bad_images"
            )
    return paths, labels


def open_split(root: str, spec: str, *, skip_bad_images: bool) -> FileSplit:
    """The examples of image folder `root` selected by `spec` ('train', 'test', 'train[:90%]')."""
    root = os.path.abspath(os.path.expanduser(root))
    names = {}
    for token in spec.replace("+", " ").split():
        split = token.split("[", 1)[0]
        names[split] = _split_dir(root, split)
    classes = tuple(class_names(root, next(iter(names.values()))))
    listed = {split: _list_split(root, d, classes, skip_bad_images) for split, d in names.items()}
    ranges = resolve_split_spec(spec, {s: len(p) for s, (p, _) in listed.items()}, root)
    paths: list[str] = []
    labels: list[int] = []
    for split, start, stop in ranges:
        paths.extend(listed[split][0][start:stop])
        labels.extend(listed[split][1][start:stop])
    return FileSplit(paths, np.array(labels, np.int64), classes, f"image folder {root} {spec!r}")
