"""A training run's directory as a weights source: the newest Orbax checkpoint that reads.

The reader side of the workdir layout (`vit_jax.workdir` writes it): `{run}/checkpoints/{step}/`
holds `params` (Orbax arrays) and `meta` (JSON: step, model config, class names, image size);
`{step}.damaged` directories are ones a trainer set aside. Reading never changes the run.

A checkpoint that fails to read is either *damaged* (its bytes are wrong: skipped here, set aside
by the trainer) or *unreadable now* (`CheckpointUnreadableError`: permission, I/O error, a dangling
link, a FIFO, a step folder gone; nothing is skipped or moved). `check_readable` and
`unreadable_cause` draw the line; `vit_jax.workdir`'s docstring states the rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vit_jax.weights import files
from vit_jax.weights.errors import CheckpointError, CheckpointNotFoundError

__all__ = [
    "CHECKPOINTS",
    "CheckpointDamagedError",
    "CheckpointUnreadableError",
    "METRICS_JSONL",
    "check_readable",
    "check_step_entries",
    "drained_event_loops",
    "failure_reason",
    "is_trained",
    "load_trained",
    "resolve",
    "step_dirs",
    "unreadable_cause",
    "unreadable_error",
]

CHECKPOINTS = "checkpoints"
METRICS_JSONL = "metrics.jsonl"  # with checkpoints/, what marks a directory as a run


class CheckpointDamagedError(CheckpointError):
    """Checkpoints exist but none can be read (the message names each step and why)."""


class CheckpointUnreadableError(CheckpointError):
    """A checkpoint that cannot be read now for a reason outside its bytes (permission denied,
    an I/O error, a dangling link, a FIFO, its folder gone). Nothing was skipped or moved; the
    message names the path and the error."""


def resolve(path: str | epath.Path) -> epath.Path:
    """Local paths made absolute (Orbax requires it); URLs (gs://...) unchanged."""
    text = str(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def failure_reason(error: BaseException) -> str:
    """One short line for why a checkpoint read or write failed (the root cause, not the stack).

    An OSError anywhere in the chain gives its text (`No space left on device`); otherwise the
    first line of the innermost exception (TensorStore / JSON / missing item), shortened.
    """
    chain = _chain(error)
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


def _step_dir_candidates(path: epath.Path, *, check: bool = False) -> list[epath.Path]:
    """`path` itself when it is a step directory, else the step directories under it
    (`check`: first refuse a step-named entry that is not a folder, `check_step_entries`)."""
    if any((path / name).exists() for name in ("meta", "params", "_CHECKPOINT_METADATA")):
        return [path]
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if check:
        check_step_entries(root)
    return step_dirs(root)


# --------------------------------------------------------------------- damaged or unreadable now

# errno values that say something about access to the bytes or the device, never about the
# bytes themselves. ENOENT is not one: a file missing from a step folder that is there is damage.
_ACCESS_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EACCES", "EPERM", "EIO", "EAGAIN", "EBUSY", "EINTR", "ETIMEDOUT", "ESTALE", "ENOTCONN",
        "ENXIO", "ENODEV", "ENOMEDIUM", "EREMOTEIO", "EMFILE", "ENFILE", "ENOMEM", "ELOOP",
        "ECONNRESET", "ECONNREFUSED", "ECONNABORTED", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH",
        "ENOLINK",
    )
    if hasattr(errno, name)
)  # fmt: skip
# TensorStore status codes (the start of its error messages) of the same kind, for the errors of
# remote stores that carry no errno.
_ACCESS_STATUSES = {
    "PERMISSION_DENIED": "permission denied",
    "UNAUTHENTICATED": "not authenticated",
    "UNAVAILABLE": "unavailable",
    "DEADLINE_EXCEEDED": "timed out",
    "RESOURCE_EXHAUSTED": "resource exhausted",
}


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in str(path)


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def unreadable_error(what: str, detail: str) -> CheckpointUnreadableError:
    """The one-line error for `what` (`checkpoint 60`) that cannot be read now, and why."""
    return CheckpointUnreadableError(
        f"cannot read {what}: {detail}; nothing was moved or changed: fix that and run the same "
        "command again"
    )


def _strerror(e: OSError) -> str:
    return e.strerror or (os.strerror(e.errno) if e.errno else str(e))


def _stat(path: str, what: str) -> os.stat_result:
    """os.stat of `path` (links followed); a dangling link or any OS error is unreadable."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            target = os.readlink(path)
            raise unreadable_error(
                what, f"{path} is a link to {target}, which does not exist"
            ) from None
        raise unreadable_error(what, f"{path} does not exist") from None
    except OSError as e:
        raise unreadable_error(what, f"{path}: {_strerror(e)}") from None


def check_step_entries(root: str | os.PathLike) -> None:
    """Refuses a step-named entry of `root` (`checkpoints/<digits>`) that is not a folder: a
    dangling link or a file. Orbax skips one silently and then cannot save that step."""
    if not _is_local(root):
        return
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    except OSError as e:
        raise unreadable_error(f"the checkpoints in {root}", f"{root}: {_strerror(e)}") from None
    for name in names:
        if re.fullmatch(r"\d+", name):
            path = os.path.join(root, name)
            mode = _stat(path, f"checkpoint {name}").st_mode
            if not stat.S_ISDIR(mode):
                raise unreadable_error(
                    f"checkpoint {name}", f"{path} is {files.kind_of(mode)}, not a folder"
                )


def check_readable(step_dir: str | os.PathLike) -> None:
    """Raises `CheckpointUnreadableError` unless every entry under `step_dir` can be opened for
    reading: the folder gone, a dangling link, a folder or file that cannot be opened (permission,
    I/O error), or anything but a folder or regular file (a FIFO, socket or device: refused by
    its type and never opened, as a FIFO would block the reader). Reads no data. Local paths
    only (a remote store's errors are classified by `unreadable_cause`)."""
    if not _is_local(step_dir):
        return
    step_dir = os.fspath(step_dir)
    what = f"checkpoint {os.path.basename(step_dir)}"
    seen: set[tuple[int, int]] = set()
    pending = [step_dir]
    while pending:
        path = pending.pop()
        st = _stat(path, what)
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:  # a link back up: already checked
                continue
            seen.add((st.st_dev, st.st_ino))
            try:
                names = os.listdir(path)
            except OSError as e:
                raise unreadable_error(what, f"{path}: {_strerror(e)}") from None
            pending += [os.path.join(path, n) for n in sorted(names, reverse=True)]
        elif stat.S_ISREG(st.st_mode):
            try:
                os.close(os.open(path, os.O_RDONLY))
            except OSError as e:
                raise unreadable_error(what, f"{path}: {_strerror(e)}") from None
        else:
            raise unreadable_error(
                what, f"{path} is {files.kind_of(st.st_mode)}, not a regular file (not opened)"
            )


def _path_in(text: str) -> str | None:
    """The last quoted path on the first line of a TensorStore message (the file it failed on;
    later lines hold its spec, with escaped quotes)."""
    first = text.splitlines()[0] if text else ""
    paths = re.findall(r'"((?:/|[a-z][a-z0-9+.-]*://)[^"\\]+)"', first)
    return paths[-1] if paths else None


def unreadable_cause(error: BaseException, step_dir: str | os.PathLike) -> str | None:
    """Why a failed read of `step_dir` says nothing about its bytes (`PATH: Permission denied`),
    or None when it does (the checkpoint is damaged). Unreadable: a permission or I/O error
    (an errno of access or of the device, anywhere in the chain or in TensorStore's message),
    TensorStore's PERMISSION_DENIED / UNAVAILABLE / ..., running out of memory, the step folder
    gone. Damaged: everything else, e.g. a truncated or undecodable array or JSON, a file or item
    missing from a step folder that is there (`NOT_FOUND`, `FileNotFoundError`, `KeyError`)."""
    for e in _chain(error):
        if isinstance(e, MemoryError):
            return "out of memory"
        if isinstance(e, OSError) and e.errno in _ACCESS_ERRNOS:
            return f"{e.filename or step_dir}: {_strerror(e)}"
        text = str(e)
        code = re.search(r"os_error_code=\W*(\d+)", text)
        if code and int(code.group(1)) in _ACCESS_ERRNOS:
            return f"{_path_in(text) or step_dir}: {os.strerror(int(code.group(1)))}"
        status = re.match(r"\s*([A-Z_]+):", text)
        if status and status.group(1) in _ACCESS_STATUSES:
            return f"{_path_in(text) or step_dir}: {_ACCESS_STATUSES[status.group(1)]}"
    if not epath.Path(step_dir).is_dir():
        return f"{step_dir} does not exist"
    return None


class _DrainingEventLoop(asyncio.SelectorEventLoop):
    """An event loop that, asked to close, first lets its pending tasks finish (60 s at most)."""

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            if pending:
                done, _ = self.run_until_complete(asyncio.wait(pending, timeout=60))
                for task in done:  # retrieved: no "Task exception was never retrieved" later
                    if not task.cancelled():
                        task.exception()
        super().close()


_loops_lock = threading.Lock()
_loops_depth = 0
_loops_saved: Any = None


@contextlib.contextmanager
def drained_event_loops() -> Iterator[None]:
    """Orbax's reads run in a fresh event loop that it closes when they end. When one read
    fails, the others are still in TensorStore, and each, when done, calls back into the closed
    loop: `RuntimeError: Event loop is closed`, a traceback apiece. Inside this context new event
    loops wait for their pending tasks before they close, so no callback finds one closed."""
    global _loops_depth, _loops_saved
    base = getattr(asyncio, "DefaultEventLoopPolicy", None)  # (policies go in Python 3.16)
    if base is None:
        yield
        return

    class DrainingPolicy(base):
        def new_event_loop(self):
            return _DrainingEventLoop()

    with _loops_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # policies: deprecated in 3.14
        if _loops_depth == 0:
            _loops_saved = asyncio.get_event_loop_policy()
            asyncio.set_event_loop_policy(DrainingPolicy())
        _loops_depth += 1
    try:
        yield
    finally:
        with _loops_lock, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            _loops_depth -= 1
            if _loops_depth == 0:
                asyncio.set_event_loop_policy(_loops_saved)
                _loops_saved = None


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
    A newer damaged checkpoint is skipped with a warning and left where it is (a reader never
    changes a run). Raises `CheckpointNotFoundError` when there is no checkpoint,
    `CheckpointUnreadableError` when one cannot be read now (permission, I/O error, a dangling
    link, a FIFO: its older ones are not taken instead), `CheckpointDamagedError` (naming each
    step tried and why) when none reads.
    """
    path = resolve(path)
    candidates = _step_dir_candidates(path, check=True) if path.is_dir() else []
    if not candidates:
        raise CheckpointNotFoundError(
            f"{path}: no trainer checkpoint found (expected a workdir with checkpoints/<step>/ "
            "or a step directory holding 'params' and 'meta')"
        )
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    tried: list[str] = []
    try:
        for step_dir in candidates:
            check_readable(step_dir)
            try:
                with drained_event_loops():
                    restored = checkpointer.restore(
                        step_dir,
                        args=ocp.args.Composite(
                            params=ocp.args.StandardRestore(_on_one_device(step_dir)),
                            meta=ocp.args.JsonRestore(),
                        ),
                    )
                params = jax.tree.map(np.asarray, restored.params)
                meta = dict(restored.meta)
            except Exception as e:  # noqa: BLE001 - sorted below: unreadable now, or damaged
                cause = unreadable_cause(e, step_dir)
                if cause is not None:
                    raise unreadable_error(f"checkpoint {step_dir.name}", cause) from e
                reason = failure_reason(e)
                logging.warning("skipping checkpoint %s: it is damaged (%s)", step_dir, reason)
                tried.append(f"{step_dir.name}: {reason}")
                continue
            if tried:
                logging.warning("using checkpoint %s, the newest that reads", step_dir)
            return params, meta
    finally:
        checkpointer.close()
    raise CheckpointDamagedError(f"{path}: no checkpoint could be read (tried {'; '.join(tried)})")
