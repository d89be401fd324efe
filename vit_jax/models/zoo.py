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

from vit_jax.models import families
from vit_jax.models.family import Family, LogicalAxes, pair

ConfigLike = ml_collections.ConfigDict | Mapping[str, Any]

__all__ = [
    "AUGREG_NAMES",
    "DEFAULT_RESOLUTION",
    "MODEL_CONFIGS",
    "count_params",
    "get_config",
    "get_family",
    "get_model",
    "init_shapes",
    "list_models",
    "logical_axes",
    "no_decay_patterns",
    "num_posemb_prefix_tokens",
    "num_prefix_tokens",
    "position_table_grid",
    "scan_block",
    "stored_config",
    "stride",
    "token_grid",
]


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

_SIGLIP = {  # SigLIP image towers (big_vision / HF SiglipVisionModel): no class token, MAP head
    "B_16": dict(patch=16, hidden=768, mlp=3072, heads=12, layers=12),
    "L_16": dict(patch=16, hidden=1024, mlp=4096, heads=16, layers=24),
    "So400m_14": dict(patch=14, hidden=1152, mlp=4304, heads=16, layers=27),
}
for _size, _res in (
    ("B_16", 224), ("B_16", 256), ("B_16", 384), ("B_16", 512),
    ("L_16", 256), ("L_16", 384), ("So400m_14", 224), ("So400m_14", 384),
):  # fmt: skip
    _name = f"SigLIP-{_size}-{_res}"
    _dims = _SIGLIP[_size]
    MODEL_CONFIGS[_name] = _vit(
        _name,
        **_dims,
        classifier="map",
        posemb_grid=(_res // _dims["patch"],) * 2,
        posemb_resample="bicubic",  # transformers SiglipVisionEmbeddings
        gelu_approximate=True,
        layernorm_epsilon=1e-6,
    )
_DINOV2 = {  # DINOv2 (HF Dinov2Model / Dinov2WithRegistersModel): 518 px, patch 14
    "S": dict(hidden=384, mlp=1536, heads=6, layers=12),
    "B": dict(hidden=768, mlp=3072, heads=12, layers=12),
    "L": dict(hidden=1024, mlp=4096, heads=16, layers=24),
    "g": dict(hidden=1536, mlp=4096, heads=24, layers=40),  # SwiGLU: 4096 after the gate
}
for _size, _dims in _DINOV2.items():
    for _registers in (0, 4):
        _name = f"DINOv2-{_size}_14" + (f"-reg{_registers}" if _registers else "")
        _config = _vit(
            _name,
            14,
            **_dims,
            classifier="token",
            posemb_grid=(37, 37),
            gelu_approximate=False,
            layernorm_epsilon=1e-6,
            num_registers=_registers,
            # transformers Dinov2Model: bicubic; Dinov2WithRegistersModel: antialiased
            posemb_resample="bicubic_antialias" if _registers else "bicubic",
        )
        _config["transformer"].update(
            layer_scale_init=1e-5, mlp_type="swiglu" if _size == "g" else "gelu"
        )
        MODEL_CONFIGS[_name] = _config
for _size, _dims in (("S", _S), ("B", _B), ("L", _L)):  # DeiT-III (timm deit3_*_patch16_224)
    _name = f"DeiT3-{_size}_16"
    MODEL_CONFIGS[_name] = _vit(
        _name,
        16,
        **_dims,
        posemb_grid=(14, 14),
        posemb_covers_prefix=False,  # timm no_embed_class: cls has no position row
        posemb_resample="bicubic_antialias",  # timm's resample_abs_pos_embed default
        gelu_approximate=False,
        layernorm_epsilon=1e-6,
    )
    MODEL_CONFIGS[_name]["transformer"]["layer_scale_init"] = 1e-6

# DINOv3 (HF DINOv3ViTModel; the published hyper-parameters of facebookresearch/dinov3
# `dinov3/hub/backbones.py`, as transformers' `convert_dinov3_vit_to_hf.py` converts them):
# patch 16, 4 registers, RoPE (theta 100, `separate` coordinates, trained with rescale 2),
# LayerScale (init 1e-5), exact GELU, LayerNorm 1e-5, no key bias (`mask_k_bias`); S+ / H+ /
# 7B have a SwiGLU MLP (`mlp_dim`: the width after the gate, transformers'
# `intermediate_size`: 2/3 of D x ffn_ratio, a multiple of 8 (7B: 64)); 7B has no q/k/v biases.
_DINOV3 = {
    "S": dict(hidden=384, mlp=1536, heads=6, layers=12),
    "S+": dict(hidden=384, mlp=1536, heads=6, layers=12),  # SwiGLU, ffn_ratio 6
    "B": dict(hidden=768, mlp=3072, heads=12, layers=12),
    "L": dict(hidden=1024, mlp=4096, heads=16, layers=24),
    "H+": dict(hidden=1280, mlp=5120, heads=20, layers=32),  # SwiGLU, ffn_ratio 6
    "7B": dict(hidden=4096, mlp=8192, heads=32, layers=40),  # SwiGLU, ffn_ratio 3
}
for _size, _dims in _DINOV3.items():
    _name = f"DINOv3-{_size}_16"
    _config = _vit(
        _name,
        16,
        **_dims,
        classifier="token",
        posemb="rope",
        rope_train_rescale=2.0,
        num_registers=4,
        gelu_approximate=False,
        layernorm_epsilon=1e-5,
    )
    _config["transformer"].update(
        layer_scale_init=1e-5,
        mlp_type="swiglu" if _size in ("S+", "H+", "7B") else "gelu",
        key_bias=False,
    )
    if _size == "7B":
        _config["transformer"].update(query_bias=False, value_bias=False)
    MODEL_CONFIGS[_name] = _config

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


def _merge(
    base: ml_collections.ConfigDict,
    update: Mapping[str, Any],
    where: str,
    templates: Mapping[str, Mapping[str, Any]],
) -> None:
    """Recursively writes `update` into `base`; unknown fields are an error naming them.

    A nested field that is None (a hybrid's `resnet`) starts from its template when set.
    """
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
                base[key] = ml_collections.ConfigDict(dict(templates.get(key, {})))
                current = base[key]
            if isinstance(current, ml_collections.ConfigDict):
                _merge(current, value, f"{path}.", templates)
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
    family = families.get_family(overrides.get("model_type", spec.get("model_type", "ViT")))
    config = ml_collections.ConfigDict(dict(family.defaults))
    _merge(config, _renamed_fields(spec), "", family.templates)
    _merge(config, overrides, "", family.templates)
    _check_required(config, "", family.optional)
    _typed_nones(config, family.optional_types)
    return config


def _renamed_fields(spec: Mapping[str, Any]) -> Mapping[str, Any]:
    """`spec` with the fields of older vit_jax versions in today's terms.

    `posemb_antialias` (before `posemb_resample`) described the on-the-fly resampling of a
    `posemb_grid` table (torch's bicubic, antialiased or not); without a fixed grid the table
    was resampled at load time by the reference's scipy order 1, which stays the default.
    """
    if "posemb_antialias" not in spec:
        return spec
    spec = dict(spec)
    antialias = spec.pop("posemb_antialias")
    if "posemb_resample" not in spec:
        if antialias:
            spec["posemb_resample"] = "bicubic_antialias"
        elif spec.get("posemb_grid") is not None:
            spec["posemb_resample"] = "bicubic"
    return spec


def stored_config(record: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The model config of a stored record (an `.npz` sidecar, a run's checkpoint meta or
    `config.json`), written by this or any earlier vit_jax: a field the record lacks takes the
    value that reproduces what the writing version computed, where today's default differs.

    `posemb_sincos2d_variant` absent from a `sincos2d` model means `mocov3` (the table vit_jax
    used before the field). Every reader of stored configs goes through here, once.
    """
    spec = dict(record.to_dict() if isinstance(record, ml_collections.ConfigDict) else record)
    if spec.get("posemb") == "sincos2d" and "posemb_sincos2d_variant" not in spec:
        spec["posemb_sincos2d_variant"] = "mocov3"
    return get_config(spec)


def _typed_nones(config: ml_collections.ConfigDict, types: Mapping[str, type]) -> None:
    """Optional fields left None become typed placeholders (still None), so command-line
    overrides (`--config.model.transformer.layer_scale_init=1e-5`) can set them. Replace a model
    config by assignment (`config.model = get_config(...)`): ml_collections' `update` cannot
    merge one placeholder into another."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            _typed_nones(value, types)
        elif value is None and key in types:
            config[key] = ml_collections.config_dict.placeholder(types[key])


def _check_required(config: ml_collections.ConfigDict, where: str, optional: frozenset) -> None:
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            _check_required(value, f"{where}{key}.", optional)
        elif value is None and key not in optional:
            raise ValueError(f"model config field {where}{key!r} must be set")


def get_family(config: str | ConfigLike) -> Family:
    """The family (`vit_jax.models.family.Family`) of a zoo name or config."""
    return families.get_family(get_config(config).model_type)


def stride(config: str | ConfigLike) -> tuple[int, int]:
    """Input pixels per token along (height, width) (hybrids: times the stem's downsampling)."""
    c = get_config(config)
    return families.get_family(c.model_type).stride(c)


def num_prefix_tokens(config: str | ConfigLike) -> int:
    """Tokens before the patch tokens in the sequence: class (+ DeiT distillation) token and
    register tokens; 0 for gap/map/Mixer (what visualize and the probe skip)."""
    c = get_config(config)
    return families.get_family(c.model_type).num_prefix_tokens(c)


def num_posemb_prefix_tokens(config: str | ConfigLike) -> int:
    """Rows of the position table before the grid: class (+ distillation) token when the table
    covers them; never the registers (what fitting / converting a position table needs)."""
    c = get_config(config)
    return families.get_family(c.model_type).posemb_prefix_tokens(c)


def token_grid(config: str | ConfigLike, image_size: int | tuple[int, int]) -> tuple[int, int]:
    """(grid_h, grid_w) of patch tokens at `image_size`; an error naming it when not divisible."""
    c = get_config(config)
    return families.get_family(c.model_type).token_grid(c, image_size)


def position_table_grid(
    config: str | ConfigLike, image_size: int | tuple[int, int]
) -> tuple[int, int]:
    """The grid of the learned position table a model of `config` stores for `image_size`:
    its fixed `posemb_grid` when set (other inputs resample it on the fly), else `token_grid`."""
    c = get_config(config)
    fixed = c.get("posemb_grid")
    if fixed is not None:
        return pair(fixed, "posemb_grid")
    return token_grid(c, image_size)


def scan_block(config: str | ConfigLike) -> str:
    """Name of the scanned block (`encoderblock`, `MixerBlock`); per-layer: `{name}_{i}`."""
    return get_family(config).scan_block


def no_decay_patterns(config: str | ConfigLike) -> list[str]:
    """Regexes over '/'-joined parameter paths that take no weight decay (for the optimizer)."""
    return list(get_family(config).no_decay)


def logical_axes(config: str | ConfigLike) -> LogicalAxes:
    """(path regex, logical axis names) sharding rules of the config's family."""
    return get_family(config).logical_axes


def get_model(
    name_or_config: str | ConfigLike, *, num_classes: int | None, **overrides: Any
) -> nn.Module:
    """A Flax module for a zoo name, AugReg short name or config (see `get_config`).

    `num_classes=None` (or 0) builds a feature extractor without a head. Call it as
    `logits, out = model.apply({'params': params}, images, train=False)` with NHWC images in
    [-1, 1].
    """
    c = get_config(name_or_config, **overrides)
    return families.get_family(c.model_type).build(c, num_classes)


def init_shapes(model: nn.Module, image_size: int | tuple[int, int] = DEFAULT_RESOLUTION):
    """Parameter shapes/dtypes (`jax.ShapeDtypeStruct` tree) without allocating anything."""
    h, w = pair(image_size, "image_size")
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
