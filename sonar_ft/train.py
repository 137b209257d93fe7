"""The fine-tuning loop shared by the recipe (``train_sonar_finetuning.py``) and by tuning.

``train(config)`` reads top to bottom: resolve device and precision, prepare the output folder,
load data, encoder, frozen decoder (and the optional distillation teacher), then run epochs of
AdamW steps with optional warm-up, gradient accumulation and clipping; every ``eval_every`` epochs
it evaluates (loss, BLEU, chrF, predictions), steps ReduceLROnPlateau on the validation metric,
keeps the best encoder and checks early stopping. After every epoch it writes
``metrics_epoch{N}.json`` and the resumable ``last.pt``.

Only the encoder learns: the decoder's parameters never receive gradients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from sonar_ft import distributed, io, lora, perf, plan
from sonar_ft.data import (
    FeatureStore,
    LengthBucketSampler,
    SignFeatureDataset,
    collate,
    prepare_features,
    read_manifest,
    select_rows,
)
from sonar_ft.data.bad_samples import BadSample, find_bad_samples, format_bad_samples, write_bad_samples
from sonar_ft.decoder import FrozenTextDecoder
from sonar_ft.encoder import load_encoder, save_encoder
from sonar_ft.errors import ConfigError, DataError, OutputDirError, TrainingError
from sonar_ft.evaluate import EvalResult, autocast_context, evaluate

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
BEST_ENCODER = "best_encoder.pt"
LAST_STATE = "last.pt"
TEST_RESULTS = "test_results.json"
BAD_SAMPLES = "bad_samples.tsv"
MAX_BAD_STEPS = 10  # consecutive non-finite losses / gradients (no good step between) before a run is stopped


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; ``config.json`` in the output folder holds one of these."""

    # -- data ---------------------------------------------------------------------------------------
    train_features: str | None = None
    """Folder of training feature files (flat ``<id>.npy`` / ``<id>.pt`` or ssvp_slt's nested layout)."""
    train_manifest: str | None = None
    """Training manifest: TSV ``id [length] text`` or How2Sign's re-aligned CSV."""
    val_features: str | None = None
    """Folder of validation (or, with ``eval_only``, test) feature files."""
    val_manifest: str | None = None
    """Validation (or test) manifest."""
    max_samples: int | None = None
    """Use at most this many clips of each split (quick tests)."""
    subset_fraction: float | None = None
    """Use this seeded fraction of the training clips (tuning)."""
    max_frames: int | None = None
    """Truncate longer clips to this many frames."""
    # -- models -------------------------------------------------------------------------------------
    encoder_checkpoint: str | None = None
    """The SONAR ASL encoder to start from (``dm_70h_ub_sonar_encoder.pth`` or a fine-tuned one)."""
    decoder: str = "text_sonar_basic_decoder"
    """Frozen SONAR text decoder: asset card name, card ``.yaml`` or checkpoint file."""
    tokenizer: str | None = None
    """Tokenizer: card name, card ``.yaml`` or SentencePiece model (default: the decoder's)."""
    text_encoder: str = "text_sonar_basic_encoder"
    """SONAR text encoder used as distillation teacher (only loaded when ``distill_weight > 0``)."""
    tgt_lang: str = "eng_Latn"
    """FLORES-200 code of the target language."""
    freeze_decoder: bool = True
    """The decoder is always frozen; accepted so existing command lines keep working."""
    dropout: float | None = None
    """Encoder dropout (default: keep the architecture's 0.1)."""
    # -- optimisation -------------------------------------------------------------------------------
    batch_size: int = 8
    epochs: int = 10
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    grad_accum: int = 1
    """Batches per optimiser step (effective batch = batch_size x grad_accum)."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimiser steps."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau: multiply the learning rate by this when the validation metric stalls."""
    plateau_patience: int = 2
    """ReduceLROnPlateau: evaluations without improvement before reducing."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement; 0 disables."""
    distill_weight: float = 0.0
    """Weight of the distillation term towards the SONAR text embedding of the target; 0 disables."""
    distill_loss: str = "mse"
    """Distillation distance: ``mse`` or ``cosine``."""
    seed: int = 42
    # -- evaluation ---------------------------------------------------------------------------------
    eval_every: int = 1
    """Evaluate every N epochs (and always after the last)."""
    beam_size: int = 5
    max_gen_len: int = 128
    select_metric: str = "bleu"
    """Validation metric for the best checkpoint, plateau and early stopping: ``bleu`` or ``loss``."""
    # -- system -------------------------------------------------------------------------------------
    output_dir: str = "runs/finetune"
    device: str = "auto"
    """``auto`` (CUDA when present), ``cuda``, ``cuda:N`` or ``cpu``."""
    precision: str = "auto"
    """``auto`` (bf16 on GPUs that support it, else fp32), ``bf16`` or ``fp32``. Never fp16."""
    num_workers: int = 0
    resume: bool = False
    overwrite: bool = False
    eval_only: bool = False
    loss_chunk_size: int = 256
    """Target positions per chunk of vocabulary logits in the loss (bounds its memory: 256 x 256k logits
    peak at <= 25% of a batch-32 full-logits loss, see docs/benchmarks.md)."""
    # -- memory and speed (``sonar-ft plan`` recommends these; see sonar_ft.perf) -------------------
    gradient_checkpointing: bool = False
    """Recompute encoder blocks and frozen-decoder layers in the backward pass instead of keeping their activations."""
    decoder_dtype: str = "fp32"
    """Frozen decoder weights: ``fp32``, ``bf16``, or ``fp16`` (only on GPUs without bf16, e.g. a T4)."""
    freeze_encoder_layers: int = 0
    """Freeze the feature projection and the lowest N encoder blocks."""
    optimizer: str = "adamw"
    """``adamw``, or ``adamw8bit`` (bitsandbytes, CUDA only: 2 instead of 8 bytes of state per parameter)."""
    cache_features: bool = False
    """Keep every clip in memory after its first read: later epochs do not touch the disk / Drive."""
    cache_dtype: str = "fp32"
    """``fp32`` or ``fp16`` (half the memory) for the feature cache."""
    compile: bool = False
    """``torch.compile`` the encoder (off by default: see docs/benchmarks.md)."""
    save_checkpoints: bool = True
    """Write ``best_encoder.pt`` / ``last.pt`` (tuning trials may switch this off)."""
    checkpoint_every_steps: int = 0
    """Also write the resumable ``last.pt`` every N optimiser steps inside an epoch (0: only at epoch ends)."""
    on_bad_sample: str = "error"
    """Clips that cannot be used (missing, unreadable, wrong shape, NaN/Inf, no frames, empty text):
    ``error`` stops before training, listing all of them; ``skip`` trains without them. Both list
    them in ``bad_samples.tsv`` in the output folder."""
    write_predictions: bool = True
    """Write ``predictions_epoch{N}.json`` at each evaluation."""
    # -- LoRA (parameter-efficient fine-tuning, see sonar_ft.lora) ------------------------------------
    lora_rank: int = 0
    """Rank of the low-rank adapters; 0 fine-tunes every encoder weight (full fine-tuning)."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: the update is ``B @ A * lora_alpha / lora_rank``."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input. Off by default: the encoder's own dropout already acts, and peft
    keeps a dropped-out copy of every adapted layer's input (CPU measurement: +65% saved activations at 0.1)."""
    lora_targets: str = lora.DEFAULT_TARGETS
    """Comma-separated names of the Linear layers that get adapters (every block of both stacks)."""
    lora_trainable: str = lora.DEFAULT_TRAINABLE
    """Comma-separated names of small modules trained in full next to the adapters ("" for none)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag for settings that cannot work."""
        need = ["encoder_checkpoint", "val_features", "val_manifest"]
        if not self.eval_only:
            need += ["train_features", "train_manifest"]
        missing = [f"--{n}" for n in need if not getattr(self, n)]
        if missing:
            raise ConfigError(f"missing required flag(s): {', '.join(missing)}")
        positive = {"batch_size": self.batch_size, "epochs": self.epochs, "grad_accum": self.grad_accum,
                    "eval_every": self.eval_every, "beam_size": self.beam_size, "max_gen_len": self.max_gen_len}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name} must be at least 1 (got {value})")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(f"--max_samples must be at least 1 (got {self.max_samples}); leave it out to use all clips")
        if self.subset_fraction is not None and not 0 < self.subset_fraction <= 1:
            raise ConfigError(f"--subset_fraction must be in (0, 1] (got {self.subset_fraction})")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be positive (got {self.learning_rate})")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label_smoothing must be in [0, 1) (got {self.label_smoothing})")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"--plateau_factor must be in (0, 1) (got {self.plateau_factor})")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"--precision must be auto, bf16 or fp32 (got {self.precision!r}); fp16 is unstable for T5")
        if self.select_metric not in ("bleu", "loss"):
            raise ConfigError(f"--select_metric must be bleu or loss (got {self.select_metric!r})")
        if self.distill_loss not in ("mse", "cosine"):
            raise ConfigError(f"--distill_loss must be mse or cosine (got {self.distill_loss!r})")
        if not self.freeze_decoder:
            raise ConfigError("the SONAR text decoder is always frozen in sonar-ft; drop --no-freeze_decoder")
        if self.checkpoint_every_steps < 0:
            raise ConfigError(f"--checkpoint_every_steps must be >= 0 (got {self.checkpoint_every_steps}); 0 saves at epoch ends only")
        if self.on_bad_sample not in ("error", "skip"):
            raise ConfigError(f"--on_bad_sample must be error or skip (got {self.on_bad_sample!r})")
        choices = {"decoder_dtype": ("fp32", "bf16", "fp16"), "optimizer": ("adamw", "adamw8bit"), "cache_dtype": ("fp32", "fp16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)} (got {getattr(self, name)!r})")
        if self.freeze_encoder_layers < 0:
            raise ConfigError(f"--freeze_encoder_layers must be >= 0 (got {self.freeze_encoder_layers})")
        lora.validate_settings(self)


@dataclass
class EpochMetrics:
    """One line of training history (written as ``metrics_epoch{N}.json``)."""

    epoch: int
    train_loss: float
    val_loss: float | None
    val_bleu: float | None
    val_chrf: float | None
    lr: float
    seconds: float
    samples_per_second: float
    is_best: bool = False


@dataclass
class TrainResult:
    """What a finished run reports back (the recipe prints it; tuning optimises it)."""

    best_epoch: int | None
    best_score: float | None
    best_val_bleu: float | None
    best_val_loss: float | None
    history: list[EpochMetrics] = field(default_factory=list)
    stopped_early: bool = False
    output_dir: str = ""


# ------------------------------------------------------------------------------------------------
# Device, precision, seeds
# ------------------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was asked for but no CUDA GPU is visible. In Colab: Runtime > Change runtime type > GPU; "
            "or pass --device cpu (slow) / --device auto."
        )
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` → bf16 on GPUs that support it, else fp32 (never fp16 for the T5 encoder)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16 needs a GPU with bf16 support (Ampere or newer); use --precision fp32")
    return name


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state() -> tuple:
    # As a tensor, not an ndarray: last.pt is read back with weights_only=True, which refuses ndarrays.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _tuplify(x: Any) -> Any:
    # RNG states survive torch.save as lists; random/numpy want tuples back.
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    return x


# ------------------------------------------------------------------------------------------------
# Output folder and run records
# ------------------------------------------------------------------------------------------------
# Settings that may change between a run and its resumption without making it another run.
_RESUMABLE_CHANGES = {"output_dir", "epochs", "resume", "overwrite", "num_workers", "eval_every", "device", "early_stopping_patience",
                      "checkpoint_every_steps", "gradient_checkpointing", "cache_features", "cache_dtype", "compile", "loss_chunk_size"}
RUN_FILES = (CONFIG_FILE, LAST_STATE, BEST_ENCODER)


def prepare_output_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """Create the output folder; return it and whether this run resumes the one already there.

    A folder holding another run's files is refused unless ``--resume`` / ``--overwrite``;
    re-running the very same command on a folder with ``last.pt`` resumes it.
    """
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(f"cannot write to --output_dir {out}: {exc.strerror or exc}. Choose a writable folder.") from None
    stale = io.remove_stale_temps(out)
    if stale:
        log.info("removed %d half-written file(s) left in %s by a run that was stopped", len(stale), out)
    existing = [name for name in RUN_FILES if (out / name).exists()] + sorted(p.name for p in out.glob("metrics_epoch*.json"))
    if not existing or cfg.overwrite:
        if cfg.overwrite:
            for p in list(out.glob("metrics_epoch*.json")) + list(out.glob("predictions_epoch*.json")):
                p.unlink()
            for name in (LAST_STATE, BEST_ENCODER):
                (out / name).unlink(missing_ok=True)
            for name in ("adapter_model.safetensors", "adapter_config.json"):  # a LoRA run's adapter folder
                (out / lora.ADAPTER_DIR / name).unlink(missing_ok=True)
        return out, False
    last = out / LAST_STATE
    if cfg.resume:
        if not last.exists():
            raise OutputDirError(f"--resume: no {LAST_STATE} in {out}; nothing to resume. Drop --resume to start fresh.")
        return out, True
    previous = _read_json(out / CONFIG_FILE).get("settings", {}) if (out / CONFIG_FILE).exists() else None
    if last.exists() and previous is not None:
        changed = _changed_settings(previous, asdict(cfg))
        if not changed:
            log.info("%s holds an unfinished run with the same settings: resuming it", out)
            return out, True
        raise OutputDirError(
            f"--output_dir {out} holds another run (settings differ: {', '.join(changed)}). "
            "Pass --resume to continue it anyway, --overwrite to replace it, or choose another --output_dir."
        )
    if previous is not None and not _changed_settings(previous, asdict(cfg)):
        # The same command was stopped before its first last.pt: nothing to resume, nothing to lose.
        log.info("%s holds a start of this same run that ended before its first checkpoint: starting again", out)
        return out, False
    raise OutputDirError(
        f"--output_dir {out} already holds another run's files ({', '.join(existing[:4])}). "
        "Pass --overwrite to replace them, or choose another --output_dir."
    )


def _changed_settings(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = set(previous) | set(current)
    return sorted(k for k in keys if k not in _RESUMABLE_CHANGES and previous.get(k) != current.get(k))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputDirError(f"cannot read {path}: {exc}. Delete it or pass --overwrite.") from None


def file_sha256(path: str | Path, limit: int = 1 << 26) -> str:
    """SHA-256 of a (manifest) file; very large files are hashed over their first 64 MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "fairseq2", "sonar-space", "sacrebleu", "numpy", "sonar-ft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_run_records(
    out: Path, cfg: TrainConfig, arch: dict[str, Any], decoder: FrozenTextDecoder, device: torch.device, precision: str,
    world_size: int = 1,
) -> None:
    """``config.json`` (settings, architecture, versions, data hashes) and ``tokenizer.json``."""
    data = {}
    for split in ("train", "val"):
        manifest = getattr(cfg, f"{split}_manifest")
        if manifest and Path(manifest).is_file():
            data[f"{split}_manifest_sha256"] = file_sha256(manifest)
    record = {
        "settings": asdict(cfg),
        "resolved": {"device": str(device), "precision": precision, "world_size": world_size,
                     "global_batch": cfg.batch_size * cfg.grad_accum * world_size},
        "encoder_architecture": arch,
        "versions": package_versions(),
        "data": data,
    }
    io.write_json(out / CONFIG_FILE, record)
    io.write_json(out / TOKENIZER_FILE, tokenizer_record(cfg, decoder))


def tokenizer_record(cfg: TrainConfig, decoder: FrozenTextDecoder) -> dict[str, Any]:
    vocab = decoder.tokenizer.vocab_info
    return {
        "decoder": cfg.decoder,
        "tokenizer": cfg.tokenizer or cfg.decoder,
        "tokenizer_family": "nllb",
        "tgt_lang": cfg.tgt_lang,
        "target_mode": "target",
        "target_prefix": ["</s>", f"__{cfg.tgt_lang}__"],
        "vocab_size": vocab.size,
        "special_ids": {"pad": vocab.pad_idx, "unk": vocab.unk_idx, "bos": vocab.bos_idx, "eos": vocab.eos_idx},
        "embedding_dim": decoder.embedding_dim,
    }


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def load_split(
    features: str, manifest: str, *, cfg: TrainConfig, split: str, fraction: float | None = None,
    bad: list[BadSample] | None = None, reuse: dict[tuple, Any] | None = None,
) -> SignFeatureDataset:
    """Manifest rows with a feature file each, subset as asked, as a dataset.

    With ``bad`` (a list), every selected clip's file is read once first; the clips training
    would fail on are appended to ``bad`` and left out (the caller decides whether to stop).
    ``reuse`` (a dict the caller keeps, e.g. across tuning trials) hands back the dataset and bad
    clips of an earlier call with the same split, files and data settings instead of scanning (and,
    with ``--cache_features``, reading) every file again. A manifest is recognised by its size and
    modification time; feature files changed in between are not noticed.
    """
    key = _split_key(features, manifest, cfg, split, fraction) if reuse is not None and bad is not None else None
    if key is not None and key in reuse:
        dataset, found = reuse[key]
        bad.extend(found)
        return dataset
    found: list[BadSample] | None = [] if bad is not None else None
    dataset = _read_split(features, manifest, cfg=cfg, split=split, fraction=fraction, bad=found)
    if bad is not None:
        bad.extend(found)
    if key is not None:
        reuse[key] = (dataset, found)
    return dataset


def _split_key(features: str, manifest: str, cfg: TrainConfig, split: str, fraction: float | None) -> tuple | None:
    """Everything that decides a split's dataset; None when the manifest cannot be looked at."""
    try:
        stat = Path(manifest).stat()
    except OSError:
        return None  # _read_split says what is wrong
    return (split, str(Path(features).resolve()), str(Path(manifest).resolve()), stat.st_size, stat.st_mtime_ns,
            cfg.max_samples, fraction, cfg.seed, cfg.max_frames, cfg.cache_features, cfg.cache_dtype)


def _read_split(
    features: str, manifest: str, *, cfg: TrainConfig, split: str, fraction: float | None, bad: list[BadSample] | None,
) -> SignFeatureDataset:
    store = FeatureStore.open(features)
    rows = read_manifest(manifest)
    if bad is not None:
        # Subset first: a quick --max_samples test should not read the whole corpus.
        rows = select_rows(rows, max_samples=cfg.max_samples, subset_fraction=fraction, seed=cfg.seed)
        # The scan reads every file: keep what it learns (frame counts; the features themselves when
        # caching) so that neither the dataset's length pass nor epoch 1 reads the files again.
        frames: dict[str, int] = {}
        cache = perf.feature_cache(cfg)
        preloaded: dict[str, torch.Tensor] = {}

        def keep(clip_id: str, features: torch.Tensor) -> None:
            preloaded[clip_id] = prepare_features(features, clip_id=clip_id, path=store.path(clip_id),
                                                  max_frames=cfg.max_frames, cache_dtype=cache.get("cache_dtype"))

        found = find_bad_samples(store, rows, split=split, frames=frames, keep=keep if cache else None)
        bad.extend(found)
        dropped = {b.id for b in found}
        rows = [replace(r, length=frames[r.id]) for r in rows if r.id not in dropped]
        return SignFeatureDataset(store, rows, max_frames=cfg.max_frames, preloaded=preloaded, **cache)
    missing = [r for r in rows if store.path(r.id) is None]
    if missing:
        listed = ", ".join(f"{r.id} (line {r.line})" for r in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(
            f"{len(missing)} clip(s) of {split} manifest {manifest} have no feature file in {features}: {listed}{more}. "
            "Run `sonar-ft verify` on this split, fix the manifest or the features, then start again."
        )
    rows = select_rows(rows, max_samples=cfg.max_samples, subset_fraction=fraction, seed=cfg.seed)
    return SignFeatureDataset(store, rows, max_frames=cfg.max_frames, **perf.feature_cache(cfg))


def make_batches(
    dataset: SignFeatureDataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int, num_replicas: int = 1, rank: int = 0,
) -> torch.utils.data.DataLoader:
    """Length-bucketed batches; with ``num_replicas`` > 1, rank ``rank``'s share of each global batch."""
    sampler = LengthBucketSampler(dataset.lengths, batch_size, shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank)
    if dataset.cache:
        num_workers = 0  # worker processes would each fill (and lose) a cache of their own
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers, persistent_workers=num_workers > 0
    )


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def out_of_memory_error(cfg: TrainConfig) -> TrainingError:
    """What to say when the GPU runs out of memory: the settings that need less of it."""
    half = max(1, cfg.batch_size // 2)
    accum = cfg.grad_accum * cfg.batch_size // half
    tips = [f"--batch_size {half} --grad_accum {accum} (same effective batch of {half * accum})"]
    if not cfg.gradient_checkpointing:
        tips.append("--gradient_checkpointing")
    tips.append(f"--freeze_encoder_layers {cfg.freeze_encoder_layers + 6} (freeze more of the lower layers)")
    tips.append("a smaller --max_frames" + (f" than {cfg.max_frames}" if cfg.max_frames else " (e.g. 512)"))
    if cfg.precision != "bf16":
        tips.append("--precision bf16 on an Ampere or newer GPU")
    return TrainingError(
        f"the GPU ran out of memory at --batch_size {cfg.batch_size}. Settings that need less memory: "
        + "; ".join(tips) + ". `sonar-ft plan --gpu YOUR_GPU` estimates which of them fit."
    )


def screen_bad_samples(out: Path, cfg: TrainConfig, bad: list[BadSample]) -> None:
    """Record ``bad`` in ``bad_samples.tsv``, then stop (``--on_bad_sample error``) or go on without them (``skip``)."""
    path = out / BAD_SAMPLES
    if not bad:
        path.unlink(missing_ok=True)  # a list from an earlier start no longer applies
        return
    write_bad_samples(path, bad)
    if cfg.on_bad_sample == "skip":
        log.warning("--on_bad_sample skip: leaving out %d bad clip(s), listed in %s", len(bad), path)
        return
    raise DataError(
        f"{len(bad)} clip(s) cannot be trained on: {format_bad_samples(bad)}. All are listed in {path}. "
        "Fix or remove them (`sonar-ft verify` shows details), or pass --on_bad_sample skip to train without them."
    )


def check_feature_dim(dataset: SignFeatureDataset, expected: int, *, features: str, encoder: str) -> None:
    """Stop before training when the clips' feature dimension is not the encoder's input size."""
    if len(dataset) == 0:
        return
    dim = dataset[0].features.shape[1]
    if dim != expected:
        raise DataError(
            f"the clips in {features} have {dim} features per frame but the encoder {encoder} expects {expected}: "
            "use features from the extractor the encoder was trained with (SignHiera: 768), or the matching checkpoint"
        )


def _count_bad_step(bad_steps: int, out: Path, cfg: TrainConfig, what: str, where: str) -> int:
    """Warn about a skipped step; stop once ``MAX_BAD_STEPS`` came without a good step between."""
    bad_steps += 1
    log.warning("non-finite %s at %s: step skipped (%d in a row)", what, where, bad_steps)
    if bad_steps < MAX_BAD_STEPS:
        return bad_steps
    saved = [str(out / n) for n in (LAST_STATE, BEST_ENCODER) if cfg.save_checkpoints and (out / n).is_file()]
    last_good = (
        f"The last good checkpoint is {saved[0]}" + (f" (best encoder: {saved[1]})" if len(saved) > 1 else "")
        + "; nothing was saved after it. Continue from it with --resume"
        if saved else "No checkpoint was saved yet. Start again"
    )
    raise TrainingError(
        f"{bad_steps} steps in a row had a non-finite loss or gradient (last: {what} at {where}): training diverged. "
        f"{last_good} after lowering --learning_rate (e.g. to {cfg.learning_rate / 2:g})"
        + (" or with --precision fp32" if cfg.precision != "fp32" else "") + "."
    )


def weights_finite(model: torch.nn.Module) -> bool:
    """True when no parameter holds NaN or Inf (one device sync for the whole model)."""
    flags = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def _refuse_broken_weights(encoder: torch.nn.Module, path: Path, where: str) -> None:
    if not weights_finite(encoder):
        raise TrainingError(
            f"the encoder's weights became NaN/Inf at {where}; not writing them to {path}, which keeps the last good "
            "state. Lower --learning_rate and continue with --resume."
        )


def train(
    cfg: TrainConfig, *, on_evaluation: Callable[[EpochMetrics], None] | None = None, reuse_data: dict[tuple, Any] | None = None,
) -> TrainResult:
    """Fine-tune the encoder as configured; ``on_evaluation`` is called after each evaluation (tuning prunes there).

    ``reuse_data``: a dict kept between runs of one process (tuning trials), so that a later run with
    the same data settings reuses the earlier datasets, their bad-clip scan and feature cache
    (see :func:`load_split`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this data-parallel: ``--batch_size``
    is per process, only rank 0 writes files.
    """
    cfg.validate()
    ddp = distributed.setup(cfg.device)
    try:
        result = _train(cfg, ddp, on_evaluation, reuse_data)
    except BaseException:
        ddp.shutdown(finished=False)
        raise
    ddp.shutdown(finished=True)
    return result


def _train(
    cfg: TrainConfig, ddp: distributed.DistContext, on_evaluation: Callable[[EpochMetrics], None] | None,
    reuse_data: dict[tuple, Any] | None = None,
) -> TrainResult:
    device = ddp.device if ddp.active else resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    out, resuming = ddp.on_main(lambda: prepare_output_dir(cfg))
    seed_everything(cfg.seed)
    checkpointing = cfg.save_checkpoints  # the same on every rank (mid-epoch saves take all ranks part)
    if not ddp.is_main:
        # Rank 0 writes every file; the others differ in dropout noise only.
        cfg = replace(cfg, save_checkpoints=False, write_predictions=False)
        torch.manual_seed(cfg.seed + ddp.rank)

    # -- data ---------------------------------------------------------------------------------
    bad: list[BadSample] = []  # every unusable clip of both splits, reported together
    train_set = load_split(cfg.train_features, cfg.train_manifest, cfg=cfg, split="training", fraction=cfg.subset_fraction,
                           bad=bad, reuse=reuse_data)
    val_set = load_split(cfg.val_features, cfg.val_manifest, cfg=cfg, split="validation", bad=bad, reuse=reuse_data)
    ddp.on_main(lambda: screen_bad_samples(out, cfg, bad))
    for split, dataset, manifest in (("training", train_set, cfg.train_manifest), ("validation", val_set, cfg.val_manifest)):
        if len(dataset) == 0:
            raise DataError(f"the {split} manifest {manifest} has no usable clips" + (f" (all listed in {out / BAD_SAMPLES})" if bad else ""))
    if cfg.batch_size > len(train_set):
        log.warning("--batch_size %d is larger than the %d training clips: every batch holds all of them", cfg.batch_size, len(train_set))
    train_batches = make_batches(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, num_workers=cfg.num_workers,
                                 num_replicas=ddp.world_size, rank=ddp.rank)
    val_batches = make_batches(ddp.shard(val_set), cfg.batch_size, shuffle=False, seed=cfg.seed, num_workers=cfg.num_workers)

    # -- models -------------------------------------------------------------------------------
    encoder, arch = load_encoder(cfg.encoder_checkpoint, dropout=cfg.dropout, device=device)
    perf.configure_encoder(encoder, cfg)  # --freeze_encoder_layers, --gradient_checkpointing, --compile
    peft_model = lora.apply_lora(encoder, cfg)[0] if cfg.lora_rank else None  # adapters injected into `encoder`
    decoder = FrozenTextDecoder.load(cfg.decoder, cfg.tokenizer, device=device, dtype=perf.decoder_dtype(cfg.decoder_dtype, device))
    if cfg.gradient_checkpointing:
        perf.checkpoint_decoder_layers(decoder.model)
    decoder.check_lang(cfg.tgt_lang)
    if arch.output_dim != decoder.embedding_dim:
        raise ConfigError(
            f"the encoder {cfg.encoder_checkpoint} outputs {arch.output_dim}-d embeddings but the decoder {cfg.decoder} "
            f"reads {decoder.embedding_dim}-d ones: they do not belong together"
        )
    for features, dataset in ((cfg.train_features, train_set), (cfg.val_features, val_set)):
        check_feature_dim(dataset, arch.feature_dim, features=features, encoder=cfg.encoder_checkpoint)
    teacher = None
    if cfg.distill_weight > 0:
        from sonar_ft.text_encoder import FrozenTextEncoder

        teacher = FrozenTextEncoder.load(cfg.text_encoder, cfg.tokenizer, device=device)

    params = [p for p in encoder.parameters() if p.requires_grad]
    groups = perf.parameter_groups(encoder, cfg.weight_decay)  # no decay on norms, biases, the shared embedding
    optimizer = perf.build_optimizer(groups, cfg.optimizer, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, device=device)
    scaler = perf.grad_scaler(cfg.decoder_dtype, device)  # loss scaling through an fp16 decoder; else a no-op
    maximize = cfg.select_metric == "bleu"
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max" if maximize else "min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
    )
    if ddp.is_main:
        write_run_records(out, cfg, asdict(arch), decoder, device, precision, world_size=ddp.world_size)
        plan.startup_check(cfg, arch, frames=max(train_set.lengths), device=device, precision=precision,
                           target_tokens=plan.longest_target(decoder, [r.text for r in train_set.rows], cfg.tgt_lang))

    # -- state (fresh or resumed) -------------------------------------------------------------
    start_epoch, step = 1, 0
    best: dict[str, Any] = {"score": None, "epoch": None, "bleu": None, "loss": None}
    history: list[EpochMetrics] = []
    evals_without_improvement = 0
    position: dict[str, Any] | None = None  # where inside an epoch a mid-epoch last.pt was written
    if resuming:
        state = io.load_torch(out / LAST_STATE, what="training state")
        position = state.get("position")
        if position:
            log.info("resuming inside epoch %d after batch %d", position["epoch"], position["batches"])
        if peft_model is not None:  # LoRA: last.pt holds only the trainable tensors
            lora.load_trainable_state_dict(encoder, state["encoder"], source=str(out / LAST_STATE))
        else:
            encoder.load_state_dict(state["encoder"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as exc:  # e.g. a last.pt written by an older sonar-ft with other parameter groups
            raise OutputDirError(
                f"{out / LAST_STATE} holds an optimiser state this version cannot continue ({exc}); "
                f"start a new run (another --output_dir, or --overwrite), or fine-tune from its best_encoder.pt"
            ) from None
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        plateau.load_state_dict(state["plateau"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        best = state["best"]
        evals_without_improvement = state["evals_without_improvement"]
        history = [EpochMetrics(**h) for h in state["history"]]
        _set_rng_state(state["rng"])
        log.info("resuming from epoch %d (step %d, best %s at epoch %s)", state["epoch"], step, best["score"], best["epoch"])

    log.info(
        "training %d clips, validating on %d | device %s, %s | encoder %s | effective batch %d",
        len(train_set), len(val_set), device, precision, cfg.encoder_checkpoint, cfg.batch_size * cfg.grad_accum * ddp.world_size,
    )
    model = ddp.wrap(encoder)  # DistributedDataParallel under torchrun; `encoder` stays the module saved and evaluated
    stopped_early = False
    bad_steps = 0
    epochs = tqdm(range(start_epoch, cfg.epochs + 1), desc="epochs", initial=start_epoch - 1, total=cfg.epochs)
    for epoch in epochs:
        started = time.perf_counter()
        encoder.train()
        loss_sum, token_sum, seen, micro = 0.0, 0, 0, 0
        done = 0  # batches of this epoch consumed: the sampler position a mid-epoch last.pt records
        restore_rng = None
        if position is not None and position["epoch"] == epoch:
            micro, done = position["micro"], position["batches"]
            if ddp.is_main:  # the partial sums were saved summed over all ranks: counted once, on rank 0
                loss_sum, token_sum, seen = position["loss_sum"], position["token_sum"], position["seen"]
            started -= position["seconds"]
            restore_rng, position = state["rng"], None
        train_batches.batch_sampler.set_epoch(epoch, skip=done)
        optimizer.zero_grad(set_to_none=True)
        bar = tqdm(train_batches, desc=f"epoch {epoch}", initial=done, total=done + len(train_batches), leave=False)
        for batch in bar:
            if restore_rng is not None:
                # Starting the DataLoader drew from the global RNG; dropout must go on from the
                # state of the moment last.pt was written, as it would have without the stop.
                _set_rng_state(restore_rng)
                restore_rng = None
            done += 1
            batch = batch.to(device)
            try:
                with autocast_context(device, precision):
                    emb = model(batch.features, batch.mask)  # (B, E)
                emb = emb.float()
                out_loss = decoder.loss(
                    emb, batch.texts, cfg.tgt_lang, label_smoothing=cfg.label_smoothing, chunk_size=cfg.loss_chunk_size
                )
                loss = out_loss.loss
                if teacher is not None:
                    from sonar_ft.text_encoder import distillation_loss

                    target = teacher.embed(batch.texts, cfg.tgt_lang)
                    loss = loss + cfg.distill_weight * distillation_loss(emb, target, cfg.distill_loss)
                # weight: 1 on one process; under DDP it makes the averaged gradient the global token mean.
                weight, finite = ddp.step_sync(out_loss.num_tokens, bool(torch.isfinite(loss)))
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    bad_steps = _count_bad_step(bad_steps, out, cfg, "loss", f"epoch {epoch}, batch {done} ({batch.ids[0]}, ...)")
                    continue
                scaler.scale(loss * weight / cfg.grad_accum).backward()
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory_error(cfg) from None
            micro += 1
            stepped = False
            if micro % cfg.grad_accum == 0:
                step, stepped = _optimizer_step(optimizer, scaler, params, cfg, step)
                bad_steps = 0 if stepped else _count_bad_step(bad_steps, out, cfg, "gradient", f"epoch {epoch}, batch {done}")
            loss_sum += float(out_loss.loss.detach()) * out_loss.num_tokens
            token_sum += out_loss.num_tokens
            seen += len(batch)
            bar.set_postfix(loss=f"{float(out_loss.loss.detach()):.3f}")
            if stepped and checkpointing and cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0:
                # The epoch's partial sums over all ranks (every rank takes part), written by rank 0.
                partial = ddp.sum(loss_sum, token_sum, seen)
                if cfg.save_checkpoints:
                    here = {"epoch": epoch, "batches": done, "micro": micro, "loss_sum": partial[0], "token_sum": partial[1],
                            "seen": partial[2], "seconds": time.perf_counter() - started}
                    _save_state(out / LAST_STATE, encoder, optimizer, scaler, plateau, epoch=epoch - 1, step=step, best=best,
                                evals_without_improvement=evals_without_improvement, history=history, position=here)
        if restore_rng is not None:  # resumed at the very end of the epoch: no batch was left to restore it
            _set_rng_state(restore_rng)
        if micro % cfg.grad_accum:
            step, stepped = _optimizer_step(optimizer, scaler, params, cfg, step)
            bad_steps = 0 if stepped else _count_bad_step(bad_steps, out, cfg, "gradient", f"end of epoch {epoch}")
        train_seconds = time.perf_counter() - started
        loss_sum, token_sum, seen = ddp.sum(loss_sum, token_sum, seen)  # over all ranks (as is on one process)

        result: EvalResult | None = None
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            try:
                result = evaluate(
                    encoder, decoder, val_batches, lang=cfg.tgt_lang, device=device, precision=precision,
                    beam_size=cfg.beam_size, max_gen_len=cfg.max_gen_len, loss_chunk_size=cfg.loss_chunk_size,
                    desc=f"validating epoch {epoch}", gather=ddp.eval_gatherer(val_set),
                )
            except torch.cuda.OutOfMemoryError:
                raise out_of_memory_error(cfg) from None
        metrics = EpochMetrics(
            epoch=epoch,
            train_loss=loss_sum / max(token_sum, 1),
            val_loss=result.loss if result else None,
            val_bleu=result.bleu if result else None,
            val_chrf=result.chrf if result else None,
            lr=optimizer.param_groups[0]["lr"],
            seconds=time.perf_counter() - started,
            samples_per_second=seen / max(train_seconds, 1e-9),
        )
        if result is not None:
            score = result.bleu if maximize else result.loss
            if step >= cfg.warmup_steps:
                plateau.step(score)
            if _improves(result, best, maximize):
                best = {"score": score, "epoch": epoch, "bleu": result.bleu, "loss": result.loss}
                metrics.is_best = True
                evals_without_improvement = 0
                if cfg.save_checkpoints:
                    _refuse_broken_weights(encoder, out / BEST_ENCODER, f"epoch {epoch}")
                    save_encoder(encoder, out / BEST_ENCODER, extra={"epoch": epoch, "val_bleu": result.bleu, "val_loss": result.loss},
                                 state_dict=lora.merged_state_dict(encoder) if peft_model is not None else None)
                    if peft_model is not None:
                        lora.save_adapter(peft_model, out / lora.ADAPTER_DIR)
            else:
                evals_without_improvement += 1
            if cfg.write_predictions:
                io.write_json(out / f"predictions_epoch{epoch}.json", {"epoch": epoch, "bleu": result.bleu, "chrf": result.chrf,
                                                                         "bleu_signature": result.bleu_signature, "samples": result.samples})
        history.append(metrics)
        if ddp.is_main:
            io.write_json(out / f"metrics_epoch{epoch}.json", asdict(metrics))
        if cfg.save_checkpoints:
            _save_state(out / LAST_STATE, encoder, optimizer, scaler, plateau, epoch=epoch, step=step, best=best,
                        evals_without_improvement=evals_without_improvement, history=history)
        log.info(_epoch_line(metrics, cfg.epochs))
        if result is not None and on_evaluation is not None:
            on_evaluation(metrics)
        if result is not None and cfg.early_stopping_patience and evals_without_improvement >= cfg.early_stopping_patience:
            log.info("early stopping: no improvement in %d evaluations", evals_without_improvement)
            stopped_early = True
            break

    return TrainResult(
        best_epoch=best["epoch"], best_score=best["score"], best_val_bleu=best["bleu"], best_val_loss=best["loss"],
        history=history, stopped_early=stopped_early, output_dir=str(out),
    )


def _improves(result: EvalResult, best: dict[str, Any], maximize: bool) -> bool:
    if best["score"] is None:
        return True
    if maximize:
        # BLEU ties (common early on, at 0) are broken by the validation loss.
        return result.bleu > best["bleu"] + 1e-9 or (abs(result.bleu - best["bleu"]) <= 1e-9 and (result.loss or math.inf) < (best["loss"] or math.inf))
    return (result.loss or math.inf) < best["score"]


def _optimizer_step(
    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params: list, cfg: TrainConfig, step: int
) -> tuple[int, bool]:
    """One clipped AdamW step: ``(step + 1, True)``, or ``(step, False)`` when the gradient is NaN/Inf (skipped).

    With loss scaling on (fp16 decoder), gradients are unscaled first and an overflowing step lowers
    the scale; with it off, ``scaler`` does nothing.
    """
    if cfg.warmup_steps and step < cfg.warmup_steps:
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * (step + 1) / cfg.warmup_steps
    scaler.unscale_(optimizer)
    # With clipping off, max_norm=inf only measures the norm, so a NaN/Inf gradient is still caught.
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    if not bool(torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        if scaler.is_enabled():
            scale = scaler.get_scale()
            scaler.update()  # found_inf was recorded by unscale_: the scale is lowered
            log.info("gradient overflow at loss scale %g: step skipped, scale now %g", scale, scaler.get_scale())
        return step, False
    try:
        optimizer.step()  # the first step allocates AdamW's two moments: a common place to run out of memory
    except torch.cuda.OutOfMemoryError:
        raise out_of_memory_error(cfg) from None
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return step + 1, True


def _save_state(
    path: Path, encoder: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, plateau: Any,
    *, epoch: int, step: int,
    best: dict[str, Any], evals_without_improvement: int, history: list[EpochMetrics], position: dict[str, Any] | None = None,
) -> None:
    """Write the resumable ``last.pt``; ``epoch`` is the last completed one, ``position`` the place inside the next.

    Broken (NaN/Inf) weights are never written: ``last.pt`` keeps the last good state.
    """
    _refuse_broken_weights(encoder, path, f"epoch {epoch + 1 if position else epoch}, step {step}")
    io.save_torch(path, {
        "encoder": lora.trainable_state_dict(encoder) if lora.is_lora(encoder) else encoder.state_dict(), "optimizer": optimizer.state_dict(), "plateau": plateau.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None, "epoch": epoch, "step": step, "best": best, "evals_without_improvement": evals_without_improvement,
        "history": [asdict(h) for h in history], "rng": _rng_state(), "position": position,
    })


def _epoch_line(m: EpochMetrics, epochs: int) -> str:
    val = (
        f"val_loss {m.val_loss:.4f} | BLEU {m.val_bleu:.2f} | chrF {m.val_chrf:.2f}" if m.val_bleu is not None else "no evaluation"
    )
    star = " *best*" if m.is_best else ""
    return f"epoch {m.epoch}/{epochs} | train_loss {m.train_loss:.4f} | {val} | lr {m.lr:.2e} | {m.seconds:.1f}s{star}"


# ------------------------------------------------------------------------------------------------
# Evaluation only
# ------------------------------------------------------------------------------------------------
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
    batches = make_batches(dataset, cfg.batch_size, shuffle=False, seed=cfg.seed, num_workers=cfg.num_workers)
    encoder, arch = load_encoder(cfg.encoder_checkpoint, device=device)
    decoder = FrozenTextDecoder.load(cfg.decoder, cfg.tokenizer, device=device, dtype=perf.decoder_dtype(cfg.decoder_dtype, device))
    decoder.check_lang(cfg.tgt_lang)
    if arch.output_dim != decoder.embedding_dim:
        raise ConfigError(f"encoder outputs {arch.output_dim}-d embeddings but decoder {cfg.decoder} reads {decoder.embedding_dim}-d ones")
    result = evaluate(encoder, decoder, batches, lang=cfg.tgt_lang, device=device, precision=precision,
                      beam_size=cfg.beam_size, max_gen_len=cfg.max_gen_len, loss_chunk_size=cfg.loss_chunk_size)
    record = {
        **result.summary(),
        "encoder_checkpoint": str(cfg.encoder_checkpoint),
        "features": str(cfg.val_features),
        "manifest": str(cfg.val_manifest),
        "tgt_lang": cfg.tgt_lang,
        "beam_size": cfg.beam_size,
        "samples": result.samples,
    }
    io.write_json(out / TEST_RESULTS, record)
    return record
