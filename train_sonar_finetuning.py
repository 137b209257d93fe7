#!/usr/bin/env python
"""Fine-tune the SONAR ASL encoder on How2Sign against the frozen SONAR text decoder.

A thin entry point to ``sonar-ft train`` (:mod:`sonar_ft.training.cli`): the same flags, generated
from :class:`sonar_ft.config.TrainConfig`; the loop is :class:`sonar_ft.training.recipe.FineTuneRecipe`.
Everything the run used is written to ``--output_dir/config.json``.

Flags and examples: ``python train_sonar_finetuning.py --help`` and :mod:`sonar_ft.training.cli`.
"""

from __future__ import annotations

import sys

from sonar_ft.training.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
