"""A study end to end: open (or resume, or join) it in its storage, run trials until it holds ``n_trials``,
and write what it leaves in its folder.

A study is configured by one YAML file (``configs/tuning/*.yaml``, read by :mod:`sonar_ft.tune.settings`):
tuning keys next to fixed recipe settings. Parallel and resumable by construction: the study lives in a
storage (:mod:`sonar_ft.tune.storage`), ``n_trials`` is the size of the *study* (not of one command), so
re-running the command resumes it and several workers on one storage share the budget. A worker that dies
mid-trial stops sending heartbeats; the next worker marks its trial failed and, by default, re-queues the
same parameters. What one trial does is :mod:`sonar_ft.tune.objective`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from sonar_ft.data.splits import load_split
from sonar_ft.errors import CheckpointError, ConfigError, SonarFtError
from sonar_ft.files import atomic
from sonar_ft.tune import report as tune_report
from sonar_ft.tune.best import best_config_text, best_record, final_config, trial_ran_with
from sonar_ft.tune.console import logging_through, optuna_verbosity, progress_bar, quiet_optuna_warnings, quiet_training
from sonar_ft.tune.names import (
    BEST_CONFIG_FILE,
    BEST_PARAMS_FILE,
    EPOCHS_RUN,
    FAIL_KIND,
    FAIL_REASON,
    METRIC_ATTR,
    PLOTS_DIR,
    PRUNED_AT_EPOCH,
    SETTINGS_ATTR,
    SPACE_ATTR,
    SUMMARY_FILE,
    TRIALS_CSV,
)
from sonar_ft.tune.objective import TrialFailed, is_finished, make_objective
from sonar_ft.tune.sampling import build_pruner, build_sampler, grid_size
from sonar_ft.tune.settings import COMPARABILITY, TuneSettings
from sonar_ft.tune.space import describe_space_change, space_record
from sonar_ft.tune.storage import describe_storage, fail_stale_trials, make_storage

log = logging.getLogger(__name__)


def open_storage(settings: TuneSettings) -> optuna.storages.BaseStorage:
    """The study's storage as ``settings`` configure it (heartbeats, retries, time-outs)."""
    return make_storage(
        settings.storage, settings.study_dir, timeout=settings.storage_timeout, heartbeat_interval=settings.heartbeat_interval,
        grace_period=settings.grace_period, retry_stale_trials=settings.retry_stale_trials,
    )


def open_study(settings: TuneSettings, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (resume / another worker), checking it still matches.

    A study created with another search space or metric is refused with a message saying what
    changed and how to proceed; Optuna's own error would come later, mid-trial, and name a distribution.
    """
    storage = storage if storage is not None else open_storage(settings)
    with quiet_optuna_warnings(), optuna_verbosity(optuna.logging.WARNING):
        study = optuna.create_study(
            study_name=settings.study_name,
            storage=storage,
            sampler=build_sampler(settings),
            pruner=build_pruner(settings),
            direction=settings.direction,
            load_if_exists=True,
        )
    shown = describe_storage(settings.storage, settings.study_dir)
    created_for = study.user_attrs.get(METRIC_ATTR)
    if created_for is None and study.direction.name.lower() != settings.direction:  # a study of an older sonar-ft
        created_for = f"a metric to {study.direction.name.lower()}"
    if created_for is not None and created_for != settings.optimize:
        raise ConfigError(
            f"study {settings.study_name!r} in {shown} optimises {created_for}; this command asks for val "
            f"{settings.optimize} (optimize: {settings.optimize}), whose values cannot be ranked with its trials'. "
            "Use another --study_name, or the study's own --optimize"
        )
    if created_for is None:
        study.set_user_attr(METRIC_ATTR, settings.optimize)
    wanted = space_record(settings.space)
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        _check_existing_distributions(study, settings, shown)
        study.set_user_attr(SPACE_ATTR, wanted)
    elif stored != wanted:
        raise ConfigError(
            f"the search space of study {settings.study_name!r} in {shown} has changed since it was created "
            f"({describe_space_change(stored, wanted)}). Its trials cannot be mixed with the new space: use another "
            f"--study_name (or --output_dir for the default storage), put the original search_space back, or delete the "
            f"study (optuna delete-study --study-name {settings.study_name} --storage {shown})"
        )
    current = {k: getattr(settings.train, k) for k in COMPARABILITY}
    previous = study.user_attrs.get(SETTINGS_ATTR)
    if previous is None:
        study.set_user_attr(SETTINGS_ATTR, current)
    else:
        changed = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
        if changed:
            log.warning(
                "study %r ran earlier trials with %s: their values are not directly comparable with this worker's",
                settings.study_name, ", ".join(f"{k}={old} (now {new})" for k, (old, new) in changed.items()),
            )
    return study


def _check_existing_distributions(study: optuna.Study, settings: TuneSettings, shown: str) -> None:
    # A study created outside sonar-ft (or by an older version) has no recorded space: compare its trials.
    specs = {s.name: s.distribution() for s in settings.space}
    for trial in study.get_trials(deepcopy=False):
        for name, dist in trial.distributions.items():
            if name in specs and specs[name] != dist:
                raise ConfigError(
                    f"study {settings.study_name!r} in {shown} sampled {name} from {dist} (trial {trial.number}), but "
                    f"search_space.{name} is now {specs[name]}. Use another --study_name or restore the original range"
                )


@dataclass
class StudyReport:
    """What one ``run_study`` call did and where the study stands."""

    study_name: str
    storage: str
    study_dir: Path
    n_trials: int
    counts: dict[str, int]
    ran_here: int
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    outputs: dict[str, Path]


def worker_id() -> str:
    """``host:pid`` of this process (recorded on every trial it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def preflight(settings: TuneSettings) -> None:
    """Check data and starting encoder once, so a wrong path stops the study before any trial."""
    cfg = settings.train
    load_split(cfg.train_features, cfg.train_manifest, cfg=cfg, split="training", fraction=cfg.subset_fraction)
    load_split(cfg.val_features, cfg.val_manifest, cfg=cfg, split="validation")
    if not Path(cfg.encoder_checkpoint).is_file():
        # Only its presence: loading 818M parameters here would slow every worker's start; train() names a bad file.
        raise CheckpointError(f"--encoder_checkpoint not found: {cfg.encoder_checkpoint}")


def study_progress(study: optuna.Study) -> tuple[int, int, int]:
    """(finished trials that count, trials running, trials queued) of a study."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(1 for t in trials if is_finished(t))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return finished, running, waiting


def run_study(settings: TuneSettings, *, progress: bool = True) -> StudyReport:
    """Run (or resume, or join) the study until it holds ``n_trials`` trials; write its outputs; report."""
    preflight(settings)
    settings.study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings)
    shown = describe_storage(settings.storage, settings.study_dir)
    worker = worker_id()
    target = settings.n_trials
    if settings.sampler["type"] == "grid" and grid_size(settings) < target:
        log.info("the grid has %d points: the study stops after them (n_trials %d)", grid_size(settings), target)
        target = grid_size(settings)
    fail_stale_trials(study)
    finished, running, waiting = study_progress(study)
    # Queued trials (re-runs of dead workers' trials, enqueued points) are this worker's to take.
    remaining = target - finished - running
    log.info(
        "study %r (%s): %d of %d trials done, %d running, %d queued; this worker (%s) %s",
        settings.study_name, shown, finished, target, running, waiting, worker,
        f"runs up to {remaining}" if remaining > 0 else "has nothing to run",
    )
    if remaining <= 0 and running:
        log.info("%d trial(s) still marked running by other workers; if a worker died, its trial is declared dead %ss "
                 "after its last heartbeat and re-run by the next `sonar-ft tune` started after that",
                 running, settings.grace_period or 2 * settings.heartbeat_interval)

    ran_here = 0
    lock = threading.Lock()
    consecutive_failures: list[str] = []
    stopped_for_failures = False
    bar = progress_bar(total=target, initial=min(finished, target), desc=f"study {settings.study_name}", unit="trial", disable=not progress)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran_here, stopped_for_failures
        with lock:
            ran_here += 1
            log.info(trial_line(study, trial, settings))
            if trial.state == TrialState.FAIL and trial.user_attrs.get(FAIL_KIND) == "trial":
                consecutive_failures.append(trial.user_attrs.get(FAIL_REASON, "?"))
            elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                consecutive_failures.clear()
            done, running, _ = study_progress(study)
            bar.n = min(done, target)
            bar.refresh()
            if settings.max_consecutive_failures and len(consecutive_failures) >= settings.max_consecutive_failures:
                stopped_for_failures = True
                study.stop()
            if done + running >= target:
                study.stop()

    try:
        if remaining > 0:
            with quiet_training(settings.verbose), quiet_optuna_warnings(), logging_through(bar):
                study.optimize(
                    make_objective(settings, worker),
                    n_trials=remaining,
                    timeout=settings.timeout,
                    n_jobs=min(settings.n_jobs, remaining),
                    catch=(TrialFailed,),
                    callbacks=[after_trial],
                    gc_after_trial=True,
                )
    finally:
        bar.close()
        outputs = write_study_outputs(study, settings) if study.get_trials(deepcopy=False) else {}
    if stopped_for_failures:
        raise SonarFtError(
            f"{len(consecutive_failures)} trials in a row failed (last: {consecutive_failures[-1]}); this worker stopped. "
            f"See {settings.study_dir / TRIALS_CSV} and fix the settings or the search space"
        )
    best = _best_trial(study)
    counts = {state.name.lower(): 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] += 1
    return StudyReport(
        study_name=settings.study_name, storage=shown, study_dir=settings.study_dir, n_trials=target, counts=counts,
        ran_here=ran_here, best_trial=best.number if best else None, best_value=best.value if best else None,
        best_params=dict(best.params) if best else {}, outputs=outputs,
    )


def trial_line(study: optuna.Study, trial: FrozenTrial, settings: TuneSettings) -> str:
    """One log line per finished / pruned / failed trial."""
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    metric = f"val {settings.optimize}"
    if trial.state == TrialState.COMPLETE:
        best = _best_trial(study)
        best_text = f" | best {best.value:.4g} (trial {best.number})" if best else ""
        epochs = trial.user_attrs.get(EPOCHS_RUN, "?")
        return f"trial {trial.number} finished: {metric} {trial.value:.4g} after {epochs} epochs, {seconds:.0f}s{best_text} | {params}"
    if trial.state == TrialState.PRUNED:
        last = trial.intermediate_values.get(max(trial.intermediate_values)) if trial.intermediate_values else None
        at = trial.user_attrs.get(PRUNED_AT_EPOCH, max(trial.intermediate_values, default="?"))
        last_text = f" ({metric} {last:.4g})" if last is not None else ""
        return f"trial {trial.number} pruned at epoch {at}{last_text}, {seconds:.0f}s | {params}"
    reason = trial.user_attrs.get(FAIL_REASON, "worker stopped mid-trial")
    return f"trial {trial.number} failed: {reason} | {params}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def write_study_outputs(study: optuna.Study, settings: TuneSettings) -> dict[str, Path]:
    """Write ``trials.csv``, ``study_summary.json``, the best-trial files and the plots; return their paths."""
    out = settings.study_dir
    shown = describe_storage(settings.storage, out)
    trials = study.get_trials(deepcopy=False)
    written: dict[str, Path] = {}
    names = [s.name for s in settings.space]
    written["trials_csv"] = tune_report.write_trials_csv(out / TRIALS_CSV, trials, names)
    best = _best_trial(study)
    summary = tune_report.study_summary(
        study, trials, best,
        storage=shown, metric=settings.optimize, n_trials=settings.n_trials, epochs=settings.train.epochs,
        space=space_record(settings.space), sampler=settings.sampler, pruner=settings.pruner,
        fixed=dataclasses.asdict(settings.train), compared=COMPARABILITY,
    )
    written["summary"] = out / SUMMARY_FILE
    atomic.write_json(written["summary"], summary)
    if best is not None:
        ran = trial_ran_with(best, settings)
        cfg = final_config(settings, best.params, ran=ran)
        written["best_hyperparameters"] = out / BEST_PARAMS_FILE
        atomic.write_json(written["best_hyperparameters"], best_record(best, settings, shown, ran=ran))
        written["best_config"] = out / BEST_CONFIG_FILE
        atomic.write_text(written["best_config"], best_config_text(cfg, settings, best, shown, ran=ran))
    else:
        log.info("no trial has completed yet: %s and %s are written once one does", BEST_PARAMS_FILE, BEST_CONFIG_FILE)
    if settings.plots:
        for name, paths in tune_report.write_plots(study, out / PLOTS_DIR, metric=f"val {settings.optimize}").items():
            for path in paths:
                written[f"{name}{path.suffix}"] = path
    return written
