"""sonar_ft.progress: plain lines at most every 30 s with done/total and an ETA, never terminal codes."""

from __future__ import annotations

import logging
import os

import pytest

from sonar_ft.progress import Progress, quiet_dependencies


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_plain_mode_prints_a_line_every_30_seconds_with_done_total_and_eta() -> None:
    clock, lines = Clock(), []
    with Progress(1000, desc="checking features", mode="plain", emit=lines.append, clock=clock) as bar:
        for _ in range(1000):
            clock.now += 0.1  # 100 s in all
            bar.update(1)
    assert len(lines) == 4  # at 30, 60, 90 s, and the closing line
    assert lines[0].startswith("checking features: 300/1,000 file (30%)") and "ETA 70 s" in lines[0]
    assert lines[-1] == "checking features: 1,000 file done in 1.7 min"
    assert not any("\r" in line or "\x1b" in line for line in lines)


def test_a_short_phase_prints_nothing() -> None:
    clock, lines = Clock(), []
    with Progress(10, desc="x", mode="plain", emit=lines.append, clock=clock) as bar:
        for _ in range(10):
            clock.now += 0.5
            bar.update(1)
    assert lines == []


def test_bytes_are_shown_in_mb_and_a_resumed_download_counts_its_rate_from_now() -> None:
    clock, lines = Clock(), []
    bar = Progress(3_000_000_000, desc="enc.pth", unit="B", initial=1_000_000_000, mode="plain", emit=lines.append, clock=clock)
    clock.now = 30.0
    bar.update(300_000_000)
    assert lines == ["enc.pth: 1.3 GB/3.0 GB (43%) | 10.0 MB/s | ETA 2.8 min"]


def test_quiet_dependencies_turns_off_fairseq2_bars_in_a_pipe_and_rouge_chatter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAIRSEQ2_NO_PROGRESS", raising=False)
    monkeypatch.setattr("sonar_ft.progress.is_terminal", lambda stream=None: False)
    quiet_dependencies()
    assert os.environ["FAIRSEQ2_NO_PROGRESS"] == "1"
    assert logging.getLogger("absl").getEffectiveLevel() >= logging.WARNING
