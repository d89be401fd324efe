"""Vision Transformer (ViT) in Flax linen, with the published checkpoints' parameter names.

The parameter tree matches the published `.npz` layout (see `vit_jax.weights`): `embedding`,
`cls`, `Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `pre_logits`, `head`. With `scan=True` the blocks are stacked under
`Transformer/encoderblock` with a leading depth axis (`vit_jax.models.layout` converts). A DeiT
distillation token (`distillation_token=True`) adds `dist` and `head_dist`.

The model is assembled from constructors bound once to its options (`ViTLayers`: `dense`,
`norm`, `attention`, `mlp`), as flax's `examples/imagenet/models.py` does: the block
(`block_cls`, default `Encoder1DBlock`), the position embedding (`POSITION_EMBEDDINGS`) and the
pooling (`POOLINGS`) are sub-modules chosen by name from the config; the position embeddings
themselves live in `vit_jax.models.posemb`.

Every option is declared once, as a field of one of the sub-configs (`EncoderConfig`,
`BlockConfig`, `EmbedConfig`, `ReadoutConfig`; `vit_jax.models.typed_config.option`) with its
type, default, doc and config path; the config template (`CONFIG_DEFAULTS`), the optional
entries, `build` and `model.<option>` are derived from those declarations (`SCHEMA`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.models import family, layers, precision, resnet, typed_config
from vit_jax.models import rope as rope_lib
from vit_jax.models.attention import ATTENTION_IMPLEMENTATIONS, MultiHeadAttention
from vit_jax.models.layers import (
    MLP_TYPES,
    REMAT_POLICIES,
    LayerScale,
    MlpBlock,
    ModuleDef,
    SwiGLUMlpBlock,
    drop_path,
)
from vit_jax.models.posemb import (
    DEFAULT_RESAMPLE,
    POSITION_EMBEDDINGS,
    RESAMPLE_METHODS,
    SINCOS2D_VARIANTS,
    AddPositionEmbs,
    NoPositionEmbedding,
    SinCos2DPositionEmbedding,
    check_method,
    resample_posemb,
    resample_posemb_bicubic,
    sincos2d_posemb,
)
from vit_jax.models.typed_config import dtype_option, option

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "CLASSIFIERS",
    "CONFIG_DEFAULTS",
    "NORMS",
    "POSEMBS",
    "SCHEMA",
    "POOLINGS",
    "POSITION_EMBEDDINGS",
    "ReadoutConfig",
    "REMAT_POLICIES",
    "RotaryEmbedding",
    "RESAMPLE_METHODS",
    "SINCOS2D_VARIANTS",
    "AddPositionEmbs",
    "BlockConfig",
    "EmbedConfig",
    "Encoder",
    "Encoder1DBlock",
    "EncoderConfig",
    "GlobalAveragePool",
    "LayerScale",
    "MAPHead",
    "MLP_TYPES",
    "MlpBlock",
    "MultiHeadAttention",
    "NoPositionEmbedding",
    "SinCos2DPositionEmbedding",
    "SwiGLUMlpBlock",
    "TokenPool",
    "Unpooled",
    "ViTLayers",
    "VisionTransformer",
    "build",
    "config_num_posemb_prefix_tokens",
    "config_num_prefix_tokens",
    "config_stride",
    "drop_path",
    "num_prefix_tokens",
    "patch_stride",
    "resample_posemb",
    "resample_posemb_bicubic",
    "sincos2d_posemb",
]

Array = jax.Array
F32 = jnp.float32
Dtype = Any
LayerNorm = functools.partial(nn.LayerNorm, epsilon=1e-6)
# `transformer.norm`: every norm of the model (blocks, q/k norms, final norm, MAP head).
NORMS: dict[str, ModuleDef] = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}
# `posemb`: an additive embedding (`POSITION_EMBEDDINGS`), or `rope`: none added, the blocks'
# queries and keys rotated by 2-D RoPE instead (DINOv3; `RotaryEmbedding`).
POSEMBS = (*POSITION_EMBEDDINGS, "rope")
ROPE_RNG = "rope"  # the rng stream RoPE's training-time augmentations draw from


@dataclasses.dataclass(frozen=True)
class ViTLayers:
    """The layer constructors a ViT is built from, bound once to its options.

    `dense(features, name=...)` and `norm(name=...)` carry the compute / parameter dtypes, the
    precision policy and the LayerNorm epsilon; `attention(name=...)` is a `MultiHeadAttention`
    with the heads and core chosen; `mlp(name=...)` an `MlpBlock` with its width and GELU.
    """

    dense: ModuleDef
    norm: ModuleDef
    attention: ModuleDef
    mlp: ModuleDef
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


# --- Blocks.


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    `attention`, `mlp` and `norm` are constructors (`ViTLayers`). With `layer_scale` (e.g.
    `functools.partial(LayerScale, 1e-5)`), each branch is scaled per channel before the residual
    add (`LayerScale_1` after attention, `LayerScale_3` after the MLP; timm / DeiT-III / DINOv2),
    and stochastic depth drops the scaled branch.
    """

    attention: ModuleDef
    mlp: ModuleDef
    norm: ModuleDef = LayerNorm
    dropout_rate: float = 0.0
    stochastic_depth: bool = False
    layer_scale: ModuleDef | None = None
    return_intermediates: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        drop_rate: Array | float,
        deterministic: bool,
        rope: tuple[Array, Array] | None = None,
    ):
        def residual(branch, name):
            if self.layer_scale is not None:
                branch = self.layer_scale(name=name)(branch)
            if deterministic or not self.stochastic_depth:
                return branch
            return drop_path(branch, drop_rate, self.make_rng("dropout"))

        y = self.norm(name="LayerNorm_0")(x)
        rotary = {} if rope is None else {"rope": rope}  # (sin, cos): RoPE on q / k
        y, weights = self.attention(name="MultiHeadDotProductAttention_1")(
            y, y, deterministic=deterministic, return_weights=self.return_intermediates, **rotary
        )
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        x = x + residual(y, "LayerScale_1")
        y = self.norm(name="LayerNorm_2")(x)
        y = self.mlp(name="MlpBlock_3")(y, deterministic=deterministic)
        x = x + residual(y, "LayerScale_3")
        aux = {"tokens": x, "attention_weights": weights} if self.return_intermediates else None
        return x, aux


class Encoder(nn.Module):
    """Position embedding, dropout, `num_layers` blocks (unrolled or scanned), final norm.

    `block(name=...)` builds one block, called `(x, drop_rate, deterministic) -> (x, aux)`;
    `position_embedding(name='posembed_input')` is called `(x, grid)`. `registers` (1, n, D),
    when given, are inserted after the prefix tokens once the position table is added (they
    have no position embedding; DINOv2 with registers). `rotary` (a `RotaryEmbedding`
    constructor; posemb 'rope') computes RoPE's (sin, cos) once for the grid, and every block
    is then called `(x, drop_rate, deterministic, (sin, cos))`.
    """

    num_layers: int
    block: ModuleDef
    norm: ModuleDef = LayerNorm
    position_embedding: ModuleDef = AddPositionEmbs
    dropout_rate: float = 0.0
    stochastic_depth_rate: float = 0.0
    scan: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    rotary: ModuleDef | None = None

    @nn.compact
    def __call__(
        self,
        x: Array,
        *,
        grid: tuple[int, int],
        train: bool,
        registers: Array | None = None,
    ):
        x = self.position_embedding(name="posembed_input")(x, grid)
        if registers is not None:
            prefix = x.shape[1] - grid[0] * grid[1]
            registers = jnp.tile(registers.astype(x.dtype), (x.shape[0], 1, 1))
            x = jnp.concatenate([x[:, :prefix], registers, x[:, prefix:]], axis=1)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
        block = self.block
        if self.remat:  # static: (self, x, drop_rate, deterministic)
            block = layers.remat(block, self.remat_policy, scan=self.scan, static_argnums=(3,))
        # Stochastic depth grows linearly with depth (0 for the first block), as in DeiT / timm.
        rates = np.linspace(0.0, self.stochastic_depth_rate, self.num_layers, dtype=np.float32)
        # RoPE's (sin, cos), the same for every block: an extra block argument only when set
        rope = () if self.rotary is None else (self.rotary(name="rope")(grid, train=train),)
        stack = self._scanned if self.scan else self._unrolled
        x, aux = stack(block, x, rates, not train, rope)
        return self.norm(name="encoder_norm")(x), aux

    @nn.nowrap
    def _scanned(
        self, block: ModuleDef, x: Array, rates: np.ndarray, deterministic: bool, rope: tuple
    ):
        """One `encoderblock` scanned over depth: parameters stacked on a leading axis."""
        stack = layers.lift(
            block,
            nn.scan,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast) + (nn.broadcast,) * len(rope),
            length=self.num_layers,
        )
        return stack(name="encoderblock")(x, jnp.asarray(rates), deterministic, *rope)

    @nn.nowrap
    def _unrolled(
        self, block: ModuleDef, x: Array, rates: np.ndarray, deterministic: bool, rope: tuple
    ):
        """`encoderblock_{i}` one after another; the blocks' intermediates stacked on depth."""
        auxes = []
        for i in range(self.num_layers):
            x, aux = block(name=f"encoderblock_{i}")(x, float(rates[i]), deterministic, *rope)
            auxes.append(aux)
        return x, (jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes[0] else None)


class RotaryEmbedding(nn.Module):
    """DINOv3's 2-D RoPE for a patch grid: `(grid, train=...) -> (sin, cos)`, each
    (grid_h * grid_w, head_dim) float32 (`vit_jax.models.rope`). No parameters.

    Patch centres in [-1, 1] (`normalize_coords`), periods `theta ** (4 k / head_dim)`. With
    `train=True`, the coordinates are shifted / jittered / rescaled (`train_shift`,
    `train_jitter`, `train_rescale`; 0 / 1 / 1: off) once per call, drawn from the `rope` rng when
    the caller passes one (`rngs={'rope': key}`), else from `dropout` (what the trainer passes),
    so a seeded run stays deterministic. Evaluation (`train=False`) uses the plain grid.
    """

    head_dim: int
    theta: float = rope_lib.ROPE_THETA
    normalize_coords: str = "separate"
    train_shift: float = 0.0
    train_jitter: float = 1.0
    train_rescale: float = 1.0

    def __call__(self, grid: tuple[int, int], *, train: bool) -> tuple[Array, Array]:
        coords = rope_lib.patch_coordinates(*grid, normalize=self.normalize_coords)
        augments = dict(  # the neutral values: off (`augment_coordinates`' None)
            shift=self.train_shift or None,
            jitter=None if self.train_jitter == 1 else self.train_jitter,
            rescale=None if self.train_rescale == 1 else self.train_rescale,
        )
        if train and any(v is not None for v in augments.values()):
            coords = rope_lib.augment_coordinates(coords, self._rng(), **augments)
        return rope_lib.rope_sin_cos(coords, rope_lib.rope_periods(self.head_dim, self.theta))

    def _rng(self) -> Array:
        for stream in (ROPE_RNG, "dropout"):
            if self.has_rng(stream):
                return self.make_rng(stream)
        raise ValueError(
            "RoPE's training-time augmentations (rope_train_shift / rope_train_jitter / "
            "rope_train_rescale) need an rng: apply with rngs={'rope': key} (or 'dropout')"
        )


# --- Pooling: `POOLINGS[config.classifier](layers)` is a constructor; the pool is called
# `(tokens, num_prefix_tokens)` and returns the representation the head sees.


class TokenPool(nn.Module):
    """The prefix tokens' outputs: (B, D) for the class token, (B, 2, D) with DeiT's `dist`."""

    def __call__(self, x: Array, num_prefix_tokens: int) -> Array:
        return x[:, 0] if num_prefix_tokens == 1 else x[:, :num_prefix_tokens]


class GlobalAveragePool(nn.Module):
    """The mean over all tokens (`gap`)."""

    def __call__(self, x: Array, num_prefix_tokens: int) -> Array:
        del num_prefix_tokens
        return jnp.mean(x, axis=1)


class Unpooled(nn.Module):
    """Every token (`unpooled`, `token_unpooled`): per-token logits."""

    def __call__(self, x: Array, num_prefix_tokens: int) -> Array:
        del num_prefix_tokens
        return x


class MAPHead(nn.Module):
    """Multi-head attention pooling: a learned probe attends over the tokens (big_vision names)."""

    attention: ModuleDef
    mlp: ModuleDef
    norm: ModuleDef = LayerNorm
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, num_prefix_tokens: int = 0) -> Array:
        del num_prefix_tokens
        b, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
        probe = jnp.tile(probe.astype(self.dtype), (b, 1, 1))
        x, _ = self.attention(name="MultiHeadDotProductAttention_0")(probe, x, deterministic=True)
        y = self.norm(name="LayerNorm_0")(x)
        x = x + self.mlp(name="MlpBlock_0")(y, deterministic=True)
        return x[:, 0]


def _map_head(parts: ViTLayers) -> ModuleDef:
    return functools.partial(
        MAPHead,
        attention=parts.attention,
        mlp=parts.mlp,
        norm=parts.norm,
        dtype=parts.dtype,
        param_dtype=parts.param_dtype,
        name="MAPHead_0",
    )


POOLINGS: dict[str, Callable[[ViTLayers], ModuleDef]] = {
    "token": lambda parts: TokenPool,
    "gap": lambda parts: GlobalAveragePool,
    "map": _map_head,
    "unpooled": lambda parts: Unpooled,
    "token_unpooled": lambda parts: Unpooled,
}
CLASSIFIERS = tuple(POOLINGS)
PREFIX_TOKEN_POOLINGS = ("token", "token_unpooled")  # the poolings that add a class token


def num_prefix_tokens(classifier: str, distillation_token: bool) -> int:
    """Tokens before the patch tokens: the class token, plus DeiT's distillation token."""
    if classifier not in PREFIX_TOKEN_POOLINGS:
        return 0
    return 1 + int(bool(distillation_token))


def patch_stride(
    patch_size: tuple[int, int], resnet_num_layers: tuple[int, ...] | None
) -> tuple[int, int]:
    """Input pixels per token: the patch size, times the ResNet stem's downsampling (hybrids).

    The stem's root conv and max-pool divide by 4, every stage after the first by 2 more.
    """
    ph, pw = patch_size
    if resnet_num_layers is None:
        return ph, pw
    f = 4 * 2 ** max(len(resnet_num_layers) - 1, 0)
    return ph * f, pw * f


# --- The options, declared once (`typed_config.option`): the sub-configs a `VisionTransformer`
# takes as values. The config template, the optional entries, `build` and `model.<option>` are
# derived from these declarations.

T = "transformer."


@dataclasses.dataclass(frozen=True)
class EncoderConfig(typed_config.Options):
    """The encoder stack: width, depth, dropout and how the blocks are compiled."""

    hidden_size: int = option(doc="token width D", at="hidden_size")
    num_layers: int = option(doc="transformer blocks", at=T + "num_layers")
    dropout_rate: float = option(
        0.0, "dropout after the position embedding, attention and MLP", at=T + "dropout_rate"
    )
    stochastic_depth_rate: float = option(
        0.0,
        "drop-path rate of the last block (linear in depth from 0)",
        at=T + "stochastic_depth_rate",
    )
    scan: bool = option(
        False, "nn.scan over the blocks: one compiled block, stacked params", at="scan"
    )
    remat: bool = option(False, "rematerialise the blocks in the backward pass", at="remat")
    remat_policy: str = option(
        "nothing_saveable", "what remat keeps (layers.REMAT_POLICIES)", at="remat_policy"
    )


@dataclasses.dataclass(frozen=True)
class BlockConfig(typed_config.Options):
    """One transformer block: attention, MLP, norms, LayerScale."""

    mlp_dim: int = option(doc="MLP hidden width (SwiGLU: after the gate)", at=T + "mlp_dim")
    num_heads: int = option(doc="attention heads", at=T + "num_heads")
    attention_dropout_rate: float = option(
        0.0, "dropout on the attention weights", at=T + "attention_dropout_rate"
    )
    layer_scale_init: float | None = option(
        None,
        "per-channel residual scales (LayerScale) initialised at this value",
        at=T + "layer_scale_init",
    )
    qk_norm: bool = option(
        False, "norm over head_dim on queries and keys (`query_norm`, `key_norm`)", at=T + "qk_norm"
    )
    mlp_type: str = option(
        "gelu",
        "gelu | swiglu (packed `Dense_0` (D, 2 * mlp_dim); DINOv2-g)",
        at=T + "mlp_type",
        choices=MLP_TYPES,
    )
    norm: str = option(
        "layernorm",
        "layernorm | rmsnorm (scale only): every norm of the model",
        at=T + "norm",
        choices=NORMS,
    )
    gelu_approximate: bool = option(
        True, "tanh GELU, as the published checkpoints were trained", at="gelu_approximate"
    )
    layernorm_epsilon: float = option(
        1e-6, "the norms' epsilon (HF transformers' ViT uses 1e-12)", at="layernorm_epsilon"
    )
    attention_implementation: str | None = option(
        None, 'None | "xla" | "cudnn" (jax.nn.dot_product_attention)', at="attention_implementation"
    )
    query_bias: bool = option(
        True, "False: the blocks' query projection has no bias (DINOv3-7B)", at=T + "query_bias"
    )
    key_bias: bool = option(
        True, "False: the blocks' key projection has no bias (every DINOv3)", at=T + "key_bias"
    )
    value_bias: bool = option(
        True, "False: the blocks' value projection has no bias (DINOv3-7B)", at=T + "value_bias"
    )
    attention_out_bias: bool = option(
        True,
        "False: the blocks' attention output projection `out` has no bias",
        at=T + "attention_out_bias",
    )
    mlp_bias: bool = option(True, "False: the blocks' MLP layers have no biases", at=T + "mlp_bias")


@dataclasses.dataclass(frozen=True)
class EmbedConfig(typed_config.Options):
    """Images to tokens: the (hybrid stem and) patch conv, prefix tokens, position embedding."""

    patch_size: tuple[int, int] = option(doc="patch (h, w), or an int", at="patches.size")
    resnet_num_layers: tuple[int, ...] | None = option(
        None, "hybrids: the ResNet stem's units per stage, e.g. (3, 4, 9)", at="resnet.num_layers"
    )
    resnet_width_factor: float = option(1.0, "hybrids: the stem's width", at="resnet.width_factor")
    posemb: str = option(
        "learn",
        "learn | sincos2d | none (POSITION_EMBEDDINGS) | rope (2-D RoPE on the blocks' queries "
        "and keys, no table: DINOv3)",
        at="posemb",
        choices=POSEMBS,
    )
    distillation_token: bool = option(
        False, "DeiT: a second token `dist` with its own head `head_dist`", at="distillation_token"
    )
    num_registers: int = option(
        0, "register tokens `registers` after the class token (DINOv2 -reg4)", at="num_registers"
    )
    posemb_grid: tuple[int, int] | None = option(
        None, "(gh, gw): the learned table's grid, resampled for other inputs", at="posemb_grid"
    )
    posemb_covers_prefix: bool = option(
        True, "False: no position rows for cls / dist (DeiT-III, timm)", at="posemb_covers_prefix"
    )
    posemb_resample: str = option(
        DEFAULT_RESAMPLE,
        "how a learned table is resampled (load time and on the fly): the weights' source's own "
        "interpolation, one of posemb.RESAMPLE_METHODS (scipy order 1 as the reference; bicubic "
        "as transformers; bicubic_antialias as timm / transformers Dinov2WithRegisters)",
        at="posemb_resample",
    )
    posemb_sincos2d_variant: str = option(
        "big_vision",
        "the sincos2d table's frequencies: big_vision | mocov3 (a stored sincos2d config "
        "without it means mocov3, `models.stored_config`)",
        at="posemb_sincos2d_variant",
        choices=SINCOS2D_VARIANTS,
    )
    rope_theta: float = option(
        rope_lib.ROPE_THETA,
        "posemb 'rope': periods rope_theta ** (4 k / head_dim) in [-1, 1] coordinate units",
        at="rope_theta",
    )
    rope_normalize_coords: str = option(
        "separate",
        "posemb 'rope': patch centres to [-1, 1] by each axis' own length (separate), or both "
        "by the shorter (min) / longer (max) one",
        at="rope_normalize_coords",
        choices=rope_lib.NORMALIZE_MODES,
    )
    rope_train_shift: float = option(
        0.0,
        "posemb 'rope', train=True only: add a per-axis offset uniform in [-s, s] to the "
        "coordinates (0: off; drawn from rng 'rope', else 'dropout')",
        at="rope_train_shift",
    )
    rope_train_jitter: float = option(
        1.0,
        "posemb 'rope', train=True only: scale each axis by a log-uniform factor in [1/j, j] "
        "(1: off)",
        at="rope_train_jitter",
    )
    rope_train_rescale: float = option(
        1.0,
        "posemb 'rope', train=True only: scale both axes by one log-uniform factor in [1/r, r] "
        "(1: off; DINOv3 trained with 2)",
        at="rope_train_rescale",
    )


@dataclasses.dataclass(frozen=True)
class ReadoutConfig(typed_config.Options):
    """Tokens to logits: the pooling, the representation layer, the head."""

    classifier: str = option(
        "token",
        "token | gap | map | unpooled | token_unpooled",
        at="classifier",
        choices=CLASSIFIERS,
    )
    representation_size: int | None = option(
        None, "a tanh pre-logits layer of this width", at="representation_size"
    )
    head_bias_init: float = option(0.0, "the zero-init head's bias", at="head_bias_init")


class VisionTransformer(nn.Module):
    """ViT (and R+ViT hybrids when `resnet_num_layers` is set).

    `__call__(images, *, train, return_intermediates=False)`: images NHWC in [-1, 1]. Returns
    `(logits, out)`, float32 logits (the representation when `num_classes` is None/0) and a dict
    `out` with `stem` (patch embeddings (B, gh*gw, D)), `encoded` (the final LayerNorm's output)
    and `pre_logits`. `return_intermediates=True` adds the costly per-block `tokens` (every
    block's output, stacked (layers, B, N, D)) and `attention_weights` ((layers, B, heads, N, N)).

    `distillation_token=True` (DeiT, classifier 'token' only) adds a second learned token `dist`
    after `cls` (with its own position-embedding slot) and its own head `head_dist`. The logits
    are then the mean of the two heads' logits, and `out` also holds each head's logits,
    `logits_cls` and `logits_dist` (what distillation training reads).

    `num_registers` > 0 adds learned register tokens `registers` (1, n, D) after the class token
    (sequence [cls, (dist), registers, patches]; no position embedding). `encoded` (and the
    per-block intermediates) hold them, as Hugging Face's `last_hidden_state`; they are dropped
    before pooling, and `out['registers']` holds their final tokens (B, n, D).

    `posemb_grid` fixes the learned position table's grid (another input grid resamples it on
    the fly); `posemb_resample` names how a learned table is resampled, at load time and on the
    fly (`vit_jax.models.posemb.RESAMPLE_METHODS`: the source library's own interpolation);
    `posemb_covers_prefix=False` gives the prefix tokens no position row (DeiT-III).
    `posemb_sincos2d_variant` picks the `sincos2d` table's frequencies (`sincos2d_posemb`).
    `qk_norm` normalises queries and keys per head; `mlp_type` 'swiglu' takes the gated MLP
    (`SwiGLUMlpBlock`); `norm` 'rmsnorm' makes every norm an RMSNorm (`scale` only).
    `query_bias` / `key_bias` / `value_bias` / `attention_out_bias` / `mlp_bias` False drop that
    bias from every block (DINOv3: no key bias; DINOv3-7B: no q/k/v biases).

    `posemb='rope'` (DINOv3) adds no position embedding: the blocks rotate the queries and keys
    of the patch tokens by 2-D RoPE (`RotaryEmbedding`: `rope_theta`, `rope_normalize_coords`;
    in training only, the coordinate augmentations `rope_train_shift` / `_jitter` / `_rescale`
    drawn from the `rope` rng, else `dropout`); prefix tokens are not rotated. It runs at any
    grid (there is no table to resample).

    The options come as four sub-configs (`encoder`, `block`, `embed`, `readout`: values, each
    option declared once there) plus the dtypes; every option also reads as `model.<option>`.
    `layers()` binds them into the constructors the sub-modules are built from; `block_cls`
    replaces the transformer block (it receives `ViTLayers`' `norm`, `attention`, `mlp` and the
    block options as keywords).
    """

    num_classes: int | None
    encoder: EncoderConfig
    block: BlockConfig
    embed: EmbedConfig
    readout: ReadoutConfig
    dtype: Dtype = dtype_option("compute dtype, e.g. bfloat16", at="dtype")
    param_dtype: Dtype = dtype_option("parameter dtype", at="param_dtype")
    block_cls: ModuleDef = Encoder1DBlock

    def stride(self) -> tuple[int, int]:
        """Input pixels per token along (height, width)."""
        return patch_stride(self.patch_size, self.resnet_num_layers)

    @nn.nowrap
    def layers(self) -> ViTLayers:
        """The layer constructors, bound once to this model's dtypes, epsilon, GELU and heads."""
        dense = precision.dense(self.dtype, self.param_dtype)
        attention = functools.partial(
            MultiHeadAttention,
            num_heads=self.num_heads,
            implementation=self.attention_implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        mlp = functools.partial(MLP_TYPES[self.mlp_type], self.mlp_dim, dense=dense)
        if self.mlp_type == "gelu":
            mlp = functools.partial(mlp, act=layers.gelu(self.gelu_approximate))
        return ViTLayers(
            dense=dense,
            norm=functools.partial(
                NORMS[self.norm],
                epsilon=self.layernorm_epsilon,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            ),
            attention=attention,
            mlp=mlp,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    @nn.nowrap
    def transformer(self, parts: ViTLayers, return_intermediates: bool) -> Encoder:
        """The `Transformer` sub-module: position embedding, blocks, final norm."""
        layer_scale = None
        if self.layer_scale_init is not None:
            layer_scale = functools.partial(
                LayerScale, self.layer_scale_init, param_dtype=self.param_dtype
            )
        attention = functools.partial(
            parts.attention,
            dropout_rate=self.attention_dropout_rate,
            query_bias=self.query_bias,
            key_bias=self.key_bias,
            value_bias=self.value_bias,
            out_bias=self.attention_out_bias,
        )
        if self.qk_norm:  # the blocks' attention only (not the MAP head's)
            attention = functools.partial(attention, qk_norm=parts.norm)
        mlp = functools.partial(parts.mlp, dropout_rate=self.dropout_rate)
        if not self.mlp_bias:  # the blocks' MLP only (not the MAP head's)
            mlp = functools.partial(mlp, dense=functools.partial(parts.dense, use_bias=False))
        block = functools.partial(
            self.block_cls,
            attention=attention,
            mlp=mlp,
            norm=parts.norm,
            dropout_rate=self.dropout_rate,
            stochastic_depth=self.stochastic_depth_rate > 0,
            layer_scale=layer_scale,
            return_intermediates=return_intermediates,
        )
        return Encoder(
            num_layers=self.num_layers,
            block=block,
            norm=parts.norm,
            position_embedding=self._position_embedding(),
            dropout_rate=self.dropout_rate,
            stochastic_depth_rate=self.stochastic_depth_rate,
            scan=self.scan,
            remat=self.remat,
            remat_policy=self.remat_policy,
            rotary=self._rotary_embedding(),
            name="Transformer",
        )

    @nn.nowrap
    def _rotary_embedding(self) -> ModuleDef | None:
        """posemb 'rope': `RotaryEmbedding` bound to the rope options (checked); else None."""
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        for name, least in (("shift", 0.0), ("jitter", 1.0), ("rescale", 1.0)):
            value = getattr(self, f"rope_train_{name}")
            if not value >= least:
                raise ValueError(
                    f"rope_train_{name} must be >= {least} ({least}: off), got {value}"
                )
        if self.posemb != "rope":
            return None
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 4 or self.hidden_size % self.num_heads:
            raise ValueError(
                f"posemb 'rope' needs head_dim (hidden_size / num_heads = {self.hidden_size} / "
                f"{self.num_heads}) to be a whole multiple of 4"
            )
        return functools.partial(
            RotaryEmbedding,
            head_dim,
            theta=self.rope_theta,
            normalize_coords=self.rope_normalize_coords,
            train_shift=self.rope_train_shift,
            train_jitter=self.rope_train_jitter,
            train_rescale=self.rope_train_rescale,
        )

    @nn.nowrap
    def _position_embedding(self) -> ModuleDef:
        """`POSITION_EMBEDDINGS[posemb]`, bound to its options (the learned table's grid,
        prefix rows and resampling; the sin-cos table's variant)."""
        check_method(self.posemb_resample)
        options: dict[str, Any] = {}
        if self.posemb == "learn":
            grid = None if self.posemb_grid is None else tuple(self.posemb_grid)
            options = dict(
                grid=grid, covers_prefix=self.posemb_covers_prefix, method=self.posemb_resample
            )
        elif (self.posemb_grid, self.posemb_covers_prefix) != (None, True):
            raise ValueError(
                "posemb_grid / posemb_covers_prefix apply to posemb 'learn' only, got posemb "
                f"{self.posemb!r}"
            )
        elif self.posemb == "sincos2d":
            options = dict(variant=self.posemb_sincos2d_variant)
        additive = "none" if self.posemb == "rope" else self.posemb  # RoPE: in the attention
        return functools.partial(
            POSITION_EMBEDDINGS[additive],
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **options,
        )

    @nn.compact
    def __call__(
        self,
        images: Array,
        *,
        train: bool,
        return_intermediates: bool = False,
    ) -> tuple[Array, dict[str, Array]]:
        self._check_inputs(images)
        parts = self.layers()
        x = self._embed_patches(images)
        n, gh, gw, c = x.shape
        x = x.reshape(n, gh * gw, c)
        out = {"stem": x}
        x, prefix = self._add_prefix_tokens(x)
        registers = None
        if self.num_registers:  # DINOv2 initialises them normal(1e-6), as timm does
            init = nn.initializers.normal(stddev=1e-6)
            shape = (1, self.num_registers, c)
            registers = self.param("registers", init, shape, self.param_dtype)
        encoder = self.transformer(parts, return_intermediates)
        x, aux = encoder(x, grid=(gh, gw), train=train, registers=registers)
        out.update(aux or {})
        out["encoded"] = x
        if self.num_registers:  # dropped before pooling
            end = prefix + self.num_registers
            out["registers"] = x[:, prefix:end]
            x = jnp.concatenate([x[:, :prefix], x[:, end:]], axis=1)
        x = POOLINGS[self.classifier](parts)()(x, prefix)
        if self.representation_size is not None:
            x = jnp.tanh(parts.dense(self.representation_size, name="pre_logits")(x))
        out["pre_logits"] = x  # (B, 2, D) with a distillation token: cls, dist
        return self._head(parts, x, out)

    @nn.nowrap
    def _check_inputs(self, images: Array) -> None:
        """Errors that name the offending option or shape, before any layer is built."""
        if self.distillation_token and self.classifier != "token":
            raise ValueError(
                f"distillation_token needs classifier='token', got {self.classifier!r}"
            )
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
        sh, sw = self.stride()
        h, w = images.shape[1:3]
        if h % sh or w % sw:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the model's patch stride {sh}x{sw}"
                f" (patch size {self.patch_size[0]}x{self.patch_size[1]})"
            )

    @nn.nowrap
    def _embed_patches(self, images: Array) -> Array:
        """The (hybrids: ResNet stem, then) patch conv `embedding`: (B, gh, gw, D)."""
        x = images.astype(self.dtype)
        if self.resnet_num_layers is not None:
            x = resnet.resnet_stem(
                x,
                num_layers=tuple(self.resnet_num_layers),
                width_factor=self.resnet_width_factor,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        return nn.Conv(
            self.hidden_size,
            self.patch_size,
            strides=self.patch_size,
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **precision.conv_kwargs(self.dtype),
            name="embedding",
        )(x)

    @nn.nowrap
    def _add_prefix_tokens(self, x: Array) -> tuple[Array, int]:
        """The learned `cls` (and DeiT's `dist`) tokens before the patch tokens; their count."""
        if self.classifier not in PREFIX_TOKEN_POOLINGS:
            return x, 0
        n, _, c = x.shape
        tokens = [self.param("cls", nn.initializers.zeros, (1, 1, c), self.param_dtype)]
        if self.distillation_token:  # DeiT initialises it normal(0.02): distinct from cls
            init = nn.initializers.normal(stddev=0.02)
            tokens.append(self.param("dist", init, (1, 1, c), self.param_dtype))
        tokens = [jnp.tile(t.astype(x.dtype), (n, 1, 1)) for t in tokens]
        return jnp.concatenate([*tokens, x], axis=1), len(tokens)

    @nn.nowrap
    def _head(
        self, parts: ViTLayers, x: Array, out: dict[str, Array]
    ) -> tuple[Array, dict[str, Array]]:
        """Zero-initialised `head` (DeiT: `head` on cls, `head_dist` on dist, logits averaged)."""
        if not self.num_classes:  # a feature extractor: the (mean of the tokens') representation
            x = jnp.mean(x, axis=1) if self.distillation_token else x
            return x.astype(F32), out
        head = functools.partial(
            parts.dense,
            self.num_classes,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.constant(self.head_bias_init),
        )
        if not self.distillation_token:
            return head(name="head")(x).astype(F32), out
        logits_cls = head(name="head")(x[:, 0]).astype(F32)
        logits_dist = head(name="head_dist")(x[:, 1]).astype(F32)
        out["logits_cls"], out["logits_dist"] = logits_cls, logits_dist
        return (logits_cls + logits_dist) / 2, out


# --- The ViT family's config defaults and builder (its layout facts: `vit_jax.models.families`).

SCHEMA = typed_config.Schema(
    VisionTransformer, base=dict(name="", model_type="ViT"), sections=("resnet",)
)
SCHEMA.properties(VisionTransformer)  # model.hidden_size, model.classifier, ...
CONFIG_DEFAULTS = SCHEMA.defaults  # the hybrids' `resnet` starts from SCHEMA.templates


def config_stride(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Input pixels per token of a ViT config (hybrids: times the stem's downsampling)."""
    layers = None if config.resnet is None else tuple(config.resnet.num_layers)
    return patch_stride(family.pair(config.patches.size, "patches.size"), layers)


def config_num_prefix_tokens(config: ml_collections.ConfigDict) -> int:
    """Tokens before the patch tokens in the sequence: class, DeiT's distillation, registers."""
    return num_prefix_tokens(config.classifier, bool(config.distillation_token)) + int(
        config.num_registers
    )


def config_num_posemb_prefix_tokens(config: ml_collections.ConfigDict) -> int:
    """Rows of the position table before the grid: class (+ distillation) token, unless the
    table does not cover them (`posemb_covers_prefix=False`); registers never have one."""
    if not config.posemb_covers_prefix:
        return 0
    return num_prefix_tokens(config.classifier, bool(config.distillation_token))


def build(config: ml_collections.ConfigDict, num_classes: int | None, **overrides: Any):
    """`VisionTransformer` for a complete ViT config; `overrides` replace module fields or
    single options by name (`attention_implementation='xla'`)."""
    return VisionTransformer(**SCHEMA.values(config, num_classes=num_classes, **overrides))
