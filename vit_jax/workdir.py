"""The layout of a training workdir, its checkpoints, and reading trained models back out of it.

    {workdir}/train.lock             held while a trainer runs (vit_jax.run_lock)
    {workdir}/config.json            the config of the latest start (vit_jax.run_config)
    {workdir}/config_history.jsonl   one line per start: step, time, changed keys, full config
    {workdir}/metrics.jsonl          one JSON object per line: step + metrics (each step once)
    {workdir}/checkpoints/{step}/    Orbax: `params`, `opt_state` (sharded arrays), `meta` (JSON:
                                     step, data position, seed, model config, class names)
    {workdir}/checkpoints/{step}.damaged   a checkpoint that did not restore, kept for inspection
    {workdir}/final.npz              final parameters in the published layout

The trainer restores the newest checkpoint that restores (`restore_newest`) and saves through
`CheckpointWriter`, which turns a failed save (async included) into one `CheckpointSaveError`.
Reading a run back (predict, evaluate, teacher, fine-tuning) is `vit_jax.weights.open`, through
`vit_jax.weights.run.load_trained` (re-exported here), which changes nothing on disk.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vit_jax.weights.run import (
    CHECKPOINTS,
    METRICS_JSONL,
    CheckpointDamagedError,
    failure_reason,
    is_trained,
    load_trained,
    resolve,
    step_dirs,
)

__all__ = [
    "CheckpointDamagedError",
    "CheckpointSaveError",
    "CheckpointWriter",
    "checkpoint_manager",
    "is_trained",
    "load_trained",
    "restore_newest",
    "truncate_metrics",
]

CONFIG_JSON = "config.json"
FINAL_NPZ = "final.npz"
CONFIG_HISTORY_JSONL = "config_history.jsonl"
DAMAGED_SUFFIX = ".damaged"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (the message names step, directory, reason, last good)."""


def checkpoint_manager(
    workdir: str | epath.Path, *, max_to_keep: int = 2, async_save: bool = True
) -> ocp.CheckpointManager:
    """An Orbax manager for `{workdir}/checkpoints` holding params, opt_state and JSON meta."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
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


def remove_temporaries(workdir: epath.Path) -> list[str]:
    """Removes what killed or failed saves left (`checkpoints/<step>.orbax-checkpoint-tmp*`).

    Only for the lock holder, before its first save: nobody else writes there.
    """
    root = workdir / CHECKPOINTS
    if not root.is_dir():
        return []
    removed = []
    for tmp in root.iterdir():
        if re.fullmatch(r"\d+\.orbax-checkpoint-tmp.*", tmp.name) and tmp.is_dir():
            tmp.rmtree()
            removed.append(tmp.name)
    return removed


def move_aside(step_dir: epath.Path) -> epath.Path:
    """Renames a step directory to `<step>.damaged` (Orbax ignores it); never deletes it."""
    target = step_dir.parent / f"{step_dir.name}{DAMAGED_SUFFIX}"
    n = 1
    while target.exists():
        target = step_dir.parent / f"{step_dir.name}{DAMAGED_SUFFIX}-{n}"
        n += 1
    step_dir.rename(target)
    return target


def _all_processes(ok: bool) -> bool:
    """True when `ok` on every process (multi-host restores agree on each checkpoint)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def restore_newest(
    mngr: ocp.CheckpointManager, abstract_params, abstract_opt_state
) -> tuple[Any, Any, dict, int] | None:
    """(params, opt_state, meta, step) of the newest checkpoint that restores; None if none exist.

    A newer checkpoint that fails is logged (step and reason) and, once an older one has
    restored, moved aside to `<step>.damaged`. When none restores, nothing is moved and
    `CheckpointDamagedError` names each step and its reason.
    """
    directory = epath.Path(mngr.directory)
    failed: list[tuple[int, str]] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            params, opt_state, meta = restore(mngr, step, abstract_params, abstract_opt_state)
            int(meta["data_step"])
            ok, reason = True, ""
        except Exception as e:  # noqa: BLE001 - any failure to read means "damaged"
            ok, reason = False, failure_reason(e)
        if not _all_processes(ok):
            reason = reason or "failed on another process"
            logging.warning("checkpoint %s cannot be restored: %s", directory / str(step), reason)
            failed.append((step, reason))
            continue
        if failed:
            if jax.process_index() == 0:
                for bad, _ in failed:
                    moved = move_aside(directory / str(bad))
                    logging.warning("moved the damaged checkpoint %d aside to %s", bad, moved)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("vit_jax: damaged checkpoints moved aside")
            mngr.reload()
        return params, opt_state, dict(meta), step
    if failed:
        tried = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise CheckpointDamagedError(
            f"{directory}: no checkpoint could be restored (tried {tried}); nothing was moved: "
            "move the damaged step directories aside or start a new --workdir"
        )
    return None


class CheckpointWriter:
    """Orbax saves whose failures (async ones included) surface as `CheckpointSaveError`.

    `save` starts a save; `poll` (cheap, every step) and `wait` report a failed one. A failed
    save leaves nothing that looks complete (see `_discard`).
    """

    def __init__(self, mngr: ocp.CheckpointManager, *, async_save: bool):
        self.mngr, self.async_save = mngr, async_save
        self.directory = epath.Path(mngr.directory)
        self.pending: int | None = None
        self.failure: CheckpointSaveError | None = None

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        self.wait()
        self.pending = step
        try:
            save(self.mngr, step, params, opt_state, meta)
        except Exception as e:  # noqa: BLE001 - every failure to write is reported the same way
            self._fail(e)
        if not self.async_save:
            self.wait()

    def poll(self) -> CheckpointSaveError | None:
        """The failure of a finished save, if any (does not block on a running one)."""
        if self.failure is None and self.pending is not None:
            if not self.mngr.is_saving_in_progress():
                try:
                    self.wait()
                except CheckpointSaveError:
                    pass
        return self.failure

    def wait(self) -> None:
        """Blocks until the running save is done; raises `CheckpointSaveError` if it failed."""
        if self.failure is not None:
            raise self.failure
        if self.pending is None:
            return
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._fail(e)
        if not (self.directory / str(self.pending)).is_dir():
            self._fail(RuntimeError("the checkpoint was not finalized"))
        self.pending = None

    def close(self) -> None:
        """Waits for a running save and closes the manager; a failure is raised once, here."""
        try:
            if self.failure is None:
                self.wait()
        finally:
            try:
                self.mngr.close()
            except Exception:  # noqa: BLE001 - the failure was reported already
                if self.failure is None:
                    raise

    def _discard(self, step: int) -> None:
        """A finalized directory of a failed save is moved aside: it must not look complete.

        Orbax's `<step>.orbax-checkpoint-tmp` directories are left alone (writes may still be in
        flight); they never look complete and the next start removes them.
        """
        if jax.process_index() == 0 and (self.directory / str(step)).is_dir():
            move_aside(self.directory / str(step))

    def _fail(self, error: BaseException) -> None:
        step = self.pending
        self.pending = None
        self._discard(step)
        complete = [p for p in step_dirs(self.directory) if p.name != str(step)]
        last = (
            f"the last complete checkpoint is {complete[0].name}"
            if complete
            else "no complete checkpoint was written"
        )
        self.failure = CheckpointSaveError(
            f"could not save checkpoint {step} to {self.directory}: {failure_reason(error)}; {last}"
        )
        raise self.failure from error


def replace_text(path: epath.Path, text: str) -> None:
    """Writes `text` to a temporary file beside `path`, then renames it over `path` (atomic)."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    tmp.replace(path)


def truncate_metrics(workdir: epath.Path, step: int) -> int:
    """Drops metrics.jsonl rows after `step` (and torn lines); returns how many were dropped."""
    path = workdir / METRICS_JSONL
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            row_step = None
        if row_step is not None and row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        replace_text(path, "".join(f"{line}\n" for line in kept))
    return dropped
