"""Tests for sonar_ft.data.video: window / padding arithmetic on rendered videos, crop geometry, bad videos."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sonar_ft.data import video as V
from sonar_ft.errors import VideoError

av = pytest.importorskip("av")


def reference_windows(num_frames: int, fps: float) -> list[tuple[list[int], int]]:
    """The reference's sampling, written here with torch: linspace over the clip, clamp, unique count."""
    span = 2 * 128 / 25 * fps
    out = []
    for start in range(0, num_frames, 128):
        end = start + span - 1
        index = torch.clamp(torch.linspace(start + 0.5, end + 0.5, 128), 0, num_frames - 1).long()
        unique = len(torch.unique(index))
        if 25 > fps * 2:
            unique = math.floor(unique * 25 / (fps * 2))
        out.append((index.tolist(), 128 - unique))
        if end >= num_frames:
            break
    return out


@pytest.mark.parametrize("fps", [25, 30, 30000 / 1001, 24, 50, 10])
def test_window_plan_equals_the_reference_sampling(fps: float) -> None:
    for n in list(range(1, 700, 7)) + [255, 256, 257, 307, 308, 5000]:
        plan = V.window_plan(n, fps)
        assert [(w.indices.tolist(), w.padding) for w in plan] == reference_windows(n, fps), (n, fps)


# (fps, frames, expected (start, padding) per window): fewer than, exactly, and more than one window of frames.
# At 25 fps a window spans 256 frames, at 30 fps 307.2; a new one starts every 128.
CASES = [
    (25, 100, [(0, 77)]),              # 50 distinct frames + the last one repeated: 128 - 51
    (25, 256, [(0, 0), (128, 63)]),    # exactly one window, and the overlapping half-empty next one
    (25, 400, [(0, 0), (128, 0), (256, 56)]),
    (30, 150, [(0, 65)]),
    (30, 307, [(0, 0), (128, 53)]),
    (30, 700, [(0, 0), (128, 0), (256, 0), (384, 0), (512, 49)]),
]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {(fps, n): V.write_synthetic_video(folder / f"v{fps}_{n}.mp4", n, fps=fps) for fps, n, _ in CASES}


@pytest.mark.parametrize("fps,frames,expected", CASES)
def test_rendered_videos_make_the_expected_windows(rendered, fps: int, frames: int, expected) -> None:
    video = V.read_video(rendered[(fps, frames)], crop="none", size=32)
    assert video.info.frames == frames and video.info.fps == pytest.approx(fps)
    assert [(w.start, w.padding) for w in video.windows] == expected
    last = video.windows[-1]
    window = video.window(last)
    assert window.shape == (128, 32, 32, 3)
    # the padding is the final frame repeated
    assert (window[128 - last.padding:] == video.frames[-1]).all()
    if last.padding:
        assert not (window[128 - last.padding - 2] == video.frames[-1]).all()
    assert sum(64 - w.padding // 2 for w in video.windows) == sum(
        64 - p // 2 for _, p in reference_windows(frames, fps))


def test_expected_windows_matches_the_plan() -> None:
    from sonar_ft.inference.extract import expected_windows

    for fps in (25.0, 30.0):
        for seconds in (0.5, 5, 10.24, 10.3, 60, 600):
            assert expected_windows(seconds, fps) == len(V.window_plan(round(seconds * fps), fps)), (fps, seconds)


def test_normalise_scales_and_lays_out_channels_first() -> None:
    frames = np.zeros((2, 128, 4, 4, 3), np.uint8)
    frames[..., 1] = 255
    x = V.normalise(frames)
    assert x.shape == (2, 3, 128, 4, 4) and x.dtype == np.float32
    assert np.allclose(x[:, 0], -0.45 / 0.225) and np.allclose(x[:, 1], 0.55 / 0.225)


def test_resize_is_bilinear_with_pixel_centres() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    ours = V.crop_resize(img, (0, 0, 120, 90), (40, 50)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(40, 50), mode="bilinear",
                        align_corners=False, antialias=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() <= 0.51


def test_crop_outside_the_frame_is_black_and_boxes_are_made_square() -> None:
    img = np.full((40, 60, 3), 200, np.uint8)
    box = V.square_box(V.full_box(60, 40))
    assert box == (0, -10, 60, 50)  # the shorter side grown equally on both ends
    out = V.crop_resize(img, box, 60)
    assert (out[:9] == 0).all() and (out[-9:] == 0).all() and (out[12:48] == 200).all()
    assert V.square_box(V.center_box(60, 40)) == (10, 0, 50, 40)
    assert V.fallback_face_box(60, 40) == (20, 10, 40, 30)


def test_face_box_uses_the_mean_of_single_faces_and_falls_back_to_the_centre() -> None:
    faces = [[(10, 10, 19, 19)], [], [(12, 10, 21, 19)]]
    boxes = [[V.expand_face(b) for b in f] for f in faces]
    assert V.face_box(boxes, [], 200, 100) == pytest.approx((-4.0, 0.0, 35.0, 49.0))
    assert V.face_box([[], []], [], 200, 100) == V.fallback_face_box(200, 100)


def test_with_two_faces_the_moving_one_is_chosen() -> None:
    still, signer = (10, 10, 20, 20), (60, 10, 70, 20)
    motion = [np.zeros((40, 100), np.float32) for _ in range(3)]
    for m in motion:
        m[10:20, 60:70] = 200  # the signer moves
    faces = [[still, signer], [signer, still], [still, signer]]
    assert V.face_box(faces, motion, 100, 40) == pytest.approx(signer)


def test_face_crop_runs_the_detector_on_every_16th_frame(tmp_path: Path) -> None:
    path = V.write_synthetic_video(tmp_path / "v.mp4", 40, fps=25, width=96, height=64)
    seen = []

    def detector(frame: np.ndarray) -> list:
        seen.append(frame.shape)
        return [(40, 10, 49, 19)]

    video = V.read_video(path, crop="face", size=32, detector=detector)
    assert seen == [(64, 96, 3)] * 3  # frames 0, 16, 32
    assert video.crop_box == V.square_box(V.expand_face((40, 10, 49, 19))) and video.faces_found == 3


def test_dlib_detector_finds_no_face_in_a_pattern(tmp_path: Path) -> None:
    pytest.importorskip("dlib")
    path = V.write_synthetic_video(tmp_path / "v.mp4", 20, fps=25)
    video = V.read_video(path, crop="face", size=32)
    assert video.faces_found == 0 and video.crop_box == V.square_box(V.fallback_face_box(96, 64))


# ---------------------------------------------------------------------------------------------
# Bad videos: each a VideoError naming the file and the fix
# ---------------------------------------------------------------------------------------------


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError, match=r"cannot open video .*junk.mp4.*corrupt or not a video"):
        V.read_video(junk, crop="none")
    good = V.write_synthetic_video(tmp_path / "good.mp4", 50)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VideoError, match="cut.mp4"):
        V.read_video(cut, crop="none")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        V.read_video(empty, crop="none")


def test_audio_only(tmp_path: Path) -> None:
    path = tmp_path / "speech.wav"
    with av.open(str(path), mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=16000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with pytest.raises(VideoError, match=r"speech.wav has no video stream \(audio\)"):
        V.read_video(path, crop="none")


def test_zero_frames_and_one_frame(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="no frames"):
        V.read_video(V.write_synthetic_video(tmp_path / "zero.avi", 0), crop="none")
    with pytest.raises(VideoError, match="only 1 frame: a still image"):
        V.read_video(V.write_synthetic_video(tmp_path / "one.mp4", 1), crop="none")


def test_huge_resolution_is_refused_before_decoding(tmp_path: Path) -> None:
    path = V.write_synthetic_video(tmp_path / "big.mp4", 2, width=4160, height=4160)
    with pytest.raises(VideoError, match=r"4160x4160.*scale it down"):
        V.read_video(path, crop="none")


def test_variable_frame_rate(tmp_path: Path) -> None:
    pts = np.cumsum([0] + [100 if i % 3 else 300 for i in range(59)])  # every third frame lasts 3x longer
    path = V.write_synthetic_video(tmp_path / "vfr.mkv", 60, fps=25, pts=pts)
    with pytest.raises(VideoError, match="variable frame rate.*fps=25"):
        V.read_video(path, crop="none")


def test_too_long(tmp_path: Path) -> None:
    path = V.write_synthetic_video(tmp_path / "long.mp4", 80, fps=25)
    with pytest.raises(VideoError, match="longer than the 76 frames accepted"):
        V.read_video(path, crop="none", max_minutes=3 / 60)


def test_missing_file_and_unknown_crop(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match="video not found"):
        V.read_video(tmp_path / "nope.mp4", crop="none")
    with pytest.raises(VideoError, match="unknown crop"):
        V.read_video(tmp_path / "nope.mp4", crop="square")


def test_ntsc_rate_is_read_exactly(tmp_path: Path) -> None:
    path = V.write_synthetic_video(tmp_path / "ntsc.mp4", 40, fps=Fraction(30000, 1001))
    video = V.read_video(path, crop="center", size=16)
    assert video.info.fps == pytest.approx(30000 / 1001)
