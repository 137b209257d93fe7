"""``make bench``: run every benchmark in its own process and print each ratio next to its goal.

Results (with machine and date) are written to ``benchmarks/out/<name>.json``; the figures in
docs/benchmarks.md come from there. ``--only loss_memory,compile`` runs a subset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = ("loss_memory", "encoder_vs_hf", "bucketing", "batched_decoding", "feature_cache", "compile")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHES))
    args = p.parse_args()
    chosen = args.only.split(",") if args.only else list(BENCHES)
    unknown = sorted(set(chosen) - set(BENCHES))
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}", file=sys.stderr)
        return 2
    summary: list[str] = []
    failed = []
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    for name in chosen:
        print(f"\n== {name} " + "=" * (70 - len(name)), flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py")], cwd=HERE.parent, env=env,
                              capture_output=True, text=True)
        lines = done.stdout.splitlines()
        for line in lines:
            if line.startswith("  ") or line.startswith("RESULT"):
                print(line, flush=True)
        summary += [line[len("RESULT "):] for line in lines if line.startswith("RESULT")]
        print(f"   ({time.perf_counter() - start:.0f} s)")
        if done.returncode != 0:
            failed.append(name)
            print(done.stderr[-2000:], file=sys.stderr)
    print("\n== summary " + "=" * 62)
    for line in summary:
        print("  " + line)
    if failed:
        print(f"benchmark(s) that crashed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
