"""GPU check: does the official-size run fit each planned GPU, and how fast is it? (issue #16)

One command for the day a GPU is lent (``make gpu-check``; ~9 minutes on one data-centre GPU):

1. builds official-size stand-ins with random weights in a temporary folder (nothing is downloaded):
   the SignT5 encoder in the official 563-key layout, the SONAR ``basic`` text decoder from
   sonar-space's own architecture (24 layers, 1024 wide, 256,206 tokens) behind a local asset card,
   a 256,000-piece SentencePiece model loaded as fairseq2's NLLB tokenizer (202 languages), and a few
   hundred random clips with How2Sign-like lengths (up to 600 frames) and sentences;
2. for each GPU the planner knows (``sonar_ft.plan.recommend.GPUS``) caps this GPU's memory to that size and runs
   the recipe with the plan's flags (full fine-tuning with ``recommend``, LoRA with ``recommend_lora``) on
   the longest clips: fits or not, peak allocated memory against the plan's estimate, step time,
   clips/s, frames/s and target tokens/s, and one validation pass with beam search (clips/s);
3. measures ratios side by side: our encoder against Hugging Face's T5 stacks (fwd+bwd, bf16),
   ``--compile`` on/off, fused AdamW against 8-bit AdamW, bf16 against fp32;
4. profiles video -> feature extraction: a random-weight SignHiera at the official size, synthetic
   videos at How2Sign-like lengths and resolution through the real path (``extract_videos``, bf16,
   centre crop): windows/s of the model alone per batch size, decode + crop frames/s, videos per
   minute end to end, and the hours How2Sign's ~80 h of video would take on this GPU;
5. writes ``benchmarks/out/gpu_check.json`` and ``gpu_check.md``. Every part reports ``ok`` or why
   not (skipped, stopped by the time budget, does not fit, failed), and the rest goes on.

``--smoke`` runs the same code with tiny shapes and two steps on CPU (``tests/benchmarks/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import logging
import math
import os
import platform
import random
import shutil
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: progress bars would drown the report

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import OUT  # noqa: E402
from sonar_ft.files import atomic  # noqa: E402
from sonar_ft.models import assets  # noqa: E402
from sonar_ft.plan import memory as plan  # noqa: E402
from sonar_ft.plan import recommend as planner  # noqa: E402
from sonar_ft.data import ManifestRow, write_manifest  # noqa: E402
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder, official_key_shapes, save_encoder  # noqa: E402
from sonar_ft.models.signhiera import SignHieraConfig, tiny_config  # noqa: E402

log = logging.getLogger("gpu_check")
GIB = 1024**3
LANG = "eng_Latn"


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Everything the check builds and runs, at one scale (official, or tiny for ``--smoke``)."""

    encoder: SignT5Config
    """The SignT5 encoder stand-in (official: the defaults, T5-v1.1-large)."""
    decoder_overrides: dict[str, Any] | None
    """Changes to sonar-space's ``basic`` decoder architecture (None: the official one)."""
    spm_pieces: int
    """SentencePiece pieces (NLLB's model has 256,000; fairseq2 adds <pad>, 202 languages, 3 data tags)."""
    n_clips: int
    """Random clips built (How2Sign-like lengths); the longest train, the others validate."""
    max_frames: int
    effective_batch: int
    """Effective batch the plans are made for (micro-batch x grad_accum)."""
    steps: int
    """Optimiser steps per epoch; a run is two epochs (warm-up, measured) and one validation pass."""
    val_clips: int
    beam_size: int
    max_gen_len: int
    bench_batch: int
    """Clips per fwd+bwd in the ratio measurements."""
    repeat: int
    """Timed repetitions per side in the ratio measurements (median)."""
    budget_s: float
    """Wall-clock budget of the whole check."""
    run_cap_s: float
    """Longest a single recipe run may take before it is stopped."""
    signhiera: SignHieraConfig
    """The SignHiera extraction is profiled with (official: the defaults, ``hiera_base_128x224``)."""
    video_seconds: tuple[float, ...]
    """Lengths of the synthetic videos extracted (official: 7 s on average, like How2Sign's clips; several, so
    that decoding ahead overlaps the model as in a long run)."""
    video_size: tuple[int, int]
    """Width and height of those videos (How2Sign: 1280 x 720)."""
    extract_batches: tuple[int, ...]
    """Windows per forward pass timed for the model alone; the largest also runs end to end."""
    extract_cap_s: float
    """Longest the extraction part may take."""
    lora_rank: int = 16
    video_fps: int = 30
    """Frame rate of the synthetic videos (How2Sign's)."""


OFFICIAL = Sizes(
    encoder=SignT5Config(), decoder_overrides=None, spm_pieces=256_000, n_clips=320, max_frames=600,
    effective_batch=32, steps=2, val_clips=32, beam_size=5, max_gen_len=64, bench_batch=8, repeat=5,
    budget_s=540.0, run_cap_s=75.0,
    signhiera=SignHieraConfig(), video_seconds=(3.0, 7.0, 15.0, 7.0, 3.0, 7.0), video_size=(1280, 720), extract_batches=(1, 4, 8),
    extract_cap_s=90.0,
)
SMOKE = Sizes(
    encoder=SignT5Config(feature_dim=16, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=1,
                         num_decoder_layers=1, vocab_size=8, output_dim=32),
    decoder_overrides={"model_dim": 32, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_encoder_attn_heads": 4,
                       "num_decoder_attn_heads": 4, "ffn_inner_dim": 64, "max_seq_len": 64},
    spm_pieces=2_000, n_clips=12, max_frames=40, effective_batch=4, steps=1, val_clips=2, beam_size=2, max_gen_len=8,
    bench_batch=2, repeat=2, budget_s=240.0, run_cap_s=60.0,
    signhiera=tiny_config(), video_seconds=(2.0, 12.0), video_size=(96, 64), extract_batches=(1, 2), extract_cap_s=60.0,
)
HOW2SIGN_HOURS = 80.0
"""Hours of video in How2Sign (all splits; clips of ~7 s on average at 30 fps, 1280 x 720)."""


# ------------------------------------------------------------------------------------------------
# Parts, time limits
# ------------------------------------------------------------------------------------------------
class OutOfTime(BaseException):
    """Raised by :func:`time_limit` (a BaseException, so no ``except Exception`` in the recipe swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` with :class:`OutOfTime` (main thread, Unix)."""
    def fire(signum: int, frame: Any) -> None:
        raise OutOfTime(f"stopped after {seconds:.0f} s (time budget)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Clock:
    """The check's time budget."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def part(name: str, fn: Callable[[], dict[str, Any]], *, limit_s: float, min_s: float = 5.0) -> dict[str, Any]:
    """Run one part under a time limit; always returns a record with ``status`` and, unless ok, ``reason``."""
    started = time.perf_counter()
    record: dict[str, Any] = {"name": name}
    if limit_s < min_s:
        record.update(status="skipped", reason=f"time budget spent ({limit_s:.0f} s left for this part)")
        print(f"[{name}] skipped: {record['reason']}", flush=True)
        return record
    try:
        with time_limit(limit_s):
            record.update(fn())
        record.setdefault("status", "ok")
    except OutOfTime as exc:
        record.update(status="stopped", reason=str(exc))
    except Exception as exc:  # one part failing must not stop the others
        record.update(status="failed", reason=f"{type(exc).__name__}: {_first_line(exc)}",
                      traceback=traceback.format_exc(limit=6))
    finally:
        _free_memory()
    record["seconds"] = round(time.perf_counter() - started, 2)
    line = record["status"] + (f": {record['reason']}" if record.get("reason") else "")
    print(f"[{name}] {line} ({record['seconds']:.0f} s)", flush=True)
    return record


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else type(exc).__name__


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------
# 1. Stand-ins
# ------------------------------------------------------------------------------------------------
@dataclass
class StandIns:
    """Paths of the built stand-ins and what the measurements need to know about them."""

    root: Path
    encoder_checkpoint: Path
    decoder_card: Path
    features: Path
    train_manifest: Path
    val_manifest: Path
    decoder_spec: plan.DecoderSpec
    train_max_frames: int
    train_target_tokens: int
    """Longest training target, counted as the loss scores it (the planner's ``target_tokens``)."""
    train_frames: int
    train_tokens: int
    """Frames and scored target tokens of one pass over the training clips."""
    n_train: int
    n_val: int
    record: dict[str, Any]


def build_tokenizer_model(path: Path, pieces: int, seed: int = 0) -> list[str]:
    """Write a unigram SentencePiece model of exactly ``pieces`` pieces; return its whole-word pieces.

    Training a 256,000-piece model takes long and needs a large corpus, so the model is written
    directly as a ``ModelProto``: ``<unk> <s> </s>`` (SONAR's ids once fairseq2 puts ``<pad>`` at 0),
    ``▁`` and the 26 letters (any word still tokenises), then random words as ``▁word`` pieces, each
    scored above its letters so that a sentence of these words costs one token per word.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    kind = pb.ModelProto.SentencePiece.Type

    def add(piece: str, score: float, type_: int) -> None:
        p = model.pieces.add()
        p.piece, p.score, p.type = piece, score, type_

    add("<unk>", 0.0, kind.UNKNOWN)
    add("<s>", 0.0, kind.CONTROL)
    add("</s>", 0.0, kind.CONTROL)
    add("\u2581", -15.0, kind.NORMAL)
    for c in string.ascii_lowercase:
        add(c, -20.0, kind.NORMAL)
    rng = random.Random(seed)
    words: set[str] = set()
    need = pieces - len(model.pieces)
    while len(words) < need:
        words.add("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 9))))
    ordered = sorted(words)
    for i, word in enumerate(ordered):
        add("\u2581" + word, -10.0 - i * 1e-6, kind.NORMAL)
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.UNIGRAM
    spec.vocab_size = len(model.pieces)
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", True, True, True
    with atomic.atomic_path(path) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return ordered


def decoder_config(sizes: Sizes, vocab_size: int) -> Any:
    """sonar-space's ``basic`` text-decoder architecture (with ``sizes``' changes for --smoke)."""
    from fairseq2.data.tokenizers import VocabularyInfo
    from fairseq2.models.hub import ModelFamily, ModelHubAccessor
    from fairseq2.runtime.dependency import get_dependency_resolver
    from sonar.models.sonar_text.config import SONAR_TEXT_DECODER_FAMILY, SonarTextDecoderConfig

    family = get_dependency_resolver().resolve(ModelFamily, key=SONAR_TEXT_DECODER_FAMILY)
    config = ModelHubAccessor(SONAR_TEXT_DECODER_FAMILY, family.kls, SonarTextDecoderConfig)().get_arch_config("basic")
    if sizes.decoder_overrides is None:
        return config
    vocab = VocabularyInfo(size=vocab_size, unk_idx=1, bos_idx=2, eos_idx=3, pad_idx=0)
    return dataclasses.replace(config, **sizes.decoder_overrides, vocab_info=vocab)


def build_decoder(root: Path, sizes: Sizes, tokenizer: Path, vocab_size: int, device: torch.device) -> tuple[Path, plan.DecoderSpec]:
    """Random-weight SONAR text decoder + a local asset card the recipe's ``--decoder`` reads."""
    from sonar.models.sonar_text import SonarTextDecoderFactory

    config = decoder_config(sizes, vocab_size)
    try:
        with torch.device(device):  # random init on the GPU when there is one: seconds instead of minutes
            model = SonarTextDecoderFactory(config).create_model()
    except Exception as exc:  # a factory that cannot build under a device context: build on the host
        log.warning("building the decoder on %s failed (%s); building it on the CPU", device, _first_line(exc))
        model = SonarTextDecoderFactory(config).create_model()
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    spec = plan.DecoderSpec(params=sum(p.numel() for p in model.parameters()), model_dim=config.model_dim,
                            ffn_dim=config.ffn_inner_dim, num_layers=config.num_decoder_layers, vocab=config.vocab_info.size)
    del model
    atomic.save_torch(root / "text_decoder.pt", {"model": state})
    del state
    card: dict[str, Any] = {"name": "gpu_check_text_decoder", "model_family": assets.DECODER_FAMILY, "model_arch": "basic"}
    if sizes.decoder_overrides is not None:
        v = config.vocab_info
        card["model_config"] = {"_set_": {**sizes.decoder_overrides, "vocab_info": {
            "size": v.size, "unk_idx": v.unk_idx, "bos_idx": v.bos_idx, "eos_idx": v.eos_idx, "pad_idx": v.pad_idx}}}
    card.update(checkpoint="text_decoder.pt", tokenizer=tokenizer.name, tokenizer_family="nllb",
                tokenizer_config={"_set_": {"default_lang": LANG, "langs": list(assets.flores200_langs())}})
    path = root / "text_decoder.yaml"
    atomic.write_text(path, yaml.safe_dump(card, sort_keys=False))
    return path, spec


def clip_lengths(n: int, max_frames: int, rng: np.random.Generator) -> np.ndarray:
    """How2Sign-like clip lengths: log-normal around a third of ``max_frames``, the longest at the cap."""
    lengths = rng.lognormal(mean=math.log(max_frames * 0.28), sigma=0.6, size=n)
    lengths = np.clip(lengths.round(), max(2, max_frames // 30), max_frames).astype(int)
    lengths[: max(1, n // 50)] = max_frames  # a few at the cap, as the plans assume
    return lengths


def build_standins(root: Path, sizes: Sizes, device: torch.device, seed: int = 0) -> tuple[StandIns, dict[str, Any]]:
    """Build every stand-in under ``root``; returns them and a record of what was built."""
    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    # Tokenizer, loaded as the recipe loads it (fairseq2's NLLB tokenizer with 202 languages).
    tokenizer_path = root / "sentencepiece.model"
    words = build_tokenizer_model(tokenizer_path, sizes.spm_pieces, seed)
    langs = list(assets.flores200_langs())
    card = root / "tokenizer.yaml"
    atomic.write_text(card, yaml.safe_dump({"name": "gpu_check_tokenizer", "tokenizer": tokenizer_path.name, "tokenizer_family": "nllb",
                                        "tokenizer_config": {"_set_": {"default_lang": LANG, "langs": langs}}}))
    tokenizer = assets.load_sonar_tokenizer(card)
    vocab_size = tokenizer.vocab_info.size
    t_tok = time.perf_counter() - started

    # Encoder in the official checkpoint layout.
    with torch.device(device):
        encoder = SignT5SonarEncoder(sizes.encoder)
    encoder_path = root / "sonar_encoder.pth"
    save_encoder(encoder.to("cpu"), encoder_path)
    keys = len(encoder.state_dict())
    encoder_params = sum(p.numel() for p in encoder.parameters())
    del encoder
    expected_keys = len(official_key_shapes(sizes.encoder))
    if keys != expected_keys:
        raise RuntimeError(f"the encoder stand-in has {keys} keys, the official layout {expected_keys}")
    t_enc = time.perf_counter() - started - t_tok

    decoder_card, spec = build_decoder(root, sizes, tokenizer_path, vocab_size, device)
    if spec.vocab != vocab_size:
        raise RuntimeError(f"the tokenizer has {vocab_size} tokens but the decoder architecture {spec.vocab}")
    t_dec = time.perf_counter() - started - t_tok - t_enc

    # Clips: How2Sign-like lengths, sentences of random tokenizer words (longer clips, longer sentences).
    features = root / "features"
    features.mkdir(exist_ok=True)
    lengths = clip_lengths(sizes.n_clips, sizes.max_frames, rng)
    rows = []
    target = tokenizer.create_encoder(task="translation", lang=LANG, mode="target")
    scored = {}
    for i, frames in enumerate(lengths):
        clip = f"clip_{i:04d}"
        n_words = int(np.clip(frames / 14 * rng.uniform(0.7, 1.3), 2, 44))
        text = " ".join(words[j] for j in rng.integers(0, len(words), n_words))
        feats = rng.standard_normal((int(frames), sizes.encoder.feature_dim), dtype=np.float32).astype(np.float16)
        with atomic.atomic_path(features / f"{clip}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, feats)
        rows.append(ManifestRow(id=clip, text=text, length=int(frames)))
        scored[clip] = len(target(text)) - 2  # </s> and the language token are read, not scored
    by_length = sorted(rows, key=lambda r: -int(r.length or 0))
    n_train = sizes.effective_batch * sizes.steps
    train, rest = by_length[:n_train], by_length[n_train:]
    val = random.Random(seed).sample(rest, min(sizes.val_clips, len(rest)))
    write_manifest(root / "train.tsv", train)
    write_manifest(root / "val.tsv", val)

    standins = StandIns(
        root=root, encoder_checkpoint=encoder_path, decoder_card=decoder_card, features=features,
        train_manifest=root / "train.tsv", val_manifest=root / "val.tsv", decoder_spec=spec,
        train_max_frames=max(int(r.length or 0) for r in train), train_target_tokens=max(scored[r.id] for r in train),
        train_frames=sum(int(r.length or 0) for r in train), train_tokens=sum(scored[r.id] for r in train),
        n_train=len(train), n_val=len(val), record={},
    )
    record = {
        "encoder": {"keys": keys, "official_layout_keys": expected_keys, "parameters_with_tied_copies": encoder_params,
                    "config": dataclasses.asdict(sizes.encoder), "seconds": round(t_enc, 1)},
        "decoder": {"parameters": spec.params, "model_dim": spec.model_dim, "ffn_dim": spec.ffn_dim, "layers": spec.num_layers,
                    "vocab": spec.vocab, "seconds": round(t_dec, 1)},
        "tokenizer": {"sentencepiece_pieces": sizes.spm_pieces, "languages": len(langs), "vocab": vocab_size,
                      "seconds": round(t_tok, 1)},
        "clips": {"total": len(rows), "train": len(train), "val": len(val), "frames_max": int(lengths.max()),
                  "frames_median": float(np.median(lengths)), "train_frames_min": min(int(r.length or 0) for r in train),
                  "train_target_tokens_max": standins.train_target_tokens},
    }
    standins.record = record
    return standins, record


# ------------------------------------------------------------------------------------------------
# 2. The recipe, per GPU profile
# ------------------------------------------------------------------------------------------------
def recipe_fields() -> set[str]:
    """The settings the recipe knows (``TrainConfig``'s fields)."""
    from sonar_ft.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def run_recipe(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Run the project's fine-tuning recipe with ``values`` (recipe settings); return each epoch's metrics.

    The only function here that knows the recipe's API: each epoch's record needs ``seconds``
    (training + validation) and ``samples_per_second`` (training clips per training second).
    """
    from sonar_ft.config import TrainConfig
    from sonar_ft.training.recipe import fine_tune as train

    result = train(TrainConfig(**values))
    return [dataclasses.asdict(m) for m in result.history]


def _plan_for(key: str, sizes: Sizes, st: StandIns, lora: bool) -> planner.Plan:
    """The planner's plan for GPU ``key``: ``recommend_lora`` for a LoRA profile, ``recommend`` otherwise."""
    kwargs: dict[str, Any] = dict(max_frames=st.train_max_frames, target_tokens=st.train_target_tokens,
                                  config=sizes.encoder, decoder=st.decoder_spec)
    if lora:
        return planner.recommend_lora(key, sizes.effective_batch, rank=sizes.lora_rank, **kwargs)
    return planner.recommend(key, sizes.effective_batch, **kwargs)


def profile_run(key: str, mode: str, sizes: Sizes, st: StandIns, device: torch.device, out_dir: Path) -> dict[str, Any]:
    """Cap memory to GPU ``key``, run the plan's flags for two short epochs, measure (one part)."""
    spec = planner.GPUS[key]
    lora = mode == "lora"
    the_plan = _plan_for(key, sizes, st, lora)
    settings = dict(the_plan.settings)
    notes: list[str] = []
    rec: dict[str, Any] = {"gpu_profile": key, "gpu_profile_name": spec.name, "mode": mode,
                           "plan_fits": the_plan.fits, "flags": the_plan.flags()}
    if settings["decoder_dtype"] == "fp16" and (device.type != "cuda" or torch.cuda.is_bf16_supported()):
        # The recipe refuses fp16 where bf16 exists; same 2 bytes per weight, so the same memory.
        settings["decoder_dtype"] = "bf16"
        notes.append("--decoder_dtype fp16 (the plan, for GPUs without bf16) ran as bf16 here: same memory, "
                     "the fp16 loss-scaling path was not exercised")
    if settings["optimizer"] == "adamw8bit" and device.type != "cuda":
        settings["optimizer"] = "adamw"
        notes.append("--optimizer adamw8bit needs CUDA: ran adamw (--smoke on CPU)")
    unknown = sorted(set(settings) - recipe_fields())
    if unknown:
        raise RuntimeError(f"the plan sets {unknown}, which the recipe does not know")
    # The plan's estimate for the settings run (LoRA's or full fine-tuning's), per category: the same
    # categories benchmarks/plan_check.py measures on the CPU.
    run_cfg = argparse.Namespace(**{"grad_accum": 1, "lora_rank": 0, "lora_dropout": 0.0, "freeze_encoder_layers": 0,
                                    "label_smoothing": 0.0, **settings})
    estimate = planner.estimate_for(run_cfg, sizes.encoder, frames=st.train_max_frames, target_tokens=st.train_target_tokens,
                                    precision=settings["precision"], decoder=st.decoder_spec)
    rec["settings_run"] = settings
    rec["plan_estimate_gib"] = round(estimate["total"] / GIB, 3)
    rec["plan_estimate_parts_gib"] = {k: round(v / GIB, 3) for k, v in estimate.items()}

    run_dir = out_dir / f"{key}_{mode}"
    values = dict(
        settings,
        encoder_checkpoint=str(st.encoder_checkpoint), decoder=str(st.decoder_card),
        train_features=str(st.features), train_manifest=str(st.train_manifest),
        val_features=str(st.features), val_manifest=str(st.val_manifest),
        output_dir=str(run_dir), overwrite=True, device=str(device), tgt_lang=LANG,
        epochs=2, eval_every=2, beam_size=sizes.beam_size, max_gen_len=sizes.max_gen_len,
        save_checkpoints=False, write_predictions=False, num_workers=0, seed=0,
    )
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, spec.memory_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        torch.cuda.reset_peak_memory_stats(device)
        rec["allocated_before_gib"] = round(torch.cuda.memory_allocated(device) / GIB, 3)  # left over by earlier parts
        rec["memory_cap_gib"] = round(fraction * total / GIB, 2)
    else:
        notes.append("no CUDA: memory not capped, peak not measured")
    try:
        history = run_recipe(values)
    except Exception as exc:
        if "out of memory" in str(exc).lower() or isinstance(exc, torch.cuda.OutOfMemoryError):
            rec.update(status="does_not_fit", fits=False, reason=f"out of memory under the {spec.name} cap: {_first_line(exc)}")
            _add_peak(rec, device, estimate)
            return rec
        raise
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        shutil.rmtree(run_dir, ignore_errors=True)
        if notes:
            rec["notes"] = notes
    rec["fits"] = True
    _add_peak(rec, device, estimate)
    warm, measured = history[0], history[-1]
    train_s = st.n_train / measured["samples_per_second"]
    val_s = measured["seconds"] - train_s
    micro_batches = st.n_train / settings["batch_size"]
    rec.update(
        first_epoch_seconds=round(warm["seconds"], 2),
        step_seconds=round(train_s / sizes.steps, 3),
        micro_batch_seconds=round(train_s / micro_batches, 3),
        train_clips_per_s=round(st.n_train / train_s, 2),
        train_frames_per_s=round(st.train_frames / train_s, 1),
        train_target_tokens_per_s=round(st.train_tokens / train_s, 1),
        val_clips=st.n_val, val_seconds=round(val_s, 2), val_clips_per_s=round(st.n_val / val_s, 2) if val_s > 0 else None,
        train_loss=measured.get("train_loss"), val_loss=measured.get("val_loss"),
    )
    return rec


def _add_peak(rec: dict[str, Any], device: torch.device, estimate: dict[str, int]) -> None:
    if device.type != "cuda":
        rec["peak_allocated_gib"] = None
        return
    peak = torch.cuda.max_memory_allocated(device)
    rec["peak_allocated_gib"] = round(peak / GIB, 3)
    rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 3)
    rec["peak_over_estimate"] = round(peak / estimate["total"], 3)
    # Per category only the plan's side: CUDA's allocator counts bytes, not what they are for (the CPU
    # plan check attributes them); peak / plan of the total is the figure to set next to its table.
    rec["plan_categories_gib"] = {k: round(v / GIB, 3) for k, v in estimate.items()}


# ------------------------------------------------------------------------------------------------
# 3. Ratios, side by side
# ------------------------------------------------------------------------------------------------
def _timed(fns: dict[str, Callable[[], Any]], device: torch.device, repeat: int) -> dict[str, float]:
    """Median seconds of each function, one warm-up each, run in turns (A B A B ...), synchronised."""
    for fn in fns.values():
        fn()
        _sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _bench_batch(sizes: Sizes, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    B, T = sizes.bench_batch, sizes.max_frames
    feats = torch.randn(B, T, sizes.encoder.feature_dim, generator=g)
    lengths = torch.linspace(T * 3 // 4, T, B).long()
    mask = torch.arange(T)[None] < lengths[:, None]
    return feats.to(device), mask.to(device)


def _fwd_bwd(model: torch.nn.Module, feats: torch.Tensor, mask: torch.Tensor, bf16: bool) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast(feats.device.type, dtype=torch.bfloat16, enabled=bf16):
        emb = model(feats, mask)
    emb.float().pow(2).mean().backward()


def _bf16_ok(device: torch.device) -> bool:
    return device.type == "cpu" or torch.cuda.is_bf16_supported()


class Bench:
    """The encoder the ratio measurements share (built once)."""

    def __init__(self, sizes: Sizes, device: torch.device) -> None:
        self.sizes, self.device = sizes, device
        self._model: SignT5SonarEncoder | None = None

    @property
    def model(self) -> SignT5SonarEncoder:
        if self._model is None:
            torch.manual_seed(0)
            with torch.device(self.device):
                self._model = SignT5SonarEncoder(self.sizes.encoder).train()
        return self._model

    def ours_vs_hf(self) -> dict[str, Any]:
        if not _bf16_ok(self.device):
            return {"status": "skipped", "reason": "this GPU has no bf16"}
        try:
            import transformers  # noqa: F401
        except ImportError:
            return {"status": "skipped", "reason": "transformers is not installed (pip install transformers)"}
        from benchmarks.bench_encoder_vs_hf import HFSignT5

        ours = self.model
        with torch.device(self.device):  # random init of ~800M parameters on the GPU, not the host
            theirs = HFSignT5(self.sizes.encoder).train()
        theirs.load_from(ours)
        feats, mask = _bench_batch(self.sizes, self.device)
        times = _timed({"ours": lambda: _fwd_bwd(ours, feats, mask, True), "hf": lambda: _fwd_bwd(theirs, feats, mask, True)},
                       self.device, self.sizes.repeat)
        del theirs
        return {"what": "fwd+bwd step, bf16 autocast, ours / HF T5Stack (same weights)", "ratio": round(times["ours"] / times["hf"], 3),
                "step_seconds": times, "batch": list(feats.shape[:2])}

    def bf16_vs_fp32(self) -> dict[str, Any]:
        if not _bf16_ok(self.device):
            return {"status": "skipped", "reason": "this GPU has no bf16"}
        feats, mask = _bench_batch(self.sizes, self.device)
        model = self.model
        times = _timed({"bf16": lambda: _fwd_bwd(model, feats, mask, True), "fp32": lambda: _fwd_bwd(model, feats, mask, False)},
                       self.device, self.sizes.repeat)
        return {"what": "encoder fwd+bwd step, bf16 autocast / fp32", "ratio": round(times["bf16"] / times["fp32"], 3),
                "step_seconds": times, "batch": list(feats.shape[:2]),
                "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if self.device.type == "cuda" else None}

    def adamw_vs_8bit(self) -> dict[str, Any]:
        from sonar_ft.training.perf import build_optimizer, parameter_groups

        if self.device.type != "cuda":
            return {"status": "skipped", "reason": "8-bit AdamW (bitsandbytes) needs CUDA"}
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            return {"status": "skipped", "reason": "bitsandbytes is not installed (pip install bitsandbytes)"}
        model = self.model
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        optimizers = {name: build_optimizer(parameter_groups(model, 0.01), name, lr=1e-5, weight_decay=0.01, device=self.device)
                      for name in ("adamw", "adamw8bit")}
        times = _timed({name: opt.step for name, opt in optimizers.items()}, self.device, self.sizes.repeat)
        state = {name: sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
                 for name, opt in optimizers.items()}
        model.zero_grad(set_to_none=True)
        del optimizers
        return {"what": "optimizer.step() over the encoder, fused AdamW / 8-bit AdamW", "ratio": round(times["adamw"] / times["adamw8bit"], 3),
                "step_seconds": times, "state_gib": {k: round(v / GIB, 3) for k, v in state.items()}}

    def compile_on_off(self) -> dict[str, Any]:
        from sonar_ft.training.perf import compile_encoder

        if self.sizes is SMOKE:
            return {"status": "skipped", "reason": "--smoke: inductor compiles for ~15 s even a tiny model on CPU"}
        bf16 = _bf16_ok(self.device)
        eager = self.model
        compiled = compile_encoder(copy.deepcopy(eager))
        feats, mask = _bench_batch(self.sizes, self.device)
        start = time.perf_counter()
        _fwd_bwd(compiled, feats, mask, bf16)
        _sync(self.device)
        compile_s = time.perf_counter() - start
        times = _timed({"compiled": lambda: _fwd_bwd(compiled, feats, mask, bf16), "eager": lambda: _fwd_bwd(eager, feats, mask, bf16)},
                       self.device, self.sizes.repeat)
        del compiled
        return {"what": "encoder fwd+bwd step, --compile (dynamic shapes) / eager", "ratio": round(times["compiled"] / times["eager"], 3),
                "step_seconds": times, "compile_seconds": round(compile_s, 1), "bf16": bf16}


# ------------------------------------------------------------------------------------------------
# 4. Video -> features (SignHiera)
# ------------------------------------------------------------------------------------------------
def extraction_profile(sizes: Sizes, device: torch.device, work: Path) -> dict[str, Any]:
    """SignHiera extraction on this device: model alone per batch size, decode + crop, videos end to end (one part)."""
    from sonar_ft.data.video import read_video, write_synthetic_video
    from sonar_ft.inference.extract import ExtractSettings, VideoJob, extract_videos, resolve_precision
    from sonar_ft.models.signhiera import SignHiera

    cuda = device.type == "cuda"
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    dtype = resolve_precision(precision, device)
    model = SignHiera(sizes.signhiera).init_weights(torch.Generator().manual_seed(0)).to(device).eval()
    frames, height, width = sizes.signhiera.input_size
    rec: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "precision": precision,
                           "window": [frames, height, width], "model_windows_per_s": {}}
    if cuda:
        rec["model_peak_allocated_gib"] = {}

    # The model alone, on random windows (speed does not depend on the values).
    g = torch.Generator().manual_seed(0)
    for batch in sizes.extract_batches:
        x = torch.randn(batch, 3, frames, height, width, generator=g).to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        def forward(x: torch.Tensor = x, batch: int = batch) -> None:
            with torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext():
                model.extract(x, [0] * batch)

        seconds = _timed({"forward": forward}, device, sizes.repeat)["forward"]
        rec["model_windows_per_s"][str(batch)] = round(batch / seconds, 3)
        if cuda:
            rec["model_peak_allocated_gib"][str(batch)] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        del x

    # Synthetic videos at How2Sign-like lengths and resolution (flat colours and one moving bar: they
    # decode faster than real footage, so the decode rate is an upper bound).
    folder = work / "extraction"
    shutil.rmtree(folder, ignore_errors=True)
    w, h, fps = *sizes.video_size, sizes.video_fps
    start = time.perf_counter()
    videos = [write_synthetic_video(folder / "videos" / f"how2sign_like_{i}.mp4", max(2, round(s * fps)), fps=fps,
                                    width=w, height=h, seed=i) for i, s in enumerate(sizes.video_seconds)]
    rec["videos"] = {"seconds": list(sizes.video_seconds), "width": w, "height": h, "fps": fps,
                     "render_seconds": round(time.perf_counter() - start, 2)}

    start, decoded = time.perf_counter(), 0
    for path in videos:
        decoded += read_video(path, crop="center", size=height).info.frames
    rec["decode_crop_frames_per_s"] = round(decoded / (time.perf_counter() - start), 1)

    # End to end: the real extraction path (decode ahead in threads, windows of several videos batched).
    settings = ExtractSettings(crop="center", batch_size=max(sizes.extract_batches), device=str(device), precision=precision)
    summary = extract_videos(model, [VideoJob(p.stem, p) for p in videos], folder / "features", settings=settings)
    if summary.failed:
        clip, reason = next(iter(summary.failed.items()))
        raise RuntimeError(f"{len(summary.failed)} synthetic video(s) failed to extract ({clip}: {reason})")
    realtime = summary.video_seconds / summary.seconds  # seconds of video per second of extraction
    best = max(rec["model_windows_per_s"].values())
    rec.update(
        end_to_end_batch=settings.batch_size, end_to_end_seconds=round(summary.seconds, 2), windows=summary.windows,
        video_seconds=round(summary.video_seconds, 2), videos_per_minute=round(len(summary.done) / summary.seconds * 60, 2),
        video_seconds_per_second=round(realtime, 2),
        how2sign_hours=round(HOW2SIGN_HOURS / realtime, 2),
        how2sign_model_only_hours=round(HOW2SIGN_HOURS * 3600 * summary.windows / summary.video_seconds / best / 3600, 2),
        notes=["centre crop: --crop face (dlib on the CPU) adds face detection on every 16th frame; "
               "synthetic videos decode faster than real footage"],
    )
    del model
    shutil.rmtree(folder, ignore_errors=True)
    return rec


# ------------------------------------------------------------------------------------------------
# 5. Report
# ------------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """GPU name, driver, CUDA and library versions."""
    env: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
                           "python": platform.python_version(), "host_cpus": os.cpu_count()}
    for pkg in ("fairseq2", "sonar-space", "transformers", "bitsandbytes"):
        try:
            from importlib import metadata

            env[pkg] = metadata.version(pkg)
        except Exception:
            env[pkg] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), capability=f"{props.major}.{props.minor}",
                   bf16=torch.cuda.is_bf16_supported())
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except Exception:
            env["driver"] = None
    else:
        env.update(gpu=None, driver=None)
    return env


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.2g}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (for docs/benchmarks.md)."""
    env = report["environment"]
    lines = [
        f"# GPU check{' (--smoke, CPU: not GPU figures)' if report['smoke'] else ''}",
        "",
        f"- GPU: {env.get('gpu') or 'none'}" + (f" ({env.get('gpu_memory_gib')} GiB, compute {env.get('capability')})" if env.get("gpu") else ""),
        f"- driver {env.get('driver') or '–'}, CUDA {env.get('cuda') or '–'}, torch {env['torch']}, fairseq2 {env.get('fairseq2') or '–'}, "
        f"transformers {env.get('transformers') or '–'}, bitsandbytes {env.get('bitsandbytes') or '–'}",
        f"- date {report['date']}, total {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget",
        "",
        "| GPU profile | mode | fits | peak alloc GiB | plan GiB | peak / plan | step s | clips/s | frames/s | tokens/s | val clips/s (beam) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["profiles"]:
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(
            f"| {r.get('gpu_profile_name', r['name'])} | {r.get('mode', '–')} | {_fmt(r.get('fits'))} | {_fmt(r.get('peak_allocated_gib'))} | "
            f"{_fmt(r.get('plan_estimate_gib'))} | {_fmt(r.get('peak_over_estimate'))} | {_fmt(r.get('step_seconds'), 3)} | "
            f"{_fmt(r.get('train_clips_per_s'))} | {_fmt(r.get('train_frames_per_s'), 0)} | {_fmt(r.get('train_target_tokens_per_s'), 0)} | "
            f"{_fmt(r.get('val_clips_per_s'))} | {status} |"
        )
    lines += ["", "| ratio | value | status |", "|---|---|---|"]
    for r in report["ratios"]:
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(f"| {r.get('what', r['name'])} | {_fmt(r.get('ratio'), 3)} | {status} |")
    lines += _extraction_markdown(report.get("extraction"))
    flags = {f"{r['gpu_profile']}/{r['mode']}": " ".join(r.get("flags", [])) for r in report["profiles"] if r.get("flags")}
    if flags:
        lines += ["", "Flags run (the planner's):", ""] + [f"- {k}: `{v}`" for k, v in flags.items()]
    notes = sorted({n for r in report["profiles"] for n in r.get("notes", [])})
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _extraction_markdown(r: dict[str, Any] | None) -> list[str]:
    """The extraction part as a table (none when the part was not in the report)."""
    if r is None:
        return []
    status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
    lines = ["", f"SignHiera extraction ({r.get('precision', '–')}, centre crop): {status}", "",
             "| measure | value |", "|---|---|"]
    for batch, rate in (r.get("model_windows_per_s") or {}).items():
        peak = (r.get("model_peak_allocated_gib") or {}).get(batch)
        lines.append(f"| model alone, batch {batch}: windows/s | {_fmt(rate)}" + (f" (peak {_fmt(peak)} GiB)" if peak else "") + " |")
    v = r.get("videos") or {}
    if v:
        lines.append(f"| decode + crop ({v['width']}x{v['height']} -> {r['window'][1]}): frames/s | {_fmt(r.get('decode_crop_frames_per_s'), 0)} |")
    if "videos_per_minute" in r:
        lengths = "/".join(f"{s:g}" for s in v["seconds"])
        lines += [
            f"| end to end, {len(v['seconds'])} videos of {lengths} s at {v['fps']} fps, batch {r['end_to_end_batch']}: videos/min "
            f"| {_fmt(r['videos_per_minute'])} ({_fmt(r['video_seconds_per_second'])} s of video per s) |",
            f"| How2Sign (~{HOW2SIGN_HOURS:g} h of video) on this device: hours end to end | {_fmt(r['how2sign_hours'])} |",
            f"| ... hours of the model alone (best batch) | {_fmt(r['how2sign_model_only_hours'])} |",
        ]
    return lines + [""] + [f"- {n}" for n in r.get("notes", [])]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
def run_check(sizes: Sizes, device: torch.device, work: Path, *, smoke: bool, budget_s: float,
              profiles: list[str] | None = None) -> dict[str, Any]:
    """Every part of the check, in order, each under its share of the time budget."""
    clock = Clock(budget_s)
    report: dict[str, Any] = {"smoke": smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "budget_s": budget_s, "environment": environment(device), "profiles": [], "ratios": []}
    holder: dict[str, StandIns] = {}

    def build() -> dict[str, Any]:
        holder["st"], record = build_standins(work / "standins", sizes, device)
        return record

    report["build"] = part("build stand-ins", build, limit_s=clock.left(), min_s=0)
    if "st" not in holder:
        for key in profiles or planner.GPUS:
            report["profiles"].append({"name": f"{key}/full", "status": "skipped", "reason": "the stand-ins could not be built"})
    else:
        st = holder["st"]
        modes = ["full", "lora"]
        runs = [(key, mode) for key in (profiles or list(planner.GPUS)) for mode in modes]
        profiles_end = (clock.budget_s - sizes.extract_cap_s) * 0.7  # extraction, then the ratio measurements, get the rest
        for i, (key, mode) in enumerate(runs):
            name = f"{key}/{mode}"
            left_runs = len(runs) - i
            share = (profiles_end - clock.elapsed()) / max(left_runs, 1)
            limit = min(sizes.run_cap_s, max(share, 0.0) + 0.5 * sizes.run_cap_s, clock.left() - 30)
            report["profiles"].append(part(name, lambda k=key, m=mode: profile_run(k, m, sizes, st, device, work / "runs"), limit_s=limit))

    report["extraction"] = part("SignHiera extraction", lambda: extraction_profile(sizes, device, work),
                                limit_s=min(sizes.extract_cap_s, clock.left() - 30))
    bench = Bench(sizes, device)
    for name, fn in (("ours vs HF T5", bench.ours_vs_hf), ("bf16 vs fp32", bench.bf16_vs_fp32),
                     ("fused AdamW vs 8-bit AdamW", bench.adamw_vs_8bit), ("compile on vs off", bench.compile_on_off)):
        report["ratios"].append(part(name, fn, limit_s=clock.left() - 5))
    report["seconds"] = round(clock.elapsed(), 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two steps, on CPU (what the tests run)")
    parser.add_argument("--device", default=None, help="default: cuda when present (always cpu with --smoke)")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for gpu_check.json / .md (default benchmarks/out)")
    parser.add_argument("--budget_s", type=float, default=None, help="time budget in seconds (default 540; --smoke 240)")
    parser.add_argument("--profiles", nargs="*", default=None, help=f"GPU profiles to run (default all: {', '.join(planner.GPUS)})")
    parser.add_argument("--keep", type=Path, default=None, help="build in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sizes = SMOKE if args.smoke else OFFICIAL
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda" and device.index is None:  # set_per_process_memory_fraction needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu" and not args.smoke:
        print("gpu_check: no CUDA GPU here. Run it on a GPU, or use --smoke for the CPU self-test.", file=sys.stderr)
        return 2
    unknown = sorted(set(args.profiles or []) - set(planner.GPUS))
    if unknown:
        print(f"gpu_check: unknown --profiles {', '.join(unknown)}; choose from {', '.join(planner.GPUS)}", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    budget = args.budget_s or sizes.budget_s
    with contextlib.ExitStack() as stack:
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_")))
        report = run_check(sizes, device, work, smoke=args.smoke, budget_s=budget, profiles=args.profiles)
    name = "gpu_check_smoke" if args.smoke else "gpu_check"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out / f"{name}.json", report)
    atomic.write_text(args.out / f"{name}.md", markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / (name + '.json')} and {name}.md")
    failed = [r["name"] for r in [report["build"], *report["profiles"], report["extraction"], *report["ratios"]]
              if r["status"] == "failed"]
    if failed:
        print(f"gpu_check: parts that failed: {', '.join(failed)} (reasons in the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
