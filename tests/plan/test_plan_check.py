"""The plan check (benchmarks/plan_check.py) at tiny shapes: the tracker's account, fake against real tensors, and the planner's ratios."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import plan_check as pc  # noqa: E402
from sonar_ft.plan.memory import BNB_BLOCK, adamw8bit_state_bytes  # noqa: E402


@pytest.fixture(scope="module")
def measured() -> dict[tuple[str, str, bool], dict]:
    """Smoke-size measurements shared by the tests (a few seconds each)."""
    return {(gpu, mode, fake): pc.check_profile(gpu, mode, pc.SMOKE, fake=fake)
            for gpu, mode in (("t4", "full"), ("a100", "lora")) for fake in (True, False)}


@pytest.mark.parametrize("gpu,mode", [("t4", "full"), ("a100", "lora")])
def test_fake_tensors_count_the_same_bytes_as_real_ones(measured, gpu, mode):
    fake, real = measured[(gpu, mode, True)], measured[(gpu, mode, False)]
    assert real["measured_bytes"]["total"] > 0
    for category, value in real["measured_bytes"].items():
        assert fake["measured_bytes"][category] == pytest.approx(value, rel=0.01), category


@pytest.mark.parametrize("gpu,mode", [("t4", "full"), ("a100", "lora")])
def test_the_plan_meets_the_goal_at_smoke_size(measured, gpu, mode):
    record = measured[(gpu, mode, True)]
    ratio = record["ratio"]
    assert abs(ratio["total"] - 1) <= pc.TOTAL_GOAL, ratio
    for category in pc.CATEGORIES:
        assert ratio[category] is None or abs(ratio[category] - 1) <= pc.CATEGORY_GOAL, (category, ratio)


def test_the_tracker_sees_weights_states_and_activations(measured):
    m = measured[("t4", "full", False)]["measured_bytes"]
    assert m["weights"] > 0 and m["optimizer_states"] > 0 and m["frozen_decoder"] > 0 and m["activations"] > 0


def test_eight_bit_adamw_state_follows_the_bitsandbytes_layout():
    # A byte per element and moment plus an fp32 absmax per 256-element block; fp32 moments under 4,096 elements.
    assert adamw8bit_state_bytes([4096]) == 2 * (4096 + 4 * (4096 // BNB_BLOCK))
    assert adamw8bit_state_bytes([4097]) == 2 * (4097 + 4 * 17)
    assert adamw8bit_state_bytes([100]) == 800


def test_report_table_names_every_profile_and_category(measured):
    report = {"smoke": True, "torch": "x", "date": "today", "seconds": 1.0,
              "profiles": [measured[("t4", "full", True)], {"profile": "l4/full", "error": "RuntimeError: boom"}]}
    text = pc.markdown(report)
    assert "t4/full" in text and "l4/full" in text and "boom" in text
    for category in pc.CATEGORIES:
        assert category.replace("_", " ") in text
