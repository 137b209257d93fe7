"""``sonar-ft tune`` and ``sonar-ft train-from-tuning``.

``sonar-ft tune --config configs/tuning/default.yaml [--n_trials 50] [--storage URL] [--learning_rate ...]``
runs (or resumes, or joins) an Optuna study; ``sonar-ft train-from-tuning --study_dir DIR --epochs 50
--output_dir runs/final`` trains with the study's best settings. Every recipe flag is accepted as an
override, with the recipe's names.
"""

from __future__ import annotations

import argparse
from typing import Any

from sonar_ft.config import add_arguments
from sonar_ft.tune.settings import add_arguments as add_tune_arguments


def _add_recipe_flags(parser: argparse.ArgumentParser, title: str) -> None:
    """Every :class:`~sonar_ft.config.TrainConfig` field as ``--name VALUE`` (generated; typed by ``sonar_ft.config``)."""
    add_arguments(parser, title=title)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tune",
        help="Optuna search over the fine-tuning settings (resumable, prunable, parallel)",
        description="Run, resume or join an Optuna study over the recipe's settings (see docs/tuning.md). "
        "Re-running the same command resumes the study; several workers on one --storage share it.",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", help="tuning YAML (e.g. configs/tuning/default.yaml); flags win over it")
    add_tune_arguments(p)
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    _add_recipe_flags(p, "recipe settings fixed for every trial; --output_dir is the study folder")
    p.set_defaults(func=_cmd_tune)

    f = subparsers.add_parser(
        "train-from-tuning",
        help="train with a study's best settings (its best_config.yaml), overrides allowed",
        argument_default=argparse.SUPPRESS,
    )
    f.add_argument("--study_dir", "--study-dir", required=True, help="the study folder (holds best_config.yaml)")
    _add_recipe_flags(f, "recipe settings overriding best_config.yaml")
    f.set_defaults(func=_cmd_train_from_tuning)


def _cmd_tune(args: argparse.Namespace) -> int:
    from sonar_ft.tune.names import BEST_CONFIG_FILE, TRIALS_CSV
    from sonar_ft.tune.settings import load_settings
    from sonar_ft.tune.study import run_study

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "no_progress")}
    settings = load_settings(getattr(args, "config", None), flags)
    report = run_study(settings, progress=not getattr(args, "no_progress", False))
    counts = ", ".join(f"{n} {state}" for state, n in report.counts.items() if n)
    print(f"\nstudy {report.study_name!r} ({report.storage}): {counts or 'no trials'}; this worker ran {report.ran_here}")
    if report.best_trial is not None:
        params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in report.best_params.items())
        print(f"best: trial {report.best_trial}, val {settings.optimize} {report.best_value:.4f} | {params}")
        print(f"final training: sonar-ft train-from-tuning --study_dir {report.study_dir} --epochs 50 "
              f"(or python train_sonar_finetuning.py --config {report.study_dir / BEST_CONFIG_FILE})")
    print(f"outputs: {report.study_dir} (trials: {report.study_dir / TRIALS_CSV})")
    return 0


def _cmd_train_from_tuning(args: argparse.Namespace) -> int:
    from sonar_ft.tune.best import best_config_path, train_from_tuning
    from sonar_ft.run_files import BEST_ENCODER

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command", "study_dir")}
    path = best_config_path(args.study_dir)
    header = path.read_text(encoding="utf-8").splitlines()[0]
    print(f"training with {path}: {header.lstrip('# ')}")
    result = train_from_tuning(args.study_dir, flags)
    print("\n" + "=" * 72)
    if result.best_epoch is None:
        print("finished without an evaluation")
    else:
        print(f"best epoch {result.best_epoch}: val BLEU {result.best_val_bleu:.2f}, val loss {result.best_val_loss:.4f}"
              + (" (stopped early)" if result.stopped_early else ""))
        print(f"best encoder: {result.output_dir}/{BEST_ENCODER}")
    print(f"outputs: {result.output_dir}")
    return 0
