"""Tests for sonar_ft.inference.extract: ``sonar-ft extract`` end to end on rendered videos with a tiny SignHiera."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sonar_ft import cli
from sonar_ft.data.video import normalise, read_video, write_synthetic_video
from sonar_ft.errors import ConfigError
from sonar_ft.inference.extract import (
    CONFIG_NAME,
    REPORT_NAME,
    ExtractSettings,
    collect_videos,
    extract_features,
    extract_videos,
    read_report,
)
from sonar_ft.models.signhiera import SignHiera, save_signhiera, tiny_config
from tests.numerics import assert_close_to_scale

pytest.importorskip("av")

LENGTHS = {"a": (40, 25), "b": (300, 30), "c": (420, 25)}  # frames, fps: 1, 1 and 3 windows


@pytest.fixture(scope="module")
def model() -> SignHiera:
    return SignHiera(tiny_config()).init_weights(torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, model: SignHiera) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "signhiera.pth"
    save_signhiera(model, path)
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for i, (name, (frames, fps)) in enumerate(LENGTHS.items()):
        write_synthetic_video(folder / f"{name}.mp4", frames, fps=fps, seed=i)
    return folder


def expected_features(model: SignHiera, path: Path) -> torch.Tensor:
    video = read_video(path, crop="center", size=32)
    out = [model.extract(torch.from_numpy(normalise(video.window(w)))[None], [w.padding])[0] for w in video.windows]
    return torch.cat(out)


def extract(videos_or_args: list[str], out: Path, checkpoint: Path, *extra: str) -> int:
    return cli.main(["extract", *videos_or_args, "--signhiera", str(checkpoint), "--out", str(out),
                     "--crop", "center", "--device", "cpu", *extra])


def test_extract_writes_one_feature_file_per_video_equal_to_the_model_on_each_window(
        tmp_path: Path, model: SignHiera, checkpoint: Path, videos: Path, capsys) -> None:
    out = tmp_path / "features"
    assert extract([str(videos)], out, checkpoint, "--batch-size", "3") == 0
    report = read_report(out)
    for name in LENGTHS:
        features = np.load(out / f"{name}.npy")
        assert features.dtype == np.float32 and features.shape[1] == 64
        assert_close_to_scale(torch.from_numpy(features), expected_features(model, videos / f"{name}.mp4"))
        assert report[name]["status"] == "ok" and report[name]["vectors"] == features.shape[0]
    assert report["c"]["windows"] == 3 and report["a"]["frames"] == 40 and report["b"]["fps"] == 30.0
    assert report["b"]["crop_box"] == [16, 0, 80, 64]
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["crop"] == "center" and len(config["signhiera_sha256"]) == 64
    assert "done: 3 extracted" in capsys.readouterr().out


def test_batching_across_videos_does_not_change_the_features(tmp_path: Path, model: SignHiera, videos: Path) -> None:
    jobs = collect_videos([videos])
    one = extract_videos(model, jobs, tmp_path / "one", settings=ExtractSettings(crop="center", batch_size=1))
    many = extract_videos(model, jobs, tmp_path / "many", settings=ExtractSettings(crop="center", batch_size=4, workers=3))
    assert one.done == many.done == ["a", "b", "c"] and many.windows == 5
    for name in LENGTHS:
        assert_close_to_scale(torch.from_numpy(np.load(tmp_path / "many" / f"{name}.npy")),
                              torch.from_numpy(np.load(tmp_path / "one" / f"{name}.npy")))


def test_a_second_run_skips_what_is_done_and_redoes_what_is_missing_or_damaged(
        tmp_path: Path, model: SignHiera, videos: Path) -> None:
    jobs = collect_videos([videos])
    settings = ExtractSettings(crop="center")
    out = tmp_path / "features"
    extract_videos(model, jobs, out, settings=settings)
    good = np.load(out / "c.npy")
    (out / "a.npy").unlink()
    (out / "b.npy").write_bytes((out / "b.npy").read_bytes()[:100])  # damaged
    (out / ".tmp-c.npy.x1").write_bytes(b"half")  # left by a killed run
    again = extract_videos(model, jobs, out, settings=settings)
    assert again.skipped == ["c"] and sorted(again.done) == ["a", "b"]
    assert np.array_equal(np.load(out / "c.npy"), good)
    assert not list(out.glob(".tmp-*"))


def test_bad_videos_are_reported_and_the_rest_go_on(tmp_path: Path, checkpoint: Path, videos: Path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "junk.mp4").write_bytes(b"\x00\x01" * 500)
    write_synthetic_video(bad / "still.mp4", 1)
    out = tmp_path / "features"
    code = extract([str(videos / "a.mp4"), str(bad), str(tmp_path / "gone.mp4")], out, checkpoint)
    assert code == 1
    report = read_report(out)
    assert report["a"]["status"] == "ok"
    assert report["junk"]["status"] == "failed" and "corrupt or not a video" in report["junk"]["reason"]
    assert "still image" in report["still"]["reason"] and "not found" in report["gone"]["reason"]
    assert sorted(p.name for p in out.glob("*.npy")) == ["a.npy"]  # nothing half-written for the bad ones
    printed = capsys.readouterr().out
    assert "1 extracted" in printed and "3 failed" in printed and "failed junk:" in printed


def test_how2sign_csv_and_list_inputs(tmp_path: Path, videos: Path) -> None:
    csv = tmp_path / "how2sign.csv"
    csv.write_text("VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART\tEND\tSENTENCE\n"
                   "v1\tv1-1\ts1\ta\t0.0\t1.0\tHello.\nv1\tv1-1\ts2\tc\t1.0\t2.0\tBye.\n")
    jobs = collect_videos(how2sign_csv=csv, video_dir=videos)
    assert [(j.id, j.path) for j in jobs] == [("a", videos / "a.mp4"), ("c", videos / "c.mp4")]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my clips\n{videos / 'b.mp4'}\n\n{videos / 'a.mp4'}  # first one\n")
    assert [j.id for j in collect_videos(list_file=listing)] == ["b", "a"]
    with pytest.raises(ConfigError, match="needs --video-dir"):
        collect_videos(how2sign_csv=csv)
    other = tmp_path / "other"
    other.mkdir()
    (other / "a.mov").write_bytes(b"")
    with pytest.raises(ConfigError, match="same feature file a.npy"):
        collect_videos([videos, other])


def test_a_folder_extracted_with_other_settings_is_refused(tmp_path: Path, model: SignHiera, videos: Path) -> None:
    jobs = collect_videos([videos / "a.mp4"])
    extract_videos(model, jobs, tmp_path, settings=ExtractSettings(crop="center"))
    with pytest.raises(ConfigError, match="another crop"):
        extract_videos(model, jobs, tmp_path, settings=ExtractSettings(crop="none"))


def test_the_output_folder_may_not_hold_the_videos(videos: Path, checkpoint: Path, capsys) -> None:
    assert extract([str(videos / "a.mp4")], videos, checkpoint) == 2
    assert "error:" in capsys.readouterr().err


def test_a_missing_checkpoint_says_how_to_download_it(tmp_path: Path, videos: Path, capsys) -> None:
    assert extract([str(videos)], tmp_path / "out", tmp_path / "none.pth") == 2
    assert "sonar-ft download signhiera" in capsys.readouterr().err


def test_in_memory_features_equal_the_files(tmp_path: Path, model: SignHiera, videos: Path) -> None:
    features = extract_features(model, [videos / "c.mp4"], settings=ExtractSettings(crop="center", batch_size=2))
    assert_close_to_scale(features["c"], expected_features(model, videos / "c.mp4"))
