"""Feature files: one ``(T, D)`` array of per-frame video features per clip.

Layouts, detected by :meth:`FeatureStore.open`:

- flat: ``root/<id>.npy`` and/or ``root/<id>.pt``;
- ssvp_slt nested: ``root/<epoch>/<id[:5]>/<id>.pt`` (the numerically-first epoch unless one
  is chosen), or ``root/<id[:5]>/<id>.pt`` when ``root`` is one epoch's folder.

A ``.pt`` holds a tensor or a dict with ``features`` (and optional ``video_id`` / ``text``,
ignored here: the manifest is the source of texts). ``.pt`` files are read only through
:func:`sonar_ft.files.atomic.load_torch` (``weights_only=True``), ``.npy`` with ``allow_pickle=False``,
so no code from a user's file ever runs.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from sonar_ft.errors import CheckpointError, ConfigError, DataError
from sonar_ft.files.atomic import load_torch

log = logging.getLogger(__name__)

FEATURE_SUFFIXES: tuple[str, ...] = (".npy", ".pt")
MAX_LISTED = 10
_NPY_MAGIC = b"\x93NUMPY"
# Largest clip accepted, as float32: hours of 768-d frames at 25 fps. A header or a .pt declaring more
# (a forged or corrupt file) is refused before anything is allocated.
MAX_FEATURE_BYTES = 4 * 1024**3
# NumPy parses a .npy header with ast.literal_eval, and CPython 3.11's AST constructor is not
# thread-safe ("SystemError: AST constructor recursion depth mismatch"). Feature files are read from
# several threads (verify, the bad-sample scan), so headers are parsed one at a time; data reads
# stay parallel.
_NPY_HEADER_LOCK = threading.Lock()


def _is_feature_name(name: str) -> bool:
    # Names starting with "." are half-written temporaries (sonar_ft.files.atomic.TMP_PREFIX) or macOS
    # "._x.npy" resource forks that appear when a folder is copied to a shared drive.
    return not name.startswith(".") and os.path.splitext(name)[1] in FEATURE_SUFFIXES


def _scan(folder: Path) -> tuple[list[Path], list[Path]]:
    """Return (feature files, visible subfolders) directly inside ``folder``."""
    files: list[Path] = []
    dirs: list[Path] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                if not entry.name.startswith("."):
                    dirs.append(Path(entry.path))
            elif _is_feature_name(entry.name) and entry.is_file():
                files.append(Path(entry.path))
    return files, dirs


def _has_subdirs(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_dir() for e in entries)


class FeatureStore:
    """An index from clip id to feature file, built once by one walk of the folder."""

    def __init__(
        self, root: str | Path, paths: Mapping[str, Path], *, layout: str = "flat", epoch: str | None = None
    ) -> None:
        self.root = Path(root)
        self.layout = layout
        self.epoch = epoch
        self._paths = dict(paths)

    @classmethod
    def open(cls, root: str | Path, *, epoch: int | str | None = None) -> FeatureStore:
        """Index ``root`` (flat or ssvp_slt nested layout); ``epoch`` picks a nested epoch folder."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(
                f"features folder not found: {root}; pass the folder holding <id>.npy / <id>.pt "
                "files (or ssvp_slt's <epoch>/<prefix>/<id>.pt)"
            )
        files, dirs = _scan(root)
        # An epoch folder holds prefix folders; a prefix folder holds files. Checking for
        # subfolders keeps an all-digit prefix like "12345" from passing for an epoch.
        epochs = {d.name: d for d in dirs if d.name.isdigit() and _has_subdirs(d)}
        chosen: str | None = None
        if epochs:
            chosen = cls._pick_epoch(root, epochs, epoch)
            layout, shards = "nested", _scan(epochs[chosen])[1]
        elif epoch is not None:
            raise ConfigError(
                f"--epoch {epoch} was given but {root} has no numbered epoch folders; "
                "--epoch only applies to ssvp_slt's <epoch>/<prefix>/<id>.pt layout"
            )
        elif files:
            layout, shards = "flat", []
        else:
            layout, shards = "nested", dirs

        found: dict[str, list[Path]] = {}
        for path in files + [f for shard in sorted(shards) for f in _scan(shard)[0]]:
            found.setdefault(path.stem, []).append(path)
        if not found:
            raise DataError(
                f"no .npy or .pt feature files in {root}; expected <id>.npy / <id>.pt files, "
                "or ssvp_slt's <epoch>/<prefix>/<id>.pt"
            )
        clashes = {i: p for i, p in found.items() if len(p) > 1}
        if clashes:
            listed = "; ".join(
                f"{i}: {', '.join(str(p) for p in sorted(ps))}" for i, ps in sorted(clashes.items())[:MAX_LISTED]
            )
            raise DataError(
                f"{len(clashes)} clip id(s) have more than one feature file in {root} ({listed}); "
                "keep one file per id"
            )
        log.info("indexed %d feature files in %s (%s layout)", len(found), root, layout)
        return cls(root, {i: p[0] for i, p in found.items()}, layout=layout, epoch=chosen)

    @staticmethod
    def _pick_epoch(root: Path, epochs: Mapping[str, Path], epoch: int | str | None) -> str:
        by_number = sorted(epochs, key=int)
        if epoch is None:
            if len(by_number) > 1:
                log.info("%s has epochs %s; using %s (choose with --epoch)", root, ", ".join(by_number), by_number[0])
            return by_number[0]
        for name in by_number:
            if int(name) == int(epoch):
                return name
        raise DataError(f"epoch {epoch} not found in {root}; available: {', '.join(by_number)}")

    def ids(self) -> list[str]:
        """All clip ids with a feature file, sorted."""
        return sorted(self._paths)

    def path(self, clip_id: str) -> Path | None:
        """The feature file of ``clip_id``, or None."""
        return self._paths.get(clip_id)

    def _require(self, clip_id: str) -> Path:
        path = self._paths.get(clip_id)
        if path is None:
            raise DataError(f"no feature file for clip {clip_id!r} in {self.root}; run `sonar-ft verify`")
        return path

    def load(self, clip_id: str) -> torch.Tensor:
        """Features of ``clip_id`` as a ``(T, D)`` float32 tensor; DataError names the file."""
        return load_feature_file(self._require(clip_id))

    def num_frames(self, clip_id: str) -> int:
        """Frame count ``T`` of ``clip_id``, read without loading ``.npy`` data."""
        return feature_shape(self._require(clip_id))[0]

    def __contains__(self, clip_id: object) -> bool:
        return clip_id in self._paths

    def __len__(self) -> int:
        return len(self._paths)

    def __repr__(self) -> str:
        epoch = f", epoch={self.epoch}" if self.epoch is not None else ""
        return f"FeatureStore({str(self.root)!r}, {len(self)} files, {self.layout}{epoch})"


def check_feature_width(
    width: int, expected: int, *, features: str | Path, encoder: str | Path, clip: str | None = None,
) -> None:
    """Stop when the clips' features per frame are not the encoder's input size: the one check, and message, of
    training, ``--eval_only``, ``sonar-ft embed`` and ``sonar-ft translate``. ``clip`` names the clip seen."""
    if width != expected:
        seen = f" (clip {clip!r})" if clip is not None else ""
        raise DataError(
            f"the clips in {features} have {width} features per frame{seen} but the encoder {encoder} expects {expected}: "
            "use features from the extractor the encoder was trained with (SignHiera: 768), or the matching checkpoint"
        )


def _bad_file(path: Path, why: str) -> DataError:
    return DataError(f"feature file {path} {why}; re-extract or copy it again, or drop the clip from the manifest")


def _check_shape(path: Path, shape: tuple[int, ...]) -> None:
    if len(shape) == 2 and shape[1] > 0:
        return
    if len(shape) == 1:
        hint = "a 1-D array is one vector, not a sequence of frames"
    elif len(shape) == 3:
        hint = "if the first axis is a batch of one clip, save arr[0]"
    else:
        hint = "features must be one row per frame"
    raise DataError(
        f"feature file {path} holds an array of shape {tuple(shape)}; expected 2-D (frames T, "
        f"feature dim D > 0) ({hint}); re-save it or drop the clip from the manifest"
    )


def _read_npy(path: Path, mmap: bool) -> np.ndarray:
    """A .npy file as an array (memory-mapped with ``mmap``), with errors that name the file."""
    if path.stat().st_size == 0:
        raise _bad_file(path, "is empty (0 bytes)")
    with open(path, "rb") as f:
        if f.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            # Without the header np.load would treat the file as a pickle (refused, but cryptic).
            raise _bad_file(path, "is not a .npy file (no NumPy header)")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            with _NPY_HEADER_LOCK:
                if version == (1, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
                else:  # format 3.0 (unicode field names): rare; mapped first, so nothing is allocated unchecked
                    mapped = np.load(path, allow_pickle=False, mmap_mode="r")
                    _check_declared_size(path, mapped.shape, mapped.nbytes, mapped.nbytes)
                    return _checked(path, mapped if mmap else np.array(mapped))
            if dtype.hasobject:
                raise _bad_file(path, "holds Python objects, not numbers; refusing to unpickle it")
            order = "F" if fortran_order else "C"
            count = math.prod(shape)
            _check_declared_size(path, shape, count * dtype.itemsize, path.stat().st_size - f.tell())
            if mmap and count > 0:
                arr = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order)
            else:
                buffer = bytearray(count * dtype.itemsize)  # writable, so torch.from_numpy can share it
                got = f.readinto(buffer)
                if got != len(buffer):
                    raise EOFError(f"{got} of {len(buffer)} data bytes")
                arr = np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)
        except DataError:
            raise
        except (ValueError, OSError, EOFError) as exc:
            raise _bad_file(path, f"cannot be read ({exc}); it may be truncated") from None
    return _checked(path, arr)


def _check_declared_size(path: Path, shape: tuple[int, ...], declared: int, available: int) -> None:
    """Refuse a header declaring more data than the file holds or than a clip can be, before allocating."""
    if declared > available:
        raise _bad_file(
            path,
            f"cannot be read: its header declares an array of shape {tuple(shape)} ({declared:,} bytes) but the file "
            f"holds only {max(available, 0):,} bytes of data; it is truncated or its header is corrupt",
        )
    if math.prod(shape) * 4 > MAX_FEATURE_BYTES:
        raise _bad_file(
            path,
            f"declares an array of shape {tuple(shape)}, more than the {MAX_FEATURE_BYTES:,} bytes (as float32) "
            "one clip's features can need",
        )


def _checked(path: Path, arr: np.ndarray) -> np.ndarray:
    if arr.dtype.kind not in "iuf":
        raise _bad_file(path, f"has dtype {arr.dtype}; expected integer or floating-point numbers")
    _check_shape(path, arr.shape)
    return arr


def _read_pt(path: Path) -> torch.Tensor:
    try:
        obj = load_torch(path, what="feature file")
    except CheckpointError as exc:
        raise DataError(f"{str(exc).rstrip('.')}; or drop the clip from the manifest") from None
    if isinstance(obj, dict):
        if "features" not in obj:
            keys = ", ".join(repr(k) for k in list(obj)[:MAX_LISTED])
            raise DataError(
                f"feature file {path} is a dict without a 'features' entry (keys: {keys}); save "
                "a (T, D) tensor or {'features': tensor, 'video_id': ..., 'text': ...}"
            )
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise DataError(
            f"feature file {path} holds a {type(obj).__name__}, not a tensor; save a (T, D) tensor "
            "or {'features': tensor}"
        )
    if obj.is_complex() or obj.dtype == torch.bool:
        raise _bad_file(path, f"has dtype {obj.dtype}; expected integer or floating-point numbers")
    _check_shape(path, tuple(obj.shape))
    if obj.numel() * 4 > MAX_FEATURE_BYTES:
        raise _bad_file(
            path,
            f"holds a tensor of shape {tuple(obj.shape)}, more than the {MAX_FEATURE_BYTES:,} bytes (as float32) "
            "one clip's features can need",
        )
    return obj


def read_features(path: str | Path) -> tuple[torch.Tensor, str]:
    """Load one feature file as ``(float32 (T, D) tensor, dtype name as stored)``."""
    path = Path(path)
    suffix = path.suffix
    if suffix == ".npy":
        if not path.is_file():
            raise DataError(f"feature file not found: {path}")
        arr = _read_npy(path, mmap=False)
        # Values beyond float32's range become Inf, which callers check for and report.
        with np.errstate(over="ignore"):
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)), str(arr.dtype)
    if suffix == ".pt":
        tensor = _read_pt(path)
        stored = str(tensor.dtype).removeprefix("torch.")
        tensor = tensor.to(torch.float32).contiguous()
        # A saved slice drags its whole parent storage along; copy so caches hold only the clip.
        if tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        return tensor, stored
    raise DataError(f"feature file {path} has suffix {suffix!r}; expected one of {', '.join(FEATURE_SUFFIXES)}")


def load_feature_file(path: str | Path) -> torch.Tensor:
    """Load one ``.npy`` / ``.pt`` feature file as a ``(T, D)`` float32 tensor.

    Integer / float16 / float64 data is converted. Raises :class:`DataError` naming the file
    when it is missing, empty, truncated, not 2-D, or a ``.pt`` that would run code.
    """
    return read_features(path)[0]


def feature_shape(path: str | Path) -> tuple[int, int]:
    """``(T, D)`` of a feature file; ``.npy`` headers are read without loading the data."""
    path = Path(path)
    if path.suffix == ".npy":
        if not path.is_file():
            raise DataError(f"feature file not found: {path}")
        shape = _read_npy(path, mmap=True).shape
    elif path.suffix == ".pt":
        shape = tuple(_read_pt(path).shape)
    else:
        shape = tuple(read_features(path)[0].shape)  # raises the unknown-suffix error
    return int(shape[0]), int(shape[1])
