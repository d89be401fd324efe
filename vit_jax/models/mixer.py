"""MLP-Mixer (Tolstikhin et al. 2021) with the published checkpoints' parameter names."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax.models import family, layers, precision
from vit_jax.models.layers import MlpBlock, ModuleDef

__all__ = ["CONFIG_DEFAULTS", "MixerBlock", "MlpMixer", "build", "config_stride"]


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
    patch_size: tuple[int, int]
    hidden_dim: int
    num_blocks: int
    tokens_mlp_dim: int
    channels_mlp_dim: int
    gelu_approximate: bool = True
    layernorm_epsilon: float = 1e-6
    head_bias_init: float = 0.0
    scan: bool = False
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

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
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **precision.dense_kwargs(self.dtype),
        )
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

CONFIG_DEFAULTS = dict(
    family.COMMON_DEFAULTS,
    model_type="Mixer",
    patches=dict(size=None),
    hidden_dim=None,
    num_blocks=None,
    tokens_mlp_dim=None,
    channels_mlp_dim=None,
)


def build(config: ml_collections.ConfigDict, num_classes: int | None, **overrides: Any):
    """`MlpMixer` for a complete Mixer config; `overrides` replace derived fields."""
    kwargs = dict(
        family.common_fields(config, num_classes),
        hidden_dim=config.hidden_dim,
        num_blocks=config.num_blocks,
        tokens_mlp_dim=config.tokens_mlp_dim,
        channels_mlp_dim=config.channels_mlp_dim,
    )
    return MlpMixer(**{**kwargs, **overrides})


def config_stride(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Input pixels per token of a Mixer config: its patch size."""
    return family.pair(config.patches.size, "patches.size")
