"""ResNet-v2 stem of the hybrid R+ViT models: weight-standardised convs and GroupNorm.

Parameter names follow the published hybrid checkpoints: `conv_root`, `gn_root`,
`block{n}/unit{m}/{conv1,conv2,conv3,conv_proj}` and `gn1, gn2, gn3, gn_proj`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import precision

__all__ = ["ResNetStage", "ResidualUnit", "StdConv", "resnet_stem", "weight_standardize"]

ModuleDef = Any  # a Module class or a functools.partial of one

WS_EPSILON = 1e-5


def weight_standardize(kernel: jax.Array, epsilon: float = WS_EPSILON) -> jax.Array:
    """(kernel - mean) / (std + epsilon) over the (H, W, In) axes, per output channel.

    The published formula (reference vit_jax and BiT): epsilon is added to the standard
    deviation, not to the variance; the published hybrid checkpoints were trained with it.
    """
    kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
    return kernel / (jnp.std(kernel, axis=(0, 1, 2), keepdims=True) + epsilon)


class StdConv(nn.Conv):
    """Convolution with weight standardisation (`weight_standardize`) of its kernel."""

    def param(self, name: str, *args, **kwargs):
        value = super().param(name, *args, **kwargs)
        return weight_standardize(value) if name == "kernel" else value


class ResidualUnit(nn.Module):
    """Bottleneck unit (1x1 -> 3x3 -> 1x1, 4x expansion) with a projection when shapes change.

    `conv(features, kernel_size, strides=..., name=...)` and `norm(name=...)` are constructors
    (`StdConv` / `nn.GroupNorm` bound to the dtypes by `resnet_stem`).
    """

    features: int
    strides: tuple[int, int] = (1, 1)
    conv: ModuleDef = functools.partial(StdConv, use_bias=False)
    norm: ModuleDef = nn.GroupNorm

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv, gn = self.conv, self.norm
        residual = x
        if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
            residual = conv(self.features * 4, (1, 1), self.strides, name="conv_proj")(residual)
            residual = gn(name="gn_proj")(residual)
        y = nn.relu(gn(name="gn1")(conv(self.features, (1, 1), (1, 1), name="conv1")(x)))
        y = nn.relu(gn(name="gn2")(conv(self.features, (3, 3), self.strides, name="conv2")(y)))
        y = gn(name="gn3", scale_init=nn.initializers.zeros)(
            conv(self.features * 4, (1, 1), (1, 1), name="conv3")(y)
        )
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """`depth` residual units `unit1...`; the first one may downsample."""

    depth: int
    features: int
    first_stride: tuple[int, int] = (1, 1)
    unit: ModuleDef = ResidualUnit

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            strides = self.first_stride if i == 0 else (1, 1)
            x = self.unit(self.features, strides=strides, name=f"unit{i + 1}")(x)
        return x


def resnet_stem(
    x: jax.Array,
    *,
    num_layers: tuple[int, ...],
    width_factor: float = 1.0,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
) -> jax.Array:
    """Root conv (7x7/2) + GroupNorm + max-pool (3x3/2), then bottleneck stages `block1...`.

    Call it inside a parent's `nn.compact` method: the layers it creates belong to the parent, so
    their parameters sit at the top level of the tree as in the published hybrid checkpoints.
    `num_layers=()` is the root only (R+ViT-Ti_16); every stage after the first halves the size.
    The dtypes are bound once here into the `conv` / `norm` constructors the units are built from.
    """
    conv = functools.partial(
        StdConv,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        **precision.conv_kwargs(dtype),
    )
    norm = functools.partial(nn.GroupNorm, dtype=dtype, param_dtype=param_dtype)
    unit = functools.partial(ResidualUnit, conv=conv, norm=norm)
    width = int(64 * width_factor)
    x = conv(width, (7, 7), strides=(2, 2), name="conv_root")(x)
    x = nn.relu(norm(name="gn_root")(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="SAME")
    for stage, depth in enumerate(num_layers):
        x = ResNetStage(
            depth,
            width * 2**stage,
            first_stride=(2, 2) if stage else (1, 1),
            unit=unit,
            name=f"block{stage + 1}",
        )(x)
    return x
