"""The optimizer a config builds, checked against updates computed by hand."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tiny

from vit_jax import configs, optim, sharding


def _config(**overrides):
    """The trainer's config: plain SGD at a constant lr 0.1, no clipping, `overrides` on top."""
    c = configs.get_config()
    c.update(
        dict(
            momentum=0.0,
            base_lr=0.1,
            warmup_steps=0,
            total_steps=100,
            decay_type="constant",
            grad_norm_clip=0.0,
        )
    )
    if "model" in overrides:  # assigned: a model config is replaced, not merged field by field
        c.model = overrides.pop("model")
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
    with pytest.raises(ValueError) as e:
        optim.make_optimizer(_config(optimizer="lamb"), _tree())
    assert str(e.value) == "config.optimizer must be one of 'adamw', 'lion', 'sgd', got 'lamb'"


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


def _flat(tree):
    return {
        sharding.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _grads(seed, tree):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), tree)


def test_lion_from_config_matches_optax_lion_exactly():
    """Same chain as optax.lion (signed momentum, masked decoupled decay, schedule): same bits."""
    params = _tree()
    config = _config(
        optimizer="lion", lion_b1=0.8, lion_b2=0.95, base_lr=0.01, weight_decay=0.3,
        warmup_steps=2, decay_type="cosine", total_steps=10,
    )  # fmt: skip
    grads = [_grads(i, params) for i in range(4)]
    ours, _ = _steps(config, grads, params)
    mask = jax.tree.map(lambda m: m == 1.0, optim.decay_multipliers(params, config))
    tx = optax.lion(
        optim.learning_rate_schedule(config), b1=0.8, b2=0.95, weight_decay=0.3, mask=mask
    )
    theirs, state = params, tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, theirs)
        theirs = jax.tree.map(lambda p, u: p + u, theirs, updates)
    for key, value in _flat(ours).items():
        np.testing.assert_array_equal(value, _flat(theirs)[key], err_msg=key)


def test_lion_update_rule_by_hand_with_wd_mults():
    """p <- p - lr * (sign(b1 m + (1 - b1) g) + wd * mult * p); m <- b2 m + (1 - b2) g.

    `wd_mults` rules come first (here: the head kernel decays 3x, the position embedding, a
    no-decay name by default, decays 1x); other names keep the default mask.
    """
    params = _tree()
    lr, wd, b1, b2 = 0.01, 0.5, 0.9, 0.99
    config = _config(
        optimizer="lion", base_lr=lr, weight_decay=wd, lion_b1=b1, lion_b2=b2,
        wd_mults=(("^head/kernel$", 3.0), ("pos_embedding", 1.0)),
    )  # fmt: skip
    grads = [_grads(i, params) for i in range(3)]
    ours, _ = _steps(config, grads, params)
    mults = {"embedding/kernel": 1.0, "head/kernel": 3.0}
    mults["Transformer/posembed_input/pos_embedding"] = 1.0
    for key, p in _flat(params).items():
        p, m = p.astype(np.float64), np.zeros_like(p, np.float64)
        for g in grads:
            g = _flat(g)[key].astype(np.float64)
            p = p - lr * (np.sign(b1 * m + (1 - b1) * g) + wd * mults.get(key, 0.0) * p)
            m = b2 * m + (1 - b2) * g
        np.testing.assert_allclose(_flat(ours)[key], p, rtol=1e-6, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("name", ["sgd", "adamw", "lion"])
def test_wd_mults_scale_the_decay_and_the_no_decay_patterns_are_an_argument(name):
    """Zero gradients (Lion's sign(0) = 0): each leaf shrinks by lr * wd * its multiplier."""
    params = _tree()
    zeros = jax.tree.map(jnp.zeros_like, params)
    config = _config(
        optimizer=name, weight_decay=0.5, base_lr=0.1, wd_mults=(("^head/", 2.0), ("^cls$", 0.5))
    )
    out, _ = _steps(config, [zeros], params)
    # head/bias matches the first rule before the default no-decay names are looked at.
    want = {"embedding/kernel": 1.0, "head/kernel": 2.0, "head/bias": 2.0, "cls": 0.5}
    for key, value in _flat(out).items():
        np.testing.assert_allclose(value, 2.0 * (1 - 0.05 * want.get(key, 0.0)), err_msg=key)
    # The default no-decay list is an argument: here only biases are excluded.
    tx = optim.make_optimizer(
        _config(optimizer=name, weight_decay=0.5), params, no_decay=("bias$",)
    )
    updates, _ = tx.update(zeros, tx.init(params), params)
    for key, value in _flat(updates).items():
        decays = not key.endswith("bias")
        np.testing.assert_allclose(value, -0.1 * 0.5 * 2.0 * decays, atol=1e-7, err_msg=key)
    with pytest.raises(ValueError, match=r"config\.wd_mults holds \(regex, multiplier\) pairs"):
        optim.make_optimizer(_config(weight_decay=0.5, wd_mults=("head",)), params)


@pytest.mark.slow
def test_tiny_run_with_lion_learns(tmp_path):
    """The digits model trained with Lion from the config alone: the loss falls, it classifies."""
    from vit_jax import trainer

    config = tiny.tiny_config(
        **{**tiny.GOOD, "progress_every": 20}, optimizer="lion", base_lr=1e-3, weight_decay=0.1
    )
    results = trainer.train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in rows if "train_loss" in r]
    assert results["step"] == 200 and len(train) == 10
    # Each row averages 20 batches of 64; the first starts at ln 10 = 2.3 (zero head). Over
    # seeds 0-5 (and XLA builds capped at AVX2, AVX and SSE4.2, which change a run less than a
    # seed does) the last row is 0.28-0.40 of the first (sd 0.04) and the accuracy 0.81-0.89
    # (sd 0.03; chance 0.1): both floors sit > 2 sd beyond the worst seed, > 4 from the mean.
    assert train[-1] < 0.5 * train[0], train
    assert results["test_accuracy"] > 0.7, results


def _tiny_vit(scan: bool, depth: int = 3, **fields):
    """Parameter shapes of a tiny ViT (class token, `depth` blocks), per-layer or scanned."""
    from vit_jax import models

    config = models.get_config(
        dict(
            name="tiny", patches=dict(size=(4, 4)), hidden_size=8, classifier="token",
            transformer=dict(mlp_dim=16, num_heads=2, num_layers=depth), scan=scan, **fields,
        )
    )  # fmt: skip
    return config, models.init_shapes(models.get_model(config, num_classes=5), (8, 8))


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_multipliers_of_a_tiny_vit(scan):
    """Head side 1, block i of L=3 d^(3-i), embeddings d^4; scanned: one (3, 1, ...) array."""
    d = 0.5
    model, shapes = _tiny_vit(scan)
    mults = optim.layer_decay_multipliers(shapes, d, block_names=("encoderblock",))
    flat = {sharding.path_str(p): m for p, m in jax.tree_util.tree_leaves_with_path(mults)}
    embeddings = {
        "embedding/kernel", "embedding/bias", "cls", "Transformer/posembed_input/pos_embedding",
    }  # fmt: skip
    head_side = {"head/kernel", "head/bias"}
    head_side |= {"Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"}
    assert embeddings | head_side <= set(flat)
    for key, m in flat.items():
        if key in embeddings:
            assert m == d**4 and isinstance(m, float), key
        elif key in head_side:
            assert m == 1.0 and isinstance(m, float), key
        elif scan:
            assert key.startswith("Transformer/encoderblock/"), key
            assert isinstance(m, np.ndarray) and m.dtype == np.float32, key
            assert m.shape[0] == 3 and set(m.shape[1:]) <= {1}, (key, m.shape)
            np.testing.assert_array_equal(m.reshape(3), np.float32([d**3, d**2, d]), key)
        else:
            i = int(key.split("/")[1].removeprefix("encoderblock_"))
            assert m == d ** (3 - i) and isinstance(m, float), key
    # The defaults find the block name from the registry; 1.0 leaves every multiplier at 1.
    assert jax.tree.map(lambda m: np.asarray(m).tolist(), mults) == jax.tree.map(
        lambda m: np.asarray(m).tolist(), optim.layer_decay_multipliers(shapes, d)
    )
    ones = optim.layer_decay_multipliers(shapes, 1.0)
    assert all(np.all(np.asarray(m) == 1.0) for m in jax.tree.leaves(ones))


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_scales_sgd_updates_and_combines_with_lr_mults(scan):
    """Plain SGD, unit gradients: a block-0 update is d^L times the head's, the cls token's
    d^(L+1) times its lr_mults factor; scanned blocks per layer along the leading axis."""
    from vit_jax import models

    d, depth = 0.8, 3
    model, shapes = _tiny_vit(scan, depth)
    params = models.get_model(model, num_classes=5).init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False
    )["params"]
    config = _config(model=model, layer_decay=d, lr_mults=(("^cls$", 3.0),))
    tx = optim.make_optimizer(config, shapes)
    ones = jax.tree.map(jnp.ones_like, params)
    updates = _flat(tx.update(ones, tx.init(params), params)[0])
    lr = 0.1
    np.testing.assert_allclose(updates["head/kernel"], -lr, rtol=1e-6)
    np.testing.assert_allclose(updates["cls"], -lr * 3.0 * d ** (depth + 1), rtol=1e-6)
    key = "MlpBlock_3/Dense_0/kernel"
    if scan:
        block = updates[f"Transformer/encoderblock/{key}"]
        for i in range(depth):
            np.testing.assert_allclose(block[i], -lr * d ** (depth - i), rtol=1e-6)
    else:
        np.testing.assert_allclose(
            updates[f"Transformer/encoderblock_0/{key}"], -lr * d**depth, rtol=1e-6
        )
        np.testing.assert_allclose(updates[f"Transformer/encoderblock_2/{key}"], -lr * d, rtol=1e-6)
    ratio = updates[f"Transformer/encoderblock{'' if scan else '_0'}/{key}"]
    ratio = (ratio[0] if scan else ratio) / updates["head/kernel"][0, 0]
    np.testing.assert_allclose(ratio, d**depth, rtol=1e-6)


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, float("nan")])
def test_layer_decay_out_of_range_is_an_error_naming_the_key(value):
    with pytest.raises(ValueError, match=r"config\.layer_decay must be a number in \(0, 1\]"):
        optim.make_optimizer(_config(layer_decay=value), _tree())


def test_layer_decay_of_a_mixer_uses_its_block_name():
    from vit_jax import models

    config = models.get_config(
        dict(
            name="mix", model_type="Mixer", patches=dict(size=(4, 4)), hidden_dim=8,
            num_blocks=2, tokens_mlp_dim=4, channels_mlp_dim=8,
        )
    )  # fmt: skip
    shapes = models.init_shapes(models.get_model(config, num_classes=3), (8, 8))
    mults = _flat(optim.layer_decay_multipliers(shapes, 0.5, block_names=("MixerBlock",)))
    assert mults["stem/kernel"] == 0.5**3 and mults["head/kernel"] == 1.0
    assert mults["pre_head_layer_norm/scale"] == 1.0
    assert {k.split("/")[0]: float(v) for k, v in mults.items() if "MixerBlock" in k} == {
        "MixerBlock_0": 0.25, "MixerBlock_1": 0.5,
    }  # fmt: skip
