"""Crash-safe file writes and pickle-free loading.

Every file the project writes goes to a temporary name in the destination folder and is
renamed into place, so a kill at any instant never leaves a truncated file that a later run
trusts. Every ``.pt`` / ``.pth`` a user hands us is read with ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers: a pickle that would run code is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sonar_ft.errors import CheckpointError

TMP_PREFIX = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates the file 0600; give the result the permissions a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself survive a power loss / VM reset; not every file system allows it.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads write.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def is_temp_name(name: str) -> bool:
    """True for the temporary names :func:`atomic_path` writes to (left behind by a killed run)."""
    return name.startswith(TMP_PREFIX)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete half-written temporaries (``.tmp-*``) directly inside ``folder``; return them.

    Only call this on a folder no other live process writes to (e.g. a run's output folder
    when the run starts): there, any temporary is the remains of a process that was killed.
    """
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for path in folder.iterdir():
            if is_temp_name(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def commit_file(tmp: str | Path, path: str | Path) -> None:
    """Flush ``tmp`` to disk and rename it onto ``path`` (same folder): the last step of an atomic write.

    For writers that need a stable temporary name, e.g. a resumable download's ``.part`` file.
    """
    tmp, path = Path(tmp), Path(path)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write a binary file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (UTF-8, non-ASCII kept readable)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def append_lines(path: str | Path, lines: list[str]) -> None:
    """Append whole lines to a log-like file (``steps.jsonl``) and flush them to disk.

    Append-only files cannot be replaced atomically on every record; a line cut short by a crash
    is the last one, and readers skip it.
    """
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line.rstrip("\n") + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_torch(path: str | Path, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj``."""
    import torch  # here, not at the top: notebook kernels import this module without torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | Path, *, what: str = "file") -> Any:
    """Load a ``.pt`` / ``.pth`` file without running any code from it.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, not a torch
    file, or holds objects other than tensors and plain containers.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} is empty (0 bytes): {path}; download or copy it again")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # torch raises many types for bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise CheckpointError(
                f"{what} {path} contains Python objects that would have to be executed to load it; "
                "refusing to load it. Re-save it with only tensors (e.g. torch.save(model.state_dict()))."
            ) from None
        raise CheckpointError(
            f"cannot read {what} {path}: {msg}. The file may be truncated or not a torch file; "
            "download or copy it again."
        ) from None
