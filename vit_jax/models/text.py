"""SigLIP's text tower: a pre-LN transformer over token ids, pooled at the last token.

The model of big_vision's `proj/image_text/text_transformer` (pool 'last') and transformers'
`SiglipTextModel`: token embedding + a learned position table of `max_len` rows, pre-LN
encoder blocks (bidirectional self-attention: no causal mask), a final LayerNorm, the LAST
token's state (which may be padding: SigLIP pads to `max_len` and was trained without an
attention mask) through the `head` projection. Returns `(pooled [B, P], tokens [B, L, D])`.

Parameter names follow our ViT's, so one key table serves both towers' blocks:
`token_embedding/embedding` (V, D), `Transformer/posembed_input/pos_embedding` (1, max_len, D),
`Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3}`, `Transformer/encoder_norm`, `head` (D, P).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import layers, precision
from vit_jax.models.attention import ProjectionParams
from vit_jax.models.layers import MlpBlock, ModuleDef

__all__ = ["TextAttention", "TextBlock", "TextConfig", "TextTransformer"]

Array = jax.Array
Dtype = Any
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The text tower's shape (defaults: SigLIP B/16's text tower, transformers' defaults)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    mlp_dim: int = 3072  # transformers `intermediate_size`
    num_layers: int = 12
    num_heads: int = 12
    max_len: int = 64  # transformers `max_position_embeddings`: rows of the position table
    layernorm_epsilon: float = 1e-6
    projection_size: int | None = None  # the `head`'s width; None: hidden_size
    gelu_approximate: bool = True  # 'gelu_pytorch_tanh'

    @property
    def head_width(self) -> int:
        return int(self.projection_size or self.hidden_size)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"text hidden_size {self.hidden_size} is not divisible by num_heads "
                f"{self.num_heads}"
            )


class TextAttention(nn.Module):
    """Bidirectional multi-head self-attention with an optional key padding mask.

    Our attention layout (`query`, `key`, `value` kernels (D, H, hd), `out` (H, hd, D)); scores
    and softmax in float32, queries scaled by 1/sqrt(hd). `mask` (B, L) true for real tokens:
    padded keys get no weight (transformers' `attention_mask`); None attends to every token.
    """

    num_heads: int
    dtype: Dtype = F32
    param_dtype: Dtype = F32
    kernel_init: Any = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        width = x.shape[-1]
        head_dim = width // self.num_heads
        dot = precision.dot_general(self.dtype)

        def project(name: str) -> Array:  # (B, L, D) -> heads-major (B, H, L, hd)
            kernel, bias = ProjectionParams(
                (self.num_heads, head_dim), self.kernel_init, self.param_dtype, name=name
            )(width)
            y = dot(x.astype(self.dtype), kernel, (((2,), (0,)), ((), ())))
            y = y + bias.astype(self.dtype)
            return jnp.transpose(y, (0, 2, 1, 3))

        q, k, v = project("query"), project("key"), project("value")
        q = q * np.asarray(1 / np.sqrt(head_dim), q.dtype)
        scores = dot(q, k, (((3,), (3,)), ((0, 1), (0, 1))), preferred_element_type=F32)
        if mask is not None:
            keep = jnp.asarray(mask, bool)[:, None, None, :]
            scores = jnp.where(keep, scores, jnp.finfo(F32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        y = dot(weights, v, (((3,), (2,)), ((0, 1), (0, 1))))  # (B, H, L, hd)
        return nn.DenseGeneral(
            features=width,
            axis=(-2, -1),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=self.kernel_init,
            **precision.dense_kwargs(self.dtype),
            name="out",
        )(jnp.swapaxes(y, 1, 2))


class TextBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x), mask), then x + MLP(LN(x)) (our ViT block's names)."""

    attention: ModuleDef
    mlp: ModuleDef
    norm: ModuleDef

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, *, deterministic: bool) -> Array:
        y = self.norm(name="LayerNorm_0")(x)
        x = x + self.attention(name="MultiHeadDotProductAttention_1")(y, mask)
        y = self.norm(name="LayerNorm_2")(x)
        return x + self.mlp(name="MlpBlock_3")(y, deterministic=deterministic)


class TextTransformer(nn.Module):
    """SigLIP's text tower: `(token ids [B, L], mask=None) -> (pooled [B, P], tokens [B, L, D])`.

    L may be shorter than `config.max_len` (the first L rows of the position table are used).
    `mask` (B, L), true for real tokens, is optional: SigLIP checkpoints were trained padded to
    `max_len` without one, and transformers runs them without one unless given `attention_mask`.
    The pooled output is the last position's state, padding or not, as SigLIP's is.
    """

    config: TextConfig
    dtype: Dtype = F32
    param_dtype: Dtype = F32

    @nn.compact
    def __call__(
        self, tokens: Array, mask: Array | None = None, *, train: bool = False
    ) -> tuple[Array, Array]:
        c = self.config
        length = tokens.shape[-1]
        if tokens.ndim != 2:
            raise ValueError(f"text tokens must be [batch, length], got shape {tokens.shape}")
        if length > c.max_len:
            raise ValueError(f"text length {length} exceeds the position table's {c.max_len}")
        if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"text mask shape {mask.shape} != tokens shape {tokens.shape}")
        dense = precision.dense(self.dtype, self.param_dtype)
        norm = functools.partial(
            nn.LayerNorm,
            epsilon=c.layernorm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        block = functools.partial(
            TextBlock,
            attention=functools.partial(
                TextAttention, c.num_heads, dtype=self.dtype, param_dtype=self.param_dtype
            ),
            mlp=functools.partial(
                MlpBlock, c.mlp_dim, dense=dense, act=layers.gelu(c.gelu_approximate)
            ),
            norm=norm,
        )
        embed = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=nn.initializers.normal(stddev=1 / np.sqrt(c.hidden_size)),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="token_embedding",
        )
        x = embed(tokens)
        x = _Encoder(c, block, norm, self.param_dtype, name="Transformer")(x, mask, train=train)
        head = dense(c.head_width, name="head")
        return head(x[:, -1]).astype(F32), x.astype(F32)


class _Encoder(nn.Module):
    """Position table, `num_layers` blocks (`encoderblock_{i}`), final norm (`encoder_norm`)."""

    config: TextConfig
    block: ModuleDef
    norm: ModuleDef
    param_dtype: Dtype = F32

    @nn.compact
    def __call__(self, x: Array, mask: Array | None, *, train: bool) -> Array:
        c = self.config
        table = _PositionTable(c.max_len, c.hidden_size, self.param_dtype, name="posembed_input")()
        x = x + table[:, : x.shape[1]].astype(x.dtype)
        for i in range(c.num_layers):
            x = self.block(name=f"encoderblock_{i}")(x, mask, deterministic=not train)
        return self.norm(name="encoder_norm")(x)


class _PositionTable(nn.Module):
    """The learned (1, max_len, D) position table `pos_embedding` (normal(1/sqrt(D)) init)."""

    max_len: int
    width: int
    param_dtype: Dtype = F32

    @nn.compact
    def __call__(self) -> Array:
        init = nn.initializers.normal(stddev=1 / np.sqrt(self.width))
        return self.param("pos_embedding", init, (1, self.max_len, self.width), self.param_dtype)
