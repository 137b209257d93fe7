"""Evaluation: validation loss, beam-search predictions, corpus BLEU / chrF and sentence BLEU.

Scores come from sacrebleu with its default settings (13a tokenisation, mixed case); the signature
string is recorded with every score so numbers from different runs are comparable.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from sonar_ft.decoder import FrozenTextDecoder

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Scores and per-sample predictions of one evaluation pass."""

    loss: float | None
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    num_samples: int
    samples: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-sample list."""
        return {
            "loss": self.loss,
            "bleu": self.bleu,
            "chrf": self.chrf,
            "bleu_signature": self.bleu_signature,
            "chrf_signature": self.chrf_signature,
            "num_samples": self.num_samples,
        }


def score_corpus(hypotheses: list[str], references: list[str]) -> tuple[float, float, str, str]:
    """Corpus BLEU and chrF (sacrebleu defaults) and their signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hypotheses, [references])
    c = chrf.corpus_score(hypotheses, [references])
    return float(b.score), float(c.score), str(bleu.get_signature()), str(chrf.get_signature())


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Sentence-level BLEU with effective-order smoothing (sacrebleu's recommended setting)."""
    from sacrebleu.metrics import BLEU

    return float(BLEU(effective_order=True).sentence_score(hypothesis, [reference]).score)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; fp32 otherwise. Never fp16: T5-v1.1 overflows in it."""
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    encoder: nn.Module,
    decoder: FrozenTextDecoder,
    batches: Iterable[Any],
    *,
    lang: str,
    device: torch.device,
    precision: str = "fp32",
    beam_size: int = 5,
    max_gen_len: int = 128,
    compute_loss: bool = True,
    loss_chunk_size: int = 1024,
    desc: str = "evaluating",
    gather: Callable[..., tuple[list[str], list[str], list[str], float, int]] | None = None,
) -> EvalResult:
    """Encode every batch, score the teacher-forced loss, beam-search the texts and score them.

    ``batches`` yields :class:`sonar_ft.data.Batch` objects (``ids``, ``features``, ``mask``, ``texts``).
    ``gather(ids, refs, hyps, loss_sum, token_sum)`` combines the parts of all data-parallel ranks.
    """
    was_training = encoder.training
    encoder.eval()
    ids: list[str] = []
    refs: list[str] = []
    hyps: list[str] = []
    loss_sum, token_sum = 0.0, 0
    try:
        for batch in tqdm(batches, desc=desc, leave=False):
            batch = batch.to(device)
            with autocast_context(device, precision):
                emb = encoder(batch.features, batch.mask)
            emb = emb.float()
            if compute_loss:
                out = decoder.loss(emb, batch.texts, lang, chunk_size=loss_chunk_size)
                loss_sum += float(out.loss) * out.num_tokens
                token_sum += out.num_tokens
            hyps.extend(decoder.generate(emb, lang, beam_size=beam_size, max_gen_len=max_gen_len))
            refs.extend(batch.texts)
            ids.extend(batch.ids)
    finally:
        encoder.train(was_training)
    if gather is not None:
        # Data-parallel: each rank decoded its shard; every rank scores the union, so all of them
        # take the same decisions (best checkpoint, plateau, early stopping) from the same numbers.
        ids, refs, hyps, loss_sum, token_sum = gather(ids, refs, hyps, loss_sum, token_sum)
    bleu, chrf, bleu_sig, chrf_sig = score_corpus(hyps, refs)
    samples = [
        {"id": i, "reference": r, "prediction": h, "bleu_score": sentence_bleu(h, r)}
        for i, r, h in zip(ids, refs, hyps)
    ]
    return EvalResult(
        loss=(loss_sum / token_sum) if compute_loss and token_sum else None,
        bleu=bleu,
        chrf=chrf,
        bleu_signature=bleu_sig,
        chrf_signature=chrf_sig,
        num_samples=len(samples),
        samples=samples,
    )
