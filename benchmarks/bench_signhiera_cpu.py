"""SignHiera at the official size on the CPU, one process: windows per second, and the video decode / crop rate.

Random weights at the real shapes (``hiera_base_128x224``, 51M parameters): speed does not depend on the
values. One window is (3, 128, 224, 224); a How2Sign clip of ~7 s makes 1 window (15 s at 30 fps: 3).
``--threads 1`` measures one core (the figure the README quotes), the default uses every core.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import result, save
from sonar_ft.data.video import read_video, write_synthetic_video
from sonar_ft.models.signhiera import SignHiera, SignHieraConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--windows", type=int, default=1, help="windows timed (after no warm-up: one is minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = SignHiera(SignHieraConfig()).init_weights(torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 128, 224, 224)
    start = time.perf_counter()
    for _ in range(args.windows):
        model.extract(x, [0])
    per_window = (time.perf_counter() - start) / args.windows

    with tempfile.TemporaryDirectory() as tmp:
        path = write_synthetic_video(Path(tmp) / "clip.mp4", 210, fps=30, width=1280, height=720)
        start = time.perf_counter()
        video = read_video(path, crop="center")
        decode = time.perf_counter() - start
    fps_decoded = video.info.frames / decode
    records = [
        result("SignHiera windows per second (CPU, official size)", 1 / per_window, "report", None, "windows/s",
               f"{per_window:.1f} s per window, {args.threads} thread(s)"),
        result("decode + crop frames per second (1280x720 -> 224)", fps_decoded, "report", None, "frames/s",
               "PyAV decode, numpy crop and bilinear resize"),
    ]
    save("signhiera_cpu", records, {"threads": args.threads, "seconds_per_window": per_window})


if __name__ == "__main__":
    main()
