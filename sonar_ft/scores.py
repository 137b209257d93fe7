"""Translation scores as the sign-language-translation literature reports them, and SONAR-native ones.

Text scores (every evaluation):

- ``bleu1`` ... ``bleu4``: cumulative corpus BLEU-n from sacrebleu's own implementation
  (``BLEU(max_ngram_order=n)``, 13a tokenisation, mixed case, exponential smoothing); ``bleu`` is BLEU-4.
- ``chrf``: corpus chrF (sacrebleu defaults).
- ``rougeL``: ROUGE-L F1 from the ``rouge-score`` package (its default tokeniser: lowercased ASCII
  letters and digits, no stemming), the mean over sentences, x100 like BLEU.

Semantic scores (only when a SONAR text encoder is available):

- ``cosine``: mean cosine similarity between each clip's sign embedding and the text-encoder
  embedding of its reference sentence;
- ``r1`` / ``r5``: sign-to-text retrieval accuracy in percent: how often the clip's own reference is
  the nearest (among the 5 nearest) of the split's distinct reference sentences.

No torch at module level: display code may import the names below.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any, Sequence

BLEU_ORDERS = (1, 2, 3, 4)
TEXT_METRICS = ("bleu", "bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "chrf")
SEMANTIC_METRICS = ("cosine", "r1", "r5")
METRICS = (*TEXT_METRICS, *SEMANTIC_METRICS, "loss")
"""Every metric of an evaluation, in the order papers print them: the one list every other place derives its
names from (``--select_metric`` / tuning's ``optimize``, ``EpochMetrics.val_*``, TensorBoard tags, notebook
tables). All but ``loss`` are better when higher."""
ALIASES = {"bleu4": "bleu"}
"""Metrics that are another one under a second name (``bleu`` is BLEU-4): tables and plots show them once."""
LOWER_IS_BETTER = frozenset({"loss"})
RETRIEVAL_K = (1, 5)


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (one of :data:`METRICS`) is an improvement."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    return metric not in LOWER_IS_BETTER


def _rouge_version() -> str:
    try:
        return metadata.version("rouge-score")
    except metadata.PackageNotFoundError:
        return "unknown"


def rouge_signature() -> str:
    """How ``rougeL`` was computed, in sacrebleu's signature style."""
    return f"rougeL|F1|mean-of-sentences|x100|stemmer:no|tok:rouge-score-default|version:{_rouge_version()}"


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Corpus BLEU-1..4, chrF and ROUGE-L of ``hypotheses`` against one reference each.

    Returns ``(scores, signatures)``: scores keyed by :data:`TEXT_METRICS`, signatures keyed
    ``bleu`` / ``chrf`` / ``rougeL`` (the BLEU one holds for every order; only ``max_ngram_order`` differs).
    """
    from sacrebleu.metrics import BLEU, CHRF

    hyps, refs = list(hypotheses), [list(references)]
    if len(hyps) != len(refs[0]):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs[0])} references")
    scores: dict[str, float] = {}
    signature = ""
    for n in BLEU_ORDERS:
        bleu = BLEU(max_ngram_order=n)
        scores[f"bleu{n}"] = float(bleu.corpus_score(hyps, refs).score)
        if n == 4:
            signature = str(bleu.get_signature())
    scores["bleu"] = scores["bleu4"]
    chrf = CHRF()
    scores["chrf"] = float(chrf.corpus_score(hyps, refs).score)
    scorer = _rouge_scorer()
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs[0])]
    scores["rougeL"] = 100.0 * sum(rouge) / len(rouge) if rouge else 0.0
    signatures = {"bleu": signature, "chrf": str(chrf.get_signature()), "rougeL": rouge_signature()}
    return {k: scores[k] for k in TEXT_METRICS}, signatures


def sentence_scores(hypotheses: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """Per sentence: ``bleu_score`` (BLEU-4, effective order), ``chrf`` and ``rougeL`` (F1 x100)."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf, rouge = BLEU(effective_order=True), CHRF(), _rouge_scorer()
    return [
        {
            "bleu_score": float(bleu.sentence_score(h, [r]).score),
            "chrf": float(chrf.sentence_score(h, [r]).score),
            "rougeL": 100.0 * rouge.score(r, h)["rougeL"].fmeasure,
        }
        for h, r in zip(hypotheses, references)
    ]


def semantic_scores(sign_emb: Any, text_emb: Any, references: Sequence[str]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Cosine and sign-to-text retrieval between sign embeddings ``(N, E)`` and reference embeddings ``(N, E)``.

    Row ``i`` of both belongs to clip ``i``; ``references[i]`` is its sentence. Candidates are the
    distinct references (a sentence said by several clips is one candidate, right for all of them).
    Returns the corpus scores (``cosine`` mean, ``r1`` / ``r5`` in percent, ``retrieval_candidates``)
    and, per clip, ``cosine`` and ``rank`` (1 = its own reference is the nearest).
    """
    import torch
    import torch.nn.functional as F

    sign = F.normalize(torch.as_tensor(sign_emb, dtype=torch.float32), dim=-1)  # (N, E)
    text = F.normalize(torch.as_tensor(text_emb, dtype=torch.float32), dim=-1)  # (N, E)
    if sign.shape != text.shape or sign.dim() != 2 or len(references) != sign.shape[0]:
        raise ValueError(f"sign {tuple(sign.shape)}, text {tuple(text.shape)} and {len(references)} references do not match")
    n = sign.shape[0]
    if n == 0:
        return {"cosine": 0.0, "r1": 0.0, "r5": 0.0, "retrieval_candidates": 0}, []
    cosine = (sign * text).sum(-1)  # (N,)
    first: dict[str, int] = {}
    for i, ref in enumerate(references):
        first.setdefault(ref, i)
    candidates = torch.tensor(list(first.values()))  # (C,) row of each distinct reference
    index = {ref: j for j, ref in enumerate(first)}
    own = torch.tensor([index[ref] for ref in references])  # (N,) candidate index of each clip's reference
    sims = sign @ text[candidates].T  # (N, C)
    own_sim = sims[torch.arange(n), own]  # (N,)
    # Rank = 1 + candidates strictly closer than the clip's own reference (ties go to the clip).
    rank = 1 + (sims > own_sim[:, None]).sum(-1)  # (N,)
    scores = {
        "cosine": float(cosine.mean()),
        **{f"r{k}": 100.0 * float((rank <= k).float().mean()) for k in RETRIEVAL_K},
        "retrieval_candidates": int(len(candidates)),
    }
    per_clip = [{"cosine": float(c), "rank": int(r)} for c, r in zip(cosine, rank)]
    return scores, per_clip


def chance_r_at(k: int, candidates: int) -> float:
    """Retrieval accuracy in percent of a random ranking: ``k`` of ``candidates`` (capped at 100)."""
    return 100.0 * min(k, candidates) / candidates if candidates else 0.0
