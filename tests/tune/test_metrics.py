"""Tuning optimises any metric the recipe can select (sonar_ft.scores.METRICS), in the direction maximize() gives."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml

from sonar_ft.cli import build_parser
from sonar_ft.config import maximize
from sonar_ft.errors import ConfigError
from sonar_ft.scores import METRICS
from sonar_ft.tune.names import BEST_PARAMS_FILE, SUMMARY_FILE
from sonar_ft.tune.objective import trial_dir
from sonar_ft.tune.settings import TuneSettings, load_settings
from sonar_ft.tune.study import open_study, run_study

SPACE = {"learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True}}


def _yaml(tmp_path: Path, **settings) -> Path:
    """A tuning file whose data paths are never read (settings checks and studies without trials)."""
    config = {
        "study_name": "m", "output_dir": str(tmp_path / "study"), "encoder_checkpoint": "enc.pt",
        "train_features": "f", "train_manifest": "m.tsv", "val_features": "f", "val_manifest": "m.tsv",
        "search_space": SPACE, **settings,
    }
    path = tmp_path / "tuning.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("metric", METRICS)
def test_every_recipe_metric_can_be_optimised_in_its_direction(tmp_path, metric):
    extra = {"text_encoder": "text_sonar_basic_encoder"} if metric in ("cosine", "r1", "r5") else {}
    settings = load_settings(_yaml(tmp_path, optimize=metric, **extra))
    assert settings.direction == ("maximize" if maximize(metric) else "minimize")
    assert settings.train.select_metric == metric  # every trial selects its best epoch by the same metric


def test_the_optimize_flag_offers_every_metric():
    parser = build_parser(["tune"])
    tune = next(a for a in parser._subparsers._group_actions[0].choices["tune"]._actions if "--optimize" in a.option_strings)
    assert tuple(tune.choices) == METRICS


def test_flags_are_typed_from_the_settings_dataclass(tmp_path):
    settings = load_settings(_yaml(tmp_path), {"optimize": "chrf", "n_trials": "7", "timeout": "90", "plots": "false"})
    assert (settings.optimize, settings.n_trials, settings.timeout, settings.plots) == ("chrf", 7, 90.0, False)
    with pytest.raises(ConfigError, match="command line: n_trials must be int, got 'many'"):
        load_settings(_yaml(tmp_path), {"n_trials": "many"})
    assert TuneSettings.__dataclass_fields__["n_trials"].default == 20  # defaults: the dataclass, nowhere else


def test_semantic_metric_without_text_encoder_is_refused_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match="--select_metric cosine is a semantic score.*--text_encoder"):
        load_settings(_yaml(tmp_path, optimize="cosine"))
    # A searched distill_weight whose low edge turns the teacher (and so the score) off is named too.
    space = {"distill_weight": {"type": "float", "low": 0.0, "high": 1.0}}
    with pytest.raises(ConfigError, match="search_space.distill_weight allows 0.0"):
        load_settings(_yaml(tmp_path, optimize="r1", search_space=space))


def test_unknown_metric_and_a_fixed_select_metric_that_differs_are_named(tmp_path):
    with pytest.raises(ConfigError, match="optimize must be one of bleu"):
        load_settings(_yaml(tmp_path, optimize="bleurt"))
    with pytest.raises(ConfigError, match="select_metric loss differs from optimize chrf"):
        load_settings(_yaml(tmp_path, optimize="chrf", select_metric="loss"))


def test_a_study_keeps_the_metric_it_was_created_for(tmp_path):
    open_study(load_settings(_yaml(tmp_path, optimize="bleu")))
    # chrf is maximised too: only the recorded metric tells the two apart.
    with pytest.raises(ConfigError, match="optimises bleu; this command asks for val chrf"):
        open_study(load_settings(_yaml(tmp_path, optimize="chrf")))
    assert open_study(load_settings(_yaml(tmp_path, optimize="bleu"))).direction.name == "MAXIMIZE"


@pytest.mark.slow
def test_a_study_on_chrf_ranks_trials_by_validation_chrf(tiny_demo, tmp_path):
    from tests.tune.test_study import write_tuning_yaml

    path = write_tuning_yaml(tiny_demo, tmp_path / "study", optimize="chrf", sampler="grid",
                             search_space={"learning_rate": {"type": "categorical", "choices": [1.0e-3, 1.0e-2]}})
    settings = load_settings(path)
    report = run_study(settings, progress=False)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials:
        epoch = json.loads((trial_dir(settings, t.number) / "metrics_epoch1.json").read_text())
        assert epoch["val_chrf"] != epoch["val_bleu"]  # the two metrics differ here, so the check below can fail
        assert t.intermediate_values == {1: pytest.approx(epoch["val_chrf"])}
        assert t.value == pytest.approx(epoch["val_chrf"])
    best = max(trials, key=lambda t: t.value)
    assert report.best_trial == best.number
    record = json.loads((tmp_path / "study" / BEST_PARAMS_FILE).read_text())
    assert (record["metric"], record["direction"], record["trial"]) == ("val_chrf", "maximize", best.number)
    assert json.loads((tmp_path / "study" / SUMMARY_FILE).read_text())["metric"] == "val_chrf"
