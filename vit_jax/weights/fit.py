"""Fit a checkpoint's parameters to a model: the one place that adapts stored weights.

`fit(params, metadata, model_config, target)` serves fine-tuning (the reference
`load_pretrained`), inference (predict / evaluate / visualize at any resolution) and the
distillation teacher alike:

- `target` is the model's parameter tree: freshly initialised arrays when fine-tuning (the
  heads are then taken from it: new class count, zero init), or just their shapes
  (`jax.ShapeDtypeStruct`, e.g. `models.init_shapes(module, size)`) when the stored head is kept;
- a stored `pre_logits` is dropped when fine-tuning a model without a representation layer, as
  the reference does; otherwise it must fit;
- position embeddings are resampled on the 2-D token grid when the grids differ (prefix tokens
  apart) by `vit_jax.models.resample_posemb`, the resampler the model uses on the fly, with the
  stored weights' `posemb_resample` (their source's interpolation; the reference's scipy
  order 1 by default). The stored grid comes from the metadata's `image_size` and `model`, the
  model's from `image_size`; either is square when not given. A model with a fixed
  `posemb_grid` keeps the table at that grid and resamples it on the fly instead;
- the scanned / per-layer layout follows `target`;
- anything else that differs is one `CheckpointError` listing missing, mismatched and
  unexpected keys with their shapes. Nothing is loaded partially.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from vit_jax import models
from vit_jax.models.posemb import DEFAULT_RESAMPLE
from vit_jax.weights.errors import CheckpointError, mismatch_report
from vit_jax.weights.npz import POSEMB_KEY
from vit_jax.weights.tree import flatten, unflatten

__all__ = ["HEADS", "fit", "resample_posemb", "token_grid"]

HEADS = ("head", "head_dist")  # taken from the model being fine-tuned


def resample_posemb(
    posemb: np.ndarray,
    new_grid: tuple[int, int],
    *,
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
    method: str = DEFAULT_RESAMPLE,
) -> np.ndarray:
    """(1, prefix + gh*gw, D) -> (1, prefix + new_gh*new_gw, D), in numpy (float64 inside).

    `vit_jax.models.resample_posemb` (the on-the-fly resampler) at load time; the default
    `method` is the reference's (`scipy.ndimage.zoom`, order 1: corners map to corners, so a
    table linear in the grid coordinates is reproduced exactly). The prefix (class /
    distillation token) rows are kept; equal grids return the input. `old_grid` defaults to
    the square grid.
    """
    posemb = np.asarray(posemb)
    tokens = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        old_grid = _square_grid(
            tokens,
            f"stored pos_embedding: {tokens}",
            "its (rows, cols) are needed (an image_size in the file's metadata / JSON sidecar)",
        )
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid[0] * old_grid[1] != tokens:
        raise CheckpointError(f"stored pos_embedding: {tokens} grid tokens, not grid {old_grid}")
    if old_grid != new_grid:
        logging.info(
            "resampling position embeddings from grid %s to %s (%s)", old_grid, new_grid, method
        )
    try:
        return models.resample_posemb(
            posemb, new_grid, old_grid=old_grid, num_prefix_tokens=num_prefix_tokens, method=method
        )
    except ValueError as e:
        raise CheckpointError(f"stored pos_embedding: {e}") from None


def _resample_method(metadata: Mapping[str, Any], model_config: Any) -> str:
    """How the stored table is resampled: the stored weights' `posemb_resample` (their
    source's interpolation), else the model's, else the reference's."""
    for config in (metadata.get("model"), model_config):
        if config and config.get("posemb_resample"):
            return str(config["posemb_resample"])
    return DEFAULT_RESAMPLE


def token_grid(model_config: Any, image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of patch tokens a model config makes of `image_size` images (the family's
    `models.token_grid`, raising `CheckpointError`)."""
    try:
        return models.token_grid(models.get_config(model_config), image_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _table_grid(model_config: Any, image_size: Any) -> tuple[int, int]:
    """The grid of the position table the model stores for `image_size`: its fixed
    `posemb_grid` when set (other inputs resample it on the fly), else the token grid."""
    try:
        return models.position_table_grid(models.get_config(model_config), image_size)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _square_grid(tokens: int, what: str, remedy: str) -> tuple[int, int]:
    """(side, side) for a square grid of `tokens`; CheckpointError with `remedy` otherwise."""
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise CheckpointError(f"{what} grid tokens are not a square grid: {remedy}")
    return side, side


def _model_grid(tokens: int, model_config: Any, image_size: Any) -> tuple[int, int]:
    if image_size is None:
        return _square_grid(
            tokens,
            f"the model's {tokens}",
            "pass image_size=(h, w) so the position embeddings can be resampled",
        )
    grid = _table_grid(model_config, image_size)
    if grid[0] * grid[1] != tokens:
        raise CheckpointError(
            f"image_size {image_size} gives a {grid} token grid, but the model's "
            f"pos_embedding holds {tokens} grid tokens"
        )
    return grid


def _stored_grid(what: str, metadata: Mapping[str, Any]) -> tuple[int, int] | None:
    """The stored position embeddings' grid from the metadata (None: assume square)."""
    if not (metadata.get("image_size") and metadata.get("model")):
        return None
    try:
        return _table_grid(metadata["model"], tuple(metadata["image_size"]))
    except (ValueError, TypeError) as e:
        logging.warning("%s: ignoring the recorded model/image_size (%s)", what, e)
        return None


def _warn_architecture(what: str, metadata: Mapping[str, Any], model_config: Any) -> None:
    """Warns when the stored model computed its GELU / LayerNorm differently from the model."""
    stored = metadata.get("model") or {}
    for field in ("gelu_approximate", "layernorm_epsilon"):
        if field in stored and model_config is not None and field in model_config:
            if stored[field] != model_config[field]:
                logging.warning(
                    "%s was trained with %s=%s, the model uses %s: outputs differ slightly "
                    "until fine-tuned (set model.%s=%s to match)",
                    what,
                    field,
                    stored[field],
                    model_config[field],
                    field,
                    stored[field],
                )


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _prefix_tokens(model_config: Any, targets: Mapping[str, Any]) -> int:
    """The model's tokens before the grid (the family's count; its parameters without a config)."""
    if model_config is None:
        return sum(k in targets for k in ("cls", "dist"))
    return models.num_posemb_prefix_tokens(models.get_config(model_config))


def _as_arrays(tree: Mapping[str, Any]) -> Any:
    """Shape-only leaves (`jax.ShapeDtypeStruct`) as zero-copy numpy views, so they index."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return np.broadcast_to(np.zeros((), x.dtype), x.shape)
        return x

    return jax.tree.map(leaf, tree)


def _fit_posemb(value, target, metadata, model_config, image_size, prefix, what) -> np.ndarray:
    if value.ndim != 3 or value.shape[-1] != target.shape[-1]:
        return value  # reported as mismatched by the caller
    new_grid = _model_grid(target.shape[1] - prefix, model_config, image_size)
    old_grid = _stored_grid(what, metadata)
    method = _resample_method(metadata, model_config)
    return resample_posemb(
        value, new_grid, num_prefix_tokens=prefix, old_grid=old_grid, method=method
    )


def _report(what, model_config, image_size, missing, mismatched, unexpected) -> str:
    name = (model_config or {}).get("name") or "the model"
    at = ""
    if image_size is not None:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        at = f" at {h}x{w}"
    order = str.lower  # cls, embedding, head, pre_logits, Transformer/...: top level first
    return mismatch_report(
        f"{what} does not fit {name}{at}",
        missing=sorted(missing, key=order),
        mismatched=sorted(mismatched, key=order),
        unexpected=sorted(unexpected, key=order),
    )


def fit(
    params: Mapping[str, Any],
    metadata: Mapping[str, Any],
    model_config: Any,
    target: Mapping[str, Any],
    *,
    image_size: int | tuple[int, int] | None = None,
    new_head: bool = False,
    what: str = "checkpoint",
) -> dict[str, Any]:
    """`params` (from `vit_jax.weights.open`) made to fit the model whose tree is `target`.

    `new_head=True` (fine-tuning) takes `head` / `head_dist` from `target` (arrays) and drops a
    stored `pre_logits` the model lacks; otherwise `target` may be shapes and every stored
    parameter must fit. Returns host numpy arrays in `target`'s dtypes and layout (see the
    module docstring).
    """
    _warn_architecture(what, metadata, model_config)
    stored = {k: np.asarray(v) for k, v in flatten(models.unstack_layers(params)).items()}
    targets = flatten(models.unstack_layers(_as_arrays(target)))
    prefix = _prefix_tokens(model_config, targets)
    taken = HEADS if new_head else ()
    drop_pre_logits = new_head and not any(k.startswith("pre_logits/") for k in targets)

    result, mismatched = {}, []
    for key, want in targets.items():
        if key.split("/")[0] in taken:
            result[key] = np.asarray(want)
            continue
        if key not in stored:
            continue
        value = stored[key]
        if key == POSEMB_KEY and _shape(value) != _shape(want):
            try:
                value = _fit_posemb(value, want, metadata, model_config, image_size, prefix, what)
            except CheckpointError as e:
                mismatched.append(f"{key}: stored {_shape(value)}, model {_shape(want)} ({e})")
                continue
        if _shape(value) != _shape(want):
            mismatched.append(f"{key}: stored {_shape(value)}, model {_shape(want)}")
            continue
        result[key] = value.astype(want.dtype)

    bad = {m.split(":")[0] for m in mismatched}
    missing = [f"{k} {_shape(v)}" for k, v in targets.items() if k not in result and k not in bad]
    unexpected = []
    for key, value in stored.items():
        top = key.split("/")[0]
        if key in targets or top in taken or (top == "pre_logits" and drop_pre_logits):
            continue
        unexpected.append(f"{key} {_shape(value)}")
    if drop_pre_logits and any(k.startswith("pre_logits/") for k in stored):
        logging.info("%s: dropping the stored pre_logits (the model has none)", what)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            _report(what, model_config, image_size, missing, mismatched, unexpected)
        )
    tree = unflatten(result)
    return models.stack_layers(tree) if models.is_stacked(target) else tree
