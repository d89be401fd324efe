"""MLP-Mixer (Tolstikhin et al. 2021) with the published checkpoints' parameter names."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax.models import families, precision
from vit_jax.models.vit import REMAT_POLICIES, MlpBlock


class MixerBlock(nn.Module):
    """Token mixing across patches, then channel mixing, each pre-LN with a residual."""

    tokens_mlp_dim: int
    channels_mlp_dim: int
    gelu_approximate: bool = True
    layernorm_epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, _: Any = None):
        norm = lambda name: nn.LayerNorm(
            epsilon=self.layernorm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        mlp = lambda dim, name: MlpBlock(
            dim,
            gelu_approximate=self.gelu_approximate,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
        y = jnp.swapaxes(norm("LayerNorm_0")(x), 1, 2)
        y = mlp(self.tokens_mlp_dim, "token_mixing")(y, deterministic=True)
        x = x + jnp.swapaxes(y, 1, 2)
        y = norm("LayerNorm_1")(x)
        return x + mlp(self.channels_mlp_dim, "channel_mixing")(y, deterministic=True), None


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
        return families.pair(self.patch_size, "patch_size")

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool, return_intermediates: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`(logits, out)` as `VisionTransformer`: `out` holds `stem`, `encoded`, `pre_logits`."""
        del train, return_intermediates  # no dropout; no per-block intermediates recorded
        ph, pw = self.patch_size
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be NHWC with 3 channels, got shape {images.shape}")
        if images.shape[1] % ph or images.shape[2] % pw:
            raise ValueError(
                f"image size {images.shape[1]}x{images.shape[2]} is not divisible by the patch"
                f" size {ph}x{pw}"
            )
        x = nn.Conv(
            self.hidden_dim,
            (ph, pw),
            strides=(ph, pw),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            **precision.conv_kwargs(self.dtype),
            name="stem",
        )(images.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        out = {"stem": x}
        kwargs = dict(
            tokens_mlp_dim=self.tokens_mlp_dim,
            channels_mlp_dim=self.channels_mlp_dim,
            gelu_approximate=self.gelu_approximate,
            layernorm_epsilon=self.layernorm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        block = MixerBlock
        if self.remat:
            block = nn.remat(
                block, prevent_cse=not self.scan, policy=REMAT_POLICIES[self.remat_policy]
            )
        if self.scan:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.num_blocks,
            )
            x, _ = stack(name="MixerBlock", **kwargs)(x, None)
        else:
            for i in range(self.num_blocks):
                x, _ = block(name=f"MixerBlock_{i}", **kwargs)(x)
        x = nn.LayerNorm(
            epsilon=self.layernorm_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="pre_head_layer_norm",
        )(x)
        out["encoded"] = x
        x = jnp.mean(x, axis=1)
        out["pre_logits"] = x
        if self.num_classes:
            x = nn.Dense(
                self.num_classes,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                **precision.dense_kwargs(self.dtype),
                kernel_init=nn.initializers.zeros,
                bias_init=nn.initializers.constant(self.head_bias_init),
                name="head",
            )(x)
        return x.astype(jnp.float32), out


# --- The Mixer family: config defaults, builder and layout facts (see `vit_jax.models.families`).

CONFIG_DEFAULTS = dict(
    families.COMMON_DEFAULTS,
    model_type="Mixer",
    patches=dict(size=None),
    hidden_dim=None,
    num_blocks=None,
    tokens_mlp_dim=None,
    channels_mlp_dim=None,
)

# Token- and channel-mixing MLPs: their hidden dimension is tensor-parallel (`mlp`), as ViT's.
LOGICAL_AXES: families.LogicalAxes = (
    (r"(token|channel)_mixing/Dense_0/kernel$", ("embed", "mlp")),
    (r"(token|channel)_mixing/Dense_0/bias$", ("mlp",)),
    (r"(token|channel)_mixing/Dense_1/kernel$", ("mlp", "embed")),
)

NO_DECAY = (r"(^|/)bias$", r"(^|/)scale$")  # LayerNorm scales, all biases


def build(config: ml_collections.ConfigDict, num_classes: int | None, **overrides: Any):
    """`MlpMixer` for a complete Mixer config; `overrides` replace derived fields."""
    kwargs = dict(
        num_classes=num_classes,
        patch_size=families.pair(config.patches.size, "patches.size"),
        hidden_dim=config.hidden_dim,
        num_blocks=config.num_blocks,
        tokens_mlp_dim=config.tokens_mlp_dim,
        channels_mlp_dim=config.channels_mlp_dim,
        gelu_approximate=bool(config.gelu_approximate),
        layernorm_epsilon=float(config.layernorm_epsilon),
        head_bias_init=float(config.head_bias_init),
        scan=bool(config.scan),
        remat=bool(config.remat),
        remat_policy=config.remat_policy,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
    )
    return MlpMixer(**{**kwargs, **overrides})


FAMILY = families.register_family(
    families.Family(
        name="Mixer",
        defaults=CONFIG_DEFAULTS,
        builder=build,
        stride=lambda config: families.pair(config.patches.size, "patches.size"),
        num_prefix_tokens=lambda config: 0,
        scan_block="MixerBlock",
        no_decay=NO_DECAY,
        logical_axes=LOGICAL_AXES,
    )
)
