"""R+ViT hybrids reproduce the published model: an independent jax.numpy forward of the reference.

The forward below is written from the published architecture (reference vit_jax hybrids: a
ResNet-v2-style stem of weight-standardised convs, `kernel - mean` divided by `std + 1e-5`, and
GroupNorm with 32 groups and flax's epsilon 1e-6; then the ViT: patch embedding, class token,
learned position embeddings, pre-LN blocks with tanh GELU and LayerNorm epsilon 1e-6, the head on
the class token). It reads the published flat parameter dict and shares no code with
`vit_jax.models`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models, weights

HYBRID = dict(
    patches=dict(size=(1, 1)),
    hidden_size=32,
    transformer=dict(mlp_dim=64, num_heads=2, num_layers=2),
    resnet=dict(num_layers=(1, 1), width_factor=1),
)
NUM_CLASSES = 5
HI = jax.lax.Precision.HIGHEST


def _conv(x, kernel, stride, padding, ws_epsilon=None, old_formula=False):
    if ws_epsilon is not None:
        w = kernel - kernel.mean(axis=(0, 1, 2), keepdims=True)
        if old_formula:  # what vit_jax did before: sqrt(var + eps)
            w = w / jnp.sqrt(w.var(axis=(0, 1, 2), keepdims=True) + ws_epsilon)
        else:
            w = w / (w.std(axis=(0, 1, 2), keepdims=True) + ws_epsilon)
        kernel = w
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HI,
    )


def _group_norm(x, scale, bias, groups=32, eps=1e-6):
    n, h, w, c = x.shape
    g = x.reshape(n, h, w, groups, c // groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    g = (g - mean) / jnp.sqrt(var + eps)
    return g.reshape(n, h, w, c) * scale + bias


def _layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * scale + bias


def _max_pool_same(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")


def reference_forward(p, images, *, stages, old_formula=False):
    """The published R+ViT forward on the flat published parameter dict `p`."""
    ws = dict(ws_epsilon=1e-5, old_formula=old_formula)
    relu = jax.nn.relu
    x = _conv(images, p["conv_root/kernel"], 2, "SAME", **ws)
    x = relu(_group_norm(x, p["gn_root/scale"], p["gn_root/bias"]))
    x = _max_pool_same(x)
    for s, depth in enumerate(stages):
        for u in range(depth):
            q = f"block{s + 1}/unit{u + 1}/"
            stride = 2 if (s > 0 and u == 0) else 1
            gn = lambda y, name, q=q: _group_norm(y, p[q + name + "/scale"], p[q + name + "/bias"])
            residual = x
            if q + "conv_proj/kernel" in p:
                residual = gn(_conv(x, p[q + "conv_proj/kernel"], stride, "SAME", **ws), "gn_proj")
            y = relu(gn(_conv(x, p[q + "conv1/kernel"], 1, "SAME", **ws), "gn1"))
            y = relu(gn(_conv(y, p[q + "conv2/kernel"], stride, "SAME", **ws), "gn2"))
            y = gn(_conv(y, p[q + "conv3/kernel"], 1, "SAME", **ws), "gn3")
            x = relu(residual + y)
    ph = p["embedding/kernel"].shape[0]
    x = _conv(x, p["embedding/kernel"], ph, "VALID") + p["embedding/bias"]
    n, gh, gw, d = x.shape
    x = x.reshape(n, gh * gw, d)
    x = jnp.concatenate([jnp.broadcast_to(p["cls"], (n, 1, d)), x], axis=1)
    x = x + p["Transformer/posembed_input/pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in p:
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        y = _layer_norm(x, p[b + "LayerNorm_0/scale"], p[b + "LayerNorm_0/bias"])
        proj = lambda name, y=y, a=a: (
            jnp.einsum("bnd,dhk->bnhk", y, p[a + name + "/kernel"], precision=HI)
            + p[a + name + "/bias"]
        )
        q, k, v = proj("query"), proj("key"), proj("value")
        scores = jnp.einsum("bqhk,bthk->bhqt", q, k, precision=HI) / np.sqrt(q.shape[-1])
        y = jnp.einsum("bhqt,bthk->bqhk", jax.nn.softmax(scores, -1), v, precision=HI)
        y = jnp.einsum("bqhk,hkd->bqd", y, p[a + "out/kernel"], precision=HI) + p[a + "out/bias"]
        x = x + y
        m = b + "MlpBlock_3/"
        y = _layer_norm(x, p[b + "LayerNorm_2/scale"], p[b + "LayerNorm_2/bias"])
        y = jnp.dot(y, p[m + "Dense_0/kernel"], precision=HI) + p[m + "Dense_0/bias"]
        y = jax.nn.gelu(y, approximate=True)
        y = jnp.dot(y, p[m + "Dense_1/kernel"], precision=HI) + p[m + "Dense_1/bias"]
        x = x + y
        i += 1
    x = _layer_norm(x, p["Transformer/encoder_norm/scale"], p["Transformer/encoder_norm/bias"])
    return jnp.dot(x[:, 0], p["head/kernel"], precision=HI) + p["head/bias"]


def _published_weights(shapes, seed=0):
    """Random weights; conv kernels get per-output-channel means and stds from 0.003 to 1.

    The standardisation's epsilon only matters for kernels with a small std, and GroupNorm
    cancels a common scale, so the stds differ between the channels of each group.
    """
    flat = weights.flatten(shapes)
    rng = np.random.default_rng(seed)
    out = {}
    for key, s in sorted(flat.items()):
        if key.endswith("kernel") and len(s.shape) == 4 and key != "embedding/kernel":
            c = s.shape[-1]
            std = np.exp(rng.uniform(np.log(0.003), 0.0, size=c))
            mean = rng.normal(0.0, 0.5, size=c)
            value = mean + std * rng.standard_normal(s.shape)
        elif key.endswith("scale"):
            value = 1.0 + 0.2 * rng.standard_normal(s.shape)
        else:
            value = 0.2 * rng.standard_normal(s.shape)
        out[key] = value.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def setup():
    model = models.get_model(HYBRID, num_classes=NUM_CLASSES)
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    flat = _published_weights(models.init_shapes(model, 32))
    ours, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))(
        weights.unflatten(flat), images
    )
    return flat, images, np.asarray(ours)


def test_hybrid_logits_match_the_published_forward(setup):
    flat, images, ours = setup
    assert {"conv_root/kernel", "block2/unit1/conv_proj/kernel", "gn_root/scale"} <= set(flat)
    expected = np.asarray(
        jax.jit(lambda p, x: reference_forward(p, x, stages=(1, 1)))(flat, images)
    )
    assert ours.shape == (2, NUM_CLASSES)
    assert np.abs(expected).max() > 0.5  # non-trivial logits
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_the_old_weight_standardisation_would_fail(setup):
    """The sqrt(var + eps) formula gives logits more than 1e-5 away on the same weights."""
    flat, images, ours = setup
    old = jax.jit(lambda p, x: reference_forward(p, x, stages=(1, 1), old_formula=True))
    assert np.abs(np.asarray(old(flat, images)) - ours).max() > 1e-5
