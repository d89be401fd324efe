"""The weights layer's files themselves: nothing odd is opened, nothing existing is clobbered.

Reading: `check_regular(path)` before a file is opened. A FIFO, socket or device named as a
weights, index or config file would block the reader forever (or read without end); it is one
error naming the path instead, and it is never opened.

Writing: `staged_dir` (a model folder: transformers, an export) and `staged_files` (a weights
file and its JSON sidecar) hand the writer a fresh staging folder beside the destination,
`.NAME.vit_jax-staging-HOST-PID-XXXXXXXX`. When the writer's block ends without error, what it
wrote becomes the destination; on any error the staging folder is removed. An existing
destination is refused (`DestinationExistsError`) unless `overwrite`; then it is replaced whole:
a folder is renamed aside (`.NAME.vit_jax-replaced-HOST-PID-XXXXXXXX`), the staging folder
renamed in and the old one removed, so the destination holds either the old files or the new,
never a mix. A process killed midway leaves its staging folder; the next write to the same
destination removes those whose process (same host, same PID) is gone, and renames back a
folder set aside whose replacement never arrived. Nothing else is ever deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from absl import logging

from vit_jax.weights.errors import CheckpointError

__all__ = [
    "DestinationExistsError",
    "check_dir",
    "check_files",
    "check_regular",
    "clean_stale",
    "kind_of",
    "ordinary_mode",
    "staged_dir",
    "staged_files",
]

_MARK = ".vit_jax-"
_STAGING, _REPLACED = "staging", "replaced"
_TOKEN = re.compile(r"^(?P<kind>staging|replaced)-(?P<host>.+)-(?P<pid>\d+)-(?P<token>[a-z0-9_]+)$")
_KINDS = (
    (stat.S_ISREG, "a file"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def kind_of(mode: int) -> str:
    """What an `os.stat` mode is, in words ("a FIFO (named pipe)"), for error messages."""
    return next((name for test, name in _KINDS if test(mode)), "not a plain file")


class DestinationExistsError(CheckpointError):
    """A destination a writer will not replace: `path`, `reason` and whether `overwrite` would."""

    def __init__(self, path: str | os.PathLike, reason: str, *, overwritable: bool):
        self.path, self.reason, self.overwritable = str(path), reason, overwritable
        hint = "; refusing to overwrite it (overwrite=True replaces it)" if overwritable else ""
        super().__init__(f"{self.path}: {reason}{hint}")

    def for_cli(self, flag: str = "--overwrite") -> str:
        """The message for a CLI whose `flag` asks for the replacement."""
        hint = f"; pass {flag} to replace it" if self.overwritable else ""
        return f"{self.path}: {self.reason}{hint}"


# ----------------------------------------------------------------------------- reading


def check_regular(path: str | os.PathLike) -> None:
    """Raises CheckpointError when `path` exists and is not a regular file (symlinks followed);
    never opens it. A missing path passes (the caller reports it in its own words)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    if stat.S_ISREG(mode):
        return
    raise CheckpointError(f"{path}: is {kind_of(mode)}, not a regular file (refused, never opened)")


# ----------------------------------------------------------------------------- writing


def ordinary_mode(path: str | os.PathLike, *, directory: bool = False) -> None:
    """The permissions an ordinary new file (or directory) gets under the umask: temporary
    files and safetensors' writer create them owner-only."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:32] or "host"


def _key(name: str) -> str:
    """The destination's name as it appears in its staging names (long names shortened)."""
    if len(name) <= 100:
        return name
    return f"{name[:80]}~{hashlib.sha256(name.encode()).hexdigest()[:12]}"


def _prefix(dst: Path, kind: str) -> str:
    return f".{_key(dst.name)}{_MARK}{kind}-{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale(dst: str | os.PathLike) -> list[Path]:
    """Removes what a killed writer of `dst` left beside it; returns what it removed.

    Only entries named as our staging names for this destination, made on this host by a
    process that no longer runs. A folder set aside by an interrupted replacement is removed
    when `dst` is there (the replacement finished) and renamed back to `dst` when it is not.
    """
    dst = Path(os.path.abspath(dst))
    head = f".{_key(dst.name)}{_MARK}"
    host = _host()
    removed = []
    try:
        entries = list(os.scandir(dst.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(head):
            continue
        m = _TOKEN.match(entry.name[len(head) :])
        if not m or m["host"] != host or _alive(int(m["pid"])):
            continue
        path = Path(entry.path)
        if m["kind"] == _REPLACED and not os.path.lexists(dst):
            logging.warning("%s: restoring it from %s (an interrupted replacement)", dst, path)
            os.rename(path, dst)
            continue
        if m["kind"] == _STAGING and (entry.is_symlink() or not entry.is_dir()):
            continue  # we only ever make folders
        logging.info("removing %s, left by a writer that was stopped", path)
        _remove(path)
        removed.append(path)
    return removed


def _make_staging(dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(dst, _STAGING), dir=dst.parent))
    ordinary_mode(staging, directory=True)
    return staging


def check_dir(
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    replaceable: Callable[[Path], str | None] | None = None,
) -> None:
    """Raises DestinationExistsError unless a folder can be written at `dst`: nothing there,
    an empty folder, or (with `overwrite`) a folder `replaceable` finds nothing against
    (it returns why not: e.g. the folder is not a model folder at all)."""
    dst = Path(dst)
    if not os.path.lexists(dst):
        return
    if not dst.is_dir():
        raise DestinationExistsError(dst, "exists and is not a directory", overwritable=False)
    if not any(dst.iterdir()):
        return
    if not overwrite:
        raise DestinationExistsError(dst, "exists and is not empty", overwritable=True)
    problem = replaceable(dst) if replaceable else None
    if problem:
        raise DestinationExistsError(dst, problem, overwritable=False)


def _names(dst: Path, companions: Sequence[str]) -> list[str]:
    return [*dict.fromkeys([*companions, dst.name])]


def check_files(
    dst: str | os.PathLike, companions: Sequence[str] = (), *, overwrite: bool = False
) -> None:
    """Raises DestinationExistsError unless the file `dst` (and its `companions`, names beside
    it such as its sidecar) can be written: none exists, or `overwrite` and none is a folder."""
    dst = Path(dst)
    for name in dict.fromkeys([dst.name, *companions]):
        path = dst.parent / name
        if not os.path.lexists(path):
            continue
        if path.is_dir():
            raise DestinationExistsError(path, "is a directory", overwritable=False)
        if not overwrite:
            reason = "exists" if name == dst.name else f"exists (the JSON sidecar of {dst.name})"
            raise DestinationExistsError(path, reason, overwritable=True)


@contextlib.contextmanager
def staged_dir(
    dst: str | os.PathLike,
    *,
    overwrite: bool = False,
    replaceable: Callable[[Path], str | None] | None = None,
) -> Iterator[Path]:
    """Yields an empty staging folder that becomes the folder `dst` when the block succeeds.

    Refused as `check_dir` says, before the block runs; removed on any error.
    """
    shown, dst = dst, Path(os.path.abspath(dst))  # errors name the path as given
    clean_stale(dst)
    check_dir(shown, overwrite=overwrite, replaceable=replaceable)
    staging = _make_staging(dst)
    try:
        yield staging
        check_dir(shown, overwrite=overwrite, replaceable=replaceable)  # unchanged meanwhile
        if os.path.lexists(dst) and not (dst.is_dir() and not any(dst.iterdir())):
            aside = dst.parent / staging.name.replace(f"{_MARK}{_STAGING}-", f"{_MARK}{_REPLACED}-")
            os.rename(dst, aside)
            try:
                os.rename(staging, dst)
            except BaseException:
                os.rename(aside, dst)
                raise
            _remove(aside)
        else:
            os.rename(staging, dst)  # onto an empty folder too (POSIX rename replaces it)
    finally:
        if os.path.lexists(staging):
            _remove(staging)


@contextlib.contextmanager
def staged_files(
    dst: str | os.PathLike, companions: Sequence[str] = (), *, overwrite: bool = False
) -> Iterator[Path]:
    """Yields an empty staging folder: the writer puts `dst.name` (and any of `companions`,
    names beside `dst`) in it; when the block succeeds they replace those beside `dst`.

    Refused as `check_files` says, before the block runs. With `overwrite`, a companion the
    writer did not write is removed (an old sidecar would describe the new weights).
    Companions move first, `dst` last, each in one rename.
    """
    shown, dst = dst, Path(os.path.abspath(dst))  # errors name the path as given
    clean_stale(dst)
    check_files(shown, companions, overwrite=overwrite)
    staging = _make_staging(dst)
    try:
        yield staging
        check_files(shown, companions, overwrite=overwrite)  # unchanged meanwhile
        for name in _names(dst, companions):
            new, old = staging / name, dst.parent / name
            if os.path.lexists(new):
                ordinary_mode(new)
                os.replace(new, old)
            elif os.path.lexists(old):
                old.unlink()
    finally:
        if os.path.lexists(staging):
            _remove(staging)
