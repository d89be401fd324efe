"""Hugging Face transformers ViT (`ViTModel`, `ViTForImageClassification`) <-> our ViT.

A model directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`, or a `pytorch_model.bin` read with `weights_only=True`).
Reading accepts the hub key names (`vit.encoder.layer.{i}.attention.attention.query`, ...),
the transformers-5 in-memory names (`vit.layers.{i}.attention.q_proj`, `...mlp.fc1`) and
`ViTModel` files without the `vit.` prefix; writing uses the hub names, which transformers 4
and 5 both load.

The key mapping is `TABLE` below (one row per parameter, run both ways by
`vit_jax.weights.table`); `pooler.dense` (+ tanh) is our `pre_logits`. `ViTModel` has no
LayerScale: such models are refused.
HF ViT classifies from the class token (classifier 'token'); `hidden_act` 'gelu' is exact GELU,
'gelu_pytorch_tanh' / 'gelu_new' the tanh approximation of the published JAX models.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from vit_jax import models
from vit_jax.weights import npz
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import CheckpointNotFoundError, ConversionError
from vit_jax.weights.facts import Converted, VitFacts, class_names_for, vit_facts
from vit_jax.weights.table import (
    CONV,
    DENSE,
    HEADS_BIAS,
    HEADS_IN,
    HEADS_OUT,
    IDENTITY,
    Row,
    Table,
)
from vit_jax.weights.tree import unflatten

__all__ = [
    "CONFIG",
    "TABLE",
    "WEIGHTS",
    "from_hf",
    "read_dir",
    "shard_files",
    "to_hf",
]


CONFIG = "config.json"
WEIGHTS = "model.safetensors"
_GELU = {"gelu": False, "gelu_python": False, "gelu_pytorch_tanh": True, "gelu_new": True}
# transformers 5 in-memory names -> hub names (applied after removing a leading `vit.`).
_V5_NAMES = (
    (re.compile(r"^layers\.(\d+)\."), r"encoder.layer.\1."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)


def _hub_name(key: str) -> str:
    key = key.removeprefix("vit.")
    for pattern, replacement in _V5_NAMES:
        key = pattern.sub(replacement, key)
    return key


def read_dir(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, state dict with hub names without `vit.`) of a model directory."""
    p = epath.Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{path}: no such directory")
    if not (p / CONFIG).exists():
        raise ConversionError(f"{path}: no {CONFIG}; expected a transformers model directory")
    try:
        config = json.loads((p / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{p / CONFIG}: not valid JSON ({e})") from None
    index = p / f"{WEIGHTS}.index.json"
    if (p / WEIGHTS).exists():
        raw = pt.read_safetensors(p / WEIGHTS)
    elif index.exists():
        raw = {}
        for shard in shard_files(p, index):
            raw.update(pt.read_safetensors(shard))
    elif (p / "pytorch_model.bin").exists():
        raw = pt.read_torch_bin(p / "pytorch_model.bin")
    else:
        raise ConversionError(
            f"{path}: no weights ({WEIGHTS}, {WEIGHTS}.index.json or pytorch_model.bin)"
        )
    state: dict[str, np.ndarray] = {}
    for key, value in raw.items():
        name = _hub_name(key)
        if name in state:
            raise ConversionError(f"{path}: {key!r} and another key both mean {name!r}")
        state[name] = value
    return config, state


def shard_files(folder: epath.Path, index: epath.Path) -> list[epath.Path]:
    """The shard files a sharded checkpoint's index names, each confined to `folder`.

    A name must be a plain relative path (no absolute path, no '..') and, symlinks resolved,
    stay inside the folder, so a crafted index cannot make us read a file elsewhere. The one
    exception is the Hugging Face hub cache, whose `snapshots/<rev>/` files are symlinks into
    the same repository's `blobs/`.
    """
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(
            f"{index}: not a sharded-checkpoint index (expected JSON with a 'weight_map' of "
            f"parameter name -> shard file; {type(e).__name__}: {e})"
        ) from None
    root = os.path.realpath(folder)
    allowed = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":  # hub cache: <repo>/snapshots/<rev>
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    shards = []
    for name in names:
        parts = name.replace("\\", "/").split("/") if isinstance(name, str) else []
        if (
            not parts
            or os.path.isabs(name)
            or name.startswith(("/", "\\"))
            or any(part in ("", ".", "..") for part in parts)
            or ":" in parts[0]
        ):
            raise ConversionError(
                f"{index}: shard {name!r} is not a file name inside {folder} (refused)"
            )
        target = os.path.realpath(folder / name)
        if not any(os.path.commonpath([target, a]) == a for a in allowed):
            raise ConversionError(
                f"{index}: shard {name!r} resolves to {target}, outside {folder} (refused)"
            )
        shards.append(folder / name)
    return shards


_L = "Transformer/encoderblock_{i}/"
_A = f"{_L}MultiHeadDotProductAttention_1/"
_E = "encoder.layer.{i}."


def _qkv(name: str, theirs: str) -> tuple[Row, Row]:
    return (
        Row(f"{_A}{name}/kernel", f"{_E}attention.attention.{theirs}.weight", HEADS_IN, "D H hd"),
        Row(
            f"{_A}{name}/bias",
            f"{_E}attention.attention.{theirs}.bias",
            HEADS_BIAS,
            "H hd",
            when="qkv_bias",
        ),
    )


# Hub names without `vit.`; `to_hf` adds it when the model has a classifier.
TABLE = Table(
    rows=(
        Row("cls", "embeddings.cls_token", IDENTITY, "1 1 D"),
        Row(npz.POSEMB_KEY, "embeddings.position_embeddings", IDENTITY, "1 T D"),
        Row("embedding/kernel", "embeddings.patch_embeddings.projection.weight", CONV, "ph pw 3 D"),
        Row("embedding/bias", "embeddings.patch_embeddings.projection.bias", IDENTITY, "D"),
        Row("Transformer/encoder_norm/scale", "layernorm.weight", IDENTITY, "D"),
        Row("Transformer/encoder_norm/bias", "layernorm.bias", IDENTITY, "D"),
        Row("pre_logits/kernel", "pooler.dense.weight", DENSE, "D R", when="representation"),
        Row("pre_logits/bias", "pooler.dense.bias", IDENTITY, "R", when="representation"),
        Row("head/kernel", "classifier.weight", DENSE, "D N", when="head"),
        Row("head/bias", "classifier.bias", IDENTITY, "N", when="head"),
    ),
    block=(
        Row(f"{_L}LayerNorm_0/scale", f"{_E}layernorm_before.weight", IDENTITY, "D"),
        Row(f"{_L}LayerNorm_0/bias", f"{_E}layernorm_before.bias", IDENTITY, "D"),
        Row(f"{_L}LayerNorm_2/scale", f"{_E}layernorm_after.weight", IDENTITY, "D"),
        Row(f"{_L}LayerNorm_2/bias", f"{_E}layernorm_after.bias", IDENTITY, "D"),
        *_qkv("query", "query"),
        *_qkv("key", "key"),
        *_qkv("value", "value"),
        Row(f"{_A}out/kernel", f"{_E}attention.output.dense.weight", HEADS_OUT, "H hd D"),
        Row(f"{_A}out/bias", f"{_E}attention.output.dense.bias", IDENTITY, "D"),
        Row(f"{_L}MlpBlock_3/Dense_0/kernel", f"{_E}intermediate.dense.weight", DENSE, "D M"),
        Row(f"{_L}MlpBlock_3/Dense_0/bias", f"{_E}intermediate.dense.bias", IDENTITY, "M"),
        Row(f"{_L}MlpBlock_3/Dense_1/kernel", f"{_E}output.dense.weight", DENSE, "M D"),
        Row(f"{_L}MlpBlock_3/Dense_1/bias", f"{_E}output.dense.bias", IDENTITY, "D"),
    ),
)


def _read_config(path: Any, config: Mapping[str, Any], state: Mapping[str, Any]) -> dict:
    """The table's dims and features plus our model-config fields, from `config.json`."""
    if config.get("model_type") != "vit":
        raise ConversionError(
            f"{path}: model_type {config.get('model_type')!r}; only 'vit' (ViTModel, "
            "ViTForImageClassification) converts"
        )
    act = config.get("hidden_act", "gelu")
    if act not in _GELU:
        raise ConversionError(f"{path}: hidden_act {act!r}; supported: {', '.join(_GELU)}")
    if int(config.get("num_channels", 3)) != 3:
        raise ConversionError(f"{path}: num_channels {config['num_channels']}, expected 3")
    d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if d % heads or int(config.get("head_dim") or d // heads) * heads != d:
        raise ConversionError(f"{path}: heads x head_dim != hidden_size ({config})")
    ph, pw = pt.pair(config.get("patch_size", 16), "patch_size")
    h, w = pt.pair(config.get("image_size", 224), "image_size")
    dims = dict(D=d, H=heads, hd=d // heads, M=int(config["intermediate_size"]), ph=ph, pw=pw)
    dims["T"] = (h // ph) * (w // pw) + 1
    features, ignore = set(), {"the masked-image-modeling mask token": ["embeddings.mask_token"]}
    if "pooler.dense.weight" in state:
        if config.get("pooler_act", "tanh") != "tanh":
            raise ConversionError(f"{path}: pooler_act {config['pooler_act']!r}, expected 'tanh'")
        features.add("representation")
        dims["R"] = int(state["pooler.dense.weight"].shape[0])
    if "classifier.weight" in state:
        features.add("head")
        dims["N"] = int(state["classifier.weight"].shape[0])
        if "representation" in features:  # ViTForImageClassification never applies the pooler
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
        gelu_approximate=_GELU[act],
    )


def from_hf(path: str | os.PathLike) -> Converted:
    """Our parameters, model config, class names and image size from a transformers ViT dir."""
    config, state = read_dir(path)
    f = _read_config(path, config, state)
    keys = TABLE.at(layers=f["layers"], dims=f["dims"], features=f["features"], zeros=f["zeros"])
    flat = keys.to_ours(
        state, source=str(path), what="a transformers ViT of this config.json", ignore=f["ignore"]
    )
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
            representation_size=dims["R"] if "representation" in f["features"] else None,
            gelu_approximate=f["gelu_approximate"],
            layernorm_epsilon=float(config.get("layer_norm_eps", 1e-12)),
        )
    )
    params = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    return Converted(params, model_config, _class_names(config, dims.get("N")), f["image_size"])


def _class_names(config: Mapping[str, Any], num_classes: int | None) -> list[str] | None:
    """The `id2label` names, or None when absent or transformers' placeholders (LABEL_i)."""
    id2label = config.get("id2label") or {}
    if not num_classes or not id2label:
        return None
    try:
        names = [str(id2label.get(str(i), id2label.get(i))) for i in range(num_classes)]
    except (TypeError, AttributeError):
        return None
    if any(n == "None" for n in names) or names == [f"LABEL_{i}" for i in range(num_classes)]:
        return None
    return names


def to_hf(
    params: Mapping[str, Any],
    model_config: Any,
    path: str | os.PathLike,
    *,
    class_names: list[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
    source: str = "params",
) -> epath.Path:
    """Writes a transformers model directory (config.json + model.safetensors, hub key names).

    With a head: `ViTForImageClassification`. Without: `ViTModel`, whose pooler is our
    `pre_logits` when the model has a representation layer (otherwise load it with
    `add_pooling_layer=False`). `image_size` defaults to the square grid of the position
    embeddings. Hybrids, Mixer, pooling other than the class token and a representation layer
    followed by a head have no transformers ViT equivalent: an error says so.
    """
    f = vit_facts(
        params,
        model_config,
        image_size=image_size,
        target="transformers ViT",
        classifiers=("token",),
        features_representation=True,
        distillation=False,
        layer_scale=False,
    )
    names = class_names_for(f.num_classes, class_names)
    representation = f.config.get("representation_size")
    features = {"qkv_bias", *(["head"] if f.num_classes else [])}
    features.update(["representation"] if representation else [])
    keys = TABLE.at(layers=f.layers, dims={**f.dims, "R": representation or 0}, features=features)
    state = keys.to_theirs(f.flat, source=source, what=f"a {f.config.name or 'ViT'} of this config")
    if f.num_classes:  # ViTForImageClassification: the backbone under `vit.`
        state = {k if k.startswith("classifier.") else f"vit.{k}": v for k, v in state.items()}
    config = _hf_config(f, names)
    out = epath.Path(path)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{path}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    pt.write_safetensors({k: v.astype(np.float32) for k, v in state.items()}, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    logging.info("wrote transformers %s to %s", config["architectures"][0], out)
    return out


def _hf_config(f: VitFacts, names: list[str] | None) -> dict[str, Any]:
    """The transformers `config.json` of the model `f` describes."""
    labels = names or [f"LABEL_{i}" for i in range(f.num_classes or 0)]
    t, (ph, pw), d = f.config.transformer, f.patch, f.hidden
    config = {
        "architectures": ["ViTForImageClassification" if f.num_classes else "ViTModel"],
        "model_type": "vit",
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
        "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)},
        "dtype": "float32",
    }
    if len(set(labels)) != len(labels):
        del config["label2id"]  # duplicate names cannot be inverted
    return config
