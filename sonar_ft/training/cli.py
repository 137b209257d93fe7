"""``sonar-ft train``: the fine-tuning recipe's command line, generated from :class:`~sonar_ft.config.TrainConfig`.

``train_sonar_finetuning.py`` at the top of the repository is a thin entry point to :func:`main`, so
both take the same flags (every field of the settings, plus ``--config run.yaml``).

Quick test (the Colab seed's command)::

    sonar-ft train --encoder_checkpoint sonar_checkpoints/dm_70h_ub_sonar_encoder.pth \\
        --train_features features/train --train_manifest manifests/train.tsv \\
        --val_features features/val --val_manifest manifests/val.tsv \\
        --output_dir runs/quick_test --batch_size 8 --epochs 5 --learning_rate 1e-4 \\
        --freeze_decoder --eval_every 1 --device cuda --max_samples 50

Several GPUs (data-parallel; ``--batch_size`` is per process)::

    torchrun --nproc_per_node=4 train_sonar_finetuning.py ... --batch_size 8

No torch at import time: ``sonar-ft --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from sonar_ft.config import add_arguments, config_from_sources

DESCRIPTION = "Fine-tune the SONAR ASL encoder against the frozen SONAR text decoder (see README.md)."


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of settings (flag names as keys); command-line flags win over it")
    add_arguments(parser)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    # argument_default=SUPPRESS: only flags the user typed reach the config, so --config values
    # are not overwritten by parser defaults. The defaults live in TrainConfig.
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, argument_default=argparse.SUPPRESS)
    add_recipe_arguments(p)
    return p


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="fine-tune the encoder (the recipe; same flags as train_sonar_finetuning.py)",
                              description=DESCRIPTION, argument_default=argparse.SUPPRESS)
    add_recipe_arguments(p)
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    config_file = flags.pop("config", None)
    return run_recipe(flags, config_file)


def main(argv: Sequence[str] | None = None) -> int:
    """``train_sonar_finetuning.py``: parse, run, one summary; user errors are one line and exit code 2."""
    from sonar_ft.cli import join_negative_values, run, setup_logging

    setup_logging(sys.stdout)
    flags = vars(build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else argv)))
    config_file = flags.pop("config", None)
    return run(lambda _: run_recipe(flags, config_file), argparse.Namespace())


def run_recipe(flags: dict[str, Any], config_file: str | None) -> int:
    cfg = config_from_sources(flags, config_file)
    from sonar_ft.errors import ConfigError
    from sonar_ft.evaluate import evaluate_checkpoint
    from sonar_ft.run_files import BEST_ENCODER, TEST_RESULTS
    from sonar_ft.training.distributed import is_main_process, world_size_from_env
    from sonar_ft.training.recipe import fine_tune

    if cfg.eval_only:
        if world_size_from_env() > 1:
            raise ConfigError("--eval_only runs as one process: start it with python, not torchrun")
        record = evaluate_checkpoint(cfg)
        print(
            f"\n{record['num_samples']} clips | BLEU {record['bleu']:.2f} | chrF {record['chrf']:.2f} | "
            f"loss {record['loss']:.4f}\n{record['bleu_signature']}\nwritten: {cfg.output_dir}/{TEST_RESULTS}"
        )
        return 0

    result = fine_tune(cfg)
    if not is_main_process():
        return 0  # under torchrun, rank 0 prints the summary
    print("\n" + "=" * 72)
    if result.already_finished:
        print(f"{result.output_dir} already holds this run, finished: nothing was done "
              "(raise --epochs to continue it, or --overwrite to train it again)")
    if result.best_epoch is None:
        print("finished without an evaluation")
    else:
        print(
            f"best epoch {result.best_epoch}: val BLEU {result.best_val_bleu:.2f}, val loss {result.best_val_loss:.4f}"
            + (" (stopped early)" if result.stopped_early else "")
        )
        print(f"best encoder: {result.output_dir}/{BEST_ENCODER}")
    print(f"outputs: {result.output_dir}")
    return 0
