"""The demo's synthetic videos and random-weight SignHiera: extraction runs on them with nothing downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sonar_ft.notebook import steps

pytest.importorskip("av")
ROOT = Path(__file__).resolve().parents[2]


def test_rendered_videos_extract_to_the_requested_feature_width(tmp_path: Path) -> None:
    from sonar_ft import cli

    assert steps.main(["demo-videos", "--out", str(tmp_path / "v"), "--signhiera", str(tmp_path / "s.pth"),
                       "--feature_dim", "24", "--seconds", "1,2"]) == 0
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["demo_clip00.mp4", "demo_clip01.mp4"]
    assert cli.main(["extract", str(tmp_path / "v"), "--signhiera", str(tmp_path / "s.pth"), "--out",
                     str(tmp_path / "f"), "--crop", "center", "--device", "cpu"]) == 0
    shapes = [np.load(tmp_path / "f" / f"demo_clip0{i}.npy").shape for i in range(2)]
    assert [s[1] for s in shapes] == [24, 24] and shapes[0][0] < shapes[1][0]  # longer video, more vectors


def test_an_existing_checkpoint_of_another_width_is_replaced(tmp_path: Path) -> None:
    from sonar_ft.demo.videos import save_random_signhiera
    from sonar_ft.models.signhiera import load_signhiera

    path = save_random_signhiera(tmp_path / "s.pth", 16)
    save_random_signhiera(path, 24)
    assert load_signhiera(path).config.stage_dims[-1] == 24


def test_the_helper_imports_without_torch() -> None:
    code = "import sys\nsys.modules['torch'] = None\nimport sonar_ft.demo.videos\n"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
