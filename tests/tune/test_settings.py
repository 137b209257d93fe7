"""The tuning settings are defined once (TuneSettings): its flags, YAML keys and the documented table follow it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from sonar_ft.cli import build_parser
from sonar_ft.tune.settings import TUNING_KEYS, TuneSettings

REPO = Path(__file__).resolve().parents[2]


def _tune_parser():
    return build_parser(["tune"])._subparsers._group_actions[0].choices["tune"]


def test_every_tuning_setting_is_a_flag_with_its_dataclass_default_in_the_help():
    options = {o for a in _tune_parser()._actions for o in a.option_strings}
    for f in dataclasses.fields(TuneSettings):
        if f.name in ("train", "space"):
            continue
        assert f"--{f.name}" in options, f.name
    helps = {a.dest: a.help for a in _tune_parser()._actions}
    assert "(default 20)" in helps["n_trials"] and "(default 60)" in helps["heartbeat_interval"]
    assert "(default tpe)" in helps["sampler"] and "(default median)" in helps["pruner"]


def test_docs_table_lists_every_tuning_key():
    text = (REPO / "docs" / "tuning.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(\w+)` \|", text, flags=re.M))
    assert TUNING_KEYS <= documented, sorted(TUNING_KEYS - documented)
