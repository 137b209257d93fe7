"""Evaluation: validation loss, beam-search predictions and their scores (sonar_ft.scores), and ``--eval_only``.

Text scores (BLEU-1..4, chrF, ROUGE-L) at every evaluation; SONAR-native semantic scores (cosine to
the reference's text embedding, sign-to-text retrieval R@1 / R@5) when a text encoder is passed.
Signatures are recorded with every score so numbers from different runs are comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from sonar_ft.config import TrainConfig
from sonar_ft.data.dataset import make_loader
from sonar_ft.data.splits import check_feature_dim, load_split
from sonar_ft.device import decoder_dtype, resolve_device, resolve_precision
from sonar_ft.errors import ConfigError, OutputDirError
from sonar_ft.files import atomic
from sonar_ft.files.lock import output_lock
from sonar_ft.models.decoder import FrozenTextDecoder
from sonar_ft.models.encoder import load_encoder
from sonar_ft.run_files import TEST_RESULTS
from sonar_ft.scores import METRICS, SEMANTIC_METRICS, corpus_scores, semantic_scores, sentence_scores

log = logging.getLogger(__name__)

TEXT_EMBED_BATCH = 64  # reference sentences per text-encoder forward pass


@dataclass
class EvalResult:
    """Scores and per-sample predictions of one evaluation pass.

    ``scores`` holds :data:`sonar_ft.scores.TEXT_METRICS` always and ``SEMANTIC_METRICS`` when a text
    encoder was given; ``signatures`` says how each family was computed.
    """

    loss: float | None
    scores: dict[str, float]
    signatures: dict[str, str]
    num_samples: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    semantic: dict[str, Any] | None = None
    """Text encoder and number of retrieval candidates behind the semantic scores (None: not computed)."""

    @property
    def bleu(self) -> float:
        return self.scores["bleu"]

    @property
    def chrf(self) -> float:
        return self.scores["chrf"]

    @property
    def bleu_signature(self) -> str:
        return self.signatures["bleu"]

    @property
    def chrf_signature(self) -> str:
        return self.signatures["chrf"]

    def metric(self, name: str) -> float | None:
        """The value of one of :data:`sonar_ft.scores.METRICS` (None when not computed: loss off, no text encoder)."""
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; one of {', '.join(METRICS)}")
        return self.loss if name == "loss" else self.scores.get(name)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-sample list: every metric (None when not computed) and the signatures."""
        out: dict[str, Any] = {name: self.metric(name) for name in METRICS}
        out.update(
            bleu_signature=self.signatures["bleu"],
            chrf_signature=self.signatures["chrf"],
            rouge_signature=self.signatures["rougeL"],
            semantic=self.semantic,
            num_samples=self.num_samples,
        )
        return out

    def epoch_fields(self) -> dict[str, float | None]:
        """The ``val_*`` values of a ``metrics_epoch{N}.json`` line: ``val_loss``, ``val_bleu``, ... ``val_r5``."""
        return {f"val_{name}": self.metric(name) for name in METRICS}

    def predictions_record(self, epoch: int) -> dict[str, Any]:
        """What ``predictions_epoch{N}.json`` holds: the epoch, every score, signatures and per-sentence rows."""
        return {"epoch": epoch, **self.summary(), "samples": self.samples}


def empty_epoch_fields() -> dict[str, None]:
    """The ``val_*`` values of an epoch without evaluation."""
    return {f"val_{name}": None for name in METRICS}


def score_corpus(hypotheses: list[str], references: list[str]) -> tuple[float, float, str, str]:
    """Corpus BLEU-4 and chrF (sacrebleu defaults) and their signatures (see :func:`sonar_ft.scores.corpus_scores`)."""
    scores, signatures = corpus_scores(hypotheses, references)
    return scores["bleu"], scores["chrf"], signatures["bleu"], signatures["chrf"]


def sentence_bleu(hypothesis: str, reference: str) -> float:
    """Sentence-level BLEU with effective-order smoothing (sacrebleu's recommended setting)."""
    return sentence_scores([hypothesis], [reference])[0]["bleu_score"]


def embed_references(text_encoder: Any, references: Sequence[str], lang: str, batch_size: int = TEXT_EMBED_BATCH) -> torch.Tensor:
    """SONAR text embeddings ``(N, E)`` (float32, CPU) of ``references``, in batches."""
    parts = [text_encoder.embed(list(references[i : i + batch_size]), lang).float().cpu() for i in range(0, len(references), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, 0)


def embedding_gatherer(gather_objects: Callable[[Any], list[Any]]) -> Callable[[list[str], torch.Tensor], tuple[list[str], torch.Tensor]]:
    """The ``gather_embeddings`` argument of :func:`evaluate` from an all-gather of Python objects (one per rank)."""

    def gather(ids: list[str], emb: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        parts = gather_objects((list(ids), emb.cpu()))
        return [i for part in parts for i in part[0]], torch.cat([part[1] for part in parts])

    return gather


def ids_sha256(ids: Iterable[str]) -> str:
    """SHA-256 of the sorted clip ids, one per line: which clips a score is over, in 64 characters."""
    return hashlib.sha256("".join(f"{i}\n" for i in sorted(ids)).encode("utf-8")).hexdigest()


def results_record(result: EvalResult, settings: Mapping[str, Any]) -> dict[str, Any]:
    """``test_results.json`` of an ``--eval_only`` run: scores, what was evaluated (SHA-256) and the data used.

    ``settings`` are the run's settings (``dataclasses.asdict(TrainConfig)``). ``encoder_sha256`` lets
    ``sonar-ft export`` refuse scores that belong to another encoder than the one it packs.
    """
    encoder = settings.get("encoder_checkpoint")
    manifest = settings.get("val_manifest")
    data = {
        "features": str(settings.get("val_features")),
        "manifest": str(manifest),
        "manifest_sha256": atomic.file_sha256(manifest, limit=None) if manifest and Path(manifest).is_file() else None,
        "max_samples": settings.get("max_samples"),
        "max_frames": settings.get("max_frames"),
        "num_samples": result.num_samples,
        "clip_ids_sha256": ids_sha256(s["id"] for s in result.samples),
    }
    return {
        **result.summary(),
        "encoder_checkpoint": str(encoder),
        "encoder_sha256": atomic.checkpoint_sha256(encoder) if encoder and Path(encoder).is_file() else None,
        "features": data["features"],
        "manifest": data["manifest"],
        "data": data,
        "decoder": settings.get("decoder"),
        "tgt_lang": settings.get("tgt_lang"),
        "beam_size": settings.get("beam_size"),
        "max_gen_len": settings.get("max_gen_len"),
        "samples": result.samples,
    }


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
    text_encoder: Any | None = None,
    gather_embeddings: Callable[[list[str], torch.Tensor], tuple[list[str], torch.Tensor]] | None = None,
) -> EvalResult:
    """Encode every batch, score the teacher-forced loss, beam-search the texts and score them.

    ``batches`` yields :class:`sonar_ft.data.Batch` objects (``ids``, ``features``, ``mask``, ``texts``).
    ``gather(ids, refs, hyps, loss_sum, token_sum)`` combines the parts of all data-parallel ranks.
    ``text_encoder`` (a :class:`sonar_ft.models.text_encoder.FrozenTextEncoder`) adds the semantic scores;
    under data parallelism they also need ``gather_embeddings(ids, emb) -> (ids, emb)`` (all ranks'
    sign embeddings, any order) and are left out, with a warning, without it.
    """
    was_training = encoder.training
    encoder.eval()
    ids: list[str] = []
    refs: list[str] = []
    hyps: list[str] = []
    embs: list[torch.Tensor] = []
    loss_sum, token_sum = 0.0, 0
    try:
        for batch in tqdm(batches, desc=desc, leave=False, disable=None):  # None: a bar only in a terminal
            batch = batch.to(device)
            with autocast_context(device, precision):
                emb = encoder(batch.features, batch.mask)
            emb = emb.float()
            if text_encoder is not None:
                embs.append(emb.detach().cpu())  # (B, E)
            if compute_loss:
                out = decoder.loss(emb, batch.texts, lang, chunk_size=loss_chunk_size)
                loss_sum += float(out.loss) * out.num_tokens
                token_sum += out.num_tokens
            hyps.extend(decoder.generate(emb, lang, beam_size=beam_size, max_gen_len=max_gen_len))
            refs.extend(batch.texts)
            ids.extend(batch.ids)
    finally:
        encoder.train(was_training)
    local_ids = list(ids)
    if gather is not None:
        # Data-parallel: each rank decoded its shard; every rank scores the union, so all of them
        # take the same decisions (best checkpoint, plateau, early stopping) from the same numbers.
        ids, refs, hyps, loss_sum, token_sum = gather(ids, refs, hyps, loss_sum, token_sum)
    scores, signatures = corpus_scores(hyps, refs)
    samples = [
        {"id": i, "reference": r, "prediction": h, **per}
        for i, r, h, per in zip(ids, refs, hyps, sentence_scores(hyps, refs))
    ]
    semantic = None
    if text_encoder is not None:
        sign = torch.cat(embs) if embs else torch.empty(0, 0)
        if gather is not None:
            if gather_embeddings is None:
                log.warning("semantic scores left out: data-parallel evaluation was given no gather_embeddings")
                sign = None
            else:
                local_ids, sign = gather_embeddings(local_ids, sign)
        if sign is not None:
            row = {clip: k for k, clip in enumerate(local_ids)}
            sign = sign[[row[i] for i in ids]] if len(ids) else sign  # the order of ids / refs
            text = embed_references(text_encoder, refs, lang)
            values, per_clip = semantic_scores(sign, text, refs)
            scores.update({k: values[k] for k in SEMANTIC_METRICS})
            semantic = {"text_encoder": str(getattr(text_encoder, "source", "")), "retrieval_candidates": values["retrieval_candidates"]}
            for sample, extra in zip(samples, per_clip):
                sample.update(extra)
    return EvalResult(
        loss=(loss_sum / token_sum) if compute_loss and token_sum else None,
        scores=scores,
        signatures=signatures,
        num_samples=len(samples),
        samples=samples,
        semantic=semantic,
    )


def load_scorer(cfg: TrainConfig, device: torch.device) -> Any:
    """The SONAR text encoder for the semantic scores, only when ``--text_encoder`` is given (never a silent download)."""
    if not cfg.text_encoder:
        return None
    from sonar_ft.models.text_encoder import FrozenTextEncoder

    return FrozenTextEncoder.load(cfg.text_encoder, cfg.tokenizer, device=device)


def evaluate_checkpoint(cfg: TrainConfig) -> dict[str, Any]:
    """``--eval_only``: score ``encoder_checkpoint`` on the ``val_*`` split; write only ``test_results.json``."""
    cfg.validate()
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create --output_dir {out}: {exc.strerror or exc}") from None
    dataset = load_split(cfg.val_features, cfg.val_manifest, cfg=cfg, split="evaluation")
    batches = make_loader(dataset, cfg.batch_size, shuffle=False, seed=cfg.seed, num_workers=cfg.num_workers)
    encoder, arch = load_encoder(cfg.encoder_checkpoint, device=device)
    check_feature_dim(dataset, arch.feature_dim, features=cfg.val_features, encoder=cfg.encoder_checkpoint)  # as training does
    decoder = FrozenTextDecoder.load(cfg.decoder, cfg.tokenizer, device=device, dtype=decoder_dtype(cfg.decoder_dtype, device))
    decoder.check_lang(cfg.tgt_lang)
    if arch.output_dim != decoder.embedding_dim:
        raise ConfigError(f"encoder outputs {arch.output_dim}-d embeddings but decoder {cfg.decoder} reads {decoder.embedding_dim}-d ones")
    result = evaluate(encoder, decoder, batches, lang=cfg.tgt_lang, device=device, precision=precision,
                      beam_size=cfg.beam_size, max_gen_len=cfg.max_gen_len, loss_chunk_size=cfg.loss_chunk_size,
                      text_encoder=load_scorer(cfg, device))
    record = results_record(result, asdict(cfg))  # scores + SHA-256 of the encoder and data: export checks them
    with output_lock(out / TEST_RESULTS, folder=False, command="--eval_only"):  # one writer of test_results.json
        atomic.write_json(out / TEST_RESULTS, record)
    return record
