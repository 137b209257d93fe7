"""Resuming from a multi-GB ``last.pt`` does not read it into host memory: the file is memory-mapped and its
tensors are copied where they belong (encoder weights, optimiser state), so nothing is held twice.

A ``last.pt`` of ~2.4 GB (0.8 GB of weights + AdamW's two moments, random) is written by one process and
resumed by another, which samples its resident memory (anonymous and file-backed, from /proc) during
``FineTuneRecipe.load_last``. Anonymous memory is what a runtime cannot give back; file-backed pages of
the mapping are clean and the kernel drops them under pressure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS, WIDTH = 12, 4096  # 12 x 4096 x 4096 fp32 = 0.8 GB of weights, 2.4 GB of last.pt with AdamW's moments

COMMON = f"""
import gc, json, sys, threading, time
import torch
from sonar_ft.config import TrainConfig
from sonar_ft.training.distributed import DistContext
from sonar_ft.training.recipe import FineTuneRecipe
from sonar_ft.training.state import TrainState

def recipe(out):
    torch.manual_seed(0)
    with torch.device("meta"):
        encoder = torch.nn.ModuleList(torch.nn.Linear({WIDTH}, {WIDTH}, bias=False) for _ in range({LAYERS}))
    encoder.to_empty(device="cpu")
    r = FineTuneRecipe(TrainConfig(output_dir=out, device="cpu"), DistContext())
    r.encoder, r.peft_model = encoder, None
    r.optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-4)
    r.scaler = torch.amp.GradScaler("cpu", enabled=False)
    r.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(r.optimizer)
    return r
"""

BUILD = COMMON + """
r = recipe(sys.argv[1])
with torch.no_grad():
    for p in r.encoder.parameters():
        p.normal_()
groups = r.optimizer.state_dict()["param_groups"]
state = {i: {"step": torch.tensor(5.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
         for i, p in enumerate(r.encoder.parameters())}
from sonar_ft.files import atomic
atomic.save_torch(sys.argv[1] + "/last.pt", {"encoder": r.encoder.state_dict(), "optimizer": {"state": state, "param_groups": groups},
                  "plateau": r.plateau.state_dict(), "scaler": None, **TrainState(epoch=3, step=5).state_dict()})
"""

RESUME = COMMON + """
def memory():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith(("RssAnon", "RssFile")))
    return {k: int(v.split()[0]) * 1024 for k, v in fields.items()}

r = recipe(sys.argv[1])
with torch.no_grad():
    for p in r.encoder.parameters():
        p.zero_()  # resident, as an encoder loaded from its checkpoint is
gc.collect()
base, peak, running = memory(), {"RssAnon": 0, "RssFile": 0}, True

def sample():
    while running:
        for k, v in memory().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.005)

thread = threading.Thread(target=sample)
thread.start()
r.load_last()
running = False
thread.join()
for k, v in memory().items():
    peak[k] = max(peak[k], v)
weights = torch.cat([p.detach().flatten()[:3] for p in r.encoder.parameters()])
print(json.dumps({"anon_growth": peak["RssAnon"] - base["RssAnon"], "file_growth": peak["RssFile"] - base["RssFile"],
                  "epoch": r.state.epoch, "step": r.state.step, "weights_finite": bool(torch.isfinite(weights).all()),
                  "moments": len(r.optimizer.state)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_resuming_from_a_multi_gb_last_pt_holds_no_copy_of_it_in_host_memory(tmp_path):
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    for script in (BUILD, RESUME):
        (tmp_path / "script.py").write_text(textwrap.dedent(script))
        done = subprocess.run([sys.executable, str(tmp_path / "script.py"), str(tmp_path)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
    size = (tmp_path / "last.pt").stat().st_size
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nlast.pt {size / 1e9:.2f} GB; resume: anonymous memory +{got['anon_growth'] / 1e9:.2f} GB, "
          f"file-backed pages +{got['file_growth'] / 1e9:.2f} GB")
    assert size > 2.0e9
    assert got["epoch"] == 3 and got["step"] == 5 and got["weights_finite"] and got["moments"] == LAYERS
    assert got["anon_growth"] < 0.1 * size  # read whole (mmap=False) it would be the file's size
    assert got["anon_growth"] + got["file_growth"] < 0.5 * size  # only the weights' pages were touched (copied)
