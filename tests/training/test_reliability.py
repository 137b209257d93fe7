"""Crash safety and training-time failures: atomic writes under SIGKILL, half-written temporaries,
resuming from a run stopped before its first checkpoint, NaN/Inf losses and gradients, broken
weights never saved, and out-of-memory advice. (SIGKILL + resume end to end: test_resume_kill.py.)
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import sonar_ft.training.failures as failures_mod
import train_sonar_finetuning as recipe
from sonar_ft.files import atomic
from sonar_ft.data import FeatureStore, LengthBucketSampler
from sonar_ft.models.decoder import FrozenTextDecoder
from sonar_ft.models.encoder import SignT5SonarEncoder
from sonar_ft.errors import TrainingError
from sonar_ft.run_files import read_history as _latest_metrics
from sonar_ft.run_files import BEST_ENCODER, LAST_STATE
from sonar_ft.training.recipe import fine_tune as train
from sonar_ft.training.run_dir import prepare_output_dir
from tests.small_data import Data, make_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tiny_demo, tmp_path) -> Data:
    return make_data(tiny_demo, tmp_path / "data")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------
WRITER = """
import sys, torch
from sonar_ft.files import atomic
path, i = sys.argv[1], 0
while True:
    i += 1
    atomic.save_torch(path, {"i": i, "x": torch.full((400_000,), float(i))})
    print(i, flush=True)
"""


def test_sigkill_during_writes_never_leaves_a_truncated_file(tmp_path):
    """A writer saving ~1.6 MB files in a loop is killed at random moments: the file at the
    destination is always a complete earlier version, never a mix or a stub."""
    rng = random.Random(6)
    target = tmp_path / "state.pt"
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        for _ in range(rng.randint(2, 6)):  # let it complete a few writes, then kill it mid-stride
            assert proc.stdout.readline(), "the writer stopped on its own"
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        state = atomic.load_torch(target)
        assert torch.equal(state["x"], torch.full((400_000,), float(state["i"])))


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_files_get_normal_permissions(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_half_written_temporaries_are_ignored_by_readers(tmp_path):
    feats = tmp_path / "features"
    feats.mkdir()
    torch.save(torch.ones(3, 4), feats / "clip.pt")
    (feats / ".tmp-other.pt.x1y2").write_bytes(b"trunc")  # a killed writer's leftover
    assert FeatureStore.open(feats).ids() == ["clip"]
    run = tmp_path / "run"
    run.mkdir()
    atomic.write_json(run / "metrics_epoch1.json", {"epoch": 1})
    (run / ".tmp-metrics_epoch2.json.abc").write_text('{"epo')
    assert _latest_metrics(run) == [{"epoch": 1}]


def test_starting_a_run_removes_stale_temporaries(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".tmp-last.pt.k3j2"
    stale.write_bytes(b"half a checkpoint")
    prepare_output_dir(data.config(out))
    assert not stale.exists()


def test_same_command_after_a_kill_before_the_first_checkpoint_starts_again(data, tmp_path):
    cfg = data.config(tmp_path / "out")
    (tmp_path / "out").mkdir()
    atomic.write_json(tmp_path / "out" / "config.json", {"settings": asdict(cfg)})  # all a killed start left
    assert prepare_output_dir(cfg) == (tmp_path / "out", False)


def _direct_writes(path: Path) -> list[tuple[int, str]]:
    """Calls in ``path`` that write a file themselves instead of through sonar_ft.files.atomic."""
    tree = ast.parse(path.read_text())
    from_io = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "sonar_ft.files.atomic"
               for a in n.names}
    inside_atomic: set[int] = set()  # writing to an atomic_path temporary is the point of it
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any("atomic_path" in ast.unparse(i.context_expr) for i in node.items):
            inside_atomic |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in inside_atomic:
            continue
        name = ast.unparse(node.func)
        if name.startswith("atomic.") or name in from_io:
            continue
        target = ast.unparse(node.args[0]) if node.args else ""
        mode = "".join(ast.unparse(a) for a in node.args[1:2]) + "".join(ast.unparse(k.value) for k in node.keywords if k.arg == "mode")
        if name in ("torch.save", "np.save", "json.dump") or name.endswith((".write_text", ".write_bytes")):
            found.append((node.lineno, name))
        elif name.endswith(".savefig") and "buffer" not in target.lower() and "BytesIO" not in target:
            found.append((node.lineno, name))
        elif name in ("open", "tarfile.open") and any(c in mode for c in "wax"):
            found.append((node.lineno, name))
    return found


def test_writers_go_through_sonar_ft_io():
    """Every file the package writes goes through sonar_ft.files.atomic or into an ``atomic_path`` temporary."""
    allowed = {("sonar_ft/training/run_dir.py", "probe.write_text"),  # the output folder's .write-test probe, deleted at once
               ("sonar_ft/download.py", "open"),  # DEST.part, renamed into place by atomic.commit_file once verified
               ("sonar_ft/training/state_mirror.py", "open"),  # Drive copies overwritten in place (no trash); the slot marker says which is whole
               ("sonar_ft/data/pack.py", "np.save")}  # into memory: a member of the archive, itself written atomically
    offenders = [f"{p.relative_to(ROOT)}:{line}: {name}"
                 for p in sorted((ROOT / "sonar_ft").rglob("*.py")) + [ROOT / "train_sonar_finetuning.py"]
                 if p.name != "atomic.py" or p.parent.name != "files"
                 for line, name in _direct_writes(p) if (str(p.relative_to(ROOT)), name) not in allowed]
    assert offenders == []


def test_the_write_audit_catches_a_direct_write(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import json\ndef f(p, x):\n    p.write_text('x')\n    with open(p, 'w') as f:\n        json.dump(x, f)\n")
    assert [name for _, name in _direct_writes(bad)] == ["p.write_text", "open", "json.dump"]


def test_sampler_skip_resumes_exactly_after_the_consumed_batches():
    lengths = [random.Random(1).randint(5, 80) for _ in range(37)]
    sampler = LengthBucketSampler(lengths, 4, seed=3, pool_factor=2)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.set_epoch(5, skip=4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) - 4
    sampler.set_epoch(6)  # the next epoch starts from its beginning again
    assert len(list(sampler)) == len(full)


# ------------------------------------------------------------------------------------------------
# NaN / Inf during training
# ------------------------------------------------------------------------------------------------
class _Countdown:
    """Make calls number ``bad`` (1-based set) of a method misbehave."""

    def __init__(self, bad: set[int]) -> None:
        self.bad, self.calls = bad, 0

    def hit(self) -> bool:
        self.calls += 1
        return self.calls in self.bad


def _nan_loss_on(monkeypatch, bad: set[int]) -> _Countdown:
    counter, original = _Countdown(bad), FrozenTextDecoder.loss

    def loss(self, emb, *args, **kwargs):
        out = original(self, emb, *args, **kwargs)
        if torch.is_grad_enabled() and counter.hit():  # training batches only (evaluation runs without grad)
            return type(out)(out.loss * float("nan"), out.num_tokens)
        return out

    monkeypatch.setattr(FrozenTextDecoder, "loss", loss)
    return counter


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


def _nan_grad_on(monkeypatch, bad: set[int]) -> _Countdown:
    counter, original = _Countdown(bad), SignT5SonarEncoder.forward

    def forward(self, features, mask=None):
        out = original(self, features, mask)
        return _NanGrad.apply(out) if self.training and counter.hit() else out

    monkeypatch.setattr(SignT5SonarEncoder, "forward", forward)
    return counter


def test_non_finite_loss_skips_the_step_with_a_warning(data, tmp_path, monkeypatch, caplog):
    _nan_loss_on(monkeypatch, {2})
    with caplog.at_level(logging.WARNING, logger="sonar_ft.training.failures"):
        result = train(data.config(tmp_path / "out", batch_size=2))  # 4 batches
    assert "non-finite loss at epoch 1, step 2 of the epoch" in caplog.text and "step skipped" in caplog.text
    state = atomic.load_torch(tmp_path / "out" / LAST_STATE)
    assert state["step"] == 3 and math.isfinite(result.history[0].train_loss)


def test_non_finite_gradient_skips_the_step_with_a_warning(data, tmp_path, monkeypatch, caplog):
    _nan_grad_on(monkeypatch, {3})
    with caplog.at_level(logging.WARNING, logger="sonar_ft.training.failures"):
        train(data.config(tmp_path / "out", batch_size=2, grad_clip=0.0))  # clipping off: the norm is still checked
    assert "non-finite gradient at epoch 1, step 3 of the epoch" in caplog.text
    state = atomic.load_torch(tmp_path / "out" / LAST_STATE)
    assert state["step"] == 3 and all(torch.isfinite(t).all() for t in state["encoder"].values())


def test_repeated_non_finite_steps_stop_naming_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train(data.config(out, batch_size=2))
    saved = {name: _sha(out / name) for name in (LAST_STATE, BEST_ENCODER)}
    monkeypatch.setattr(failures_mod, "MAX_BAD_STEPS", 3)
    _nan_loss_on(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingError) as err:
        train(data.config(out, batch_size=2, epochs=2))  # the same run, resumed for one more epoch
    message = str(err.value)
    assert "3 steps in a row had a non-finite loss or gradient" in message
    assert f"The last good checkpoint is {out / LAST_STATE}" in message and "--resume" in message and "--learning_rate" in message
    assert {name: _sha(out / name) for name in saved} == saved  # nothing saved was replaced


def test_diverging_recipe_is_one_error_line(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(failures_mod, "MAX_BAD_STEPS", 2)
    _nan_loss_on(monkeypatch, set(range(1, 100)))
    assert recipe.main(data.recipe_args(tmp_path / "out", "--batch_size", "2")) == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and "No checkpoint was saved yet" in err and "Traceback" not in err


def test_broken_weights_are_never_written(data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    original, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):  # the third update sends one weight to NaN
        result = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(TrainingError, match=rf"NaN/Inf at epoch 1, step 3; not writing them to {out / LAST_STATE}"):
        train(data.config(out, batch_size=2, checkpoint_every_steps=1))
    state = atomic.load_torch(out / LAST_STATE)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in state["encoder"].values())


# ------------------------------------------------------------------------------------------------
# Out of GPU memory
# ------------------------------------------------------------------------------------------------
def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


OOM_ADVICE = ("ran out of memory at --batch_size 4", "--batch_size 2 --grad_accum 2", "--gradient_checkpointing",
              "--freeze_encoder_layers", "--max_frames")


def test_out_of_memory_in_forward_suggests_settings_that_fit_library(data, tmp_path, monkeypatch):
    monkeypatch.setattr(SignT5SonarEncoder, "forward", _oom)
    with pytest.raises(TrainingError) as err:
        train(data.config(tmp_path / "out"))
    assert all(advice in str(err.value) for advice in OOM_ADVICE)


def test_out_of_memory_in_the_optimizer_step_is_explained_too(data, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim.AdamW, "step", _oom)
    with pytest.raises(TrainingError, match="ran out of memory"):
        train(data.config(tmp_path / "out"))


def test_out_of_memory_suggests_settings_that_fit_cli(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SignT5SonarEncoder, "forward", _oom)
    assert recipe.main(data.recipe_args(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert all(advice in err for advice in OOM_ADVICE) and "Traceback" not in err
