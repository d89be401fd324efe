"""Hugging Face transformers models <-> our ViT: the one entry (`from_hf`, `to_hf`).

`from_hf` dispatches on `config.json`'s `model_type`: 'vit' and 'deit' here, 'siglip' /
'siglip_vision_model' in `hf_siglip`, 'dinov2' / 'dinov2_with_registers' in `hf_dinov2`,
'dinov3_vit' in `hf_dinov3`;
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
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

from vit_jax import models
from vit_jax.weights import codec, hf_common, hf_dinov2, hf_dinov3, hf_siglip, npz, options
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import ConversionError
from vit_jax.weights.facts import Converted, VitFacts
from vit_jax.weights.hf_common import CONFIG, WEIGHTS, read_files, shard_files
from vit_jax.weights.options import Can
from vit_jax.weights.table import BLOCK, CONV, DENSE, IDENTITY, Row, Table, pair
from vit_jax.weights.tree import flatten

__all__ = [
    "CODECS",
    "CONFIG",
    "TABLE",
    "WEIGHTS",
    "from_hf",
    "hf_model_type",
    "read_dir",
    "shard_files",
    "to_hf",
]

# model_type -> the backbone's prefix in classifier checkpoints
_PREFIX = {"vit": "vit.", "deit": "deit."}
_L, _E = BLOCK, hf_common.LAYER


def read_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, state dict with hub names without `vit.` / `deit.`) of a ViT or
    DeiT model directory (transformers 5 in-memory names are renamed to the hub's)."""
    config, raw = read_files(path)
    return config, _hub_state(path, config, raw)


def _hub_state(path: Any, config: Mapping[str, Any], raw: Mapping[str, Any]) -> dict[str, Any]:
    model_type = config.get("model_type") if config.get("model_type") in _PREFIX else "vit"
    return hf_common.hub_state(path, raw, (_PREFIX[model_type],), model_type)


# Hub names without `vit.` / `deit.`; `to_hf` adds the prefix when the model has a classifier.
TABLE = Table(
    rows=(
        Row("cls", "embeddings.cls_token", IDENTITY, "1 1 D"),
        Row("dist", "embeddings.distillation_token", IDENTITY, "1 1 D", when="distillation"),
        Row(npz.POSEMB_KEY, "embeddings.position_embeddings", IDENTITY, "1 T D"),
        *pair("embedding", "embeddings.patch_embeddings.projection", CONV, "ph pw 3 D"),
        *pair("Transformer/encoder_norm", "layernorm"),
        *pair("pre_logits", "pooler.dense", DENSE, "D R", when="representation"),
        *pair("head", "classifier", DENSE, "D N", when="head"),
        # DeiTForImageClassificationWithTeacher: one head on each of cls and dist
        *pair("head", "cls_classifier", DENSE, "D N", when="deit_heads"),
        *pair("head_dist", "distillation_classifier", DENSE, "D N", when="deit_heads"),
    ),
    block=(
        *pair(f"{_L}LayerNorm_0", f"{_E}layernorm_before"),
        *pair(f"{_L}LayerNorm_2", f"{_E}layernorm_after"),
        *hf_common.attention_rows(),
        *pair(f"{_L}MlpBlock_3/Dense_0", f"{_E}intermediate.dense", DENSE, "D M"),
        *pair(f"{_L}MlpBlock_3/Dense_1", f"{_E}output.dense", DENSE, "M D"),
    ),
)

# What ViT / DeiT express of our options and the config.json key recording each: the pooler
# (`pooler.dense` + tanh, our `pre_logits`) in models without a classifier head; DeiT always
# has its distillation token.
_POOLER = Can(
    "representation",
    "representation",
    "pooler_output_size",
    lambda f: int(f.config.representation_size),
    alone=True,
)
_DISTILLATION = Can("distillation_token", "distillation", required=True)
_VIT_TYPES = ("vit", "deit")


def from_hf(path: str | os.PathLike) -> Converted:
    """Our parameters, model config, class names and image size from a transformers model
    directory: ViT, DeiT, SigLIP (vision tower) or DINOv2 (with registers), by `model_type`."""
    config, raw = hf_common.read_files(path)
    model_type = config.get("model_type")
    if model_type in hf_siglip.MODEL_TYPES:
        return hf_siglip.from_state(path, config, raw)
    if model_type in hf_dinov2.MODEL_TYPES:
        return hf_dinov2.from_state(path, config, raw)
    if model_type in hf_dinov3.MODEL_TYPES:
        return hf_dinov3.from_state(path, config, raw)
    if model_type not in _VIT_TYPES:
        supported = (
            *_VIT_TYPES,
            *hf_siglip.MODEL_TYPES,
            *hf_dinov2.MODEL_TYPES,
            *hf_dinov3.MODEL_TYPES,
        )
        raise ConversionError(
            f"{path}: model_type {model_type!r}; supported: {', '.join(map(repr, supported))}"
        )
    state = _hub_state(path, config, raw)
    parsed = _parse(path, config, state)
    c = CODECS[model_type]
    what = f"a {c.can.target} of this config.json"
    return codec.read(c, state, parsed, source=str(path), what=what)


def _parse(path: Any, config: Mapping[str, Any], state: Mapping[str, Any]) -> codec.Parsed:
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
    return codec.Parsed(
        name=str(config.get("_name_or_path") or epath.Path(path).name),
        layers=int(config["num_hidden_layers"]),
        dims=dims,
        features=features | ({"qkv_bias"} if qkv_bias else set()),
        zeros=() if qkv_bias else ("qkv_bias",),
        ignore=ignore,
        image_size=(h, w),
        resample="bicubic",  # transformers ViT / DeiT interpolate_pos_encoding: no antialiasing
        values=dict(representation=dims.get("R")),
        fields=dict(
            transformer=dict(
                dropout_rate=float(config.get("hidden_dropout_prob", 0.0)),
                attention_dropout_rate=float(config.get("attention_probs_dropout_prob", 0.0)),
            ),
            classifier="token",
            gelu_approximate=hf_common.gelu_approximate(path, config, "gelu"),
            layernorm_epsilon=float(config.get("layer_norm_eps", 1e-12)),
        ),
        class_names=hf_common.class_names(config, dims.get("N")),
    )


def hf_model_type(model_config: Any, params: Mapping[str, Any]) -> str:
    """The transformers `model_type` that expresses one of our ViTs: 'dinov3_vit' (RoPE),
    'siglip_vision_model' (MAP pooling), 'dinov2' / 'dinov2_with_registers' (LayerScale or
    registers, no classifier head: DINOv2 models are feature extractors), 'deit' (a
    distillation token), else 'vit'."""
    config = models.get_config(model_config)
    if config.get("posemb") == "rope":
        return hf_dinov3.MODEL_TYPES[0]
    flat = flatten(models.unstack_layers(params))
    if config.get("classifier") == "map":
        return "siglip_vision_model"
    dinov2 = options.layer_scale(config, flat) or options.num_registers(config)
    if dinov2 and "head/kernel" not in flat and not config.get("distillation_token"):
        return "dinov2_with_registers" if options.num_registers(config) else "dinov2"
    return "deit" if config.get("distillation_token") else "vit"


def to_hf(
    params: Mapping[str, Any],
    model_config: Any,
    path: str | os.PathLike,
    *,
    model_type: str | None = None,
    **kwargs: Any,
) -> epath.Path:
    """Writes a transformers model directory (config.json + model.safetensors, hub key names;
    `codec.write`'s keyword arguments: class_names, image_size, source, normalization,
    overwrite).

    `model_type` (default: `hf_model_type`) picks the transformers family: 'vit' (with a head
    `ViTForImageClassification`, else `ViTModel`, whose pooler is our `pre_logits`), 'deit'
    (`DeiTForImageClassificationWithTeacher` / `DeiTModel`), 'siglip_vision_model'
    (`SiglipVisionModel`), 'dinov2' / 'dinov2_with_registers' or 'dinov3_vit'
    (`DINOv3ViTModel`). `image_size` defaults to the
    square grid of the position embeddings. What the family cannot express is an error naming it.
    `preprocessor_config.json` records `normalization` (default [-1, 1]). The folder appears
    whole or not at all; an existing one is refused unless `overwrite` (`hf_common.write_dir`).
    """
    model_type = model_type or hf_model_type(model_config, params)
    if model_type not in CODECS:
        raise ConversionError(f"{path}: cannot write transformers model_type {model_type!r}")
    return codec.write(CODECS[model_type], params, model_config, path, **kwargs)


def _features(f: VitFacts) -> set[str]:
    """The table's structural rows (the options': the capability rows)."""
    head = "deit_heads" if f.config.distillation_token else "head"
    return {"qkv_bias", *([head] if f.num_classes else [])}


def _classifier_prefix(model_type: str):
    def add(f: VitFacts, state: dict[str, Any]) -> dict[str, Any]:
        """With a classifier, the backbone's keys under `vit.` / `deit.`."""
        if not f.num_classes:
            return state
        prefix = _PREFIX[model_type]
        return {k if "classifier." in k else f"{prefix}{k}": v for k, v in state.items()}

    return add


def _hf_config(model_type: str):
    classes = {
        "vit": ("ViTForImageClassification", "ViTModel"),
        "deit": ("DeiTForImageClassificationWithTeacher", "DeiTModel"),
    }[model_type]

    def config(f: VitFacts, names: list[str] | None) -> dict[str, Any]:
        """The transformers `config.json` of the ViT / DeiT model `f` describes."""
        t, (ph, pw), d = f.config.transformer, f.patch, f.hidden
        return {
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
            "image_size": f.image_size[0] if len(set(f.image_size)) == 1 else list(f.image_size),
            "patch_size": ph if ph == pw else [ph, pw],
            "num_channels": 3,
            "qkv_bias": True,
            "encoder_stride": ph,
            "pooler_output_size": d,
            "pooler_act": "tanh",
            **hf_common.labels_config(names, f.num_classes),
            "dtype": "float32",
        }

    return config


# Every family `to_hf` writes, by model_type.
CODECS = {
    "vit": codec.Codec(
        options.Capabilities("transformers ViT", rows=(_POOLER,)),
        TABLE,
        config=_hf_config("vit"),
        save=hf_common.save,
        features=_features,
        state=_classifier_prefix("vit"),
    ),
    "deit": codec.Codec(
        options.Capabilities("transformers DeiT", rows=(_POOLER, _DISTILLATION)),
        TABLE,
        config=_hf_config("deit"),
        save=hf_common.save,
        features=_features,
        state=_classifier_prefix("deit"),
    ),
    **{model_type: hf_siglip.CODEC for model_type in hf_siglip.MODEL_TYPES},
    **dict(zip(hf_dinov2.MODEL_TYPES, hf_dinov2.CODECS, strict=True)),
    hf_dinov3.MODEL_TYPES[0]: hf_dinov3.CODEC,
}
