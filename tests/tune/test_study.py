"""Optuna tuning: search-space parsing, a quick study's outputs, pruning, failures, resume, parallel
workers on a real PostgreSQL server, and a worker killed mid-trial.

Every study runs the real recipe training (``sonar_ft.training.run_dir.train``) on the tiny demo, with trials of
1-2 epochs on a few clips and beam size 1.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from sonar_ft.cli import main as cli
from sonar_ft.config import config_from_sources
from sonar_ft.demo.paths import DemoPaths
from sonar_ft.errors import ConfigError
from sonar_ft.tune.names import BEST_CONFIG_FILE, BEST_PARAMS_FILE, FAIL_KIND, FAIL_REASON, SUMMARY_FILE, TRIALS_CSV
from sonar_ft.tune.objective import counts_towards_budget, is_finished, trial_dir
from sonar_ft.tune.settings import load_settings
from sonar_ft.tune.space import parse_search_space, suggest
from sonar_ft.tune.study import open_study, run_study
from sonar_ft.tune.report import PLOT_NAMES

REPO = Path(__file__).resolve().parents[2]
SPACE = {
    "learning_rate": {"type": "float", "low": 1.0e-4, "high": 1.0e-2, "log": True},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Trials here are tiny: one thread is as fast, and leaves the second core to worker processes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_tuning_yaml(demo: DemoPaths, study_dir: Path, **settings) -> Path:
    """A tiny study on the tiny demo (2 trials of 1 epoch on 24 clips, beam 1) with ``settings`` on top."""
    config = {
        "study_name": "tiny",
        "output_dir": str(study_dir),
        "n_trials": 2,
        "optimize": "loss",
        "sampler": {"type": "tpe", "seed": 0},
        "pruner": "none",
        # Generous: a loaded CI machine can starve the heartbeat thread for seconds, and a live trial
        # declared dead would make these tests flaky. The kill test below sets its own, shorter values.
        "heartbeat_interval": 2,
        "grace_period": 30,
        "epochs": 1,
        "max_samples": 24,
        "batch_size": 8,
        "beam_size": 1,
        "max_gen_len": 16,
        "device": "cpu",
        "encoder_checkpoint": str(demo.encoder_checkpoint),
        "decoder": str(demo.decoder_card),
        "train_features": str(demo.split_features("train")),
        "train_manifest": str(demo.split_manifest("train")),
        "val_features": str(demo.split_features("val")),
        "val_manifest": str(demo.split_manifest("val")),
        "search_space": SPACE,
        **settings,
    }
    path = study_dir.parent / f"{study_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [t for t in study.get_trials() if is_finished(t)]


# ------------------------------------------------------------------------------------------------
# Search space
# ------------------------------------------------------------------------------------------------
def test_conditional_parameter_is_sampled_only_when_its_condition_holds():
    space = parse_search_space({
        "distill_weight": {"type": "float", "low": 0.05, "high": 1.0, "log": True, "when": {"use_distillation": True}},
        "use_distillation": {"type": "categorical", "choices": [False, True]},
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
    })
    assert [s.name for s in space].index("use_distillation") < [s.name for s in space].index("distill_weight")
    off = suggest(optuna.trial.FixedTrial({"use_distillation": False, "learning_rate": 1e-4}), space)
    on = suggest(optuna.trial.FixedTrial({"use_distillation": True, "distill_weight": 0.3, "learning_rate": 1e-4}), space)
    assert "distill_weight" not in off
    assert on["distill_weight"] == 0.3


def test_condition_operators_on_numeric_parents():
    space = parse_search_space({
        "warmup_steps": {"type": "int", "low": 0, "high": 100, "step": 10},
        "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "when": {"warmup_steps": {"gt": 0}}},
    })
    assert "learning_rate" not in suggest(optuna.trial.FixedTrial({"warmup_steps": 0}), space)
    assert "learning_rate" in suggest(optuna.trial.FixedTrial({"warmup_steps": 20, "learning_rate": 1e-4}), space)


def test_trials_are_seeded_by_study_seed_and_number():
    from sonar_ft.tune.sampling import TrialSeededSampler

    def first_draws(seed: int) -> list[float]:
        study = optuna.create_study(sampler=TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), seed))
        return [study.ask().suggest_float("x", 0, 1) for _ in range(4)]

    assert first_draws(0) == first_draws(0)  # reproducible
    assert not set(first_draws(0)) & set(first_draws(1))  # another seed is another sequence, not a shifted one


@pytest.mark.parametrize(
    "space, needle",
    [
        ({"learning_rate": {"type": "gaussian", "low": 0, "high": 1}}, "search_space.learning_rate.type"),
        ({"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-5}}, "search_space.learning_rate: low"),
        ({"learning_rate": {"type": "float", "low": 0.0, "high": 1e-3, "log": True}}, "search_space.learning_rate: a log scale"),
        ({"learning_rate": {"type": "float", "lo": 1e-5, "high": 1e-3}}, "search_space.learning_rate: unknown key(s) lo"),
        ({"learning_rate": {"type": "float", "high": 1e-3}}, "search_space.learning_rate.low is required"),
        ({"batch_size": {"type": "categorical", "choices": []}}, "search_space.batch_size.choices"),
        ({"batch_size": {"type": "int", "low": 8, "high": 30, "step": 8}}, "search_space.batch_size: high - low"),
        ({"batch_size": {"type": "int", "low": 8.5, "high": 32}}, "search_space.batch_size.low must be an integer"),
        ({"learning_rat": {"type": "float", "low": 1e-5, "high": 1e-3}}, "search_space.learning_rat is not a recipe setting"),
        ({"output_dir": {"type": "categorical", "choices": ["a", "b"]}}, "search_space.output_dir: the tuner sets"),
        ({"dropout": {"type": "float", "low": 0, "high": 0.3, "when": {"use_dropout": True}}},
         "search_space.dropout.when refers to 'use_dropout'"),
        ({"a_switch": {"type": "categorical", "choices": [1, 2], "when": {"b_switch": 1}},
          "b_switch": {"type": "categorical", "choices": [1, 2], "when": {"a_switch": 1}},
          "dropout": {"type": "float", "low": 0, "high": 0.3, "when": {"a_switch": 1}}}, "form a cycle"),
        ({"dropout": {"type": "float", "low": 0, "high": 0.3, "when": {"warmup_steps": {"bigger": 3}}},
          "warmup_steps": {"type": "int", "low": 0, "high": 10}}, "search_space.dropout.when.warmup_steps"),
        ("learning_rate", "search_space must be a non-empty mapping"),
    ],
)
def test_bad_search_space_is_a_clear_error_naming_the_key(space, needle):
    with pytest.raises(ConfigError) as err:
        parse_search_space(space, source="--config t.yaml")
    assert needle in str(err.value)
    assert "--config t.yaml" in str(err.value)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"plateau_factor": {"type": "float", "low": 0.5, "high": 1.0}}, "search_space.plateau_factor allows 1.0, which the recipe refuses"),
        ({"warmup_steps": {"type": "float", "low": 0, "high": 16}}, "search_space.warmup_steps is a whole-number setting"),
        ({"distill_loss": {"type": "categorical", "choices": ["mse", "l1"]}}, "search_space.distill_loss allows 'l1'"),
    ],
)
def test_values_the_recipe_refuses_are_caught_before_any_trial(tiny_demo, tmp_path, spec, needle):
    path = write_tuning_yaml(tiny_demo, tmp_path / "study", search_space=spec)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    assert needle in str(err.value)


def test_unknown_tuning_key_and_setting_in_both_places_are_named(tiny_demo, tmp_path):
    path = write_tuning_yaml(tiny_demo, tmp_path / "study", n_trails=3)
    with pytest.raises(ConfigError, match="unknown key.*n_trails"):
        load_settings(path)
    path = write_tuning_yaml(tiny_demo, tmp_path / "study", learning_rate=1e-3)
    with pytest.raises(ConfigError, match="learning_rate is both fixed"):
        load_settings(path)


# ------------------------------------------------------------------------------------------------
# A quick study end to end
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_study(tiny_demo, tmp_path_factory):
    """3 trials through `sonar-ft tune`, as a user runs it."""
    root = tmp_path_factory.mktemp("quick_study")
    path = write_tuning_yaml(tiny_demo, root / "study", n_trials=3)
    assert cli(["tune", "--config", str(path), "--no_progress"]) == 0
    return root / "study", load_settings(path)


@pytest.mark.slow
def test_quick_study_writes_every_output(quick_study):
    study_dir, _ = quick_study
    for name in (BEST_PARAMS_FILE, BEST_CONFIG_FILE, TRIALS_CSV, SUMMARY_FILE, "study.db"):
        assert (study_dir / name).is_file(), name
    for name in PLOT_NAMES:
        for suffix in (".html", ".png"):
            path = study_dir / "plots" / f"{name}{suffix}"
            assert path.is_file() and path.stat().st_size > 1000, path
    assert (study_dir / "plots" / "plotly.min.js").is_file()  # the HTML plots open offline


@pytest.mark.slow
def test_quick_study_records_match_the_study(quick_study):
    study_dir, settings = quick_study
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'study.db'}")
    best = json.loads((study_dir / BEST_PARAMS_FILE).read_text())
    assert (best["trial"], best["value"], best["params"]) == (study.best_trial.number, study.best_value, study.best_params)
    rows = list(csv.DictReader((study_dir / TRIALS_CSV).open()))
    assert [int(r["number"]) for r in rows] == [t.number for t in study.get_trials()] == [0, 1, 2]
    for row, trial in zip(rows, study.get_trials()):
        assert row["state"] == trial.state.name
        assert json.loads(row["intermediate_values"]) == {str(k): v for k, v in trial.intermediate_values.items()}
        assert float(row["param_learning_rate"]) == pytest.approx(trial.params["learning_rate"])
    summary = json.loads((study_dir / SUMMARY_FILE).read_text())
    assert summary["trials"]["complete"] == 3 and summary["best"]["trial"] == study.best_trial.number
    # Light mode: a trial folder holds metrics but no checkpoints or predictions.
    folder = trial_dir(settings, 0)
    assert (folder / "metrics_epoch1.json").is_file()
    assert not list(folder.glob("*.pt")) and not list(folder.glob("predictions_*"))


@pytest.mark.slow
def test_best_config_runs_with_the_recipe_as_is(quick_study):
    import train_sonar_finetuning as recipe

    study_dir, _ = quick_study
    text = (study_dir / BEST_CONFIG_FILE).read_text()
    best = json.loads((study_dir / BEST_PARAMS_FILE).read_text())
    assert text.startswith(f"# Best trial of Optuna study 'tiny'")
    assert f"trial {best['trial']}, val loss {best['value']:.4f}" in text.splitlines()[0]
    cfg = config_from_sources({}, study_dir / BEST_CONFIG_FILE)
    assert cfg.learning_rate == pytest.approx(best["params"]["learning_rate"])
    assert cfg.subset_fraction is None and cfg.max_samples is None and cfg.save_checkpoints
    assert recipe.main(["--config", str(study_dir / BEST_CONFIG_FILE)]) == 0
    assert (Path(cfg.output_dir) / "best_encoder.pt").is_file()


@pytest.mark.slow
def test_train_from_tuning_applies_overrides(quick_study, tmp_path):
    study_dir, _ = quick_study
    out = tmp_path / "final"
    assert cli(["train-from-tuning", "--study_dir", str(study_dir), "--epochs", "2", "--max_samples", "16",
                "--output_dir", str(out)]) == 0
    record = json.loads((out / "config.json").read_text())["settings"]
    best = json.loads((study_dir / BEST_PARAMS_FILE).read_text())
    assert (record["epochs"], record["max_samples"]) == (2, 16)
    assert record["learning_rate"] == pytest.approx(best["params"]["learning_rate"])
    assert (out / "metrics_epoch2.json").is_file()


def test_train_from_tuning_without_a_finished_study_is_one_line(tmp_path, capsys):
    assert cli(["train-from-tuning", "--study_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "best_config.yaml" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------
# Pruning and failures
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pruned_trial_stops_training_early(tiny_demo, tmp_path):
    path = write_tuning_yaml(
        tiny_demo, tmp_path / "study", epochs=2, pruner={"type": "median", "n_startup_trials": 1},
        search_space={"learning_rate": {"type": "float", "low": 1e-8, "high": 1e-1, "log": True}},
    )
    settings = load_settings(path)
    study = open_study(settings)
    study.enqueue_trial({"learning_rate": 1e-2})  # learns: completes and sets the median
    study.enqueue_trial({"learning_rate": 1e-8})  # barely moves: worse than the median after epoch 1
    run_study(settings, progress=False)
    good, bad = study.get_trials()
    assert good.state == optuna.trial.TrialState.COMPLETE and sorted(good.intermediate_values) == [1, 2]
    assert bad.state == optuna.trial.TrialState.PRUNED
    assert sorted(bad.intermediate_values) == [1]
    # Training really stopped: no epoch after the pruning point was run.
    assert sorted(p.name for p in trial_dir(settings, bad.number).glob("metrics_epoch*.json")) == ["metrics_epoch1.json"]


@pytest.mark.slow
def test_trials_of_one_worker_read_each_feature_file_once_with_the_cache(tiny_demo, tmp_path, request):
    path = write_tuning_yaml(tiny_demo, tmp_path / "study", n_trials=3, cache_features=True, cache_dtype="fp16")
    settings = load_settings(path)
    reads = request.getfixturevalue("npy_reads")  # counting starts here, after the set-up
    report = run_study(settings, progress=False)
    assert report.counts["complete"] == 3
    # The first trial's scan fills the cache; later trials and their epochs read nothing (without
    # the reuse: once per trial). The demo manifests list lengths, so the pre-flight reads no file.
    assert len(reads) == 24 + 16 and set(reads.values()) == {1}, reads  # max_samples 24 + all 16 val clips
    assert {p.name for p in trial_dir(settings, 2).glob("metrics_epoch*.json")} == {"metrics_epoch1.json"}


@pytest.mark.slow
def test_diverging_trial_is_recorded_failed_and_the_study_goes_on(tiny_demo, tmp_path):
    # Batches of 2: the diverged trial reaches the recipe's limit of non-finite steps within its epoch.
    path = write_tuning_yaml(
        tiny_demo, tmp_path / "study", sampler="grid", batch_size=2,
        search_space={"learning_rate": {"type": "categorical", "choices": [1.0e-3, 1.0e+30]}},
    )
    report = run_study(load_settings(path), progress=False)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    by_lr = {t.params["learning_rate"]: t for t in study.get_trials()}
    failed, fine = by_lr[1.0e30], by_lr[1.0e-3]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "non-finite" in failed.user_attrs[FAIL_REASON] and failed.user_attrs[FAIL_KIND] == "trial"
    assert fine.state == optuna.trial.TrialState.COMPLETE
    assert report.best_trial == fine.number
    row = next(r for r in csv.DictReader((tmp_path / "study" / TRIALS_CSV).open()) if int(r["number"]) == failed.number)
    assert "non-finite" in row["fail_reason"]


@pytest.mark.slow
def test_unexpected_error_in_a_trial_is_recorded_with_its_traceback(tiny_demo, tmp_path, monkeypatch):
    from sonar_ft.tune import objective

    real_train = objective.fine_tune

    def train_failing_at_high_lr(cfg, **kwargs):
        if cfg.learning_rate > 5e-3:
            raise RuntimeError("injected failure")
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(objective, "fine_tune", train_failing_at_high_lr)
    path = write_tuning_yaml(tiny_demo, tmp_path / "study", sampler="grid",
                             search_space={"learning_rate": {"type": "categorical", "choices": [1.0e-3, 1.0e-2]}})
    settings = load_settings(path)
    run_study(settings, progress=False)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    by_lr = {t.params["learning_rate"]: t for t in study.get_trials()}
    assert by_lr[1.0e-3].state == optuna.trial.TrialState.COMPLETE
    failed = by_lr[1.0e-2]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs[FAIL_REASON] == "RuntimeError: injected failure"
    assert "train_failing_at_high_lr" in (trial_dir(settings, failed.number) / "error.txt").read_text()


@pytest.mark.slow
def test_trial_that_runs_out_of_gpu_memory_is_recorded_failed_and_the_study_goes_on(tiny_demo, tmp_path, monkeypatch):
    import torch

    from sonar_ft.models.decoder import FrozenTextDecoder

    real_loss = FrozenTextDecoder.loss

    def loss_with_a_small_gpu(self, embeddings, texts, *args, **kwargs):
        if len(texts) > 4:  # as if batches of more than 4 clips did not fit the GPU
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_loss(self, embeddings, texts, *args, **kwargs)

    monkeypatch.setattr(FrozenTextDecoder, "loss", loss_with_a_small_gpu)
    path = write_tuning_yaml(tiny_demo, tmp_path / "study", sampler="grid",
                             search_space={"batch_size": {"type": "categorical", "choices": [8, 4]}})
    tuning = yaml.safe_load(path.read_text())
    del tuning["batch_size"]  # searched, not fixed
    path.write_text(yaml.safe_dump(tuning, sort_keys=False), encoding="utf-8")
    report = run_study(load_settings(path), progress=False)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    by_batch = {t.params["batch_size"]: t for t in study.get_trials()}
    assert by_batch[4].state == optuna.trial.TrialState.COMPLETE and report.best_trial == by_batch[4].number
    failed = by_batch[8]
    assert failed.state == optuna.trial.TrialState.FAIL
    assert failed.user_attrs[FAIL_REASON].startswith("the GPU ran out of memory at --batch_size 8")
    assert "--grad_accum" in failed.user_attrs[FAIL_REASON]  # the recipe's advice is kept


# ------------------------------------------------------------------------------------------------
# Storage
# ------------------------------------------------------------------------------------------------
def test_storage_settings_resolve_to_sqlite_url_or_journal_file(tmp_path):
    from sonar_ft.tune.storage import describe_storage, resolve_storage

    assert resolve_storage(None, tmp_path) == ("rdb", f"sqlite:///{tmp_path.resolve() / 'study.db'}")
    assert resolve_storage(str(tmp_path / "s.db"), tmp_path) == ("rdb", f"sqlite:///{tmp_path.resolve() / 's.db'}")
    assert resolve_storage("postgresql://u:pw@h/db", tmp_path) == ("rdb", "postgresql://u:pw@h/db")
    assert resolve_storage("journal:/x/study", tmp_path) == ("journal", "/x/study")
    assert resolve_storage("/x/study.log", tmp_path) == ("journal", "/x/study.log")
    assert "pw" not in describe_storage("postgresql://u:pw@h/db", tmp_path)
    with pytest.raises(ConfigError, match="--storage 'postgres//h/db' is neither"):
        resolve_storage("postgres//h/db", tmp_path)


@pytest.mark.slow
def test_study_in_a_journal_file(tiny_demo, tmp_path):
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal = tmp_path / "shared" / "study.log"
    path = write_tuning_yaml(tiny_demo, tmp_path / "study", n_trials=1, storage=f"journal:{journal}")
    report = run_study(load_settings(path), progress=False)
    study = optuna.load_study(study_name="tiny", storage=JournalStorage(JournalFileBackend(str(journal))))
    trials = study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE], [t.user_attrs for t in trials]
    assert report.best_value == study.best_value
    assert not (tmp_path / "study" / "study.db").exists()


# ------------------------------------------------------------------------------------------------
# Resume and changed search space
# ------------------------------------------------------------------------------------------------
# Loaded by a worker started with ``_worker_env(tmp_path, signal_at=(suffix, "SIGINT"))``: the worker
# signals itself right after it writes a file whose path ends with ``suffix`` (every project write
# ends with os.replace, see sonar_ft.files.atomic): the signal lands at a known point of a known trial, however
# fast the tiny demo's trials run.
SIGNAL_SELF = '''
import os, signal
_replace = os.replace
_suffix, _, _name = os.environ.get("SIGNAL_SELF_AT", "").partition("|")
if _name == "SIGINT":
    # A suite started in the background (`cmd &` without job control) hands its children SIGINT
    # ignored, and Python then keeps it ignored: give the worker the Ctrl-C a terminal would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
def _replace_then_signal(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if _suffix and os.fspath(dst).endswith(_suffix):
        os.kill(os.getpid(), getattr(signal, _name))
os.replace = _replace_then_signal
'''


def _worker_env(tmp_path: Path | None = None, signal_at: tuple[str, str] | None = None) -> dict[str, str]:
    # One thread per worker: two workers on two cores must not fight over threads.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    if signal_at:
        site = tmp_path / "signal_site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SIGNAL_SELF)
        env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), SIGNAL_SELF_AT="|".join(signal_at))
    return env


def _tune_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sonar_ft.cli", "tune", "--config", str(config), "--no_progress", *extra]


@pytest.mark.slow
def test_interrupted_sqlite_study_resumes_where_it_stopped(tiny_demo, tmp_path):
    study_dir = tmp_path / "study"
    path = write_tuning_yaml(tiny_demo, study_dir, n_trials=3, epochs=2)
    storage = f"sqlite:///{study_dir / 'study.db'}"
    # Ctrl-C in the middle of the second trial: epoch 1 reported, epoch 2's metrics just written.
    env = _worker_env(tmp_path, signal_at=("trial_0001/metrics_epoch2.json", "SIGINT"))
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.run(_tune_command(path), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=240)
    assert worker.returncode == 130, (tmp_path / "worker.log").read_text()[-2000:]
    study = optuna.load_study(study_name="tiny", storage=storage)
    interrupted, queued = study.get_trials()[1:]
    assert interrupted.number == 1 and sorted(interrupted.intermediate_values) == [1]
    assert len(finished(study)) == 1 and not counts_towards_budget(interrupted)
    # Its parameters wait to run again, as a dead worker's would.
    assert queued.state == optuna.trial.TrialState.WAITING and queued.params == interrupted.params

    assert cli(["tune", "--config", str(path), "--no_progress"]) == 0  # the same command again
    trials = study.get_trials()
    done = finished(study)
    assert len(done) == 3
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == 3  # nothing re-run twice
    assert done[1].number == 2 and done[1].params == interrupted.params  # the interrupted parameters did run
    assert [t.number for t in trials] == list(range(len(trials)))

    assert cli(["tune", "--config", str(path), "--no_progress"]) == 0  # complete: nothing more to run
    assert len(study.get_trials()) == len(trials)


def test_changed_search_space_of_an_existing_study_is_a_clear_error(tiny_demo, tmp_path, capsys):
    study_dir = tmp_path / "study"
    open_study(load_settings(write_tuning_yaml(tiny_demo, study_dir)))
    changed = dict(SPACE, learning_rate={"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True})
    path = write_tuning_yaml(tiny_demo, study_dir, search_space=changed)
    assert cli(["tune", "--config", str(path), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "search space of study 'tiny'" in err and "has changed" in err
    assert "learning_rate (high 0.01 -> 0.1)" in err
    assert "--study_name" in err  # says how to go on


# ------------------------------------------------------------------------------------------------
# Several workers on a real PostgreSQL server; a worker killed mid-trial
# ------------------------------------------------------------------------------------------------
def _postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 (data and sockets in a temporary folder)."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        reason = "PostgreSQL server binaries (initdb, pg_ctl) not found; `make system-deps` installs the postgresql package"
        print(f"SKIPPED: {reason}")
        pytest.skip(reason)
    as_user: list[str] = []
    root_dir = Path(tempfile.mkdtemp(prefix="sonarft-pg-"))
    if os.geteuid() == 0:
        # initdb refuses to run as root: run the server as the package's `postgres` user (created if missing).
        import pwd

        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"], check=True)
            user = pwd.getpwnam("postgres")
        os.chown(root_dir, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root_dir / "data", _free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tuner", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root_dir} -c fsync=off -c max_connections=60"
    subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root_dir / "server.log"), "-o", options,
                    "-w", "-t", "60", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg2://tuner@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root_dir, ignore_errors=True)


def _check_records_match_study(study: optuna.Study, study_dir: Path, n_trials: int) -> None:
    trials = study.get_trials()
    done = finished(study)
    assert len(done) == n_trials, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
    assert len({json.dumps(t.params, sort_keys=True) for t in done}) == n_trials  # no trial run twice
    for t in done:  # no trial lost: each one's training left its metrics in its own folder
        epochs = sorted(study_dir.glob(f"trials/trial_{t.number:04d}/metrics_epoch*.json"))
        assert len(epochs) == t.user_attrs["epochs_run"], t.number
    rows = list(csv.DictReader((study_dir / TRIALS_CSV).open()))
    assert sorted(int(r["number"]) for r in rows) == [t.number for t in trials]
    best = json.loads((study_dir / BEST_PARAMS_FILE).read_text())
    assert (best["trial"], best["value"], best["params"]) == (study.best_trial.number, study.best_value, study.best_params)


@pytest.mark.slow
def test_workers_share_a_postgres_study_and_a_killed_workers_trial_fails_by_heartbeat(tiny_demo, tmp_path, postgres_url):
    study_dir = tmp_path / "study"
    grace = 10  # long enough that a loaded machine does not starve a live worker's heartbeat that long
    path = write_tuning_yaml(tiny_demo, study_dir, n_trials=4, epochs=2, study_name="shared",
                             sampler={"type": "tpe", "seed": 0}, pruner="none",
                             heartbeat_interval=1, grace_period=grace)
    env = _worker_env()

    # 1. Two workers, one study.
    logs = [(tmp_path / f"worker{i}.log").open("w") for i in range(2)]
    workers = [subprocess.Popen(_tune_command(path, "--storage", postgres_url), cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT) for log in logs]
    try:
        codes = [w.wait(timeout=240) for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert codes == [0, 0], [(tmp_path / f"worker{i}.log").read_text()[-2000:] for i in range(2)]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    _check_records_match_study(study, study_dir, 4)
    ran_by = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in study.get_trials()}
    assert ran_by == {str(w.pid) for w in workers}  # both took part

    # 2. The study grows to 6 trials; its worker is killed (SIGKILL) in the middle of a trial.
    #    It kills itself inside its first trial (trial_0004 or later): epoch 1 reported, epoch 2's metrics written.
    killer = _worker_env(tmp_path, signal_at=("metrics_epoch2.json", "SIGKILL"))
    with (tmp_path / "killed.log").open("w") as log:
        victim = subprocess.Popen(_tune_command(path, "--storage", postgres_url, "--n_trials", "6"), cwd=REPO,
                                  env=killer, stdout=log, stderr=subprocess.STDOUT)
        assert victim.wait(timeout=240) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    running = next(t for t in study.get_trials() if t.user_attrs.get("worker", "").endswith(f":{victim.pid}"))
    assert running.state == optuna.trial.TrialState.RUNNING  # nobody told Optuna
    assert sorted(running.intermediate_values) == [1]  # it died inside the trial, after epoch 1
    time.sleep(grace + 1.5)  # the grace period passes without a heartbeat

    # 3. A new worker declares the trial dead, re-runs its parameters and finishes the study.
    log = (tmp_path / "rescuer.log").open("w")
    rescuer = subprocess.run(_tune_command(path, "--storage", postgres_url, "--n_trials", "6"), cwd=REPO, env=env,
                             stdout=log, stderr=subprocess.STDOUT, timeout=240)
    assert rescuer.returncode == 0, (tmp_path / "rescuer.log").read_text()[-2000:]
    dead = study.get_trials()[running.number]
    assert dead.state == optuna.trial.TrialState.FAIL and FAIL_REASON not in dead.user_attrs
    retried = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == running.number]
    assert len(retried) == 1 and retried[0].state == optuna.trial.TrialState.COMPLETE
    assert retried[0].params == dead.params
    _check_records_match_study(study, study_dir, 6)
    row = next(r for r in csv.DictReader((study_dir / TRIALS_CSV).open()) if int(r["number"]) == running.number)
    assert "heartbeat" in row["fail_reason"]
