"""The one list of what a run folder holds: every file name a run writes and every reader looks for.

Torch-free (the notebook kernel's display code reads run folders with it). Training writes these
names, export packs them, plots and notebooks read them, the output guards protect them.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from sonar_ft.config import maximize

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
"""Every setting, the inferred architecture, versions, hardware and data hashes of the run."""
TOKENIZER_FILE = "tokenizer.json"
BEST_ENCODER = "best_encoder.pt"
"""The best encoder so far, official layout under ``student``."""
LAST_STATE = "last.pt"
"""Everything needed to resume: trainable weights, optimiser, scheduler, RNG states, position."""
LAST_STATE_SLOTS = (LAST_STATE, "last.slot1.pt")
"""With ``--state_dir``: the run folder's copies of ``last.pt``, fixed files overwritten in place (no Drive trash)."""
STATE_SLOTS_FILE = "state_slots.json"
"""Which copy of ``last.pt`` (and of ``best_encoder.pt``) in the run folder is complete and newest."""
RUN_SUMMARY = "summary.json"
"""Written when a run finishes: epochs run, stopped early, best evaluation."""
TEST_RESULTS = "test_results.json"
"""``--eval_only``'s scores, with the SHA-256 of the evaluated encoder."""
BAD_SAMPLES = "bad_samples.tsv"
STEPS_FILE = "steps.jsonl"
TENSORBOARD_DIR = "tensorboard"
TRAIN_LOG = "train.log"
ADAPTER_DIR = "adapter"
"""A LoRA run's adapter in peft's format."""
METRICS_GLOB = "metrics_epoch*.json"
PREDICTIONS_GLOB = "predictions_epoch*.json"
RUN_FILES = (CONFIG_FILE, LAST_STATE, BEST_ENCODER)
"""The files whose presence says "this folder holds a run"."""

_EPOCH = re.compile(r"^(metrics|predictions)_epoch(\d+)\.json$")


def metrics_file(epoch: int) -> str:
    """``metrics_epoch{N}.json``: one line of training history."""
    return f"metrics_epoch{epoch}.json"


def predictions_file(epoch: int) -> str:
    """``predictions_epoch{N}.json``: every score and each clip's prediction at epoch N."""
    return f"predictions_epoch{epoch}.json"


def epoch_of(path: str | Path) -> int | None:
    """The N of ``metrics_epochN.json`` / ``predictions_epochN.json``; None for any other name."""
    m = _EPOCH.match(Path(path).name)
    return int(m.group(2)) if m else None


def by_epoch(paths: list[Path]) -> list[Path]:
    """Per-epoch files sorted by their epoch (not by name: epoch10 after epoch9)."""
    return sorted((p for p in paths if epoch_of(p) is not None), key=lambda p: epoch_of(p))


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """All readable ``metrics_epoch{N}.json`` of a run, sorted by epoch (half-written files skipped)."""
    rows = []
    for path in Path(run_dir).glob(METRICS_GLOB):
        try:
            rows.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            log.warning("skipping unreadable %s", path)
    return sorted(rows, key=lambda r: r["epoch"])


def latest_predictions(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest ``predictions_epoch{N}.json`` of a run, or None."""
    files = by_epoch(list(Path(run_dir).glob(PREDICTIONS_GLOB)))
    for path in reversed(files):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
    return None


def best_epoch(history: list[dict[str, Any]], select_metric: str | None = None) -> dict[str, Any] | None:
    """The best evaluated epoch (None before the first evaluation).

    The epoch the run itself marked best (``is_best``, chosen by its ``--select_metric``) wins;
    without marks, the best by ``select_metric`` (default ``bleu``; the loss is minimised, every
    other metric maximised), ties broken by the lower validation loss.
    """
    evaluated = [h for h in history if h.get("val_loss") is not None or h.get("val_bleu") is not None]
    if not evaluated:
        return None
    marked = [h for h in evaluated if h.get("is_best")]
    if marked and select_metric is None:
        return marked[-1]
    metric = select_metric or "bleu"
    key = "val_loss" if metric == "loss" else f"val_{metric}"
    scored = [h for h in evaluated if h.get(key) is not None]
    if not scored:
        return marked[-1] if marked else None
    sign = 1.0 if maximize(metric) else -1.0
    return max(scored, key=lambda h: (sign * h[key], -(h.get("val_loss") or 0.0)))
