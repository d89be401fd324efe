"""Position tables: the fixed 2-D sin-cos table and the one resampler of learned tables.

Every library a learned table comes from resamples it with a separable linear map, so one
`interpolation_matrix(in_size, out_size, method)` per axis and two contractions reproduce each
of them exactly. `method` names the source's own interpolation (`RESAMPLE_METHODS`):

- `linear_align_corners`: `scipy.ndimage.zoom(order=1)`, corners mapped to corners (source
  coordinate i * (in - 1) / (out - 1)); the reference `load_pretrained` and big_vision's
  `resample_posemb`, and so our own runs and the published `.npz`;
- `bicubic`: torch's `interpolate(mode='bicubic', align_corners=False)` with `size=` (transformers
  ViT, DeiT, Dinov2, SigLIP): Keys' cubic with a = -0.75, source coordinate
  (i + 0.5) * in / out - 0.5, taps clamped to the border;
- `bicubic_antialias`: the same with `antialias=True` (transformers Dinov2WithRegisters, timm's
  `resample_abs_pos_embed` and `dynamic_img_size`): PIL's algorithm, the cubic with a = -0.5
  widened by the scale when downsampling, taps cut at the border, weights renormalised.

`resample_posemb` is the one resampler: at load time (`vit_jax.weights.fit`, numpy in float64)
and on the fly (`AddPositionEmbs` with a fixed `posemb_grid`, jax in float32) alike.

The position-embedding modules a ViT picks by name (`POSITION_EMBEDDINGS`: `learn`, the learned
table `AddPositionEmbs`; `sincos2d`; `none`) live here too, beside the tables they add.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DEFAULT_RESAMPLE",
    "POSITION_EMBEDDINGS",
    "RESAMPLE_METHODS",
    "SINCOS2D_VARIANTS",
    "AddPositionEmbs",
    "NoPositionEmbedding",
    "SinCos2DPositionEmbedding",
    "interpolation_matrix",
    "resample_posemb",
    "resample_posemb_bicubic",
    "sincos2d_posemb",
]

Array = jax.Array
Dtype = Any

RESAMPLE_METHODS = ("linear_align_corners", "bicubic", "bicubic_antialias")
DEFAULT_RESAMPLE = "linear_align_corners"  # the reference's load_pretrained (scipy order 1)
SINCOS2D_VARIANTS = ("big_vision", "mocov3")


def sincos2d_posemb(
    grid_h: int,
    grid_w: int,
    width: int,
    temperature: float = 10_000.0,
    variant: str = "big_vision",
) -> jax.Array:
    """Fixed 2-D sine/cosine table (1, grid_h * grid_w, width), row-major over the grid.

    Channels in quarters: sin(x), cos(x), sin(y), cos(y) (x the column, y the row), at
    frequencies 1 / temperature ** (k / (width // 4 - 1)), k < width // 4 (`big_vision`:
    big_vision's `posemb_sincos_2d`), or k / (width // 4) (`mocov3`: MoCo v3's spacing, what
    vit_jax used before the `posemb_sincos2d_variant` field).
    """
    if variant not in SINCOS2D_VARIANTS:
        raise ValueError(
            f"posemb_sincos2d_variant must be one of {SINCOS2D_VARIANTS}, got {variant!r}"
        )
    quarter = width // 4
    if width % 4:
        raise ValueError(f"sincos2d position embeddings need hidden_size % 4 == 0, got {width}")
    if variant == "big_vision" and quarter < 2:  # frequencies k / (quarter - 1)
        raise ValueError(
            f"sincos2d position embeddings (big_vision) need hidden_size >= 8, got {width}"
        )
    y, x = np.mgrid[:grid_h, :grid_w]
    spacing = quarter - 1 if variant == "big_vision" else quarter
    omega = 1.0 / temperature ** (np.arange(quarter) / spacing)
    y = y.reshape(-1)[:, None] * omega[None, :]
    x = x.reshape(-1)[:, None] * omega[None, :]
    table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(table[None], jnp.float32)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a` (support [-2, 2])."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def _linear_align_corners(in_size: int, out_size: int) -> np.ndarray:
    m = np.zeros((out_size, in_size))
    if in_size == 1:
        m[:, 0] = 1.0
        return m
    step = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    for i in range(out_size):
        src = i * step
        lo = min(int(np.floor(src)), in_size - 2)
        frac = src - lo
        m[i, lo] += 1.0 - frac
        m[i, lo + 1] += frac
    return m


def _bicubic(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        src = (i + 0.5) * scale - 0.5
        taps = int(np.floor(src)) + np.arange(-1, 3)
        np.add.at(m[i], np.clip(taps, 0, in_size - 1), _cubic(src - taps, -0.75))
    return m


def _bicubic_antialias(in_size: int, out_size: int) -> np.ndarray:
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = _cubic((np.arange(lo, hi) - center + 0.5) * invscale, -0.5)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


_KERNELS = {
    "linear_align_corners": _linear_align_corners,
    "bicubic": _bicubic,
    "bicubic_antialias": _bicubic_antialias,
}


def check_method(method: str) -> str:
    """`method` when it is one of `RESAMPLE_METHODS`, else a ValueError naming it."""
    if method not in _KERNELS:
        raise ValueError(f"posemb_resample must be one of {RESAMPLE_METHODS}, got {method!r}")
    return method


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, method: str = "bicubic") -> np.ndarray:
    """(out_size, in_size) float64 matrix M with `M @ v` the 1-D resize of `v` by `method`."""
    check_method(method)
    if in_size < 1 or out_size < 1:
        raise ValueError(f"position-table resize needs positive sizes, got {in_size} -> {out_size}")
    m = _KERNELS[method](int(in_size), int(out_size))
    m.setflags(write=False)  # cached: shared by every caller
    return m


def resample_posemb(
    posemb: jax.Array | np.ndarray,
    new_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    method: str = DEFAULT_RESAMPLE,
) -> jax.Array | np.ndarray:
    """(1, prefix + gh*gw, D) -> (1, prefix + nh*nw, D): the grid rows resampled by `method`.

    The prefix rows (class / distillation token) are kept as they are; equal grids return the
    input. A numpy table is resampled in float64 (load time), anything else with jax in float32
    at the highest matmul precision (on the fly, as transformers and timm interpolate in
    float32); either is returned in the input's dtype.
    """
    gh, gw = (int(g) for g in old_grid)
    nh, nw = (int(g) for g in new_grid)
    tokens = posemb.shape[1] - num_prefix_tokens
    if tokens != gh * gw:
        raise ValueError(
            f"position table has {tokens} grid rows after {num_prefix_tokens} prefix rows, "
            f"not grid {(gh, gw)}"
        )
    rows, cols = interpolation_matrix(gh, nh, method), interpolation_matrix(gw, nw, method)
    if (gh, gw) == (nh, nw):
        return posemb if isinstance(posemb, np.ndarray) else jnp.asarray(posemb)
    dtype = posemb.dtype
    if isinstance(posemb, np.ndarray):
        grid = posemb[0, num_prefix_tokens:].astype(np.float64).reshape(gh, gw, -1)
        grid = np.einsum("qw,pwd->pqd", cols, np.einsum("ph,hwd->pwd", rows, grid))
        grid = grid.reshape(1, nh * nw, -1).astype(dtype)
        return np.concatenate([posemb[:, :num_prefix_tokens], grid], axis=1)
    hi = jax.lax.Precision.HIGHEST
    grid = jnp.asarray(posemb[0, num_prefix_tokens:], jnp.float32).reshape(gh, gw, -1)
    grid = jnp.einsum("ph,hwd->pwd", jnp.asarray(rows, jnp.float32), grid, precision=hi)
    grid = jnp.einsum("qw,pwd->pqd", jnp.asarray(cols, jnp.float32), grid, precision=hi)
    grid = grid.reshape(1, nh * nw, -1).astype(dtype)
    return jnp.concatenate([jnp.asarray(posemb[:, :num_prefix_tokens], dtype), grid], axis=1)


def resample_posemb_bicubic(
    posemb: jax.Array | np.ndarray,
    new_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    antialias: bool = False,
) -> jax.Array:
    """`resample_posemb` with torch's bicubic (`antialias` as torch's), on the fly (jax)."""
    method = "bicubic_antialias" if antialias else "bicubic"
    return resample_posemb(
        jnp.asarray(posemb),
        new_grid,
        old_grid=old_grid,
        num_prefix_tokens=num_prefix_tokens,
        method=method,
    )


# --- Position embeddings: `POSITION_EMBEDDINGS[config.posemb](dtype=..., param_dtype=...)`,
# called `(tokens, grid)` with the prefix tokens first; each returns tokens + embeddings.


class AddPositionEmbs(nn.Module):
    """Learned position embeddings `pos_embedding`, initialised normal(0.02) (`learn`).

    The table has a row per prefix token (class, distillation) and one per grid cell. `grid`
    (the config's `posemb_grid`) fixes the stored grid: another input grid resamples it on the
    fly (`resample_posemb` by `method`, the config's `posemb_resample`); None stores the
    input's grid, and the model then runs only at the size it was made for. `covers_prefix=False`
    (DeiT-III, timm's `no_embed_class`): no rows for the prefix tokens, which get none.
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    grid: tuple[int, int] | None = None
    covers_prefix: bool = True
    method: str = DEFAULT_RESAMPLE

    @nn.compact
    def __call__(self, x: Array, grid: tuple[int, int]) -> Array:
        prefix = x.shape[1] - grid[0] * grid[1]
        stored = tuple(self.grid) if self.grid is not None else tuple(grid)
        rows = (prefix if self.covers_prefix else 0) + stored[0] * stored[1]
        shape = (1, rows, x.shape[2])
        if self.has_variable("params", "pos_embedding"):  # before Flax's own shape check
            held = tuple(self.get_variable("params", "pos_embedding").shape)
            if held != shape:
                raise ValueError(_table_mismatch(held, shape, grid, self.grid is None))
        pe = self.param(
            "pos_embedding", nn.initializers.normal(stddev=0.02), shape, self.param_dtype
        )
        table = resample_posemb(
            jnp.asarray(pe),
            grid,
            old_grid=stored,
            num_prefix_tokens=rows - stored[0] * stored[1],
            method=self.method,
        )
        if not self.covers_prefix:
            table = jnp.pad(table, ((0, 0), (prefix, 0), (0, 0)))
        return x + table.astype(self.dtype)


def _table_mismatch(held, shape, grid, input_sized: bool) -> str:
    """The one-line error of a position table that does not fit the input's token grid."""
    what = f"a {grid[0]}x{grid[1]} token grid needs a position table of {shape[1]} rows"
    if input_sized:
        return (
            f"{what}, the model's holds {held[1]} (pos_embedding {held}): this model has no "
            "fixed posemb_grid and runs only at the image size it was loaded for; load it at "
            "this size (inference.load_model(..., resolution=...), --resolution) or set "
            "posemb_grid"
        )
    return f"{what}, the stored pos_embedding has shape {held}"


class SinCos2DPositionEmbedding(nn.Module):
    """The fixed `sincos2d_posemb` table (its `variant`) over the grid; prefix tokens get none
    (`sincos2d`)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32  # no parameters; the common constructor signature
    variant: str = "big_vision"

    @nn.compact
    def __call__(self, x: Array, grid: tuple[int, int]) -> Array:
        table = sincos2d_posemb(*grid, x.shape[-1], variant=self.variant)
        prefix = x.shape[1] - grid[0] * grid[1]
        table = jnp.pad(table, ((0, 0), (prefix, 0), (0, 0)))
        return x + table.astype(self.dtype)


class NoPositionEmbedding(nn.Module):
    """No position embedding (`none`)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __call__(self, x: Array, grid: tuple[int, int]) -> Array:
        del grid
        return x


POSITION_EMBEDDINGS: dict[str, Any] = {
    "learn": AddPositionEmbs,
    "sincos2d": SinCos2DPositionEmbedding,
    "none": NoPositionEmbedding,
}
