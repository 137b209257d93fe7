"""`make demo` end to end: every step of the pipeline on the shared pretrained tiny demo, which must really learn.

The full-size build (`make demo`, 600 clips of 768-d features, a source-domain pretraining) takes minutes of CPU;
its figures are in the README. Here the same pipeline (`run_demo`) runs on the session's pretrained tiny demo:
held-out test BLEU and chrF must rise above the zero-shot start.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sonar_ft.demo.__main__ import run_demo
from tests.conftest import PRETRAINED_DEMO, private_copy


@pytest.mark.slow
def test_make_demo_learns_and_writes_its_layout(pretrained_demo, tmp_path_factory, capsys):
    paths = private_copy(pretrained_demo, tmp_path_factory, "demo_e2e")
    root = paths.root
    summary = run_demo(root, PRETRAINED_DEMO)
    # The tiny demo adapts less than the full one (README: `make demo` numbers), but it must adapt.
    assert summary["test_bleu_after"] > summary["test_bleu_before"]
    assert summary["test_chrf_after"] > summary["test_chrf_before"] + 3
    assert summary["test_clips"] == PRETRAINED_DEMO.n_test
    for rel in [
        "data/features/train", "data/features/val", "data/features/test",
        "data/manifests/train.tsv", "data/manifests/val.tsv", "data/manifests/test.tsv",
        "assets/sonar_encoder_demo.pth", "assets/text_decoder.yaml", "assets/tokenizer.model",
        "quick_test/metrics_epoch5.json", "finetune/best_encoder.pt", "test_evaluation/test_results.json",
        "plots/loss.png", "plots/bleu.png", "sonar_encoder_finetuned.tar.gz",
    ]:
        assert (root / rel).exists(), rel
    # The validation and test sentences never occur in training.
    texts = {s: {line.split("\t")[-1] for line in (root / f"data/manifests/{s}.tsv").read_text().splitlines()[1:]}
             for s in ("train", "val", "test")}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"]
    out = capsys.readouterr().out
    assert "fra_Latn" in out and "test BLEU before fine-tuning" in out
    assert json.loads((root / "demo_summary.json").read_text())["test_bleu_after"] == summary["test_bleu_after"]
    _assert_video_step(paths, summary, out)


def _assert_video_step(paths, summary: dict, out: str) -> None:
    """Step 9: the synthetic videos went through `sonar-ft extract` and `sonar-ft translate --video`."""
    from sonar_ft.inference.extract import read_report

    videos = sorted(paths.videos.glob("*.mp4"))
    assert len(videos) == summary["video_clips"] >= 2
    report = read_report(paths.video_features)
    assert sorted(report) == [v.stem for v in videos]
    rows = 0
    for video in videos:
        entry = report[video.stem]
        assert entry["status"] == "ok" and entry["crop"] == "center", entry
        features = np.load(paths.video_features / f"{video.stem}.npy")
        assert features.ndim == 2 and features.shape == (entry["vectors"], PRETRAINED_DEMO.feature_dim)
        assert features.shape[0] > 0 and np.isfinite(features).all()
        rows += features.shape[0]
    assert summary["video_feature_rows"] == rows
    assert summary["video_windows"] == sum(e["windows"] for e in report.values()) >= len(videos)
    translations = json.loads(paths.video_translations.read_text())
    assert [t["id"] for t in translations] == [v.stem for v in videos]
    assert all(isinstance(t["eng_Latn"], str) and t["eng_Latn"].strip() for t in translations)
    assert summary["video_translations"] == translations
    assert 0 < summary["video_step_seconds"] < summary["seconds"]
    assert "sonar_ft.cli extract" in out and "sonar_ft.cli translate --video" in out and "random weights" in out
