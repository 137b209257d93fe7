"""`make demo` end to end: the offline demo must really learn (held-out test BLEU far above the start)."""

from __future__ import annotations

import json

import pytest

from sonar_ft.demo.__main__ import main as demo_main


@pytest.mark.slow
def test_make_demo_learns_and_writes_its_layout(tmp_path, capsys):
    root = tmp_path / "demo_runs"
    assert demo_main(["--demo-dir", str(root)]) == 0
    summary = json.loads((root / "demo_summary.json").read_text())
    # Feasibility runs of this design reach ~90+ BLEU from ~2; assert with a wide margin.
    assert summary["test_bleu_after"] >= 40
    assert summary["test_bleu_after"] - summary["test_bleu_before"] >= 30
    assert summary["test_clips"] == 100
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
