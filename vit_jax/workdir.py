"""The layout of a training workdir, its checkpoints, and reading trained models back out of it.

    {workdir}/train.lock             held while a trainer runs (vit_jax.run_lock)
    {workdir}/config.json            the config of the latest start (vit_jax.run_config)
    {workdir}/config_history.jsonl   one line per start: step, time, changed keys, full config
    {workdir}/metrics.jsonl          one JSON object per line: step + metrics (each step once)
    {workdir}/checkpoints/{step}/    Orbax: `params`, `opt_state` (sharded arrays), `meta` (JSON:
                                     step, data position, seed, model config, class names)

A checkpoint holds a `vit_jax.trainer.TrainState`: its `params` and `opt_state` are the items of
the same names (`STATE_ITEMS`), its `step` is `meta['data_step']`.
    {workdir}/checkpoints/{step}.damaged   a checkpoint that did not restore, kept for inspection
    {workdir}/final.npz              final parameters in the published layout

The trainer restores the newest checkpoint that restores (`restore_newest`) and saves through
`CheckpointWriter`, which turns a failed save (async included) into one `CheckpointSaveError`
(Orbax's own error lines about it are demoted to INFO while the writer is open: `--verbose` shows
them). Reading a run back (predict, evaluate, teacher, fine-tuning) is `vit_jax.weights.open`,
through `vit_jax.weights.run.load_trained` (re-exported here), which changes nothing on disk.

Damaged or unreadable now: damage means the bytes are wrong, and only damage sets a checkpoint
aside. Before Orbax reads a step folder, every entry in it is checked without reading data
(`weights.run.check_readable`): the folder gone, a dangling link, a folder or file that cannot be
opened (permission, I/O error) or anything but a folder or regular file (a FIFO, socket or
device: refused by its type, never opened) make the checkpoint *unreadable now*; so does a
step-named entry of `checkpoints/` that is not a folder (`check_step_entries`). A read that then
fails is unreadable now when its error says so (`weights.run.unreadable_cause`): an errno of
access or of the device anywhere in the chain or in TensorStore's message (EACCES, EPERM, EIO,
ESTALE, EMFILE, ...; not ENOENT), TensorStore's PERMISSION_DENIED / UNAVAILABLE /
DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED, MemoryError, or the step folder gone. Every other failure
of a folder whose files all opened is *damage*: a truncated or undecodable array or JSON, a file
or item missing that the checkpoint's metadata lists (OUT_OF_RANGE, DATA_LOSS, NOT_FOUND,
FileNotFoundError, KeyError, JSONDecodeError, ...). Unreadable now: `CheckpointUnreadableError`,
one line naming the path and the error, nothing skipped, moved or changed (the trainer exits 1;
fix it and restart). Damage: the trainer restores the newest older checkpoint, moves the damaged
ones to `<step>.damaged`, and logs for each the command that puts it back
(`mv DIR/checkpoints/60.damaged DIR/checkpoints/60`, with no trainer running) and which steps will
be replayed; readers skip it and move nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import re
import shlex
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
    CheckpointUnreadableError,
    check_readable,
    check_step_entries,
    drained_event_loops,
    failure_reason,
    is_trained,
    load_trained,
    resolve,
    step_dirs,
    unreadable_cause,
    unreadable_error,
)

__all__ = [
    "CheckpointDamagedError",
    "CheckpointSaveError",
    "CheckpointUnreadableError",
    "CheckpointWriter",
    "checkpoint_manager",
    "is_trained",
    "load_trained",
    "restore_newest",
    "STATE_ITEMS",
    "truncate_metrics",
]

CONFIG_JSON = "config.json"
FINAL_NPZ = "final.npz"
CONFIG_HISTORY_JSONL = "config_history.jsonl"
DAMAGED_SUFFIX = ".damaged"
# The TrainState fields saved as Orbax items, each under its own name (the on-disk layout of
# every run so far); the state's `step` travels in `meta` as `data_step`.
STATE_ITEMS = ("params", "opt_state")


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


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict) -> None:
    """Starts saving `state` (a `TrainState`: its `STATE_ITEMS`) and `meta` as checkpoint `step`;
    `meta['data_step']` is the state's step."""
    items = {name: ocp.args.StandardSave(getattr(state, name)) for name in STATE_ITEMS}
    mngr.save(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)), force=True)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
    """(state, meta) of checkpoint `step`: `abstract_state` (a `TrainState` of
    `jax.ShapeDtypeStruct`s with shardings) filled in, straight into its shardings, its step
    `meta['data_step']`."""
    items = {name: ocp.args.StandardRestore(getattr(abstract_state, name)) for name in STATE_ITEMS}
    with drained_event_loops():
        out = mngr.restore(step, args=ocp.args.Composite(**items, meta=ocp.args.JsonRestore()))
    meta = dict(out.meta)
    data_step = np.asarray(int(meta["data_step"]), np.int32)
    where = abstract_state.step
    step_array = jax.make_array_from_callback((), where.sharding, lambda _: data_step)
    return abstract_state.replace(**{n: out[n] for n in STATE_ITEMS}, step=step_array), meta


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


_RESTORED, _DAMAGED, _UNREADABLE = 0, 1, 2


def _agreed(outcome: int) -> int:
    """The worst outcome of a restore over all processes (multi-host restores agree on each)."""
    if jax.process_count() == 1:
        return outcome
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray(outcome, np.int32))))


def put_back_command(moved: epath.Path, step_dir: epath.Path) -> str:
    """The shell command that puts a checkpoint moved aside back (run with no trainer running)."""
    return f"mv {shlex.quote(str(moved))} {shlex.quote(str(step_dir))}"


def _move_aside_all(mngr: ocp.CheckpointManager, steps: list[int], *, restored: int) -> None:
    """Moves the damaged `steps` aside (process 0; the others wait), logging for each the command
    that puts it back, then which steps the run will replay from `restored`."""
    directory = epath.Path(mngr.directory)
    if jax.process_index() == 0:
        for bad in steps:
            moved = move_aside(directory / str(bad))
            logging.warning(
                "moved the damaged checkpoint %d aside to %s; to put it back (no trainer "
                "running): %s",
                bad,
                moved,
                put_back_command(moved, directory / str(bad)),
            )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("vit_jax: damaged checkpoints moved aside")
    mngr.reload()
    newest = max(steps)
    replayed = f"step {newest}" if newest == restored + 1 else f"steps {restored + 1}-{newest}"
    logging.warning("resuming from step %d: %s will be replayed", restored, replayed)


def restore_newest(mngr: ocp.CheckpointManager, abstract_state) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the newest checkpoint that restores (`restore`); None if none exist.

    A newer damaged checkpoint (see the module docstring) is logged (step and reason) and, once
    an older one has restored, moved aside to `<step>.damaged`, with the command that puts it
    back and the steps that will be replayed. When none restores, nothing is moved and
    `CheckpointDamagedError` names each step and its reason. A checkpoint that cannot be read now
    raises `CheckpointUnreadableError` at once, with nothing moved.
    """
    directory = epath.Path(mngr.directory)
    check_step_entries(directory)
    failed: list[tuple[int, str]] = []
    for step in sorted(mngr.all_steps(), reverse=True):
        step_dir = directory / str(step)
        unreadable: CheckpointUnreadableError | None = None
        try:
            check_readable(step_dir)
            state, meta = restore(mngr, step, abstract_state)
            outcome, reason = _RESTORED, ""
        except CheckpointUnreadableError as e:
            outcome, unreadable = _UNREADABLE, e
        except Exception as e:  # noqa: BLE001 - sorted here: unreadable now, or damaged
            cause = unreadable_cause(e, step_dir)
            if cause is not None:
                outcome, unreadable = _UNREADABLE, unreadable_error(f"checkpoint {step}", cause)
            else:
                outcome, reason = _DAMAGED, failure_reason(e)
        outcome = _agreed(outcome)
        if outcome == _UNREADABLE:
            raise unreadable or unreadable_error(
                f"checkpoint {step}", f"{step_dir} cannot be read on another process (its log)"
            )
        if outcome == _DAMAGED:
            reason = reason or "damaged on another process"
            logging.warning("checkpoint %s cannot be restored: %s", step_dir, reason)
            failed.append((step, reason))
            continue
        if failed:
            _move_aside_all(mngr, [bad for bad, _ in failed], restored=step)
        return state, meta, step
    if failed:
        tried = "; ".join(f"step {s}: {r}" for s, r in failed)
        raise CheckpointDamagedError(
            f"{directory}: no checkpoint could be restored (tried {tried}); nothing was moved: "
            "move the damaged step directories aside or start a new --workdir"
        )
    return None


class _DemoteOrbaxErrors(py_logging.Filter):
    """Orbax's own ERROR records become INFO (seen with --verbose only): it logs a failed save
    several times over, before `CheckpointWriter` reports it once, as `CheckpointSaveError`."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        if record.levelno >= py_logging.ERROR and _ORBAX_CODE in record.pathname:
            record.levelno, record.levelname = py_logging.INFO, "INFO"
        return True


_ORBAX_CODE = os.sep + os.path.join("orbax", "checkpoint") + os.sep


@contextlib.contextmanager
def orbax_errors_demoted():
    """While open, Orbax's ERROR records (on absl's logger, where it logs) are INFO records."""
    demote = _DemoteOrbaxErrors()
    logger = py_logging.getLogger("absl")
    logger.addFilter(demote)
    try:
        yield
    finally:
        logger.removeFilter(demote)


class CheckpointWriter:
    """Orbax saves whose failures (async ones included) surface as `CheckpointSaveError`.

    `save` starts a save; `poll` (cheap, every step) and `wait` report a failed one. A failed
    save leaves nothing that looks complete (see `_discard`). Until `close`, Orbax's own error
    lines are INFO (`orbax_errors_demoted`): the failure is reported once, by us.
    """

    def __init__(self, mngr: ocp.CheckpointManager, *, async_save: bool):
        self.mngr, self.async_save = mngr, async_save
        self.directory = epath.Path(mngr.directory)
        self.pending: int | None = None
        self.failure: CheckpointSaveError | None = None
        self._demoted = contextlib.ExitStack()
        self._demoted.enter_context(orbax_errors_demoted())

    def save(self, step: int, state, meta: dict) -> None:
        self.wait()
        self.pending = step
        try:
            save(self.mngr, step, state, meta)
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
            finally:
                self._demoted.close()

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
