"""The published model zoo: named configs (reference field names) and `get_model`.

A model is described by an `ml_collections.ConfigDict` with the field names of the reference
`vit_jax` configs (`patches.size`, `hidden_size`, `transformer.*`, `resnet.*`, `classifier`,
`representation_size`; Mixer: `hidden_dim`, `num_blocks`, `tokens_mlp_dim`, `channels_mlp_dim`)
plus this project's further fields with defaults (`posemb`, `dtype`, `scan`, ...).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vit_jax.models.mixer import MlpMixer
from vit_jax.models.vit import VisionTransformer

ConfigLike = ml_collections.ConfigDict | Mapping[str, Any]

# Fields shared by every model kind, with their defaults.
_COMMON = dict(
    name="",
    model_type="ViT",
    gelu_approximate=True,  # tanh GELU, as the published checkpoints were trained
    layernorm_epsilon=1e-6,  # HF transformers' ViT uses 1e-12
    head_bias_init=0.0,
    scan=False,  # nn.scan over the blocks: one compiled block, a stacked parameter layout
    remat=False,
    remat_policy="nothing_saveable",
    dtype="float32",  # compute dtype, e.g. "bfloat16"
    param_dtype="float32",
)

_VIT = dict(
    _COMMON,
    patches=dict(size=None),
    hidden_size=None,
    transformer=dict(
        mlp_dim=None,
        num_heads=None,
        num_layers=None,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        stochastic_depth_rate=0.0,
        layer_scale_init=None,  # a float: per-channel residual scales (LayerScale) at this value
    ),
    resnet=None,  # or {num_layers: (3, 4, 9), width_factor: 1}
    classifier="token",  # token | gap | map | unpooled | token_unpooled
    representation_size=None,
    posemb="learn",  # learn | sincos2d | none
    distillation_token=False,  # DeiT: a second token `dist` with its own head `head_dist`
    attention_implementation=None,  # None | "xla" | "cudnn" (jax.nn.dot_product_attention)
)

_MIXER = dict(
    _COMMON,
    model_type="Mixer",
    patches=dict(size=None),
    hidden_dim=None,
    num_blocks=None,
    tokens_mlp_dim=None,
    channels_mlp_dim=None,
)

_RESNET = dict(num_layers=None, width_factor=1)


def _vit(name, patch, hidden, mlp, heads, layers, **extra):
    return dict(
        name=name,
        patches=dict(size=(patch, patch)),
        hidden_size=hidden,
        transformer=dict(mlp_dim=mlp, num_heads=heads, num_layers=layers),
        **extra,
    )


def _hybrid(base, name, patch, num_layers):
    return dict(
        base,
        name=name,
        patches=dict(size=(patch, patch)),
        resnet=dict(num_layers=num_layers, width_factor=1),
    )


def _mixer(name, patch, hidden, blocks, tokens, channels):
    return dict(
        name=name,
        model_type="Mixer",
        patches=dict(size=(patch, patch)),
        hidden_dim=hidden,
        num_blocks=blocks,
        tokens_mlp_dim=tokens,
        channels_mlp_dim=channels,
    )


_TI = dict(hidden=192, mlp=768, heads=3, layers=12)
_S = dict(hidden=384, mlp=1536, heads=6, layers=12)
_B = dict(hidden=768, mlp=3072, heads=12, layers=12)
_L = dict(hidden=1024, mlp=4096, heads=16, layers=24)
_H = dict(hidden=1280, mlp=5120, heads=16, layers=32)

MODEL_CONFIGS: dict[str, dict[str, Any]] = {}
for _size, _dims in (("Ti", _TI), ("S", _S), ("B", _B), ("L", _L), ("H", _H)):
    for _patch in (8, 14, 16, 32):
        _name = f"ViT-{_size}_{_patch}"
        if _name in (
            "ViT-Ti_16",
            "ViT-S_16",
            "ViT-B_16",
            "ViT-L_16",
            "ViT-H_14",
            "ViT-B_8",
            "ViT-S_32",
            "ViT-B_32",
            "ViT-L_32",
        ):
            MODEL_CONFIGS[_name] = _vit(_name, _patch, **_dims)
for _name in ("ViT-S_16", "ViT-B_16", "ViT-S_32", "ViT-B_32"):
    MODEL_CONFIGS[f"{_name}-gap-norep"] = dict(
        MODEL_CONFIGS[_name], name=f"{_name}-gap-norep", classifier="gap"
    )
MODEL_CONFIGS["R+ViT-Ti_16"] = _hybrid(MODEL_CONFIGS["ViT-Ti_16"], "R+ViT-Ti_16", 8, ())
MODEL_CONFIGS["R26+ViT-S_32"] = _hybrid(MODEL_CONFIGS["ViT-S_32"], "R26+ViT-S_32", 1, (2, 2, 2, 2))
MODEL_CONFIGS["R50+ViT-B_16"] = _hybrid(MODEL_CONFIGS["ViT-B_16"], "R50+ViT-B_16", 1, (3, 4, 9))
MODEL_CONFIGS["R50+ViT-L_32"] = _hybrid(MODEL_CONFIGS["ViT-L_32"], "R50+ViT-L_32", 1, (3, 4, 6, 3))
MODEL_CONFIGS["Mixer-B_16"] = _mixer("Mixer-B_16", 16, 768, 12, 384, 3072)
MODEL_CONFIGS["Mixer-B_32"] = _mixer("Mixer-B_32", 32, 768, 12, 384, 3072)
MODEL_CONFIGS["Mixer-L_16"] = _mixer("Mixer-L_16", 16, 1024, 24, 512, 4096)

# AugReg ("How to train your ViT") short names -> zoo names.
AUGREG_NAMES = {
    "Ti_16": "ViT-Ti_16",
    "S_16": "ViT-S_16",
    "B_16": "ViT-B_16",
    "L_16": "ViT-L_16",
    "S_32": "ViT-S_32",
    "B_32": "ViT-B_32",
    "R_Ti_16": "R+ViT-Ti_16",
    "R26_S_32": "R26+ViT-S_32",
    "R50_L_32": "R50+ViT-L_32",
}

DEFAULT_RESOLUTION = 224


def list_models() -> list[str]:
    """All zoo names (the AugReg short names resolve to these)."""
    return list(MODEL_CONFIGS)


def _merge(base: ml_collections.ConfigDict, update: Mapping[str, Any], where: str) -> None:
    """Recursively writes `update` into `base`; unknown fields are an error naming them."""
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in base:
            valid = ", ".join(sorted(base.keys()))
            close = difflib.get_close_matches(key, list(base.keys()), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown model config field {path!r}.{hint} Valid fields: {valid}")
        current = base[key]
        if isinstance(value, Mapping) and value is not None:
            if current is None:
                template = _RESNET if key == "resnet" else {}
                base[key] = ml_collections.ConfigDict(dict(template))
                current = base[key]
            if isinstance(current, ml_collections.ConfigDict):
                _merge(current, value, f"{path}.")
                continue
        if isinstance(value, list):
            value = tuple(value)
        with base.ignore_type():
            base[key] = value


def get_config(name_or_config: str | ConfigLike, **overrides: Any) -> ml_collections.ConfigDict:
    """The complete model config for a zoo name (or AugReg short name) or a partial config.

    Missing fields take their defaults; unknown fields are an error. `overrides` are applied last,
    nested mappings merging into nested fields (`transformer={"num_layers": 2}`).
    """
    if isinstance(name_or_config, str):
        name = AUGREG_NAMES.get(name_or_config, name_or_config)
        if name not in MODEL_CONFIGS:
            options = list(MODEL_CONFIGS) + list(AUGREG_NAMES)
            close = difflib.get_close_matches(name_or_config, options, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"unknown model name {name_or_config!r}.{hint} "
                f"Known: {', '.join(MODEL_CONFIGS)} (and AugReg names {', '.join(AUGREG_NAMES)})"
            )
        spec: Mapping[str, Any] = MODEL_CONFIGS[name]
    elif isinstance(name_or_config, ml_collections.ConfigDict):
        spec = name_or_config.to_dict()
    elif isinstance(name_or_config, Mapping):
        spec = name_or_config
    else:
        raise TypeError(f"expected a model name or config, got {type(name_or_config).__name__}")
    model_type = spec.get("model_type", "ViT")
    if model_type not in ("ViT", "Mixer"):
        raise ValueError(f"model_type must be 'ViT' or 'Mixer', got {model_type!r}")
    config = ml_collections.ConfigDict(_MIXER if model_type == "Mixer" else _VIT)
    _merge(config, spec, "")
    _merge(config, overrides, "")
    _check_required(config, "")
    return config


def _check_required(config: ml_collections.ConfigDict, where: str) -> None:
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            _check_required(value, f"{where}{key}.")
        elif value is None and key not in (
            "resnet",
            "representation_size",
            "attention_implementation",
            "layer_scale_init",
        ):
            raise ValueError(f"model config field {where}{key!r} must be set")


def _pair(value: Any, field: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if len(value) != 2:
        raise ValueError(f"{field} must be an int or a pair (h, w), got {value!r}")
    return (int(value[0]), int(value[1]))


def get_model(
    name_or_config: str | ConfigLike, *, num_classes: int | None, **overrides: Any
) -> nn.Module:
    """A Flax module for a zoo name, AugReg short name or config (see `get_config`).

    `num_classes=None` (or 0) builds a feature extractor without a head. Call it as
    `logits, out = model.apply({'params': params}, images, train=False)` with NHWC images in
    [-1, 1].
    """
    c = get_config(name_or_config, **overrides)
    common = dict(
        num_classes=num_classes,
        patch_size=_pair(c.patches.size, "patches.size"),
        gelu_approximate=bool(c.gelu_approximate),
        layernorm_epsilon=float(c.layernorm_epsilon),
        head_bias_init=float(c.head_bias_init),
        scan=bool(c.scan),
        remat=bool(c.remat),
        remat_policy=c.remat_policy,
        dtype=jnp.dtype(c.dtype),
        param_dtype=jnp.dtype(c.param_dtype),
    )
    if c.model_type == "Mixer":
        return MlpMixer(
            hidden_dim=c.hidden_dim,
            num_blocks=c.num_blocks,
            tokens_mlp_dim=c.tokens_mlp_dim,
            channels_mlp_dim=c.channels_mlp_dim,
            **common,
        )
    t = c.transformer
    return VisionTransformer(
        hidden_size=c.hidden_size,
        mlp_dim=t.mlp_dim,
        num_heads=t.num_heads,
        num_layers=t.num_layers,
        dropout_rate=float(t.dropout_rate),
        attention_dropout_rate=float(t.attention_dropout_rate),
        stochastic_depth_rate=float(t.stochastic_depth_rate),
        layer_scale_init=None if t.layer_scale_init is None else float(t.layer_scale_init),
        resnet_num_layers=None if c.resnet is None else tuple(c.resnet.num_layers),
        resnet_width_factor=1.0 if c.resnet is None else float(c.resnet.width_factor),
        classifier=c.classifier,
        representation_size=c.representation_size,
        posemb=c.posemb,
        distillation_token=bool(c.distillation_token),
        attention_implementation=c.attention_implementation,
        **common,
    )


def init_shapes(model: nn.Module, image_size: int | tuple[int, int] = DEFAULT_RESOLUTION):
    """Parameter shapes/dtypes (`jax.ShapeDtypeStruct` tree) without allocating anything."""
    h, w = _pair(image_size, "image_size")
    images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    return variables["params"]


def count_params(
    model_or_name: nn.Module | str,
    *,
    num_classes: int = 1000,
    image_size: int | tuple[int, int] = DEFAULT_RESOLUTION,
) -> int:
    """Number of parameters at `image_size` (position embeddings depend on it)."""
    model = model_or_name
    if isinstance(model_or_name, str):
        model = get_model(model_or_name, num_classes=num_classes)
    return sum(int(x.size) for x in jax.tree.leaves(init_shapes(model, image_size)))
