"""The objective of a study: one trial is the recipe (:func:`sonar_ft.training.recipe.fine_tune`) with the
sampled settings, in a lighter mode and its own folder; every evaluation's value of the optimised metric is
reported to Optuna, which may prune the trial there.

Failures inside a trial (NaN loss, GPU out of memory, a setting the recipe refuses) are recorded on the
trial (user attribute ``fail_reason``) and the study goes on; problems that would fail every trial
(missing data, unreadable checkpoint) stop the study with the usual one-line error.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from sonar_ft.config import TrainConfig, make_config
from sonar_ft.errors import CheckpointError, DataError, OutputDirError, SonarFtError
from sonar_ft.files import atomic
from sonar_ft.run_files import LAST_STATE
from sonar_ft.training.recipe import fine_tune
from sonar_ft.training.state import EpochMetrics
from sonar_ft.tune.names import (
    BEST_EPOCH,
    EPOCHS_RUN,
    FAIL_KIND,
    FAIL_REASON,
    PRUNED_AT_EPOCH,
    RETRY_OF,
    TRIAL_DIR_ATTR,
    TRIAL_ERROR_FILE,
    TRIAL_SETTINGS,
    TRIALS_DIR,
    WORKER,
)
from sonar_ft.tune.settings import TuneSettings
from sonar_ft.tune.space import TRAIN_FIELDS, suggest


class TrialFailed(Exception):
    """A trial that failed because of its settings (NaN, out of memory...); the study goes on."""


def trial_dir(settings: TuneSettings, number: int) -> Path:
    """``STUDY_DIR/trials/trial_NNNN``: the recipe's run folder of trial ``number``."""
    return settings.study_dir / TRIALS_DIR / f"trial_{number:04d}"


def trial_config(settings: TuneSettings, params: Mapping[str, Any], number: int) -> TrainConfig:
    """The recipe config of trial ``number``: fixed settings + sampled ones, light mode, own folder."""
    values = {k: v for k, v in params.items() if k in TRAIN_FIELDS}
    cfg = make_config(values, base=settings.train, source=f"trial {number}")
    return dataclasses.replace(
        cfg,
        output_dir=str(trial_dir(settings, number)),
        save_checkpoints=settings.save_trial_encoders,
        write_predictions=False,
        overwrite=True,
        resume=False,
        eval_only=False,
        select_metric=settings.optimize,
    )


def counts_towards_budget(trial: FrozenTrial) -> bool:
    """Whether a trial uses one of the study's ``n_trials``: done, pruned, failed by its settings, or under way.

    Trials of a worker that died (heartbeat lost), was interrupted, or that started after the study was
    already full do not count, so re-running the command runs them again.
    """
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get(FAIL_KIND) == "trial"


def is_finished(trial: FrozenTrial) -> bool:
    """Whether a trial counts towards ``n_trials`` and is over (not running or queued)."""
    return counts_towards_budget(trial) and trial.state not in (TrialState.RUNNING, TrialState.WAITING)


def failure_reason(exc: BaseException) -> str:
    """One line saying why a trial failed (project errors as they are, others with their type)."""
    import torch

    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory: " + (first or "CUDA out of memory")
    if isinstance(exc, (SonarFtError, TrialFailed)):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def metric_of(metrics: EpochMetrics, optimize: str) -> float | None:
    """The value of the metric ``optimize`` (one of :data:`sonar_ft.scores.METRICS`) in an epoch's record."""
    return getattr(metrics, f"val_{optimize}")


def make_objective(settings: TuneSettings, worker: str) -> Callable[[optuna.Trial], float]:
    """The objective: sample, train with the recipe's ``train``, report each evaluation, prune, return the best."""
    import torch

    # The trials of this worker read the same clips: the first one's bad-clip scan (and feature cache,
    # with cache_features) serves the others, which then read no feature file again.
    datasets: dict[tuple, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr(WORKER, worker if settings.n_jobs == 1 else f"{worker}/{threading.current_thread().name}")
        study = trial.study
        ahead = sum(1 for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts_towards_budget(t))
        if ahead >= settings.n_trials:
            # Another worker took the last slot between our check and our ask: do not overfill the study.
            _fail(trial, "surplus", f"the study already had its {settings.n_trials} trials when this worker started one")
            study.stop()
            raise TrialFailed("surplus trial")
        params = suggest(trial, settings.space)
        folder = trial_dir(settings, trial.number)
        trial.set_user_attr(TRIAL_DIR_ATTR, str(folder))

        def on_evaluation(metrics: EpochMetrics) -> None:
            trial.set_user_attr(EPOCHS_RUN, metrics.epoch)
            value = metric_of(metrics, settings.optimize)
            if value is None or not math.isfinite(value):
                raise TrialFailed(f"validation {settings.optimize} is {value} at epoch {metrics.epoch} (training diverged)")
            trial.report(value, metrics.epoch)
            # A trial at its final epoch has spent its whole budget: it completes, whatever the pruner says.
            if metrics.epoch < cfg.epochs and trial.should_prune():
                trial.set_user_attr(PRUNED_AT_EPOCH, metrics.epoch)
                raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}: val {settings.optimize} {value:.4g}")

        try:
            cfg = trial_config(settings, params, trial.number)
            # What this trial ran with: the study's records describe it from this, never from a later command's flags.
            trial.set_user_attr(TRIAL_SETTINGS, dataclasses.asdict(cfg))
            cfg.validate()
            result = fine_tune(cfg, on_evaluation=on_evaluation, reuse_data=datasets)
        except optuna.TrialPruned:
            raise
        except (DataError, CheckpointError, OutputDirError) as exc:
            # Wrong for every trial (data, checkpoint, folder): stop the study with the usual one-line error.
            _fail(trial, "aborted", failure_reason(exc))
            raise
        except KeyboardInterrupt:
            _fail(trial, "interrupted", "interrupted (Ctrl-C); its parameters are queued and run again when the command is re-run")
            requeue(trial)
            raise
        except Exception as exc:
            # NaN / Inf, out of memory, a setting the recipe refuses, or anything else these settings ran into:
            # recorded on the trial (traceback in its folder) and the study goes on. A bug that fails every
            # trial is stopped by max_consecutive_failures.
            reason = failure_reason(exc)
            _fail(trial, "trial", reason)
            if not isinstance(exc, (TrialFailed, SonarFtError)):
                atomic.write_text(folder / TRIAL_ERROR_FILE, traceback.format_exc())
            raise TrialFailed(reason) from None
        finally:
            _after_trial(folder, settings, device_is_cuda=torch.cuda.is_available())
        trial.set_user_attr(EPOCHS_RUN, len(result.history))
        if result.best_score is None or not math.isfinite(result.best_score):
            _fail(trial, "trial", f"no finite validation {settings.optimize} (best {result.best_score})")
            raise TrialFailed(f"no finite validation {settings.optimize}")
        trial.set_user_attr(BEST_EPOCH, result.best_epoch)
        return float(result.best_score)

    return objective


def requeue(trial: optuna.Trial) -> None:
    """Queue ``trial``'s parameters as a new trial, as Optuna does for a dead worker's (``retry_of`` in trials.csv)."""
    trial.study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=dict(trial.params), distributions=dict(trial.distributions),
        system_attrs={RETRY_OF: trial.number},
    ))


def _fail(trial: optuna.Trial, kind: str, reason: str) -> None:
    trial.set_user_attr(FAIL_KIND, kind)
    trial.set_user_attr(FAIL_REASON, reason)


def _after_trial(folder: Path, settings: TuneSettings, *, device_is_cuda: bool) -> None:
    if settings.save_trial_encoders:
        (folder / LAST_STATE).unlink(missing_ok=True)  # the resumable state is only useful to the recipe
    if device_is_cuda:
        import torch

        torch.cuda.empty_cache()  # a trial that ran out of memory must not starve the next one
