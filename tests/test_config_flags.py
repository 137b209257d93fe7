"""A negative number after a space to a numeric flag reaches the flag's range check, not argparse's "expected one argument"."""

from __future__ import annotations

import typing

import pytest

from sonar_ft import cli
from sonar_ft.cli import join_negative_values
from sonar_ft.config import _RANGES, TrainConfig, _options, config_from_sources
from sonar_ft.errors import ConfigError
from sonar_ft.training.cli import build_parser

REQUIRED = ["--encoder_checkpoint", "enc.pt", "--train_features", "f", "--train_manifest", "t.tsv",
            "--val_features", "f", "--val_manifest", "v.tsv"]
HINTS = typing.get_type_hints(TrainConfig)
FLOAT_FLAGS = sorted(name for name in _RANGES if _options(HINTS[name]) == (float,))


def test_learning_rate_given_a_negative_number_after_a_space_gets_its_range_message(capsys, tmp_path):
    code = cli.main(["train", *REQUIRED, "--output_dir", str(tmp_path / "run"), "--learning_rate", "-1e-4"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "error: --learning_rate must be in (0, inf) (got -0.0001)"
    assert not (tmp_path / "run").exists()


def test_the_training_script_joins_negative_values_too(capsys, tmp_path):
    from sonar_ft.training.cli import main

    code = main([*REQUIRED, "--output_dir", str(tmp_path / "run"), "--weight_decay", "-1e-2"])
    assert code == 2 and capsys.readouterr().err.strip() == "error: --weight_decay must be in [0, inf) (got -0.01)"


@pytest.mark.parametrize("name", FLOAT_FLAGS)
@pytest.mark.parametrize("value", ["-1e-4", "-2.", "-inf"])
def test_every_float_flag_reaches_its_range_check(name, value):
    argv = join_negative_values([*REQUIRED, f"--{name}", value])
    flags = vars(build_parser().parse_args(argv))
    assert flags[name] == value
    with pytest.raises(ConfigError, match=f"^--{name} must be"):
        config_from_sources(flags).validate()


def test_only_a_number_after_a_long_flag_is_joined():
    assert join_negative_values(["--lr", "-1e-4", "-h", "-5e3", "--out", "-x", "--", "--a", "-1e2"]) == [
        "--lr=-1e-4", "-h", "-5e3", "--out", "-x", "--", "--a", "-1e2"]
