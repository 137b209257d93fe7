"""Check a manifest + feature folder before spending GPU hours on it.

:func:`verify_dataset` reads every feature file the manifest names and returns a
:class:`VerifyReport`: errors (the set cannot be trained on as is) and warnings (worth a look,
training works). Notebooks use the report directly; ``sonar-ft verify`` prints and saves it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from sonar_ft.data.bad_samples import MAX_TEXT_CHARS
from sonar_ft.data.features import FeatureStore, read_features
from sonar_ft.data.manifest import ManifestRow, duplicate_ids, read_manifest
from sonar_ft.errors import ConfigError, DataError
from sonar_ft.progress import Progress

# (report attribute, label in the table); errors make the set untrainable, warnings do not.
ERROR_CHECKS: tuple[tuple[str, str], ...] = (
    ("missing_features", "ids without a feature file"),
    ("duplicate_ids", "duplicate ids in manifest"),
    ("unreadable", "unreadable feature files"),
    ("bad_dim", "wrong feature dimension"),
    ("non_finite", "files with NaN/Inf"),
    ("zero_length", "zero-length clips"),
    ("empty_text", "empty texts"),
    ("long_text", f"texts over {MAX_TEXT_CHARS:,} characters"),
)
WARNING_CHECKS: tuple[tuple[str, str], ...] = (
    ("extra_features", "feature files not in manifest"),
    ("length_mismatch", "manifest length != file frames"),
)


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` found; ``ok`` is False when any error check is non-empty."""

    manifest: str
    features: str
    layout: str
    expected_dim: int | None
    num_rows: int
    num_feature_files: int
    num_checked: int = 0
    missing_features: list[str] = field(default_factory=list)
    duplicate_ids: dict[str, list[int]] = field(default_factory=dict)  # id -> manifest lines
    unreadable: dict[str, str] = field(default_factory=dict)  # id -> reason
    bad_dim: list[str] = field(default_factory=list)
    non_finite: list[str] = field(default_factory=list)
    zero_length: list[str] = field(default_factory=list)
    empty_text: list[str] = field(default_factory=list)
    long_text: list[str] = field(default_factory=list)  # too long for one sentence: merged rows
    extra_features: list[str] = field(default_factory=list)
    length_mismatch: list[dict[str, Any]] = field(default_factory=list)  # {id, manifest, file}
    dims: dict[int, int] = field(default_factory=dict)  # D -> number of files
    dtypes: dict[str, int] = field(default_factory=dict)  # stored dtype -> number of files
    lengths: list[int] = field(default_factory=list)  # frames per checked clip (for a histogram)

    @property
    def errors(self) -> dict[str, int]:
        """Count per error check (all keys present)."""
        return {name: len(getattr(self, name)) for name, _ in ERROR_CHECKS}

    @property
    def warnings(self) -> dict[str, int]:
        """Count per warning check (all keys present)."""
        return {name: len(getattr(self, name)) for name, _ in WARNING_CHECKS}

    @property
    def ok(self) -> bool:
        """True when the set can be trained on (warnings allowed)."""
        return not any(self.errors.values())

    def length_stats(self) -> dict[str, float] | None:
        """min / mean / median / p95 / max frames over checked clips, or None if none."""
        if not self.lengths:
            return None
        arr = np.asarray(self.lengths, dtype=np.float64)
        return {
            "min": int(arr.min()),
            "mean": round(float(arr.mean()), 1),
            "median": float(np.median(arr)),
            "p95": float(np.percentile(arr, 95)),
            "max": int(arr.max()),
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything in the report as JSON-ready data."""
        return {
            "ok": self.ok,
            "manifest": self.manifest,
            "features": self.features,
            "layout": self.layout,
            "expected_dim": self.expected_dim,
            "counts": {
                "manifest_rows": self.num_rows,
                "feature_files": self.num_feature_files,
                "checked": self.num_checked,
            },
            "errors": self.errors,
            "warnings": self.warnings,
            "missing_features": self.missing_features,
            "duplicate_ids": self.duplicate_ids,
            "unreadable": self.unreadable,
            "bad_dim": self.bad_dim,
            "non_finite": self.non_finite,
            "zero_length": self.zero_length,
            "empty_text": self.empty_text,
            "long_text": self.long_text,
            "extra_features": self.extra_features,
            "length_mismatch": self.length_mismatch,
            "dims": {str(d): n for d, n in self.dims.items()},
            "dtypes": self.dtypes,
            "length_stats": self.length_stats(),
            "lengths": self.lengths,
        }

    def format_table(self, max_ids: int = 5) -> str:
        """A readable summary: one line per check, example ids for each failing one."""
        lines = [
            f"manifest: {self.manifest}",
            f"features: {self.features} ({self.layout} layout)",
            "",
            f"  {'check':<34}{'count':>8}  status",
            f"  {'manifest rows':<34}{self.num_rows:>8}",
            f"  {'feature files':<34}{self.num_feature_files:>8}",
            f"  {'files checked':<34}{self.num_checked:>8}",
        ]
        details = []
        for checks, bad in ((ERROR_CHECKS, "ERROR"), (WARNING_CHECKS, "warn")):
            for name, label in checks:
                items = getattr(self, name)
                lines.append(f"  {label:<34}{len(items):>8}  {bad if items else 'ok'}")
                if items:
                    details.append(f"  {label}: {self._examples(name, max_ids)}")
        lines.append("")
        dims = ", ".join(f"{d} ({n} files)" for d, n in sorted(self.dims.items())) or "-"
        want = f" (expected {self.expected_dim})" if self.expected_dim is not None else ""
        lines.append(f"feature dim: {dims}{want}")
        lines.append("stored dtype: " + (", ".join(f"{t} ({n})" for t, n in sorted(self.dtypes.items())) or "-"))
        stats = self.length_stats()
        if stats:
            lines.append("frames per clip: " + "  ".join(f"{k} {v:g}" for k, v in stats.items()))
        if details:
            lines += ["", "examples:"] + details
        lines.append("")
        if self.ok:
            lines.append("result: OK" + (" (with warnings)" if any(self.warnings.values()) else ""))
        else:
            lines.append(f"result: NOT OK, fix the {sum(1 for n in self.errors.values() if n)} ERROR line(s) above")
        return "\n".join(lines)

    def _examples(self, name: str, max_ids: int) -> str:
        value = getattr(self, name)
        if name == "duplicate_ids":
            shown = [f"{i} (lines {', '.join(map(str, ls))})" for i, ls in list(value.items())[:max_ids]]
        elif name == "unreadable":
            shown = [msg for msg in list(value.values())[:max_ids]]
        elif name == "length_mismatch":
            shown = [f"{m['id']} ({m['manifest']} vs {m['file']})" for m in value[:max_ids]]
        else:
            shown = list(value[:max_ids])
        more = f" (+{len(value) - max_ids} more)" if len(value) > max_ids else ""
        return ("; " if name == "unreadable" else ", ").join(shown) + more


@dataclass
class _FileCheck:
    frames: int = 0
    dim: int = 0
    dtype: str = ""
    finite: bool = True
    error: str | None = None


def _check_file(path: Path) -> _FileCheck:
    try:
        tensor, dtype = read_features(path)
    except DataError as exc:
        return _FileCheck(error=str(exc))
    # Checked after the float32 cast: float64 values beyond float32's range become Inf there.
    return _FileCheck(
        frames=tensor.shape[0], dim=tensor.shape[1], dtype=dtype, finite=bool(torch.isfinite(tensor).all())
    )


def verify_dataset(
    features: str | Path | FeatureStore,
    manifest: str | Path | Sequence[ManifestRow],
    feature_dim: int | None = None,
    *,
    epoch: int | str | None = None,
    workers: int = 8,
    progress: bool = True,
) -> VerifyReport:
    """Read every feature file ``manifest`` names and report what would break training.

    ``features`` is a folder or an open :class:`FeatureStore`; ``manifest`` a path or rows.
    ``feature_dim``, when given, is the D every file must have. Files are read by ``workers``
    threads because on network drives the time goes into waiting for I/O.
    Raises :class:`DataError` only when the manifest or folder cannot be read at all.
    """
    if feature_dim is not None and feature_dim < 1:
        raise ConfigError(f"--feature-dim must be >= 1 (got {feature_dim})")
    store = features if isinstance(features, FeatureStore) else FeatureStore.open(features, epoch=epoch)
    if isinstance(manifest, (str, Path)):
        manifest_name = str(manifest)
        rows = read_manifest(manifest, allow_duplicates=True)
    else:
        manifest_name = "<rows>"
        rows = list(manifest)

    report = VerifyReport(
        manifest=manifest_name,
        features=str(store.root),
        layout=store.layout,
        expected_dim=feature_dim,
        num_rows=len(rows),
        num_feature_files=len(store),
    )
    report.duplicate_ids = duplicate_ids(rows)
    report.empty_text = [r.id for r in rows if not r.text.strip()]
    # Tokens are counted when training starts (verify loads no tokenizer); length in characters needs none.
    report.long_text = [r.id for r in rows if len(r.text) > MAX_TEXT_CHARS]
    in_manifest = {r.id for r in rows}
    report.extra_features = [i for i in store.ids() if i not in in_manifest]

    first_row: dict[str, ManifestRow] = {}
    for row in rows:
        first_row.setdefault(row.id, row)
    to_check = []
    for clip_id, row in first_row.items():
        path = store.path(clip_id)
        if path is None:
            report.missing_features.append(clip_id)
        else:
            to_check.append((row, path))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(_check_file, [path for _, path in to_check])
        bar = Progress(len(to_check), desc="checking features", enabled=progress).wrap(results)
        checks = [(row, result) for (row, _), result in zip(to_check, bar)]

    dims: collections.Counter[int] = collections.Counter()
    dtypes: collections.Counter[str] = collections.Counter()
    for row, check in checks:
        if check.error is not None:
            report.unreadable[row.id] = check.error
            continue
        report.num_checked += 1
        dims[check.dim] += 1
        dtypes[check.dtype] += 1
        report.lengths.append(check.frames)
        if not check.finite:
            report.non_finite.append(row.id)
        if check.frames == 0:
            report.zero_length.append(row.id)
        if row.length is not None and row.length != check.frames:
            report.length_mismatch.append({"id": row.id, "manifest": row.length, "file": check.frames})
    report.dims = dict(sorted(dims.items()))
    report.dtypes = dict(sorted(dtypes.items()))

    # Without an expected D, the most common one is taken as right and the others flagged.
    want = feature_dim if feature_dim is not None else (dims.most_common(1)[0][0] if dims else None)
    report.bad_dim = [row.id for row, c in checks if c.error is None and c.dim != want]
    return report



REPORT_VERSION = 1


def verify_fingerprint(features: str | Path | FeatureStore, manifest: str | Path, feature_dim: int | None, epoch: int | str | None = None) -> str:
    """What a verify report depends on: the manifest's and every feature file's path, size and mtime, and the options.

    Cheap next to reading the files (a stat each), so an unchanged set is not read again.
    """
    store = features if isinstance(features, FeatureStore) else FeatureStore.open(features, epoch=epoch)
    h = hashlib.sha256(json.dumps([REPORT_VERSION, str(store.root.resolve()), feature_dim, store.epoch]).encode())
    for path in [Path(manifest)] + sorted(p for p in map(store.path, store.ids()) if p is not None):
        st = os.stat(path)
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reusable_report(json_path: str | Path, fingerprint: str) -> dict[str, Any] | None:
    """The report at ``json_path`` when it was made from exactly this data (same fingerprint), else None."""
    try:
        report = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if report.get("fingerprint") == fingerprint and "error" not in report else None


def failed_report(features: str | Path, manifest: str | Path, feature_dim: int | None, error: str) -> dict[str, Any]:
    """A report for a verify that could not run at all (no folder, unreadable manifest): ``ok`` False, ``error`` set.

    Same keys as :meth:`VerifyReport.to_dict`, so whatever shows reports shows this one as NOT OK.
    """
    return {
        "ok": False, "error": error, "manifest": str(manifest), "features": str(features), "layout": None,
        "expected_dim": feature_dim, "counts": {"manifest_rows": 0, "feature_files": 0, "checked": 0},
        "errors": {"verify_failed": 1}, "warnings": {}, "length_stats": None, "lengths": [],
    }
