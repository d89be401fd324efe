"""Bicubic resampling of a learned position table, exactly as torch's `interpolate` does it.

Hugging Face transformers resamples a DINOv2 / SigLIP / ViT position table on the fly with
`torch.nn.functional.interpolate(mode='bicubic', align_corners=False)`, and
`Dinov2WithRegisters` with `antialias=True` as well. Both are separable, so the resampling is two
matrices per grid change: built here in numpy at trace time (static shapes), applied as two
matmuls. `interpolation_matrix` reproduces torch's two kernels:

- plain bicubic: Keys' cubic with a = -0.75, source coordinate (i + 0.5) * in / out - 0.5, taps
  clamped to the border (edge replication);
- antialiased (`_upsample_bicubic2d_aa`, PIL's algorithm): the cubic with a = -0.5, widened by
  the scale when downsampling, the taps cut at the border and the weights renormalised.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["interpolation_matrix", "resample_posemb_bicubic"]


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter `a` (support [-2, 2])."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """(out_size, in_size) float64 matrix M with `M @ v` = torch's 1-D bicubic resize of `v`.

    `align_corners=False` and the scale taken from the sizes (torch's `size=` argument, as
    transformers passes it).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic resize needs positive sizes, got {in_size} -> {out_size}")
    scale = in_size / out_size
    m = np.zeros((out_size, in_size))
    if not antialias:
        for i in range(out_size):
            src = (i + 0.5) * scale - 0.5
            base = int(np.floor(src))
            taps = base + np.arange(-1, 3)
            w = _cubic(src - taps, -0.75)
            np.add.at(m[i], np.clip(taps, 0, in_size - 1), w)
        return m
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = _cubic((taps - center + 0.5) * invscale, -0.5)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


def resample_posemb_bicubic(
    posemb: jax.Array | np.ndarray,
    new_grid: tuple[int, int],
    *,
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 0,
    antialias: bool = False,
) -> jax.Array:
    """(1, prefix + gh*gw, D) -> (1, prefix + nh*nw, D): the grid rows resampled bicubically.

    The prefix rows (class / distillation token) are kept as they are. Computed in float32 (as
    transformers does) and returned in the input's dtype; equal grids return the input.
    """
    gh, gw = (int(g) for g in old_grid)
    nh, nw = (int(g) for g in new_grid)
    tokens = posemb.shape[1] - num_prefix_tokens
    if tokens != gh * gw:
        raise ValueError(
            f"position table has {tokens} grid rows after {num_prefix_tokens} prefix rows, "
            f"not grid {(gh, gw)}"
        )
    if (gh, gw) == (nh, nw):
        return jnp.asarray(posemb)
    dtype = posemb.dtype
    prefix = posemb[:, :num_prefix_tokens]
    grid = jnp.asarray(posemb[0, num_prefix_tokens:], jnp.float32).reshape(gh, gw, -1)
    rows = jnp.asarray(interpolation_matrix(gh, nh, antialias), jnp.float32)
    cols = jnp.asarray(interpolation_matrix(gw, nw, antialias), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    grid = jnp.einsum("ph,hwd->pwd", rows, grid, precision=hi)
    grid = jnp.einsum("qw,pwd->pqd", cols, grid, precision=hi)
    grid = grid.reshape(1, nh * nw, -1).astype(dtype)
    return jnp.concatenate([jnp.asarray(prefix, dtype), grid], axis=1)
