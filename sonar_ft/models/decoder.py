"""The frozen SONAR text decoder: sentence embedding -> token loss, or -> text by beam search.

The decoder is sonar-space's ``ConditionalTransformerDecoderModel`` loaded through fairseq2; nothing
here re-implements it. It stays frozen (``requires_grad=False``, eval mode) while gradients flow
through it into the embedding, so only the sign encoder learns.

Target sequences follow SONAR/NLLB: ``</s> __lang__ tok_1 ... tok_n </s>``. The decoder reads
``</s> __lang__ tok_1 ... tok_n`` and is scored on ``tok_1 ... tok_n </s>`` — the language token is
forced at generation time, so predicting it is not part of the loss.

The vocabulary has 256,206 entries: full logits for a batch take gigabytes. The loss therefore
projects and scores the decoder states in chunks of positions and recomputes each chunk's logits
in the backward pass (``torch.utils.checkpoint``), so peak memory is one chunk of logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sonar_ft.models import assets
from sonar_ft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_LOSS_CHUNK = 1024  # positions per chunk of logits: 1024 x 256k x 4 B = 1 GiB at the real vocabulary


@dataclass(frozen=True)
class LossOutput:
    """Mean token cross-entropy of a batch and the number of target tokens it averaged over."""

    loss: Tensor
    num_tokens: int


def _chunk_loss_sum(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, label_smoothing: float) -> Tensor:
    logits = F.linear(hidden, weight, bias).float()  # (N, V), fp32 for a stable log-softmax
    return F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)


def chunked_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    *,
    label_smoothing: float = 0.0,
    chunk_size: int = DEFAULT_LOSS_CHUNK,
) -> Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T (+ bias)`` against ``targets``.

    ``hidden`` is ``(N, M)`` (padding already removed), ``weight`` ``(V, M)``, ``targets`` ``(N,)``.
    Equal to the full-logits computation, but only ``chunk_size x V`` logits exist at a time, in
    the forward and in the backward pass.
    """
    if chunk_size <= 0 or hidden.size(0) <= chunk_size:
        return _chunk_loss_sum(hidden, weight, bias, targets, label_smoothing)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.size(0), chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            _chunk_loss_sum, hidden[start:end], weight, bias, targets[start:end], label_smoothing, use_reentrant=False
        )
    return total


LISTED_LANGS = 12  # languages named in an unknown-language error (the rest are counted)


def unknown_language_message(lang: str, langs: Sequence[str], source: str = "") -> str:
    """``lang`` is not one of ``langs``: say so, suggest close codes, and list codes the tokenizer really has."""
    close = [x for x in langs if x.split("_")[0] == lang.split("_")[0]][:5]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    common = [x for x in ("eng_Latn", "fra_Latn", "deu_Latn", "spa_Latn", "cmn_Hans", "arb_Arab") if x in langs]
    shown = list(dict.fromkeys([*common, *sorted(langs)]))[:LISTED_LANGS]
    more = f" and {len(langs) - len(shown)} more" if len(langs) > len(shown) else ""
    of = f" of {source}" if source else ""
    return (
        f"unknown target language {lang!r}{hint}: the tokenizer{of} supports {len(langs)} language(s): "
        f"{', '.join(shown)}{more}. Use one of these FLORES-200 codes."
    )


class FrozenTextDecoder(nn.Module):
    """A frozen SONAR text decoder with its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, langs: Sequence[str], source: str = "") -> None:
        if not (hasattr(model, "final_proj") and hasattr(model, "decode")):
            # e.g. the card of SONAR's text *encoder* given as --decoder: it loads, but cannot decode.
            raise ConfigError(
                f"--decoder {source!r} is not a SONAR text decoder (it loads as a {type(model).__name__}, which has no "
                "decoder; a text encoder's card?). Pass text_sonar_basic_decoder or a decoder's card / checkpoint"
            )
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.langs = tuple(langs)
        self.source = source
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self._encoders: dict[str, Any] = {}
        self._text_decoder = tokenizer.create_decoder(skip_special_tokens=True)
        vocab = tokenizer.vocab_info
        model_vocab = self.output_weight.size(0)
        if vocab.size != model_vocab:
            raise ConfigError(
                f"the tokenizer has {vocab.size} tokens but decoder {source!r} has {model_vocab}: "
                "--decoder and --tokenizer do not belong together"
            )
        self.train(False)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        decoder: str | Path = assets.DEFAULT_DECODER,
        tokenizer: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "FrozenTextDecoder":
        """Load the decoder by asset card name, card ``.yaml`` or checkpoint, and its tokenizer.

        ``tokenizer`` defaults to the decoder's own card when that is a card (name or ``.yaml``), and
        to the official SONAR tokenizer card otherwise.
        """
        if tokenizer is None:
            tokenizer = assets.default_tokenizer_for(decoder)
        model = assets.load_sonar_model(decoder, family=assets.DECODER_FAMILY, device=torch.device(device), dtype=dtype)
        tok = assets.load_sonar_tokenizer(tokenizer)
        return cls(model, tok, langs=assets.tokenizer_langs(tokenizer), source=str(decoder))

    # -- properties ------------------------------------------------------------------------------
    @property
    def output_weight(self) -> Tensor:
        return self.model.final_proj.weight

    @property
    def embedding_dim(self) -> int:
        """The size of the sentence embedding the decoder reads (1024 for SONAR)."""
        attn = self.model.decoder.layers[0].encoder_decoder_attn
        return int(attn.k_proj.input_dim)

    @property
    def device(self) -> torch.device:
        return self.output_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.output_weight.dtype

    def train(self, mode: bool = True) -> "FrozenTextDecoder":
        # Always eval: dropout in a frozen decoder would only add noise to the encoder's gradient.
        super().train(False)
        return self

    def check_lang(self, lang: str) -> None:
        """Raise :class:`ConfigError` naming the flag when ``lang`` is not a language of the tokenizer."""
        if lang not in self.langs:
            raise ConfigError(unknown_language_message(lang, self.langs, self.source))

    # -- tokenisation ----------------------------------------------------------------------------
    def _encoder(self, lang: str) -> Any:
        if lang not in self._encoders:
            self.check_lang(lang)
            self._encoders[lang] = self.tokenizer.create_encoder(task="translation", lang=lang, mode="target")
        return self._encoders[lang]

    @property
    def max_target_len(self) -> int:
        """The longest target sequence (special tokens included) the decoder's positions cover."""
        return int(getattr(self.model, "max_target_seq_len", 10**9))

    def count_tokens(self, texts: Sequence[str], lang: str) -> list[int]:
        """Each text's length as a target sequence (special tokens included), to compare with :attr:`max_target_len`."""
        enc = self._encoder(lang)
        return [len(enc(t)) for t in texts]

    def tokenize(self, texts: Sequence[str], lang: str, *, max_len: int | None = None) -> tuple[Tensor, Tensor]:
        """Target sequences ``</s> __lang__ tokens </s>`` padded with the pad index: (B, S) and lengths (B,)."""
        enc = self._encoder(lang)
        seqs = [enc(t) for t in texts]
        if max_len is None:
            too_long = [(t, len(s)) for t, s in zip(texts, seqs) if len(s) > self.max_target_len]
            if too_long:
                text, n = too_long[0]
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise DataError(
                    f"the reference {shown!r} has {n} tokens, more than the {self.max_target_len} decoder "
                    f"{self.source!r} can read ({len(too_long)} such text(s) in this batch); shorten or split it in the "
                    "manifest, or leave that clip out"
                )
        if max_len is not None:  # keep the final </s> so the model still learns to stop
            seqs = [s if len(s) <= max_len else torch.cat([s[: max_len - 1], s[-1:]]) for s in seqs]
        lens = torch.tensor([len(s) for s in seqs])
        pad = self.tokenizer.vocab_info.pad_idx or 0
        out = torch.full((len(seqs), int(lens.max())), pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = s
        return out, lens

    def scored_tokens(self, texts: Sequence[str], lang: str) -> Tensor:
        """Per text, the target tokens the loss scores (B,): ``</s>`` and the language token are read, not scored.

        The one rule for what a clip weighs in its accumulation window and what the memory plan counts.
        """
        _, lens = self.tokenize(texts, lang)
        return (lens - 2).clamp(min=0)

    # -- training loss ---------------------------------------------------------------------------
    def decoder_states(self, embeddings: Tensor, tokens: Tensor, lens: Tensor) -> Tensor:
        """Final decoder states ``(B, S-1, M)`` reading ``tokens[:, :-1]`` under ``embeddings``."""
        from fairseq2.nn import BatchLayout

        device = self.device
        inputs = tokens[:, :-1].to(device)
        in_layout = BatchLayout.of(inputs, (lens - 1).tolist())
        memory = embeddings.to(self.dtype).unsqueeze(1)  # (B, 1, E): one "source position" per clip
        mem_layout = BatchLayout.of(memory)
        return self.model.decode(inputs, in_layout, memory, mem_layout)

    def loss(
        self,
        embeddings: Tensor,
        texts: Sequence[str],
        lang: str = "eng_Latn",
        *,
        label_smoothing: float = 0.0,
        chunk_size: int = DEFAULT_LOSS_CHUNK,
        max_len: int | None = None,
    ) -> LossOutput:
        """Teacher-forced mean token cross-entropy of ``texts`` given ``embeddings`` (B, E)."""
        tokens, lens = self.tokenize(texts, lang, max_len=max_len)
        states = self.decoder_states(embeddings, tokens, lens)  # (B, S-1, M)
        # Position 0 reads </s> and would predict the forced language token: not scored.
        targets = tokens[:, 2:].to(self.device)  # (B, S-2)
        states = states[:, 1:]
        positions = torch.arange(targets.size(1), device=self.device)
        keep = positions[None, :] < (lens.to(self.device) - 2)[:, None]  # (B, S-2) real target tokens
        num_tokens = int(keep.sum())
        summed = chunked_cross_entropy(
            states[keep],
            self.output_weight,
            getattr(self.model.final_proj, "bias", None),
            targets[keep],
            label_smoothing=label_smoothing,
            chunk_size=chunk_size,
        )
        return LossOutput(loss=summed / max(num_tokens, 1), num_tokens=num_tokens)

    # -- generation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        embeddings: Tensor,
        lang: str = "eng_Latn",
        *,
        beam_size: int = 5,
        max_gen_len: int = 128,
        len_penalty: float = 1.0,
        batch_size: int = 64,
    ) -> list[str]:
        """Beam-search decode each embedding (N, E) into a sentence in ``lang``, in batches."""
        from fairseq2.generation.beam_search.generator import BeamSearchSeq2SeqGenerator
        from fairseq2.nn import BatchLayout
        from sonar.inference_pipelines.utils import SequenceToTextConverter
        from sonar.models.sonar_translation import SonarEncoderDecoderModel
        from sonar.models.sonar_translation.model import DummyEncoderModel

        self.check_lang(lang)
        if len(embeddings) == 0:
            return []
        wrapper = SonarEncoderDecoderModel(DummyEncoderModel(), self.model).eval()
        # fairseq2 0.8 takes (a, b): at most a * source_len + b tokens; the source is one embedding.
        generator = BeamSearchSeq2SeqGenerator(
            wrapper,
            self.tokenizer.vocab_info,
            beam_size=beam_size,
            max_gen_len=(0, int(max_gen_len)),
            max_seq_len=min(int(self.model.max_target_seq_len), int(max_gen_len) + 2),
            len_penalty=len_penalty,
        )
        converter = SequenceToTextConverter(generator, self.tokenizer, task="translation", target_lang=lang, mode="target")
        texts: list[str] = []
        for start in range(0, len(embeddings), batch_size):
            chunk = embeddings[start : start + batch_size].to(device=self.device, dtype=self.dtype)
            out, _ = converter.batch_convert(chunk, BatchLayout.of(chunk))
            texts.extend(out)
        return texts
