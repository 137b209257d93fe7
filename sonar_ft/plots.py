"""Per-epoch training curves from a run folder's ``metrics_epoch*.json`` (works mid-run).

Used by ``make demo`` and the monitoring notebook; matplotlib with the non-interactive backend
unless a notebook already chose one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """All readable ``metrics_epoch{N}.json`` of a run, sorted by epoch (half-written files skipped)."""
    rows = []
    for path in Path(run_dir).glob("metrics_epoch*.json"):
        try:
            rows.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            log.warning("skipping unreadable %s", path)
    return sorted(rows, key=lambda r: r["epoch"])


def latest_predictions(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest ``predictions_epoch{N}.json`` of a run, or None."""
    files = sorted(Path(run_dir).glob("predictions_epoch*.json"), key=lambda p: int(p.stem.removeprefix("predictions_epoch")))
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
    from sonar_ft.config import maximize

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


def plot_history(run_dir: str | Path, out_dir: str | Path | None = None, *, title: str = "") -> dict[str, Path]:
    """Write ``loss.png`` (train / val loss) and ``bleu.png`` (val BLEU, chrF) per epoch; return their paths."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_history(run_dir)
    if not history:
        raise FileNotFoundError(f"no metrics_epoch*.json in {run_dir} yet")
    out = Path(out_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    evaluated = [h for h in history if h.get("val_loss") is not None]
    best = best_epoch(history)
    paths = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot([h["epoch"] for h in evaluated], [h["val_loss"] for h in evaluated], marker="s", label="val loss")
    ax.set(xlabel="epoch", ylabel="token cross-entropy", title=f"{title} loss".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    paths["loss"] = _save(fig, out / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["epoch"] for h in evaluated], [h["val_bleu"] for h in evaluated], marker="o", label="val BLEU")
    ax.plot([h["epoch"] for h in evaluated], [h["val_chrf"] for h in evaluated], marker="s", label="val chrF")
    if best:
        ax.axvline(best["epoch"], color="grey", linestyle="--", label=f"best epoch {best['epoch']}")
    ax.set(xlabel="epoch", ylabel="score", title=f"{title} validation scores".strip())
    ax.grid(alpha=0.3)
    ax.legend()
    paths["bleu"] = _save(fig, out / "bleu.png")
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from sonar_ft.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
