"""LoRA fine-tuning (``--lora_rank``): it learns from a pretrained start, its files are what users know
(a merged official-layout ``best_encoder.pt``, a peft adapter folder, a small ``last.pt``), it resumes
exactly after SIGKILL, the planner knows it, and tuning can search it.

The runs start from a tiny demo whose starting encoder was pretrained on a shifted source domain
(``SourceDomain``), as ``make demo`` builds it at full demo size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from sonar_ft.demo.paths import DemoPaths
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder, load_encoder
from sonar_ft.errors import CheckpointError, ConfigError
from sonar_ft.files.atomic import load_torch
from tests.conftest import recipe_args
from tests.numerics import assert_close_to_scale

RECIPE = Path(__file__).resolve().parents[2] / "train_sonar_finetuning.py"
LORA_FLAGS = ["--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0.1"]
COMPARED = ("epoch", "train_loss", "val_loss", "val_bleu", "val_chrf", "lr", "is_best")

def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    # One thread: spinning OpenMP workers slow a tiny model down several-fold on a busy machine.
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns  # an atomic replace changes the inode


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 600) -> bool:
    """Poll until ``ready()``; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the run made no progress in time")


def _run(demo: DemoPaths, out: Path, *flags: str, log: Path) -> None:
    proc = _start([sys.executable, str(RECIPE), *recipe_args(demo, out, *flags)], log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]


def _metrics(out: Path, epochs: int) -> list[dict]:
    rows = [json.loads((out / f"metrics_epoch{e}.json").read_text()) for e in range(1, epochs + 1)]
    return [{k: r[k] for k in COMPARED} for r in rows]


@pytest.fixture(scope="module")
def lora_run(pretrained_demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One LoRA fine-tuning run of the recipe, as a user types it."""
    out = tmp_path_factory.mktemp("lora_run") / "run"
    _run(pretrained_demo, out, *LORA_FLAGS, "--epochs", "4", "--batch_size", "8", "--learning_rate", "3e-3",
         "--max_gen_len", "16", log=out.parent / "log.txt")
    return out


def _val_batch(demo: DemoPaths, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    clips = [torch.from_numpy(np.load(p).astype("float32")) for p in sorted(demo.split_features("val").glob("*.npy"))[:4]]
    length = max(c.shape[0] for c in clips)
    feats = torch.zeros(len(clips), length, dim)
    mask = torch.zeros(len(clips), length, dtype=torch.bool)
    for i, c in enumerate(clips):
        feats[i, : c.shape[0]], mask[i, : c.shape[0]] = c, True
    return feats, mask


@pytest.mark.slow
def test_lora_trains_and_beats_the_pretrained_start(pretrained_demo, lora_run, tmp_path):
    from sonar_ft.config import make_config
    from sonar_ft.evaluate import evaluate_checkpoint

    start = evaluate_checkpoint(make_config(dict(
        encoder_checkpoint=str(pretrained_demo.encoder_checkpoint), val_features=str(pretrained_demo.split_features("val")),
        val_manifest=str(pretrained_demo.split_manifest("val")), decoder=str(pretrained_demo.decoder_card), device="cpu",
        beam_size=2, max_gen_len=16, eval_only=True, output_dir=str(tmp_path / "start"))))
    history = _metrics(lora_run, 4)
    best = min(h["val_loss"] for h in history)
    assert best < start["loss"] - 0.05, (start["loss"], history)
    assert max(h["val_bleu"] for h in history) >= start["bleu"]


@pytest.mark.slow
def test_merged_best_encoder_equals_start_plus_adapter(pretrained_demo, lora_run):
    from peft import PeftModel

    merged, config = load_encoder(lora_run / "best_encoder.pt")  # the official layout, strict load
    start, _ = load_encoder(pretrained_demo.encoder_checkpoint)
    with_adapter = PeftModel.from_pretrained(start, lora_run / "adapter").eval()
    feats, mask = _val_batch(pretrained_demo, config.feature_dim)
    with torch.no_grad():
        ours, theirs = merged(feats, mask), with_adapter(feats, mask)
    assert_close_to_scale(ours, theirs)
    original, _ = load_encoder(pretrained_demo.encoder_checkpoint)  # (from_pretrained changed `start` in place)
    with torch.no_grad():
        assert (original(feats, mask) - ours).abs().max() > 1e-3  # the adapter changed something


@pytest.mark.slow
def test_last_pt_holds_only_what_trains(lora_run):
    state = load_torch(lora_run / "last.pt")
    keys = set(state["encoder"])
    assert keys and all(".lora_" in k or ".modules_to_save." in k for k in keys), sorted(keys)[:5]
    trained = sum(t.numel() for t in state["encoder"].values())
    full = sum(t.numel() for t in load_torch(lora_run / "best_encoder.pt")["student"].values())
    assert trained < 0.6 * full  # the tiny encoder is mostly adapter-sized; at official size it is ~1%
    assert (lora_run / "last.pt").stat().st_size < 0.6 * 3 * (lora_run / "best_encoder.pt").stat().st_size


@pytest.mark.slow
def test_lora_run_resumes_exactly_after_sigkill(pretrained_demo, tmp_path):
    flags = [*LORA_FLAGS, "--epochs", "2", "--batch_size", "8", "--max_samples", "48", "--seed", "7",
             "--checkpoint_every_steps", "2", "--max_gen_len", "16", "--learning_rate", "3e-3"]
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    log = tmp_path / "runs.log"
    _run(pretrained_demo, reference, *flags, log=log)

    cmd = [sys.executable, str(RECIPE), *recipe_args(pretrained_demo, interrupted, *flags)]
    proc = _start(cmd, log)
    seen = [_stamp(interrupted / "last.pt")]

    def second_checkpoint() -> bool:
        stamp = _stamp(interrupted / "last.pt")
        if stamp is not None and stamp != seen[-1]:
            seen.append(stamp)
        return len(seen) > 2

    assert _wait_for(proc, second_checkpoint)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert _start(cmd, log).wait(timeout=600) == 0, log.read_text()[-3000:]

    assert "resuming" in log.read_text()
    assert _metrics(interrupted, 2) == _metrics(reference, 2)
    ours = load_torch(interrupted / "best_encoder.pt")["student"]
    theirs = load_torch(reference / "best_encoder.pt")["student"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_last_pt_of_other_lora_settings_is_a_clear_error():
    from sonar_ft.models import lora

    config = SignT5Config(feature_dim=8, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                          vocab_size=4, output_dim=16)
    settings = types.SimpleNamespace(lora_rank=2, lora_alpha=4.0, lora_dropout=0.0, lora_targets="q,v",
                                     lora_trainable="", freeze_encoder_layers=0, compile=False)
    model, params = lora.apply_lora(SignT5SonarEncoder(config), settings)
    state = lora.trainable_state_dict(model)
    # q and v of 3 attentions (encoder self-, decoder self- and cross-attention), A and B each
    assert len(state) == len(params) == 3 * 2 * 2
    other, _ = lora.apply_lora(SignT5SonarEncoder(config), types.SimpleNamespace(**{**vars(settings), "lora_targets": "q,k,v"}))
    with pytest.raises(CheckpointError, match="other LoRA settings"):
        lora.load_trainable_state_dict(other, state)


@pytest.mark.parametrize("flags, needle", [
    (["--lora_rank", "-1"], "--lora_rank"),
    (["--lora_rank", "4", "--lora_alpha", "0"], "--lora_alpha"),
    (["--lora_rank", "4", "--lora_dropout", "1.0"], "--lora_dropout"),
    (["--lora_rank", "4", "--freeze_encoder_layers", "1"], "--freeze_encoder_layers"),
])
def test_bad_lora_settings_name_the_flag(flags, needle):
    from sonar_ft.config import make_config

    values = {flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags), 2)}
    cfg = make_config({**values, "encoder_checkpoint": "x", "val_features": "x", "val_manifest": "x", "eval_only": True})
    with pytest.raises(ConfigError, match=needle):
        cfg.validate()


def test_unknown_lora_target_is_a_clear_error():
    from sonar_ft.models import lora

    settings = types.SimpleNamespace(lora_rank=2, lora_alpha=4.0, lora_dropout=0.0, lora_targets="q,query",
                                     lora_trainable="", freeze_encoder_layers=0, compile=False)
    config = SignT5Config(feature_dim=8, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_encoder_layers=1, num_decoder_layers=1,
                          vocab_size=4, output_dim=16)
    with pytest.raises(ConfigError, match="--lora_targets names query"):
        lora.apply_lora(SignT5SonarEncoder(config), settings)


# ------------------------------------------------------------------------------------------------
# The planner
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpu", ["t4", "l4", "a100", "h100"])
def test_planner_has_a_lora_estimate_for_each_gpu(gpu):
    from sonar_ft.plan.disk import disk_estimate
    from sonar_ft.plan.memory import estimate_memory
    from sonar_ft.plan.recommend import recommend, recommend_lora

    plan = recommend_lora(gpu, 32, rank=16)
    assert plan.fits and plan.settings["lora_rank"] == 16 and "--lora_rank" in plan.flags()
    est = plan.estimate
    full = recommend(gpu, 32)
    trained = estimate_memory(batch_size=1, optimizer="adamw")  # full fine-tuning's gradients and AdamW moments
    assert est["gradients"] + est["optimizer_states"] < 0.05 * (trained["gradients"] + trained["optimizer_states"])
    assert plan.settings["batch_size"] >= full.settings["batch_size"]  # LoRA fits at least as large a per-step batch
    same = estimate_memory(batch_size=plan.settings["batch_size"], precision=plan.settings["precision"],
                           decoder_dtype=plan.settings["decoder_dtype"], gradient_checkpointing=plan.settings["gradient_checkpointing"],
                           loss_chunk_size=plan.settings["loss_chunk_size"])
    assert est["total"] < same["total"]
    disk_lora, disk_full = disk_estimate(rank=16), disk_estimate(rank=0)
    assert disk_lora["last_pt"] < 0.05 * disk_full["last_pt"] and disk_lora["adapter"] > 0


def test_planner_on_a_t4_picks_plain_adamw_and_less_memory_with_lora():
    from sonar_ft.plan.recommend import recommend, recommend_lora

    full, lora_plan = recommend("t4", 32), recommend_lora("t4", 32, rank=16)
    assert full.settings["optimizer"] == "adamw8bit"  # full fine-tuning needs 8-bit AdamW on a T4
    assert lora_plan.settings["optimizer"] == "adamw"
    # Both reach micro-batch 32 with checkpointing (measured: benchmarks/plan_check.py); LoRA's peak is lower.
    assert lora_plan.settings["batch_size"] >= full.settings["batch_size"]
    assert lora_plan.estimate["total"] < 0.8 * full.estimate["total"]


def test_plan_command_prints_the_lora_plan_and_file_sizes(capsys):
    from sonar_ft import cli

    assert cli.main(["plan", "--gpu", "t4", "--lora_rank", "16"]) == 0
    out = capsys.readouterr().out
    assert "--lora_rank 16" in out and "--optimizer adamw " in out and "adapter/" in out and "fits" in out


def test_lora_counts_match_peft():
    from sonar_ft.models import lora
    from sonar_ft.plan.memory import lora_counts

    config = SignT5Config(feature_dim=8, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                          vocab_size=4, output_dim=16)
    settings = types.SimpleNamespace(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, lora_targets=lora.DEFAULT_TARGETS,
                                     lora_trainable=lora.DEFAULT_TRAINABLE, freeze_encoder_layers=0, compile=False)
    model, _ = lora.apply_lora(SignT5SonarEncoder(config), settings)
    counts = lora_counts(config, 4)
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert adapters == counts.adapters
    assert lora.count_trainable(model) == counts.trainable


# ------------------------------------------------------------------------------------------------
# Tuning
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tuning_study_searches_lora_rank(pretrained_demo, tmp_path):
    from sonar_ft.cli import main as cli
    from sonar_ft.tune.settings import load_settings
    from sonar_ft.tune.study import open_study
    from tests.tune.test_study import write_tuning_yaml

    space = {
        "lora_rank": {"type": "categorical", "choices": [0, 4]},
        "lora_alpha": {"type": "categorical", "choices": [8.0, 16.0], "when": {"lora_rank": {"gt": 0}}},
        "lora_dropout": {"type": "float", "low": 0.0, "high": 0.2, "step": 0.1, "when": {"lora_rank": {"gt": 0}}},
    }
    path = write_tuning_yaml(pretrained_demo, tmp_path / "study", n_trials=3, search_space=space,
                             sampler={"type": "random", "seed": 1})
    assert cli(["tune", "--config", str(path), "--no_progress"]) == 0
    study = open_study(load_settings(path))
    trials = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert len(trials) == 3
    ranks = {t.params["lora_rank"] for t in trials}
    assert ranks == {0, 4}, ranks  # the seed is chosen so that both kinds run
    for t in trials:
        assert ("lora_alpha" in t.params) == (t.params["lora_rank"] > 0)
        settings = json.loads((tmp_path / "study" / "trials" / f"trial_{t.number:04d}" / "config.json").read_text())["settings"]
        assert settings["lora_rank"] == t.params["lora_rank"]


@pytest.mark.slow
def test_lora_under_torchrun_matches_one_process(pretrained_demo, tmp_path):
    common = [*LORA_FLAGS, "--lora_dropout", "0", "--epochs", "1", "--max_samples", "32", "--grad_accum", "2",
              "--learning_rate", "1e-3", "--dropout", "0", "--max_gen_len", "16"]
    single, multi = tmp_path / "single", tmp_path / "ddp"
    _run(pretrained_demo, single, "--batch_size", "8", *common, log=tmp_path / "single.log")
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(RECIPE),
           *recipe_args(pretrained_demo, multi, "--batch_size", "4", *common)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    a, b = (json.loads((d / "metrics_epoch1.json").read_text()) for d in (single, multi))
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    assert (multi / "adapter" / "adapter_model.safetensors").is_file()
    load_encoder(multi / "best_encoder.pt")  # merged, official layout
