"""Optuna search over the fine-tuning settings, on the recipe's own training loop.

A study is configured by one YAML file (``configs/tuning/*.yaml``): tuning keys (``study_name``,
``storage``, ``n_trials``, ``sampler``, ``pruner``, ``search_space``...) next to fixed recipe settings
(features, manifests, encoder checkpoint, ``epochs`` per trial, ``subset_fraction``...). Each trial is
``sonar_ft.training.run_dir.train`` with the sampled settings, in a lighter mode (no per-epoch checkpoints, no
prediction files) and its own folder ``STUDY_DIR/trials/trial_NNNN``. The validation metric of every
evaluation is reported to Optuna, which may prune the trial there.

Parallel and resumable by construction: the study lives in a storage (SQLite in the study folder by
default, any SQLAlchemy URL, or an Optuna journal file), ``n_trials`` is the size of the *study* (not of
one command), so re-running the command resumes it and several workers on one storage share the budget.
A worker that dies mid-trial stops sending heartbeats; the next worker marks its trial failed and, by
default, re-queues the same parameters.

Failures inside a trial (NaN loss, GPU out of memory, a setting the recipe refuses) are recorded on the
trial (user attribute ``fail_reason``) and the study goes on; problems that would fail every trial
(missing data, unreadable checkpoint) stop the study with the usual one-line error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import socket
import threading
import time
import traceback
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from sonar_ft.files import atomic
from sonar_ft.config import make_config, read_yaml
from sonar_ft.errors import CheckpointError, ConfigError, DataError, OutputDirError, SonarFtError
from sonar_ft.config import TrainConfig
from sonar_ft.data.splits import load_split
from sonar_ft.run_files import LAST_STATE
from sonar_ft.training.recipe import fine_tune
from sonar_ft.training.state import EpochMetrics

log = logging.getLogger(__name__)

STUDY_DB = "study.db"
TRIALS_DIR = "trials"
BEST_RUN_DIR = "best_run"
BEST_PARAMS_FILE = "best_hyperparameters.json"
BEST_CONFIG_FILE = "best_config.yaml"
TRIALS_CSV = "trials.csv"
SUMMARY_FILE = "study_summary.json"
PLOTS_DIR = "plots"
TRIAL_ERROR_FILE = "error.txt"
DEFAULT_STUDY_DIR = "runs/tuning"

# Study user attributes written by sonar-ft (read back when a study is resumed).
SPACE_ATTR = "sonar_ft:search_space"
SETTINGS_ATTR = "sonar_ft:trial_settings"

# Trial user attributes.
TRIAL_SETTINGS = "settings"
"""Every recipe setting a trial ran with (``dataclasses.asdict(TrainConfig)``)."""
FAIL_REASON = "fail_reason"
FAIL_KIND = "fail_kind"
"""``trial`` (the settings failed: counts towards ``n_trials``), ``aborted`` (a study-wide problem),
``interrupted`` (Ctrl-C) or ``surplus`` (another worker filled the study first); the last three do not count."""

TRAIN_FIELDS = frozenset(TrainConfig.field_names())
# Settings the tuner sets itself for every trial: searching them makes no sense.
_TUNER_OWNED = frozenset({"output_dir", "resume", "overwrite", "eval_only", "save_checkpoints", "write_predictions", "select_metric"})
_STORAGE_ATTEMPTS = 4
# Settings whose change between workers/resumptions makes earlier trials incomparable (warned about).
_COMPARABILITY = ("epochs", "subset_fraction", "max_samples", "max_frames", "beam_size", "eval_every")


# ================================================================================================
# Search space
# ================================================================================================
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "in": lambda v, x: v in x,
    "not_in": lambda v, x: v not in x,
    "eq": lambda v, x: v == x,
    "ne": lambda v, x: v != x,
    "gt": lambda v, x: v > x,
    "ge": lambda v, x: v >= x,
    "lt": lambda v, x: v < x,
    "le": lambda v, x: v <= x,
}
_SPEC_KEYS = {
    "float": {"type", "low", "high", "log", "step", "when"},
    "int": {"type", "low", "high", "log", "step", "when"},
    "categorical": {"type", "choices", "when"},
}


@dataclass(frozen=True)
class ParamSpec:
    """One searched setting: ``type`` float / int / categorical, its range or choices, and its condition."""

    name: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    when: tuple[tuple[str, str, Any], ...] = ()
    """``(parent, op, operand)`` triples, all of which must hold for this setting to be sampled."""

    def distribution(self) -> BaseDistribution:
        """The Optuna distribution this spec samples from."""
        if self.type == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return IntDistribution(self.low, self.high, log=self.log, step=self.step or 1)
        return CategoricalDistribution(self.choices)

    def is_active(self, values: Mapping[str, Any]) -> bool:
        """Whether the conditions hold for the values sampled so far (a parent not sampled fails them)."""
        return all(parent in values and _OPS[op](values[parent], operand) for parent, op, operand in self.when)

    def boundary_values(self) -> list[Any]:
        """The values a trial may see at the edges of the space (checked against the recipe up front)."""
        return list(self.choices) if self.type == "categorical" else [self.low, self.high]

    def grid(self) -> list[Any]:
        """Every value of this spec, for the grid sampler."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None and self.type == "float":
            raise ConfigError(
                f"search_space.{self.name}: the grid sampler needs a finite set of values; give it a step "
                "or make it categorical"
            )
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        n = int(round((self.high - self.low) / self.step))
        return [round(self.low + i * self.step, 12) for i in range(n + 1)]

    def record(self) -> dict[str, Any]:
        """A JSON-ready description (stored in the study to detect a changed search space)."""
        out: dict[str, Any] = {"type": self.type}
        if self.type == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log, step=self.step)
        if self.when:
            out["when"] = [[p, op, list(x) if isinstance(x, tuple) else x] for p, op, x in self.when]
        return out


def parse_search_space(raw: Any, *, source: str = "search_space") -> list[ParamSpec]:
    """Parse the ``search_space`` mapping of a tuning YAML into specs, parents before children.

    Raises :class:`ConfigError` naming ``search_space.<key>`` for every malformed entry: unknown type or
    key, bad bounds, empty choices, conditions on unknown settings, circular conditions, or a name that
    is neither a recipe setting nor a switch another setting's ``when`` refers to.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{source}: search_space must be a non-empty mapping of setting: {{type: ..., ...}}")
    specs = {str(name): _parse_spec(str(name), spec, source) for name, spec in raw.items()}
    for spec in specs.values():
        for parent, _, _ in spec.when:
            if parent not in specs:
                raise ConfigError(
                    f"{source}: search_space.{spec.name}.when refers to {parent!r}, which is not in the search space"
                )
            if parent == spec.name:
                raise ConfigError(f"{source}: search_space.{spec.name}.when refers to itself")
    parents = {p for spec in specs.values() for p, _, _ in spec.when}
    for name in specs:
        if name in _TUNER_OWNED:
            raise ConfigError(f"{source}: search_space.{name}: the tuner sets {name} for every trial; it cannot be searched")
        if name not in TRAIN_FIELDS and name not in parents:
            raise ConfigError(
                f"{source}: search_space.{name} is not a recipe setting (and no other setting's `when` refers to it, "
                f"so it would do nothing). Recipe settings: {', '.join(sorted(TRAIN_FIELDS - _TUNER_OWNED))}"
            )
    return _parents_first(specs, source)


def _parse_spec(name: str, spec: Any, source: str) -> ParamSpec:
    where = f"{source}: search_space.{name}"
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where} must be a mapping such as {{type: float, low: 1.0e-5, high: 1.0e-3, log: true}}, got {spec!r}")
    kind = spec.get("type")
    if kind not in _SPEC_KEYS:
        raise ConfigError(f"{where}.type must be float, int or categorical, got {kind!r}")
    unknown = sorted(set(spec) - _SPEC_KEYS[kind])
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} for type {kind}; allowed: {', '.join(sorted(_SPEC_KEYS[kind]))}")
    when = _parse_when(spec.get("when"), where)
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}.choices must be a non-empty list, got {choices!r}")
        for c in choices:
            if c is not None and not isinstance(c, (bool, int, float, str)):
                raise ConfigError(f"{where}.choices: {c!r} is not a number, string, boolean or null")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise ConfigError(f"{where}.choices has duplicates: {choices!r}")
        return ParamSpec(name, kind, choices=tuple(choices), when=when)

    number = int if kind == "int" else float
    spec = {k: (_yaml_number(v) if k in ("low", "high", "step") else v) for k, v in spec.items()}
    bounds = {}
    for key in ("low", "high"):
        value = spec.get(key)
        if value is None:
            raise ConfigError(f"{where}.{key} is required for type {kind}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and not float(value).is_integer()):
            raise ConfigError(f"{where}.{key} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}")
        bounds[key] = number(value)
    low, high = bounds["low"], bounds["high"]
    if low > high:
        raise ConfigError(f"{where}: low ({low}) must not be above high ({high})")
    log_scale = spec.get("log", False)
    if not isinstance(log_scale, bool):
        raise ConfigError(f"{where}.log must be true or false, got {log_scale!r}")
    if log_scale and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0 (got {low})")
    step = spec.get("step")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0 or (kind == "int" and not float(step).is_integer()):
            raise ConfigError(f"{where}.step must be a positive {'integer' if kind == 'int' else 'number'}, got {step!r}")
        if log_scale and (kind == "float" or step != 1):
            raise ConfigError(f"{where}: step and log cannot be combined")
        step = number(step)
        ratio = (high - low) / step
        if abs(ratio - round(ratio)) > 1e-9:
            raise ConfigError(f"{where}: high - low ({high - low}) is not a multiple of step ({step}); adjust high")
    return ParamSpec(name, kind, low=low, high=high, log=log_scale, step=step, when=when)


def _yaml_number(value: Any) -> Any:
    """``"1e-5"`` -> ``1e-05``: PyYAML follows YAML 1.1, which reads a number without a dot (``1e-5``) as a string.

    The recipe's ``--config`` accepts such numbers, so the tuning space does too; other strings stay strings
    (and are refused with the usual message).
    """
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return value
        if math.isfinite(number):
            return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def _parse_when(raw: Any, where: str) -> tuple[tuple[str, str, Any], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}.when must be a mapping such as {{use_distillation: true}}, got {raw!r}")
    out = []
    for parent, cond in raw.items():
        if isinstance(cond, list):
            out.append((str(parent), "in", tuple(cond)))
        elif isinstance(cond, Mapping):
            if len(cond) != 1 or next(iter(cond)) not in _OPS:
                raise ConfigError(
                    f"{where}.when.{parent} must be a value, a list of values, or one of "
                    f"{{{', '.join(_OPS)}}}: operand; got {dict(cond)!r}"
                )
            op, operand = next(iter(cond.items()))
            if op in ("in", "not_in"):
                if not isinstance(operand, list):
                    raise ConfigError(f"{where}.when.{parent}.{op} needs a list, got {operand!r}")
                operand = tuple(operand)
            elif op in ("gt", "ge", "lt", "le") and (isinstance(operand, bool) or not isinstance(operand, (int, float))):
                raise ConfigError(f"{where}.when.{parent}.{op} needs a number, got {operand!r}")
            out.append((str(parent), op, operand))
        else:
            out.append((str(parent), "eq", cond))
    return tuple(out)


def _parents_first(specs: dict[str, ParamSpec], source: str) -> list[ParamSpec]:
    """Order the specs so every parent is sampled before its children (YAML order otherwise)."""
    ordered: list[ParamSpec] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join(chain[chain.index(name):] + [name])
            raise ConfigError(f"{source}: search_space conditions form a cycle: {cycle}")
        state[name] = "visiting"
        for parent, _, _ in specs[name].when:
            visit(parent, chain + [name])
        state[name] = "done"
        ordered.append(specs[name])

    for name in specs:
        visit(name, [])
    return ordered


def space_record(space: list[ParamSpec]) -> dict[str, Any]:
    """The search space as plain JSON (what a study stores and compares on resume)."""
    return json.loads(json.dumps({s.name: s.record() for s in space}))


def suggest(trial: optuna.Trial, space: list[ParamSpec]) -> dict[str, Any]:
    """Sample the active settings of ``space`` for ``trial``; settings whose condition fails are left out."""
    values: dict[str, Any] = {}
    for spec in space:
        if not spec.is_active(values):
            continue
        if spec.type == "float":
            values[spec.name] = trial.suggest_float(spec.name, spec.low, spec.high, log=spec.log, step=spec.step)
        elif spec.type == "int":
            values[spec.name] = trial.suggest_int(spec.name, spec.low, spec.high, log=spec.log, step=spec.step or 1)
        else:
            values[spec.name] = trial.suggest_categorical(spec.name, list(spec.choices))
    return values


def check_space_against_recipe(space: list[ParamSpec], base: TrainConfig, *, source: str) -> None:
    """Refuse, before any trial runs, a space whose edge values the recipe would refuse (names the key)."""
    hints = typing.get_type_hints(TrainConfig)
    for spec in space:
        if spec.name not in TRAIN_FIELDS:
            continue
        kinds = set(typing.get_args(hints[spec.name])) or {hints[spec.name]}
        if spec.type == "float" and float not in kinds:
            raise ConfigError(f"{source}: search_space.{spec.name} is a whole-number setting; use type: int or categorical")
        for value in spec.boundary_values():
            try:
                make_config({spec.name: value}, base=base, source="search space").validate()
            except ConfigError as exc:
                raise ConfigError(f"{source}: search_space.{spec.name} allows {value!r}, which the recipe refuses: {exc}") from None


# ================================================================================================
# Settings
# ================================================================================================
@dataclass
class TuneSettings:
    """Everything one ``sonar-ft tune`` command runs with (one YAML file + command-line overrides)."""

    train: TrainConfig
    """Fixed recipe settings of every trial (``output_dir`` is the study folder)."""
    space: list[ParamSpec]
    study_name: str = "sonar-ft"
    storage: str | None = None
    """SQLAlchemy URL, journal file (``journal:PATH`` or ``*.log``), or None for ``STUDY_DIR/study.db``."""
    storage_timeout: float = 30.0
    """Seconds to wait for a database server to connect / answer one statement before giving up with an error."""
    n_trials: int = 20
    """Trials the *study* should hold (finished, pruned or failed by their settings); a re-run tops it up."""
    timeout: float | None = None
    """Stop starting new trials after this many seconds (a running trial is finished)."""
    n_jobs: int = 1
    """Trials run in parallel threads of this process (several processes/machines: start more workers)."""
    optimize: str = "bleu"
    """``bleu`` (maximise validation BLEU) or ``loss`` (minimise validation loss)."""
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    heartbeat_interval: int = 60
    """Seconds between a running trial's heartbeats (RDB storages); 0 disables dead-worker detection."""
    grace_period: int | None = None
    """Seconds without a heartbeat before a trial is declared dead (default: twice the interval)."""
    retry_stale_trials: int = 1
    """Re-queue the parameters of a dead worker's trial up to this many times (0: only mark it failed)."""
    save_trial_encoders: bool = False
    """Keep each trial's ``best_encoder.pt`` (its ``last.pt`` is deleted when the trial ends)."""
    final_epochs: int | None = None
    """Epochs written into ``best_config.yaml`` (default: the trials' ``epochs``)."""
    max_consecutive_failures: int = 5
    """Stop this worker after this many failed trials in a row (0: never)."""
    plots: bool = True
    verbose: bool = False
    """Keep the training loop's per-epoch log lines (otherwise one line per trial)."""

    @property
    def study_dir(self) -> Path:
        return Path(self.train.output_dir)

    @property
    def direction(self) -> str:
        return "maximize" if self.optimize == "bleu" else "minimize"


TUNING_KEYS = frozenset(f.name for f in dataclasses.fields(TuneSettings)) - {"train", "space"} | {"search_space"}
_SAMPLER_KEYS = {
    "tpe": {"type", "seed", "n_startup_trials", "n_ei_candidates", "multivariate", "group", "constant_liar"},
    "random": {"type", "seed"},
    "grid": {"type", "seed"},
}
_PRUNER_KEYS = {
    "median": {"type", "n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"},
    "hyperband": {"type", "min_resource", "max_resource", "reduction_factor"},
    "none": {"type"},
}


def load_settings(config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TuneSettings:
    """Tuning settings from ``config_file`` (YAML) updated by ``overrides`` (e.g. command-line flags).

    Top-level keys are tuning keys (:data:`TUNING_KEYS`) or recipe settings (:class:`TrainConfig`
    fields) fixed for every trial. Everything is checked here, before any trial runs: unknown keys,
    the search space, the sampler / pruner parameters, and the edges of the space against the recipe.
    """
    overrides = dict(overrides or {})
    source = f"--config {config_file}" if config_file else "tuning settings"
    values: dict[str, Any] = dict(read_yaml(config_file)) if config_file else {}
    unknown = sorted(set(values) - TUNING_KEYS - TRAIN_FIELDS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(unknown)}. Tuning keys: {', '.join(sorted(TUNING_KEYS))}; "
            "any recipe flag (train_sonar_finetuning.py --help) may also be given as a fixed value"
        )
    sampler = _normalise_choice_spec(values.pop("sampler", {"type": "tpe", "seed": 0}), "sampler", _SAMPLER_KEYS, source)
    pruner = _normalise_choice_spec(values.pop("pruner", {"type": "median"}), "pruner", _PRUNER_KEYS, source)
    # Command-line --sampler/--pruner replace the type; parameters of another type would not apply.
    if "sampler" in overrides:
        name = overrides.pop("sampler")
        sampler = sampler if sampler["type"] == name else {"type": name, **({"seed": sampler["seed"]} if "seed" in sampler else {})}
    if "sampler_seed" in overrides:
        sampler["seed"] = overrides.pop("sampler_seed")
    if "pruner" in overrides:
        name = overrides.pop("pruner")
        pruner = pruner if pruner["type"] == name else {"type": name}
    sampler = _normalise_choice_spec(sampler, "sampler", _SAMPLER_KEYS, "command line")
    pruner = _normalise_choice_spec(pruner, "pruner", _PRUNER_KEYS, "command line")

    raw_space = values.pop("search_space", None)
    if raw_space is None:
        raise ConfigError(f"{source}: no search_space; see configs/tuning/default.yaml for the format")
    space = parse_search_space(raw_space, source=source)

    unknown = sorted(set(overrides) - TUNING_KEYS - TRAIN_FIELDS)
    if unknown:
        raise ConfigError(f"command line: unknown setting(s) {', '.join(unknown)}")
    tuning = {k: v for k, v in {**values, **overrides}.items() if k in TUNING_KEYS}
    fixed_yaml = {k: v for k, v in values.items() if k in TRAIN_FIELDS}
    fixed_cli = {k: v for k, v in overrides.items() if k in TRAIN_FIELDS}
    for name in (s.name for s in space):
        where = "the command line" if name in fixed_cli else source if name in fixed_yaml else None
        if where:
            raise ConfigError(f"{name} is both fixed (in {where}) and in search_space; remove one of them")
    base = make_config(fixed_yaml, source=source)
    base = make_config(fixed_cli, source="command line", base=base)
    if "output_dir" not in fixed_yaml and "output_dir" not in fixed_cli:
        base = dataclasses.replace(base, output_dir=DEFAULT_STUDY_DIR)
    if base.eval_only:
        raise ConfigError(f"{source}: eval_only cannot be tuned; remove it (tuning trains every trial)")

    settings = TuneSettings(train=base, space=space, sampler=sampler, pruner=pruner)
    for key, value in tuning.items():
        _set_tuning_value(settings, key, value, source)
    _validate_settings(settings, source)
    base.validate()
    check_space_against_recipe(space, base, source=source)
    if sampler["type"] == "grid":
        for spec in space:
            spec.grid()  # raises for continuous ranges
    return settings


def _normalise_choice_spec(raw: Any, what: str, allowed: dict[str, set[str]], source: str) -> dict[str, Any]:
    spec = {"type": raw} if isinstance(raw, str) else dict(raw) if isinstance(raw, Mapping) else None
    if spec is None or spec.get("type") not in allowed:
        raise ConfigError(f"{source}: {what} must be one of {', '.join(allowed)} (or a mapping with type: ...), got {raw!r}")
    extra = sorted(set(spec) - allowed[spec["type"]])
    if extra:
        raise ConfigError(
            f"{source}: {what}.{extra[0]} is not a parameter of the {spec['type']} {what}; "
            f"allowed: {', '.join(sorted(allowed[spec['type']] - {'type'})) or 'none'}"
        )
    for key, value in spec.items():
        if key in ("type", "multivariate", "group", "constant_liar"):
            if key != "type" and not isinstance(value, bool):
                raise ConfigError(f"{source}: {what}.{key} must be true or false, got {value!r}")
        elif key == "seed" and value is None:
            continue
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            if not (key == "max_resource" and value == "auto"):
                raise ConfigError(f"{source}: {what}.{key} must be a non-negative integer, got {value!r}")
    return spec


def _set_tuning_value(settings: TuneSettings, key: str, value: Any, source: str) -> None:
    if key == "search_space":
        return
    hint = typing.get_type_hints(TuneSettings)[key]
    kinds = [k for k in (typing.get_args(hint) or (hint,)) if k is not type(None)]
    if value is None and type(None) in typing.get_args(hint):
        setattr(settings, key, None)
        return
    for kind in kinds:
        if kind is bool and isinstance(value, bool):
            break
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            break
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            break
        if kind is str and isinstance(value, str):
            break
    else:
        wanted = " or ".join(getattr(k, "__name__", str(k)) for k in kinds)
        raise ConfigError(f"{source}: {key} must be {wanted}, got {value!r}")
    setattr(settings, key, value)


def _validate_settings(s: TuneSettings, source: str) -> None:
    if s.optimize not in ("bleu", "loss"):
        raise ConfigError(f"{source}: optimize must be bleu or loss, got {s.optimize!r}")
    if not s.study_name.strip():
        raise ConfigError(f"{source}: study_name must not be empty")
    for key in ("n_trials", "n_jobs"):
        if getattr(s, key) < 1:
            raise ConfigError(f"{source}: {key} must be at least 1 (got {getattr(s, key)})")
    if s.timeout is not None and s.timeout <= 0:
        raise ConfigError(f"{source}: timeout must be positive seconds (got {s.timeout}); leave it out for no limit")
    for key in ("heartbeat_interval", "retry_stale_trials", "max_consecutive_failures"):
        if getattr(s, key) < 0:
            raise ConfigError(f"{source}: {key} must not be negative (got {getattr(s, key)})")
    if s.grace_period is not None and s.grace_period <= s.heartbeat_interval:
        raise ConfigError(
            f"{source}: grace_period ({s.grace_period}s) must be longer than heartbeat_interval ({s.heartbeat_interval}s), "
            "or live trials would be declared dead"
        )
    if not s.storage_timeout > 0:
        raise ConfigError(f"{source}: storage_timeout must be positive seconds (got {s.storage_timeout})")
    if s.final_epochs is not None and s.final_epochs < 1:
        raise ConfigError(f"{source}: final_epochs must be at least 1 (got {s.final_epochs})")
    resolve_storage(s.storage, s.study_dir)


# ================================================================================================
# Storage, sampler, pruner, study
# ================================================================================================
def resolve_storage(spec: str | None, study_dir: Path) -> tuple[str, str]:
    """``("rdb", url)`` or ``("journal", path)`` for a ``storage`` setting (None: SQLite in ``study_dir``)."""
    if not spec:
        return "rdb", f"sqlite:///{(study_dir / STUDY_DB).resolve()}"
    if "://" in spec:
        return "rdb", spec
    if spec.startswith("journal:"):
        return "journal", spec.removeprefix("journal:")
    suffix = Path(spec).suffix.lower()
    if suffix in (".db", ".sqlite", ".sqlite3"):
        return "rdb", f"sqlite:///{Path(spec).resolve()}"
    if suffix in (".log", ".journal", ".jsonl"):
        return "journal", spec
    raise ConfigError(
        f"--storage {spec!r} is neither a SQLAlchemy URL (sqlite:///study.db, postgresql://user@host/db), a SQLite "
        "file (*.db) nor an Optuna journal file (journal:PATH or *.log); leave it out for SQLite in the study folder"
    )


def describe_storage(spec: str | None, study_dir: Path) -> str:
    """The storage as text safe to print and write to files (passwords hidden)."""
    kind, location = resolve_storage(spec, study_dir)
    if kind == "journal":
        return f"journal:{location}"
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(location).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL fails later with its own message
        return location


def make_storage(settings: TuneSettings) -> optuna.storages.BaseStorage:
    """Open (creating if needed) the study storage, with heartbeats on RDB storages."""
    kind, location = resolve_storage(settings.storage, settings.study_dir)
    shown = describe_storage(settings.storage, settings.study_dir)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(location).parent.mkdir(parents=True, exist_ok=True)
        if settings.heartbeat_interval:
            log.info("journal storage %s: Optuna has no heartbeat for journal files, so a dead worker's trial stays "
                     "'running'; use an SQL storage for that", shown)
        try:
            return JournalStorage(JournalFileBackend(location))
        except OSError as exc:
            raise ConfigError(f"--storage {shown}: cannot open the journal file: {exc.strerror or exc}") from None

    location = with_installed_driver(location)
    engine_kwargs = engine_options(location, settings.storage_timeout)
    if location.startswith("sqlite"):
        db_path = location.removeprefix("sqlite:///")
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    heartbeat: dict[str, Any] = {}
    with _quiet_optuna_warnings():
        if settings.heartbeat_interval:
            heartbeat = {"heartbeat_interval": settings.heartbeat_interval, "grace_period": settings.grace_period}
            if settings.retry_stale_trials:
                heartbeat["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=settings.retry_stale_trials
                )
    for attempt in range(_STORAGE_ATTEMPTS):
        try:
            with _quiet_optuna_warnings():
                return optuna.storages.RDBStorage(location, engine_kwargs=engine_kwargs, **heartbeat)
        except ImportError as exc:
            raise ConfigError(f"--storage {shown}: its database driver is not installed ({exc}); e.g. pip install psycopg2-binary") from None
        except Exception as exc:  # sqlalchemy raises many kinds for unreachable / malformed databases
            error = exc
            if _is_timeout(exc):
                # Retrying would multiply the wait; a server that does not answer will not answer the next time.
                raise ConfigError(
                    f"--storage {shown}: the database server did not answer within storage_timeout "
                    f"({settings.storage_timeout:g}s): {_first_line(exc)}. Check that the host and port are a running "
                    "database server (not a proxy or another service), or raise storage_timeout"
                ) from exc
            # Workers started together on a fresh database race to create Optuna's tables: the loser retries.
            time.sleep(0.5 + random.random())
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise ConfigError(
        f"--storage {shown}: cannot open the database: {first}. Check the URL, that the server runs and that "
        "the database exists (PostgreSQL: createdb NAME)"
    )


def with_installed_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy 2.1 means psycopg 3 by it).

    psycopg2 is what ``pip install psycopg2-binary`` (the usual advice) gives; when only it is there, the
    bare scheme is pointed at it instead of failing with "driver not installed".
    """
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}" if scheme == "postgres" else url


def engine_options(url: str, timeout: float) -> dict[str, Any]:
    """SQLAlchemy ``engine_kwargs`` that bound every wait on the database to about ``timeout`` seconds."""
    seconds = max(1, math.ceil(timeout))
    backend = url.partition("://")[0].partition("+")[0]
    if backend == "sqlite":
        # Several local workers share one SQLite file: wait for the write lock instead of failing at once.
        return {"connect_args": {"timeout": max(timeout, 60)}}
    options: dict[str, Any] = {"pool_pre_ping": True, "pool_timeout": seconds}
    if backend in ("postgresql", "postgres"):
        # libpq's connect_timeout bounds the whole connection start-up (at least 2 s); statement_timeout bounds
        # each statement on the server. A server that accepts and never answers is then an error, not a hang.
        options["connect_args"] = {"connect_timeout": max(2, seconds), "options": f"-c statement_timeout={seconds * 1000}"}
    elif backend in ("mysql", "mariadb"):
        options["connect_args"] = {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
    return options


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timeout" in text or "timed out" in text or "statement_timeout" in text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
                with _quiet_optuna_warnings():
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


def open_study(settings: TuneSettings, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (resume / another worker), checking it still matches.

    A study created with another search space or direction is refused with a message saying what
    changed and how to proceed; Optuna's own error would come later, mid-trial, and name a distribution.
    """
    storage = storage if storage is not None else make_storage(settings)
    with _quiet_optuna_warnings(), _optuna_verbosity(optuna.logging.WARNING):
        study = optuna.create_study(
            study_name=settings.study_name,
            storage=storage,
            sampler=build_sampler(settings),
            pruner=build_pruner(settings),
            direction=settings.direction,
            load_if_exists=True,
        )
    shown = describe_storage(settings.storage, settings.study_dir)
    if study.direction.name.lower() != settings.direction:
        raise ConfigError(
            f"study {settings.study_name!r} in {shown} was created to {study.direction.name.lower()} "
            f"(optimize: {'loss' if settings.optimize == 'bleu' else 'bleu'}); this command asks to {settings.direction} "
            f"(optimize: {settings.optimize}). Use another --study_name, or the original --optimize"
        )
    wanted = space_record(settings.space)
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        _check_existing_distributions(study, settings, shown)
        study.set_user_attr(SPACE_ATTR, wanted)
    elif stored != wanted:
        raise ConfigError(
            f"the search space of study {settings.study_name!r} in {shown} has changed since it was created "
            f"({describe_space_change(stored, wanted)}). Its trials cannot be mixed with the new space: use another "
            f"--study_name (or --output_dir for the default storage), put the original search_space back, or delete the "
            f"study (optuna delete-study --study-name {settings.study_name} --storage {shown})"
        )
    current = {k: getattr(settings.train, k) for k in _COMPARABILITY}
    previous = study.user_attrs.get(SETTINGS_ATTR)
    if previous is None:
        study.set_user_attr(SETTINGS_ATTR, current)
    else:
        changed = {k: (previous.get(k), v) for k, v in current.items() if previous.get(k) != v}
        if changed:
            log.warning(
                "study %r ran earlier trials with %s: their values are not directly comparable with this worker's",
                settings.study_name, ", ".join(f"{k}={old} (now {new})" for k, (old, new) in changed.items()),
            )
    return study


def _check_existing_distributions(study: optuna.Study, settings: TuneSettings, shown: str) -> None:
    # A study created outside sonar-ft (or by an older version) has no recorded space: compare its trials.
    specs = {s.name: s.distribution() for s in settings.space}
    for trial in study.get_trials(deepcopy=False):
        for name, dist in trial.distributions.items():
            if name in specs and specs[name] != dist:
                raise ConfigError(
                    f"study {settings.study_name!r} in {shown} sampled {name} from {dist} (trial {trial.number}), but "
                    f"search_space.{name} is now {specs[name]}. Use another --study_name or restore the original range"
                )


def describe_space_change(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``added: x; removed: y; changed: z (low 1e-05 -> 1e-06)`` between two :func:`space_record` dicts."""
    parts = []
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    if added:
        parts.append("added: " + ", ".join(added))
    if removed:
        parts.append("removed: " + ", ".join(removed))
    changes = []
    for name in sorted(set(old) & set(new)):
        if old[name] != new[name]:
            keys = sorted(set(old[name]) | set(new[name]))
            diffs = [f"{k} {old[name].get(k)!r} -> {new[name].get(k)!r}" for k in keys if old[name].get(k) != new[name].get(k)]
            changes.append(f"{name} ({', '.join(diffs)})")
    if changes:
        parts.append("changed: " + "; ".join(changes))
    return "; ".join(parts) or "no visible difference"


# ================================================================================================
# Trials
# ================================================================================================
class TrialFailed(Exception):
    """A trial that failed because of its settings (NaN, out of memory...); the study goes on."""


def trial_dir(settings: TuneSettings, number: int) -> Path:
    return settings.study_dir / TRIALS_DIR / f"trial_{number:04d}"


def trial_config(settings: TuneSettings, params: Mapping[str, Any], number: int) -> TrainConfig:
    """The recipe config of trial ``number``: fixed settings + sampled ones, light mode, own folder."""
    values = {k: v for k, v in params.items() if k in TRAIN_FIELDS}
    cfg = make_config(values, base=settings.train, source=f"trial {number}")
    return dataclasses.replace(
        cfg,
        output_dir=str(trial_dir(settings, number)),
        save_checkpoints=settings.save_trial_encoders,
        write_predictions=False,
        overwrite=True,
        resume=False,
        eval_only=False,
        select_metric=settings.optimize,
    )


def final_config(settings: TuneSettings, params: Mapping[str, Any], *, ran: TrainConfig | None = None) -> TrainConfig:
    """The complete config of a full training run with ``params`` (what ``best_config.yaml`` holds).

    Built on ``ran`` (the settings the best trial ran with) when given, else on the study's fixed settings.
    All training clips (``subset_fraction`` / ``max_samples`` were tuning shortcuts), ``final_epochs``
    if set, checkpoints and predictions on, output in ``STUDY_DIR/best_run``.
    """
    values = {k: v for k, v in params.items() if k in TRAIN_FIELDS}
    cfg = make_config(values, base=ran or settings.train, source="best trial")
    return dataclasses.replace(
        cfg,
        output_dir=str(settings.study_dir / BEST_RUN_DIR),
        epochs=settings.final_epochs or cfg.epochs,
        subset_fraction=None,
        max_samples=None,
        save_checkpoints=True,
        write_predictions=True,
        overwrite=False,
        resume=False,
        eval_only=False,
        select_metric=settings.optimize,
    )


def counts_towards_budget(trial: FrozenTrial) -> bool:
    """Whether a trial uses one of the study's ``n_trials``: done, pruned, failed by its settings, or under way.

    Trials of a worker that died (heartbeat lost), was interrupted, or that started after the study was
    already full do not count, so re-running the command runs them again.
    """
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING):
        return True
    return trial.state == TrialState.FAIL and trial.user_attrs.get(FAIL_KIND) == "trial"


def is_finished(trial: FrozenTrial) -> bool:
    return counts_towards_budget(trial) and trial.state not in (TrialState.RUNNING, TrialState.WAITING)


def failure_reason(exc: BaseException) -> str:
    """One line saying why a trial failed (project errors as they are, others with their type)."""
    import torch

    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "out of memory: " + (first or "CUDA out of memory")
    if isinstance(exc, (SonarFtError, TrialFailed)):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def metric_of(metrics: EpochMetrics, optimize: str) -> float | None:
    return metrics.val_bleu if optimize == "bleu" else metrics.val_loss


def make_objective(settings: TuneSettings, worker: str) -> Callable[[optuna.Trial], float]:
    """The objective: sample, train with the recipe's ``train``, report each evaluation, prune, return the best."""
    import torch

    # The trials of this worker read the same clips: the first one's bad-clip scan (and feature cache,
    # with cache_features) serves the others, which then read no feature file again.
    datasets: dict[tuple, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker if settings.n_jobs == 1 else f"{worker}/{threading.current_thread().name}")
        study = trial.study
        ahead = sum(1 for t in study.get_trials(deepcopy=False) if t.number < trial.number and counts_towards_budget(t))
        if ahead >= settings.n_trials:
            # Another worker took the last slot between our check and our ask: do not overfill the study.
            _fail(trial, "surplus", f"the study already had its {settings.n_trials} trials when this worker started one")
            study.stop()
            raise TrialFailed("surplus trial")
        params = suggest(trial, settings.space)
        folder = trial_dir(settings, trial.number)
        trial.set_user_attr("trial_dir", str(folder))

        def on_evaluation(metrics: EpochMetrics) -> None:
            trial.set_user_attr("epochs_run", metrics.epoch)
            value = metric_of(metrics, settings.optimize)
            if value is None or not math.isfinite(value):
                raise TrialFailed(f"validation {settings.optimize} is {value} at epoch {metrics.epoch} (training diverged)")
            trial.report(value, metrics.epoch)
            # A trial at its final epoch has spent its whole budget: it completes, whatever the pruner says.
            if metrics.epoch < cfg.epochs and trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", metrics.epoch)
                raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}: val {settings.optimize} {value:.4g}")

        try:
            cfg = trial_config(settings, params, trial.number)
            # What this trial ran with: the study's records describe it from this, never from a later command's flags.
            trial.set_user_attr(TRIAL_SETTINGS, dataclasses.asdict(cfg))
            cfg.validate()
            result = fine_tune(cfg, on_evaluation=on_evaluation, reuse_data=datasets)
        except optuna.TrialPruned:
            raise
        except (DataError, CheckpointError, OutputDirError) as exc:
            # Wrong for every trial (data, checkpoint, folder): stop the study with the usual one-line error.
            _fail(trial, "aborted", failure_reason(exc))
            raise
        except KeyboardInterrupt:
            _fail(trial, "interrupted", "interrupted (Ctrl-C); its parameters are queued and run again when the command is re-run")
            requeue(trial)
            raise
        except Exception as exc:
            # NaN / Inf, out of memory, a setting the recipe refuses, or anything else these settings ran into:
            # recorded on the trial (traceback in its folder) and the study goes on. A bug that fails every
            # trial is stopped by max_consecutive_failures.
            reason = failure_reason(exc)
            _fail(trial, "trial", reason)
            if not isinstance(exc, (TrialFailed, SonarFtError)):
                atomic.write_text(folder / TRIAL_ERROR_FILE, traceback.format_exc())
            raise TrialFailed(reason) from None
        finally:
            _after_trial(folder, settings, device_is_cuda=torch.cuda.is_available())
        trial.set_user_attr("epochs_run", len(result.history))
        if result.best_score is None or not math.isfinite(result.best_score):
            _fail(trial, "trial", f"no finite validation {settings.optimize} (best {result.best_score})")
            raise TrialFailed(f"no finite validation {settings.optimize}")
        trial.set_user_attr("best_epoch", result.best_epoch)
        return float(result.best_score)

    return objective


def requeue(trial: optuna.Trial) -> None:
    """Queue ``trial``'s parameters as a new trial, as Optuna does for a dead worker's (``retry_of`` in trials.csv)."""
    trial.study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=dict(trial.params), distributions=dict(trial.distributions),
        system_attrs={"failed_trial": trial.number},
    ))


def _fail(trial: optuna.Trial, kind: str, reason: str) -> None:
    trial.set_user_attr(FAIL_KIND, kind)
    trial.set_user_attr(FAIL_REASON, reason)


def _after_trial(folder: Path, settings: TuneSettings, *, device_is_cuda: bool) -> None:
    if settings.save_trial_encoders:
        (folder / LAST_STATE).unlink(missing_ok=True)  # the resumable state is only useful to the recipe
    if device_is_cuda:
        import torch

        torch.cuda.empty_cache()  # a trial that ran out of memory must not starve the next one


# ================================================================================================
# Running a study
# ================================================================================================
@dataclass
class StudyReport:
    """What one ``run_study`` call did and where the study stands."""

    study_name: str
    storage: str
    study_dir: Path
    n_trials: int
    counts: dict[str, int]
    ran_here: int
    best_trial: int | None
    best_value: float | None
    best_params: dict[str, Any]
    outputs: dict[str, Path]


def worker_id() -> str:
    """``host:pid`` of this process (recorded on every trial it runs)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def preflight(settings: TuneSettings) -> None:
    """Check data and starting encoder once, so a wrong path stops the study before any trial."""
    cfg = settings.train
    load_split(cfg.train_features, cfg.train_manifest, cfg=cfg, split="training", fraction=cfg.subset_fraction)
    load_split(cfg.val_features, cfg.val_manifest, cfg=cfg, split="validation")
    if not Path(cfg.encoder_checkpoint).is_file():
        # Only its presence: loading 818M parameters here would slow every worker's start; train() names a bad file.
        raise CheckpointError(f"--encoder_checkpoint not found: {cfg.encoder_checkpoint}")


def study_progress(study: optuna.Study) -> tuple[int, int, int]:
    """(finished trials that count, trials running, trials queued) of a study."""
    trials = study.get_trials(deepcopy=False)
    finished = sum(1 for t in trials if is_finished(t))
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    return finished, running, waiting


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark trials of dead workers failed (and re-queue them, if configured) now rather than at the next ask."""
    with _quiet_optuna_warnings():
        optuna.storages.fail_stale_trials(study)


def run_study(settings: TuneSettings, *, progress: bool = True) -> StudyReport:
    """Run (or resume, or join) the study until it holds ``n_trials`` trials; write its outputs; report."""
    preflight(settings)
    settings.study_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings)
    shown = describe_storage(settings.storage, settings.study_dir)
    worker = worker_id()
    target = settings.n_trials
    if settings.sampler["type"] == "grid" and grid_size(settings) < target:
        log.info("the grid has %d points: the study stops after them (n_trials %d)", grid_size(settings), target)
        target = grid_size(settings)
    fail_stale_trials(study)
    finished, running, waiting = study_progress(study)
    # Queued trials (re-runs of dead workers' trials, enqueued points) are this worker's to take.
    remaining = target - finished - running
    log.info(
        "study %r (%s): %d of %d trials done, %d running, %d queued; this worker (%s) %s",
        settings.study_name, shown, finished, target, running, waiting, worker,
        f"runs up to {remaining}" if remaining > 0 else "has nothing to run",
    )
    if remaining <= 0 and running:
        log.info("%d trial(s) still marked running by other workers; if a worker died, its trial is declared dead %ss "
                 "after its last heartbeat and re-run by the next `sonar-ft tune` started after that",
                 running, settings.grace_period or 2 * settings.heartbeat_interval)

    ran_here = 0
    lock = threading.Lock()
    consecutive_failures: list[str] = []
    stopped_for_failures = False
    bar = _tqdm(total=target, initial=min(finished, target), desc=f"study {settings.study_name}", unit="trial", disable=not progress)

    def after_trial(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran_here, stopped_for_failures
        with lock:
            ran_here += 1
            log.info(trial_line(study, trial, settings))
            if trial.state == TrialState.FAIL and trial.user_attrs.get(FAIL_KIND) == "trial":
                consecutive_failures.append(trial.user_attrs.get(FAIL_REASON, "?"))
            elif trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
                consecutive_failures.clear()
            done, running, _ = study_progress(study)
            bar.n = min(done, target)
            bar.refresh()
            if settings.max_consecutive_failures and len(consecutive_failures) >= settings.max_consecutive_failures:
                stopped_for_failures = True
                study.stop()
            if done + running >= target:
                study.stop()

    try:
        if remaining > 0:
            with _quiet_training(settings.verbose), _quiet_optuna_warnings(), _logging_through(bar):
                study.optimize(
                    make_objective(settings, worker),
                    n_trials=remaining,
                    timeout=settings.timeout,
                    n_jobs=min(settings.n_jobs, remaining),
                    catch=(TrialFailed,),
                    callbacks=[after_trial],
                    gc_after_trial=True,
                )
    finally:
        bar.close()
        outputs = write_study_outputs(study, settings) if study.get_trials(deepcopy=False) else {}
    if stopped_for_failures:
        raise SonarFtError(
            f"{len(consecutive_failures)} trials in a row failed (last: {consecutive_failures[-1]}); this worker stopped. "
            f"See {settings.study_dir / TRIALS_CSV} and fix the settings or the search space"
        )
    best = _best_trial(study)
    counts = {state.name.lower(): 0 for state in TrialState}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name.lower()] += 1
    return StudyReport(
        study_name=settings.study_name, storage=shown, study_dir=settings.study_dir, n_trials=target, counts=counts,
        ran_here=ran_here, best_trial=best.number if best else None, best_value=best.value if best else None,
        best_params=dict(best.params) if best else {}, outputs=outputs,
    )


def trial_line(study: optuna.Study, trial: FrozenTrial, settings: TuneSettings) -> str:
    """One log line per finished / pruned / failed trial."""
    params = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    metric = f"val {settings.optimize}"
    if trial.state == TrialState.COMPLETE:
        best = _best_trial(study)
        best_text = f" | best {best.value:.4g} (trial {best.number})" if best else ""
        epochs = trial.user_attrs.get("epochs_run", "?")
        return f"trial {trial.number} finished: {metric} {trial.value:.4g} after {epochs} epochs, {seconds:.0f}s{best_text} | {params}"
    if trial.state == TrialState.PRUNED:
        last = trial.intermediate_values.get(max(trial.intermediate_values)) if trial.intermediate_values else None
        at = trial.user_attrs.get("pruned_at_epoch", max(trial.intermediate_values, default="?"))
        last_text = f" ({metric} {last:.4g})" if last is not None else ""
        return f"trial {trial.number} pruned at epoch {at}{last_text}, {seconds:.0f}s | {params}"
    reason = trial.user_attrs.get(FAIL_REASON, "worker stopped mid-trial")
    return f"trial {trial.number} failed: {reason} | {params}"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def write_study_outputs(study: optuna.Study, settings: TuneSettings) -> dict[str, Path]:
    """Write ``trials.csv``, ``study_summary.json``, the best-trial files and the plots; return their paths."""
    from sonar_ft.tune import report as tune_report

    out = settings.study_dir
    shown = describe_storage(settings.storage, out)
    trials = study.get_trials(deepcopy=False)
    written: dict[str, Path] = {}
    names = [s.name for s in settings.space]
    written["trials_csv"] = tune_report.write_trials_csv(out / TRIALS_CSV, trials, names)
    best = _best_trial(study)
    summary = tune_report.study_summary(
        study, trials, best,
        storage=shown, metric=settings.optimize, n_trials=settings.n_trials, epochs=settings.train.epochs,
        space=space_record(settings.space), sampler=settings.sampler, pruner=settings.pruner,
        fixed=dataclasses.asdict(settings.train), compared=_COMPARABILITY,
    )
    written["summary"] = out / SUMMARY_FILE
    atomic.write_json(written["summary"], summary)
    if best is not None:
        ran = trial_ran_with(best, settings)
        cfg = final_config(settings, best.params, ran=ran)
        record = {
            "study_name": settings.study_name,
            "storage": shown,
            "metric": f"val_{settings.optimize}",
            "direction": settings.direction,
            "value": best.value,
            "trial": best.number,
            "params": dict(best.params),
            "trial_settings": {k: getattr(ran, k) for k in _COMPARABILITY},  # as the best trial ran, not this command's flags
            "best_epoch": best.user_attrs.get("best_epoch"),
        }
        written["best_hyperparameters"] = out / BEST_PARAMS_FILE
        atomic.write_json(written["best_hyperparameters"], record)
        written["best_config"] = out / BEST_CONFIG_FILE
        atomic.write_text(written["best_config"], best_config_text(cfg, settings, best, shown, ran=ran))
    else:
        log.info("no trial has completed yet: %s and %s are written once one does", BEST_PARAMS_FILE, BEST_CONFIG_FILE)
    if settings.plots:
        for name, paths in tune_report.write_plots(study, out / PLOTS_DIR, metric=f"val {settings.optimize}").items():
            for path in paths:
                written[f"{name}{path.suffix}"] = path
    return written


def trial_ran_with(trial: FrozenTrial, settings: TuneSettings) -> TrainConfig:
    """The recipe settings ``trial`` ran with (recorded on it); for trials of older versions, today's fixed settings."""
    recorded = trial.user_attrs.get(TRIAL_SETTINGS)
    if isinstance(recorded, Mapping):
        return TrainConfig(**{k: v for k, v in recorded.items() if k in TRAIN_FIELDS})
    log.info("trial %d does not record its settings (an older sonar-ft): describing it with this command's", trial.number)
    return trial_config(settings, trial.params, trial.number)


def best_config_text(cfg: TrainConfig, settings: TuneSettings, best: FrozenTrial, storage: str, *, ran: TrainConfig | None = None) -> str:
    """``best_config.yaml``: a comment naming the trial, its score and what it ran with, then every recipe setting."""
    t = ran or settings.train
    data = f"{t.subset_fraction:.0%} of the training clips" if t.subset_fraction else "the training clips"
    if t.max_samples:
        data += f" (at most {t.max_samples} per split)"
    header = [
        f"# Best trial of Optuna study '{settings.study_name}' ({storage}): trial {best.number}, "
        f"val {settings.optimize} {best.value:.4f}",
        f"# (trials trained {t.epochs} epochs on {data}; this config trains {cfg.epochs} epochs on all of them).",
        f"# Run:  python train_sonar_finetuning.py --config {settings.study_dir / BEST_CONFIG_FILE}",
        f"#  or:  sonar-ft train-from-tuning --study_dir {settings.study_dir} --epochs 50 --output_dir runs/final",
    ]
    body = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False, allow_unicode=True)
    return "\n".join(header) + "\n" + body


# ================================================================================================
# Final training from a study
# ================================================================================================
def best_config_path(study_dir: str | Path) -> Path:
    """``STUDY_DIR/best_config.yaml``, or a clear error when the study has not produced one."""
    path = Path(study_dir) / BEST_CONFIG_FILE
    if not path.is_file():
        if not Path(study_dir).is_dir():
            raise ConfigError(f"--study_dir {study_dir} does not exist; run `sonar-ft tune --config tuning.yaml` first")
        raise ConfigError(
            f"--study_dir {study_dir} has no {BEST_CONFIG_FILE}: no trial of the study has completed yet "
            "(see trials.csv), or this is not a study folder"
        )
    return path


def train_from_tuning(study_dir: str | Path, overrides: Mapping[str, Any] | None = None,
                      on_evaluation: Callable[[EpochMetrics], None] | None = None) -> Any:
    """Train with the best configuration of a study (``best_config.yaml``), ``overrides`` winning."""
    from sonar_ft.config import config_from_sources

    cfg = config_from_sources(dict(overrides or {}), best_config_path(study_dir))
    return fine_tune(cfg, on_evaluation=on_evaluation)


# ================================================================================================
# Helpers
# ================================================================================================
@contextlib.contextmanager
def _quiet_optuna_warnings() -> Iterator[None]:
    """Optuna flags heartbeats, grouped TPE etc. as experimental; we rely on them knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@contextlib.contextmanager
def _optuna_verbosity(level: int) -> Iterator[None]:
    saved = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(saved)


_CHATTY_LOGGERS = ("sonar_ft.training.run_dir", "sonar_ft.data", "sonar_ft.models.encoder", "sonar_ft.models.decoder", "sonar_ft.evaluate",
                   "sonar_ft.models.text_encoder", "fairseq2", "sonar")


@contextlib.contextmanager
def _quiet_training(verbose: bool) -> Iterator[None]:
    """One line per trial: silence the training loop's per-epoch INFO lines, and Optuna's own trial logs."""
    saved = {name: logging.getLogger(name).level for name in _CHATTY_LOGGERS}
    if not verbose:
        for name in _CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        # Our trial line replaces Optuna's (and the tracebacks it logs for trials we fail on purpose).
        with _optuna_verbosity(optuna.logging.ERROR):
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _tqdm(**kwargs: Any) -> Any:
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


@contextlib.contextmanager
def _logging_through(bar: Any) -> Iterator[None]:
    """Log lines go through tqdm.write so they do not tear the progress bar."""
    if getattr(bar, "disable", True):
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield
