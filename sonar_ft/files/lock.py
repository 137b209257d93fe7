"""One writer per output: an exclusive lock held for a command's whole life.

Two runs writing the same ``--output_dir`` would leave a folder mixing both (the config of one,
the optimiser state of the other). :func:`output_lock` takes an exclusive ``flock`` on a lock file
(``FOLDER/.sonar-ft.lock`` for a folder, ``.NAME.lock`` beside a single output file) and writes a
JSON record of the holder into it (PID, host, start time, command). A second writer is refused at
once with a message naming the holder. The kernel drops a ``flock`` when its process dies, however
it dies (SIGKILL, Colab disconnect), so the lock of a killed run is simply taken over; its record
is only used to say so.

The lock file is removed when the holder ends. Whoever gets the lock checks afterwards that the
file it locked is still the one at the path (a holder that just ended may have removed it), and
tries again otherwise, so two processes never both believe they hold it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from sonar_ft.errors import OutputDirError

log = logging.getLogger(__name__)

LOCK_NAME = ".sonar-ft.lock"
_ATTEMPTS = 20  # rounds of "locked a file that was removed meanwhile" before giving up (never reached in practice)


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock: written as JSON into the lock file."""

    pid: int
    host: str
    started: str  # ISO-8601 UTC
    command: str

    def describe(self) -> str:
        """``PID 123 on host x, started 2026-01-01T10:00:00Z (sonar-ft embed)``."""
        return f"PID {self.pid} on host {self.host}, started {self.started} ({self.command})"


def lock_path(target: str | Path, *, folder: bool = True) -> Path:
    """The lock file guarding ``target``: inside it for a folder, ``.NAME.lock`` beside it for a file."""
    target = Path(target)
    return target / LOCK_NAME if folder else target.parent / f".{target.name}.lock"


def is_lock_name(name: str) -> bool:
    """True for the names of lock files (so folder checks can ignore them)."""
    return name == LOCK_NAME or (name.startswith(".") and name.endswith(".lock"))


def read_holder(path: str | Path) -> LockHolder | None:
    """The record in a lock file, or None when it is missing, empty or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return LockHolder(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"


@contextlib.contextmanager
def output_lock(target: str | Path, *, command: str | None = None, folder: bool = True) -> Iterator[LockHolder]:
    """Hold an exclusive lock on the output ``target`` for the ``with`` block; yield this holder's record.

    ``folder=True``: ``target`` is an output folder (created if needed) and the lock file lives in it;
    ``folder=False``: ``target`` is one output file and the lock file sits beside it. Raises
    :class:`OutputDirError` naming the holder (PID, host, start time, command) when another live
    process holds it; a lock left by a killed process is taken over with a log line.
    """
    target = Path(target)
    path = lock_path(target, folder=folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create {path.parent}: {exc.strerror or exc}. Choose a writable location.") from None
    me = LockHolder(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        command=command or _command_line(),
    )
    fd = _acquire(path, target)
    try:
        previous = _read_fd(fd)
        if previous is not None and previous.pid != me.pid:
            log.info("%s was locked by %s, which is no longer running: taking it over", target, previous.describe())
        _write_fd(fd, me)
        yield me
    finally:
        # Remove the file while still holding the lock: a waiter that opened it sees it was removed and retries.
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                path.unlink()
        os.close(fd)  # releases the flock


def _acquire(path: Path, target: Path) -> int:
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputDirError(f"cannot create the lock file {path}: {exc.strerror or exc}. Choose a writable location.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_fd(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputDirError(f"cannot lock {path}: {exc.strerror or exc}") from None
            who = holder.describe() if holder else "another process (its record is not written yet)"
            raise OutputDirError(
                f"{target} is in use by {who}. Wait for it to finish, stop it (kill {holder.pid if holder else 'PID'}), "
                "or choose another output."
            ) from None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # the holder that just ended removed this file; lock the new one
    raise OutputDirError(f"cannot lock {path}: it keeps being replaced by another process")


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_fd(fd: int) -> LockHolder | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        data = json.loads(raw.decode("utf-8"))
        return LockHolder(int(data["pid"]), str(data["host"]), str(data["started"]), str(data["command"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_fd(fd: int, holder: LockHolder) -> None:
    # Written in place, not renamed: the lock belongs to this file's inode.
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(asdict(holder)) + "\n").encode("utf-8"))
    with contextlib.suppress(OSError):
        os.fsync(fd)
