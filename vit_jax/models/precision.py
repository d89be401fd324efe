"""Mixed precision: which dtype each kind of computation runs in, decided in one place.

A model's `dtype` names its compute dtype. With float32 nothing changes: `lax.dot_general` and
`lax.conv_general_dilated` as they are. With a 16-bit compute dtype (bfloat16, float16):

- parameters and optimizer state stay in `param_dtype` (float32); they are cast on use;
- every matmul (projections, MLP, attention scores and weighted sum, heads, patch embedding) and
  convolution takes 16-bit operands and **accumulates in float32** (`preferred_element_type`),
  then rounds its result to the compute dtype unless the caller asks for float32;
- the backward matmuls have the same form: the cotangent is rounded to the compute dtype and
  both gradient products are 16-bit x 16-bit with float32 accumulation (on XLA:CPU they run in
  float32, see `backward_operand_dtype`);
- LayerNorm statistics, the softmax, logits and the loss are float32.

The float32 accumulation is what TPU MXUs and GPU tensor cores do natively; on CPUs it is also the
fast form (XLA:CPU computes a bf16 x bf16 -> bf16 dot by converting to float32 first, while a
bf16 x bf16 -> f32 dot goes to the library's bf16 kernel). Without the custom gradient below,
JAX's transpose rule would feed the float32 cotangent into mixed f32 x bf16 products.

Models build Flax layers with `dense_kwargs(dtype)` / `conv_kwargs(dtype)` and call
`dot_general(dtype)` for their own products (attention); no layer casts on its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "ACCUMULATION_DTYPE",
    "backward_operand_dtype",
    "conv_general_dilated",
    "conv_kwargs",
    "dense",
    "dense_kwargs",
    "describe",
    "dot_general",
    "is_mixed",
]

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], ...]]

ACCUMULATION_DTYPE = jnp.float32


def is_mixed(dtype: Any) -> bool:
    """True when `dtype` is a 16-bit float compute dtype (the mixed-precision policy applies)."""
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def describe(dtype: Any) -> str:
    """The policy in a few words, for benchmark reports and logs."""
    d = jnp.dtype(dtype).name
    if is_mixed(dtype):
        return f"mixed: {d} matmul operands, float32 accumulation, float32 params/softmax/loss"
    return f"{d} throughout"


def _normalise(dims: Any) -> DimensionNumbers:
    (lc, rc), (lb, rb) = dims
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def _transpose_lhs(g: jax.Array, lhs_ndim: int, rhs: jax.Array, dims: DimensionNumbers):
    """d(lhs) of `dot_general(lhs, rhs, dims)` given the output cotangent `g` (float32 sums)."""
    (lc, rc), (lb, rb) = dims
    lhs_kept = [i for i in range(lhs_ndim) if i not in lc and i not in lb]
    rhs_kept = [i for i in range(rhs.ndim) if i not in rc and i not in rb]
    nb = len(lb)
    # g is laid out (batch..., lhs kept..., rhs kept...): contract its rhs-kept axes with rhs.
    g_rhs_kept = tuple(range(nb + len(lhs_kept), g.ndim))
    out = lax.dot_general(
        g,
        rhs,
        ((g_rhs_kept, tuple(rhs_kept)), (tuple(range(nb)), rb)),
        preferred_element_type=ACCUMULATION_DTYPE,
    )
    # out is laid out (batch..., lhs kept..., rhs contracting axes in increasing order); map
    # every out axis back to the lhs axis it stands for.
    out_to_lhs = [*lb, *lhs_kept, *(lc[rc.index(a)] for a in sorted(rc))]
    return lax.transpose(out, tuple(int(i) for i in np.argsort(out_to_lhs)))


def _transpose_rhs(g: jax.Array, lhs: jax.Array, rhs_ndim: int, dims: DimensionNumbers):
    (lc, rc), (lb, rb) = dims
    nb = len(lb)
    n_lhs_kept = lhs.ndim - len(lc) - nb
    # Swap the roles: g as (batch..., rhs kept..., lhs kept...), then the lhs rule.
    perm = (*range(nb), *range(nb + n_lhs_kept, g.ndim), *range(nb, nb + n_lhs_kept))
    return _transpose_lhs(lax.transpose(g, perm), rhs_ndim, lhs, ((rc, lc), (rb, lb)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mixed_dot(lhs, rhs, dims: DimensionNumbers, compute: Any, out_dtype: Any) -> jax.Array:
    """`dot_general` of the operands rounded to `compute`, float32 sums, result in `out_dtype`.

    The gradients come back in the operands' own dtypes: a float32 parameter gets a float32
    gradient (summed in float32, never rounded to 16 bits on the way).
    """
    a, b = lhs.astype(compute), rhs.astype(compute)
    out = lax.dot_general(a, b, dims, preferred_element_type=ACCUMULATION_DTYPE)
    return out.astype(out_dtype)


def _mixed_dot_fwd(lhs, rhs, dims, compute, out_dtype):
    return _mixed_dot(lhs, rhs, dims, compute, out_dtype), (lhs, rhs)


def backward_operand_dtype(compute_dtype: Any) -> Any:
    """The operand dtype of the backward products.

    The compute dtype on accelerators. On XLA:CPU float32: its library kernels take a 16-bit dot
    only when both operands contract on their inner dimensions, which the gradient products
    rarely do; XLA itself converts most of the others to float32, and the rest (the weight
    gradients, contracting over the batch on both sides) reach XLA:CPU's own dot, which has no
    bf16 x bf16 -> f32 kernel and fails at run time.
    """
    return jnp.float32 if jax.default_backend() == "cpu" else compute_dtype


def _mixed_dot_bwd(dims, compute, out_dtype, residuals, g):
    del out_dtype
    lhs, rhs = residuals
    operand = backward_operand_dtype(compute)
    # Operands rounded as in the forward pass; the cotangent rounded to the compute dtype.
    g = g.astype(compute).astype(operand)
    a, b = lhs.astype(compute).astype(operand), rhs.astype(compute).astype(operand)
    d_lhs = _transpose_lhs(g, a.ndim, b, dims).astype(lhs.dtype)
    d_rhs = _transpose_rhs(g, a, b.ndim, dims).astype(rhs.dtype)
    return d_lhs, d_rhs


_mixed_dot.defvjp(_mixed_dot_fwd, _mixed_dot_bwd)


def dot_general(dtype: Any) -> Callable[..., jax.Array]:
    """A `lax.dot_general` replacement implementing the policy for compute dtype `dtype`.

    Same call signature as `lax.dot_general` (what `nn.Dense(dot_general=...)` expects). With a
    16-bit dtype the result is in that dtype unless `preferred_element_type` asks for another.
    """
    if not is_mixed(dtype):
        return lax.dot_general
    compute = jnp.dtype(dtype)

    def mixed_dot_general(
        lhs,
        rhs,
        dimension_numbers,
        precision=None,
        preferred_element_type=None,
        **kwargs: Any,
    ) -> jax.Array:
        del precision, kwargs  # one accumulation form by construction
        out_dtype = jnp.dtype(preferred_element_type or compute)
        dims = _normalise(dimension_numbers)
        return _mixed_dot(jnp.asarray(lhs), jnp.asarray(rhs), dims, compute, out_dtype)

    return mixed_dot_general


def conv_general_dilated(dtype: Any) -> Callable[..., jax.Array]:
    """A `lax.conv_general_dilated` replacement implementing the policy (for `nn.Conv`)."""
    if not is_mixed(dtype):
        return lax.conv_general_dilated
    compute = jnp.dtype(dtype)

    def mixed_conv(lhs, rhs, *args: Any, preferred_element_type=None, **kwargs: Any):
        out = lax.conv_general_dilated(
            jnp.asarray(lhs).astype(compute),
            jnp.asarray(rhs).astype(compute),
            *args,
            preferred_element_type=ACCUMULATION_DTYPE,
            **kwargs,
        )
        return out.astype(preferred_element_type or compute)

    return mixed_conv


def _promote_keeping_kernel(*args: Any, dtype: Any = None, inexact: bool = True) -> list[Any]:
    """Flax's `promote_dtype` for (inputs, kernel, bias): all but the kernel cast to `dtype`.

    The kernel stays in the parameter dtype; the policy's product rounds it on use, and its
    gradient comes back in float32 rather than through a 16-bit cast.
    """
    del inexact
    return [x if i == 1 or x is None else jnp.asarray(x).astype(dtype) for i, x in enumerate(args)]


def dense_kwargs(dtype: Any) -> dict[str, Any]:
    """What `nn.Dense` / `nn.DenseGeneral` take to follow the policy (with their `dtype=`)."""
    if not is_mixed(dtype):
        return {}
    return {"dot_general": dot_general(dtype), "promote_dtype": _promote_keeping_kernel}


def dense(dtype: Any, param_dtype: Any) -> Callable[..., nn.Dense]:
    """`nn.Dense` computing in `dtype` under the policy, parameters in `param_dtype`: the one
    dense-layer constructor the families bind (`dense(features, name=...)`)."""
    return functools.partial(nn.Dense, dtype=dtype, param_dtype=param_dtype, **dense_kwargs(dtype))


def conv_kwargs(dtype: Any) -> dict[str, Any]:
    """What `nn.Conv` takes to follow the policy (with its `dtype=`)."""
    if not is_mixed(dtype):
        return {}
    return {
        "conv_general_dilated": conv_general_dilated(dtype),
        "promote_dtype": _promote_keeping_kernel,
    }
