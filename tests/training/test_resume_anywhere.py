"""A run's result does not depend on its memory settings or on when it saves: the micro-batch x accumulation
split may change on resume (another GPU), and a run stopped after any time-based save of ``last.pt`` ends
exactly like the uninterrupted one. The clock of time-based saves is injected, so the tests are deterministic.

Dropout is off here: its random masks are drawn per micro-batch shape, so with dropout two splits differ by
noise of the same distribution, not by a rule the test could state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sonar_ft.demo.build import build_demo
from sonar_ft.errors import OutputDirError
from sonar_ft.files.atomic import load_torch
from sonar_ft.run_files import BEST_ENCODER, LAST_STATE
from sonar_ft.training.recipe import FineTuneRecipe, fine_tune
from tests.numerics import assert_close_to_scale
from tests.small_data import Data
from tests.training.test_loop import MICRO_DEMO

EPOCHS = 2
COMPARED = ("epoch", "train_loss", "val_loss", "val_bleu", "lr")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    torch.set_num_threads(2)
    demo = build_demo(tmp_path_factory.mktemp("resume_anywhere_demo"), MICRO_DEMO)
    return Data(demo.root, demo)  # the demo's own 32 training clips: four windows of 8 per epoch


def _config(data: Data, out: Path, **changes):
    base = dict(encoder_checkpoint=str(data.demo.encoder_checkpoint), decoder=str(data.demo.decoder_card),
                train_features=str(data.demo.split_features("train")), train_manifest=str(data.demo.split_manifest("train")),
                val_features=str(data.demo.split_features("val")), val_manifest=str(data.demo.split_manifest("val")),
                output_dir=str(out), epochs=EPOCHS, batch_size=8, max_gen_len=16, beam_size=2, device="cpu", dropout=0.0,
                learning_rate=1e-3, seed=3, log_every_steps=0, report_to="", progress="none")
    from sonar_ft.config import TrainConfig

    return TrainConfig(**{**base, **changes})


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads((out / f"metrics_epoch{e}.json").read_text()) for e in range(1, EPOCHS + 1)]
    return [{k: r[k] for k in COMPARED} for r in rows]


def _assert_same_run(ours: Path, reference: Path, *, exact: bool) -> None:
    a, b = _metrics(ours), _metrics(reference)
    if exact:
        assert a == b
    else:
        for x, y in zip(a, b):
            assert x["epoch"] == y["epoch"] and x["lr"] == y["lr"]
            assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-4)
            assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-4)
    mine, theirs = load_torch(ours / BEST_ENCODER)["student"], load_torch(reference / BEST_ENCODER)["student"]
    for key in theirs:
        if exact:
            assert torch.equal(mine[key], theirs[key]), key
        else:
            assert_close_to_scale(mine[key], theirs[key], msg=key)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The uninterrupted run: 8 clips per step as one micro-batch."""
    out = tmp_path_factory.mktemp("reference") / "run"
    fine_tune(_config(data, out))
    return out


class Stopped(Exception):
    """Stands for a kill: nothing after it runs (last.pt stays as the last save left it)."""


def _stop_at_step(monkeypatch, step: int) -> None:
    real = FineTuneRecipe.train_step

    def train_step(self, *args, **kwargs):
        if self.state.step == step:
            raise Stopped
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FineTuneRecipe, "train_step", train_step)


def test_accumulated_split_trains_like_one_micro_batch(data, reference, tmp_path):
    out = tmp_path / "split"
    fine_tune(_config(data, out, batch_size=4, grad_accum=2))
    _assert_same_run(out, reference, exact=False)


def test_resume_with_another_split_is_accepted_and_ends_like_the_uninterrupted_run(data, reference, tmp_path, monkeypatch):
    out = tmp_path / "moved"
    with monkeypatch.context() as m:
        _stop_at_step(m, 3)  # inside epoch 1 (4 steps an epoch), after the save of step 2
        with pytest.raises(Stopped):
            fine_tune(_config(data, out, checkpoint_every_steps=2))
    position = load_torch(out / LAST_STATE)["position"]
    assert position["epoch"] == 1 and position["windows"] == 2
    # Another GPU: half the micro-batch, twice the accumulation, gradient checkpointing on.
    fine_tune(_config(data, out, checkpoint_every_steps=2, batch_size=4, grad_accum=2, gradient_checkpointing=True))
    _assert_same_run(out, reference, exact=False)


def test_another_effective_batch_is_another_run(data, reference, tmp_path, monkeypatch):
    out = tmp_path / "other"
    with monkeypatch.context() as m:
        _stop_at_step(m, 3)
        with pytest.raises(Stopped):
            fine_tune(_config(data, out, checkpoint_every_steps=2))
    with pytest.raises(OutputDirError, match=r"effective batch \(batch_size x grad_accum 8 -> 16\)"):
        fine_tune(_config(data, out, batch_size=8, grad_accum=2))


class StepClock:
    """A clock that advances ``minutes_per_step`` minutes with every optimiser step the recipe takes."""

    def __init__(self, minutes_per_step: float) -> None:
        self.minutes_per_step, self.recipe = minutes_per_step, None

    def __call__(self) -> float:
        return 60.0 * self.minutes_per_step * (self.recipe.state.step if self.recipe else 0)


def _with_clock(monkeypatch, clock: StepClock) -> None:
    real = FineTuneRecipe.setup

    def setup(self):
        clock.recipe = self
        self.clock = clock
        real(self)

    monkeypatch.setattr(FineTuneRecipe, "setup", setup)


def test_time_based_saves_follow_the_clock(data, tmp_path, monkeypatch):
    saves: list[tuple[int, dict | None]] = []
    real = FineTuneRecipe.save_last

    def save_last(self, position=None):
        saves.append((self.state.step, position))
        real(self, position)

    monkeypatch.setattr(FineTuneRecipe, "save_last", save_last)
    _with_clock(monkeypatch, StepClock(minutes_per_step=7))
    fine_tune(_config(data, tmp_path / "timed", checkpoint_every_minutes=20, epochs=1))
    # 7 minutes a step: 21 minutes after step 3 -> a save; the epoch's end (step 4) saves as always.
    assert [(s, p["windows"] if p else None) for s, p in saves] == [(3, 3), (4, None)]


@pytest.mark.parametrize("stop_at", [1, 3, 4, 6, 7])
def test_a_run_stopped_at_any_step_after_time_based_saves_ends_like_the_uninterrupted_run(data, reference, tmp_path,
                                                                                          monkeypatch, stop_at):
    """Saves every 2 steps by the clock; stops before the first save, right after one, between, and in epoch 2."""
    out = tmp_path / f"stopped_at_{stop_at}"
    with monkeypatch.context() as m:
        _with_clock(m, StepClock(minutes_per_step=15))
        _stop_at_step(m, stop_at)
        with pytest.raises(Stopped):
            fine_tune(_config(data, out, checkpoint_every_minutes=30))
    _with_clock(monkeypatch, StepClock(minutes_per_step=15))
    fine_tune(_config(data, out, checkpoint_every_minutes=30))
    _assert_same_run(out, reference, exact=True)
