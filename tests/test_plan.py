"""Memory estimates and the settings ``sonar-ft plan`` recommends."""

from __future__ import annotations

import pytest
import torch

from sonar_ft import cli
from sonar_ft.encoder import SignT5Config, SignT5SonarEncoder
from sonar_ft.errors import ConfigError
from sonar_ft.plan import (
    GIB,
    GPUS,
    encoder_activation_bytes,
    estimate_memory,
    measure_saved_bytes,
    recommend,
    sonar_decoder_spec,
)

SMALL = SignT5Config(feature_dim=64, d_model=128, d_kv=16, d_ff=352, num_heads=8, num_encoder_layers=4, num_decoder_layers=4, dropout=0.0)


def _measured(config: SignT5Config, *, batch_size: int, frames: int, checkpointing: bool) -> int:
    torch.manual_seed(0)
    model = SignT5SonarEncoder(config).train()
    model.gradient_checkpointing = checkpointing
    feats = torch.randn(batch_size, frames, config.feature_dim)
    mask = torch.ones(batch_size, frames, dtype=torch.bool)
    return measure_saved_bytes(lambda: model(feats, mask), exclude=model)


def test_sonar_decoder_size_comes_from_sonar_space():
    spec = sonar_decoder_spec()
    assert spec.vocab == 256_206 and spec.model_dim == 1024 and spec.num_layers == 24
    assert 0.8e9 < spec.params < 1.0e9  # ~0.87B: 24 layers + a tied 256k x 1024 embedding


def test_estimate_grows_with_batch_size():
    totals = [estimate_memory(batch_size=b, precision="bf16", decoder_dtype="bf16")["total"] for b in (1, 2, 4, 8, 16)]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)


def test_checkpointing_reduces_estimated_activations():
    plain = estimate_memory(batch_size=8, gradient_checkpointing=False)
    ckpt = estimate_memory(batch_size=8, gradient_checkpointing=True)
    assert ckpt["activations"] < plain["activations"] / 3
    assert ckpt["weights"] == plain["weights"]


def test_checkpointing_reduces_measured_saved_activations():
    plain = _measured(SMALL, batch_size=2, frames=100, checkpointing=False)
    ckpt = _measured(SMALL, batch_size=2, frames=100, checkpointing=True)
    assert ckpt < plain / 3


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("batch_size,frames", [(2, 100), (4, 64)])
def test_activation_formula_matches_saved_tensors(checkpointing, batch_size, frames):
    # On CPU a learnable attention bias runs unfused ("math") attention; the formula models it.
    measured = _measured(SMALL, batch_size=batch_size, frames=frames, checkpointing=checkpointing)
    formula = encoder_activation_bytes(SMALL, batch_size=batch_size, frames=frames, gradient_checkpointing=checkpointing,
                                       attention="math", transient=False)
    assert formula == pytest.approx(measured, rel=0.10)


def test_freezing_and_8bit_adam_shrink_the_optimizer_states():
    full = estimate_memory(batch_size=4)
    frozen = estimate_memory(batch_size=4, freeze_encoder_layers=12)
    eight = estimate_memory(batch_size=4, optimizer="adamw8bit")
    assert frozen["optimizer_states"] < full["optimizer_states"] and frozen["gradients"] < full["gradients"]
    assert eight["optimizer_states"] == full["optimizer_states"] // 4


def test_t4_plan_fits_full_finetuning_of_the_official_size_at_batch_32():
    plan = recommend("t4", 32)
    s = plan.settings
    assert plan.fits and plan.estimate["total"] <= 16 * 10**9
    assert s["freeze_encoder_layers"] == 0  # full fine-tuning
    assert s["batch_size"] * s["grad_accum"] == 32
    assert s["precision"] == "fp32" and s["decoder_dtype"] == "fp16"  # a T4 has no bf16


def test_bigger_gpus_need_fewer_compromises():
    t4, h100 = recommend("t4", 32), recommend("h100", 32)
    assert h100.settings["batch_size"] >= t4.settings["batch_size"]
    assert h100.settings["optimizer"] == "adamw" and not h100.settings["gradient_checkpointing"]
    assert all(recommend(g, 32).fits for g in GPUS)


def test_unknown_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown --gpu 'v100'.*t4, l4, a100, h100"):
        recommend("v100", 32)


def test_plan_command_prints_the_breakdown_and_flags(capsys):
    assert cli.main(["plan", "--gpu", "t4", "--batch_size", "32"]) == 0
    out = capsys.readouterr().out
    for word in ("weights", "gradients", "optimizer states", "activations", "frozen decoder", "loss", "total", "fits"):
        assert word in out
    assert "--grad_accum" in out and "--decoder_dtype fp16" in out


def test_plan_command_with_unknown_gpu_exits_2_with_one_line(capsys):
    assert cli.main(["plan", "--gpu", "v100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown --gpu" in err[0]


def test_a_plan_that_cannot_fit_says_so():
    plan = recommend("t4", 32, max_frames=20_000)
    assert not plan.fits and plan.estimate["total"] > plan.budget
    assert "does NOT fit" in plan.format_table()
    assert plan.budget < GPUS["t4"].memory_bytes <= 16 * GIB
