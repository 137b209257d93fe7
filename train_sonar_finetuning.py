#!/usr/bin/env python
"""Fine-tune the SONAR ASL encoder on How2Sign against the frozen SONAR text decoder.

A thin entry point to ``sonar-ft train`` (:mod:`sonar_ft.train_cli`): the same flags, generated
from :class:`sonar_ft.config.TrainConfig`; the loop is :class:`sonar_ft.recipe.FineTuneRecipe`.
Everything the run used is written to ``--output_dir/config.json``.

Quick test (the Colab seed's command, unchanged)::

    python train_sonar_finetuning.py --encoder_checkpoint sonar_checkpoints/dm_70h_ub_sonar_encoder.pth \\
        --train_features features/train --train_manifest manifests/train.tsv \\
        --val_features features/val --val_manifest manifests/val.tsv \\
        --output_dir runs/quick_test --batch_size 8 --epochs 5 --learning_rate 1e-4 \\
        --freeze_decoder --eval_every 1 --device cuda --max_samples 50

Several GPUs (data-parallel; ``--batch_size`` is per process)::

    torchrun --nproc_per_node=4 train_sonar_finetuning.py ... --batch_size 8
"""

from __future__ import annotations

import sys

from sonar_ft.train_cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
