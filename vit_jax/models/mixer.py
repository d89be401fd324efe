"""MLP-Mixer (Tolstikhin et al. 2021) with the published checkpoints' parameter names."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax.models import family, layers, precision, typed_config
from vit_jax.models.layers import MlpBlock, ModuleDef
from vit_jax.models.typed_config import dtype_option, option

__all__ = ["CONFIG_DEFAULTS", "SCHEMA", "MixerBlock", "MlpMixer", "build", "config_stride"]


class MixerBlock(nn.Module):
    """Token mixing across patches, then channel mixing, each pre-LN with a residual.

    `mlp(features, name=...)` and `norm(name=...)` are constructors bound once by `MlpMixer`.
    """

    tokens_mlp_dim: int
    channels_mlp_dim: int
    mlp: ModuleDef = MlpBlock
    norm: ModuleDef = functools.partial(nn.LayerNorm, epsilon=1e-6)

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None):
        y = jnp.swapaxes(self.norm(name="LayerNorm_0")(x), 1, 2)
        y = self.mlp(self.tokens_mlp_dim, name="token_mixing")(y, deterministic=True)
        x = x + jnp.swapaxes(y, 1, 2)
        y = self.norm(name="LayerNorm_1")(x)
        y = self.mlp(self.channels_mlp_dim, name="channel_mixing")(y, deterministic=True)
        return x + y, None


class MlpMixer(nn.Module):
    """Patch stem (`stem`), `num_blocks` Mixer blocks, LayerNorm, global average pool, head."""

    num_classes: int | None
    # The options, declared once: the config template and `build` are derived (`SCHEMA`).
    patch_size: tuple[int, int] = option(doc="patch (h, w), or an int", at="patches.size")
    hidden_dim: int = option(doc="token width", at="hidden_dim")
    num_blocks: int = option(doc="Mixer blocks", at="num_blocks")
    tokens_mlp_dim: int = option(doc="token-mixing MLP width", at="tokens_mlp_dim")
    channels_mlp_dim: int = option(doc="channel-mixing MLP width", at="channels_mlp_dim")
    gelu_approximate: bool = option(
        True, "tanh GELU, as the published checkpoints were trained", at="gelu_approximate"
    )
    layernorm_epsilon: float = option(1e-6, "the LayerNorms' epsilon", at="layernorm_epsilon")
    head_bias_init: float = option(0.0, "the zero-init head's bias", at="head_bias_init")
    scan: bool = option(False, "nn.scan over the blocks (stacked params)", at="scan")
    remat: bool = option(False, "rematerialise the blocks in the backward pass", at="remat")
    remat_policy: str = option(
        "nothing_saveable", "what remat keeps (layers.REMAT_POLICIES)", at="remat_policy"
    )
    dtype: Any = dtype_option("compute dtype, e.g. bfloat16", at="dtype")
    param_dtype: Any = dtype_option("parameter dtype", at="param_dtype")

    def stride(self) -> tuple[int, int]:
        """Input pixels per token along (height, width)."""
        return family.pair(self.patch_size, "patch_size")

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool, return_intermediates: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`(logits, out)` as `VisionTransformer`: `out` holds `stem`, `encoded`, `pre_logits`."""
        del train, return_intermediates  # no dropout; no per-block intermediates recorded
        self._check_inputs(images)
        dense = precision.dense(self.dtype, self.param_dtype)
        norm = functools.partial(
            nn.LayerNorm,
            epsilon=self.layernorm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = nn.Conv(
            self.hidden_dim,
            tuple(self.patch_size),
            strides=tuple(self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **precision.conv_kwargs(self.dtype),
            name="stem",
        )(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        out = {"stem": x}
        mlp = functools.partial(MlpBlock, dense=dense, act=layers.gelu(self.gelu_approximate))
        x = self._blocks(functools.partial(MixerBlock, mlp=mlp, norm=norm), x)
        x = norm(name="pre_head_layer_norm")(x)
        out["encoded"] = x
        x = jnp.mean(x, axis=1)
        out["pre_logits"] = x
        if self.num_classes:
            x = dense(
                self.num_classes,
                kernel_init=nn.initializers.zeros,
                bias_init=nn.initializers.constant(self.head_bias_init),
                name="head",
            )(x)
        return x.astype(jnp.float32), out

    @nn.nowrap
    def _check_inputs(self, images: jax.Array) -> None:
        """Errors that name the offending shape, before any layer is built."""
        ph, pw = self.patch_size
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
        if images.shape[1] % ph or images.shape[2] % pw:
            raise ValueError(
                f"image size {images.shape[1]}x{images.shape[2]} is not divisible by the patch"
                f" size {ph}x{pw}"
            )

    @nn.nowrap
    def _blocks(self, block: layers.ModuleDef, x: jax.Array) -> jax.Array:
        """`num_blocks` blocks: `MixerBlock_{i}`, or one scanned `MixerBlock` (stacked params)."""
        block = functools.partial(
            block, tokens_mlp_dim=self.tokens_mlp_dim, channels_mlp_dim=self.channels_mlp_dim
        )
        if self.remat:
            block = layers.remat(block, self.remat_policy, scan=self.scan)
        if self.scan:
            stack = layers.lift(
                block,
                nn.scan,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.num_blocks,
            )
            return stack(name="MixerBlock")(x, None)[0]
        for i in range(self.num_blocks):
            x, _ = block(name=f"MixerBlock_{i}")(x)
        return x


# --- The Mixer family's config defaults and builder (its layout facts: `vit_jax.models.families`).

SCHEMA = typed_config.Schema(MlpMixer, base=dict(name="", model_type="Mixer"))
CONFIG_DEFAULTS = SCHEMA.defaults


def build(config: ml_collections.ConfigDict, num_classes: int | None, **overrides: Any):
    """`MlpMixer` for a complete Mixer config; `overrides` replace module fields."""
    return MlpMixer(**SCHEMA.values(config, num_classes=num_classes, **overrides))


def config_stride(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Input pixels per token of a Mixer config: its patch size."""
    return family.pair(config.patches.size, "patches.size")
