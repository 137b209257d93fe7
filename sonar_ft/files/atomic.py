"""Crash-safe file writes and pickle-free loading.

Every file the project writes goes to a temporary name in the destination folder and is
renamed into place, so a kill at any instant never leaves a truncated file that a later run
trusts. Every ``.pt`` / ``.pth`` a user hands us is read with ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers: a pickle that would run code is refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import errno
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from sonar_ft.errors import CheckpointError, DiskFullError
from sonar_ft.run_files import LAST_STATE

if TYPE_CHECKING:  # torch is imported where it is used: notebook kernels import this module without it
    import torch

TMP_PREFIX = ".tmp-"
# Largest tensor data a .pt file handed to us may expand to (a feature clip is megabytes; the biggest
# SONAR encoder ~3 GB): larger declared sizes are refused before anything is allocated.
MAX_TENSOR_BYTES = 32 * 1024**3
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch's C++ zip writer given a path reports a failed write without its errno, in one of these texts.
_TORCH_WRITE_FAILED = ("file write failed", "PytorchStreamWriter failed writing", "unexpected pos")
# Any other writer that loses the errno (safetensors' Rust writer) is taken for a full disk when this little is left.
_NEARLY_FULL_BYTES = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | Path, *, needed: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    When the disk fills up on the way, the temporary is removed and :class:`DiskFullError` says so in one
    line, with ``needed`` (the bytes the file takes, when the caller knows them) and the free space:
    ``path`` itself, and every other file, are as they were.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            # mkstemp creates the file 0600; give the result the permissions a plain open() would.
            os.chmod(tmp_path, 0o666 & ~_UMASK)
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
        except Exception as exc:
            if not is_disk_full(exc, path.parent):
                raise
            written = _size(tmp_path)
            if tmp_path is not None:
                with contextlib.suppress(OSError):
                    tmp_path.unlink()  # frees what the failed write took, so the free space shown is real
            raise disk_full_error(path, exc, needed=needed, written=written) from exc
        _fsync_dir(path.parent)
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def explain_full_disk(path: str | Path, *, needed: int | None = None, appended: bool = False) -> Iterator[None]:
    """Turn a full disk during the block's writes of ``path`` into :class:`DiskFullError` (one line, see
    :func:`disk_full_error`), for writers that cannot go through :func:`atomic_path` (appended logs, TensorBoard)."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc, Path(path).absolute().parent):
            raise
        raise disk_full_error(Path(path), exc, needed=needed, appended=appended) from exc


def _size(path: Path | None) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def _os_error(exc: BaseException) -> OSError | None:
    """The first OSError with an errno in ``exc``'s chain: torch's zip writer, given a file object, turns the
    OSError of the failed write into a RuntimeError ("unexpected pos 704 vs 598") raised while handling it."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        current = current.__cause__ or current.__context__
    return None


def is_disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether ``exc``, raised while writing into ``folder``, means the disk is full (or the file over its size limit)."""
    if isinstance(exc, DiskFullError):
        return False  # already explained by an inner atomic_path
    os_error = _os_error(exc)
    if os_error is not None:
        return os_error.errno in _DISK_FULL_ERRNOS
    if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _TORCH_WRITE_FAILED):
        return True
    # No errno to go by: the disk itself says whether it is full.
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def disk_full_error(
    path: Path, exc: BaseException, *, needed: int | None = None, written: int = 0, appended: bool = False,
    kept: str | None = None,
) -> DiskFullError:
    """The one-line error for a write of ``path`` that failed for lack of space.

    It names the file and its folder, the space the file needs (``needed`` bytes when known, else more than
    the ``written`` bytes that got onto the disk), the space free, and that nothing was lost: an atomic write
    leaves the previous file as it was; an append (``appended``) keeps the lines written before; other
    writers say what is intact in ``kept``.
    """
    folder = path.absolute().parent
    try:
        free = f"{_megabytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    if needed:
        need = f"it needs about {_megabytes(max(needed, written))}"
    elif written:
        need = f"it needs more than the {_megabytes(written)} written before the disk filled up"
    else:
        need = "it needs more space than is left"
    os_error = _os_error(exc)
    cause = os_error.strerror if os_error is not None and os_error.strerror else str(exc).strip().splitlines()[-1]
    if kept is None:
        kept = (f"the lines written to {path.name} before are intact" if appended
                else f"the previous {path.name}, if there was one, is intact")
    error = DiskFullError(
        f"cannot write {path.name} in {folder}: the disk is full ({need}, {free}; {cause}). Nothing was lost: {kept}, "
        "as is every other file. Free some space (or choose an output folder on another disk) and run again."
    )
    error.errno = errno.ENOSPC
    return error


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
    with atomic_path(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a UTF-8 text file."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (UTF-8, non-ASCII kept readable)."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def append_lines(path: str | Path, lines: list[str]) -> None:
    """Append whole lines to a log-like file (``steps.jsonl``) and flush them to disk.

    Append-only files cannot be replaced atomically on every record; a line cut short by a crash
    is the last one, and readers skip it.
    """
    data = "".join(line.rstrip("\n") + "\n" for line in lines)
    with explain_full_disk(path, needed=len(data.encode("utf-8")), appended=True), open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def save_torch(path: str | Path, obj: Any) -> None:
    """Atomically ``torch.save`` ``obj``; a full disk is a :class:`DiskFullError` naming the space needed."""
    import torch  # here, not at the top: notebook kernels import this module without torch

    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for _, t in _tensors(obj, "")}
    needed = sum(storages.values())
    # Through a Python file object: torch's zip writer then fails with the OSError (ENOSPC) of the write itself;
    # given a path, its C++ writer reports "unexpected pos 576 vs 534" and the errno is lost.
    with atomic_path(path, needed=needed or None) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def load_torch(path: str | Path, *, what: str = "file", fix: str | None = None, mmap: bool = False) -> Any:
    """Load a ``.pt`` / ``.pth`` file without running any code from it.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, not a torch
    file (an HTML page saved under a .pth name is recognised as such), holds objects other than
    tensors and plain containers, or declares tensors larger than :data:`MAX_TENSOR_BYTES` or
    larger than the data it stores (a stride-0 tensor expanding to terabytes when copied). These
    sizes are checked before any tensor is materialised. ``fix`` replaces the default advice
    ("download or copy it again") for files we wrote ourselves.

    ``mmap``: map the file instead of reading it (files in torch's zip format; a legacy file is read
    whole): tensors are file-backed and copy-on-write, pages are read when touched and can be dropped
    again by the kernel, so a 9 GB ``last.pt`` costs no 9 GB of host RAM on resume. Every check above
    holds the same: they read the zip directory and the tensors' sizes, never their data.
    """
    path = Path(path)
    if fix is None:
        fix = _LAST_STATE_FIX if path.name == LAST_STATE else "download or copy it again"
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{what} is empty (0 bytes): {path}; {fix}")
    zipped = _check_torch_container(path, what, fix)
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except Exception as exc:  # torch raises many types for bad files
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise CheckpointError(
                f"{what} {path} contains Python objects that would have to be executed to load it; "
                "refusing to load it. Re-save it with only tensors (e.g. torch.save(model.state_dict()))."
            ) from None
        if "out of bounds for storage" in str(exc):
            raise CheckpointError(
                f"{what} {path} declares a tensor larger than the data it stores ({msg}); it is corrupt or crafted; {fix}"
            ) from None
        raise CheckpointError(
            f"cannot read {what} {path}: {msg}. The file may be truncated or not a torch file; {fix}."
        ) from None
    check_tensor_sizes(obj, path, what=what)
    return obj


_LAST_STATE_FIX = (
    "it is the training state of this run folder: re-run with --overwrite to start the run again, or start a new "
    "run from its best encoder with --encoder_checkpoint RUN/best_encoder.pt"
)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"  # torch's legacy (pre-1.6) format starts with a pickle protocol marker


def _check_torch_container(path: Path, what: str, fix: str) -> bool:
    """Refuse what is not a torch file, and zip records larger than :data:`MAX_TENSOR_BYTES`, before torch reads it.

    Returns True for torch's zip format, False for its legacy format."""
    with open(path, "rb") as f:
        head = f.read(2048)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                declared = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(
                f"cannot read {what} {path}: {exc}. The file may be truncated or not a torch file; {fix}."
            ) from None
        if declared > MAX_TENSOR_BYTES:
            raise CheckpointError(
                f"{what} {path} declares {declared:,} bytes of data ({path.stat().st_size:,} bytes on disk), more than "
                f"the {MAX_TENSOR_BYTES:,} bytes any sonar-ft file needs; refusing to unpack it"
            )
        return True
    if head.startswith(_PICKLE_PROTO):
        # torch's legacy format opens with its magic number as a pickled long (opcode 0x8a), after an
        # optional frame header; any other pickle is not a torch file.
        if b"\x8a" in head[2:16]:
            return False
        raise CheckpointError(
            f"{what} {path} is not a PyTorch checkpoint (it is a plain Python pickle, which could run code when "
            f"loaded; refusing it); {fix}"
        )
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<?xml")) or b"<html" in text:
        looks = "an HTML page — e.g. a Google Drive virus-scan or sign-in page saved instead of the file"
    elif _is_text(head):
        looks = "a text file"
    else:
        looks = "random bytes"
    raise CheckpointError(f"{what} {path} is not a PyTorch checkpoint (it looks like {looks}); {fix}")


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 0x20 or b in b"\t\r\n" for b in head)


def check_tensor_sizes(obj: Any, path: str | Path, *, what: str = "file", limit: int = MAX_TENSOR_BYTES) -> None:
    """Refuse tensors in ``obj`` that would expand beyond their stored data or beyond ``limit`` bytes when copied.

    A tensor saved with stride 0 (``torch.zeros(1).expand(10**12)``) stores one number but becomes
    terabytes on ``.contiguous()`` / ``.to(dtype)``. Checked from sizes alone: nothing is allocated.
    """
    for name, tensor in _tensors(obj, ""):
        dense = tensor.numel() * tensor.element_size()
        stored = tensor.untyped_storage().nbytes()
        where = f"{what} {path}" + (f" ({name})" if name else "")
        if dense > limit:
            raise CheckpointError(
                f"{where} declares a tensor of shape {tuple(tensor.shape)} ({dense:,} bytes), more than the "
                f"{limit:,} bytes any sonar-ft file needs; refusing to load it"
            )
        if dense > stored and tensor.numel() > 1:
            raise CheckpointError(
                f"{where} holds a tensor of shape {tuple(tensor.shape)} with strides {tuple(tensor.stride())} that "
                f"stores {stored:,} bytes but expands to {dense:,} (a stride-0 / overlapping view); it is corrupt or "
                "crafted. Re-save it with tensor.contiguous()"
            )


def _tensors(obj: Any, prefix: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    if depth > 64:
        return
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key), depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{i}]", depth + 1)


def file_sha256(path: str | Path, limit: int | None = 1 << 26) -> str:
    """SHA-256 of a file; with ``limit`` (manifests: 64 MiB) over at most that many first bytes."""
    h = hashlib.sha256()
    left = limit if limit is not None else math.inf
    with open(path, "rb") as f:
        while left > 0:
            chunk = f.read(int(min(1 << 24, left)))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


@functools.lru_cache(maxsize=16)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path, limit=None)


def checkpoint_sha256(path: str | Path) -> str | None:
    """SHA-256 of a whole checkpoint (remembered per size and modification time: tuning trials share it)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return _cached_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
