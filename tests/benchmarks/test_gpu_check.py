"""The GPU check (benchmarks/gpu_check.py) cannot rot while no GPU is around: its --smoke mode runs here.

--smoke builds tiny stand-ins (the same builders as the official-size run), runs the recipe with each
GPU profile's planned flags for two short epochs on CPU, a tiny SignHiera's video extraction, and the
ratio measurements; every part must report ok or a reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STATUSES = {"ok", "skipped", "stopped", "does_not_fit", "failed"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu_check_smoke.json").read_text())
    return report, (out / "gpu_check_smoke.md").read_text(), done


def _parts(report: dict) -> list[dict]:
    return [report["build"], *report["profiles"], report["extraction"], *report["ratios"]]


@pytest.mark.slow
def test_every_part_reports_ok_or_a_reason(smoke) -> None:
    report, _, _ = smoke
    for rec in _parts(report):
        assert rec["status"] in STATUSES, rec
        if rec["status"] != "ok":
            assert rec.get("reason"), rec
    assert not [r["name"] for r in _parts(report) if r["status"] == "failed"]


@pytest.mark.slow
def test_stand_ins_have_the_official_layout_and_nllb_vocabulary(smoke) -> None:
    build = smoke[0]["build"]
    assert build["status"] == "ok"
    assert build["encoder"]["keys"] == build["encoder"]["official_layout_keys"]
    tok = build["tokenizer"]
    # fairseq2's NLLB tokenizer adds <pad>, one token per language and 3 data tags: 256,000 -> 256,206.
    assert tok["languages"] == 202 and tok["vocab"] == tok["sentencepiece_pieces"] + 206
    assert build["decoder"]["vocab"] == tok["vocab"]


@pytest.mark.slow
def test_every_planned_gpu_profile_ran_the_recipe(smoke) -> None:
    from sonar_ft.plan.recommend import GPUS

    report, table, _ = smoke
    full = {r["gpu_profile"]: r for r in report["profiles"] if r["mode"] == "full"}
    assert set(full) == set(GPUS)
    for rec in full.values():
        assert rec["status"] == "ok" and rec["fits"] is True, rec
        assert rec["flags"][:2] == ["--batch_size", str(rec["settings_run"]["batch_size"])]
        assert rec["plan_estimate_gib"] > 0
        for key in ("step_seconds", "train_clips_per_s", "train_frames_per_s", "train_target_tokens_per_s", "val_clips_per_s"):
            assert rec[key] > 0, (key, rec)
        assert rec["gpu_profile_name"] in table
    lora = [r for r in report["profiles"] if r["mode"] == "lora"]
    assert len(lora) == len(GPUS)  # run, or skipped with the reason, when the recipe has no --lora_rank


@pytest.mark.slow
def test_ratios_measured_or_skipped_with_reason(smoke) -> None:
    ratios = {r["name"]: r for r in smoke[0]["ratios"]}
    assert set(ratios) == {"ours vs HF T5", "bf16 vs fp32", "fused AdamW vs 8-bit AdamW", "compile on vs off"}
    assert ratios["bf16 vs fp32"]["status"] == "ok" and ratios["bf16 vs fp32"]["ratio"] > 0
    for rec in ratios.values():
        assert rec["status"] != "ok" or rec["ratio"] > 0


@pytest.mark.slow
def test_extraction_is_profiled_through_the_real_path(smoke) -> None:
    report, table, _ = smoke
    rec = report["extraction"]
    assert rec["status"] == "ok", rec
    assert set(rec["model_windows_per_s"]) == {"1", "2"} and all(v > 0 for v in rec["model_windows_per_s"].values())
    assert rec["videos"]["seconds"] == [2.0, 12.0] and rec["windows"] == 3  # 12 s at 30 fps: two windows
    for key in ("decode_crop_frames_per_s", "videos_per_minute", "video_seconds_per_second", "how2sign_hours",
                "how2sign_model_only_hours"):
        assert rec[key] > 0, (key, rec)
    assert "SignHiera extraction" in table and "How2Sign (~80 h of video)" in table


@pytest.mark.slow
def test_smoke_fits_its_budget(smoke) -> None:
    report = smoke[0]
    assert report["smoke"] is True and report["seconds"] < report["budget_s"]
    assert "not GPU figures" in smoke[1]


def test_a_part_over_its_time_limit_is_stopped_and_a_failing_one_reported() -> None:
    from benchmarks.gpu_check import part

    started = time.perf_counter()
    slow = part("slow", lambda: time.sleep(30) or {}, limit_s=1.0, min_s=0)
    assert slow["status"] == "stopped" and "time budget" in slow["reason"]
    assert time.perf_counter() - started < 10
    broken = part("broken", lambda: {}["missing"], limit_s=10.0)
    assert broken["status"] == "failed" and "KeyError" in broken["reason"]
    assert part("late", lambda: {}, limit_s=2.0, min_s=5.0)["status"] == "skipped"
