"""Feature folders as one archive, and onto the runtime's local disk once per runtime.

A Drive mount serves a folder of 31k small files slowly (every open is a round trip) and is where
Colab reports "Input/output error". So the features travel as one file:

- :func:`pack_features`: a feature folder → one uncompressed ``.tar`` (features barely compress)
  whose last member, :data:`INDEX_NAME`, lists every file's relative path, size and SHA-256;
  written atomically (a kill leaves no half archive under the final name). With ``dtype="fp16"``
  every file is stored as a float16 ``.npy``: half the bytes (How2Sign's ~19 GB of float32 features
  fit a free 15 GB Drive), read back as float32 like any other file.
- :func:`localize_features`: an archive (or a plain folder) → a folder on local disk, every file
  checked against the index (sizes, and checksums for archives), with a stamp that names the
  source, so a second call in the same runtime does nothing.

Training then reads only the local copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from sonar_ft.data.features import FEATURE_SUFFIXES, read_features
from sonar_ft.errors import ConfigError, DataError
from sonar_ft.files import atomic
from sonar_ft.progress import Progress

log = logging.getLogger(__name__)

INDEX_NAME = ".sonar_ft_index.json"
"""The archive's last member: ``{"version", "dtype", "files": [{"path", "size", "sha256"}], "total_bytes"}``;
``dtype`` is the NumPy name every file was converted to (``"float16"``), or null (absent before it existed) when
the files were packed as they were."""
STAMP_NAME = ".sonar_ft_localized.json"
"""Written into a local copy once it is complete and checked: where it came from."""
FORMAT_VERSION = 1
PACK_DTYPES: dict[str, np.dtype] = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
"""``sonar-ft pack --dtype`` choices: every file is stored as ``<stem>.npy`` of this dtype."""
_CHUNK = 1 << 20


@dataclass(frozen=True)
class PackReport:
    """What :func:`pack_features` wrote."""

    archive: Path
    files: int
    total_bytes: int
    seconds: float
    dtype: str | None = None
    """NumPy name of the dtype every file was stored as; None: each file as it was."""


@dataclass(frozen=True)
class LocalizeReport:
    """What :func:`localize_features` did: ``copied`` False when a checked copy was already there."""

    source: Path
    dest: Path
    files: int
    total_bytes: int
    copied: bool
    seconds: float
    dtype: str | None = None
    """The dtype the archive's index records for every file (e.g. ``"float16"``); None: as packed, or a folder."""


def _feature_files(root: Path) -> list[Path]:
    """Every feature file under ``root`` (any depth: flat or ssvp_slt nested), sorted; hidden names skipped."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(folder) / f for f in files if not f.startswith(".") and os.path.splitext(f)[1] in FEATURE_SUFFIXES]
    return sorted(found)


def _stored_name(rel: str, dtype: np.dtype | None) -> str:
    """The member name of the file at ``rel``: itself, or ``<stem>.npy`` when converted (a ``.pt`` becomes ``.npy``)."""
    return rel if dtype is None else PurePosixPath(rel).with_suffix(".npy").as_posix()


def _converted(path: Path, dtype: np.dtype) -> bytes:
    """The features of ``path`` as the bytes of a ``.npy`` of ``dtype``; DataError naming the file when they do not fit."""
    values = read_features(path)[0].numpy()  # the project's reader (no pickle runs), as float32
    if not np.isfinite(values).all():
        raise DataError(f"feature file {path} holds NaN, Inf or values beyond float32's range: re-extract it or move it "
                        "out of the folder, then pack again (`sonar-ft verify` lists every such file)")
    limit = float(np.finfo(dtype).max)
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak > limit:
        raise DataError(f"feature file {path} holds a value of magnitude {peak:.4g}, beyond {dtype}'s range "
                        f"(±{limit:g}): pack the folder without --dtype to keep every file as it is")
    buffer = io.BytesIO()
    np.save(buffer, values.astype(dtype), allow_pickle=False)
    return buffer.getvalue()


def pack_features(features: str | Path, out: str | Path, *, dtype: str | None = None, progress: bool = True) -> PackReport:
    """Write every feature file under ``features`` into the tar ``out`` with an index of sizes and SHA-256s.

    ``dtype`` (a :data:`PACK_DTYPES` key) stores every file as ``<stem>.npy`` of that dtype; a file whose values
    do not fit it (NaN, Inf, beyond float16's ±65504) stops the pack and nothing is written at ``out``.
    None keeps every file as it is, byte for byte.
    """
    features, out = Path(features), Path(out)
    start = time.monotonic()
    if dtype is not None and dtype not in PACK_DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(PACK_DTYPES)} (got {dtype!r}), or left out to keep "
                          "every file as it is")
    target = PACK_DTYPES[dtype] if dtype is not None else None
    if not features.is_dir():
        raise DataError(f"features folder not found: {features}; pass the folder holding the .npy / .pt files")
    files = _feature_files(features)
    if not files:
        raise DataError(f"no .npy or .pt feature files under {features}: nothing to pack")
    if out.resolve().is_relative_to(features.resolve()):
        raise DataError(f"--out {out} is inside the features folder {features}: write the archive elsewhere")
    names = {path: _stored_name(path.relative_to(features).as_posix(), target) for path in files}
    first: dict[str, Path] = {}
    for path, rel in names.items():
        if (other := first.setdefault(rel, path)) != path:
            raise DataError(f"{other} and {path} would both be stored as {rel} with --dtype: keep one file per clip "
                            "(move the other out of the folder), or pack without --dtype")
    index = []
    with atomic.atomic_path(out) as tmp, tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        with Progress(len(files), desc=f"packing {features.name}", enabled=progress) as bar:
            for path in files:
                # One open per file: the slow part on a network drive.
                data = path.read_bytes() if target is None else _converted(path, target)
                rel = names[path]
                info = tarfile.TarInfo(rel)
                info.size, info.mtime, info.mode = len(data), int(path.stat().st_mtime), 0o644
                tar.addfile(info, io.BytesIO(data))
                index.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
                bar.update(1)
        stored = str(target) if target is not None else None
        record = {"version": FORMAT_VERSION, "source": str(features), "dtype": stored, "files": index,
                  "total_bytes": sum(f["size"] for f in index)}
        blob = json.dumps(record, indent=0).encode()
        info = tarfile.TarInfo(INDEX_NAME)
        info.size, info.mtime, info.mode = len(blob), int(time.time()), 0o644
        tar.addfile(info, io.BytesIO(blob))
    return PackReport(out, len(index), record["total_bytes"], time.monotonic() - start, stored)


def _source_key(source: Path) -> dict[str, Any]:
    """What identifies the source cheaply: an archive's size and mtime; a folder's file count, bytes and newest mtime."""
    if source.is_file():
        st = source.stat()
        return {"kind": "archive", "path": str(source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    stats = [p.stat() for p in _feature_files(source)]
    return {"kind": "folder", "path": str(source.resolve()), "files": len(stats), "size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


def _safe_member(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise DataError(f"archive member {name!r} points outside the folder: refusing to unpack this archive")
    return rel


def _unpack(archive: Path, dest: Path, progress: bool) -> tuple[int, int, str | None]:
    """Write the archive's files under ``dest``, checked against its index: (files, bytes, dtype the index records)."""
    written: dict[str, tuple[int, str]] = {}
    index: dict[str, Any] | None = None
    size = archive.stat().st_size
    with tarfile.open(archive, "r|") as tar, Progress(size, desc=f"unpacking {archive.name}", unit="B", enabled=progress) as bar:
        for member in tar:
            if member.name == INDEX_NAME:
                index = json.load(tar.extractfile(member))  # type: ignore[arg-type]
                continue
            if not member.isfile():
                raise DataError(f"{archive}: member {member.name!r} is not a regular file; make the archive with `sonar-ft pack`")
            rel = _safe_member(member.name)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            src = tar.extractfile(member)
            assert src is not None
            with atomic.atomic_path(target) as tmp, open(tmp, "wb") as out:  # never a half-written feature file
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
            os.utime(target, (member.mtime, member.mtime))  # the source's times: a verify report made before stays valid
            written[rel.as_posix()] = (member.size, h.hexdigest())
            bar.update(member.size + 512)
    if index is None:
        raise DataError(f"{archive} has no {INDEX_NAME} (not made by `sonar-ft pack`, or cut short): make it again with "
                        "`sonar-ft pack --features <folder> --out <archive>`")
    expected = {f["path"]: (f["size"], f["sha256"]) for f in index["files"]}
    if written != expected:
        missing = sorted(set(expected) - set(written))
        wrong = sorted(p for p in expected if p in written and written[p] != expected[p])
        raise DataError(f"{archive} does not match its index: {len(missing)} file(s) missing (e.g. {missing[:3]}), "
                        f"{len(wrong)} with another size or checksum (e.g. {wrong[:3]}); the archive is damaged — "
                        "pack it again, or copy it to Drive again")
    return len(written), sum(s for s, _ in written.values()), index.get("dtype")


def _copy_folder(source: Path, dest: Path, progress: bool) -> tuple[int, int]:
    files = _feature_files(source)
    if not files:
        raise DataError(f"no .npy or .pt feature files under {source}")
    total = 0
    with Progress(len(files), desc=f"copying {source.name}", enabled=progress) as bar:
        for path in files:
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)  # with its times: a verify report made before stays valid
            size = path.stat().st_size
            if target.stat().st_size != size:
                raise DataError(f"copying {path} to {target} gave {target.stat().st_size} bytes instead of {size}: "
                                "the source changed or the disk is full; run again")
            total += size
            bar.update(1)
    return len(files), total


def localize_features(source: str | Path, dest: str | Path, *, progress: bool = True) -> LocalizeReport:
    """Bring the features of ``source`` (a ``sonar-ft pack`` archive or a folder) to the folder ``dest``, checked.

    Reuses ``dest`` when its stamp names the same source (same size and modification time); otherwise
    ``dest`` is emptied and filled again. The stamp is written last, so a copy cut short is redone.
    """
    source, dest = Path(source), Path(dest)
    start = time.monotonic()
    if not source.exists():
        raise DataError(f"features not found: {source}; pass a `sonar-ft pack` archive (.tar) or a feature folder")
    key = _source_key(source)
    stamp = dest / STAMP_NAME
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("source") == key:
        return LocalizeReport(source, dest, recorded["files"], recorded["total_bytes"], False, time.monotonic() - start,
                              recorded.get("dtype"))
    if dest.exists():
        # Emptied only when it holds nothing but features and our stamp: never someone's other files.
        features_there = set(_feature_files(dest))
        others = [p for p in dest.rglob("*") if p.is_file() and p not in features_there and p.name != STAMP_NAME]
        if others:
            raise DataError(f"{dest} holds files other than features (e.g. {others[0]}): choose an empty or new folder "
                            "for the local copy")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    free = shutil.disk_usage(dest).free
    need = source.stat().st_size if source.is_file() else key["size"]
    if need > free:
        raise DataError(f"the features need {need / 1e9:.1f} GB but {dest} has {free / 1e9:.1f} GB free: free local disk "
                        "(delete old copies) or choose another folder")
    files, total, dtype = _unpack(source, dest, progress) if source.is_file() else (*_copy_folder(source, dest, progress), None)
    atomic.write_json(stamp, {"source": key, "files": files, "total_bytes": total, "dtype": dtype,
                              "checked": "sha256" if source.is_file() else "size"})
    return LocalizeReport(source, dest, files, total, True, time.monotonic() - start, dtype)
