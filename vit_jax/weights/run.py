"""A training run's directory as a weights source: the newest Orbax checkpoint that reads.

The reader side of the workdir layout (`vit_jax.workdir` writes it): `{run}/checkpoints/{step}/`
holds `params` (Orbax arrays) and `meta` (JSON: step, model config, class names, image size);
`{step}.damaged` directories are ones a trainer set aside. Reading never changes the run.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vit_jax.weights.errors import CheckpointError, CheckpointNotFoundError

__all__ = [
    "CHECKPOINTS",
    "CheckpointDamagedError",
    "METRICS_JSONL",
    "failure_reason",
    "is_trained",
    "load_trained",
    "resolve",
    "step_dirs",
]

CHECKPOINTS = "checkpoints"
METRICS_JSONL = "metrics.jsonl"  # with checkpoints/, what marks a directory as a run


class CheckpointDamagedError(CheckpointError):
    """Checkpoints exist but none can be read (the message names each step and why)."""


def resolve(path: str | epath.Path) -> epath.Path:
    """Local paths made absolute (Orbax requires it); URLs (gs://...) unchanged."""
    text = str(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def failure_reason(error: BaseException) -> str:
    """One short line for why a checkpoint read or write failed (the root cause, not the stack).

    An OSError anywhere in the chain gives its text (`No space left on device`); otherwise the
    first line of the innermost exception (TensorStore / JSON / missing item), shortened.
    """
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        # TensorStore reports an OS error inside its message: [os_error_code='28'].
        code = re.search(r"os_error_code=\W*(\d+)", str(e))
        if code:
            return os.strerror(int(code.group(1)))
    root = chain[-1]
    lines = str(root).strip().strip("'\"").splitlines()
    text = f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__
    return text if len(text) <= 240 else text[:239] + "…"


def step_dirs(root: epath.Path) -> list[epath.Path]:
    """The step directories (`<digits>`) directly under `root`, newest first."""
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if re.fullmatch(r"\d+", p.name) and p.is_dir()]
    return sorted(steps, key=lambda p: int(p.name), reverse=True)


def _step_dir_candidates(path: epath.Path) -> list[epath.Path]:
    """`path` itself when it is a step directory, else the step directories under it."""
    if any((path / name).exists() for name in ("meta", "params", "_CHECKPOINT_METADATA")):
        return [path]
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    return step_dirs(root)


def is_trained(path: str | epath.Path) -> bool:
    """True for a workdir, a checkpoints dir or a step dir written by this trainer."""
    path = epath.Path(path)
    return path.is_dir() and bool(_step_dir_candidates(path))


def _on_one_device(step_dir: epath.Path) -> Any:
    """The stored params' shapes placed on this process's first device: a checkpoint written by
    a run on any number of devices reads anywhere (Orbax would otherwise ask for the saved ones)."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stored = ocp.StandardCheckpointHandler().metadata(step_dir / "params")
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), stored)


def load_trained(path: str | epath.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params as numpy arrays, meta) from the newest checkpoint under `path` that reads.

    `meta` has `step`, `model` (model config dict), `model_name`, `num_classes`, `class_names`.
    A newer checkpoint that cannot be read is skipped with a warning and left where it is (a
    reader never changes a run). Raises `CheckpointNotFoundError` when there is no checkpoint,
    `CheckpointDamagedError` (naming each step tried and why) when none reads.
    """
    path = resolve(path)
    candidates = _step_dir_candidates(path) if path.is_dir() else []
    if not candidates:
        raise CheckpointNotFoundError(
            f"{path}: no trainer checkpoint found (expected a workdir with checkpoints/<step>/ "
            "or a step directory holding 'params' and 'meta')"
        )
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    tried: list[str] = []
    for step_dir in candidates:
        try:
            restored = checkpointer.restore(
                step_dir,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(_on_one_device(step_dir)),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            params = jax.tree.map(np.asarray, restored.params)
            meta = dict(restored.meta)
        except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
            reason = failure_reason(e)
            logging.warning("skipping checkpoint %s: it cannot be read (%s)", step_dir, reason)
            tried.append(f"{step_dir.name}: {reason}")
            continue
        if tried:
            logging.warning("using checkpoint %s, the newest that reads", step_dir)
        return params, meta
    raise CheckpointDamagedError(f"{path}: no checkpoint could be read (tried {'; '.join(tried)})")
