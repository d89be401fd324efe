"""The layout of a training workdir, and reading trained models back out of it.

    {workdir}/config.json            the resolved config of the run
    {workdir}/metrics.jsonl          one JSON object per line: step + metrics
    {workdir}/checkpoints/{step}/    Orbax: `params`, `opt_state` (sharded arrays), `meta` (JSON:
                                     step, data position, seed, model config, class names)
    {workdir}/final.npz              final parameters in the published layout

`load_trained(path)` accepts a workdir, its `checkpoints/` directory or one step directory and
returns the parameters with the metadata needed to rebuild the model (predict, evaluate, teacher).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINTS = "checkpoints"
CONFIG_JSON = "config.json"
METRICS_JSONL = "metrics.jsonl"
FINAL_NPZ = "final.npz"


def resolve(path: str | epath.Path) -> epath.Path:
    """Local paths made absolute (Orbax requires it); URLs (gs://...) unchanged."""
    text = str(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def checkpoint_manager(
    workdir: str | epath.Path, *, max_to_keep: int = 2, async_save: bool = True
) -> ocp.CheckpointManager:
    """An Orbax manager for `{workdir}/checkpoints` holding params, opt_state and JSON meta."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
    )
    return ocp.CheckpointManager(
        resolve(workdir) / CHECKPOINTS,
        options=options,
        item_names=("params", "opt_state", "meta"),
    )


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state, meta: dict) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state):
    """(params, opt_state, meta) restored straight into the shardings of the abstract trees."""
    out = mngr.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore(),
        ),
    )
    return out.params, out.opt_state, out.meta


def _step_dir(path: epath.Path) -> epath.Path | None:
    """The newest complete step directory under a workdir / checkpoints dir, or path itself."""
    if (path / "meta").exists() and (path / "params").exists():
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if not root.is_dir():
        return None
    steps = [p for p in root.iterdir() if re.fullmatch(r"\d+", p.name) and (p / "meta").exists()]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def is_trained(path: str | epath.Path) -> bool:
    """True for a workdir, a checkpoints dir or a step dir written by this trainer."""
    path = epath.Path(path)
    return path.is_dir() and _step_dir(path) is not None


def load_trained(path: str | epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params as numpy arrays, meta) from the newest checkpoint under `path`.

    `meta` has `step`, `model` (model config dict), `model_name`, `num_classes`, `class_names`.
    """
    path = resolve(path)
    step_dir = _step_dir(path) if path.is_dir() else None
    if step_dir is None:
        raise FileNotFoundError(
            f"{path}: no trainer checkpoint found (expected a workdir with checkpoints/<step>/ "
            "or a step directory holding 'params' and 'meta')"
        )
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    restored = checkpointer.restore(
        step_dir,
        args=ocp.args.Composite(params=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
    )
    params = jax.tree.map(np.asarray, restored.params)
    return params, dict(restored.meta)


def write_json(path: epath.Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
