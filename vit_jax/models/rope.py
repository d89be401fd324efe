"""2-D rotary position embedding (RoPE) as DINOv3 applies it to queries and keys.

Axial RoPE with no learned weights: each patch has a (y, x) coordinate, the centre of its grid
cell mapped to [-1, 1]; head_dim is split into two halves that are rotated against each other
(`rotate_half`), and the angles of a half are [y / periods, x / periods] * 2 pi, so a quarter of
head_dim sees each axis. Periods are `rope_theta ** (4 k / head_dim)`, k < head_dim // 4, with
`rope_theta` = 100 by default (DINOv3's `base`, transformers' `DINOv3ViTConfig.rope_theta`).

Only patch tokens are rotated: the prefix tokens (class token, then registers) that precede
them carry no position and pass through unchanged. In training DINOv3 perturbs the coordinates
once per forward pass (`augment_coordinates`: shift, per-axis jitter, joint rescale), so the
model does not tie itself to one resolution.

Sine and cosine come back as (sin, cos) and `apply_rope` takes them in that order, as DINOv3's
`rope_apply(x, sin, cos)` does; transformers' `DINOv3ViTRopePositionEmbedding` returns (cos, sin).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "NORMALIZE_MODES",
    "ROPE_THETA",
    "apply_rope",
    "augment_coordinates",
    "patch_coordinates",
    "rope_angles",
    "rope_periods",
    "rope_sin_cos",
]

Array = jax.Array
F32 = jnp.float32

ROPE_THETA = 100.0  # DINOv3's `base`, transformers' `DINOv3ViTConfig.rope_theta` default
# How a grid maps to [-1, 1]: `separate` divides each axis by its own length (DINOv3's default,
# the only mode transformers implements); `min` / `max` divide both by the shorter / longer one,
# so on a non-square grid one axis spans less (`max`) or more (`min`) than [-1, 1].
NORMALIZE_MODES = ("separate", "min", "max")


def _check_head_dim(head_dim: int) -> None:
    """A ValueError unless head_dim splits into the four quarters RoPE needs (2 axes x 2 halves)."""
    if head_dim <= 0 or head_dim % 4:
        raise ValueError(
            f"2-D RoPE needs head_dim to be a positive multiple of 4 (two axes, each rotating "
            f"pairs of channels), got head_dim={head_dim}"
        )


def rope_periods(head_dim: int, rope_theta: float = ROPE_THETA) -> Array:
    """The (head_dim // 4,) periods rope_theta ** (4 k / head_dim), shortest (1) first, float32.

    In coordinate units: a patch coordinate moving by one period turns its channel pair once.
    """
    _check_head_dim(head_dim)
    exponents = jnp.arange(head_dim // 4, dtype=F32) * (4.0 / head_dim)
    return jnp.asarray(rope_theta, F32) ** exponents


def patch_coordinates(grid_h: int, grid_w: int, *, normalize: str = "separate") -> Array:
    """(grid_h * grid_w, 2) float32 (y, x) centres of the patches, row-major over the grid.

    Cell i of an axis of length n sits at 2 (i + 0.5) / n - 1 under `separate` (so the centres
    span (-1, 1) symmetrically whatever the grid size), with n = min / max(grid_h, grid_w) for
    both axes under `min` / `max` (see `NORMALIZE_MODES`).
    """
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    if grid_h <= 0 or grid_w <= 0:
        raise ValueError(f"the patch grid must be non-empty, got {grid_h}x{grid_w}")
    size_h, size_w = {
        "separate": (grid_h, grid_w),
        "min": (min(grid_h, grid_w),) * 2,
        "max": (max(grid_h, grid_w),) * 2,
    }[normalize]
    y = (jnp.arange(grid_h, dtype=F32) + 0.5) / size_h
    x = (jnp.arange(grid_w, dtype=F32) + 0.5) / size_w
    yy, xx = jnp.meshgrid(y, x, indexing="ij")
    coords = jnp.stack([yy, xx], axis=-1).reshape(grid_h * grid_w, 2)
    return 2.0 * coords - 1.0


def rope_angles(coords: Array, periods: Array) -> Array:
    """(num_patches, head_dim) angles 2 pi coord / period, in DINOv3's channel layout.

    Per half of head_dim: the y angles over all periods, then the x angles; the half is then
    repeated, so channel d and channel d + head_dim / 2 share an angle (the pair `apply_rope`
    rotates together).
    """
    coords = jnp.asarray(coords, F32)
    periods = jnp.asarray(periods, F32)
    if coords.ndim != 2 or coords.shape[-1] != 2:
        raise ValueError(f"coords must be (num_patches, 2) (y, x) pairs, got {coords.shape}")
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]  # (P, 2, head_dim / 4)
    half = angles.reshape(coords.shape[0], 2 * periods.shape[0])  # [y..., x...]
    return jnp.concatenate([half, half], axis=-1)


def rope_sin_cos(coords: Array, periods: Array) -> tuple[Array, Array]:
    """(sin, cos), each (num_patches, head_dim) float32, of `rope_angles(coords, periods)`."""
    angles = rope_angles(coords, periods)
    return jnp.sin(angles), jnp.cos(angles)


def augment_coordinates(
    coords: Array,
    rng: Array | None,
    *,
    shift: float | None = None,
    jitter: float | None = None,
    rescale: float | None = None,
) -> Array:
    """DINOv3's training-time coordinate augmentations; `coords` unchanged when all are None.

    Applied in this order, each drawn once for the whole call (every patch, every image of the
    batch), from its own key of `rng` (the same rng gives the same coordinates):

    - `shift` (`pos_embed_shift`): add a per-axis offset uniform in [-shift, shift];
    - `jitter` (`pos_embed_jitter`): multiply each axis by its own log-uniform factor in
      [1 / jitter, jitter];
    - `rescale` (`pos_embed_rescale`, 2.0 in DINOv3's config): multiply both axes by one
      log-uniform factor in [1 / rescale, rescale].

    So the model sees translated, stretched and zoomed grids and does not tie itself to one
    resolution. DINOv3 applies these only in training; evaluation uses the plain grid.
    """
    coords = jnp.asarray(coords, F32)
    if shift is None and jitter is None and rescale is None:
        return coords
    if rng is None:
        raise ValueError("augment_coordinates needs an rng when shift, jitter or rescale is set")
    for name, value, least in (
        ("shift", shift, 0.0),
        ("jitter", jitter, 1.0),
        ("rescale", rescale, 1.0),
    ):
        if value is not None and not value >= least:
            raise ValueError(f"{name} must be >= {least} (or None), got {value}")
    shift_key, jitter_key, rescale_key = jax.random.split(rng, 3)
    if shift is not None:
        coords = coords + jax.random.uniform(shift_key, (1, 2), F32, -shift, shift)
    if jitter is not None:
        log_range = math.log(jitter)
        coords = coords * jnp.exp(
            jax.random.uniform(jitter_key, (1, 2), F32, -log_range, log_range)
        )
    if rescale is not None:
        log_range = math.log(rescale)
        coords = coords * jnp.exp(jax.random.uniform(rescale_key, (1,), F32, -log_range, log_range))
    return coords


def _rotate_half(x: Array) -> Array:
    """[x1, x2] -> [-x2, x1] over the last axis (halves x1, x2): DINOv3's `rope_rotate_half`."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(
    x: Array,
    sin: Array,
    cos: Array,
    *,
    num_prefix_tokens: int,
    heads_major: bool = False,
) -> Array:
    """x rotated by RoPE on its last num_patches tokens; the prefix tokens left as they are.

    `x` is (batch, tokens, heads, head_dim), or (batch, heads, tokens, head_dim) with
    `heads_major` (the q and k `MultiHeadAttention` projects); `sin` and `cos` are
    (num_patches, head_dim) from `rope_sin_cos`, where num_patches = tokens - num_prefix_tokens
    (class token plus registers, which precede the patches). The rotation x cos +
    rotate_half(x) sin runs in float32; the result has x's dtype.
    """
    token_axis = 2 if heads_major else 1
    if x.ndim != 4:
        raise ValueError(
            f"x must be (batch, tokens, heads, head_dim) or heads-major, got {x.shape}"
        )
    head_dim = x.shape[-1]
    _check_head_dim(head_dim)
    if sin.shape != cos.shape or sin.ndim != 2:
        raise ValueError(
            f"sin and cos must both be (num_patches, head_dim), got {sin.shape} and {cos.shape}"
        )
    if sin.shape[-1] != head_dim:
        raise ValueError(f"sin/cos have {sin.shape[-1]} channels but x has head_dim={head_dim}")
    num_tokens = x.shape[token_axis]
    num_patches = num_tokens - num_prefix_tokens
    if num_prefix_tokens < 0 or sin.shape[0] != num_patches:
        raise ValueError(
            f"sin/cos have {sin.shape[0]} rows but x has {num_tokens} tokens - "
            f"{num_prefix_tokens} prefix tokens = {num_patches} patches"
        )
    prefix, patches = jnp.split(x, [num_prefix_tokens], axis=token_axis)
    sin = jnp.asarray(sin, F32)
    cos = jnp.asarray(cos, F32)
    if not heads_major:  # (patches, head_dim) -> (patches, 1, head_dim), against (B, P, H, hd)
        sin, cos = sin[:, None, :], cos[:, None, :]
    patches = patches.astype(F32)
    rotated = patches * cos + _rotate_half(patches) * sin
    return jnp.concatenate([prefix, rotated.astype(x.dtype)], axis=token_axis)
