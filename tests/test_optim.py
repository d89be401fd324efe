"""The optimizer a config builds, checked against updates computed by hand."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vit_jax import optim


def _config(**overrides):
    c = ml_collections.ConfigDict(
        dict(
            optimizer="sgd",
            momentum=0.0,
            momentum_dtype="float32",
            base_lr=0.1,
            warmup_steps=0,
            total_steps=100,
            decay_type="constant",
            grad_norm_clip=0.0,
            weight_decay=0.0,
            freeze=(),
            lr_mults=(),
        )
    )
    c.update(overrides)
    return c


def _tree():
    """Every kind of leaf the decay rule distinguishes, with value 2 everywhere."""
    two = lambda *s: jnp.full(s, 2.0)
    return {
        "embedding": {"kernel": two(2, 2), "bias": two(2)},
        "cls": two(1, 1, 2),
        "dist": two(1, 1, 2),
        "Transformer": {
            "posembed_input": {"pos_embedding": two(1, 3, 2)},
            "encoder_norm": {"scale": two(2), "bias": two(2)},
        },
        "MAPHead_0": {"probe": two(1, 1, 2)},
        "head": {"kernel": two(2, 3), "bias": two(3)},
    }


def _steps(config, grads_per_step, params=None):
    params = params if params is not None else _tree()
    tx = optim.make_optimizer(config, params)
    state = tx.init(params)
    for grads in grads_per_step:
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, state


@pytest.mark.parametrize(
    "decay_type,expected",
    [
        # warmup 10 then 90 steps of decay: (step, lr) pairs
        ("cosine", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
        ("linear", {0: 0.0, 5: 0.5, 10: 1.0, 55: 0.5, 100: 0.0}),
        ("constant", {0: 0.0, 5: 0.5, 10: 1.0, 55: 1.0, 100: 1.0}),
    ],
)
def test_learning_rate_schedule_values(decay_type, expected):
    schedule = optim.learning_rate_schedule(
        _config(base_lr=1.0, warmup_steps=10, total_steps=100, decay_type=decay_type)
    )
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, abs=1e-6), (decay_type, step)
    if decay_type == "cosine":  # a quarter into the decay: (1 + cos(pi/4)) / 2
        assert float(schedule(10 + 90 // 4 + 0.5)) == pytest.approx(0.8536, abs=1e-3)


def test_warmup_not_shorter_than_training_is_an_error():
    with pytest.raises(ValueError, match="warmup_steps=100 must be smaller than total_steps=100"):
        optim.learning_rate_schedule(_config(warmup_steps=100, total_steps=100))
    with pytest.raises(ValueError, match="decay_type"):
        optim.learning_rate_schedule(_config(decay_type="exp"))
    with pytest.raises(ValueError, match="optimizer must be"):
        optim.make_optimizer(_config(optimizer="lamb"), _tree())


def test_sgd_momentum_with_clipping_matches_hand_computation():
    w = {"w": jnp.array([1.0, -2.0])}
    g1, g2 = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([0.3, 0.0])}  # |g1| = 5 > clip 1
    config = _config(momentum=0.9, grad_norm_clip=1.0, base_lr=0.1)
    params, _ = _steps(config, [g1, g2], w)
    v1 = np.array([0.6, 0.8])  # g1 clipped to norm 1
    v2 = 0.9 * v1 + np.array([0.3, 0.0])  # g2 under the clip: unchanged
    np.testing.assert_allclose(params["w"], np.array([1.0, -2.0]) - 0.1 * v1 - 0.1 * v2, rtol=1e-6)


def test_adamw_with_decoupled_weight_decay_matches_hand_computation():
    w = {"kernel": jnp.array([1.0, -2.0])}
    grads = [{"kernel": jnp.array([0.5, 1.0])}, {"kernel": jnp.array([-1.0, 2.0])}]
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    config = _config(optimizer="adamw", base_lr=lr, weight_decay=wd, adam_b1=b1, adam_b2=b2)
    params, _ = _steps(config, grads, w)
    p, m, v = np.array([1.0, -2.0]), np.zeros(2), np.zeros(2)
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g["kernel"])
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * (mhat / (np.sqrt(vhat) + eps) + wd * p)
    np.testing.assert_allclose(params["kernel"], p, rtol=1e-5)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_weight_decay_only_on_kernels(name):
    """Zero gradients: a decayed leaf shrinks by lr * wd * value, the others stay exactly."""
    params = _tree()
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, _ = _steps(_config(optimizer=name, weight_decay=0.5, base_lr=0.1), [zeros], params)
    flat = {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(out)}
    decayed = {"embedding/kernel", "head/kernel"}
    for key, value in flat.items():
        want = 2.0 * (1 - 0.1 * 0.5) if key in decayed else 2.0
        np.testing.assert_allclose(value, want, rtol=1e-6, err_msg=key)


def test_freeze_is_a_linear_probe_and_lr_mults_scale_updates():
    params = _tree()
    ones = jax.tree.map(jnp.ones_like, params)
    frozen, _ = _steps(_config(freeze=("^(?!head)",)), [ones], params)
    for path, value in jax.tree_util.tree_leaves_with_path(frozen):
        moved = not np.allclose(value, 2.0)
        assert moved == (path[0].key == "head"), path
    scaled, _ = _steps(_config(lr_mults=(("^head", 10.0),)), [ones], params)
    np.testing.assert_allclose(scaled["head"]["kernel"], 2.0 - 10 * 0.1)
    np.testing.assert_allclose(scaled["embedding"]["kernel"], 2.0 - 0.1)


def test_momentum_dtype_sets_the_first_moment_dtype():
    """SGD's trace and Adam's first moment follow `momentum_dtype`; Adam's second moment stays."""
    for dtype in ("float32", "bfloat16"):
        _, state = _steps(_config(momentum=0.9, momentum_dtype=dtype), [])
        (trace,) = [s for s in state if isinstance(s, optax.TraceState)]
        assert {x.dtype for x in jax.tree.leaves(trace.trace)} == {jnp.dtype(dtype)}
        _, state = _steps(_config(optimizer="adamw", momentum_dtype=dtype), [])
        (adam,) = [s for s in state if isinstance(s, optax.ScaleByAdamState)]
        assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(dtype)}
        assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype("float32")}
