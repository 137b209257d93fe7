"""The training loop: exact gradient accumulation, step records / TensorBoard / train.log, plain
progress, settings checked up front, finished runs left alone, resumed state released."""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch

import train_sonar_finetuning as recipe_cli
from sonar_ft import plots
from sonar_ft.files import atomic
from sonar_ft.config import TrainConfig, make_config, maximize
from sonar_ft.data import SignFeatureDataset, collate, read_manifest, FeatureStore
from sonar_ft.models.decoder import FrozenTextDecoder
from sonar_ft.device import resolve_device
from sonar_ft.training.distributed import DistContext
from sonar_ft.models.encoder import load_encoder
from sonar_ft.errors import ConfigError, OutputDirError
from sonar_ft.training.recipe import EpochSums, FineTuneRecipe
from sonar_ft.training.logs import STEP_TAGS, Progress, StepRecorder, read_steps
from sonar_ft.run_files import LAST_STATE
from sonar_ft.training.recipe import fine_tune as train
from sonar_ft.demo.build import DemoConfig, build_demo
from sonar_ft.demo.paths import DemoPaths
from sonar_ft.demo.text_models import TextModelConfig
from tests.small_data import make_data

REPO = Path(__file__).resolve().parents[2]

# Smaller than the session's tiny demo (its text model trains 30 steps, not 600): these tests need
# unequal token counts and a loop that runs, not a decoder that translates well.
MICRO_DEMO = DemoConfig(n_train=32, n_val=8, n_test=4, feature_dim=24, encoder_d_model=32, encoder_d_kv=8, encoder_d_ff=48,
                        encoder_layers=1, text=TextModelConfig(model_dim=32, num_layers=1, num_heads=2, ffn_dim=48, steps=30,
                                                               batch_size=16))


@pytest.fixture(scope="module")
def micro_demo(tmp_path_factory) -> DemoPaths:
    torch.set_num_threads(2)
    return build_demo(tmp_path_factory.mktemp("micro_demo"), MICRO_DEMO)


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def test_importing_the_settings_does_not_import_torch():
    code = "import sys, sonar_ft.config, sonar_ft.training.cli, sonar_ft.tune.cli, sonar_ft.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("name, value", [
    ("learning_rate", "nan"), ("learning_rate", "inf"), ("learning_rate", "-1e-4"), ("learning_rate", "0"),
    ("weight_decay", "-0.1"), ("num_workers", "-1"), ("early_stopping_patience", "-1"), ("grad_clip", "-1"),
    ("warmup_steps", "-5"), ("label_smoothing", "1.0"), ("distill_weight", "-1"), ("plateau_patience", "-1"),
    ("log_every_steps", "-1"), ("select_metric", "accuracy"), ("report_to", "wandb"), ("device", "gpu0"),
])
def test_bad_settings_are_refused_naming_the_flag(name, value):
    with pytest.raises(ConfigError, match=f"--{name}|{name}"):
        cfg = make_config({"encoder_checkpoint": "e.pt", "train_features": "f", "train_manifest": "m", "val_features": "f",
                           "val_manifest": "v", name: value}, source="command line")
        cfg.validate()


def test_metric_direction_is_defined_once():
    assert not maximize("loss")
    assert all(maximize(m) for m in ("bleu", "chrf", "bleu1", "bleu4", "rougeL", "cosine", "r1", "r5"))


def test_recipe_flags_are_generated_with_help_from_the_field_docs(capsys):
    with pytest.raises(SystemExit):
        recipe_cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--encoder_checkpoint", "--train_features", "--train_manifest", "--val_features", "--val_manifest",
                 "--output_dir", "--batch_size", "--epochs", "--learning_rate", "--freeze_decoder", "--eval_every",
                 "--device", "--max_samples", "--eval_only", "--grad_accum", "--log_every_steps", "--report_to", "--progress"):
        assert flag in text
    assert "Linear learning-rate warm-up over this many optimiser steps. (default 0)" in text
    assert "{auto,bar,plain,none}" in text


def test_one_device_resolver_accepts_cuda_n_and_explains_a_missing_gpu():
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda:1"):
            resolve_device("cuda:1")


# ------------------------------------------------------------------------------------------------
# Exact gradient accumulation
# ------------------------------------------------------------------------------------------------
def _models(tiny_demo):
    torch.manual_seed(0)
    encoder, _ = load_encoder(tiny_demo.encoder_checkpoint, dropout=0.0, device=torch.device("cpu"))
    decoder = FrozenTextDecoder.load(str(tiny_demo.decoder_card), None, device=torch.device("cpu"))
    return encoder.eval(), decoder


def _micro_batches(tiny_demo, decoder, sizes: list[int]) -> list:
    """Micro-batches of the demo's training clips with clearly unequal target-token counts."""
    store = FeatureStore.open(tiny_demo.split_features("train"))
    rows = sorted(read_manifest(tiny_demo.split_manifest("train")), key=lambda r: len(r.text))
    # Alternate short and long sentences into the micro-batches.
    rows = rows[: sum(sizes) // 2] + rows[-(sum(sizes) - sum(sizes) // 2):]
    dataset = SignFeatureDataset(store, rows, progress=False)
    samples = [dataset[i] for i in range(len(rows))]
    out, start = [], 0
    for n in sizes:
        out.append(collate(samples[start:start + n]))
        start += n
    return out


def _grads(encoder) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in encoder.parameters()])


def reference_gradient(encoder, decoder, batches, lang="eng_Latn") -> torch.Tensor:
    """The gradient of one batch holding every clip of ``batches`` (token-mean loss)."""
    encoder.zero_grad(set_to_none=True)
    whole = collate([s for b in batches for s in _unbatch(b)])
    emb = encoder(whole.features, whole.mask).float()
    decoder.loss(emb, whole.texts, lang).loss.backward()
    return _grads(encoder)


def _unbatch(batch):
    from sonar_ft.data.dataset import Sample

    lengths = batch.mask.sum(1).tolist()
    return [Sample(id=i, features=batch.features[k, : int(lengths[k])], text=t) for k, (i, t) in enumerate(zip(batch.ids, batch.texts))]


def old_gradient(encoder, decoder, batches, grad_accum, lang="eng_Latn") -> torch.Tensor:
    """What the loop did before: each micro-batch's token mean weighted 1/grad_accum."""
    encoder.zero_grad(set_to_none=True)
    for b in batches:
        emb = encoder(b.features, b.mask).float()
        (decoder.loss(emb, b.texts, lang).loss / grad_accum).backward()
    return _grads(encoder)


def recipe_step_gradients(encoder, decoder, batches, grad_accum, ddp=None) -> list[torch.Tensor]:
    """The gradient the recipe steps with for each window of ``batches`` (optimizer step intercepted)."""
    cfg = TrainConfig(grad_accum=grad_accum, label_smoothing=0.0, device="cpu", log_every_steps=0)
    r = FineTuneRecipe(cfg, ddp or DistContext())
    r.device, r.precision, r.encoder, r.model, r.decoder, r.teacher = torch.device("cpu"), "fp32", encoder, encoder, decoder, None
    if ddp is not None and ddp.active:
        r.model = ddp.wrap(encoder)
    r.scaler = torch.amp.GradScaler("cpu", enabled=False)
    r.recorder, r.progress, r.out = StepRecorder(None, every=0, reporters=[]), Progress("none", epochs=1), Path(".")
    r.optimizer = torch.optim.SGD(encoder.parameters(), lr=0.0)
    seen: list[torch.Tensor] = []

    def capture():
        seen.append(_grads(encoder).clone())
        encoder.zero_grad(set_to_none=True)
        return True, 0.0

    r.optimizer_step = capture
    encoder.zero_grad(set_to_none=True)
    sizes = [grad_accum] * (len(batches) // grad_accum) + ([len(batches) % grad_accum] if len(batches) % grad_accum else [])
    for window in r._windows(iter(batches), sizes):
        r.train_step(window, EpochSums(), 1, 0)
    return seen


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_accumulated_gradient_equals_one_batch_with_unequal_token_counts(micro_demo):
    tiny_demo = micro_demo
    encoder, decoder = _models(tiny_demo)
    batches = _micro_batches(tiny_demo, decoder, [4, 4, 3])  # windows of 2 + the short window at the epoch's end
    tokens = [int(decoder.scored_tokens(b.texts, "eng_Latn").sum()) for b in batches]
    assert tokens[0] != tokens[1]  # the case the old 1/grad_accum weighting got wrong
    got = recipe_step_gradients(encoder, decoder, batches, grad_accum=2)
    assert len(got) == 2
    full = reference_gradient(encoder, decoder, batches[:2])
    short = reference_gradient(encoder, decoder, batches[2:])
    old = old_gradient(encoder, decoder, batches[:2], 2)
    print(f"\ntokens {tokens}: new rel err {rel(got[0], full):.2e}, end-of-epoch window {rel(got[1], short):.2e}, "
          f"old 1/grad_accum weighting {rel(old, full):.2e}")
    assert rel(got[0], full) < 1e-5 and rel(got[1], short) < 1e-5
    assert rel(old, full) > 1e-3  # the test can tell the two weightings apart


DDP_SCRIPT = textwrap.dedent('''
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from pathlib import Path
    from sonar_ft.training import distributed
    from tests.training.test_loop import _models, _micro_batches, recipe_step_gradients
    from sonar_ft.demo.paths import DemoPaths
    demo = DemoPaths(Path(sys.argv[2]))
    ddp = distributed.setup("cpu")
    encoder, decoder = _models(demo)
    batches = _micro_batches(demo, decoder, [4, 4, 3, 2, 4, 1])[ddp.rank::2]  # rank 0: 4,3,4  rank 1: 4,2,1
    grads = recipe_step_gradients(encoder, decoder, batches, grad_accum=2, ddp=ddp)
    if ddp.rank == 0:
        torch.save(grads, sys.argv[3])
    ddp.shutdown()
''')


@pytest.mark.slow
def test_accumulation_under_two_gloo_processes_equals_one_global_batch(micro_demo, tmp_path):
    tiny_demo = micro_demo
    script, out = tmp_path / "ddp_accum.py", tmp_path / "grads.pt"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(REPO),
           str(tiny_demo.root), str(out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    encoder, decoder = _models(tiny_demo)
    batches = _micro_batches(tiny_demo, decoder, [4, 4, 3, 2, 4, 1])
    rank0, rank1 = batches[0::2], batches[1::2]
    first = reference_gradient(encoder, decoder, rank0[:2] + rank1[:2])  # window 1: two micro-batches per rank
    last = reference_gradient(encoder, decoder, rank0[2:] + rank1[2:])  # the short window at the epoch's end
    print(f"\n2 gloo processes: rel err window 1 {rel(got[0], first):.2e}, short window {rel(got[1], last):.2e}")
    assert len(got) == 2 and rel(got[0], first) < 1e-5 and rel(got[1], last) < 1e-5


# ------------------------------------------------------------------------------------------------
# Progress where no terminal shows bars
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seconds_per_step", [0.05, 2.0])  # a fast GPU and a slow one
def test_plain_progress_of_a_how2sign_scale_run_stays_short(seconds_per_step):
    clips, batch, epochs = 31_000, 8, 30
    steps = math.ceil(clips / batch)
    now, lines = [0.0], []
    progress = Progress("plain", epochs=epochs, every_seconds=30.0, emit=lines.append, clock=lambda: now[0])
    progress.start(1)
    for epoch in range(1, epochs + 1):
        progress.epoch_start(epoch, steps)
        for step in range(steps):
            now[0] += seconds_per_step
            progress.update(1, batch, step=(epoch - 1) * steps + step + 1, loss=3.0, lr=1e-4)
        progress.epoch_end(f"epoch {epoch}/{epochs} | summary")
    print(f"\n{seconds_per_step}s/step: {len(lines)} lines for {epochs * steps} steps")
    assert len(lines) < 2000
    assert sum(line.endswith("summary") for line in lines) == epochs
    periodic = [line for line in lines if "ETA" in line]
    assert len(periodic) >= 2 * epochs  # something to watch inside every epoch
    assert "clips/s" in periodic[0] and "lr 1.00e-04" in periodic[0] and "step " in periodic[0]


# ------------------------------------------------------------------------------------------------
# A short run with every record switched on
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(micro_demo, tmp_path_factory):
    return make_data(micro_demo, tmp_path_factory.mktemp("loop_data"))


@pytest.fixture(scope="module")
def logged_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("logged") / "run"
    cfg = data.config(out, batch_size=2, grad_accum=2, epochs=2, log_every_steps=1, report_to="jsonl,tensorboard", progress="plain")
    return cfg, train(cfg)


def test_step_records_go_to_jsonl(logged_run):
    cfg, _ = logged_run
    steps = read_steps(Path(cfg.output_dir) / "steps.jsonl")
    assert [s["step"] for s in steps] == [1, 2, 3, 4]  # 8 clips / (2 x 2) per step x 2 epochs
    for key in ("epoch", "loss", "ce_loss", "distill_loss", "lr", "grad_norm", "tokens_per_s", "clips_per_s", "peak_memory_gib", "elapsed_s"):
        assert key in steps[0]
    assert all(math.isfinite(s["loss"]) and s["clips_per_s"] > 0 and s["grad_norm"] > 0 for s in steps)


def test_tensorboard_event_files_read_back(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, result = logged_run
    acc = EventAccumulator(str(Path(cfg.output_dir) / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    print("\nTensorBoard scalar tags:", sorted(tags))
    assert set(STEP_TAGS.values()) - {"train/distill_loss"} <= tags
    assert {"val/loss", "val/bleu", "val/chrf", "epoch/train_loss"} <= tags
    losses = acc.Scalars("train/loss")
    jsonl = read_steps(Path(cfg.output_dir) / "steps.jsonl")
    assert [e.step for e in losses] == [s["step"] for s in jsonl]
    assert [e.value for e in losses] == pytest.approx([s["loss"] for s in jsonl], rel=1e-6)
    assert [e.value for e in acc.Scalars("val/bleu")] == pytest.approx([h.val_bleu for h in result.history])


def test_train_log_holds_what_the_run_printed(logged_run):
    cfg, _ = logged_run
    text = (Path(cfg.output_dir) / "train.log").read_text()
    assert "epoch 1/2 | train_loss" in text and "epoch 2/2 | train_loss" in text and "training 8 clips" in text


def test_config_records_commit_encoder_hash_and_hardware(logged_run):
    cfg, _ = logged_run
    record = json.loads((Path(cfg.output_dir) / "config.json").read_text())
    assert record["encoder_checkpoint_sha256"] == io_sha256(cfg.encoder_checkpoint)
    assert {"gpu_name", "gpu_memory_gib", "cuda_version", "cudnn_version"} <= set(record["hardware"])
    if (REPO / ".git").exists():
        assert len(record["git"]["commit"]) == 40 and isinstance(record["git"]["dirty"], bool)


def io_sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_finished_run_rerun_does_no_work(logged_run, monkeypatch, caplog):
    import sonar_ft.training.recipe as recipe_mod

    cfg, result = logged_run
    before = {p.name: p.stat().st_mtime_ns for p in Path(cfg.output_dir).iterdir()}

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished run read clips or loaded a model")

    monkeypatch.setattr(recipe_mod, "load_split", forbidden)
    monkeypatch.setattr(recipe_mod, "load_encoder", forbidden)
    with caplog.at_level("INFO", logger="sonar_ft"):
        again = train(cfg)
    assert again.already_finished and again.best_epoch == result.best_epoch and len(again.history) == 2
    assert "already holds this run, finished" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in Path(cfg.output_dir).iterdir()} == before


def test_best_epoch_of_plots_follows_select_metric():
    history = [{"epoch": 1, "val_bleu": 5.0, "val_loss": 2.0}, {"epoch": 2, "val_bleu": 4.0, "val_loss": 1.5}]
    assert plots.best_epoch(history)["epoch"] == 1
    assert plots.best_epoch(history, select_metric="loss")["epoch"] == 2
    flagged = [dict(h, is_best=h["epoch"] == 2) for h in history]
    assert plots.best_epoch(flagged)["epoch"] == 2  # what the run itself chose wins


# ------------------------------------------------------------------------------------------------
# Output folder rules
# ------------------------------------------------------------------------------------------------
def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(logged_run, data, tmp_path):
    cfg, _ = logged_run
    out = Path(cfg.output_dir)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(ConfigError):
        train(data.config(out, overwrite=True, learning_rate=float("nan")))
    with pytest.raises(Exception):
        train(data.config(out, overwrite=True, train_features=str(tmp_path / "missing")))
    assert sorted(p.name for p in out.iterdir()) == before and (out / LAST_STATE).exists()


def test_resume_of_a_folder_without_a_run_is_an_error(data, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputDirError, match="--resume: .* holds no run"):
        train(data.config(tmp_path / "empty", resume=True))


def test_validation_manifest_equal_to_training_is_refused(data, tmp_path):
    copy = tmp_path / "copy.tsv"
    copy.write_bytes(data.manifest("train").read_bytes())
    for val in (data.manifest("train"), copy):
        with pytest.raises(ConfigError, match="--allow_train_as_val"):
            train(data.config(tmp_path / "out", val_manifest=str(val), val_features=str(data.features("train"))))


# ------------------------------------------------------------------------------------------------
# Resume releases the loaded state
# ------------------------------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_resumed_run_keeps_nothing_of_the_loaded_state(logged_run, data, monkeypatch):
    import sonar_ft.training.recipe as recipe_mod

    cfg, _ = logged_run
    real, loaded = atomic.load_torch, []

    def load_with_ballast(path, **kwargs):
        state = real(path, **kwargs)
        state["ballast"] = torch.ones(64 * 2**20)  # 256 MiB riding along in the loaded last.pt
        loaded.append(weakref.ref(state["ballast"]))
        return state

    monkeypatch.setattr(recipe_mod.atomic, "load_torch", load_with_ballast)
    r = FineTuneRecipe(data.config(cfg.output_dir, batch_size=2, grad_accum=2, epochs=3, log_every_steps=1,
                                   report_to="jsonl,tensorboard", progress="plain", resume=True), DistContext())
    gc.collect()
    before = _rss_mib()
    r.setup()
    gc.collect()
    grown = _rss_mib() - before
    print(f"\nhost memory after resuming with 256 MiB of loaded state: {grown:+.0f} MiB")
    assert r.resuming and r.state.epoch == 2 and loaded and loaded[0]() is None
    assert grown < 128


def test_state_dir_keeps_last_pt_local_mirrors_it_and_brings_it_back_after_a_disconnect(data, tmp_path):
    """--state_dir (the disk plan's slots-1): last.pt on local disk, one copy in the run folder."""
    out, local = tmp_path / "drive" / "run", tmp_path / "local"
    first = train(data.config(out, batch_size=4, epochs=1, state_dir=str(local)))
    assert (local / LAST_STATE).is_file() and (out / LAST_STATE).read_bytes() == (local / LAST_STATE).read_bytes()
    (local / LAST_STATE).unlink()  # a fresh runtime: the local disk is gone, the run folder (Drive) is not
    second = train(data.config(out, batch_size=4, epochs=2, state_dir=str(local)))
    assert [h.epoch for h in second.history] == [1, 2]  # epoch 1 came from the restored state, not run again
    assert second.history[0].train_loss == first.history[0].train_loss
    assert (local / LAST_STATE).is_file() and (out / LAST_STATE).read_bytes() == (local / LAST_STATE).read_bytes()


def test_a_second_training_on_a_locked_run_folder_is_refused_naming_the_holder(data, tmp_path):
    from sonar_ft.files.lock import output_lock

    out = tmp_path / "run"
    with output_lock(out, command="another training"):
        with pytest.raises(OutputDirError, match=f"PID {os.getpid()}"):
            train(data.config(out, batch_size=4, epochs=1))
    assert not (out / LAST_STATE).exists()
