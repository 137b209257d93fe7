"""A small, breakable copy of the tiny demo (8 training, 4 validation clips) for tests that
corrupt inputs or run short trainings; see tests/training/test_bad_inputs.py and tests/training/test_reliability.py."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sonar_ft.data import read_manifest, write_manifest
from sonar_ft.config import TrainConfig, command_line

N_TRAIN, N_VAL = 8, 4
FAST = {"epochs": 1, "batch_size": 4, "max_gen_len": 16, "beam_size": 2, "device": "cpu"}


@dataclass
class Data:
    """Paths of the copy, and the demo whose encoder / decoder it trains with."""

    root: Path
    demo: object

    def features(self, split: str) -> Path:
        return self.root / "features" / split

    def manifest(self, split: str) -> Path:
        return self.root / f"{split}.tsv"

    def ids(self, split: str) -> list[str]:
        return [r.id for r in read_manifest(self.manifest(split))]

    def npy(self, split: str, index: int) -> Path:
        return self.features(split) / f"{self.ids(split)[index]}.npy"

    def settings(self, out: Path) -> dict[str, object]:
        """The recipe's settings on this copy, with the fast test values."""
        return {
            "encoder_checkpoint": str(self.demo.encoder_checkpoint), "decoder": str(self.demo.decoder_card),
            "train_features": str(self.features("train")), "train_manifest": str(self.manifest("train")),
            "val_features": str(self.features("val")), "val_manifest": str(self.manifest("val")),
            "output_dir": str(out), **FAST,
        }

    def recipe_args(self, out: Path, *extra: str) -> list[str]:
        return [*command_line(self.settings(out)), *extra]

    def config(self, out: Path, **changes) -> TrainConfig:
        return TrainConfig(**{**self.settings(out), **changes})


def make_data(demo, root: Path) -> Data:
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        rows = read_manifest(demo.split_manifest(split))[:n]
        folder = root / "features" / split
        folder.mkdir(parents=True)
        for row in rows:
            shutil.copy(demo.split_features(split) / f"{row.id}.npy", folder)
        write_manifest(root / f"{split}.tsv", rows)
    return Data(root, demo)


def save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save must not add its own suffix
        np.save(f, arr)
