"""The run folder: which run it holds, whether this command resumes it, starts it, or is refused.

A folder holding another run's files is refused unless ``--resume`` / ``--overwrite``; the very same
command on a folder with ``last.pt`` resumes it; a finished run returns at once. Which settings may
change on resume without making it another run is decided here, once. File names: :mod:`sonar_ft.run_files`.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sonar_ft.config import TrainConfig
from sonar_ft.errors import ConfigError, OutputDirError
from sonar_ft.files import atomic
from sonar_ft.run_files import (
    ADAPTER_DIR, BEST_ENCODER, CONFIG_FILE, LAST_STATE, LAST_STATE_SLOTS, METRICS_GLOB, STATE_SLOTS_FILE, PREDICTIONS_GLOB, RUN_FILES, RUN_SUMMARY, STEPS_FILE,
    TENSORBOARD_DIR, metrics_file,
)
from sonar_ft.training.state import EpochMetrics, TrainResult
from sonar_ft.training.state_mirror import restore_state

log = logging.getLogger(__name__)


# Settings that may change between a run and its resumption without making it another run: where and how
# often it saves and reports, and the memory settings a GPU needs (re-planned for whatever GPU a resume gets).
_RESUMABLE_CHANGES = {"output_dir", "epochs", "resume", "overwrite", "num_workers", "eval_every", "device", "early_stopping_patience",
                      "checkpoint_every_steps", "checkpoint_every_minutes", "gradient_checkpointing", "cache_features",
                      "cache_dtype", "compile", "loss_chunk_size", "decoder_dtype", "log_every_steps", "report_to", "progress",
                      "progress_seconds", "state_dir", "state_slots"}
# The micro-batch / accumulation split may change too, as long as the effective batch (their product) does not:
# every optimiser step sees the same clips (sonar_ft.data.dataset.LengthBucketSampler forms windows at the effective batch).
_SPLIT = ("batch_size", "grad_accum")


def check_inputs(cfg: TrainConfig) -> None:
    """Refuse a validation manifest that is the training manifest (same file or same content), unless allowed."""
    if cfg.eval_only or cfg.allow_train_as_val or not cfg.train_manifest or not cfg.val_manifest:
        return
    train_m, val_m = Path(cfg.train_manifest), Path(cfg.val_manifest)
    if not (train_m.is_file() and val_m.is_file()):
        return  # reading the split says what is missing
    same = train_m.resolve() == val_m.resolve() or (
        train_m.stat().st_size == val_m.stat().st_size and atomic.file_sha256(train_m, limit=None) == atomic.file_sha256(val_m, limit=None))
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
        restore_state(out, Path(cfg.state_dir) / LAST_STATE)
    stale = atomic.remove_stale_temps(out)
    if stale:
        log.info("removed %d half-written file(s) left in %s by a run that was stopped", len(stale), out)
    existing = [name for name in RUN_FILES if (out / name).exists()] + sorted(p.name for p in out.glob(METRICS_GLOB))
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
    removed = list(out.glob(METRICS_GLOB)) + list(out.glob(PREDICTIONS_GLOB))
    removed += [out / n for n in (*LAST_STATE_SLOTS, STATE_SLOTS_FILE, BEST_ENCODER, RUN_SUMMARY, STEPS_FILE) if (out / n).exists()]
    if last is not None and last != out / LAST_STATE:  # --state_dir: the local last.pt and best_encoder.pt
        removed += [p for p in (last, last.parent / BEST_ENCODER) if p.exists()]
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
    if cfg.overwrite or not (out / RUN_SUMMARY).is_file() or not (out / LAST_STATE).is_file() or not (out / CONFIG_FILE).is_file():
        return None
    try:
        summary = json.loads((out / RUN_SUMMARY).read_text(encoding="utf-8"))
        previous = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8")).get("settings", {})
    except (OSError, json.JSONDecodeError):
        return None
    if not summary.get("finished") or summary.get("epochs") != cfg.epochs or _changed_settings(previous, asdict(cfg)):
        return None
    history = []
    for epoch in range(1, cfg.epochs + 1):
        path = out / metrics_file(epoch)
        if path.is_file():
            history.append(EpochMetrics(**json.loads(path.read_text(encoding="utf-8"))))
    best = summary.get("best", {})
    return TrainResult(best_epoch=best.get("epoch"), best_score=best.get("score"), best_val_bleu=best.get("bleu"),
                       best_val_loss=best.get("loss"), history=history, stopped_early=bool(summary.get("stopped_early")),
                       output_dir=str(out), already_finished=True)


def write_run_summary(out: Path, cfg: TrainConfig, state: Any, stopped_early: bool) -> None:
    """``summary.json``: the run finished (all epochs, or stopped early) and its best evaluation."""
    atomic.write_json(out / RUN_SUMMARY, {"finished": True, "epochs": cfg.epochs, "epochs_run": state.epoch, "steps": state.step,
                                       "stopped_early": stopped_early, "select_metric": cfg.select_metric, "best": state.best})


def _changed_settings(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    # Settings added after a run was written count as unchanged while they hold their default.
    defaults = asdict(TrainConfig())
    keys = set(previous) | set(current)

    def value(settings: dict[str, Any], key: str) -> Any:
        return settings.get(key, defaults.get(key))

    changed = sorted(k for k in keys - {*_SPLIT} if k not in _RESUMABLE_CHANGES and value(previous, k) != value(current, k))
    effective = [value(s, "batch_size") * value(s, "grad_accum") for s in (previous, current)]
    if effective[0] != effective[1]:
        changed.append(f"effective batch (batch_size x grad_accum {effective[0]} -> {effective[1]})")
    return changed


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputDirError(f"cannot read {path}: {exc}. Delete it or pass --overwrite.") from None


