"""The best trial of a study as a full training run: its settings (``best_config.yaml``, a recipe ``--config``
file), its record (``best_hyperparameters.json``) and :func:`train_from_tuning`.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml
from optuna.trial import FrozenTrial

from sonar_ft.config import TrainConfig, config_from_sources, make_config
from sonar_ft.errors import ConfigError
from sonar_ft.training.recipe import fine_tune
from sonar_ft.training.state import EpochMetrics, TrainResult
from sonar_ft.tune.names import BEST_CONFIG_FILE, BEST_EPOCH, BEST_RUN_DIR, TRIAL_SETTINGS
from sonar_ft.tune.objective import trial_config
from sonar_ft.tune.settings import COMPARABILITY, TuneSettings
from sonar_ft.tune.space import TRAIN_FIELDS

log = logging.getLogger(__name__)


def final_config(settings: TuneSettings, params: Mapping[str, Any], *, ran: TrainConfig | None = None) -> TrainConfig:
    """The complete config of a full training run with ``params`` (what ``best_config.yaml`` holds).

    Built on ``ran`` (the settings the best trial ran with) when given, else on the study's fixed settings.
    All training clips (``subset_fraction`` / ``max_samples`` were tuning shortcuts), ``final_epochs``
    if set, checkpoints and predictions on, output in ``STUDY_DIR/best_run``.
    """
    values = {k: v for k, v in params.items() if k in TRAIN_FIELDS}
    cfg = make_config(values, base=ran or settings.train, source="best trial")
    return dataclasses.replace(
        cfg,
        output_dir=str(settings.study_dir / BEST_RUN_DIR),
        epochs=settings.final_epochs or cfg.epochs,
        subset_fraction=None,
        max_samples=None,
        save_checkpoints=True,
        write_predictions=True,
        overwrite=False,
        resume=False,
        eval_only=False,
        select_metric=settings.optimize,
    )


def trial_ran_with(trial: FrozenTrial, settings: TuneSettings) -> TrainConfig:
    """The recipe settings ``trial`` ran with (recorded on it); for trials of older versions, today's fixed settings."""
    recorded = trial.user_attrs.get(TRIAL_SETTINGS)
    if isinstance(recorded, Mapping):
        return TrainConfig(**{k: v for k, v in recorded.items() if k in TRAIN_FIELDS})
    log.info("trial %d does not record its settings (an older sonar-ft): describing it with this command's", trial.number)
    return trial_config(settings, trial.params, trial.number)


def best_record(best: FrozenTrial, settings: TuneSettings, storage: str, *, ran: TrainConfig) -> dict[str, Any]:
    """What ``best_hyperparameters.json`` holds: the trial, its value of the optimised metric, its parameters."""
    return {
        "study_name": settings.study_name,
        "storage": storage,
        "metric": f"val_{settings.optimize}",
        "direction": settings.direction,
        "value": best.value,
        "trial": best.number,
        "params": dict(best.params),
        "trial_settings": {k: getattr(ran, k) for k in COMPARABILITY},  # as the best trial ran, not this command's flags
        "best_epoch": best.user_attrs.get(BEST_EPOCH),
    }


def best_config_text(cfg: TrainConfig, settings: TuneSettings, best: FrozenTrial, storage: str, *, ran: TrainConfig | None = None) -> str:
    """``best_config.yaml``: a comment naming the trial, its score and what it ran with, then every recipe setting."""
    t = ran or settings.train
    data = f"{t.subset_fraction:.0%} of the training clips" if t.subset_fraction else "the training clips"
    if t.max_samples:
        data += f" (at most {t.max_samples} per split)"
    header = [
        f"# Best trial of Optuna study '{settings.study_name}' ({storage}): trial {best.number}, "
        f"val {settings.optimize} {best.value:.4f}",
        f"# (trials trained {t.epochs} epochs on {data}; this config trains {cfg.epochs} epochs on all of them).",
        f"# Run:  python train_sonar_finetuning.py --config {settings.study_dir / BEST_CONFIG_FILE}",
        f"#  or:  sonar-ft train-from-tuning --study_dir {settings.study_dir} --epochs 50 --output_dir runs/final",
    ]
    body = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body


def best_config_path(study_dir: str | Path) -> Path:
    """``STUDY_DIR/best_config.yaml``, or a clear error when the study has not produced one."""
    path = Path(study_dir) / BEST_CONFIG_FILE
    if not path.is_file():
        if not Path(study_dir).is_dir():
            raise ConfigError(f"--study_dir {study_dir} does not exist; run `sonar-ft tune --config tuning.yaml` first")
        raise ConfigError(
            f"--study_dir {study_dir} has no {BEST_CONFIG_FILE}: no trial of the study has completed yet "
            "(see trials.csv), or this is not a study folder"
        )
    return path


def train_from_tuning(study_dir: str | Path, overrides: Mapping[str, Any] | None = None,
                      on_evaluation: Callable[[EpochMetrics], None] | None = None) -> TrainResult:
    """Train with the best configuration of a study (``best_config.yaml``), ``overrides`` winning."""
    cfg = config_from_sources(dict(overrides or {}), best_config_path(study_dir))
    return fine_tune(cfg, on_evaluation=on_evaluation)
