"""The heavy steps of the notebooks that have no ``sonar-ft`` command of their own.

Run by the stack environment's Python (see :mod:`sonar_ft.stack_env`), never in a notebook kernel;
each writes what the notebook shows as JSON:

    python -m sonar_ft.notebook.steps demo --demo_dir demo_runs
    python -m sonar_ft.notebook.steps encoder-info --checkpoint enc.pth --json info.json
    python -m sonar_ft.notebook.steps demo-videos --out demo_videos --signhiera s.pth --feature_dim 768
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Sequence

from sonar_ft.files import atomic
from sonar_ft.errors import SonarFtError


def _demo(args: argparse.Namespace) -> int:
    from sonar_ft.demo.build import BUILD_VERSION, DemoConfig, build_demo
    from sonar_ft.demo.paths import DemoPaths

    cfg = DemoConfig()
    root = Path(args.demo_dir)
    # A complete build is reused whatever its sizes (the tests build a smaller one).
    record = DemoPaths(root).build_record
    if record.is_file() and json.loads(record.read_text(encoding="utf-8")).get("version") == BUILD_VERSION:
        print(f"DEMO: using the offline demo in {root}")
        return 0
    print(f"DEMO: building the offline demo in {root} (once; about a minute on a CPU) ...", flush=True)
    build_demo(root, cfg)
    return 0


def _encoder_info(args: argparse.Namespace) -> int:
    from sonar_ft.models.encoder import count_parameters, load_encoder

    encoder, architecture = load_encoder(args.checkpoint)
    record = {
        "checkpoint": str(args.checkpoint),
        "architecture": {k: v for k, v in dataclasses.asdict(architecture).items()},
        "parameters": count_parameters(encoder),
        "distinct_parameters": count_parameters(encoder, include_tied_copies=False),
    }
    atomic.write_json(args.json, record)
    print(f"{record['parameters']:,} parameters ({record['distinct_parameters']:,} distinct) -> {args.json}")
    return 0


def _demo_videos(args: argparse.Namespace) -> int:
    from sonar_ft.demo.videos import render_demo_videos, save_random_signhiera

    videos = render_demo_videos(args.out, [float(s) for s in args.seconds.split(",")])
    save_random_signhiera(args.signhiera, args.feature_dim)
    print(f"DEMO: {len(videos)} synthetic videos in {args.out}; random-weight SignHiera "
          f"(output width {args.feature_dim}) at {args.signhiera}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    demo = sub.add_parser("demo", help="build the offline demo (or reuse a complete build)")
    demo.add_argument("--demo_dir", required=True)
    demo.set_defaults(func=_demo)
    info = sub.add_parser("encoder-info", help="architecture and parameter count of an encoder checkpoint")
    info.add_argument("--checkpoint", required=True, type=Path)
    info.add_argument("--json", required=True, type=Path)
    info.set_defaults(func=_encoder_info)
    videos = sub.add_parser("demo-videos", help="synthetic sign-like videos and a small random-weight SignHiera")
    videos.add_argument("--out", required=True, type=Path, help="folder for the videos")
    videos.add_argument("--signhiera", required=True, type=Path, help="where the random SignHiera checkpoint goes")
    videos.add_argument("--feature_dim", required=True, type=int, help="the SignHiera's output width")
    videos.add_argument("--seconds", default="1,2,3", help="comma-separated video lengths in seconds")
    videos.set_defaults(func=_demo_videos)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SonarFtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
