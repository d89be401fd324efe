"""The mixed-precision policy: the form of every product, its gradients, what stays float32."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models, optim, sharding, trainer
from vit_jax.benchmark import train_config
from vit_jax.models import precision

TINY = dict(
    patches=dict(size=(4, 4)),
    hidden_size=32,
    transformer=dict(mlp_dim=64, num_heads=4, num_layers=2),
)
BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)

# (lhs shape, rhs shape, dimension numbers): plain, attention scores and weighted sum,
# multi-axis contraction (the `out` projection), multi-axis result (fused q/k/v), mixed batch.
DOTS = [
    ((3, 5, 7), (7, 4), (((2,), (0,)), ((), ()))),
    ((2, 3, 5, 4), (2, 3, 6, 4), (((3,), (3,)), ((0, 1), (0, 1)))),
    ((2, 3, 5, 6), (2, 3, 6, 4), (((3,), (2,)), ((0, 1), (0, 1)))),
    ((2, 5, 3, 4), (3, 4, 7), (((2, 3), (0, 1)), ((), ()))),
    ((4, 6, 8), (8, 3, 2, 5), (((2,), (0,)), ((), ()))),
    ((2, 3, 4, 5), (5, 2, 6, 4), (((3, 2), (0, 3)), ((0,), (1,)))),
]


def _ints(shape, seed):
    """Small integers: exact in bfloat16, and their float32 sums exact too."""
    return jnp.asarray(np.random.default_rng(seed).integers(-3, 4, shape), jnp.float32)


@pytest.mark.parametrize("lhs_shape,rhs_shape,dims", DOTS)
def test_mixed_dot_value_and_gradients_are_exact_on_representable_inputs(
    lhs_shape, rhs_shape, dims
):
    a, b = _ints(lhs_shape, 0), _ints(rhs_shape, 1)
    ref_out = jax.lax.dot_general(a, b, dims)
    c = _ints(ref_out.shape, 2)  # a cotangent exact in bfloat16 as well
    mixed = precision.dot_general(jnp.bfloat16)
    out = mixed(a, b, dims, preferred_element_type=jnp.float32)
    np.testing.assert_array_equal(out, ref_out)
    assert mixed(a, b, dims).dtype == BF16  # the compute dtype unless asked otherwise
    loss = lambda dot: lambda a, b: jnp.sum(dot(a, b, dims) * c)
    grads = jax.jit(jax.grad(loss(lambda *x: mixed(*x, preferred_element_type=F32)), (0, 1)))
    ref = jax.grad(loss(jax.lax.dot_general), (0, 1))(a, b)
    for got, want in zip(grads(a, b), ref, strict=True):
        assert got.dtype == F32  # float32 operands (parameters) get float32 gradients
        np.testing.assert_array_equal(got, want)


def test_float32_policy_is_plain_lax():
    assert precision.dot_general(jnp.float32) is jax.lax.dot_general
    assert precision.dense_kwargs("float32") == {} and precision.conv_kwargs("float32") == {}
    assert not precision.is_mixed("float32") and precision.is_mixed("bfloat16")
    assert "float32 accumulation" in precision.describe("bfloat16")  # what the benchmark reports


def _dots(jaxpr) -> list:
    """Every dot_general / conv equation of a jaxpr, sub-jaxprs included."""
    names = ("dot_general", "conv_general_dilated")
    found = [eqn for eqn in jaxpr.eqns if eqn.primitive.name in names]
    for sub in jax.extend.core.subjaxprs(jaxpr):
        found.extend(_dots(sub))
    return found


def test_bf16_dense_lowers_to_bf16_operands_with_float32_accumulation():
    layer = nn.Dense(8, dtype=jnp.bfloat16, **precision.dense_kwargs(jnp.bfloat16))
    x = jnp.ones((2, 4))
    params = layer.init(jax.random.key(0), x)
    text = jax.jit(layer.apply).lower(params, x).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 1
    assert "(tensor<2x4xbf16>, tensor<4x8xbf16>) -> tensor<2x8xf32>" in dots[0]


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("vit", dict(classifier="token", representation_size=16)),
        ("map", dict(classifier="map")),
        ("mixer", None),
        ("hybrid", None),
    ],
)
def test_every_product_of_a_bf16_train_step_accumulates_in_float32(name, overrides):
    """Forward products: bf16 x bf16 -> f32. Backward: never a 16-bit result, never mixed."""
    if name == "mixer":
        model = models.get_model(
            dict(
                model_type="Mixer",
                patches=dict(size=(4, 4)),
                hidden_dim=16,
                num_blocks=2,
                tokens_mlp_dim=8,
                channels_mlp_dim=32,
            ),
            num_classes=5,
            dtype="bfloat16",
        )
    elif name == "hybrid":
        model = models.get_model(
            dict(TINY, resnet=dict(num_layers=(1,), width_factor=0.5), patches=dict(size=(1, 1))),
            num_classes=5,
            dtype="bfloat16",
        )
    else:
        model = models.get_model(TINY, num_classes=5, dtype="bfloat16", **overrides)
    x = jnp.ones((2, 16, 16, 3))
    params = model.init(jax.random.key(0), x, train=False)["params"]
    forward = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, train=False)[0])(params)
    fwd = _dots(forward.jaxpr)
    assert fwd
    for eqn in fwd:
        assert [v.aval.dtype for v in eqn.invars] == [BF16, BF16], eqn
        assert eqn.params["preferred_element_type"] == F32, eqn
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=False)[0] ** 2)
    for eqn in _dots(jax.make_jaxpr(jax.grad(loss))(params).jaxpr):
        a, b = (v.aval.dtype for v in eqn.invars)
        assert a == b, eqn  # no mixed f32 x bf16 product
        assert eqn.outvars[0].aval.dtype == F32, eqn  # no 16-bit accumulation


def test_bf16_logits_close_to_float32():
    x = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1, maxval=1)
    model32 = models.get_model(TINY, num_classes=5)
    model16 = models.get_model(TINY, num_classes=5, dtype="bfloat16")
    params = model32.init(jax.random.key(0), x, train=False)["params"]
    params = jax.tree.map(lambda p: p + 0.2 * jax.random.normal(jax.random.key(1), p.shape), params)
    a = jax.jit(lambda p: model32.apply({"params": p}, x, train=False)[0])(params)
    b = jax.jit(lambda p: model16.apply({"params": p}, x, train=False)[0])(params)
    assert b.dtype == F32
    # bfloat16 keeps 8 bits of mantissa: a few parts in a thousand per product, ~1% at the end.
    err = float(jnp.abs(a - b).max() / jnp.abs(a).max())
    assert 0 < err < 0.03, err


def test_bf16_train_step_runs_and_keeps_params_and_optimizer_state_float32():
    """Compiled and run: XLA:CPU rejects some bf16 x bf16 -> f32 dots only at run time."""
    model = models.get_model(TINY, num_classes=5, dtype="bfloat16")
    mesh = sharding.make_mesh()
    config = train_config(optimizer="adamw", weight_decay=0.01, base_lr=1e-2, warmup_steps=1)
    size = (16, 16)
    tx = optim.make_optimizer(config, trainer.abstract_params(model, size))
    state, shardings = trainer.create_state(model, tx, mesh, size, seed=0)
    step = trainer.TrainStep(model, tx, config, mesh, shardings)
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.uniform(-1, 1, (8, *size, 3)), jnp.float32),
        "label": jax.nn.one_hot(rng.integers(0, 5, 8), 5),
    }
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["train_loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    for leaf in jax.tree.leaves((state.params, state.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == F32
