"""Hugging Face transformers models <-> our ViT: the one entry (`from_hf`, `to_hf`).

`from_hf` dispatches on `config.json`'s `model_type`: 'vit' and 'deit' here, 'siglip' /
'siglip_vision_model' in `hf_siglip`, 'dinov2' / 'dinov2_with_registers' in `hf_dinov2`;
`to_hf` on the model (`hf_model_type`). The directory itself is `hf_common`'s.

ViT (`ViTModel`, `ViTForImageClassification`) and DeiT (`DeiTModel`,
`DeiTForImageClassificationWithTeacher`: `embeddings.distillation_token` is our `dist`,
`cls_classifier` / `distillation_classifier` our `head` / `head_dist`). Reading accepts the hub
key names (`vit.encoder.layer.{i}.attention.attention.query`, ...), the transformers-5
in-memory names (`vit.layers.{i}.attention.q_proj`, `...mlp.fc1`) and `ViTModel` files without
the `vit.` prefix (DeiT: `deit.`); writing uses the hub names, which transformers 4 and 5 both
load.

The key mapping is `TABLE` below (one row per parameter, run both ways by
`vit_jax.weights.table`); `pooler.dense` (+ tanh) is our `pre_logits`. `ViTModel` has no
LayerScale: such models are refused. `DeiTForImageClassification` (a head on the class token
only) is refused by its `classifier.weight`.
HF ViT classifies from the class token (classifier 'token'); `hidden_act` 'gelu' is exact GELU,
'gelu_pytorch_tanh' / 'gelu_new' the tanh approximation of the published JAX models.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from vit_jax import models
from vit_jax.weights import hf_common, hf_dinov2, hf_siglip, npz, options
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import (
    LAYER_SCALE_KEY,
    Converted,
    VitFacts,
    class_names_for,
    native_posemb,
    uses_layer_scale,
    vit_facts,
)
from vit_jax.weights.hf_common import CONFIG, WEIGHTS, read_files, shard_files
from vit_jax.weights.table import (
    CONV,
    DENSE,
    IDENTITY,
    Row,
    Table,
)
from vit_jax.weights.tree import flatten, unflatten

__all__ = [
    "CONFIG",
    "TABLE",
    "WEIGHTS",
    "from_hf",
    "hf_model_type",
    "read_dir",
    "shard_files",
    "to_hf",
]


# transformers 5 in-memory names -> hub names (applied after removing a leading `vit.` / `deit.`).
_V5_NAMES = (
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)
# model_type -> the backbone's prefix in classifier checkpoints
_PREFIX = {"vit": "vit.", "deit": "deit."}


def _hub_name(key: str, prefix: str = "vit.") -> str:
    key = key.removeprefix(prefix)
    for pattern, replacement in _V5_NAMES:
        key = pattern.sub(replacement, key)
    return key


def read_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, state dict with hub names without `vit.` / `deit.`) of a ViT or
    DeiT model directory (transformers 5 in-memory names are renamed to the hub's)."""
    config, raw = read_files(path)
    return config, _hub_state(path, config, raw)


def _hub_state(path: Any, config: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    prefix = _PREFIX.get(config.get("model_type"), "vit.")
    state: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        name = _hub_name(key, prefix)
        if name in state:
            raise ConversionError(f"{path}: {key!r} and another key both mean {name!r}")
        state[name] = value
    return state


_L, _E = hf_common.BLOCK, hf_common.LAYER


# Hub names without `vit.` / `deit.`; `to_hf` adds the prefix when the model has a classifier.
TABLE = Table(
    rows=(
        Row("cls", "embeddings.cls_token", IDENTITY, "1 1 D"),
        Row("dist", "embeddings.distillation_token", IDENTITY, "1 1 D", when="distillation"),
        Row(npz.POSEMB_KEY, "embeddings.position_embeddings", IDENTITY, "1 T D"),
        Row("embedding/kernel", "embeddings.patch_embeddings.projection.weight", CONV, "ph pw 3 D"),
        Row("embedding/bias", "embeddings.patch_embeddings.projection.bias", IDENTITY, "D"),
        Row("Transformer/encoder_norm/scale", "layernorm.weight", IDENTITY, "D"),
        Row("Transformer/encoder_norm/bias", "layernorm.bias", IDENTITY, "D"),
        Row("pre_logits/kernel", "pooler.dense.weight", DENSE, "D R", when="representation"),
        Row("pre_logits/bias", "pooler.dense.bias", IDENTITY, "R", when="representation"),
        Row("head/kernel", "classifier.weight", DENSE, "D N", when="head"),
        Row("head/bias", "classifier.bias", IDENTITY, "N", when="head"),
        # DeiTForImageClassificationWithTeacher: one head on each of cls and dist
        Row("head/kernel", "cls_classifier.weight", DENSE, "D N", when="deit_heads"),
        Row("head/bias", "cls_classifier.bias", IDENTITY, "N", when="deit_heads"),
        Row("head_dist/kernel", "distillation_classifier.weight", DENSE, "D N", when="deit_heads"),
        Row("head_dist/bias", "distillation_classifier.bias", IDENTITY, "N", when="deit_heads"),
    ),
    block=(
        Row(f"{_L}LayerNorm_0/scale", f"{_E}layernorm_before.weight", IDENTITY, "D"),
        Row(f"{_L}LayerNorm_0/bias", f"{_E}layernorm_before.bias", IDENTITY, "D"),
        Row(f"{_L}LayerNorm_2/scale", f"{_E}layernorm_after.weight", IDENTITY, "D"),
        Row(f"{_L}LayerNorm_2/bias", f"{_E}layernorm_after.bias", IDENTITY, "D"),
        *hf_common.attention_rows(),
        Row(f"{_L}MlpBlock_3/Dense_0/kernel", f"{_E}intermediate.dense.weight", DENSE, "D M"),
        Row(f"{_L}MlpBlock_3/Dense_0/bias", f"{_E}intermediate.dense.bias", IDENTITY, "M"),
        Row(f"{_L}MlpBlock_3/Dense_1/kernel", f"{_E}output.dense.weight", DENSE, "M D"),
        Row(f"{_L}MlpBlock_3/Dense_1/bias", f"{_E}output.dense.bias", IDENTITY, "D"),
    ),
)
_VIT_TYPES = ("vit", "deit")


def _read_config(path: Any, config: Mapping[str, Any], state: Mapping[str, Any]) -> dict:
    """The table's dims and features plus our model-config fields, from a ViT / DeiT
    `config.json` and the keys present (the classifier kind, the pooler)."""
    deit = config.get("model_type") == "deit"
    d, heads = hf_common.check_channels_and_heads(path, config)
    ph, pw = pt.pair(config.get("patch_size", 16), "patch_size")
    h, w = pt.pair(config.get("image_size", 224), "image_size")
    dims = dict(D=d, H=heads, hd=d // heads, M=int(config["intermediate_size"]), ph=ph, pw=pw)
    dims["T"] = (h // ph) * (w // pw) + 1 + deit
    features = {"distillation"} if deit else set()
    ignore = {"the masked-image-modeling mask token": ["embeddings.mask_token"]}
    if "pooler.dense.weight" in state:
        if config.get("pooler_act", "tanh") != "tanh":
            raise ConversionError(f"{path}: pooler_act {config['pooler_act']!r}, expected 'tanh'")
        features.add("representation")
        dims["R"] = int(state["pooler.dense.weight"].shape[0])
    head = "cls_classifier" if deit else "classifier"
    if deit and "classifier.weight" in state:
        raise ConversionError(
            f"{path}: classifier.weight: DeiTForImageClassification classifies from the class "
            "token alone, which our DeiT (heads on cls and dist, averaged) cannot express; "
            "DeiTModel and DeiTForImageClassificationWithTeacher convert"
        )
    if f"{head}.weight" in state:
        features.add("deit_heads" if deit else "head")
        dims["N"] = int(state[f"{head}.weight"].shape[0])
        if "representation" in features:  # the classifiers never apply the pooler
            features.discard("representation")
            ignore["unused by the classifier"] = ["pooler.dense.weight", "pooler.dense.bias"]
    qkv_bias = bool(config.get("qkv_bias", True))
    features.update(["qkv_bias"] if qkv_bias else [])
    return dict(
        dims=dims,
        features=features,
        zeros=() if qkv_bias else ("qkv_bias",),
        ignore=ignore,
        layers=int(config["num_hidden_layers"]),
        image_size=(h, w),
        gelu_approximate=hf_common.gelu_approximate(path, config, "gelu"),
        deit=deit,
    )


def from_hf(path: str | os.PathLike) -> Converted:
    """Our parameters, model config, class names and image size from a transformers model
    directory: ViT, DeiT, SigLIP (vision tower) or DINOv2 (with registers), by `model_type`."""
    config, raw = hf_common.read_files(path)
    model_type = config.get("model_type")
    if model_type in hf_siglip.MODEL_TYPES:
        return hf_siglip.from_state(path, config, raw)
    if model_type in hf_dinov2.MODEL_TYPES:
        return hf_dinov2.from_state(path, config, raw)
    if model_type not in _VIT_TYPES:
        supported = (*_VIT_TYPES, *hf_siglip.MODEL_TYPES, *hf_dinov2.MODEL_TYPES)
        raise ConversionError(
            f"{path}: model_type {model_type!r}; supported: {', '.join(map(repr, supported))}"
        )
    state = _hub_state(path, config, raw)
    f = _read_config(path, config, state)
    keys = TABLE.at(layers=f["layers"], dims=f["dims"], features=f["features"], zeros=f["zeros"])
    kind = "DeiT" if f["deit"] else "ViT"
    what = f"a transformers {kind} of this config.json"
    flat = keys.to_ours(state, source=str(path), what=what, ignore=f["ignore"])
    dims = f["dims"]
    model_config = models.get_config(
        dict(
            name=str(config.get("_name_or_path") or epath.Path(path).name),
            patches=dict(size=(dims["ph"], dims["pw"])),
            hidden_size=dims["D"],
            transformer=dict(
                mlp_dim=dims["M"],
                num_heads=dims["H"],
                num_layers=f["layers"],
                dropout_rate=float(config.get("hidden_dropout_prob", 0.0)),
                attention_dropout_rate=float(config.get("attention_probs_dropout_prob", 0.0)),
            ),
            classifier="token",
            distillation_token=f["deit"],
            representation_size=dims["R"] if "representation" in f["features"] else None,
            gelu_approximate=f["gelu_approximate"],
            layernorm_epsilon=float(config.get("layer_norm_eps", 1e-12)),
            # transformers ViT / DeiT interpolate_pos_encoding: bicubic, no antialiasing
            **native_posemb(f["image_size"], (dims["ph"], dims["pw"]), "bicubic"),
        )
    )
    params = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    names = hf_common.class_names(config, dims.get("N"))
    return Converted(params, model_config, names, f["image_size"])


def hf_model_type(model_config: Any, params: Mapping[str, Any]) -> str:
    """The transformers `model_type` that expresses one of our ViTs: 'siglip_vision_model'
    (MAP pooling), 'dinov2' / 'dinov2_with_registers' (LayerScale or registers, no classifier
    head: DINOv2 models are feature extractors), 'deit' (a distillation token), else 'vit'."""
    config = models.get_config(model_config)
    flat = flatten(models.unstack_layers(params))
    if config.get("classifier") == "map":
        return "siglip_vision_model"
    dinov2 = uses_layer_scale(config) or LAYER_SCALE_KEY in flat or options.num_registers(config)
    if dinov2 and "head/kernel" not in flat and not config.get("distillation_token"):
        return "dinov2_with_registers" if options.num_registers(config) else "dinov2"
    return "deit" if config.get("distillation_token") else "vit"


def to_hf(
    params: Mapping[str, Any],
    model_config: Any,
    path: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
    source: str = "params",
    model_type: str | None = None,
    normalization: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes a transformers model directory (config.json + model.safetensors, hub key names).

    `model_type` (default: `hf_model_type`) picks the transformers family: 'vit' (with a head
    `ViTForImageClassification`, else `ViTModel`, whose pooler is our `pre_logits`), 'deit'
    (`DeiTForImageClassificationWithTeacher` / `DeiTModel`), 'siglip_vision_model'
    (`SiglipVisionModel`) or 'dinov2' / 'dinov2_with_registers'. `image_size` defaults to the
    square grid of the position embeddings. What the family cannot express is an error naming it.
    `preprocessor_config.json` records `normalization` (default [-1, 1]). The folder appears
    whole or not at all; an existing one is refused unless `overwrite` (`hf_common.write_dir`).
    """
    model_type = model_type or hf_model_type(model_config, params)
    written = dict(normalization=normalization, image_size=image_size, overwrite=overwrite)
    args = dict(class_names=class_names, source=source, **written)
    if model_type in hf_siglip.MODEL_TYPES:
        return hf_siglip.to_dir(params, model_config, path, **args)
    if model_type in hf_dinov2.MODEL_TYPES:
        return hf_dinov2.to_dir(params, model_config, path, **args)
    if model_type not in _VIT_TYPES:
        raise ConversionError(f"{path}: cannot write transformers model_type {model_type!r}")
    deit = model_type == "deit"
    f = vit_facts(
        params,
        model_config,
        image_size=image_size,
        target=f"transformers {'DeiT' if deit else 'ViT'}",
        classifiers=("token",),
        features_representation=True,
        distillation=deit,
        layer_scale=False,
    )
    options.check_options(f.config, f"transformers {'DeiT' if deit else 'ViT'}")
    if deit and not f.config.distillation_token:
        raise ConversionError(f"transformers DeiT needs a distillation token ({f.config.name})")
    names = class_names_for(f.num_classes, class_names)
    representation = f.config.get("representation_size")
    features = {"qkv_bias", *(["distillation"] if deit else [])}
    if f.num_classes:
        features.add("deit_heads" if deit else "head")
    features.update(["representation"] if representation else [])
    keys = TABLE.at(layers=f.layers, dims={**f.dims, "R": representation or 0}, features=features)
    state = keys.to_theirs(f.flat, source=source, what=f"a {f.config.name or 'ViT'} of this config")
    if f.num_classes:  # the classifier classes: the backbone under `vit.` / `deit.`
        prefix = _PREFIX[model_type]
        state = {k if "classifier." in k else f"{prefix}{k}": v for k, v in state.items()}
    return hf_common.write_dir(state, _hf_config(f, names, model_type), path, **written)


def _hf_config(f: VitFacts, names: list[str] | None, model_type: str) -> dict[str, Any]:
    """The transformers `config.json` of the ViT / DeiT model `f` describes."""
    t, (ph, pw), d = f.config.transformer, f.patch, f.hidden
    classes = {
        "vit": ("ViTForImageClassification", "ViTModel"),
        "deit": ("DeiTForImageClassificationWithTeacher", "DeiTModel"),
    }[model_type]
    config = {
        "architectures": [classes[0] if f.num_classes else classes[1]],
        "model_type": model_type,
        "hidden_size": d,
        "num_hidden_layers": f.layers,
        "num_attention_heads": f.heads,
        "intermediate_size": f.mlp,
        "hidden_act": "gelu_pytorch_tanh" if f.config.gelu_approximate else "gelu",
        "hidden_dropout_prob": float(t.dropout_rate),
        "attention_probs_dropout_prob": float(t.attention_dropout_rate),
        "initializer_range": 0.02,
        "layer_norm_eps": float(f.config.layernorm_epsilon),
        "image_size": f.image_size[0] if f.image_size[0] == f.image_size[1] else list(f.image_size),
        "patch_size": ph if ph == pw else [ph, pw],
        "num_channels": 3,
        "qkv_bias": True,
        "encoder_stride": ph,
        "pooler_output_size": int(f.config.get("representation_size") or d),
        "pooler_act": "tanh",
        **hf_common.labels_config(names, f.num_classes),
        "dtype": "float32",
    }
    return config
