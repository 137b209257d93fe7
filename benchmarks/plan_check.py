"""Plan check: the memory planner against PyTorch's own accounting of one training step, per category (issue #22).

``make plan-check`` (or ``python benchmarks/plan_check.py``): for each planner profile (full fine-tuning and
LoRA; T4, L4, A100 40 GB, A100 80 GB) it builds the official-size models — the SignT5 encoder and the SONAR
``basic`` text decoder of sonar-space's own architecture (24 layers, 256,206 tokens) — applies the plan's
flags, and runs two optimiser steps of the plan's micro-batches (all ``--grad_accum`` of them) on clips of
the longest length, under a :class:`ByteTracker` that sees every tensor storage PyTorch creates and frees.
The live bytes are attributed to categories (weights, frozen decoder, gradients, optimiser states, saved
activations, backward temporaries, loss chunk), and each category's peak, and the total's, stand next to the
plan's figure as a ratio.

How the CPU stands in for the GPU (written into the report as well):

- **Shapes without arithmetic.** A step at the plan's micro-batch (16-32 clips of 600 frames) needs tens of
  GiB and an hour of CPU; so the profiles run under ``FakeTensorMode``: every operator runs its real
  dispatch (autocast, autograd, checkpoint recomputation, fused AdamW) and produces tensors of the real
  shapes and dtypes, with storages that hold no data. The byte account is the same as with data:
  ``--smoke`` and ``tests/plan/test_plan_check.py`` run the same step with and without fake tensors and
  compare every category.
- **Attention.** CPUs run the encoder's attention with a learned bias as the math kernel (it keeps the
  softmax probabilities and float dropout masks); CUDA runs a fused kernel. The plan is compared with the
  planner's ``attention="math"`` figure; the GPU's figure is the same formula with ``attention="fused"``.
- **fp16 decoder (T4).** Fake tensors run fp16 as planned (no CPU kernel is needed); dynamic loss
  scaling multiplies a scalar and unscales in place, so it adds no bytes and is left out.
- **8-bit AdamW (T4).** bitsandbytes has no CPU path: the step runs fused AdamW and each state tensor is
  counted with bitsandbytes' own layout (uint8 per element plus an fp32 absmax per 256-element block;
  fp32 for tensors under 4,096 elements), :func:`sonar_ft.plan.memory.adamw8bit_state_bytes`.
- **Fused kernels.** AdamW runs fused (what the recipe uses on CUDA), not CPU's default for-each path that
  keeps a temporary copy of every moment.

Not measured here: the CUDA allocator's rounding and fragmentation, cuBLAS / cuDNN workspaces and the CUDA
context. They are the margin the plan keeps (it fills at most ``HEADROOM`` of the GPU); ``make gpu-check``
measures them the day a GPU is lent.

``--host`` also measures the host RAM (resident set) of reading the official-size encoder checkpoint
(start-up) and a T4 plan's ``last.pt`` (resume), each in a fresh process; ``--smoke`` runs everything
with tiny shapes in seconds (the suite runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import OUT  # noqa: E402
from sonar_ft.files import atomic  # noqa: E402
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder  # noqa: E402
from sonar_ft.plan import memory  # noqa: E402
from sonar_ft.plan.recommend import GPUS, Plan, estimate_for, recommend, recommend_lora  # noqa: E402

GIB = 1024**3
CATEGORIES = ("weights", "frozen_decoder", "gradients", "optimizer_states", "activations", "temporaries", "loss")
"""The plan's categories (:func:`sonar_ft.plan.memory.estimate_memory`'s keys, ``total`` aside)."""
PROFILES = ("t4", "l4", "a100", "a100-80")
"""The planned GPUs checked (an H100's plan is the A100 80 GB's)."""


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    """Models and clips of one scale (official, or tiny for ``--smoke``)."""

    encoder: SignT5Config
    decoder_overrides: dict[str, Any] | None
    """Changes to sonar-space's ``basic`` decoder architecture (None: the official one)."""
    vocab: int
    max_frames: int
    target_tokens: int
    effective_batch: int
    lora_rank: int = 16


OFFICIAL = Sizes(encoder=SignT5Config(), decoder_overrides=None, vocab=memory.SONAR_VOCAB,
                 max_frames=memory.DEFAULT_MAX_FRAMES, target_tokens=memory.DEFAULT_TARGET_TOKENS, effective_batch=32)
SMOKE = Sizes(
    encoder=SignT5Config(feature_dim=16, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=2,
                         num_decoder_layers=1, vocab_size=8, output_dim=32),
    decoder_overrides={"model_dim": 32, "num_encoder_layers": 1, "num_decoder_layers": 2, "num_encoder_attn_heads": 4,
                       "num_decoder_attn_heads": 4, "ffn_inner_dim": 64, "max_seq_len": 64},
    vocab=3000, max_frames=40, target_tokens=12, effective_batch=4, lora_rank=4,
)


# ------------------------------------------------------------------------------------------------
# The tracker
# ------------------------------------------------------------------------------------------------
@dataclass
class _Storage:
    nbytes: int
    phase: str
    loss: bool  # a (rows, vocab) tensor: logits, log-probabilities or their gradients
    what: str  # shape and dtype of the first tensor on it (for the report's largest storages)


class ByteTracker(TorchDispatchMode):
    """Every storage an operator creates, with its size, the step phase it was made in, and when it is freed.

    Storages are followed by identity (a view shares its base's storage and is counted once); a
    finaliser notes when the last tensor on a storage goes. Works on real tensors and on fake ones.
    The events are replayed by :meth:`account` once the step is over, when it is known which storages
    became gradients or optimiser states.
    """

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.phase = "setup"
        self.storages: dict[int, _Storage] = {}
        self.events: list[tuple[int, int]] = []  # (uid, +1 created | -1 freed)
        self._uid_of: dict[int, int] = {}  # a live storage's C pointer -> uid
        self._next = itertools.count()
        self.fixed: dict[int, str] = {}  # uid -> category for storages whose role is known up front
        self.gradient_uids: set[int] = set()
        self.state_uids: dict[int, int] = {}  # uid -> bytes under the optimiser that the plan has
        self._finalizers: list[weakref.finalize] = []

    def uid(self, t: torch.Tensor, *, phase: str | None = None) -> int:
        """The uid of ``t``'s storage, registering it (as made now) when it is new."""
        st = t.untyped_storage()
        key = st._cdata
        uid = self._uid_of.get(key)
        if uid is not None:
            return uid
        uid = next(self._next)
        self._uid_of[key] = uid
        self.storages[uid] = _Storage(st.nbytes(), phase or self.phase, t.dim() >= 2 and t.size(-1) == self.vocab,
                                      f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
        self.events.append((uid, 1))
        self._finalizers.append(weakref.finalize(st, self._freed, key, uid))
        return uid

    def stop(self) -> None:
        """Stop following storages (before the models are dropped: nothing after the step is counted)."""
        for fin in self._finalizers:
            fin.detach()
        self._finalizers.clear()

    def _freed(self, key: int, uid: int) -> None:
        if self._uid_of.get(key) == uid:
            del self._uid_of[key]
        self.events.append((uid, -1))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.uid(t)
        return out

    def register(self, tensors: Iterator[torch.Tensor], category: str) -> None:
        """Storages that exist before the step (weights): counted from the start under ``category``."""
        for t in tensors:
            self.fixed.setdefault(self.uid(t, phase="setup"), category)

    def note_gradients(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p.grad is not None:
                self.gradient_uids.add(self.uid(p.grad))

    def note_states(self, optimizer: torch.optim.Optimizer, eight_bit: bool) -> None:
        """The optimiser's state storages, each with the bytes the planned optimiser gives it."""
        for p, state in optimizer.state.items():
            for name, t in state.items():
                if not torch.is_tensor(t):
                    continue
                uid = self.uid(t)
                if eight_bit and name in ("exp_avg", "exp_avg_sq"):
                    self.state_uids[uid] = memory.adamw8bit_state_bytes([p.numel()]) // 2
                elif eight_bit and name == "step":
                    self.state_uids[uid] = 0  # bitsandbytes counts steps in Python
                else:
                    self.state_uids[uid] = self.storages[uid].nbytes

    def category(self, uid: int) -> str:
        if uid in self.fixed:
            return self.fixed[uid]
        if uid in self.gradient_uids:
            return "gradients"
        if uid in self.state_uids:
            return "optimizer_states"
        s = self.storages[uid]
        if s.loss:
            return "loss"
        return "activations" if s.phase == "forward" else "temporaries"

    def account(self, *, since: int = 0) -> dict[str, Any]:
        """Replay the events: each category's peak, the total's peak and the categories at that moment.

        ``since``: the event index from which peaks count (the storages alive then are carried in).
        """
        live = {c: 0 for c in CATEGORIES}
        peaks = dict(live)
        total_peak, at_peak, peak_index = 0, dict(live), 0
        for i, (uid, sign) in enumerate(self.events):
            cat = self.category(uid)
            size = self.state_uids.get(uid, self.storages[uid].nbytes)
            live[cat] += sign * size
            if i < since:
                continue
            if live[cat] > peaks[cat]:
                peaks[cat] = live[cat]
            total = sum(live.values())
            if total > total_peak:
                total_peak, at_peak, peak_index = total, dict(live), i
        alive: set[int] = set()
        for uid, sign in self.events[: peak_index + 1]:
            (alive.add if sign > 0 else alive.discard)(uid)
        largest: dict[str, dict[str, int]] = {}
        for uid in alive:
            if uid in self.fixed:
                continue
            s = self.storages[uid]
            key = f"{self.category(uid)} {s.phase} {s.what}"
            entry = largest.setdefault(key, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += self.state_uids.get(uid, s.nbytes)
        top = dict(sorted(largest.items(), key=lambda kv: -kv[1]["bytes"])[:25])
        return {"peaks": peaks, "total_peak": total_peak, "at_total_peak": at_peak, "largest_at_peak": top}


# ------------------------------------------------------------------------------------------------
# One profile
# ------------------------------------------------------------------------------------------------
class _Tokenizer:
    """The two things FrozenTextDecoder asks of a tokenizer when no text is tokenised."""

    def __init__(self, vocab: int) -> None:
        self.vocab_info = SimpleNamespace(size=vocab, pad_idx=0)

    def create_decoder(self, **_: Any) -> Any:
        return lambda tokens: ""


def run_settings(plan: Plan, sizes: Sizes) -> SimpleNamespace:
    """The recipe settings of a plan (``TrainConfig``'s defaults for the rest)."""
    from sonar_ft.config import TrainConfig

    values = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    values.update(plan.settings)
    values.setdefault("lora_rank", 0)
    if values["lora_rank"]:
        values["lora_rank"] = sizes.lora_rank
    return SimpleNamespace(**values)


def build_models(sizes: Sizes, cfg: SimpleNamespace) -> tuple[torch.nn.Module, Any]:
    """The encoder as the recipe configures it (freezing, checkpointing, LoRA) and the frozen decoder."""
    from sonar.models.sonar_text import SonarTextDecoderFactory

    from benchmarks.gpu_check import decoder_config
    from sonar_ft.models.decoder import FrozenTextDecoder
    from sonar_ft.training import perf

    encoder = SignT5SonarEncoder(sizes.encoder)
    perf.configure_encoder(encoder, cfg)
    if cfg.lora_rank:
        from sonar_ft.models import lora

        lora.apply_lora(encoder, cfg)
    encoder.train()
    dec_cfg = decoder_config(SimpleNamespace(decoder_overrides=sizes.decoder_overrides), sizes.vocab)
    model = SonarTextDecoderFactory(dec_cfg).create_model().to(memory.TORCH_DTYPES[cfg.decoder_dtype])
    decoder = FrozenTextDecoder(model, _Tokenizer(sizes.vocab), langs=["eng_Latn"])
    if cfg.gradient_checkpointing:
        perf.checkpoint_decoder_layers(decoder.model)
    return encoder, decoder


def train_step(encoder: torch.nn.Module, decoder: Any, optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
               cfg: SimpleNamespace, sizes: Sizes, tracker: ByteTracker, targets: list[torch.Tensor]) -> None:
    """One optimiser step over ``grad_accum`` micro-batches of the longest clips, as the recipe takes it.

    The recipe's ``train_step`` with its bookkeeping left out (token counts, NaN checks, loss scaling):
    autocast forward, teacher-forced chunked loss through the frozen decoder, backward, clipping, step.
    Every target has the longest length, so the scored positions are all of them (a reshape stands in
    for the recipe's boolean mask, which fake tensors cannot evaluate).
    """
    from sonar_ft.models.decoder import chunked_cross_entropy

    B, T = cfg.batch_size, sizes.max_frames
    precision = cfg.precision
    from fairseq2.nn import BatchLayout

    for tokens in targets:
        tracker.phase = "forward"
        features = torch.randn(B, T, sizes.encoder.feature_dim)
        mask = torch.ones(B, T, dtype=torch.bool)
        # CPU autocast stands in for CUDA's (the recipe autocasts on CUDA only): the same matmuls run in bf16.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            emb = encoder(features, mask)
        emb = emb.float()
        # FrozenTextDecoder.decoder_states, with the lengths as Python numbers (a fake tensor has no values).
        inputs = tokens[:, :-1]
        memory_in = emb.to(decoder.dtype).unsqueeze(1)  # (B, 1, E)
        states = decoder.model.decode(inputs, BatchLayout.of(inputs, [inputs.size(1)] * B), memory_in,
                                      BatchLayout.of(memory_in))[:, 1:]  # (B, S-2, M)
        targets = tokens[:, 2:].reshape(-1)
        summed = chunked_cross_entropy(states.reshape(-1, states.size(-1)), decoder.output_weight,
                                       getattr(decoder.model.final_proj, "bias", None), targets,
                                       label_smoothing=cfg.label_smoothing, chunk_size=cfg.loss_chunk_size)
        loss = summed / targets.numel() / cfg.grad_accum
        del emb, states, summed, features, mask, memory_in
        tracker.phase = "backward"
        loss.backward()
        del loss
    tracker.note_gradients(params)
    tracker.phase = "optimizer"
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    optimizer.step()
    tracker.note_states(optimizer, cfg.optimizer == "adamw8bit")
    optimizer.zero_grad(set_to_none=True)
    tracker.phase = "between"


def measure_profile(plan: Plan, sizes: Sizes, *, fake: bool, steps: int = 1) -> dict[str, Any]:
    """Run ``steps`` optimiser steps of ``plan`` under a :class:`ByteTracker` (AdamW's moments made before); the peaks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from sonar_ft.training import perf

    cfg = run_settings(plan, sizes)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    # Target tokens are made outside fake mode: the decoder reads their lengths as Python numbers.
    S = sizes.target_tokens + 2  # </s> lang ... </s>
    targets = [torch.randint(4, sizes.vocab, (cfg.batch_size, S), generator=gen) for _ in range(cfg.grad_accum)]
    started = time.perf_counter()
    tracker = ByteTracker(sizes.vocab)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    with fake_mode or _nothing():
        encoder, decoder = build_models(sizes, cfg)
        groups = perf.parameter_groups(encoder, cfg.weight_decay)
        params = [p for g in groups for p in g["params"]]
        # Fused AdamW: what the recipe runs on CUDA (8-bit AdamW is counted by its layout, see the module doc).
        optimizer = torch.optim.AdamW(groups, lr=1e-5, weight_decay=cfg.weight_decay, fused=True)
        # AdamW's moments made before the measured step, as in every step after the first.
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with tracker:
            tracker.register(itertools.chain(encoder.parameters(), encoder.buffers()), "weights")
            tracker.register(itertools.chain(decoder.parameters(), decoder.buffers()), "frozen_decoder")
            tracker.note_states(optimizer, cfg.optimizer == "adamw8bit")
            for _ in range(steps):
                train_step(encoder, decoder, optimizer, params, cfg, sizes, tracker, targets)
        tracker.stop()
        # Freeing a fake peft-wrapped model can crash the interpreter (seen at the official size): the
        # models stay referenced and each profile runs in its own process, which ends with os._exit.
        _KEEP.append((optimizer, params, groups, encoder, decoder))
    measured = tracker.account()
    return {"measured": measured, "seconds": round(time.perf_counter() - started, 1), "fake": fake,
            "settings": dict(plan.settings)}


_KEEP: list[Any] = []


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def plan_for(gpu: str, mode: str, sizes: Sizes) -> Plan:
    """The planner's plan for ``gpu`` at the check's sizes (full fine-tuning or LoRA)."""
    spec = decoder_spec(sizes)
    kwargs = dict(max_frames=sizes.max_frames, target_tokens=sizes.target_tokens, config=sizes.encoder, decoder=spec)
    if mode == "lora":
        return recommend_lora(gpu, sizes.effective_batch, rank=sizes.lora_rank, **kwargs)
    return recommend(gpu, sizes.effective_batch, **kwargs)


def decoder_spec(sizes: Sizes) -> memory.DecoderSpec:
    if sizes.decoder_overrides is None:
        return memory.sonar_decoder_spec()
    from sonar.models.sonar_text import SonarTextDecoderFactory

    from benchmarks.gpu_check import decoder_config

    config = decoder_config(SimpleNamespace(decoder_overrides=sizes.decoder_overrides), sizes.vocab)
    with torch.device("meta"):
        model = SonarTextDecoderFactory(config).create_model()
    return memory.DecoderSpec(params=sum(p.numel() for p in model.parameters()), model_dim=config.model_dim,
                              ffn_dim=config.ffn_inner_dim, num_layers=config.num_decoder_layers, vocab=config.vocab_info.size)


def cpu_estimate(plan: Plan, sizes: Sizes) -> dict[str, int]:
    """The plan's estimate for the path the CPU runs (math attention, CPU dropout masks)."""
    cfg = run_settings(plan, sizes)
    return estimate_for(cfg, sizes.encoder, frames=sizes.max_frames, target_tokens=sizes.target_tokens,
                        precision=cfg.precision, decoder=decoder_spec(sizes), attention="math")


def compare(measured: dict[str, Any], estimate: dict[str, int]) -> dict[str, Any]:
    """Measured / planned per category, both at the step's peak (the moment that decides whether it fits), and the total."""
    ratios: dict[str, Any] = {}
    small = NEGLIGIBLE * measured["total_peak"]
    for c in CATEGORIES:
        planned, got = estimate.get(c, 0), measured["at_total_peak"][c]
        if planned < small and got < small:
            ratios[c] = None  # neither side holds a measurable share of the peak in this category
        else:
            ratios[c] = round(got / planned, 3) if planned else float("inf")
    ratios["total"] = round(measured["total_peak"] / estimate["total"], 3)
    return ratios


NEGLIGIBLE = 0.005
"""A category under this share of the peak on both sides has no ratio (e.g. 3 MiB of backward temporaries)."""

CATEGORY_GOAL, TOTAL_GOAL = 0.10, 0.05
"""The issue's goal: every category within 10 %, the total within 5 %."""


def profile_record(gpu: str, mode: str, sizes: Sizes, run: dict[str, Any]) -> dict[str, Any]:
    """The measurement of one profile next to the plan's figures (CPU path, and the GPU's for reference)."""
    plan = plan_for(gpu, mode, sizes)
    if run.get("settings", plan.settings) != plan.settings:
        raise RuntimeError(f"{gpu}/{mode}: the plan changed while it was measured ({run['settings']} -> {plan.settings})")
    estimate = cpu_estimate(plan, sizes)
    m = run["measured"]
    ratio = compare(m, estimate)
    ok = all(r is None or abs(r - 1) <= CATEGORY_GOAL for c, r in ratio.items() if c != "total") and abs(ratio["total"] - 1) <= TOTAL_GOAL
    return {
        "profile": f"{gpu}/{mode}", "gpu": GPUS[gpu].name, "flags": plan.flags(), "fake": run["fake"], "seconds": run["seconds"],
        "plan_gib": {k: round(v / GIB, 3) for k, v in estimate.items()},
        "gpu_plan_gib": {k: round(v / GIB, 3) for k, v in plan.estimate.items()},
        "measured_gib": {**{k: round(v / GIB, 3) for k, v in m["at_total_peak"].items()}, "total": round(m["total_peak"] / GIB, 3)},
        "measured_bytes": {**m["at_total_peak"], "total": m["total_peak"]},
        "category_peaks_gib": {k: round(v / GIB, 3) for k, v in m["peaks"].items()},
        "largest_at_peak": {k: {"count": v["count"], "gib": round(v["bytes"] / GIB, 3)} for k, v in m["largest_at_peak"].items()},
        "ratio": ratio, "goal_met": ok,
    }


def settings_from_flags(flags: list[str]) -> dict[str, Any]:
    """The plan settings a flag list applies (the inverse of ``Plan.flags``)."""
    settings: dict[str, Any] = {"gradient_checkpointing": False, "freeze_encoder_layers": 0, "lora_rank": 0}
    i = 0
    while i < len(flags):
        name = flags[i][2:]
        if name == "gradient_checkpointing":
            settings[name] = True
            i += 1
            continue
        value = flags[i + 1]
        settings[name] = int(value) if value.isdigit() else value
        i += 2
    return settings


def recompare(report: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """The report's measurements against the planner as it is now, at the settings that were measured."""
    for rec in report["profiles"]:
        if "measured_gib" not in rec:
            continue
        plan = SimpleNamespace(settings=settings_from_flags(rec["flags"]))
        estimate = cpu_estimate(plan, sizes)  # type: ignore[arg-type]
        m = {"at_total_peak": {c: rec["measured_gib"][c] * GIB for c in CATEGORIES}, "total_peak": rec["measured_gib"]["total"] * GIB}
        rec["plan_gib"] = {k: round(v / GIB, 3) for k, v in estimate.items()}
        rec["ratio"] = compare(m, estimate)
        rec["goal_met"] = (all(r is None or abs(r - 1) <= CATEGORY_GOAL for c, r in rec["ratio"].items() if c != "total")
                           and abs(rec["ratio"]["total"] - 1) <= TOTAL_GOAL)
    return report


def check_profile(gpu: str, mode: str, sizes: Sizes, *, fake: bool = True) -> dict[str, Any]:
    """Measure one profile in this process (the smoke test's way; the CLI runs each in its own process)."""
    run = measure_profile(plan_for(gpu, mode, sizes), sizes, fake=fake)
    return profile_record(gpu, mode, sizes, run)


def _measure_in_child(gpu: str, mode: str, smoke: bool, path: Path) -> dict[str, Any]:
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{gpu}/{mode}", "--child_out", str(path)]
    if smoke:
        cmd.append("--smoke")
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.exists():
        raise RuntimeError(f"measuring {gpu}/{mode} failed (exit {done.returncode}): {done.stderr.strip()[-600:]}")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------
# Host RAM
# ------------------------------------------------------------------------------------------------
_HOST_CHILD = """
import resource, sys, torch
import sonar_ft.training.recipe, sonar.models.sonar_text  # what a run imports
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
what, path = sys.argv[1], sys.argv[2]
if what == "encoder":
    from sonar_ft.models.encoder import load_encoder
    model, _ = load_encoder(path)
elif what == "last":
    from sonar_ft.files.atomic import load_torch
    state = load_torch(path, what="training state")
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def measure_host(work: Path, sizes: Sizes) -> dict[str, Any]:
    """Peak resident memory of reading the encoder checkpoint (start-up) and a T4 plan's ``last.pt`` (resume).

    Each is read in a fresh process after the imports a run makes; the files are written here with the
    official layout (the weights' values do not matter for their size). ``last.pt`` holds the encoder
    and 8-bit AdamW moments in bitsandbytes' layout (the T4 plan's optimiser).
    """
    import subprocess

    from sonar_ft.models.encoder import save_encoder
    from sonar_ft.plan.host import host_plan

    with torch.device("meta"):
        model = SignT5SonarEncoder(sizes.encoder)
    model = model.to_empty(device="cpu")
    encoder_path, last_path = work / "encoder.pth", work / "last.pt"
    save_encoder(model, encoder_path)
    state = {k: v for k, v in model.state_dict().items()}
    moments = {k: torch.empty(memory.adamw8bit_state_bytes([v.numel()]), dtype=torch.uint8) for k, v in state.items()}
    atomic.save_torch(last_path, {"encoder": state, "optimizer": {"state": moments}})
    del model, state, moments
    out: dict[str, Any] = {"encoder_file_gib": round(encoder_path.stat().st_size / GIB, 2),
                           "last_pt_gib": round(last_path.stat().st_size / GIB, 2)}
    for what, path in (("baseline", encoder_path), ("encoder", encoder_path), ("last", last_path)):
        done = subprocess.run([sys.executable, "-c", _HOST_CHILD, what, str(path)], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        if done.returncode != 0:
            raise RuntimeError(f"host RAM ({what}) failed: {done.stderr.strip()[-400:]}")
        base, peak = (int(x) for x in done.stdout.split()[-2:])
        out[f"{what}_rss_gib"] = round(peak / GIB, 2)
    plan = host_plan(sizes.encoder, optimizer="adamw8bit", decoder=decoder_spec(sizes))
    out["plan_startup_gib"], out["plan_resume_gib"] = round(plan.startup / GIB, 2), round(plan.resume / GIB, 2)
    return out


def markdown(report: dict[str, Any]) -> str:
    """The table of measured / planned ratios per profile and category."""
    cats = [c for c in CATEGORIES]
    head = "| profile | flags | " + " | ".join(c.replace("_", " ") for c in cats) + " | total | measured GiB | plan GiB (CPU) | plan GiB (GPU) | goal |"
    lines = [f"# Plan check{' (--smoke)' if report['smoke'] else ''}", "",
             f"torch {report['torch']}, {report['date']}, {report['seconds']:.0f} s. Ratios are measured / planned bytes at the "
             "step's peak (categories) and of the peak (total); – : neither the plan nor the step has any at the peak.", "",
             head, "|" + "---|" * (len(cats) + 7)]
    for r in report["profiles"]:
        if "ratio" not in r:
            lines.append(f"| {r['profile']} | – | " + " | ".join("–" for _ in cats) + f" | – | – | – | – | {r.get('error', '')} |")
            continue
        cells = [("–" if r["ratio"][c] is None else f"{r['ratio'][c]:.2f}") for c in cats]
        lines.append(f"| {r['profile']} | `{' '.join(r['flags'])}` | " + " | ".join(cells) +
                     f" | {r['ratio']['total']:.3f} | {r['measured_gib']['total']:.2f} | {r['plan_gib']['total']:.2f} | "
                     f"{r['gpu_plan_gib']['total']:.2f} | {'met' if r['goal_met'] else 'NOT met'} |")
    host = report.get("host")
    if host:
        lines += ["", "Host RAM (resident set, GiB): imports "
                  f"{host['baseline_rss_gib']}, reading the encoder checkpoint ({host['encoder_file_gib']} GiB file) "
                  f"{host['encoder_rss_gib']} (plan's start-up {host['plan_startup_gib']}), reading a T4 plan's last.pt "
                  f"({host['last_pt_gib']} GiB file) {host['last_rss_gib']} (plan's resume {host['plan_resume_gib']})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (seconds; what the suite runs)")
    parser.add_argument("--profiles", nargs="*", default=None, help=f"GPU profiles (default {' '.join(PROFILES)})")
    parser.add_argument("--modes", nargs="*", default=["full", "lora"], choices=["full", "lora"])
    parser.add_argument("--out", type=Path, default=OUT, help="folder for plan_check.{json,md}")
    parser.add_argument("--host", action="store_true", help="also measure host RAM of start-up and resume (official: ~5 GiB of files)")
    parser.add_argument("--recompare", type=Path, help="compare a written plan_check.json with the planner as it is now (no run)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else OFFICIAL
    import warnings

    warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
    if args.child:
        gpu, mode = args.child.split("/")
        run = measure_profile(plan_for(gpu, mode, sizes), sizes, fake=True)
        atomic.write_json(args.child_out, run)
        sys.stdout.flush()
        os._exit(0)  # see measure_profile: no teardown of the fake models
    if args.recompare:
        report = recompare(json.loads(args.recompare.read_text()), sizes)
        atomic.write_json(args.recompare, report)
        atomic.write_text(args.recompare.with_suffix(".md"), markdown(report))
        print(markdown(report))
        return 0
    started = time.perf_counter()
    report: dict[str, Any] = {"smoke": args.smoke, "torch": torch.__version__,
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "profiles": []}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="plan_check_") as tmp:
        if args.host:
            report["host"] = measure_host(Path(tmp), sizes)
            print(f"[host RAM] {json.dumps(report['host'])}", flush=True)
        for gpu in args.profiles or PROFILES:
            for mode in args.modes:
                try:
                    run = _measure_in_child(gpu, mode, args.smoke, Path(tmp) / f"{gpu}_{mode}.json")
                    rec = profile_record(gpu, mode, sizes, run)
                except Exception as exc:  # one profile failing must not hide the others
                    rec = {"profile": f"{gpu}/{mode}", "error": f"{type(exc).__name__}: {exc}"}
                report["profiles"].append(rec)
                print(f"[{rec['profile']}] " + (json.dumps(rec["ratio"]) if "ratio" in rec else rec["error"]), flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    name = "plan_check_smoke" if args.smoke else "plan_check"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out / f"{name}.json", report)
    atomic.write_text(args.out / f"{name}.md", markdown(report))
    print(markdown(report))
    failed = [r["profile"] for r in report["profiles"] if "error" in r]
    if failed:
        print(f"plan_check: profiles that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
