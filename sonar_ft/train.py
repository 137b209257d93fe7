"""The pieces of a fine-tuning run that are not the loop itself, and ``train(config)``.

The loop lives in :mod:`sonar_ft.recipe` (``FineTuneRecipe``: setup → epochs of steps → validation
and checkpoints). Here: the output-folder policy (which run a folder holds, resume or refuse),
the run records (``config.json``, ``tokenizer.json``, ``summary.json``), the data splits and
batches, the errors a run raises, and ``evaluate_checkpoint`` (``--eval_only``).

``TrainConfig`` (:mod:`sonar_ft.config`), ``EpochMetrics`` (:mod:`sonar_ft.train_state`) and the
device resolvers (:mod:`sonar_ft.device`) are importable from here as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from sonar_ft import distributed, io, perf
from sonar_ft.config import TrainConfig
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
from sonar_ft.device import hardware_record, resolve_device, resolve_precision
from sonar_ft.encoder import load_encoder
from sonar_ft.errors import ConfigError, DataError, OutputDirError, TrainingError
from sonar_ft.evaluate import evaluate, results_record
from sonar_ft.lock import output_lock
from sonar_ft.lora import ADAPTER_DIR
from sonar_ft.paths import check_output_dir, recipe_inputs
from sonar_ft.state_mirror import restore_state
from sonar_ft.run_log import STEPS_FILE, TENSORBOARD_DIR, attach_train_log
from sonar_ft.train_state import EpochMetrics, seed_everything

__all__ = [
    "TrainConfig", "EpochMetrics", "TrainResult", "train", "evaluate_checkpoint", "resolve_device", "resolve_precision",
    "seed_everything", "load_split", "make_batches", "prepare_output_dir",
]

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
BEST_ENCODER = "best_encoder.pt"
LAST_STATE = "last.pt"
SUMMARY_FILE = "summary.json"
TEST_RESULTS = "test_results.json"
BAD_SAMPLES = "bad_samples.tsv"
MAX_BAD_STEPS = 10  # consecutive non-finite losses / gradients (no good step between) before a run is stopped


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
    already_finished: bool = False
    """True when the output folder held this very run, finished: nothing was done."""


# ------------------------------------------------------------------------------------------------
# Output folder and run records
# ------------------------------------------------------------------------------------------------
# Settings that may change between a run and its resumption without making it another run.
_RESUMABLE_CHANGES = {"output_dir", "epochs", "resume", "overwrite", "num_workers", "eval_every", "device", "early_stopping_patience",
                      "checkpoint_every_steps", "gradient_checkpointing", "cache_features", "cache_dtype", "compile", "loss_chunk_size",
                      "log_every_steps", "report_to", "progress", "progress_seconds", "state_dir"}
RUN_FILES = (CONFIG_FILE, LAST_STATE, BEST_ENCODER)


def check_inputs(cfg: TrainConfig) -> None:
    """Refuse a validation manifest that is the training manifest (same file or same content), unless allowed."""
    if cfg.eval_only or cfg.allow_train_as_val or not cfg.train_manifest or not cfg.val_manifest:
        return
    train_m, val_m = Path(cfg.train_manifest), Path(cfg.val_manifest)
    if not (train_m.is_file() and val_m.is_file()):
        return  # reading the split says what is missing
    same = train_m.resolve() == val_m.resolve() or (
        train_m.stat().st_size == val_m.stat().st_size and io.file_sha256(train_m, limit=None) == io.file_sha256(val_m, limit=None))
    if same and str(Path(cfg.train_features).resolve()) == str(Path(cfg.val_features).resolve()):
        raise ConfigError(
            f"--val_manifest {val_m} is the training manifest {train_m} (same clips): validation scores would measure "
            "memorisation, and the best checkpoint would be picked on them. Use the val split (How2Sign: how2sign_realigned_val.csv), "
            "or pass --allow_train_as_val to accept it knowingly."
        )


def prepare_output_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """Create the output folder; return it and whether this run resumes the one already there.

    A folder holding another run's files is refused unless ``--resume`` / ``--overwrite``;
    re-running the very same command on a folder with ``last.pt`` resumes it. Nothing is deleted
    here: with ``--overwrite`` the recipe calls :func:`clear_run_files` once the new run has started.
    """
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OutputDirError(f"cannot write to --output_dir {out}: {exc.strerror or exc}. Choose a writable folder.") from None
    if cfg.state_dir and not cfg.overwrite:  # a fresh runtime after a disconnect: the local last.pt comes back from its copy
        restore_state(out / LAST_STATE, Path(cfg.state_dir) / LAST_STATE)
    stale = io.remove_stale_temps(out)
    if stale:
        log.info("removed %d half-written file(s) left in %s by a run that was stopped", len(stale), out)
    existing = [name for name in RUN_FILES if (out / name).exists()] + sorted(p.name for p in out.glob("metrics_epoch*.json"))
    last = last_state_path(cfg)
    if cfg.resume and not cfg.overwrite:
        if not last.exists():
            what = f"holds no run ({', '.join(existing[:3])} but no {LAST_STATE})" if existing else "holds no run"
            raise OutputDirError(f"--resume: {out} {what}; nothing to resume. Check --output_dir, or drop --resume to start fresh.")
        return out, True
    if not existing or cfg.overwrite:
        return out, False
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


def last_state_path(cfg: TrainConfig) -> Path:
    """Where ``last.pt`` is written: ``--state_dir`` (copied into the run folder after each epoch) or the run folder."""
    return Path(cfg.state_dir or cfg.output_dir) / LAST_STATE


def clear_run_files(out: Path, last: Path | None = None) -> None:
    """``--overwrite``: remove the previous run's checkpoints and records (called once the new run has started);
    ``last``: its ``last.pt`` when kept elsewhere (``--state_dir``)."""
    removed = list(out.glob("metrics_epoch*.json")) + list(out.glob("predictions_epoch*.json"))
    removed += [out / n for n in (LAST_STATE, BEST_ENCODER, SUMMARY_FILE, STEPS_FILE) if (out / n).exists()]
    removed += [last] if last is not None and last != out / LAST_STATE and last.exists() else []
    removed += list((out / ADAPTER_DIR).glob("adapter_*"))  # a LoRA run's adapter
    for p in removed:
        p.unlink()
    if (out / TENSORBOARD_DIR).is_dir():
        shutil.rmtree(out / TENSORBOARD_DIR)
    if removed:
        log.info("--overwrite: removed %d file(s) of the previous run in %s", len(removed), out)


def finished_run(cfg: TrainConfig) -> TrainResult | None:
    """The result of this very run when ``output_dir`` already holds it, finished; else None.

    Decided from ``config.json`` (same settings), ``summary.json`` (finished, same number of
    epochs), ``last.pt`` and the per-epoch records, before any clip is read or model loaded.
    """
    out = Path(cfg.output_dir)
    if cfg.overwrite or not (out / SUMMARY_FILE).is_file() or not (out / LAST_STATE).is_file() or not (out / CONFIG_FILE).is_file():
        return None
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
        previous = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8")).get("settings", {})
    except (OSError, json.JSONDecodeError):
        return None
    if not summary.get("finished") or summary.get("epochs") != cfg.epochs or _changed_settings(previous, asdict(cfg)):
        return None
    history = []
    for epoch in range(1, cfg.epochs + 1):
        path = out / f"metrics_epoch{epoch}.json"
        if path.is_file():
            history.append(EpochMetrics(**json.loads(path.read_text(encoding="utf-8"))))
    best = summary.get("best", {})
    return TrainResult(best_epoch=best.get("epoch"), best_score=best.get("score"), best_val_bleu=best.get("bleu"),
                       best_val_loss=best.get("loss"), history=history, stopped_early=bool(summary.get("stopped_early")),
                       output_dir=str(out), already_finished=True)


def write_run_summary(out: Path, cfg: TrainConfig, state: Any, stopped_early: bool) -> None:
    """``summary.json``: the run finished (all epochs, or stopped early) and its best evaluation."""
    io.write_json(out / SUMMARY_FILE, {"finished": True, "epochs": cfg.epochs, "epochs_run": state.epoch, "steps": state.step,
                                       "stopped_early": stopped_early, "select_metric": cfg.select_metric, "best": state.best})


def _changed_settings(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    # Settings added after a run was written count as unchanged while they hold their default.
    defaults = asdict(TrainConfig())
    keys = set(previous) | set(current)
    return sorted(k for k in keys if k not in _RESUMABLE_CHANGES and previous.get(k, defaults.get(k)) != current.get(k, defaults.get(k)))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputDirError(f"cannot read {path}: {exc}. Delete it or pass --overwrite.") from None


def git_record() -> dict[str, Any] | None:
    """The commit of the sonar-ft checkout this runs from and whether its tracked files were modified; None outside a checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


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
            data[f"{split}_manifest_sha256"] = io.file_sha256(manifest)
    record = {
        "settings": asdict(cfg),
        "resolved": {"device": str(device), "precision": precision, "world_size": world_size,
                     "global_batch": cfg.batch_size * cfg.grad_accum * world_size},
        "encoder_architecture": arch,
        "encoder_checkpoint_sha256": io.checkpoint_sha256(cfg.encoder_checkpoint) if cfg.encoder_checkpoint else None,
        "versions": package_versions(),
        "hardware": hardware_record(device),
        "git": git_record(),
        "data": data,
    }
    io.write_json(out / CONFIG_FILE, record)
    io.write_json(out / TOKENIZER_FILE, tokenizer_record(cfg, decoder))


def load_scorer(cfg: TrainConfig, device: torch.device) -> Any:
    """The SONAR text encoder for the semantic scores, only when ``--text_encoder`` is given (never a silent download)."""
    if not cfg.text_encoder:
        return None
    from sonar_ft.text_encoder import FrozenTextEncoder

    return FrozenTextEncoder.load(cfg.text_encoder, cfg.tokenizer, device=device)


def tokenizer_record(cfg: TrainConfig, decoder: FrozenTextDecoder) -> dict[str, Any]:
    vocab = decoder.tokenizer.vocab_info
    return {
        "decoder": cfg.decoder,
        "tokenizer": cfg.tokenizer or cfg.decoder,
        # Local files as absolute paths: `sonar-ft export` packs them even when run from another folder.
        "decoder_file": str(Path(cfg.decoder).resolve()) if Path(cfg.decoder).is_file() else None,
        "tokenizer_file": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer and Path(cfg.tokenizer).is_file() else None,
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


def count_bad_step(bad_steps: int, out: Path, cfg: TrainConfig, what: str, where: str) -> int:
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


def refuse_broken_weights(encoder: torch.nn.Module, path: Path, where: str) -> None:
    if not weights_finite(encoder):
        raise TrainingError(
            f"the encoder's weights became NaN/Inf at {where}; not writing them to {path}, which keeps the last good "
            "state. Lower --learning_rate and continue with --resume."
        )


def target_tokens(decoder: FrozenTextDecoder, texts: list[str], lang: str) -> int:
    """Target tokens the decoder's loss scores for ``texts`` (what a micro-batch weighs in its window)."""
    _, lens = decoder.tokenize(texts, lang)
    return int((lens - 2).clamp(min=0).sum())  # </s> and the language token are not scored


def epoch_line(m: EpochMetrics, epochs: int) -> str:
    val = (
        f"val_loss {m.val_loss:.4f} | BLEU {m.val_bleu:.2f} | chrF {m.val_chrf:.2f}" if m.val_bleu is not None else "no evaluation"
    )
    star = " *best*" if m.is_best else ""
    return f"epoch {m.epoch}/{epochs} | train_loss {m.train_loss:.4f} | {val} | lr {m.lr:.2e} | {m.seconds:.1f}s{star}"


def train(
    cfg: TrainConfig, *, on_evaluation: Callable[[EpochMetrics], None] | None = None, reuse_data: dict[tuple, Any] | None = None,
) -> TrainResult:
    """Fine-tune the encoder as configured; ``on_evaluation`` is called after each evaluation (tuning prunes there).

    ``reuse_data``: a dict kept between runs of one process (tuning trials), so that a later run with
    the same data settings reuses the earlier datasets, their bad-clip scan and feature cache
    (see :func:`load_split`).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this data-parallel: ``--batch_size``
    is per process, only rank 0 writes files. A run whose output folder already holds it, finished,
    returns at once (``already_finished``) without reading a clip or loading a model.
    """
    from sonar_ft.recipe import FineTuneRecipe

    cfg.validate()
    done = finished_run(cfg)
    if done is not None:
        best = f", best epoch {done.best_epoch}" if done.best_epoch is not None else ""
        log.info("%s already holds this run, finished (%d epochs%s): nothing to do. Raise --epochs to continue it, "
                 "or pass --overwrite to train it again.", cfg.output_dir, cfg.epochs, best)
        return done
    check_output_dir(cfg.output_dir, recipe_inputs(cfg))  # never a run folder that is, or holds, one of its inputs
    ddp = distributed.setup(cfg.device)
    main_out = Path(cfg.output_dir) if ddp.is_main else None
    if main_out is not None:
        try:
            main_out.mkdir(parents=True, exist_ok=True)
        except OSError:
            main_out = None  # prepare_output_dir says what is wrong with it
    # One writer per run folder for the whole run (rank 0 writes every file): a second copy is refused, naming this one.
    lock = output_lock(cfg.output_dir, command="sonar-ft train") if main_out is not None else contextlib.nullcontext()
    try:
        with lock, attach_train_log(main_out):
            recipe = FineTuneRecipe(cfg, ddp, on_evaluation=on_evaluation, reuse_data=reuse_data)
            recipe.setup()
            result = recipe.train()
            if result.best_epoch is not None:
                log.info("run finished; the best evaluation was epoch %d (val BLEU %.2f, val loss %.4f)%s", result.best_epoch, result.best_val_bleu,
                         result.best_val_loss, " (stopped early)" if result.stopped_early else "")
    except BaseException:
        ddp.shutdown(finished=False)
        raise
    ddp.shutdown(finished=True)
    return result


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
                      beam_size=cfg.beam_size, max_gen_len=cfg.max_gen_len, loss_chunk_size=cfg.loss_chunk_size,
                      text_encoder=load_scorer(cfg, device))
    record = results_record(result, asdict(cfg))  # scores + SHA-256 of the encoder and data: export checks them
    with output_lock(out / TEST_RESULTS, folder=False, command="--eval_only"):  # one writer of test_results.json
        io.write_json(out / TEST_RESULTS, record)
    return record
