"""Per-epoch training curves from a run folder's ``metrics_epoch*.json`` (works mid-run).

Used by ``make demo`` and the monitoring notebook; matplotlib with the non-interactive backend
unless a notebook already chose one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sonar_ft.run_files import best_epoch, latest_predictions, read_history  # noqa: F401  (notebooks read them from here)

log = logging.getLogger(__name__)


def plot_history(run_dir: str | Path, out_dir: str | Path | None = None, *, title: str = "") -> dict[str, Path]:
    """Write ``loss.png`` (train / val loss) and ``bleu.png`` (val BLEU, chrF) per epoch; return their paths."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers: no 1.25, 1.5 ticks
    ax.grid(alpha=0.3)
    ax.legend()
    paths["loss"] = _save(fig, out / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([h["epoch"] for h in evaluated], [h["val_bleu"] for h in evaluated], marker="o", label="val BLEU")
    ax.plot([h["epoch"] for h in evaluated], [h["val_chrf"] for h in evaluated], marker="s", label="val chrF")
    if best:
        ax.axvline(best["epoch"], color="grey", linestyle="--", label=f"best epoch {best['epoch']}")
    ax.set(xlabel="epoch", ylabel="score", title=f"{title} validation scores".strip())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    paths["bleu"] = _save(fig, out / "bleu.png")
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    from sonar_ft.files.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
