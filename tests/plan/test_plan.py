"""Memory estimates and the settings ``sonar-ft plan`` recommends."""

from __future__ import annotations

import pytest
import torch

from sonar_ft import cli
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder
from sonar_ft.errors import ConfigError
from sonar_ft.plan.memory import GIB, encoder_activation_bytes, estimate_memory, measure_saved_bytes, sonar_decoder_spec
from sonar_ft.plan.recommend import GPUS, recommend

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
    frozen_late = estimate_memory(batch_size=4, grad_accum=2, freeze_encoder_layers=12)
    full_late = estimate_memory(batch_size=4, grad_accum=2)
    assert frozen["optimizer_states"] < full["optimizer_states"] and frozen_late["gradients"] < full_late["gradients"]
    # bitsandbytes' layout: a byte per moment and element, an fp32 absmax per 256, fp32 for small tensors
    assert eight["optimizer_states"] == pytest.approx(full["optimizer_states"] / 4, rel=0.03)
    assert eight["optimizer_states"] > full["optimizer_states"] // 4


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
    with pytest.raises(ConfigError, match="unknown --gpu .v100.*auto, t4, l4, a100, a100-80, h100"):
        recommend("v100", 32)


def test_plan_command_prints_the_breakdown_and_flags(capsys):
    assert cli.main(["plan", "--gpu", "t4", "--effective_batch", "32"]) == 0
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


# ------------------------------------------------------------------------------------------------
# --gpu auto, the Colab GPUs, the disk plan
# ------------------------------------------------------------------------------------------------
from sonar_ft.plan.disk import GB, checkpoint_sizes
from sonar_ft.plan.recommend import detect_gpu  # noqa: E402

ROOT_DIR = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("gpu", ["t4", "l4", "a100", "a100-80", "h100"])
@pytest.mark.parametrize("effective_batch", [8, 32], ids=["quick_test", "full_run"])
def test_quick_test_and_full_run_fit_every_colab_gpu(gpu, effective_batch):
    plan = recommend(gpu, effective_batch)
    assert plan.fits, plan.format_table()
    assert plan.settings["freeze_encoder_layers"] == 0  # full fine-tuning everywhere


def test_what_a_plan_recommends_is_installed_by_the_requirements():
    from packaging.requirements import Requirement

    optimizers = {recommend(g, b).settings["optimizer"] for g in GPUS for b in (8, 32)}
    assert "adamw8bit" in optimizers  # the T4 needs it
    lines = [l.split(" #")[0].strip() for l in (ROOT_DIR / "requirements.txt").read_text().splitlines()]
    [bnb] = [Requirement(l) for l in lines if l.startswith("bitsandbytes")]
    assert bnb.marker.evaluate({"sys_platform": "linux"}) and not bnb.marker.evaluate({"sys_platform": "darwin"})


def test_gpu_auto_reads_nvidia_smi_when_torch_sees_none(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t4 = detect_gpu(run=lambda cmd: "Tesla T4, 15360, 7.5\n")
    assert t4.name == "Tesla T4" and t4.memory_bytes == 15 * GIB and not t4.bf16
    assert detect_gpu(run=lambda cmd: "NVIDIA L4, 23034, 8.9\n").bf16
    assert recommend(t4, 32).fits


def test_gpu_auto_on_a_cpu_runtime_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_smi(cmd):
        raise FileNotFoundError("nvidia-smi")

    with pytest.raises(ConfigError, match="found no GPU.*Change runtime type > T4 GPU.*--gpu t4"):
        detect_gpu(run=no_smi)


def test_official_checkpoint_sizes_from_the_parameter_counts():
    best, last = checkpoint_sizes()
    assert round(best / GB, 1) == 3.0 and round(last / GB, 1) == 9.0
    assert round(checkpoint_sizes(optimizer="adamw8bit")[1] / GB, 1) == 4.5


def test_plan_command_prints_the_disk_plan_and_writes_json(tmp_path, capsys):
    import json

    assert cli.main(["plan", "--gpu", "h100", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "disk plan (local-only)" in out and "Drive peak over 30 epochs" in out and "--state_dir" in out
    assert "fits (slots-1, Drive peak 15.0 GB) with: keep the encoder download and the decoder cache on local disk" in out
    record = json.loads((tmp_path / "plan.json").read_text())
    assert record["flags"][:2] == ["--batch_size", "32"] and round(record["disk"]["last_gb"], 1) == 9.0 and record["fits"]
    assert record["disk"]["needs_state_dir"] and record["disk"]["flags"] == ["--state_slots", "0"]
    assert [a["strategy"] for a in record["disk"]["alternatives"]] == ["slots-1", "slots-2"]


def test_plan_command_gpu_auto_on_cpu_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sonar_ft.plan.recommend._nvidia_smi", lambda cmd: "")
    assert cli.main(["plan", "--gpu", "auto"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "found no GPU" in err[0]
