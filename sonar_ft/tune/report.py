"""What a tuning study leaves in its folder: ``trials.csv``, ``study_summary.json`` and plots.

Pure functions of an Optuna study (read from any storage), so every worker of a parallel study can
rewrite them from the shared state. Plots come in two forms: interactive HTML (plotly, sharing one
``plotly.min.js`` beside them so the folder opens offline) and PNG (Optuna's matplotlib versions).
"""

from __future__ import annotations

import csv
import json
import logging
import warnings
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from sonar_ft.files import atomic
from sonar_ft.tune.names import BEST_EPOCH, EPOCHS_RUN, FAIL_REASON, PRUNED_AT_EPOCH, RETRY_OF, TRIAL_SETTINGS, WORKER

log = logging.getLogger(__name__)

PLOT_NAMES = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values")
CSV_COLUMNS = (
    "number", "state", "value", "epochs_run", "best_epoch", "pruned_at_epoch", "duration_s",
    "datetime_start", "datetime_complete", "worker", "fail_reason", "retry_of", "epochs",
)


def _fail_reason(t: FrozenTrial) -> str:
    if t.state != TrialState.FAIL:
        return ""
    # A trial failed by the heartbeat check has no reason of ours: its worker stopped mid-trial.
    return t.user_attrs.get(FAIL_REASON, "worker lost mid-trial (killed, crashed or disconnected: no heartbeat)")


def trial_rows(trials: list[FrozenTrial], param_names: list[str]) -> list[dict[str, Any]]:
    """One flat dict per trial (the rows of ``trials.csv``)."""
    extra = sorted({p for t in trials for p in t.params} - set(param_names))
    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.state == TrialState.COMPLETE else "",
            "epochs_run": t.user_attrs.get(EPOCHS_RUN, ""),
            "best_epoch": t.user_attrs.get(BEST_EPOCH, ""),
            "pruned_at_epoch": t.user_attrs.get(PRUNED_AT_EPOCH, ""),
            "duration_s": round(t.duration.total_seconds(), 2) if t.duration else "",
            "datetime_start": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else "",
            "datetime_complete": t.datetime_complete.isoformat(timespec="seconds") if t.datetime_complete else "",
            "worker": t.user_attrs.get(WORKER, ""),
            "fail_reason": _fail_reason(t),
            "retry_of": t.system_attrs.get(RETRY_OF, ""),
            "epochs": _ran_with(t).get("epochs", ""),  # the trial's own budget (it may differ between commands)
        }
        for name in param_names + extra:
            row[f"param_{name}"] = t.params.get(name, "")
        row["intermediate_values"] = json.dumps({str(k): v for k, v in sorted(t.intermediate_values.items())})
        rows.append(row)
    return rows


def write_trials_csv(path: Path, trials: list[FrozenTrial], param_names: list[str]) -> Path:
    """Every trial: state, value, params, duration, intermediate values (JSON ``{epoch: value}``)."""
    rows = trial_rows(trials, param_names)
    columns = list(CSV_COLUMNS) + sorted({k for r in rows for k in r if k.startswith("param_")},
                                         key=lambda k: _order(k, param_names)) + ["intermediate_values"]
    with atomic.atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return path


def _order(column: str, param_names: list[str]) -> tuple[int, str]:
    name = column.removeprefix("param_")
    return (param_names.index(name), name) if name in param_names else (len(param_names), name)


def _ran_with(t: FrozenTrial) -> Mapping[str, Any]:
    """The recipe settings a trial recorded (:data:`~sonar_ft.tune.names.TRIAL_SETTINGS`); empty for older trials."""
    recorded = t.user_attrs.get(TRIAL_SETTINGS)
    return recorded if isinstance(recorded, Mapping) else {}


def trial_epochs(trials: list[FrozenTrial], epochs: int) -> dict[str, Any]:
    """Epochs the finished trials trained vs. what they would have without pruning (each its own ``epochs``;
    ``epochs`` for trials that did not record theirs)."""
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    run = sum(int(t.user_attrs.get(EPOCHS_RUN) or max(t.intermediate_values, default=0)) for t in finished)
    budget = sum(int(_ran_with(t).get("epochs") or epochs) for t in finished)
    return {"run": run, "without_pruning": budget, "saved_fraction": (1 - run / budget) if budget else 0.0}


def study_summary(
    study: optuna.Study,
    trials: list[FrozenTrial],
    best: FrozenTrial | None,
    *,
    storage: str,
    metric: str,
    n_trials: int,
    epochs: int,
    space: Mapping[str, Any],
    sampler: Mapping[str, Any],
    pruner: Mapping[str, Any],
    fixed: Mapping[str, Any],
    compared: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The study in one JSON object: counts, best trial, trial-epochs spent, settings, versions.

    ``fixed`` are the settings of the command writing the file; ``compared`` names settings whose values
    the trials recorded are listed (``trial_settings``: value -> trial numbers), so a study whose trials
    ran with different settings says so.
    """
    counts = {state.name.lower(): 0 for state in TrialState}
    for t in trials:
        counts[t.state.name.lower()] += 1
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    versions = {}
    for pkg in ("optuna", "sonar-ft", "torch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "study_name": study.study_name,
        "storage": storage,
        "metric": f"val_{metric}",
        "direction": study.direction.name.lower(),
        "n_trials": n_trials,
        "trials": {"total": len(trials), **counts},
        "best": None if best is None else {
            "trial": best.number, "value": best.value, "params": best.params,
            "best_epoch": best.user_attrs.get(BEST_EPOCH),
            "settings": {k: _ran_with(best).get(k) for k in compared} if _ran_with(best) else None,
        },
        "trial_settings": _settings_by_value(trials, compared),
        "trial_epochs": trial_epochs(trials, epochs),
        "workers": sorted({t.user_attrs[WORKER] for t in trials if WORKER in t.user_attrs}),
        "first_trial_started": min(starts).isoformat(timespec="seconds") if starts else None,
        "last_trial_finished": max(ends).isoformat(timespec="seconds") if ends else None,
        "search_space": dict(space),
        "sampler": dict(sampler),
        "pruner": dict(pruner),
        "fixed_settings": dict(fixed),
        "written_at": datetime.now().isoformat(timespec="seconds"),
        "versions": versions,
    }


def _settings_by_value(trials: list[FrozenTrial], names: tuple[str, ...]) -> dict[str, dict[str, list[int]]]:
    """For each setting in ``names``: JSON value -> numbers of the trials that ran with it (recorded trials only)."""
    out: dict[str, dict[str, list[int]]] = {}
    for name in names:
        values: dict[str, list[int]] = {}
        for t in trials:
            if _ran_with(t):
                values.setdefault(json.dumps(_ran_with(t).get(name)), []).append(t.number)
        out[name] = values
    return out


def write_plots(study: optuna.Study, out_dir: Path, *, metric: str = "value") -> dict[str, list[Path]]:
    """HTML and PNG of each of :data:`PLOT_NAMES` that the study has enough trials for (``metric`` labels axes)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as vis
    import optuna.visualization.matplotlib as vis_mpl
    from plotly.offline import get_plotlyjs

    makers: dict[str, tuple[Callable, Callable]] = {
        "optimization_history": (vis.plot_optimization_history, vis_mpl.plot_optimization_history),
        "param_importances": (vis.plot_param_importances, vis_mpl.plot_param_importances),
        "parallel_coordinate": (vis.plot_parallel_coordinate, vis_mpl.plot_parallel_coordinate),
        "intermediate_values": (vis.plot_intermediate_values, vis_mpl.plot_intermediate_values),
    }
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    out: dict[str, list[Path]] = {}
    if not completed:
        log.info("no completed trial yet: no plots")
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = out_dir / "plotly.min.js"
    if not bundle.is_file():
        atomic.write_text(bundle, get_plotlyjs())
    for name, (html_plot, png_plot) in makers.items():
        if name == "param_importances" and (len(completed) < 2 or not _varied_params(completed)):
            log.info("skipping the %s plot: it needs two completed trials with different parameters", name)
            continue
        paths = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-API and "no intermediate values" notices
            try:
                fig = html_plot(study)
                if name == "intermediate_values":
                    fig.update_layout(xaxis_title="epoch", yaxis_title=metric)
                elif name == "optimization_history":
                    fig.update_layout(yaxis_title=metric)
                html = out_dir / f"{name}.html"
                atomic.write_text(html, fig.to_html(include_plotlyjs="directory", full_html=True))
                paths.append(html)
                ax = png_plot(study)
                first = ax.flat[0] if hasattr(ax, "flat") else ax
                if name == "intermediate_values":
                    first.set_xlabel("epoch")
                    first.set_ylabel(metric)
                elif name == "optimization_history":
                    first.set_ylabel(metric)
                figure = first.figure
                png = out_dir / f"{name}.png"
                with atomic.atomic_path(png) as tmp:
                    figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
                plt.close(figure)
                paths.append(png)
            except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # too few / too uniform trials
                log.info("skipping the %s plot: %s", name, exc)
        if paths:
            out[name] = paths
    return out


def _varied_params(trials: list[FrozenTrial]) -> bool:
    names = set.intersection(*(set(t.params) for t in trials))
    return any(len({json.dumps(t.params[n]) for t in trials}) > 1 for n in names)
