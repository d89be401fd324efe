"""SigLIP's sigmoid loss (and CLIP's softmax loss) vs float64 numpy, and its chunked multi-device
form vs one device (issue 26)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import contrastive

HERE = Path(__file__).parent
# (batch, dim, t, b): SigLIP's init (t = exp(log 10), b = -10), then others.
CASES = [(1, 3, 10.0, -10.0), (8, 16, 10.0, -10.0), (32, 4, 30.0, -5.0), (17, 64, 1.0, 0.0)]


def _embeddings(n, d, seed):
    """Two float64 arrays of unit rows, exact in float32 (the reference sees the inputs the loss
    sees); the texts lean towards their images, as after training."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d))
    txt = rng.normal(size=(n, d)) + 0.8 * img / np.linalg.norm(img, axis=1, keepdims=True)
    return tuple(
        (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32).astype(np.float64)
        for x in (img, txt)
    )


def _reference(img, txt, t, b):
    """The paper's definition in float64: sum_ij log(1 + exp(-z_ij * (t x_i.y_j + b))) / N."""
    n = len(img)
    z = 2 * np.eye(n) - 1
    logits = t * img @ txt.T + b
    return np.sum(np.logaddexp(0.0, -z * logits)) / n


def _reference_grads(img, txt, t, b):
    """The analytic gradient of `_reference` w.r.t. (img, txt, t, b), in float64."""
    n = len(img)
    z = 2 * np.eye(n) - 1
    sims = img @ txt.T
    # d/dl log(1 + exp(-z l)) = -z / (1 + exp(z l)).
    d_logits = -z / (1 + np.exp(z * (t * sims + b))) / n
    return t * d_logits @ txt, t * d_logits.T @ img, np.sum(d_logits * sims), np.sum(d_logits)


def _close(actual, expected, rtol):
    """Largest difference within `rtol` of the largest magnitude (elementwise: near-zeros)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(actual - expected)) <= rtol * scale, (actual, expected)


@pytest.mark.parametrize("n,d,t,b", CASES)
def test_sigmoid_loss_matches_float64_definition(n, d, t, b):
    img, txt = _embeddings(n, d, seed=n)
    loss = contrastive.sigmoid_loss(jnp.float32(img), jnp.float32(txt), t, b)
    assert loss.dtype == jnp.float32 and loss.shape == ()
    _close(loss, _reference(img, txt, t, b), 1e-6)


def test_sigmoid_loss_counts_every_pair_once_per_batch_row():
    # Hand-checkable: orthogonal embeddings, so each logit is t * [i == j] + b.
    img = txt = jnp.eye(3, dtype=jnp.float32)
    t, b = 2.0, -1.0
    expected = (3 * np.logaddexp(0, -(t + b)) + 6 * np.logaddexp(0, b)) / 3
    np.testing.assert_allclose(contrastive.sigmoid_loss(img, txt, t, b), expected, rtol=1e-6)


@pytest.mark.parametrize("n,d,t,b", CASES)
def test_sigmoid_loss_gradients_match_float64(n, d, t, b):
    img, txt = _embeddings(n, d, seed=n + 1)
    expected = _reference_grads(img, txt, t, b)
    # The analytic gradient itself vs central differences of the float64 definition.
    eps = 1e-6
    for arg, grad in enumerate(expected):
        args = [img, txt, t, b]
        flat = np.array(args[arg], np.float64).ravel()
        numeric = np.zeros_like(flat)
        for k in range(flat.size):
            for sign in (1, -1):
                moved = flat.copy()
                moved[k] += sign * eps
                args[arg] = moved.reshape(np.shape(args[arg])) if moved.size > 1 else moved[0]
                numeric[k] += sign * _reference(*args) / (2 * eps)
        _close(numeric.reshape(np.shape(grad)), grad, 1e-6)
    grads = jax.grad(contrastive.sigmoid_loss, argnums=(0, 1, 2, 3))(
        jnp.float32(img), jnp.float32(txt), jnp.float32(t), jnp.float32(b)
    )
    for actual, want in zip(grads, expected, strict=True):
        _close(actual, want, 1e-5)


def test_softmax_loss_matches_float64_definition():
    img, txt = _embeddings(12, 8, seed=0)
    t = 100.0 / 7
    logits = t * img @ txt.T

    def xent(lg):  # -mean_i log softmax(lg)_ii over rows
        return -np.mean(np.diag(lg) - np.log(np.sum(np.exp(lg), axis=1)))

    expected = (xent(logits) + xent(logits.T)) / 2
    loss = contrastive.softmax_loss(jnp.float32(img), jnp.float32(txt), t)
    _close(loss, expected, 1e-6)


@pytest.mark.parametrize("fn", [contrastive.sigmoid_loss, contrastive.softmax_loss])
def test_mismatched_shapes_are_rejected(fn):
    extra = (-10.0,) if fn is contrastive.sigmoid_loss else ()
    cases = [
        ((8, 4), (6, 4)),  # batch sizes differ
        ((8, 4), (8, 5)),  # embedding dims differ
        ((8,), (8,)),  # not [batch, dim]
    ]
    for img_shape, txt_shape in cases:
        with pytest.raises(ValueError) as e:
            fn(jnp.ones(img_shape), jnp.ones(txt_shape), 10.0, *extra)
        assert str(img_shape) in str(e.value) and str(txt_shape) in str(e.value)
    with pytest.raises(ValueError, match=r"\(8, 4\).*\(6, 4\)"):
        contrastive.chunked_sigmoid_loss(
            jnp.ones((8, 4)), jnp.ones((6, 4)), 10.0, -10.0, axis_name="data"
        )


def test_sharded_loss_on_one_device_matches():
    img, txt = _embeddings(8, 5, seed=3)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    loss = jax.jit(lambda *a: contrastive.sharded_sigmoid_loss(mesh, *a))(
        jnp.float32(img), jnp.float32(txt), 10.0, -10.0
    )
    _close(loss, _reference(img, txt, 10.0, -10.0), 1e-6)


@pytest.fixture(scope="module")
def devices_run(tmp_path_factory):
    """tests/contrastive_devices.py's results, on 8 simulated CPU devices in a subprocess."""
    out = tmp_path_factory.mktemp("contrastive") / "out.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run(
        [sys.executable, str(HERE / "contrastive_devices.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(np.load(out))


MESHES = {"4": 4, "8": 8, "data4_fsdp2": 8}  # tests/contrastive_devices.py's: name -> devices


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("case", ["init", "trained"])
def test_chunked_loss_and_gradients_match_one_device(devices_run, mesh, case):
    for name in ("loss", "img", "txt", "t", "b"):
        one = devices_run[f"{mesh}_{case}_one_{name}"]
        ring = devices_run[f"{mesh}_{case}_ring_{name}"]
        assert np.all(np.isfinite(one)) and np.max(np.abs(one)) > 0, name
        _close(ring, one, 1e-6)


@pytest.mark.parametrize("mesh", MESHES)
def test_chunked_loss_holds_only_local_blocks(devices_run, mesh):
    # Global batch 24, dim 7: each device holds [24 / devices, 7] chunks and one square block of
    # logits; nothing of the global batch (no [24, 24] logits, no gathered [24, 7] texts).
    n = 24 // MESHES[mesh]
    shapes = set(devices_run[f"{mesh}_hlo_shapes"].tolist())
    assert f"f32[{n},{n}]" in shapes and f"f32[{n},7]" in shapes, shapes
    assert not any("24" in s for s in shapes), shapes


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_loss_rejects_indivisible_batch(devices_run, mesh):
    message = str(devices_run[f"{mesh}_error"])
    n_dev = MESHES[mesh]
    assert f"batch size {n_dev + 2}" in message and f"size {n_dev}" in message, message
