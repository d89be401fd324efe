"""The reference project's weights API, kept by name: `load`, `load_pretrained`, `save_npz`.

Thin wrappers over `vit_jax.weights` (which reads and writes every format: a trainer run,
the published `.npz` in all its variants, Hugging Face and timm files):

    params = checkpoint.load("ViT-B_16.npz")
    params = checkpoint.load_pretrained(pretrained_path=..., init_params=..., model_config=...)
    checkpoint.save_npz(params, "out.npz", metadata={"model": ..., "class_names": [...]})
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from vit_jax import weights
from vit_jax.weights.errors import CheckpointError, CheckpointNotFoundError
from vit_jax.weights.names import resolve_pretrained
from vit_jax.weights.npz import save_npz

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "load",
    "load_pretrained",
    "resolve_pretrained",
    "save_npz",
]


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Parameters (nested dict of numpy arrays, published names) of any supported checkpoint."""
    return weights.open(path)[0]


def load_pretrained(
    *,
    pretrained_path: str | os.PathLike | Mapping[str, Any],
    init_params: Mapping[str, Any],
    model_config: Any,
    image_size: int | tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Pretrained weights fitted to a freshly initialised model, as the reference function.

    The head comes from `init_params` (new class count, zero init), a stored `pre_logits` is
    dropped when `model_config.representation_size` is None, position embeddings are resampled
    to `image_size`'s grid (square by default), the scanned / per-layer layout follows
    `init_params`; anything else that differs is one error listing the keys
    (`vit_jax.weights.fit`). `pretrained_path`: anything `vit_jax.weights.open` reads, or an
    already loaded parameter tree. Returns host numpy arrays in `init_params`' dtypes.
    """
    if isinstance(pretrained_path, Mapping):
        params, meta, what = dict(pretrained_path), {}, "pretrained params"
    else:
        (params, meta), what = weights.open(pretrained_path), str(pretrained_path)
    return weights.fit(
        params,
        meta,
        model_config,
        init_params,
        image_size=image_size,
        new_head=True,
        what=what,
    )
