"""The frozen SONAR text encoder, used as a teacher for the optional distillation term.

The student (sign encoder) embedding of a clip is pulled towards the SONAR text embedding of its
target sentence. Teacher embeddings never change, so each sentence is embedded once and cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sonar_ft.models import assets


class FrozenTextEncoder:
    """A frozen SONAR text encoder with its tokenizer and a per-sentence embedding cache."""

    def __init__(self, model: Any, tokenizer: Any, *, source: str = "") -> None:
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.source = source
        self._cache: dict[tuple[str, str], Tensor] = {}

    @classmethod
    def load(
        cls,
        encoder: str | Path = assets.DEFAULT_TEXT_ENCODER,
        tokenizer: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
    ) -> "FrozenTextEncoder":
        """Load by asset card name, card ``.yaml`` or checkpoint (tokenizer defaults to the card's)."""
        if tokenizer is None:
            tokenizer = assets.default_tokenizer_for(encoder)
        model = assets.load_sonar_model(encoder, family=assets.ENCODER_FAMILY, device=torch.device(device), dtype=torch.float32)
        return cls(model, assets.load_sonar_tokenizer(tokenizer), source=str(encoder))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def embed(self, texts: Sequence[str], lang: str = "eng_Latn") -> Tensor:
        """Sentence embeddings ``(B, E)`` of ``texts`` (cached per sentence)."""
        from fairseq2.nn import BatchLayout

        missing = [t for t in dict.fromkeys(texts) if (lang, t) not in self._cache]
        if missing:
            enc = self.tokenizer.create_encoder(lang=lang, mode="source")
            seqs = [enc(t) for t in missing]
            lens = [len(s) for s in seqs]
            pad = self.tokenizer.vocab_info.pad_idx or 0
            x = torch.full((len(seqs), max(lens)), pad, dtype=torch.long)
            for i, s in enumerate(seqs):
                x[i, : len(s)] = s
            x = x.to(self.device)
            emb = self.model(x, BatchLayout.of(x, lens)).sentence_embeddings.float().cpu()
            for t, e in zip(missing, emb):
                self._cache[(lang, t)] = e
        return torch.stack([self._cache[(lang, t)] for t in texts])


def distillation_loss(student: Tensor, teacher: Tensor, kind: str = "mse") -> Tensor:
    """MSE or (1 - cosine) between student and teacher sentence embeddings, averaged over the batch."""
    teacher = teacher.to(device=student.device, dtype=student.dtype)
    if kind == "mse":
        return F.mse_loss(student, teacher)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    raise ValueError(f"unknown distillation loss {kind!r} (use mse or cosine)")
