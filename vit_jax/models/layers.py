"""Building blocks shared by the families: the MLP block, LayerScale, stochastic depth, and the
helpers that wrap a block constructor in `nn.remat` / `nn.scan`.

Blocks take their layers as constructors (`dense`, `norm`, `act`, ...), built once at the top of
a model (as flax's `examples/imagenet/models.py` does), so options such as the compute dtype or
the LayerNorm epsilon are bound in one place instead of being threaded through every level.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "REMAT_POLICIES",
    "LayerScale",
    "MLP_TYPES",
    "MlpBlock",
    "ModuleDef",
    "SwiGLUMlpBlock",
    "drop_path",
    "gelu",
    "lift",
    "remat",
]

Array = jax.Array
Dtype = Any
ModuleDef = Any  # a Module class or a functools.partial of one: `ctor(name=...)` builds it

REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def gelu(approximate: bool = True) -> Callable[[Array], Array]:
    """GELU, the tanh approximation by default (the published checkpoints'); exact otherwise."""
    return functools.partial(nn.gelu, approximate=approximate)


def lift(ctor: ModuleDef, transform: Callable[..., Any], **kwargs: Any) -> ModuleDef:
    """Apply a Flax lifted transform (`nn.remat`, `nn.scan`) to a module constructor.

    Lifted transforms take a Module class; a `functools.partial` keeps its bound fields on the
    transformed class, so blocks stay constructors all the way down.
    """
    if isinstance(ctor, functools.partial):
        return functools.partial(transform(ctor.func, **kwargs), *ctor.args, **ctor.keywords)
    return transform(ctor, **kwargs)


def remat(ctor: ModuleDef, policy: str, *, scan: bool, **kwargs: Any) -> ModuleDef:
    """`ctor` rematerialised under the named checkpoint policy (`REMAT_POLICIES`)."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy {policy!r} unknown; one of {sorted(REMAT_POLICIES)}")
    return lift(ctor, nn.remat, prevent_cse=not scan, policy=REMAT_POLICIES[policy], **kwargs)


class MlpBlock(nn.Module):
    """Transformer MLP: Dense -> act -> dropout -> Dense -> dropout.

    `dense` builds the two projections (`Dense_0`, `Dense_1`; the block adds the published
    xavier-uniform / normal(1e-6) initialisers), `act` is the nonlinearity.
    """

    mlp_dim: int
    dropout_rate: float = 0.0
    dense: ModuleDef = nn.Dense
    act: Callable[[Array], Array] = gelu()

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        dense = _mlp_dense(self.dense)
        out_dim = x.shape[-1]
        x = dense(self.mlp_dim, name="Dense_0")(x)
        x = self.act(x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = dense(out_dim, name="Dense_1")(x)
        return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


def _mlp_dense(dense: ModuleDef) -> ModuleDef:
    """`dense` with the published MLP initialisers: xavier-uniform kernels, normal(1e-6) biases."""
    return functools.partial(
        dense,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6),
    )


class SwiGLUMlpBlock(nn.Module):
    """SwiGLU MLP (DINOv2 giant): Dense -> silu(x1) * x2 -> dropout -> Dense -> dropout.

    `Dense_0` (D, 2 * mlp_dim) is packed [x1 | x2], as Hugging Face's `Dinov2SwiGLUFFN`
    (`weights_in`, then `chunk(2)`) and timm's `SwiGLUPacked`; `Dense_1` is (mlp_dim, D), so
    `mlp_dim` is the hidden width after the gate. Same initialisers as `MlpBlock`.
    """

    mlp_dim: int
    dropout_rate: float = 0.0
    dense: ModuleDef = nn.Dense

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        dense = _mlp_dense(self.dense)
        out_dim = x.shape[-1]
        x1, x2 = jnp.split(dense(2 * self.mlp_dim, name="Dense_0")(x), 2, axis=-1)
        x = nn.silu(x1) * x2
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = dense(out_dim, name="Dense_1")(x)
        return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


# `transformer.mlp_type` -> the block's MLP (GELU blocks also take `act`).
MLP_TYPES: dict[str, ModuleDef] = {"gelu": MlpBlock, "swiglu": SwiGLUMlpBlock}


class LayerScale(nn.Module):
    """A learned per-channel scale (`scale`, shape (D,)) initialised to `init_value` (CaiT)."""

    init_value: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.constant(self.init_value)
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        return x * scale.astype(x.dtype)


def drop_path(x: Array, rate: Array | float, rng: Array) -> Array:
    """Stochastic depth: zero whole examples' residual branch with probability `rate`."""
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, jnp.zeros_like(x))
