"""Shared helpers of the benchmarks: timing, peak memory of a child process, one-line results.

Benchmarks are not tests: they measure, side by side in one run, and print each ratio with its
goal. ``run_all.py`` runs every ``bench_*.py`` and collects the lines that start with ``RESULT``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"


def threads() -> int:
    """Torch threads for the benchmarks: the cores of this machine (2 on the reference box)."""
    n = os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def median_time(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_times(fns: dict[str, Callable[[], Any]], *, repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median time of each of ``fns``, run in turns (A B A B ...) so background load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def max_rss_bytes() -> int:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident memory of this process now (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def run_child(module: str, *args: str) -> dict[str, Any]:
    """Run ``python benchmarks/<module>.py --child args`` and return the JSON it prints last."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / f"{module}.py"), "--child", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE="1"))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def result(name: str, value: float, goal: str, ok: bool | None, unit: str = "", note: str = "") -> dict[str, Any]:
    """Print one ``RESULT`` line (value, goal, verdict) and return it as a record."""
    verdict = "n/a" if ok is None else ("met" if ok else "NOT met")
    text = f"{value:.3g}{unit}" if isinstance(value, float) else f"{value}{unit}"
    print(f"RESULT {name}: {text}  (goal {goal}: {verdict}){'  ' + note if note else ''}", flush=True)
    return {"name": name, "value": value, "goal": goal, "verdict": verdict, "note": note}


def save(bench: str, records: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """Write ``benchmarks/out/<bench>.json`` (records, machine, date) for docs/benchmarks.md."""
    OUT.mkdir(parents=True, exist_ok=True)
    payload = {"bench": bench, "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "results": records, **(extra or {})}
    (OUT / f"{bench}.json").write_text(json.dumps(payload, indent=2))


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and the load average when measured."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average": os.getloadavg()}
