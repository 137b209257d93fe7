"""The settings of a study, defined once: :class:`TuneSettings`.

As :class:`~sonar_ft.config.TrainConfig` does for the recipe, this dataclass generates the ``sonar-ft tune``
flags (:func:`add_arguments`: help from the docstring under each field, defaults from the field) and the
keys a tuning YAML may hold (:data:`TUNING_KEYS`); :func:`load_settings` reads one YAML file and
command-line overrides into it, checking everything before any trial runs.

No torch and no optuna at import (``sonar-ft tune --help`` stays fast).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from sonar_ft.config import Metric, TrainConfig, add_arguments as add_config_arguments, coerce, make_config, maximize, read_yaml
from sonar_ft.errors import ConfigError
from sonar_ft.tune.names import DEFAULT_STUDY_DIR
from sonar_ft.tune.space import TRAIN_FIELDS, ParamSpec, check_space_against_recipe, parse_search_space
from sonar_ft.tune.storage import resolve_storage

# The parameters each sampler / pruner type accepts (``type`` names it); the first type is the default.
SAMPLER_PARAMS: dict[str, frozenset[str]] = {
    "tpe": frozenset({"type", "seed", "n_startup_trials", "n_ei_candidates", "multivariate", "group", "constant_liar"}),
    "random": frozenset({"type", "seed"}),
    "grid": frozenset({"type", "seed"}),
}
PRUNER_PARAMS: dict[str, frozenset[str]] = {
    "median": frozenset({"type", "n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"}),
    "hyperband": frozenset({"type", "min_resource", "max_resource", "reduction_factor"}),
    "none": frozenset({"type"}),
}
_CHOICE_PARAMS = {"sampler": SAMPLER_PARAMS, "pruner": PRUNER_PARAMS}
# Settings whose change between workers/resumptions makes earlier trials incomparable (warned about, recorded).
COMPARABILITY = ("epochs", "subset_fraction", "max_samples", "max_frames", "beam_size", "eval_every")


@dataclass
class TuneSettings:
    """Everything one ``sonar-ft tune`` command runs with (one YAML file + command-line overrides)."""

    train: TrainConfig
    """Fixed recipe settings of every trial (``output_dir`` is the study folder)."""
    space: list[ParamSpec]
    """What is searched: the ``search_space`` block, parents before children."""
    # -- study ----------------------------------------------------------------------------------------
    study_name: str = "sonar-ft"
    """Name of the study in its storage."""
    storage: str | None = None
    """SQLAlchemy URL (``postgresql://user@host/db``), SQLite file (``*.db``), journal file (``journal:PATH`` or ``*.log``); default: ``OUTPUT_DIR/study.db``."""
    storage_timeout: float = 30.0
    """Seconds to wait for a database server to connect / answer one statement before giving up with an error."""
    n_trials: int = 20
    """Trials the *study* should hold (finished, pruned or failed by their settings); a re-run tops it up."""
    timeout: float | None = None
    """Stop starting new trials after this many seconds (a running trial is finished)."""
    n_jobs: int = 1
    """Trials run in parallel threads of this process (several processes/machines: start more workers)."""
    optimize: Metric = "bleu"
    """Validation metric to optimise, any that ``--select_metric`` accepts: ``loss`` is minimised, every other maximised (``cosine``, ``r1``, ``r5`` need ``--text_encoder``)."""
    sampler: dict[str, Any] = field(default_factory=lambda: {"type": "tpe", "seed": 0})
    """``type`` (tpe, random, grid) and its parameters; the command line sets ``--sampler TYPE`` and ``--sampler_seed N``."""
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    """``type`` (median, hyperband, none) and its parameters; the command line sets ``--pruner TYPE``."""
    heartbeat_interval: int = 60
    """Seconds between a running trial's heartbeats (SQL storages); 0 disables dead-worker detection."""
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
    """Write the HTML / PNG plots of the study."""
    verbose: bool = False
    """Keep the training loop's per-epoch log lines (otherwise one line per trial)."""

    @property
    def study_dir(self) -> Path:
        return Path(self.train.output_dir)

    @property
    def direction(self) -> str:
        """``maximize`` or ``minimize``, as :func:`sonar_ft.config.maximize` says for ``optimize``."""
        return "maximize" if maximize(self.optimize) else "minimize"

    def validate(self, source: str) -> None:
        """Raise :class:`ConfigError` naming the key for a tuning value that cannot work."""
        allowed = typing.get_args(typing.get_type_hints(TuneSettings)["optimize"])
        if self.optimize not in allowed:
            raise ConfigError(f"{source}: optimize must be one of {', '.join(allowed)}, got {self.optimize!r}")
        if not self.study_name.strip():
            raise ConfigError(f"{source}: study_name must not be empty")
        for key in ("n_trials", "n_jobs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{source}: {key} must be at least 1 (got {getattr(self, key)})")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"{source}: timeout must be positive seconds (got {self.timeout}); leave it out for no limit")
        for key in ("heartbeat_interval", "retry_stale_trials", "max_consecutive_failures"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{source}: {key} must not be negative (got {getattr(self, key)})")
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise ConfigError(
                f"{source}: grace_period ({self.grace_period}s) must be longer than heartbeat_interval "
                f"({self.heartbeat_interval}s), or live trials would be declared dead"
            )
        if not self.storage_timeout > 0:
            raise ConfigError(f"{source}: storage_timeout must be positive seconds (got {self.storage_timeout})")
        if self.final_epochs is not None and self.final_epochs < 1:
            raise ConfigError(f"{source}: final_epochs must be at least 1 (got {self.final_epochs})")
        resolve_storage(self.storage, self.study_dir)


_NOT_KEYS = ("train", "space")  # the recipe's settings and the search space come from their own keys
TUNING_KEYS = frozenset(f.name for f in dataclasses.fields(TuneSettings)) - set(_NOT_KEYS) | {"search_space"}
"""The top-level keys of a tuning YAML that are not recipe settings."""


def default_of(name: str) -> Any:
    """The default of the :class:`TuneSettings` field ``name`` (a fresh copy for mappings)."""
    f = next(f for f in dataclasses.fields(TuneSettings) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]


def add_arguments(parser: argparse.ArgumentParser, title: str = "") -> None:
    """Every tuning setting as a flag, generated from :class:`TuneSettings` (values are typed by :func:`load_settings`).

    ``sampler`` and ``pruner`` are mappings in YAML; on the command line ``--sampler TYPE``, ``--sampler_seed N``
    and ``--pruner TYPE`` set their type and seed.
    """
    (group,) = add_config_arguments(parser, skip=(*_NOT_KEYS, "sampler", "pruner"), title=title, cls=TuneSettings).values()
    for name, params in _CHOICE_PARAMS.items():
        default = default_of(name)["type"]
        group.add_argument(f"--{name}", choices=list(params), help=f"{name} type (default {default}); its parameters: the {name} key of --config")
    group.add_argument("--sampler_seed", metavar="INT",
                       help=f"sampler seed (default {default_of('sampler')['seed']}); each trial draws from a seed mixed from it and its number")


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
    sampler = _choice_spec(values.pop("sampler", default_of("sampler")), "sampler", source)
    pruner = _choice_spec(values.pop("pruner", default_of("pruner")), "pruner", source)
    # Command-line --sampler/--pruner replace the type; parameters of another type would not apply.
    if "sampler" in overrides:
        name = overrides.pop("sampler")
        sampler = sampler if sampler["type"] == name else {"type": name, **({"seed": sampler["seed"]} if "seed" in sampler else {})}
    if "sampler_seed" in overrides:
        sampler["seed"] = coerce("sampler_seed", overrides.pop("sampler_seed"), int, "command line")
    if "pruner" in overrides:
        name = overrides.pop("pruner")
        pruner = pruner if pruner["type"] == name else {"type": name}
    sampler = _choice_spec(sampler, "sampler", "command line")
    pruner = _choice_spec(pruner, "pruner", "command line")

    raw_space = values.pop("search_space", None)
    if raw_space is None:
        raise ConfigError(f"{source}: no search_space; see configs/tuning/default.yaml for the format")
    space = parse_search_space(raw_space, source=source)

    unknown = sorted(set(overrides) - TUNING_KEYS - TRAIN_FIELDS)
    if unknown:
        raise ConfigError(f"command line: unknown setting(s) {', '.join(unknown)}")
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
    hints = typing.get_type_hints(TuneSettings)
    for where, given in ((source, values), ("command line", overrides)):
        for key, value in given.items():
            if key in TUNING_KEYS and key not in _CHOICE_PARAMS and key != "search_space":
                setattr(settings, key, coerce(key, value, hints[key], where))
    settings.validate(source)
    if "select_metric" in {**fixed_yaml, **fixed_cli} and base.select_metric != settings.optimize:
        raise ConfigError(f"{source}: select_metric {base.select_metric} differs from optimize {settings.optimize}: every "
                          "trial selects by the metric it optimises; remove select_metric (or set optimize)")
    base.validate()
    check_space_against_recipe(space, base, source=source)
    # Every trial selects its best epoch by the optimised metric; the recipe checks it against the other settings.
    settings.train = dataclasses.replace(base, select_metric=settings.optimize)
    _check_optimize(settings, source)
    if sampler["type"] == "grid":
        for spec in space:
            spec.grid()  # raises for continuous ranges
    return settings


def _check_optimize(settings: TuneSettings, source: str) -> None:
    """Refuse a metric some trials could not compute (a semantic score without a text encoder), naming the key.

    The recipe validates ``select_metric`` next to the settings of one trial: here of a trial at the upper edge of
    every searched setting (where its condition holds), then of one more trial per edge of each setting.
    """
    values: dict[str, Any] = {}
    for spec in settings.space:
        if spec.is_active(values):
            values[spec.name] = spec.boundary_values()[-1]
    probe = make_config({k: v for k, v in values.items() if k in TRAIN_FIELDS}, base=settings.train, source="search space")
    try:
        probe.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: optimize {settings.optimize}: {exc}") from None
    for spec in settings.space:
        for value in spec.boundary_values() if spec.name in TRAIN_FIELDS else ():
            try:
                make_config({spec.name: value}, base=probe, source="search space").validate()
            except ConfigError as exc:
                raise ConfigError(
                    f"{source}: search_space.{spec.name} allows {value!r}, with which trials cannot select by val "
                    f"{settings.optimize}: {exc}"
                ) from None


def _choice_spec(raw: Any, what: str, source: str) -> dict[str, Any]:
    """A ``sampler`` / ``pruner`` value (a type name or a mapping with ``type``) checked against its parameters."""
    allowed = _CHOICE_PARAMS[what]
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
