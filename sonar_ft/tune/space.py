"""The search space of a study: the ``search_space`` block of a tuning YAML parsed into :class:`ParamSpec`\ s,
checked against the recipe's settings, and sampled for a trial (:func:`suggest`).

Imports no optuna at module level (``sonar-ft tune --help`` stays fast): only sampling needs it.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from sonar_ft.config import TrainConfig, make_config
from sonar_ft.errors import ConfigError

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

TRAIN_FIELDS = frozenset(TrainConfig.field_names())
TUNER_OWNED = frozenset({"output_dir", "resume", "overwrite", "eval_only", "save_checkpoints", "write_predictions", "select_metric"})
"""Settings the tuner sets itself for every trial: searching them makes no sense."""

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
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

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
        if name in TUNER_OWNED:
            raise ConfigError(f"{source}: search_space.{name}: the tuner sets {name} for every trial; it cannot be searched")
        if name not in TRAIN_FIELDS and name not in parents:
            raise ConfigError(
                f"{source}: search_space.{name} is not a recipe setting (and no other setting's `when` refers to it, "
                f"so it would do nothing). Recipe settings: {', '.join(sorted(TRAIN_FIELDS - TUNER_OWNED))}"
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
