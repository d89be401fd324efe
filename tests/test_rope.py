"""DINOv3's 2-D RoPE (`vit_jax.models.rope`): against the formula written out here in float64
numpy, against transformers' DINOv3ViT implementation, its properties (prefix tokens untouched,
norms kept, scores relative), the training-time coordinate augmentations, and its errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import rope


def _reference_sin_cos(grid_h, grid_w, head_dim, theta=100.0, normalize="separate"):
    """(sin, cos), each (grid_h * grid_w, head_dim) float64, from DINOv3's definition.

    Patch (i, j) sits at y = 2 (i + 0.5) / n_h - 1, x = 2 (j + 0.5) / n_w - 1; frequency k of
    head_dim // 4 has period theta ** (4 k / head_dim); channel c < head_dim / 2 has the angle
    2 pi y / period_c (c < head_dim / 4) or 2 pi x / period_(c - head_dim / 4), and channel
    c + head_dim / 2 the same angle as c.
    """
    n_h, n_w = {
        "separate": (grid_h, grid_w),
        "min": (min(grid_h, grid_w),) * 2,
        "max": (max(grid_h, grid_w),) * 2,
    }[normalize]
    quarter = head_dim // 4
    angles = np.zeros((grid_h * grid_w, head_dim))
    for i in range(grid_h):
        for j in range(grid_w):
            y = 2 * (i + 0.5) / n_h - 1
            x = 2 * (j + 0.5) / n_w - 1
            for c in range(head_dim):
                half_c = c % (head_dim // 2)
                coord, k = (y, half_c) if half_c < quarter else (x, half_c - quarter)
                angles[i * grid_w + j, c] = 2 * math.pi * coord / theta ** (4 * k / head_dim)
    return np.sin(angles), np.cos(angles)


def _reference_rotate(x, sin, cos, num_prefix_tokens):
    """x (B, T, H, D) float64 with its patch tokens rotated pairwise: channel c pairs with
    c + D / 2, (a, b) -> (a cos - b sin, b cos + a sin)."""
    out = np.array(x, dtype=np.float64)
    half = x.shape[-1] // 2
    patches = out[:, num_prefix_tokens:]
    s, c = sin[None, :, None, :], cos[None, :, None, :]
    a, b = patches[..., :half].copy(), patches[..., half:].copy()
    patches[..., :half] = a * c[..., :half] - b * s[..., :half]
    patches[..., half:] = b * c[..., half:] + a * s[..., half:]
    return out


def _ours(grid_h, grid_w, head_dim, theta=100.0, normalize="separate"):
    coords = rope.patch_coordinates(grid_h, grid_w, normalize=normalize)
    return rope.rope_sin_cos(coords, rope.rope_periods(head_dim, theta))


@pytest.mark.parametrize(
    "grid_h, grid_w, head_dim, normalize",
    [
        (2, 2, 16, "separate"),
        (3, 5, 16, "separate"),
        (5, 3, 64, "separate"),
        (7, 7, 64, "separate"),
        (3, 5, 16, "min"),
        (3, 5, 64, "max"),
    ],
)
def test_matches_formula_in_float64(grid_h, grid_w, head_dim, normalize):
    sin, cos = _ours(grid_h, grid_w, head_dim, normalize=normalize)
    ref_sin, ref_cos = _reference_sin_cos(grid_h, grid_w, head_dim, normalize=normalize)
    assert sin.shape == cos.shape == (grid_h * grid_w, head_dim)
    assert sin.dtype == cos.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(sin), ref_sin, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(cos), ref_cos, rtol=0, atol=2e-6)

    prefix = 5
    x = np.random.default_rng(0).normal(size=(2, prefix + grid_h * grid_w, 3, head_dim))
    got = rope.apply_rope(jnp.asarray(x, jnp.float32), sin, cos, num_prefix_tokens=prefix)
    want = _reference_rotate(x, ref_sin, ref_cos, prefix)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=5e-6)


def test_coordinates_are_cell_centres_in_minus_one_one():
    coords = np.asarray(rope.patch_coordinates(2, 4))
    np.testing.assert_allclose(coords[:4, 0], -0.5)  # first row: y = 2 * 0.5 / 2 - 1
    np.testing.assert_allclose(coords[:4, 1], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(coords[4:, 0], 0.5)
    np.testing.assert_allclose(rope.rope_periods(16), 100.0 ** (np.arange(4) / 4), rtol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("grid_h, grid_w, head_dim", [(3, 5, 16), (4, 4, 64), (6, 2, 64)])
def test_matches_transformers(grid_h, grid_w, head_dim):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import DINOv3ViTConfig
    from transformers.models.dinov3_vit import modeling_dinov3_vit as hf

    heads, patch, registers = 4, 4, 4
    config = DINOv3ViTConfig(
        hidden_size=heads * head_dim,
        num_attention_heads=heads,
        intermediate_size=4 * heads * head_dim,
        num_hidden_layers=1,
        patch_size=patch,
        image_size=patch * max(grid_h, grid_w),
        num_register_tokens=registers,
        rope_theta=100.0,
    )
    embedding = hf.DINOv3ViTRopePositionEmbedding(config).eval()
    pixels = torch.zeros(1, 3, grid_h * patch, grid_w * patch)
    with torch.no_grad():
        hf_cos, hf_sin = embedding(pixels)
    sin, cos = _ours(grid_h, grid_w, head_dim, theta=config.rope_theta)
    np.testing.assert_allclose(np.asarray(sin), hf_sin.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cos), hf_cos.numpy(), rtol=0, atol=1e-5)

    prefix = 1 + registers
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(2, 2, prefix + grid_h * grid_w, heads, head_dim)).astype(np.float32)
    heads_major = lambda t: torch.from_numpy(np.ascontiguousarray(t.transpose(0, 2, 1, 3)))
    hf_q, hf_k = hf.apply_rotary_pos_emb(heads_major(q), heads_major(k), hf_cos, hf_sin)
    for ours_in, theirs in ((q, hf_q), (k, hf_k)):
        got = rope.apply_rope(jnp.asarray(ours_in), sin, cos, num_prefix_tokens=prefix)
        np.testing.assert_allclose(
            np.asarray(got), theirs.numpy().transpose(0, 2, 1, 3), rtol=0, atol=1e-5
        )
        got_hm = rope.apply_rope(
            jnp.asarray(ours_in.transpose(0, 2, 1, 3)),
            sin,
            cos,
            num_prefix_tokens=prefix,
            heads_major=True,
        )
        np.testing.assert_allclose(np.asarray(got_hm), theirs.numpy(), rtol=0, atol=1e-5)


def _random_tokens(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def test_prefix_tokens_unchanged_and_norms_kept():
    sin, cos = _ours(3, 5, 32)
    x = _random_tokens((2, 5 + 15, 4, 32))
    y = rope.apply_rope(x, sin, cos, num_prefix_tokens=5)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y[:, :5]), np.asarray(x[:, :5]))
    assert not np.allclose(np.asarray(y[:, 5:]), np.asarray(x[:, 5:]))  # the patches do turn
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(y), axis=-1), np.linalg.norm(np.asarray(x), axis=-1), rtol=1e-5
    )


def test_low_precision_in_same_dtype_out():
    sin, cos = _ours(2, 3, 16)
    x = _random_tokens((1, 1 + 6, 2, 16), dtype=jnp.bfloat16)
    y = rope.apply_rope(x, sin, cos, num_prefix_tokens=1)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y[:, :1]), np.asarray(x[:, :1]))
    want = rope.apply_rope(x.astype(jnp.float32), sin, cos, num_prefix_tokens=1)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want.astype(jnp.bfloat16)))


def test_scores_depend_only_on_coordinate_differences():
    head_dim, heads = 32, 2
    periods = rope.rope_periods(head_dim)
    coords = rope.patch_coordinates(3, 5)
    q = _random_tokens((1, 15, heads, head_dim), seed=1)
    k = _random_tokens((1, 15, heads, head_dim), seed=2)

    def scores(c):
        sin, cos = rope.rope_sin_cos(c, periods)
        rq = rope.apply_rope(q, sin, cos, num_prefix_tokens=0)
        rk = rope.apply_rope(k, sin, cos, num_prefix_tokens=0)
        return np.asarray(jnp.einsum("bqhd,bkhd->bhqk", rq, rk))

    base = scores(coords)
    shifted = scores(coords + jnp.asarray([[0.37, -1.21]]))
    np.testing.assert_allclose(shifted, base, rtol=0, atol=1e-4)
    # ... and on them: a stretch changes the differences, and the scores with them.
    assert np.abs(scores(coords * 1.5) - base).max() > 0.1


def test_augment_identity_and_deterministic():
    coords = rope.patch_coordinates(3, 5)
    np.testing.assert_array_equal(np.asarray(rope.augment_coordinates(coords, None)), coords)
    key = jax.random.key(0)
    np.testing.assert_array_equal(np.asarray(rope.augment_coordinates(coords, key)), coords)
    kw = dict(shift=0.5, jitter=1.5, rescale=2.0)
    a = rope.augment_coordinates(coords, key, **kw)
    b = jax.jit(lambda c, r: rope.augment_coordinates(c, r, **kw))(coords, key)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    other = rope.augment_coordinates(coords, jax.random.key(1), **kw)
    assert not np.allclose(np.asarray(a), np.asarray(other))


def _affine_fit(coords, augmented):
    """Per-axis (scale, offset) with augmented = scale * coords + offset, exactly."""
    coords, augmented = np.asarray(coords, np.float64), np.asarray(augmented, np.float64)
    fits = []
    for axis in range(2):
        scale, offset = np.polyfit(coords[:, axis], augmented[:, axis], 1)
        np.testing.assert_allclose(scale * coords[:, axis] + offset, augmented[:, axis], atol=1e-5)
        fits.append((scale, offset))
    return np.asarray(fits)  # (2, [scale, offset])


@pytest.mark.parametrize("seed", range(8))
def test_augment_bounds(seed):
    coords = rope.patch_coordinates(4, 6)
    key = jax.random.key(seed)
    eps = 1e-5

    shifted = _affine_fit(coords, rope.augment_coordinates(coords, key, shift=0.3))
    np.testing.assert_allclose(shifted[:, 0], 1.0, atol=eps)  # a pure translation per axis
    assert np.all(np.abs(shifted[:, 1]) <= 0.3 + eps) and np.all(shifted[:, 1] != 0)

    jittered = _affine_fit(coords, rope.augment_coordinates(coords, key, jitter=1.5))
    np.testing.assert_allclose(jittered[:, 1], 0.0, atol=eps)  # a pure scaling per axis
    assert np.all((jittered[:, 0] >= 1 / 1.5 - eps) & (jittered[:, 0] <= 1.5 + eps))
    assert jittered[0, 0] != pytest.approx(jittered[1, 0])  # each axis its own factor

    rescaled = _affine_fit(coords, rope.augment_coordinates(coords, key, rescale=2.0))
    np.testing.assert_allclose(rescaled[:, 1], 0.0, atol=eps)
    assert rescaled[0, 0] == pytest.approx(rescaled[1, 0], rel=1e-6)  # one factor for both axes
    assert 1 / 2.0 - eps <= rescaled[0, 0] <= 2.0 + eps and rescaled[0, 0] != pytest.approx(1.0)


def test_augment_order_shift_then_scale():
    """(coords + shift) * jitter * rescale: the shift is scaled too, as in DINOv3."""
    coords = rope.patch_coordinates(2, 4)  # even sizes: no zero coordinate to divide by
    key = jax.random.key(3)
    shift_only = rope.augment_coordinates(coords, key, shift=0.4)
    jitter_only = rope.augment_coordinates(coords, key, jitter=2.0)
    rescale_only = rope.augment_coordinates(coords, key, rescale=3.0)
    both = rope.augment_coordinates(coords, key, shift=0.4, jitter=2.0, rescale=3.0)
    want = (shift_only - coords) + coords  # the shift drawn with this key
    want = want * (jitter_only / coords) * (rescale_only / coords)
    np.testing.assert_allclose(np.asarray(both), np.asarray(want), rtol=1e-5)


@pytest.mark.parametrize("head_dim", [6, 10, 0])
def test_head_dim_not_multiple_of_four(head_dim):
    with pytest.raises(ValueError, match=rf"head_dim.*multiple of 4.*head_dim={head_dim}"):
        rope.rope_periods(head_dim)
    sin = cos = jnp.zeros((4, head_dim))
    with pytest.raises(ValueError, match=rf"multiple of 4.*head_dim={head_dim}"):
        rope.apply_rope(jnp.zeros((1, 5, 2, head_dim)), sin, cos, num_prefix_tokens=1)


def test_rows_must_match_patch_tokens():
    sin, cos = _ours(2, 3, 16)  # 6 rows
    x = jnp.zeros((1, 1 + 4 + 7, 2, 16))  # 7 patch tokens
    with pytest.raises(ValueError, match=r"6 rows.*12 tokens - 5 prefix tokens = 7 patches"):
        rope.apply_rope(x, sin, cos, num_prefix_tokens=5)
    with pytest.raises(ValueError, match=r"6 rows.*12 tokens - 5 prefix tokens = 7 patches"):
        rope.apply_rope(jnp.swapaxes(x, 1, 2), sin, cos, num_prefix_tokens=5, heads_major=True)


def test_other_bad_inputs():
    sin, cos = _ours(2, 2, 16)
    with pytest.raises(ValueError, match=r"16 channels but x has head_dim=32"):
        rope.apply_rope(jnp.zeros((1, 4, 2, 32)), sin, cos, num_prefix_tokens=0)
    with pytest.raises(ValueError, match="normalize must be one of"):
        rope.patch_coordinates(2, 2, normalize="corners")
    with pytest.raises(ValueError, match="needs an rng"):
        rope.augment_coordinates(rope.patch_coordinates(2, 2), None, rescale=2.0)
    with pytest.raises(ValueError, match=r"jitter must be >= 1.0"):
        rope.augment_coordinates(rope.patch_coordinates(2, 2), jax.random.key(0), jitter=0.5)
