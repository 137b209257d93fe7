"""Data-parallel training under torchrun: same global batches, same numbers, files written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import train_sonar_finetuning as recipe
from sonar_ft.data import LengthBucketSampler
from sonar_ft.files.atomic import load_torch
from tests.conftest import recipe_args

REPO = Path(__file__).resolve().parents[2]

# Loaded by every Python process started with this folder on PYTHONPATH: logs which rank renamed
# which file into place (every project write ends with os.replace, see sonar_ft.files.atomic).
WRITE_LOGGER = '''
import os
_replace = os.replace
def _logged_replace(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    rank, folder = os.environ.get("RANK"), os.environ.get("WRITE_LOG_DIR")
    if rank is not None and folder:
        with open(os.path.join(folder, "rank" + rank + ".log"), "a") as f:
            f.write(os.fspath(dst) + "\\n")
os.replace = _logged_replace
'''


@pytest.mark.parametrize("n_items", [40, 37, 3])
def test_ranks_split_each_global_batch_of_a_single_process_run(n_items):
    lengths = np.random.default_rng(1).integers(20, 600, size=n_items)
    single = LengthBucketSampler(lengths, 8, seed=5, pool_factor=2)
    ranks = [LengthBucketSampler(lengths, 4, seed=5, pool_factor=2, num_replicas=2, rank=r) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(3)
    per_rank = [list(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(ranks[0]) == len(single)
    for step, batch in enumerate(single):
        together = per_rank[0][step] + per_rank[1][step]
        if len(batch) >= 2:
            assert sorted(together) == sorted(batch)
        else:  # fewer clips than ranks: repeated so that every rank has one
            assert set(together) == set(batch)


def test_rank_slices_have_similar_lengths():
    lengths = np.random.default_rng(2).lognormal(5, 0.6, size=400).astype(int) + 20
    ranks = [list(LengthBucketSampler(lengths, 8, seed=0, num_replicas=2, rank=r)) for r in range(2)]
    longest = [[max(lengths[i] for i in b) for b in batches] for batches in ranks]
    ratio = np.array(longest[0]) / np.array(longest[1])
    assert np.median(np.abs(np.log(ratio))) < 0.1  # interleaved slices of a sorted batch: balanced padding


def _run_two_processes(tiny_demo, out: Path, flags: list[str], log_dir: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), WRITE_LOG_DIR=str(log_dir),
               OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "train_sonar_finetuning.py"), *recipe_args(tiny_demo, out, *flags)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


# One torchrun reference run shared by both properties (same results as one process; exact resume).
# Global batch 8 per micro-step, windows of 2: 2 steps an epoch, last.pt after each (inside epoch 1 first).
DDP_FLAGS = ["--epochs", "2", "--max_samples", "32", "--batch_size", "4", "--grad_accum", "2", "--learning_rate", "1e-3",
             "--dropout", "0", "--checkpoint_every_steps", "1", "--max_gen_len", "16"]


@pytest.fixture(scope="module")
def ddp_reference(tiny_demo, tmp_path_factory) -> dict:
    """The reference run under torchrun with 2 CPU processes, logging which rank wrote which file."""
    root = tmp_path_factory.mktemp("ddp_reference")
    site, log_dir = root / "site", root / "writes"
    site.mkdir(), log_dir.mkdir()
    (site / "sitecustomize.py").write_text(WRITE_LOGGER)
    done = _run_two_processes(tiny_demo, root / "run", DDP_FLAGS, log_dir, site)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"out": root / "run", "log_dir": log_dir, "stdout": done.stdout}


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tiny_demo, ddp_reference, tmp_path):
    single, multi = tmp_path / "single", ddp_reference["out"]
    flags = [f if f != "4" else "8" for f in DDP_FLAGS]  # one process: the whole global batch (--batch_size 8)
    assert flags[flags.index("--batch_size") + 1] == "8"
    assert recipe.main(recipe_args(tiny_demo, single, *flags)) == 0

    for epoch in (1, 2):
        a = json.loads((single / f"metrics_epoch{epoch}.json").read_text())
        b = json.loads((multi / f"metrics_epoch{epoch}.json").read_text())
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-3)
    pa = json.loads((single / "predictions_epoch2.json").read_text())["samples"]
    pb = json.loads((multi / "predictions_epoch2.json").read_text())["samples"]
    assert len(pb) == 16 and [s["id"] for s in pb] == [s["id"] for s in pa]  # both shards, in one-process order

    # Written once, by rank 0 only, and nothing half-written left behind.
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    written = {rank: (ddp_reference["log_dir"] / f"rank{rank}.log") for rank in (0, 1)}
    assert not written[1].exists(), written[1].read_text()
    names = [Path(line).name for line in written[0].read_text().split()]
    assert {"config.json", "metrics_epoch2.json", "predictions_epoch2.json", "last.pt", "best_encoder.pt"} <= set(names)
    assert ddp_reference["stdout"].count("best epoch") == 1  # one summary, from rank 0


# Rank 0 dies (SIGKILL) right after its first last.pt is in place, in the middle of epoch 1, and
# torchrun tears the job down: deterministic, no timing race.
KILL_AFTER_FIRST_CHECKPOINT = '''
import os, signal
_replace = os.replace
def _replace_then_die(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if os.environ.get("RANK") == "0" and os.fspath(dst).endswith("last.pt"):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = _replace_then_die
'''


@pytest.mark.slow
def test_run_killed_mid_epoch_resumes_under_torchrun_to_the_same_metrics(tiny_demo, ddp_reference, tmp_path):
    plain_site, killer_site = tmp_path / "plain", tmp_path / "killer"
    plain_site.mkdir(), killer_site.mkdir()
    (plain_site / "sitecustomize.py").write_text("")
    (killer_site / "sitecustomize.py").write_text(KILL_AFTER_FIRST_CHECKPOINT)
    reference, resumed = ddp_reference["out"], tmp_path / "resumed"

    killed = _run_two_processes(tiny_demo, resumed, DDP_FLAGS, tmp_path, killer_site)
    assert killed.returncode != 0 and "exitcode: -9" in killed.stderr, killed.stdout[-3000:] + killed.stderr[-3000:]
    position = load_torch(resumed / "last.pt", what="training state")["position"]
    assert position and position["epoch"] == 1 and 0 < position["windows"] < 4  # stopped inside epoch 1
    assert not (resumed / "metrics_epoch1.json").exists()

    again = _run_two_processes(tiny_demo, resumed, DDP_FLAGS, tmp_path, plain_site)  # the same command
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    for epoch in (1, 2):
        a = json.loads((reference / f"metrics_epoch{epoch}.json").read_text())
        b = json.loads((resumed / f"metrics_epoch{epoch}.json").read_text())
        # Each rank's part of the interrupted epoch counted once: the same mean training loss.
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-9)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
