"""What every Hugging Face transformers family shares: the model directory, read and written.

A model directory holds `config.json` and `model.safetensors` (or shards listed in
`model.safetensors.index.json`, or a `pytorch_model.bin` read with `weights_only=True`).
`read_files` returns its config and raw state dict; each family (`hf` for ViT / DeiT,
`hf_siglip`, `hf_dinov2`) renames and converts it with its own key table, and `write_dir`
writes a family's state dict and config back. `hf.from_hf` / `hf.to_hf` are the one entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from vit_jax.weights import files, run
from vit_jax.weights import normalization as norm
from vit_jax.weights import pytorch as pt
from vit_jax.weights.errors import CheckpointNotFoundError, ConversionError
from vit_jax.weights.table import ATTENTION, HEADS_IN, HEADS_OUT, Row, pair

__all__ = [
    "CONFIG",
    "GELU",
    "LAYER",
    "RENAMES",
    "WEIGHTS",
    "attention_rows",
    "check_channels_and_heads",
    "class_names",
    "gelu_approximate",
    "hub_state",
    "labels_config",
    "read_files",
    "replaceable",
    "save",
    "shard_files",
    "write_dir",
]

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# transformers `hidden_act` -> our `gelu_approximate`
GELU = {"gelu": False, "gelu_python": False, "gelu_pytorch_tanh": True, "gelu_new": True}
# transformers' ViT-layout layer (ViT, DeiT, DINOv2)
LAYER = "encoder.layer.{i}."
_VIT, _DINOV2 = ("vit", "deit"), ("dinov2", "dinov2_with_registers")
# transformers 5 in-memory names -> the hub names (which transformers 4 and 5 both load), and
# the model_types whose keys are renamed so (after their prefix is removed)
RENAMES = (
    (r"^layers\.(\d+)\.", r"encoder.layer.\1.", _VIT),
    (r"\.attention\.q_proj\.", ".attention.attention.query.", _VIT + _DINOV2),
    (r"\.attention\.k_proj\.", ".attention.attention.key.", _VIT + _DINOV2),
    (r"\.attention\.v_proj\.", ".attention.attention.value.", _VIT + _DINOV2),
    (r"\.attention\.o_proj\.", ".attention.output.dense.", _VIT + _DINOV2),
    (r"\.mlp\.fc1\.", ".intermediate.dense.", _VIT),
    (r"\.mlp\.fc2\.", ".output.dense.", _VIT),
    (r"\.mlp\.down_proj\.", ".mlp.weights_out.", _DINOV2),
)


def attention_rows() -> tuple[Row, ...]:
    """Self-attention rows of transformers' ViT layout (ViT, DeiT, DINOv2): per layer
    `attention.attention.{query,key,value}` (biases when `qkv_bias`), `attention.output.dense`."""
    rows = []
    for name in ("query", "key", "value"):
        theirs = f"{LAYER}attention.attention.{name}"
        kernel, bias = pair(f"{ATTENTION}{name}", theirs, HEADS_IN, "D H hd")
        rows += [kernel, dataclasses.replace(bias, when="qkv_bias")]
    return (
        *rows,
        *pair(f"{ATTENTION}out", f"{LAYER}attention.output.dense", HEADS_OUT, "H hd D"),
    )


def read_files(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(config.json as a dict, the raw state dict) of a transformers model directory."""
    p = epath.Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"{path}: no such directory")
    if not (p / CONFIG).exists():
        raise ConversionError(f"{path}: no {CONFIG}; expected a transformers model directory")
    files.check_regular(p / CONFIG)
    try:
        config = json.loads((p / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{p / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{p / CONFIG}: expected a JSON object")
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
    return config, raw


def shard_files(folder: epath.Path, index: epath.Path) -> list[epath.Path]:
    """The shard files a sharded checkpoint's index names, each confined to `folder`.

    A name must be a plain relative path (no absolute path, no '..') and, symlinks resolved,
    stay inside the folder, so a crafted index cannot make us read a file elsewhere. The one
    exception is the Hugging Face hub cache, whose `snapshots/<rev>/` files are symlinks into
    the same repository's `blobs/`.
    """
    files.check_regular(index)
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
    for shard in shards:  # each checked before any is read
        files.check_regular(shard)
    return shards


def hub_state(
    path: Any, state: Mapping[str, np.ndarray], prefixes: tuple[str, ...], model_type: str
) -> dict[str, Any]:
    """`state` under the hub names: each leading prefix in `prefixes` removed where present
    (in turn), then the transformers-5 names of `model_type` renamed (`RENAMES`); two keys
    meaning one name are an error."""
    renames = [(re.compile(a), b) for a, b, types in RENAMES if model_type in types]
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        name = key
        for prefix in prefixes:
            name = name.removeprefix(prefix)
        for pattern, replacement in renames:
            name = pattern.sub(replacement, name)
        if name in out:
            raise ConversionError(f"{path}: {key!r} and another key both mean {name!r}")
        out[name] = value
    return out


def gelu_approximate(path: Any, config: Mapping[str, Any], default: str) -> bool:
    """Our `gelu_approximate` from `hidden_act` ('gelu' exact, 'gelu_pytorch_tanh' tanh)."""
    act = config.get("hidden_act", default)
    if act not in GELU:
        raise ConversionError(f"{path}: hidden_act {act!r}; supported: {', '.join(GELU)}")
    return GELU[act]


def check_channels_and_heads(path: Any, config: Mapping[str, Any]) -> tuple[int, int]:
    """(hidden_size, heads), after checking 3 input channels and heads x head_dim = width."""
    if int(config.get("num_channels", 3)) != 3:
        raise ConversionError(f"{path}: num_channels {config['num_channels']}, expected 3")
    d, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
    if d % heads or int(config.get("head_dim") or d // heads) * heads != d:
        raise ConversionError(f"{path}: num_attention_heads {heads} x head_dim != hidden_size {d}")
    return d, heads


def class_names(config: Mapping[str, Any], num_classes: int | None) -> list[str] | None:
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


def labels_config(names: list[str] | None, num_classes: int | None) -> dict[str, Any]:
    """`id2label` / `label2id` of a config.json (label2id left out for duplicate names)."""
    labels = names or [f"LABEL_{i}" for i in range(num_classes or 0)]
    out: dict[str, Any] = {"id2label": {str(i): n for i, n in enumerate(labels)}}
    if len(set(labels)) == len(labels):
        out["label2id"] = {n: i for i, n in enumerate(labels)}
    return out


def replaceable(path: str | os.PathLike) -> str | None:
    """Why `overwrite` must not replace the folder `path`; None for a transformers model folder
    (a `config.json` naming a `model_type`, and not a training run's), the one it replaces."""
    p = epath.Path(path)
    if any((p / marker).exists() for marker in (run.CHECKPOINTS, run.METRICS_JSONL)):
        return "is a training run, not a transformers model folder; not replaced"
    config = p / CONFIG
    try:
        model_type = config.is_file() and json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if not model_type:
        return f"is not a transformers model folder (no {CONFIG} with a model_type); not replaced"
    return None


def write_dir(
    state: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    normalization: Mapping[str, Any] | None = None,
    image_size: Any = None,
    overwrite: bool = False,
) -> epath.Path:
    """Writes a transformers model directory: `model.safetensors` (float32), `config.json` and
    `preprocessor_config.json` (`normalization`, default [-1, 1]; `image_size`).

    The folder appears complete or not at all (`weights.files.staged_dir`). An existing folder
    that is not empty is refused unless `overwrite`; then, if it is a transformers model folder
    (`replaceable`), it is replaced whole: no file of the old model (a shard, an index)
    survives beside the new one.
    """
    out = epath.Path(path)
    arrays = {k: np.asarray(v).astype(np.float32) for k, v in state.items()}
    with files.staged_dir(out, overwrite=overwrite, replaceable=replaceable) as staging:
        pt.dump_safetensors(arrays, staging / WEIGHTS)
        (staging / CONFIG).write_text(json.dumps(dict(config), indent=2))
        norm.write_hf(staging, normalization, image_size)
    logging.info("wrote transformers %s to %s", config["architectures"][0], out)
    return out


def save(
    state: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    path: Any,
    facts: Any,
    names: Any,
    **kw: Any,
) -> epath.Path:
    """`write_dir` as a `codec.Codec`'s save (the config already holds the class names)."""
    del facts, names
    return write_dir(state, config, path, **kw)
