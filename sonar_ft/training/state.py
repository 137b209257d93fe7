"""Where a run stands: the counters a resumed run continues from, and the random-number states.

:class:`TrainState` is the non-module part of ``last.pt`` (the encoder, optimiser, loss scaler and
plateau scheduler states sit next to it under their own keys, see ``FineTuneRecipe.save_last``).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from sonar_ft.scores import METRICS


def _with_val_scores(cls: type) -> type:
    """``cls`` as a dataclass with one ``val_<metric>: float | None = None`` field per :data:`sonar_ft.scores.METRICS`."""
    for name in METRICS:
        cls.__annotations__[f"val_{name}"] = "float | None"
        setattr(cls, f"val_{name}", None)
    return dataclass(cls)


@_with_val_scores
class EpochMetrics:
    """One line of training history (written as ``metrics_epoch{N}.json``).

    Besides the fields below, ``val_<metric>`` for every metric of :data:`sonar_ft.scores.METRICS` (``val_loss``,
    ``val_bleu``, ``val_chrf``, ... ``val_r5``): None for an epoch without evaluation, or a score not computed
    (the semantic ones without a text encoder).
    """

    epoch: int
    train_loss: float
    lr: float
    seconds: float
    samples_per_second: float
    is_best: bool = False


def empty_best() -> dict[str, Any]:
    return {"score": None, "epoch": None, "bleu": None, "loss": None}


@dataclass
class TrainState:
    """The counters of a run; ``epoch`` is the last completed one."""

    epoch: int = 0
    step: int = 0
    """Optimiser steps taken."""
    best: dict[str, Any] = field(default_factory=empty_best)
    """``score`` (of ``select_metric``), ``epoch``, ``bleu`` and ``loss`` of the best evaluation so far."""
    evals_without_improvement: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    position: dict[str, Any] | None = None
    """Inside epoch ``epoch + 1`` when a mid-epoch ``last.pt`` was written: batches consumed, partial sums, seconds."""
    rng: dict[str, Any] | None = None
    """Random-number states to restore once the data loader of a resumed epoch has started."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "step": self.step, "best": dict(self.best),
            "evals_without_improvement": self.evals_without_improvement,
            "history": [asdict(h) for h in self.history], "position": self.position, "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the counters out of a loaded ``last.pt`` (copies: nothing of ``state`` stays referenced)."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best = dict(state["best"])
        self.evals_without_improvement = int(state["evals_without_improvement"])
        self.history = [EpochMetrics(**h) for h in state["history"]]
        self.position = dict(state["position"]) if state.get("position") else None
        self.rng = _copy_rng(state["rng"])


# ------------------------------------------------------------------------------------------------
# Random-number states
# ------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _copy_rng(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    for key in ("torch",):
        out[key] = state[key].clone()
    if "cuda" in state:
        out["cuda"] = [t.clone() for t in state["cuda"]]
    name, keys, *rest = state["numpy"]
    out["numpy"] = (name, keys.clone(), *rest)
    return out


def _numpy_state() -> tuple:
    # As a tensor, not an ndarray: last.pt is read back with weights_only=True, which refuses ndarrays.
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))


def _tuplify(x: Any) -> Any:
    # RNG states survive torch.save as lists; random/numpy want tuples back.
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    return x


@dataclass
class TrainResult:
    """What a finished run reports back (the recipe prints it; tuning optimises it)."""

    best_epoch: int | None
    best_score: float | None
    best_val_bleu: float | None
    best_val_loss: float | None
    history: list[EpochMetrics] = field(default_factory=list)
    stopped_early: bool = False
    output_dir: str = ""
    already_finished: bool = False
    """True when the output folder held this very run, finished: nothing was done."""
