"""A full disk on any save is one line naming the file, the space it needs and that nothing was lost.

The writes are real: a child process runs with a file-size limit (``RLIMIT_FSIZE``), so the kernel
refuses the bytes past it (EFBIG) exactly where a full disk refuses them (ENOSPC), inside torch's
zip writer too; no writer is replaced by a fake.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIMIT = 1_000_000  # bytes one file may grow to in the child

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")


def run_limited(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a child whose files cannot grow past ``LIMIT`` bytes."""
    prelude = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_checkpoint_that_does_not_fit_is_a_disk_full_error_and_the_old_one_is_kept(tmp_path):
    out = run_limited("""
        import torch
        from sonar_ft.errors import DiskFullError
        from sonar_ft.files import atomic
        atomic.save_torch("last.pt", {"step": 1})
        try:
            atomic.save_torch("last.pt", {"step": 2, "weights": torch.zeros(1_000_000)})  # 4 MB
        except DiskFullError as exc:
            print("DiskFullError:", exc)
        print("kept:", atomic.load_torch("last.pt"))
    """, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    error, kept = out.stdout.splitlines()
    assert error.startswith(f"DiskFullError: cannot write last.pt in {tmp_path}: the disk is full (it needs about 4.0 MB, ")
    assert "Nothing was lost: the previous last.pt, if there was one, is intact" in error
    assert kept == "kept: {'step': 1}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary left


def test_metrics_appended_to_a_full_disk_keep_the_lines_before(tmp_path):
    out = run_limited("""
        from sonar_ft.errors import DiskFullError
        from sonar_ft.files import atomic
        atomic.append_lines("steps.jsonl", ['{"step": 1}'])
        try:
            atomic.append_lines("steps.jsonl", ["x" * 2_000_000])
        except DiskFullError as exc:
            print("DiskFullError:", exc)
    """, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith(f"DiskFullError: cannot write steps.jsonl in {tmp_path}: the disk is full (it needs about 2.0 MB")
    assert "the lines written to steps.jsonl before are intact" in out.stdout
    assert (tmp_path / "steps.jsonl").read_text().splitlines()[0] == '{"step": 1}'


def test_a_full_disk_in_a_command_is_one_line_without_a_traceback(tmp_path):
    # What every sonar-ft command and train_sonar_finetuning.py do with an error: sonar_ft.cli.run.
    out = run_limited("""
        import sys, torch
        from sonar_ft.cli import run
        from sonar_ft.files import atomic
        sys.exit(run(lambda _: atomic.save_torch("best_encoder.pt", {"w": torch.zeros(1_000_000)}), None))
    """, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert out.stderr.count("\n") == 1 and out.stderr.startswith(f"error: cannot write best_encoder.pt in {tmp_path}: ")
    assert list(tmp_path.iterdir()) == []
