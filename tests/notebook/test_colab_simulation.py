"""A simulated Colab runtime: 00_all_in_one (DEMO) from an empty /content, the data on a Drive-like folder.

The suite's one execution of 00_all_in_one: it also checks the workflow's files, figures and tables.

Simulated: an empty working folder standing for ``/content`` (the project is cloned into it), a
Drive-like folder holding the demo's data and models where every open of a feature file waits and
is logged (``drive_shim/sitecustomize.py``, loaded by every Python process of the run), and the
Colab-like kernel (no torch). Not simulated here: Drive's quota and trash, a SIGKILL mid-epoch and a
re-run with another memory split (resume on any GPU is branch issue21a's work), Colab's own
google.colab module, a GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sonar_ft.data.pack import STAMP_NAME
from sonar_ft.demo.paths import DemoPaths
from sonar_ft.notebook import colab
from tests.notebook.test_notebooks import (  # noqa: F401  (kernel_env: the fixture)
    MAX_OUTPUT_LINES, ROOT, _execute, _has_table, _line_count, _pngs, _text, kernel_env,
)

SHIM = Path(__file__).resolve().parent / "drive_shim"
DELAY = 0.02  # seconds per feature-file open on the Drive-like folder


@pytest.mark.slow
def test_all_in_one_reads_no_feature_file_from_drive_after_the_copy(
    tiny_demo: DemoPaths, kernel_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    content = tmp_path_factory.mktemp("content")
    drive = tmp_path_factory.mktemp("drive")
    for part in ("data", "assets"):
        shutil.copytree(tiny_demo.root / part, drive / "demo" / part)
    log = drive.parent / f"{drive.name}_reads.log"
    env = {**kernel_env, "PYTHONPATH": str(SHIM), "SONAR_FT_SIM_DRIVE": str(drive), "SONAR_FT_SIM_DELAY": str(DELAY),
           "SONAR_FT_SIM_LOG": str(log)}
    nb, error, seconds = _execute("00_all_in_one", content / "executed", env, cwd=content, DEMO=True, REPO_URL=str(ROOT),
                                  DEMO_DIR=str(drive / "demo"), LOCAL_DATA=str(content / "sonar_data"))
    print(f"\n00_all_in_one on the simulated runtime: {seconds:.0f} s, {_line_count(nb)} output lines")
    assert error is None, error
    # The whole workflow ran from the clone: verify, quick test, full run, test evaluation, export.
    assert (content / "sonar-ft" / "train_sonar_finetuning.py").is_file()
    runs = drive / "demo" / colab.NOTEBOOK_RUNS
    for path in ("verify/lengths.png", "quick_test/metrics_epoch2.json", "full/best_encoder.pt",
                 "full/test_results.json", "sonar_encoder_finetuned.tar.gz"):
        assert (runs / path).is_file(), path
    assert _pngs(nb) == 3 and _has_table(nb, "num_samples", "bleu")

    local = content / "sonar_data" / "features"
    stamps = [local / split / STAMP_NAME for split in colab.SPLITS]
    assert all(s.is_file() for s in stamps)
    copied_at = max(s.stat().st_mtime for s in stamps)
    features_on_drive = str(drive / "demo" / "data" / "features")  # models (encoder, decoder) stay on Drive, as in Colab
    reads = [(float(t), p) for t, p in (line.split(" ", 1) for line in log.read_text().splitlines())
             if p.startswith(features_on_drive)]
    assert reads, "the copy itself should have read the Drive folder"
    after = [p for t, p in reads if t > copied_at]
    assert after == [], f"{len(after)} feature file(s) read from Drive after the copy, e.g. {after[:3]}"
    # Every step read the local copy: the verify reports name it.
    for split in colab.SPLITS:
        report = json.loads((drive / "demo" / colab.NOTEBOOK_RUNS / "verify" / f"{split}.json").read_text())
        assert report["ok"] and report["features"].startswith(str(local))

    text = _text(nb)
    assert "\x1b" not in text and "\r" not in text, "terminal codes or carriage returns in the output"
    assert "Using default tokenizer" not in text and "parameter load" not in text
    assert _line_count(nb) <= MAX_OUTPUT_LINES
