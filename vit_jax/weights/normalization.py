"""The input normalisation that travels with weights: (pixel / 255 - mean) / std per channel.

As timm's `pretrained_cfg` and Hugging Face's `preprocessor_config.json` record it, so the
models compute on the same pixel tensor the PyTorch model receives. It is preprocessing, never
folded into the weights. Read from: our JSON sidecar / a run's metadata (`normalization`),
a transformers directory's `preprocessor_config.json` (`image_mean`, `image_std`,
`do_normalize`), a timm hub `config.json` (`pretrained_cfg.mean` / `std`); absent means the
published checkpoints' [-1, 1] (mean = std = 0.5).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from etils import epath

from vit_jax.weights import files
from vit_jax.weights.errors import CheckpointError

__all__ = ["DEFAULT", "HF_PREPROCESSOR", "checked", "read_hf", "read_timm_hub", "write_hf"]

DEFAULT = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
HF_PREPROCESSOR = "preprocessor_config.json"


def checked(value: Any, where: str) -> dict[str, list[float]]:
    """{'mean': 3 floats, 'std': 3 positive floats}; an error naming `where` otherwise."""
    if value is None:
        return {k: list(v) for k, v in DEFAULT.items()}
    try:
        mean = [float(m) for m in value["mean"]]
        std = [float(s) for s in value["std"]]
    except (KeyError, TypeError, ValueError):
        expected = "{'mean': [3 floats], 'std': [3 floats]}"
        raise CheckpointError(f"{where}: normalization must be {expected}") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise CheckpointError(f"{where}: normalization needs 3 means and 3 positive stds")
    return {"mean": mean, "std": std}


def _json(path: epath.Path) -> dict[str, Any]:
    files.check_regular(path)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return value if isinstance(value, dict) else {}


def read_hf(directory: str | os.PathLike) -> dict[str, list[float]] | None:
    """A transformers directory's normalisation, or None when it has no preprocessor config."""
    path = epath.Path(directory) / HF_PREPROCESSOR
    if not path.exists():
        return None
    config = _json(path)
    if config.get("do_normalize", True) is False:
        return {"mean": [0.0] * 3, "std": [1.0] * 3}
    if "image_mean" not in config or "image_std" not in config:
        return None
    return checked({"mean": config["image_mean"], "std": config["image_std"]}, str(path))


def read_timm_hub(weights_file: str | os.PathLike) -> dict[str, list[float]] | None:
    """The normalisation in a timm hub `config.json` beside the weights, or None."""
    path = epath.Path(weights_file).parent / "config.json"
    if not path.exists():
        return None
    cfg = _json(path).get("pretrained_cfg") or {}
    if "mean" not in cfg or "std" not in cfg:
        return None
    return checked({"mean": cfg["mean"], "std": cfg["std"]}, str(path))


def write_hf(
    directory: str | os.PathLike, norm: Mapping[str, Any], image_size: Any = None
) -> epath.Path:
    """`preprocessor_config.json` for a transformers directory (a ViTImageProcessor)."""
    norm = checked(norm, str(directory))
    config: dict[str, Any] = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": norm["mean"],
        "image_std": norm["std"],
    }
    if image_size:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        config["size"] = {"height": int(h), "width": int(w)}
    path = epath.Path(directory) / HF_PREPROCESSOR
    path.write_text(json.dumps(config, indent=2))
    return path
