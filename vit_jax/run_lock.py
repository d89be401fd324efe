"""One trainer per workdir: an exclusive lock held for the whole run.

`{workdir}/train.lock` is locked with `fcntl.flock` and holds the holder's host, pid and start
time as JSON. The kernel releases a flock when its process dies, however it dies (SIGKILL
included), so a lock left behind by a dead trainer is free: the next trainer takes it over and
warns, naming the process it replaces. A second trainer on a live run gets `WorkdirLockedError`
naming the holder. The lock file is removed on release.

Where flock is unavailable (some network file systems) the file is created with `O_EXCL`
instead; then a record of a dead pid on this host is stale and replaced with a warning. Remote
workdirs (`gs://...`) cannot be locked; they are used unlocked, with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator

from absl import logging
from etils import epath

__all__ = [
    "LOCK_FILE",
    "RunLock",
    "WorkdirLockedError",
]


LOCK_FILE = "train.lock"


class WorkdirLockedError(RuntimeError):
    """Another live trainer holds the workdir (the message names it)."""


def _describe(holder: dict) -> str:
    return (
        f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
        f"started {holder.get('started', '?')}"
    )


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace")
    try:
        holder = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        holder = {}
    return holder if isinstance(holder, dict) else {}


def _read_holder_path(path: epath.Path) -> dict:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    try:
        return _read_holder(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


class RunLock:
    """The exclusive lock of one workdir; `acquire()` raises `WorkdirLockedError` when held."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = epath.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        if "://" in str(self.workdir):
            logging.warning("%s is remote: it cannot be locked against a 2nd trainer", self.workdir)
            return
        try:
            fd, previous = self._flock()
        except OSError as e:
            # A file system without flock (some network mounts): an O_EXCL file instead.
            logging.warning("%s: no flock (%s); using an exclusive lock file", self.path, e)
            fd, previous = self._create_exclusive()
        if previous:
            logging.warning(
                "taking over the lock of %s from a trainer that is no longer running (%s)",
                self.workdir,
                _describe(previous),
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_me()) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _locked_error(self, holder: dict, hint: str = "") -> WorkdirLockedError:
        return WorkdirLockedError(
            f"{self.workdir} is in use by another trainer ({_describe(holder)}); "
            f"stop it first or choose another --workdir{hint}"
        )

    def _flock(self) -> tuple[int, dict]:
        """(locked fd, the dead previous holder's record or {})."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise self._locked_error(holder) from None
            except OSError:
                os.close(fd)
                raise
            # The holder may have released (and unlinked) the file between our open and our
            # flock: then we locked an orphan inode; start again on the current file.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, _read_holder(fd)
            os.close(fd)

    def _create_exclusive(self) -> tuple[int, dict]:
        """O_EXCL creation; a record of a dead pid on this host is stale and replaced."""
        previous: dict = {}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                return fd, previous
            except FileExistsError:
                pass
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            holder = _read_holder(fd)
            os.close(fd)
            if holder.get("host") != socket.gethostname():
                raise self._locked_error(holder, f" (remove {self.path} if it has stopped)")
            if _pid_alive(int(holder.get("pid", -1))):
                raise self._locked_error(holder)
            previous = holder
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        raise self._locked_error(_read_holder_path(self.path))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        # Unlink while still holding the lock, so nobody can find a file we are about to free.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(fd)

    @contextlib.contextmanager
    def held(self) -> Iterator[RunLock]:
        self.acquire()
        try:
            yield self
        finally:
            self.release()
