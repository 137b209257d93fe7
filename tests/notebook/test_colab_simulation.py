"""A simulated Colab runtime: 00_all_in_one (DEMO) from an empty /content, the data on a Drive-like folder.

The suite's one execution of 00_all_in_one: it also checks the workflow's files, figures and tables.

Simulated (``drive_shim/sitecustomize.py``, loaded by every Python process of the run): an empty
working folder standing for ``/content`` (the project is cloned into it); a Drive-like folder holding
the demo's data and models, where every open of a feature file waits and is logged, with a quota
that counts deleted and replaced files as trash and that ``shutil.disk_usage`` reports (as Colab's
Drive mount does); a SIGKILL of the full run's training command a moment after its second save;
then a new runtime (``/content`` emptied, the project cloned again, the features copied again) on
which the whole notebook runs again with another micro-batch split — as after a disconnect, on
another GPU. The Colab-like kernel holds no torch. Not simulated: Colab's own google.colab module,
a GPU, Drive's own I/O errors and its revision handling (see the shim).

Dropout is off in both runs and in the reference: with dropout, two splits draw their masks per
micro-batch and end apart by noise of the same distribution (tests/training/test_resume_anywhere.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sonar_ft.config import command_line
from sonar_ft.data.pack import STAMP_NAME
from sonar_ft.demo.paths import DemoPaths
from sonar_ft.files.atomic import load_torch
from sonar_ft.models.encoder import read_config
from sonar_ft.notebook import colab
from sonar_ft.plan.disk import DriveUse, Schedule, checkpoint_sizes, simulate
from sonar_ft.run_files import BEST_ENCODER, CONFIG_FILE, read_history
from tests.notebook.test_notebooks import (  # noqa: F401  (kernel_env: the fixture)
    MAX_OUTPUT_LINES, ROOT, _execute, _has_table, _line_count, _pngs, _text, kernel_env,
)
from tests.numerics import assert_close_to_scale

SHIM = Path(__file__).resolve().parent / "drive_shim"
DELAY = 0.02  # seconds per feature-file open on the Drive-like folder
DEMO_FLAGS = ["--learning_rate", "1e-3", "--beam_size", "2", "--distill_weight", "1.0", "--dropout", "0"]
"""The notebook's DEMO_FLAGS, dropout off (see the module docstring)."""
ANOTHER_SPLIT = ["--batch_size", "8", "--grad_accum", "2"]
"""The second runtime's memory split of the same effective batch (16)."""
SMALL_FILES = 400_000
"""Bytes the disk plan does not count (logs, metrics, predictions, TensorBoard, plots, verify reports; ~0.2 MB
measured): nothing at the official size, a fifth of the checkpoints at the demo's."""


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _lines(path: Path) -> list[list[str]]:
    return [line.split(" ") for line in path.read_text().splitlines()] if path.is_file() else []


class _Sampler:
    """Drive's usage (live bytes + trash) every 20 ms while the notebook runs."""

    def __init__(self, drive: Path, trash: Path) -> None:
        self.drive, self.trash, self.peak = drive, trash, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                used = _tree_bytes(self.drive) + sum(int(f[1]) for f in _lines(self.trash))
            except (OSError, ValueError):
                continue  # a file vanished mid-walk: sample again
            self.peak = max(self.peak, used)
            time.sleep(0.02)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _quota(demo: Path, train_clips: int, batch: int, epochs: int) -> tuple[int, int]:
    """A quota the demo's run fits in only with its checkpoints copied in place (``slots-2``), and the
    Drive peak that atomic saves on Drive (``drive``) would reach over the same run."""
    paths = DemoPaths(demo)
    best, state = checkpoint_sizes(read_config(paths.encoder_checkpoint))
    tarball = paths.encoder_checkpoint.stat().st_size + sum(f.stat().st_size for f in paths.assets.glob("text_decoder*"))
    others = DriveUse(encoder=0, features=0, decoder_cache=0, tarball=tarball)
    schedule = Schedule(epochs=epochs, saves_per_epoch=1 + math.ceil(train_clips / batch))
    start = _tree_bytes(demo)
    slots = simulate("slots-2", best, state, others=others, schedule=schedule).drive_peak
    atomic = simulate("drive", best, state, others=others, schedule=schedule).drive_peak
    return start + slots + SMALL_FILES, start + atomic


@pytest.mark.slow
def test_all_in_one_survives_a_kill_and_another_gpu_within_a_drive_quota(
    tiny_demo: DemoPaths, kernel_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    sim = tmp_path_factory.mktemp("colab_sim")
    content, drive, executed = sim / "content", sim / "drive", sim / "executed"
    demo = drive / "demo"
    for part in ("data", "assets"):
        shutil.copytree(tiny_demo.root / part, demo / part)
    train_clips = len(tiny_demo.split_manifest("train").read_text().splitlines()) - 1
    quota, atomic_peak = _quota(demo, train_clips, batch=16, epochs=3)
    assert atomic_peak > quota, "the quota must matter: atomic saves of last.pt on Drive would overflow it"
    files = {name: sim / f"{name}.log" for name in ("reads", "trash", "usage", "killed")}
    env = {**kernel_env, "PYTHONPATH": str(SHIM), "SONAR_FT_SIM_DRIVE": str(drive), "SONAR_FT_SIM_DELAY": str(DELAY),
           "SONAR_FT_SIM_LOG": str(files["reads"]), "SONAR_FT_SIM_QUOTA": str(quota),
           "SONAR_FT_SIM_TRASH": str(files["trash"]), "SONAR_FT_SIM_USAGE": str(files["usage"]),
           "SONAR_FT_SIM_KILL": "full:2", "SONAR_FT_SIM_KILL_FLAG": str(files["killed"])}
    params = dict(DEMO=True, REPO_URL=str(ROOT), DEMO_DIR=str(demo), LOCAL_DATA=str(content / "sonar_data"))

    # Runtime 1: killed during the full run.
    content.mkdir()
    with _Sampler(drive, files["trash"]) as first:
        nb, error, seconds_1 = _execute("00_all_in_one", executed / "1", env, cwd=content, DEMO_FLAGS=DEMO_FLAGS, **params)
    assert files["killed"].is_file(), "the training command was not killed"
    assert error is not None and "exit code -9" in str(error), f"the killed run should stop the cell: {error}"
    run = demo / colab.NOTEBOOK_RUNS / "full"
    assert (run / "state_slots.json").is_file(), "the disk plan should have kept last.pt on local disk with slot copies"

    # Runtime 2: a new /content, another memory split; the notebook runs from the top again.
    shutil.rmtree(content)
    content.mkdir()
    with _Sampler(drive, files["trash"]) as second:
        nb, error, seconds_2 = _execute("00_all_in_one", executed / "2", env, cwd=content,
                                        DEMO_FLAGS=DEMO_FLAGS + ANOTHER_SPLIT, **params)
    print(f"\n00_all_in_one on the simulated runtime: killed after {seconds_1:.0f} s, then {seconds_2:.0f} s and "
          f"{_line_count(nb)} output lines to the end")
    assert error is None, error
    text = _text(nb)
    resumed = [line for line in text.splitlines() if "resuming inside epoch" in line]
    assert resumed, "the second runtime should have resumed the killed run inside an epoch"
    print(resumed[0])

    # The whole workflow ran from the clone: verify, quick test, full run, test evaluation, export.
    assert (content / "sonar-ft" / "train_sonar_finetuning.py").is_file()
    runs = demo / colab.NOTEBOOK_RUNS
    for path in ("verify/lengths.png", "quick_test/metrics_epoch2.json", "full/best_encoder.pt",
                 "full/test_results.json", "sonar_encoder_finetuned.tar.gz"):
        assert (runs / path).is_file(), path
    assert _pngs(nb) == 3 and _has_table(nb, "num_samples", "bleu")

    # Drive never held more than its quota, trash included.
    events = [int(u[1]) for u in _lines(files["usage"])]
    peak = max([first.peak, second.peak, *events])
    trash = sum(int(t[1]) for t in _lines(files["trash"]))
    print(f"Drive: quota {quota / 1e6:.2f} MB, peak {peak / 1e6:.2f} MB (trash {trash / 1e6:.3f} MB); "
          f"atomic saves on Drive would have peaked at {atomic_peak / 1e6:.2f} MB")
    assert peak <= quota, f"Drive peak {peak} bytes passed the quota {quota}"

    # No feature file was read from Drive after the second runtime's copy.
    local = content / "sonar_data" / "features"
    stamps = [local / split / STAMP_NAME for split in colab.SPLITS]
    assert all(s.is_file() for s in stamps)
    copied_at = max(s.stat().st_mtime for s in stamps)
    features_on_drive = str(demo / "data" / "features")  # models (encoder, decoder) stay on Drive, as in Colab
    reads = [(float(t), p) for t, p in (line.split(" ", 1) for line in files["reads"].read_text().splitlines())
             if p.startswith(features_on_drive)]
    assert reads, "the copy itself should have read the Drive folder"
    after = [p for t, p in reads if t > copied_at]
    assert after == [], f"{len(after)} feature file(s) read from Drive after the copy, e.g. {after[:3]}"
    for split in colab.SPLITS:  # every step read the local copy: the verify reports name it
        report = json.loads((runs / "verify" / f"{split}.json").read_text())
        assert report["ok"] and report["features"].startswith(str(local))

    assert "\x1b" not in text and "\r" not in text, "terminal codes or carriage returns in the output"
    assert "Using default tokenizer" not in text and "parameter load" not in text
    assert _line_count(nb) <= MAX_OUTPUT_LINES

    # The killed and resumed run ends as the uninterrupted one with the first split (no kill, no Drive).
    settings = json.loads((run / CONFIG_FILE).read_text())["settings"]
    reference = sim / "reference"
    settings.update(output_dir=str(reference), state_dir=None, batch_size=16, grad_accum=1)
    env_ref = {k: v for k, v in os.environ.items() if not k.startswith("SONAR_FT_SIM")}
    done = subprocess.run([sys.executable, str(ROOT / "train_sonar_finetuning.py"), *command_line(settings)],
                          env={**env_ref, "TQDM_DISABLE": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ours, theirs = read_history(run), read_history(reference)
    assert [h["epoch"] for h in ours] == [h["epoch"] for h in theirs] == [1, 2, 3]
    for a, b in zip(ours, theirs):
        assert a["lr"] == b["lr"]
        for key in ("train_loss", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["epoch"], key)
    print("val BLEU by epoch, resumed / uninterrupted: "
          + ", ".join(f"{a['val_bleu']:.1f}/{b['val_bleu']:.1f}" for a, b in zip(ours, theirs)))
    mine, expected = load_torch(run / BEST_ENCODER)["student"], load_torch(reference / BEST_ENCODER)["student"]
    for key in expected:
        assert_close_to_scale(mine[key], expected[key], msg=key)
