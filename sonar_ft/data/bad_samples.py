"""Find the clips a training run cannot use, all at once, before any GPU time is spent.

:func:`find_bad_samples` reads every feature file the given manifest rows name (in threads:
on network drives the time goes into waiting for I/O) and returns one :class:`BadSample` per
clip that is missing, unreadable, not 2-D, of the wrong feature dimension, holds NaN/Inf, has
no frames, or whose reference cannot be a target: empty, longer than the decoder reads (counted
with the run's tokenizer, which the caller passes in as ``count_tokens``: this layer knows no
models), or implausibly long for one sentence. The caller decides whether to stop or to skip
them; :func:`write_bad_samples` records them as ``bad_samples.tsv``.
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

from sonar_ft.progress import Progress
from sonar_ft.data.features import FeatureStore, read_features
from sonar_ft.data.manifest import ManifestRow
from sonar_ft.errors import DataError
from sonar_ft.files.atomic import write_text

BAD_SAMPLES_HEADER: tuple[str, ...] = ("id", "file", "reason", "split", "line")
MAX_LISTED = 20
# One signed sentence runs to a few hundred characters; a "reference" longer than this is manifest lines
# merged by a broken export (a quote left open, a lost line end), whatever its token count happens to be.
MAX_TEXT_CHARS = 2000

CountTokens = Callable[[Sequence[str]], Sequence[int]]
"""``count_tokens(texts)``: each text's length as the decoder's target sequence (special tokens included)."""


@dataclass(frozen=True)
class BadSample:
    """One clip that cannot be trained on: its id, feature file ('' if none), why, its split and manifest line (0: unknown)."""

    id: str
    file: str
    reason: str
    split: str = ""
    line: int = 0

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
    count_tokens: CountTokens | None = None,
    max_tokens: int | None = None,
    max_chars: int | None = MAX_TEXT_CHARS,
) -> list[BadSample]:
    """Every row of ``rows`` that training would fail on, in manifest order.

    ``feature_dim`` is the D every file must have; without it the most common D among the
    readable files is taken as right and the others are reported.

    Since every file is read anyway, what was read can be handed on instead of read again:
    ``frames`` (a dict) receives each readable clip's frame count by id, and ``keep`` is called
    with the id and float32 ``(T, D)`` features of every clip that reads cleanly (one of them may
    still be reported for its feature dimension or an empty text) — from the reading threads, so it
    must be thread-safe (storing into a dict is); an error it raises stops the scan.

    References: with ``count_tokens`` (the run's tokenizer, e.g. ``lambda texts: decoder.count_tokens(texts,
    lang)``) and ``max_tokens`` (the decoder's limit), every text longer than the limit is reported with
    its token count; a text of more than ``max_chars`` characters (None: no limit) is reported without
    being tokenised. Text problems carry the manifest line.
    """
    checks: dict[int, _Check] = {}
    to_read = [(i, store.path(r.id)) for i, r in enumerate(rows)]
    to_read = [(i, p) for i, p in to_read if p is not None]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda item: _check(item[1], rows[item[0]].id, keep), to_read)
        bar = Progress(len(to_read), desc=f"checking {split or 'clips'}", enabled=progress).wrap(results)
        for result, (i, _) in zip(bar, to_read):  # the bar first, so that it sees the end and closes
            if frames is not None and result.frames:
                frames[rows[i].id] = result.frames
            checks[i] = result

    text_problems = _text_problems(rows, count_tokens, max_tokens, max_chars)
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
        elif i in text_problems:
            reason = text_problems[i]
        else:
            continue
        bad.append(BadSample(id=row.id, file="" if path is None else str(path), reason=reason, split=split, line=row.line))
    return bad


def _text_problems(
    rows: Sequence[ManifestRow], count_tokens: CountTokens | None, max_tokens: int | None, max_chars: int | None,
) -> dict[int, str]:
    """Row index -> why its reference cannot be a training target (too long in characters or in tokens)."""
    problems: dict[int, str] = {}
    for i, row in enumerate(rows):
        if max_chars is not None and len(row.text) > max_chars:
            problems[i] = (
                f"reference is {len(row.text):,} characters long, more than the {max_chars:,} one sentence can "
                f"plausibly have (manifest line {row.line}): rows merged by a broken export? Split it into its rows"
            )
    if count_tokens is None or max_tokens is None:
        return problems
    to_count = [i for i, row in enumerate(rows) if i not in problems and row.text.strip()]
    counts = list(count_tokens([rows[i].text for i in to_count]))
    if len(counts) != len(to_count):
        raise ValueError(f"count_tokens returned {len(counts)} counts for {len(to_count)} texts")
    for i, n in zip(to_count, counts):
        if n > max_tokens:
            problems[i] = (
                f"reference has {n} tokens, more than the {max_tokens} the decoder can read (manifest line "
                f"{rows[i].line}); shorten or split it in the manifest"
            )
    return problems


def format_bad_samples(bad: Sequence[BadSample], limit: int = MAX_LISTED) -> str:
    """The first ``limit`` bad samples on one line (``; `` separated), with a count of the rest."""
    listed = "; ".join(b.describe() for b in bad[:limit])
    return listed + (f"; ... and {len(bad) - limit} more" if len(bad) > limit else "")


def write_bad_samples(path: str | Path, bad: Iterable[BadSample]) -> None:
    """Atomically write ``bad`` as a TSV with header ``id  file  reason  split  line``."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", quotechar='"', lineterminator="\n")
    writer.writerow(BAD_SAMPLES_HEADER)
    for b in bad:
        writer.writerow([b.id, b.file, " ".join(b.reason.split()), b.split, b.line or ""])
    write_text(path, buf.getvalue())


def read_bad_samples(path: str | Path) -> list[BadSample]:
    """Read a ``bad_samples.tsv`` written by :func:`write_bad_samples` (also one without the later columns)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quotechar='"')
        return [BadSample(id=r["id"], file=r["file"], reason=r["reason"], split=r.get("split") or "",
                          line=int(r.get("line") or 0)) for r in reader]
