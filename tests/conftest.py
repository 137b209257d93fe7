"""Shared fixtures: a tiny offline demo (corpus, SONAR-architecture text decoder, SignT5 encoder).

Built once per test session with the project's own builder, small enough to take seconds.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from sonar_ft.config import command_line
from sonar_ft.demo.build import DemoConfig, SourceDomain, build_demo
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
    source=None,  # a random starting encoder: tests of the loop need no pretraining (pretrained_demo adds one)
)
TINY_SOURCE = SourceDomain(n_train=96, n_val=16, epochs=6, batch_size=8, learning_rate=3e-3)
PRETRAINED_DEMO = dataclasses.replace(TINY_DEMO, source=TINY_SOURCE)


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


@pytest.fixture(scope="session")
def pretrained_demo(tiny_demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    """The tiny demo with a starting encoder pretrained on the shifted source domain (read-only for tests).

    Built on a copy of ``tiny_demo``: only the starting encoder's stage runs (corpus and text models are reused).
    """
    root = tmp_path_factory.mktemp("pretrained_demo")
    shutil.copytree(tiny_demo.root, root, dirs_exist_ok=True)
    return build_demo(root, PRETRAINED_DEMO)


def private_copy(demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory, name: str) -> DemoPaths:
    """A writable copy of a shared demo's data and assets (the shared fixtures stay read-only)."""
    root = tmp_path_factory.mktemp(name)
    for part in ("data", "assets"):
        shutil.copytree(demo.root / part, root / part)
    return DemoPaths(root)


def recipe_args(demo: DemoPaths, output_dir: Path, *extra: str) -> list[str]:
    """The Colab quick-test command line with the demo's paths."""
    return [*command_line({**demo.recipe_settings(output_dir), "device": "cpu", "beam_size": 2}), *extra]
