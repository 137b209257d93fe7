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
    t = p.add_argument_group("study")
    t.add_argument("--study_name", help="name of the study in the storage (default sonar-ft)")
    t.add_argument("--storage", help="SQLAlchemy URL (postgresql://user@host/db), SQLite file (*.db), journal file "
                   "(journal:PATH or *.log); default: OUTPUT_DIR/study.db")
    t.add_argument("--storage_timeout", type=float, help="seconds to wait for the database server to connect / answer (default 30)")
    t.add_argument("--n_trials", type=int, help="trials the study should hold in total (default 20)")
    t.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    t.add_argument("--n_jobs", type=int, help="parallel trials in this process (default 1)")
    t.add_argument("--optimize", choices=["bleu", "loss"], help="maximise val BLEU or minimise val loss (default bleu)")
    t.add_argument("--sampler", choices=["tpe", "random", "grid"], help="sampler (default tpe)")
    t.add_argument("--sampler_seed", type=int, help="sampler seed (each trial draws from a seed mixed from it and its number)")
    t.add_argument("--pruner", choices=["median", "hyperband", "none"], help="pruner (default median)")
    t.add_argument("--heartbeat_interval", type=int, help="seconds between heartbeats of a running trial; 0 = off (default 60)")
    t.add_argument("--grace_period", type=int, help="seconds without heartbeat before a trial is declared dead (default 2x interval)")
    t.add_argument("--retry_stale_trials", type=int, help="re-queue a dead worker's trial up to N times (default 1; 0 = no)")
    t.add_argument("--save_trial_encoders", nargs="?", const=True, type=_bool, help="keep each trial's best_encoder.pt")
    t.add_argument("--final_epochs", type=int, help="epochs written into best_config.yaml (default: the trials' epochs)")
    t.add_argument("--max_consecutive_failures", type=int, help="stop after N failed trials in a row; 0 = never (default 5)")
    t.add_argument("--plots", type=_bool, help="write the HTML/PNG plots (default true)")
    t.add_argument("--verbose", action="store_true", help="keep the training loop's per-epoch log lines")
    t.add_argument("--no_progress", action="store_true", help="no progress bar")
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


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _cmd_tune(args: argparse.Namespace) -> int:
    from sonar_ft.tune.study import BEST_CONFIG_FILE, TRIALS_CSV, load_settings, run_study

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
    from sonar_ft.tune.study import best_config_path, train_from_tuning
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
