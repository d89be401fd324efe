"""Hugging Face transformers ViT (`ViTModel`, `ViTForImageClassification`) <-> our ViT.

A model directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`, or a `pytorch_model.bin` read with `weights_only=True`).
Reading accepts the hub key names (`vit.encoder.layer.{i}.attention.attention.query`, ...),
the transformers-5 in-memory names (`vit.layers.{i}.attention.q_proj`, `...mlp.fc1`) and
`ViTModel` files without the `vit.` prefix; writing uses the hub names, which transformers 4
and 5 both load.

Mapping: `embeddings.{cls_token, position_embeddings, patch_embeddings.projection}` ->
`cls`, `Transformer/posembed_input/pos_embedding`, `embedding`; per layer `layernorm_before`,
`attention.attention.{query,key,value}`, `attention.output.dense`, `layernorm_after`,
`intermediate.dense`, `output.dense` -> `LayerNorm_0`, `MultiHeadDotProductAttention_1/
{query,key,value,out}`, `LayerNorm_2`, `MlpBlock_3/Dense_{0,1}`; `layernorm` ->
`encoder_norm`; `pooler.dense` (+ tanh) -> `pre_logits`; `classifier` -> `head`.
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
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import CheckpointNotFoundError, ConversionError
from vit_jax.weights.facts import Converted, class_names_for, vit_facts
from vit_jax.weights.tree import unflatten

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


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a directory holding a transformers `config.json`."""
    p = epath.Path(path)
    return p.is_dir() and (p / CONFIG).exists()


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


def from_hf(path: str | os.PathLike) -> Converted:
    """Our parameters, model config, class names and image size from a transformers ViT dir."""
    config, state = read_dir(path)
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
    layers, mlp = int(config["num_hidden_layers"]), int(config["intermediate_size"])
    if d % heads or int(config.get("head_dim") or d // heads) * heads != d:
        raise ConversionError(f"{path}: heads x head_dim != hidden_size ({config})")
    ph, pw = pt.pair(config.get("patch_size", 16), "patch_size")
    h, w = pt.pair(config.get("image_size", 224), "image_size")
    tokens = (h // ph) * (w // pw) + 1
    qkv_bias = bool(config.get("qkv_bias", True))

    r = pt.Reader(str(path), state)
    flat: dict[str, np.ndarray] = {
        "embedding/kernel": pt.conv_from_torch(
            r.take("embeddings.patch_embeddings.projection.weight", (d, 3, ph, pw))
        ),
        "embedding/bias": r.take("embeddings.patch_embeddings.projection.bias", (d,)),
        "cls": r.take("embeddings.cls_token", (1, 1, d)),
        "Transformer/posembed_input/pos_embedding": r.take(
            "embeddings.position_embeddings", (1, tokens, d)
        ),
    }
    r.skip(["embeddings.mask_token"], "the masked-image-modeling mask token")
    for i in range(layers):
        src, dst = f"encoder.layer.{i}.", f"Transformer/encoderblock_{i}/"
        for ours, theirs in (
            ("LayerNorm_0", "layernorm_before"),
            ("LayerNorm_2", "layernorm_after"),
        ):
            flat[f"{dst}{ours}/scale"] = r.take(f"{src}{theirs}.weight", (d,))
            flat[f"{dst}{ours}/bias"] = r.take(f"{src}{theirs}.bias", (d,))
        attn = f"{dst}MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            weight = r.take(f"{src}attention.attention.{name}.weight", (d, d))
            bias = r.take(f"{src}attention.attention.{name}.bias", (d,)) if qkv_bias else None
            flat[f"{attn}{name}/kernel"] = pt.qkv_from_torch(weight, heads)
            flat[f"{attn}{name}/bias"] = (
                np.zeros((heads, d // heads), np.float32)
                if bias is None
                else bias.reshape(heads, -1)
            )
        flat[f"{attn}out/kernel"] = pt.out_from_torch(
            r.take(f"{src}attention.output.dense.weight", (d, d)), heads
        )
        flat[f"{attn}out/bias"] = r.take(f"{src}attention.output.dense.bias", (d,))
        for j, theirs in enumerate(("intermediate.dense", "output.dense")):
            shape = (mlp, d) if j == 0 else (d, mlp)
            flat[f"{dst}MlpBlock_3/Dense_{j}/kernel"] = pt.dense_from_torch(
                r.take(f"{src}{theirs}.weight", shape)
            )
            flat[f"{dst}MlpBlock_3/Dense_{j}/bias"] = r.take(f"{src}{theirs}.bias", shape[:1])
    flat["Transformer/encoder_norm/scale"] = r.take("layernorm.weight", (d,))
    flat["Transformer/encoder_norm/bias"] = r.take("layernorm.bias", (d,))
    representation = None
    if "pooler.dense.weight" in r:
        if config.get("pooler_act", "tanh") != "tanh":
            raise ConversionError(f"{path}: pooler_act {config['pooler_act']!r}, expected 'tanh'")
        representation = int(state["pooler.dense.weight"].shape[0])
        flat["pre_logits/kernel"] = pt.dense_from_torch(
            r.take("pooler.dense.weight", (representation, d))
        )
        flat["pre_logits/bias"] = r.take("pooler.dense.bias", (representation,))
    num_classes = None
    if "classifier.weight" in r:
        num_classes = int(state["classifier.weight"].shape[0])
        flat["head/kernel"] = pt.dense_from_torch(r.take("classifier.weight", (num_classes, d)))
        flat["head/bias"] = r.take("classifier.bias", (num_classes,))
        if representation:  # ViTForImageClassification never applies the pooler
            r.skip(["pooler.dense.weight", "pooler.dense.bias"], "unused by the classifier")
            representation = None
            del flat["pre_logits/kernel"], flat["pre_logits/bias"]
    r.finish("a transformers ViT of this config.json")

    model_config = models.get_config(
        dict(
            name=str(config.get("_name_or_path") or epath.Path(path).name),
            patches=dict(size=(ph, pw)),
            hidden_size=d,
            transformer=dict(
                mlp_dim=mlp,
                num_heads=heads,
                num_layers=layers,
                dropout_rate=float(config.get("hidden_dropout_prob", 0.0)),
                attention_dropout_rate=float(config.get("attention_probs_dropout_prob", 0.0)),
            ),
            classifier="token",
            representation_size=representation,
            gelu_approximate=_GELU[act],
            layernorm_epsilon=float(config.get("layer_norm_eps", 1e-12)),
        )
    )
    params = unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
    return Converted(params, model_config, _class_names(config, num_classes), (h, w))


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
    )
    names = class_names_for(f.num_classes, class_names)
    d, (ph, pw) = f.hidden, f.patch
    tokens = f.grid[0] * f.grid[1] + 1
    r = pt.Reader(source, f.flat)  # names the file in errors
    prefix = "vit." if f.num_classes else ""
    state = {
        f"{prefix}embeddings.cls_token": r.take("cls", (1, 1, d)),
        f"{prefix}embeddings.position_embeddings": r.take(
            "Transformer/posembed_input/pos_embedding", (1, tokens, d)
        ),
        f"{prefix}embeddings.patch_embeddings.projection.weight": pt.conv_to_torch(
            r.take("embedding/kernel", (ph, pw, 3, d))
        ),
        f"{prefix}embeddings.patch_embeddings.projection.bias": r.take("embedding/bias", (d,)),
    }
    hd = d // f.heads
    for i in range(f.layers):
        src, dst = f"Transformer/encoderblock_{i}/", f"{prefix}encoder.layer.{i}."
        for ours, theirs in (
            ("LayerNorm_0", "layernorm_before"),
            ("LayerNorm_2", "layernorm_after"),
        ):
            state[f"{dst}{theirs}.weight"] = r.take(f"{src}{ours}/scale", (d,))
            state[f"{dst}{theirs}.bias"] = r.take(f"{src}{ours}/bias", (d,))
        attn = f"{src}MultiHeadDotProductAttention_1/"
        for name in ("query", "key", "value"):
            state[f"{dst}attention.attention.{name}.weight"] = pt.qkv_to_torch(
                r.take(f"{attn}{name}/kernel", (d, f.heads, hd))
            )
            state[f"{dst}attention.attention.{name}.bias"] = r.take(
                f"{attn}{name}/bias", (f.heads, hd)
            ).reshape(-1)
        state[f"{dst}attention.output.dense.weight"] = pt.out_to_torch(
            r.take(f"{attn}out/kernel", (f.heads, hd, d))
        )
        state[f"{dst}attention.output.dense.bias"] = r.take(f"{attn}out/bias", (d,))
        for j, theirs in enumerate(("intermediate.dense", "output.dense")):
            shape = (d, f.mlp) if j == 0 else (f.mlp, d)
            state[f"{dst}{theirs}.weight"] = pt.dense_to_torch(
                r.take(f"{src}MlpBlock_3/Dense_{j}/kernel", shape)
            )
            state[f"{dst}{theirs}.bias"] = r.take(f"{src}MlpBlock_3/Dense_{j}/bias", shape[1:])
    state[f"{prefix}layernorm.weight"] = r.take("Transformer/encoder_norm/scale", (d,))
    state[f"{prefix}layernorm.bias"] = r.take("Transformer/encoder_norm/bias", (d,))
    representation = f.config.get("representation_size")
    if representation:
        state["pooler.dense.weight"] = pt.dense_to_torch(
            r.take("pre_logits/kernel", (d, representation))
        )
        state["pooler.dense.bias"] = r.take("pre_logits/bias", (representation,))
    if f.num_classes:
        state["classifier.weight"] = pt.dense_to_torch(r.take("head/kernel", (d, f.num_classes)))
        state["classifier.bias"] = r.take("head/bias", (f.num_classes,))
    r.finish(f"a {f.config.name or 'ViT'} of this config")

    labels = names or [f"LABEL_{i}" for i in range(f.num_classes or 0)]
    t = f.config.transformer
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
        "pooler_output_size": int(representation or d),
        "pooler_act": "tanh",
        "id2label": {str(i): n for i, n in enumerate(labels)},
        "label2id": {n: i for i, n in enumerate(labels)},
        "dtype": "float32",
    }
    if len(set(labels)) != len(labels):
        del config["label2id"]  # duplicate names cannot be inverted
    out = epath.Path(path)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{path}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    pt.write_safetensors({k: v.astype(np.float32) for k, v in state.items()}, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(config, indent=2))
    logging.info("wrote transformers %s to %s", config["architectures"][0], out)
    return out
