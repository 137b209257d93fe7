"""Tuning records that say what happened: an interrupted trial's parameters run again, records describe
trials as they ran (not a later command's flags), and a trial that reached its final epoch completes."""

from __future__ import annotations

import csv
import json

import optuna
import pytest
import yaml

from sonar_ft.tune import objective
from sonar_ft.tune.names import BEST_CONFIG_FILE, BEST_PARAMS_FILE, FAIL_KIND, TRIALS_CSV
from sonar_ft.tune.settings import load_settings
from sonar_ft.tune.study import open_study, run_study
from tests.tune.test_study import write_tuning_yaml

TrialState = optuna.trial.TrialState


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def interrupted_then_resumed(tiny_demo, tmp_path_factory):
    """A 1-trial study whose first trial got Ctrl-C, then the same command again. Returns (yaml, study)."""
    study_dir = tmp_path_factory.mktemp("records") / "study"
    path = write_tuning_yaml(tiny_demo, study_dir, n_trials=1, max_samples=16)
    settings = load_settings(path)
    real_train = objective.fine_tune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    objective.fine_tune = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_study(settings, progress=False)
    finally:
        objective.fine_tune = real_train
    study = open_study(settings)
    first = study.get_trials()
    assert [t.state for t in first] == [TrialState.FAIL, TrialState.WAITING]
    run_study(load_settings(path), progress=False)  # the same command again
    return path, study


def test_interrupted_trial_runs_again_with_its_parameters(interrupted_then_resumed):
    path, study = interrupted_then_resumed
    stopped, rerun = study.get_trials()
    assert stopped.state == TrialState.FAIL and stopped.user_attrs[FAIL_KIND] == "interrupted"
    assert rerun.state == TrialState.COMPLETE and rerun.params == stopped.params
    rows = list(csv.DictReader((path.parent / "study" / TRIALS_CSV).open()))
    assert rows[1]["retry_of"] == "0"


def test_records_describe_the_trials_as_they_ran_not_new_flags(interrupted_then_resumed):
    path, study = interrupted_then_resumed
    study_dir = path.parent / "study"
    # The study is complete; re-running it with other flags runs nothing but rewrites its records.
    report = run_study(load_settings(path, {"epochs": 3, "max_samples": 12, "beam_size": 2}), progress=False)
    assert report.ran_here == 0 and len(study.get_trials()) == 2
    best = json.loads((study_dir / BEST_PARAMS_FILE).read_text())
    assert (best["trial_settings"]["epochs"], best["trial_settings"]["max_samples"], best["trial_settings"]["beam_size"]) == (1, 16, 1)
    text = (study_dir / BEST_CONFIG_FILE).read_text()
    assert "trials trained 1 epochs" in text and "at most 16 per split" in text
    config = yaml.safe_load(text)
    assert config["epochs"] == 1 and config["beam_size"] == 1
    assert config["learning_rate"] == pytest.approx(best["params"]["learning_rate"])
    summary = json.loads((study_dir / "study_summary.json").read_text())
    assert summary["trial_epochs"]["without_pruning"] == 1  # the trial's own budget, not 3


def test_trial_that_reached_its_final_epoch_completes_even_when_the_pruner_says_prune(tiny_demo, tmp_path):
    path = write_tuning_yaml(
        tiny_demo, tmp_path / "study", epochs=1, pruner={"type": "median", "n_startup_trials": 1},
        search_space={"learning_rate": {"type": "float", "low": 1e-8, "high": 1e-1, "log": True}},
    )
    settings = load_settings(path)
    study = open_study(settings)
    study.enqueue_trial({"learning_rate": 1e-2})  # learns: completes and sets the median
    study.enqueue_trial({"learning_rate": 1e-8})  # barely moves: worse than the median at its one (final) epoch
    run_study(settings, progress=False)
    good, bad = study.get_trials()
    assert bad.intermediate_values[1] > good.intermediate_values[1]  # the pruner's reason to prune
    assert optuna.pruners.MedianPruner(n_startup_trials=1).prune(study, bad)
    assert bad.state == TrialState.COMPLETE and bad.value == pytest.approx(bad.intermediate_values[1])
