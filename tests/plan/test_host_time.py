"""Host RAM and time in the plan: what `sonar-ft plan` prints next to GPU memory and disk."""

from __future__ import annotations

from sonar_ft.cli import main
from sonar_ft.plan.host import COLAB_FREE_RAM, host_plan
from sonar_ft.plan.memory import GIB
from sonar_ft.plan.timing import how2sign_lengths, time_plan


def test_resuming_reads_last_pt_whole_so_adamw_needs_more_host_ram_than_8bit_or_lora():
    adamw, eight, lora = host_plan(optimizer="adamw"), host_plan(optimizer="adamw8bit"), host_plan(lora_rank=16)
    assert adamw.resume > eight.resume > lora.resume
    assert lora.resume == lora.startup  # a LoRA last.pt is small: start-up decides
    assert eight.fits and eight.budget == COLAB_FREE_RAM


def test_time_scales_with_the_gpu_and_checkpointing_costs_a_forward():
    slow, fast = time_plan(100.0), time_plan(200.0)
    assert slow.epoch_s == 2 * fast.epoch_s and slow.run_s == 30 * slow.epoch_s
    assert time_plan(100.0, gradient_checkpointing=True).epoch_s > slow.epoch_s > time_plan(100.0, lora=True).epoch_s


def test_how2sign_like_lengths_stay_under_the_cap():
    stats = how2sign_lengths(600)
    assert 100 < stats.frames < 300 and stats.frames_sq > stats.frames**2


def test_plan_command_prints_host_ram_and_time(capsys, tmp_path):
    import json

    out = tmp_path / "plan.json"
    assert main(["plan", "--gpu", "t4", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "host RAM" in text and "resume last.pt" in text and "30 epochs" in text and "estimate" in text
    record = json.loads(out.read_text())
    assert record["host_ram"]["resume_gib"] * GIB > record["host_ram"]["startup_gib"] * GIB * 0.5
    assert record["time_estimate"]["run_hours"] > 0
