"""Find the clips a training run cannot use, all at once, before any GPU time is spent.

:func:`find_bad_samples` reads every feature file the given manifest rows name (in threads:
on network drives the time goes into waiting for I/O) and returns one :class:`BadSample` per
clip that is missing, unreadable, not 2-D, of the wrong feature dimension, holds NaN/Inf, has
no frames, or has an empty text. The caller decides whether to stop or to skip them;
:func:`write_bad_samples` records them as ``bad_samples.tsv``.
"""

from __future__ import annotations

import collections
import csv
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from sonar_ft.data.features import FeatureStore, read_features
from sonar_ft.data.manifest import ManifestRow
from sonar_ft.errors import DataError
from sonar_ft.files.atomic import write_text

BAD_SAMPLES_HEADER: tuple[str, ...] = ("id", "file", "reason", "split")
MAX_LISTED = 20


@dataclass(frozen=True)
class BadSample:
    """One clip that cannot be trained on: its id, feature file ('' if none), why, and its split."""

    id: str
    file: str
    reason: str
    split: str = ""

    def describe(self) -> str:
        """``id (split, file): reason`` for one-line messages."""
        where = ", ".join(x for x in (self.split, self.file) if x)
        return f"{self.id} ({where}): {self.reason}" if where else f"{self.id}: {self.reason}"


@dataclass
class _Check:
    dim: int = 0
    reason: str | None = None
    frames: int = 0


def _check(path: Path, clip_id: str, keep: Callable[[str, torch.Tensor], None] | None) -> _Check:
    try:
        tensor, _ = read_features(path)
    except DataError as exc:
        # The sample's file is listed beside its reason; do not repeat it inside.
        return _Check(reason=str(exc).removeprefix(f"feature file {path} "))
    frames, dim = tensor.shape
    if frames == 0:
        return _Check(dim=dim, reason="has zero frames")
    # After the float32 cast on purpose: float64 values beyond float32's range become Inf there.
    if not bool(torch.isfinite(tensor).all()):
        return _Check(dim=dim, reason="contains NaN or Inf values", frames=frames)
    if keep is not None:
        keep(clip_id, tensor)  # here, in the reading thread: no clip waits in memory for the main thread
    return _Check(dim=dim, frames=frames)


def find_bad_samples(
    store: FeatureStore,
    rows: Sequence[ManifestRow],
    *,
    split: str = "",
    feature_dim: int | None = None,
    workers: int = 8,
    progress: bool = True,
    frames: dict[str, int] | None = None,
    keep: Callable[[str, torch.Tensor], None] | None = None,
    text_check: Callable[[str], str | None] | None = None,
) -> list[BadSample]:
    """Every row of ``rows`` that training would fail on, in manifest order.

    ``feature_dim`` is the D every file must have; without it the most common D among the
    readable files is taken as right and the others are reported.

    Since every file is read anyway, what was read can be handed on instead of read again:
    ``frames`` (a dict) receives each readable clip's frame count by id, and ``keep`` is called
    with the id and float32 ``(T, D)`` features of every clip that reads cleanly (one of them may
    still be reported for its feature dimension or an empty text) — from the reading threads, so it
    must be thread-safe (storing into a dict is); an error it raises stops the scan.

    ``text_check`` (e.g. ``lambda t: decoder.text_problem(t, lang)``) returns why a text cannot be a
    target (too many tokens for the decoder), or None; such rows are reported with their manifest line.
    """
    checks: dict[int, _Check] = {}
    to_read = [(i, store.path(r.id)) for i, r in enumerate(rows)]
    to_read = [(i, p) for i, p in to_read if p is not None]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda item: _check(item[1], rows[item[0]].id, keep), to_read)
        bar = tqdm(results, total=len(to_read), desc=f"checking {split or 'clips'}", unit="file", disable=None if progress else True)  # None: bars only in a terminal
        for result, (i, _) in zip(bar, to_read):  # the bar first, so that it sees the end and closes
            if frames is not None and result.frames:
                frames[rows[i].id] = result.frames
            checks[i] = result

    dims = collections.Counter(c.dim for c in checks.values() if c.reason is None)
    want = feature_dim if feature_dim is not None else (dims.most_common(1)[0][0] if dims else None)
    bad: list[BadSample] = []
    for i, row in enumerate(rows):
        path = store.path(row.id)
        check = checks.get(i)
        if path is None:
            reason = f"no feature file {row.id}.npy / {row.id}.pt in {store.root}"
        elif check is not None and check.reason is not None:
            reason = check.reason
        elif check is not None and want is not None and check.dim != want:
            others = "the other clips have" if feature_dim is None else "expected"
            reason = f"has feature dimension {check.dim}; {others} {want}"
        elif not row.text.strip():
            reason = f"empty text (manifest line {row.line})"
        elif text_check is not None and (problem := text_check(row.text)) is not None:
            reason = f"{problem} (manifest line {row.line})"
        else:
            continue
        bad.append(BadSample(id=row.id, file="" if path is None else str(path), reason=reason, split=split))
    return bad


def format_bad_samples(bad: Sequence[BadSample], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` bad samples on one line (``; `` separated), with a count of the rest."""
    listed = "; ".join(b.describe() for b in bad[:limit])
    return listed + (f"; ... and {len(bad) - limit} more" if len(bad) > limit else "")


def write_bad_samples(path: str | Path, bad: Iterable[BadSample]) -> None:
    """Atomically write ``bad`` as a TSV with header ``id  file  reason  split``."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", quotechar='"', lineterminator="\n")
    writer.writerow(BAD_SAMPLES_HEADER)
    for b in bad:
        writer.writerow([b.id, b.file, " ".join(b.reason.split()), b.split])
    write_text(path, buf.getvalue())


def read_bad_samples(path: str | Path) -> list[BadSample]:
    """Read a ``bad_samples.tsv`` written by :func:`write_bad_samples`."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quotechar='"')
        return [BadSample(id=r["id"], file=r["file"], reason=r["reason"], split=r.get("split", "")) for r in reader]
