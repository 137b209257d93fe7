"""Progress of long phases (copy, verify, scan, download, pack) that suits where it is shown.

In a terminal a tqdm bar; anywhere else (a notebook cell reading a pipe, a log file) a plain line
at most every ``every`` seconds with done/total, the rate and an ETA, and one line at the end —
never a carriage return, cursor or colour code. Standard library only (tqdm is imported lazily).

    with Progress(total=len(files), desc="copying features", unit="file") as bar:
        for f in files:
            ...
            bar.update(1)
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

EVERY_SECONDS = 30.0
"""Longest silence of a plain-progress phase (the notebooks' promise: a line at least every 30 s)."""


def is_terminal(stream: TextIO | None = None) -> bool:
    """True when ``stream`` (default stderr) is an interactive terminal."""
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def format_seconds(seconds: float) -> str:
    """``45 s``, ``2.8 min``, ``12 min``, ``3.2 h``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min" if seconds < 600 else f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _amount(value: float, unit: str) -> str:
    if unit != "B":
        return f"{value:,.0f}"
    for name in ("B", "KB", "MB", "GB"):
        if value < 1000 or name == "GB":
            return f"{value:.0f} {name}" if name == "B" else f"{value:.1f} {name}"
        value /= 1000
    return f"{value:.1f} GB"


class Progress:
    """done/total of one phase: a bar in a terminal, plain periodic lines elsewhere, nothing when disabled."""

    def __init__(
        self, total: int | None, *, desc: str, unit: str = "file", every: float = EVERY_SECONDS, enabled: bool = True, initial: int = 0,
        mode: str | None = None, emit: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.mode = "none" if not enabled else (mode or ("bar" if is_terminal() else "plain"))
        self.emit = emit or (lambda line: print(line, file=sys.stderr, flush=True))
        self.done = self._initial = initial
        self._start = self._last = clock()
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "B")

    def update(self, n: int = 1) -> None:
        """``n`` more units done; a plain line when ``every`` seconds passed since the last one."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "plain":
            now = self.clock()
            if now - self._last >= self.every:
                self._last = now
                self.emit(self.line(now))

    def line(self, now: float | None = None) -> str:
        """``desc: done/total (pct) | rate | ETA`` as of ``now``."""
        now = self.clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.done - self._initial) / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else math.inf
            units = "" if self.unit == "B" else f" {self.unit}"
            head = f"{self.desc}: {_amount(self.done, self.unit)}/{_amount(self.total, self.unit)}{units} ({100 * self.done / self.total:.0f}%)"
            return f"{head} | {_amount(rate, self.unit)}/s | ETA {format_seconds(eta)}"
        return f"{self.desc}: {_amount(self.done, self.unit)} {self.unit} | {format_seconds(elapsed)} so far"

    def close(self) -> None:
        """End of the phase: the bar closes, or one final line with the time taken (when it took a while)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "plain" and self.clock() - self._start >= self.every:
            self.emit(f"{self.desc}: {_amount(self.done, self.unit)} {self.unit} done in {format_seconds(self.clock() - self._start)}")
        self.mode = "none"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting each as one unit done."""
        try:
            for item in items:
                yield item
                self.update(1)
        finally:
            self.close()


def quiet_dependencies() -> None:
    """Keep dependencies' terminal decorations out of pipes and notebooks.

    fairseq2 draws a rich bar ("parameter load") with cursor and colour codes whatever its output is;
    ``FAIRSEQ2_NO_PROGRESS`` turns its reporters off when stderr is not a terminal. rouge-score logs
    "Using default tokenizer." through absl at INFO every time a scorer is made.
    """
    if not is_terminal():
        os.environ.setdefault("FAIRSEQ2_NO_PROGRESS", "1")
    logging.getLogger("absl").setLevel(logging.WARNING)


def format_size(num_bytes: int) -> str:
    """``1.2 GB``-style size."""
    size = float(num_bytes)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
