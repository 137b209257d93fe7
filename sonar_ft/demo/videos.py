"""Synthetic sign-like videos and a small random-weight SignHiera, so extraction runs on any machine.

Imports no torch at module level: the notebook kernel may import this file; the checkpoint is
written by the stack environment's Python (``python -m sonar_ft.notebook.steps demo-videos``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DEMO_VIDEO_SECONDS = (1.0, 2.0, 3.0)
"""Lengths of the demo videos: short, so decoding and the tiny model take seconds on a CPU."""
DEMO_FPS = 25
DEMO_SIGNHIERA_NAME = "signhiera_demo_random.pth"


def render_demo_videos(folder: str | Path, seconds: Sequence[float] = DEMO_VIDEO_SECONDS, *, fps: int = DEMO_FPS,
                       width: int = 96, height: int = 64, prefix: str = "demo_clip") -> list[Path]:
    """Render one moving-pattern ``.mp4`` per entry of ``seconds`` into ``folder`` (PyAV, nothing downloaded).

    Existing videos are kept (the notebook may run again); returns the paths in order.
    """
    from sonar_ft.data.video import write_synthetic_video

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, length in enumerate(seconds):
        path = folder / f"{prefix}{i:02d}.mp4"
        if not path.is_file():
            write_synthetic_video(path, max(1, round(length * fps)), fps=fps, width=width, height=height, seed=i)
        paths.append(path)
    return paths


def demo_signhiera_config(feature_dim: int):  # -> SignHieraConfig (typed lazily: no torch at import)
    """A small SignHiera (the official 4 stages and 3 poolings, 32 x 32 windows) whose features have ``feature_dim``."""
    from sonar_ft.models.signhiera import tiny_config

    return tiny_config(stage_dims=(8, 16, 32, feature_dim), mlp_hidden=(16, 32, 64, 2 * feature_dim))


def save_random_signhiera(path: str | Path, feature_dim: int, *, seed: int = 0) -> Path:
    """Save a random-weight SignHiera in the official layout (``{"model": state_dict}``) at ``path``.

    Kept when already there with the right output width. Its features are meaningless: it only lets
    the whole video path run without the 51M-parameter official download.
    """
    import torch

    from sonar_ft.models.signhiera import SignHiera, load_signhiera, save_signhiera

    path = Path(path)
    if path.is_file() and load_signhiera(path).config.stage_dims[-1] == feature_dim:
        return path
    model = SignHiera(demo_signhiera_config(feature_dim)).init_weights(torch.Generator().manual_seed(seed))
    save_signhiera(model, path)
    return path
