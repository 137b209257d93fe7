"""Scores against independent computations: sacrebleu's command line, rouge-score called directly,
and retrieval on embeddings whose answer is known."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sonar_ft.scores import METRICS, corpus_scores, higher_is_better, semantic_scores, sentence_scores

# Fixed predictions; every n-gram order up to 4 has matches, so smoothing plays no part in BLEU-1..4.
REFS = [
    "the man is cutting a tomato on the board",
    "now we are going to fold the paper in half",
    "hold the racket with your right hand",
    "this is how you tie a bowline knot",
]
HYPS = [
    "the man is cutting the tomato on a board",
    "now we are going to fold paper in half",
    "hold the racket in your hand",
    "this is how you tie a knot",
]


def _sacrebleu_cli(tmp_path: Path, *metrics: str) -> list[dict]:
    (tmp_path / "ref.txt").write_text("\n".join(REFS) + "\n", encoding="utf-8")
    (tmp_path / "hyp.txt").write_text("\n".join(HYPS) + "\n", encoding="utf-8")
    cli = Path(sys.executable).with_name("sacrebleu")
    out = subprocess.run([str(cli), str(tmp_path / "ref.txt"), "-i", str(tmp_path / "hyp.txt"), "-m", *metrics, "-w", "6"],
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout)


def test_bleu_and_chrf_match_the_sacrebleu_command_line(tmp_path):
    bleu, chrf = _sacrebleu_cli(tmp_path, "bleu", "chrf")
    scores, signatures = corpus_scores(HYPS, REFS)
    assert scores["bleu4"] == pytest.approx(bleu["score"], abs=1e-4)
    assert scores["bleu"] == scores["bleu4"]
    assert scores["chrf"] == pytest.approx(chrf["score"], abs=1e-4)
    assert signatures["bleu"] == bleu["signature"] and signatures["chrf"] == chrf["signature"]
    # Cumulative BLEU-n from the command line's own n-gram precisions and brevity penalty:
    # BP * exp(mean(log p_1..p_n)). The precisions are printed with one decimal: a loose tolerance.
    m = re.match(r"([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) \(BP = ([\d.]+)", bleu["verbose_score"])
    precisions, bp = [float(x) for x in m.groups()[:4]], float(m.group(5))
    for n in (1, 2, 3):
        expected = bp * math.exp(sum(math.log(p) for p in precisions[:n]) / n)
        assert scores[f"bleu{n}"] == pytest.approx(expected, rel=2e-3), n
    assert scores["bleu1"] > scores["bleu2"] > scores["bleu3"] > scores["bleu4"]


def test_rouge_l_is_the_mean_f1_of_rouge_score(tmp_path):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    f1 = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(HYPS, REFS)]
    scores, signatures = corpus_scores(HYPS, REFS)
    assert scores["rougeL"] == pytest.approx(100 * sum(f1) / len(f1))
    assert "rougeL" in signatures["rougeL"] and "F1" in signatures["rougeL"]
    per = sentence_scores(HYPS, REFS)
    assert [p["rougeL"] for p in per] == pytest.approx([100 * x for x in f1])


def test_sentence_scores_match_sacrebleu_sentence_scores():
    from sacrebleu.metrics import BLEU, CHRF

    per = sentence_scores(HYPS, REFS)
    for p, h, r in zip(per, HYPS, REFS):
        assert p["bleu_score"] == pytest.approx(BLEU(effective_order=True).sentence_score(h, [r]).score)
        assert p["chrf"] == pytest.approx(CHRF().sentence_score(h, [r]).score)
    assert sentence_scores(["x"], ["x"])[0]["bleu_score"] == pytest.approx(100.0)


def test_retrieval_finds_each_clip_its_own_sentence():
    torch.manual_seed(0)
    text = torch.randn(6, 16)
    sign = text + 0.05 * torch.randn(6, 16)  # close to its own reference, far from the others
    refs = [f"sentence {i}" for i in range(6)]
    scores, per = semantic_scores(sign, text, refs)
    assert scores["r1"] == 100.0 and scores["r5"] == 100.0 and scores["cosine"] > 0.99
    assert [p["rank"] for p in per] == [1] * 6
    # Shift by one: each clip now sits on its neighbour's sentence, never its own.
    shifted, per = semantic_scores(sign.roll(1, 0), text, refs)
    assert shifted["r1"] == 0.0 and all(p["rank"] > 1 for p in per)


def test_a_sentence_said_by_two_clips_is_one_candidate_right_for_both():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # clips 0 and 2 share a sentence
    sign = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.9, 0.0]])
    scores, per = semantic_scores(sign, text, ["a", "b", "a"])
    assert scores["retrieval_candidates"] == 2 and scores["r1"] == 100.0


def test_metric_names_and_directions():
    assert set(METRICS) == {"bleu", "bleu1", "bleu2", "bleu3", "bleu4", "chrf", "rougeL", "cosine", "r1", "r5", "loss"}
    assert not higher_is_better("loss") and higher_is_better("r1")
    with pytest.raises(ValueError):
        higher_is_better("bleurt")


def test_every_list_of_metric_names_follows_scores_metrics():
    import dataclasses

    from sonar_ft.notebook.colab import SCORE_COLUMNS
    from sonar_ft.scores import ALIASES
    from sonar_ft.training.logs import EPOCH_TAGS
    from sonar_ft.training.state import EpochMetrics

    shown = [m for m in METRICS if m not in ALIASES]
    assert {f"val_{m}" for m in METRICS} <= {f.name for f in dataclasses.fields(EpochMetrics)}
    assert {f"val_{m}" for m in shown} <= set(EPOCH_TAGS)
    assert list(SCORE_COLUMNS) == shown


def test_the_notebook_helpers_import_no_torch():
    code = "import sys, sonar_ft.notebook.colab, sonar_ft.colab, sonar_ft.plots; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
