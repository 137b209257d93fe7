"""A run killed with SIGKILL at random points and re-run with the same command ends exactly like
an uninterrupted run of the same seed (CPU): same metrics every epoch, same best encoder.

The recipe runs in a subprocess; it writes ``last.pt`` every 2 optimiser steps, so kills land
between, during and right after checkpoint writes, and once before the first checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import recipe_args
from sonar_ft.files.atomic import load_torch

RECIPE = Path(__file__).resolve().parents[2] / "train_sonar_finetuning.py"
COMPARED = ("epoch", "train_loss", "val_loss", "val_bleu", "val_chrf", "lr", "is_best")
EPOCHS = 3
START_TIMEOUT = 120  # seconds for a run to reach the point where it is killed (slow shared machines)


SAVES = {"steps": ["--checkpoint_every_steps", "2"], "minutes": ["--checkpoint_every_minutes", "0.0005"]}
"""Saves every 2 steps, or by the real clock every 30 ms (wherever that falls: the result must not depend on it;
often enough that every planned kill lands inside a run however fast the machine)."""


def _command(demo, out: Path, saves: str = "steps") -> list[str]:
    return [sys.executable, str(RECIPE), *recipe_args(
        demo, out, "--epochs", str(EPOCHS), "--batch_size", "8", "--max_samples", "48", "--seed", "7",
        *SAVES[saves], "--max_gen_len", "16",
    )]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    # One thread: spinning OpenMP workers slow a tiny model down several-fold on a busy machine.
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns  # an atomic replace changes the inode


def _wait_for(proc: subprocess.Popen, ready) -> bool:
    """Poll until ``ready()``; False if the process ended first."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the run made no progress in time")


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads((out / f"metrics_epoch{e}.json").read_text()) for e in range(1, EPOCHS + 1)]
    return [{k: r[k] for k in COMPARED} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("saves", sorted(SAVES))
def test_sigkilled_run_resumes_to_the_same_final_metrics(tiny_demo, tmp_path, saves):
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    log = tmp_path / "runs.log"
    assert _start(_command(tiny_demo, reference), log).wait(timeout=300) == 0, log.read_text()[-3000:]

    rng = random.Random(20240607)
    cmd = _command(tiny_demo, interrupted, saves)
    last = interrupted / "last.pt"
    kills = 0
    # Kill 1: once the run has written config.json (models loaded), usually before its first checkpoint.
    # Kills 2, 3: after the k-th new last.pt, plus a random delay (often in the middle of a write).
    plans = [("config", 0), ("last", rng.randint(1, 2)), ("last", rng.randint(1, 3))]
    for kind, updates in plans:
        proc = _start(cmd, log)
        if kind == "config":
            reached = _wait_for(proc, lambda: (interrupted / "config.json").exists())
        else:
            seen = [_stamp(last)]
            def ready() -> bool:
                stamp = _stamp(last)
                if stamp is not None and stamp != seen[-1]:
                    seen.append(stamp)
                return len(seen) > updates
            reached = _wait_for(proc, ready)
        if reached:
            time.sleep(rng.uniform(0.0, 0.25))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=60)
    assert kills == 3, "every planned kill should hit a running process"

    finished = _start(cmd, log)  # the very same command: resumes on its own
    assert finished.wait(timeout=300) == 0, log.read_text()[-3000:]

    assert "resuming inside epoch" in log.read_text()  # at least one resume was mid-epoch
    assert _metrics(interrupted) == _metrics(reference)
    ours = load_torch(interrupted / "best_encoder.pt")["student"]
    theirs = load_torch(reference / "best_encoder.pt")["student"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not [p.name for p in interrupted.iterdir() if p.name.startswith(".tmp-")]
