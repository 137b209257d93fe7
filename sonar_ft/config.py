"""Build a :class:`~sonar_ft.train.TrainConfig` from defaults, a YAML file and command-line flags.

Precedence: flags given on the command line > keys of ``--config run.yaml`` > the defaults.
Unknown keys and values of the wrong type are errors that name the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping

import yaml

from sonar_ft.errors import ConfigError
from sonar_ft.train import TrainConfig


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (comments allowed), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag: value")
    return data


def _coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    if value is None:
        return None
    hint = annotation
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    options = tuple(o for o in options if o is not type(None))
    for kind in options:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif kind is str:
            if isinstance(value, (str, Path)):
                return str(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
    wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{source}: {name} must be {wanted}, got {value!r}")


def make_config(values: Mapping[str, Any], *, source: str = "settings", base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the defaults) updated with ``values``, type-checked."""
    known = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}. Known: {', '.join(sorted(known))}")
    coerced = {k: _coerce(k, v, known[k], source) for k, v in values.items()}
    return dataclasses.replace(base or TrainConfig(), **coerced)


def config_from_sources(cli: Mapping[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """Defaults < ``config_file`` < ``cli`` (only the flags the user actually gave)."""
    cfg = TrainConfig()
    if config_file:
        cfg = make_config(read_yaml(config_file), source=f"--config {config_file}", base=cfg)
    return make_config(cli, source="command line", base=cfg)
