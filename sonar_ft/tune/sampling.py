"""How trials are proposed and stopped: the configured sampler (TPE / random seeded per trial, or a grid)
and pruner, built from :class:`~sonar_ft.tune.settings.TuneSettings`.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Callable

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from sonar_ft.tune.console import quiet_optuna_warnings
from sonar_ft.tune.settings import TuneSettings


class TrialSeededSampler(BaseSampler):
    """Wraps a sampler so each trial draws from a seed derived from ``(seed, trial.number)``.

    With a plain seeded sampler, two workers started with the same ``seed`` would propose the very same
    parameters for their first trials. Trial numbers are unique within a study, so seeding per trial
    keeps a single-worker study reproducible and makes parallel workers explore different points. The
    wrapped samplers keep no state between trials (they read the study's history), so nothing is lost
    by building one per trial.
    """

    def __init__(self, factory: Callable[[int | None], BaseSampler], seed: int | None) -> None:
        self._factory = factory
        self._seed = seed
        self._samplers: dict[int, BaseSampler] = {}
        self._lock = threading.Lock()

    def _for(self, trial: FrozenTrial | optuna.Trial) -> BaseSampler:
        with self._lock:
            if trial.number not in self._samplers:
                seed = None if self._seed is None else trial_seed(self._seed, trial.number)
                with quiet_optuna_warnings():
                    self._samplers[trial.number] = self._factory(seed)
            return self._samplers[trial.number]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: list[float] | None) -> None:
        try:
            self._for(trial).after_trial(study, trial, state, values)
        finally:
            with self._lock:
                self._samplers.pop(trial.number, None)

    def reseed_rng(self) -> None:
        # Seeding is per trial; Optuna calls this for n_jobs > 1 threads, where nothing needs changing.
        pass


def trial_seed(seed: int, number: int) -> int:
    """The sampler seed of trial ``number``: mixed, so study seeds 0 and 1 do not give shifted copies of one sequence."""
    import numpy as np

    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


def build_sampler(settings: TuneSettings) -> BaseSampler:
    """The configured sampler: tpe / random seeded per trial (:class:`TrialSeededSampler`), or grid."""
    spec = dict(settings.sampler)
    kind, seed = spec.pop("type"), spec.pop("seed", 0)
    if kind == "tpe":
        # Multivariate + group TPE models conditional spaces properly; constant_liar spreads parallel workers.
        kwargs = {"multivariate": True, "group": True, "constant_liar": True, **spec}
        return TrialSeededSampler(lambda s: optuna.samplers.TPESampler(seed=s, **kwargs), seed)
    if kind == "random":
        return TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed)
    # Not seeded per trial: the seed shuffles the grid once, and every worker must share that order (it
    # maps grid ids, handed out by trial number, to points).
    return optuna.samplers.GridSampler({p.name: p.grid() for p in settings.space}, seed=seed)


def grid_size(settings: TuneSettings) -> int:
    """Number of points of the grid (grid sampler only)."""
    return math.prod(len(p.grid()) for p in settings.space)


def build_pruner(settings: TuneSettings) -> optuna.pruners.BasePruner:
    """The configured pruner; Hyperband's ``max_resource`` defaults to the trials' epochs."""
    spec = dict(settings.pruner)
    kind = spec.pop("type")
    if kind == "median":
        return optuna.pruners.MedianPruner(**spec)
    if kind == "hyperband":
        spec.setdefault("max_resource", settings.train.epochs)
        return optuna.pruners.HyperbandPruner(**spec)
    return optuna.pruners.NopPruner()
