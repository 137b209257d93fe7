"""The disk plan counts all a run puts on Drive, and the trash replaced files leave, over a whole 30-epoch run."""

from __future__ import annotations

import pytest

from sonar_ft import cli
from sonar_ft.plan.disk import DRIVE_FREE_BYTES, GB, DriveUse, Schedule, checkpoint_sizes, disk_plan, simulate

BEST, LAST = checkpoint_sizes()  # the official size with AdamW: 3 GB and 9 GB
FREE_DRIVE = DRIVE_FREE_BYTES


def test_atomic_saves_on_drive_fill_a_free_drive_with_trash():
    use = simulate("drive", BEST, LAST, schedule=Schedule(epochs=30))
    assert use.drive_trash == 29 * LAST + 29 * BEST  # every replaced last.pt and best_encoder.pt
    assert use.drive_peak > 20 * FREE_DRIVE
    # The plan once given here (delete the old copy, then copy): trash too, from the second epoch on.
    assert simulate("mirror-replace", BEST, LAST).drive_trash == 29 * LAST + 29 * BEST


@pytest.mark.parametrize("strategy, copies", [("slots-2", 2), ("slots-1", 1), ("local-only", 0)])
def test_copies_overwritten_in_place_leave_no_trash_however_often_they_are_saved(strategy, copies):
    nothing = DriveUse(encoder=0, decoder_cache=0, tarball=0)
    for saves in (1, 6):
        use = simulate(strategy, BEST, LAST, others=nothing, schedule=Schedule(epochs=30, saves_per_epoch=saves))
        assert use.drive_peak == pytest.approx(BEST + copies * LAST, abs=2000 * 30 * (saves + 1))  # markers only
        assert use.drive_trash < 30 * (saves + 1) * 1000


def test_everything_the_workflow_puts_on_drive_is_counted():
    others = DriveUse(features=int(6 * GB))  # + the encoder download, the decoder cache, the export
    use = simulate("slots-1", BEST, LAST, others=others)
    assert use.drive_peak == pytest.approx(BEST + 6 * GB + others.decoder_cache + BEST + BEST + LAST, abs=100_000)


def test_a_free_drive_holds_full_fine_tuning_only_without_a_copy_of_last_pt():
    plan = disk_plan(optimizer="adamw")
    assert plan.fits and plan.strategy == "local-only" and plan.drive_peak <= FREE_DRIVE
    lean = disk_plan(optimizer="adamw", others=DriveUse(encoder=0, decoder_cache=0))
    assert lean.strategy == "slots-1" and lean.fits and lean.drive_trash < GB / 1000
    assert disk_plan(lora_rank=16).strategy == "slots-2"  # LoRA's last.pt is small: two copies fit with everything
    assert disk_plan(optimizer="adamw", drive_budget=2000 * GB).strategy == "drive"  # a large Drive: keep it simple


def test_a_drive_too_small_for_anything_is_said_with_the_size_needed(capsys):
    assert not disk_plan(others=DriveUse(features=int(10 * GB))).fits
    assert cli.main(["plan", "--gpu", "a100", "--features_gb", "10", "--drive_gb", "15"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "use a Drive with 22.5 GB free" in out
    assert "fits (local-only, Drive peak 16.0 GB) with: keep the encoder download and the decoder cache on local disk" in out


def test_free_space_is_read_from_the_folders(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, 40 * GB if "drive" in str(p) else 5 * GB))
    (tmp_path / "drive").mkdir()
    assert cli.main(["plan", "--gpu", "h100", "--drive_dir", str(tmp_path / "drive" / "runs" / "new"),
                     "--local_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "of 40.0 GB free: fits" in out and "of 5.0 GB free: does NOT fit" in out


def test_the_disk_plan_alone_needs_no_gpu_and_reads_the_encoder_s_size_from_its_file(tmp_path, capsys):
    import json

    from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder, save_encoder

    config = SignT5Config(feature_dim=24, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=1,
                          num_decoder_layers=1, vocab_size=8, output_dim=16)
    save_encoder(SignT5SonarEncoder(config), tmp_path / "enc.pth")
    assert cli.main(["plan", "--disk_only", "--encoder_checkpoint", str(tmp_path / "enc.pth"), "--drive_gb", "5",
                     "--json", str(tmp_path / "plan.json")]) == 0
    disk = json.loads((tmp_path / "plan.json").read_text())["disk"]
    best, state = checkpoint_sizes(config)
    assert disk["strategy"] == "drive" and disk["fits"] and disk["flags"] == []
    assert disk["drive_peak_bytes"] == simulate("drive", best, state).drive_peak  # the official defaults for the rest
    assert "MB" in capsys.readouterr().out  # small sizes are written in their own unit, not "0.0 GB"
    assert cli.main(["plan"]) == 2
    assert "--gpu is required" in capsys.readouterr().err


def test_time_based_saves_are_counted_from_the_estimated_epoch(capsys):
    from sonar_ft.plan.timing import time_plan
    from sonar_ft.plan.recommend import GPUS

    assert cli.main(["plan", "--gpu", "t4", "--checkpoint_every_minutes", "20"]) == 0
    epoch_minutes = time_plan(GPUS["t4"].peak_tflops, gradient_checkpointing=True).epoch_s / 60
    saves = 1 + int(epoch_minutes // 20)
    assert saves > 1 and f"({saves} save(s) of last.pt an epoch)" in capsys.readouterr().out


def test_copies_a_resumed_run_overwrites_in_place_count_as_free_space(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "last.pt", "wb") as f:
        f.truncate(2 * GB)  # sparse: its size is what counts
    args = ["plan", "--gpu", "t4", "--drive_gb", "10", "--resume_dir", str(run)]
    assert cli.main(args) == 0
    assert "of 10.7 GB free" in capsys.readouterr().out  # atomic saves replace last.pt: its bytes go to the trash
    (run / "state_slots.json").write_text("{}")
    assert cli.main(args) == 0
    assert "of 12.7 GB free" in capsys.readouterr().out  # slot copies are overwritten in place
