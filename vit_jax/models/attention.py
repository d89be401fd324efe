"""Multi-head attention with the published parameter layout, and its attention cores.

`query`, `key`, `value` kernels are (D, heads, head_dim), `out` is (heads, head_dim, D): the
layout of `flax.linen.MultiHeadDotProductAttention` and of the published checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import precision
from vit_jax.models.rope import apply_rope

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "MultiHeadAttention",
    "ProjectionParams",
    "explicit_attention",
]

Array = jax.Array
Dtype = Any
F32 = jnp.float32

ATTENTION_IMPLEMENTATIONS = (None, "explicit", "xla", "cudnn")


class ProjectionParams(nn.Module):
    """The `kernel` (D, *features) and `bias` (*features) of a DenseGeneral, without applying it.

    Initialised like `nn.DenseGeneral` (the kernel_init sees the flattened (D, prod(features))
    shape), so a fused projection has the same parameters, names and init as three Dense layers.
    `use_bias=False`: no `bias` parameter; zeros (a constant) stand in for it.
    """

    features: tuple[int, ...]
    kernel_init: Any
    param_dtype: Dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int) -> tuple[Array, Array]:
        flat = (in_features, int(np.prod(self.features)))
        init = lambda key, shape, dtype: self.kernel_init(key, flat, dtype).reshape(shape)
        kernel = self.param("kernel", init, (in_features, *self.features), self.param_dtype)
        if not self.use_bias:
            return kernel, jnp.zeros(self.features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, self.features, self.param_dtype)
        return kernel, bias


def explicit_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    dot: Callable[..., Array],
    dtype: Dtype,
    dropout: Callable[[Array], Array],
) -> tuple[Array, Array]:
    """Heads-major (B, H, N, hd) q, k, v -> ((B, N, H, hd) output, (B, H, Nq, Nk) weights).

    The batched matmuls see (B, H) as leading batch dimensions, which XLA:CPU runs without layout
    copies. Scores and softmax in float32; the 1/sqrt(head_dim) scale on the (smaller) queries;
    `dropout` acts on the probabilities, the returned weights are the undropped softmax.
    """
    q = q * np.asarray(1 / np.sqrt(q.shape[-1]), q.dtype)
    scores = dot(q, k, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=F32)
    weights = jax.nn.softmax(scores, axis=-1)
    y = dot(dropout(weights).astype(dtype), v, (((3,), (2,)), ((0, 1), (0, 1))))  # (B, H, N, hd)
    return jnp.swapaxes(y, 1, 2), weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention (`query`, `key`, `value`, `out`) in the compute `dtype`.

    The core is `implementation`: `'explicit'` (`explicit_attention`: heads-major matmuls under
    the precision policy, softmax in float32; the weights can be returned and dropped out),
    `'xla'` / `'cudnn'` (`jax.nn.dot_product_attention`, e.g. cuDNN flash attention on GPU), or
    None: `jax.nn.dot_product_attention` on GPU, explicit elsewhere. Attention weights or
    attention dropout always take the explicit core. `qk_norm` (a norm constructor) normalises
    the queries and keys over head_dim before the scores (`query_norm`, `key_norm`; timm's
    `qk_norm=True`). `query_bias` / `key_bias` / `value_bias` / `out_bias` False leave that
    projection without a `bias` parameter (DINOv3 has no key bias; its 7B, like AIMv2, no q/k/v
    biases).

    `rope`, a (sin, cos) pair of (num_patches, head_dim) arrays (`vit_jax.models.rope`), rotates
    the queries and keys of the last num_patches tokens after the q/k norms; the tokens before
    them (class token, registers) are left as they are (DINOv3).
    """

    num_heads: int
    dropout_rate: float = 0.0
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()
    fuse_qkv: bool = True  # self-attention: q, k, v in one matmul
    qk_norm: Any = None  # a norm constructor: `query_norm` / `key_norm` over head_dim (timm)
    query_bias: bool = True
    key_bias: bool = True
    value_bias: bool = True
    out_bias: bool = True

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        *,
        deterministic: bool,
        return_weights: bool = False,
        rope: tuple[Array, Array] | None = None,
    ) -> tuple[Array, Array | None]:
        if self.implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                f"got {self.implementation!r}"
            )
        width = inputs_q.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"hidden size {width} is not divisible by num_heads={self.num_heads}")
        with jax.named_scope("qkv"):  # names the ops for profiles
            q, k, v = self._project_qkv(inputs_q, inputs_kv)
            if self.qk_norm is not None:  # heads-major (B, H, N, hd): normalised over hd
                q = self.qk_norm(name="query_norm")(q)
                k = self.qk_norm(name="key_norm")(k)
            if rope is not None:  # patch tokens only: the prefix tokens come first
                q, k = (_rotate(t, *rope) for t in (q, k))
        use_dropout = self.dropout_rate > 0.0 and not deterministic
        library = self.implementation in ("xla", "cudnn") or (
            self.implementation is None and jax.default_backend() == "gpu"
        )
        weights = None
        with jax.named_scope("core"):  # names the ops for profiles
            if return_weights or use_dropout or not library:
                dropout = nn.Dropout(rate=self.dropout_rate)
                y, weights = explicit_attention(
                    q,
                    k,
                    v,
                    dot=precision.dot_general(self.dtype),
                    dtype=self.dtype,
                    dropout=lambda w: dropout(w, deterministic=deterministic),
                )
            else:
                bnhd = lambda t: jnp.swapaxes(t, 1, 2)
                y = jax.nn.dot_product_attention(
                    bnhd(q), bnhd(k), bnhd(v), implementation=self.implementation
                )
        out = nn.DenseGeneral(
            features=width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **precision.dense_kwargs(self.dtype),
            kernel_init=self.kernel_init,
            use_bias=self.out_bias,
            name="out",
        )(y)
        return out, weights if return_weights else None

    @nn.nowrap
    def _project_qkv(self, inputs_q: Array, inputs_kv: Array) -> tuple[Array, Array, Array]:
        """Heads-major (B, H, N, hd) queries, keys and values (one fused matmul for self-attention).

        Called from `__call__` (a compact method): the `ProjectionParams` it creates belong to
        this module.
        """
        width = inputs_q.shape[-1]
        head_dim = width // self.num_heads
        dot = precision.dot_general(self.dtype)
        cast = lambda t: t.astype(self.dtype)
        biases = {"query": self.query_bias, "key": self.key_bias, "value": self.value_bias}
        params = lambda name: ProjectionParams(
            (self.num_heads, head_dim),
            self.kernel_init,
            self.param_dtype,
            use_bias=biases[name],
            name=name,
        )(width)

        def project(x: Array, kernel: Array, bias: Array) -> Array:
            """(B, N, D) x (D, ..., H, hd) -> heads-major (..., B, H, N, hd)."""
            y = dot(cast(x), kernel, (((2,), (0,)), ((), ())))  # (B, N, ..., H, hd)
            y = y + cast(bias)
            return jnp.moveaxis(y, (0, 1), (-4, -2))

        if inputs_q is inputs_kv and self.fuse_qkv:
            # Self-attention: one matmul against the three kernels side by side (same params).
            kernels, biases = zip(*(params(n) for n in ("query", "key", "value")), strict=True)
            qkv = project(inputs_q, jnp.stack(kernels, axis=1), jnp.stack(biases))
            # Indexed, not `tuple(qkv)`: jax >= 0.12 traces iteration as an `unstack`
            # primitive that the ONNX converter does not know; indexing is slice + squeeze.
            return qkv[0], qkv[1], qkv[2]
        return (
            project(inputs_q, *params("query")),
            project(inputs_kv, *params("key")),
            project(inputs_kv, *params("value")),
        )


def _rotate(x: Array, sin: Array, cos: Array) -> Array:
    """Heads-major (B, H, N, hd) `x` with RoPE on its last sin.shape[0] tokens."""
    prefix = x.shape[2] - sin.shape[0]
    return apply_rope(x, sin, cos, num_prefix_tokens=prefix, heads_major=True)
