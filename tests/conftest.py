"""Shared fixtures: a tiny offline demo (corpus, SONAR-architecture text decoder, SignT5 encoder).

Built once per test session with the project's own builder, small enough to take seconds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from sonar_ft.demo.build import DemoConfig, build_demo
from sonar_ft.demo.paths import DemoPaths
from sonar_ft.demo.text_models import TextModelConfig

TINY_DEMO = DemoConfig(
    n_train=96,
    n_val=16,
    n_test=16,
    feature_dim=24,
    text=TextModelConfig(steps=600),
    encoder_d_model=32,
    encoder_d_kv=8,
    encoder_d_ff=48,
    encoder_layers=1,
    source=None,  # a random starting encoder: tests of the loop need no pretraining (test_lora builds a pretrained one)
)


@pytest.fixture
def npy_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts every .npy read from now on, by ``(file name, "data" | "header")`` (header: memory-mapped)."""
    from sonar_ft.data import features as features_mod

    reads: Counter = Counter()
    real = features_mod._read_npy

    def counted(path: Path, mmap: bool):
        reads[(path.name, "header" if mmap else "data")] += 1
        return real(path, mmap)

    monkeypatch.setattr(features_mod, "_read_npy", counted)
    return reads


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    """A tiny demo build (read-only for tests: copy what you need to modify)."""
    torch.set_num_threads(2)
    return build_demo(tmp_path_factory.mktemp("tiny_demo"), TINY_DEMO)


def recipe_args(demo: DemoPaths, output_dir: Path, *extra: str) -> list[str]:
    """The Colab quick-test command line with the demo's paths."""
    return [
        "--encoder_checkpoint", str(demo.encoder_checkpoint),
        "--train_features", str(demo.split_features("train")),
        "--train_manifest", str(demo.split_manifest("train")),
        "--val_features", str(demo.split_features("val")),
        "--val_manifest", str(demo.split_manifest("val")),
        "--output_dir", str(output_dir),
        "--decoder", str(demo.decoder_card),
        "--device", "cpu",
        "--beam_size", "2",
        *extra,
    ]
