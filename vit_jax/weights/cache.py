"""Remote weights files (`gs://`, `https://`, anything `tf.io.gfile` opens): one local copy each.

Copies live in `$VIT_JAX_CACHE` (default `~/.cache/vit_jax`), downloaded once with a progress
bar into a `.partial` file renamed when complete.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from typing import Any

from absl import logging
from etils import epath

from vit_jax.weights.errors import CheckpointError, CheckpointNotFoundError

__all__ = ["CACHE_ENV", "cache_dir", "is_remote", "local_copy"]

CACHE_ENV = "VIT_JAX_CACHE"


def cache_dir() -> epath.Path:
    """Where remote checkpoints are cached: `$VIT_JAX_CACHE`, default `~/.cache/vit_jax`."""
    return epath.Path(os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/vit_jax"))


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs other than `file://` (gs://, https://, ...)."""
    return "://" in str(path) and not str(path).startswith("file://")


def _open_remote(url: str) -> tuple[Any, int | None]:
    """(binary stream, size in bytes or None) of a remote file."""
    if url.startswith(("http://", "https://")):
        try:
            response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (http(s) only)
        except OSError as e:
            raise CheckpointNotFoundError(f"{url}: cannot be downloaded ({e})") from None
        length = response.headers.get("Content-Length")
        return response, int(length) if length else None
    import tensorflow as tf

    try:
        size = tf.io.gfile.stat(url).length
        return tf.io.gfile.GFile(url, "rb"), size
    except tf.errors.OpError as e:
        message = e.message.strip().splitlines()[0] if e.message else type(e).__name__
        raise CheckpointNotFoundError(f"{url}: cannot be opened ({message})") from None


def local_copy(path: str | os.PathLike) -> epath.Path:
    """`path` itself when local; a remote file is downloaded once into `cache_dir()`.

    The download shows size, speed and ETA, goes to a `.partial` file first and is renamed when
    complete, so an interrupted download is never mistaken for a cached file.
    """
    path = str(path)
    if not is_remote(path):
        return epath.Path(os.path.expanduser(path.removeprefix("file://")))
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    target = cache_dir() / f"{digest}-{os.path.basename(path.rstrip('/'))}"
    if target.exists():
        logging.info("%s: using cached copy %s", path, target)
        return target
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.parent / f"{target.name}.{os.getpid()}.partial"  # hosts may race
    src, size = _open_remote(path)
    start = time.perf_counter()
    try:
        with (
            src,
            partial.open("wb") as dst,
            tqdm(
                total=size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=os.path.basename(path),
            ) as bar,
        ):
            while chunk := src.read(8 << 20):
                dst.write(chunk)
                bar.update(len(chunk))
        if size is not None and partial.stat().length != size:
            raise CheckpointError(
                f"{path}: download incomplete ({partial.stat().length} of {size} bytes)"
            )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(target)
    logging.info("%s: cached as %s (%.1f s)", path, target, time.perf_counter() - start)
    return target
