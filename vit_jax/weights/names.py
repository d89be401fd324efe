"""Names -> files: `{pretrained_dir}/{name}.npz`, and AugReg short names via the published index."""

from __future__ import annotations

import csv
import io

import numpy as np
from absl import logging
from etils import epath

from vit_jax import models
from vit_jax.weights.cache import is_remote, local_copy
from vit_jax.weights.errors import CheckpointError

__all__ = ["AUGREG_DIR", "AUGREG_INDEX", "best_augreg_filename", "resolve_pretrained"]

AUGREG_DIR = "gs://vit_models/augreg"
AUGREG_INDEX = f"{AUGREG_DIR}/index.csv"


def resolve_pretrained(pretrained_dir: str, model_name: str) -> str:
    """`{pretrained_dir}/{model_name}.npz`, as the reference.

    AugReg short names (`B_16`, `R26_S_32`, ...) map to their ImageNet-21k checkpoint with the
    best final validation accuracy, looked up in `{pretrained_dir}/index.csv` (or, when a local
    directory has none, the published `gs://vit_models/augreg/index.csv`, which needs network).
    """
    if not pretrained_dir:
        raise CheckpointError("set config.pretrained_path or config.pretrained_dir")
    if model_name in models.AUGREG_NAMES:
        model_name = best_augreg_filename(pretrained_dir, model_name)
    name = model_name if model_name.endswith(".npz") else f"{model_name}.npz"
    return f"{str(pretrained_dir).rstrip('/')}/{name}"


def best_augreg_filename(pretrained_dir: str, short_name: str) -> str:
    """The AugReg i21k file name (without `.npz`) with the best `final_val` for a short name."""
    index = f"{str(pretrained_dir).rstrip('/')}/index.csv"
    if not is_remote(index) and not epath.Path(index).exists():
        index = AUGREG_INDEX
    try:
        text = local_copy(index).read_text()
    except (OSError, CheckpointError) as e:
        raise CheckpointError(
            f"AugReg name {short_name!r} needs the index {index} (network, or a copy of "
            f"{AUGREG_INDEX} in the pretrained_dir): {e}"
        ) from None
    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and not {"filename", "ds", "final_val"} <= set(rows[0]):
        raise CheckpointError(f"{index}: expected columns filename, ds, final_val")
    rows = [r for r in rows if r["ds"] == "i21k" and r["filename"].split("-")[0] == short_name]
    if not rows:
        raise CheckpointError(f"{index}: no i21k AugReg checkpoint for {short_name!r}")
    best = max(rows, key=lambda r: float(r["final_val"]) if r["final_val"] else -np.inf)
    logging.info("AugReg %s -> %s (final_val %s)", short_name, best["filename"], best["final_val"])
    return best["filename"]
