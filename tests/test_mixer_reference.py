"""MLP-Mixer reproduces the published model: an independent float64 numpy forward of the reference.

The forward below is written from the published architecture (Tolstikhin et al. 2021, the
reference vit_jax `models_mixer.py`): a patch stem (a conv with stride = kernel = patch size, here
a matmul on the patches), blocks of pre-LN token mixing (an MLP across the tokens, on the
transposed sequence) and pre-LN channel mixing, each with a residual; LayerNorm epsilon 1e-6
(flax's default), GELU in its tanh form (flax's `nn.gelu` default, what the published Mixer
calls), a final `pre_head_layer_norm`, a mean over the tokens and the head. It reads the published
flat parameter dict (`stem/kernel`, `MixerBlock_{i}/token_mixing/Dense_0/kernel`, ...) and shares
no code with `vit_jax.models`.
"""

import math

import jax
import numpy as np
import pytest

from vit_jax import models, weights

# 32x32 images in 4x8 patches: an 8x4 grid of 32 tokens. Tokens == channels, so a block that
# mixes along the wrong axis still runs (and must be caught by its numbers, not its shapes); the
# grid is not square, so flattening it in the wrong order changes the token-mixing inputs.
MIXER = dict(
    model_type="Mixer",
    patches=dict(size=(4, 8)),
    hidden_dim=32,
    num_blocks=2,
    tokens_mlp_dim=24,
    channels_mlp_dim=48,
)
IMAGE = 32
NUM_CLASSES = 3


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _gelu_exact(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _mlp(x, p, prefix, gelu):
    h = gelu(x @ p[prefix + "Dense_0/kernel"] + p[prefix + "Dense_0/bias"])
    return h @ p[prefix + "Dense_1/kernel"] + p[prefix + "Dense_1/bias"]


def reference_forward(p, images, *, eps=1e-6, gelu=_gelu_tanh, pool="mean"):
    """(logits, pre_logits, number of blocks) of the published Mixer on the flat dict `p`.

    `eps`, `gelu` and `pool` default to the published choices; the other values exist to show
    that the comparison would notice a model that made another choice.
    """
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    x = np.asarray(images, np.float64)
    ph, pw, c, d = p["stem/kernel"].shape
    n, h, w, _ = x.shape
    patches = x.reshape(n, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    x = patches.reshape(n, (h // ph) * (w // pw), ph * pw * c)
    x = x @ p["stem/kernel"].reshape(ph * pw * c, d) + p["stem/bias"]
    blocks = 0
    while f"MixerBlock_{blocks}/LayerNorm_0/scale" in p:
        b = f"MixerBlock_{blocks}/"
        y = _layer_norm(x, p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"], eps)
        x = x + _mlp(y.transpose(0, 2, 1), p, b + "token_mixing/", gelu).transpose(0, 2, 1)
        y = _layer_norm(x, p[b + "LayerNorm_1/scale"], p[b + "LayerNorm_1/bias"], eps)
        x = x + _mlp(y, p, b + "channel_mixing/", gelu)
        blocks += 1
    x = _layer_norm(x, p["pre_head_layer_norm/scale"], p["pre_head_layer_norm/bias"], eps)
    pre_logits = x.mean(axis=1) if pool == "mean" else x[:, 0]
    return pre_logits @ p["head/kernel"] + p["head/bias"], pre_logits, blocks


def _published_weights(shapes, seed=0):
    """Random values in every leaf (the head starts at zero), scaled to keep activations O(1).

    Kernels ~ N(0, 1/fan_in) (fan_in: every axis but the last), LayerNorm scales ~ 1 + N(0, 0.2),
    biases ~ N(0, 0.2).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for key, s in sorted(weights.flatten(shapes).items()):
        if key.endswith("/kernel"):
            value = rng.standard_normal(s.shape) / math.sqrt(math.prod(s.shape[:-1]))
        elif key.endswith("/scale"):
            value = 1.0 + 0.2 * rng.standard_normal(s.shape)
        else:
            value = 0.2 * rng.standard_normal(s.shape)
        out[key] = value.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def setup():
    model = models.get_model(MIXER, num_classes=NUM_CLASSES)
    rng = np.random.default_rng(1)
    images = rng.uniform(-1.0, 1.0, (2, IMAGE, IMAGE, 3)).astype(np.float32)
    flat = _published_weights(models.init_shapes(model, IMAGE))
    with jax.default_matmul_precision("highest"):  # float32 matmuls on every backend
        logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(
            weights.unflatten(flat), images
        )
    return flat, images, np.asarray(logits), np.asarray(out["pre_logits"])


def test_mixer_uses_the_published_parameter_names(setup):
    flat = setup[0]
    block = {
        f"{mix}/Dense_{i}/{leaf}"
        for mix in ("token_mixing", "channel_mixing")
        for i in (0, 1)
        for leaf in ("kernel", "bias")
    } | {f"LayerNorm_{i}/{leaf}" for i in (0, 1) for leaf in ("scale", "bias")}
    expected = {
        "stem/kernel",
        "stem/bias",
        *(f"MixerBlock_{i}/{name}" for i in range(2) for name in block),
        "pre_head_layer_norm/scale",
        "pre_head_layer_norm/bias",
        "head/kernel",
        "head/bias",
    }
    assert set(flat) == expected
    assert flat["stem/kernel"].shape == (4, 8, 3, 32)
    assert flat["MixerBlock_0/token_mixing/Dense_0/kernel"].shape == (32, 24)  # tokens -> T
    assert flat["MixerBlock_0/channel_mixing/Dense_0/kernel"].shape == (32, 48)  # channels -> C


def test_mixer_logits_and_pre_logits_match_the_published_forward(setup):
    flat, images, logits, pre_logits = setup
    expected, expected_pre, blocks = reference_forward(flat, images)
    assert blocks == 2
    assert logits.shape == (2, NUM_CLASSES) and pre_logits.shape == (2, 32)
    assert np.abs(expected).max() > 0.5  # non-trivial logits ...
    assert np.abs(expected[0] - expected[1]).max() > 0.1  # ... that depend on the image
    np.testing.assert_allclose(pre_logits, expected_pre, atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "other",
    [
        dict(gelu=_gelu_exact),
        dict(eps=1e-3),
        dict(pool="first"),
    ],
    ids=["exact-gelu", "layernorm-eps-1e-3", "first-token"],
)
def test_other_choices_would_fail(setup, other):
    """Each choice the published model did not make gives logits more than 1e-5 away."""
    flat, images, logits, _ = setup
    assert np.abs(reference_forward(flat, images, **other)[0] - logits).max() > 1e-5
