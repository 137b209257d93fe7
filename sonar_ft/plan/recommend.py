"""Which settings fit a GPU: a ladder from the least intrusive to the most, walked until the estimate fits.

``recommend`` (full fine-tuning) goes from plain AdamW, no recomputation and the whole batch at once
to 8-bit AdamW, gradient checkpointing, small micro-batches and frozen lower layers; ``recommend_lora``
takes the largest micro-batch that fits. Gradient accumulation keeps the effective batch.
:func:`startup_check` is the recipe's start-up log and out-of-memory warning on a GPU, for either kind of run.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from typing import Any, Callable

import torch

from sonar_ft.errors import ConfigError
from sonar_ft.models.encoder import SignT5Config
from sonar_ft.plan.memory import (
    DEFAULT_MAX_FRAMES, DEFAULT_TARGET_TOKENS, GIB, HEADROOM, DecoderSpec, estimate_lora_memory, estimate_memory,
    format_estimate, sonar_decoder_spec,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class GpuSpec:
    """A GPU as the planner sees it: memory PyTorch reports and whether it computes in bf16."""

    name: str
    memory_bytes: int
    bf16: bool
    peak_tflops: float | None = None
    """Dense matmul peak in the precision the plan trains the encoder in (bf16, or fp32 without bf16); None: unknown."""


GPUS: dict[str, GpuSpec] = {
    # Memory as torch.cuda.get_device_properties reports it on Colab (a little under the label); peak
    # TFLOP/s from the vendors' data sheets (dense): T4 fp32 (no bf16, no TF32), the others bf16.
    "t4": GpuSpec("T4 (16 GB)", int(15.0 * GIB), bf16=False, peak_tflops=8.1),
    "l4": GpuSpec("L4 (24 GB)", int(22.0 * GIB), bf16=True, peak_tflops=121.0),
    "a100": GpuSpec("A100 (40 GB)", int(39.4 * GIB), bf16=True, peak_tflops=312.0),
    "a100-80": GpuSpec("A100 (80 GB)", int(79.1 * GIB), bf16=True, peak_tflops=312.0),
    "h100": GpuSpec("H100 (80 GB)", int(79.1 * GIB), bf16=True, peak_tflops=989.0),
}


@dataclass
class Plan:
    """Settings that fit a GPU, with the estimate behind them."""

    gpu: GpuSpec
    effective_batch: int
    settings: dict[str, Any]
    estimate: dict[str, int]
    max_frames: int
    target_tokens: int

    @property
    def budget(self) -> int:
        return int(self.gpu.memory_bytes * HEADROOM)

    @property
    def fits(self) -> bool:
        return self.estimate["total"] <= self.budget

    def flags(self) -> list[str]:
        """The recipe flags that apply the plan."""
        s = self.settings
        out = ["--batch_size", str(s["batch_size"]), "--grad_accum", str(s["grad_accum"]),
               "--precision", s["precision"], "--decoder_dtype", s["decoder_dtype"],
               "--optimizer", s["optimizer"], "--loss_chunk_size", str(s["loss_chunk_size"])]
        if s["gradient_checkpointing"]:
            out.append("--gradient_checkpointing")
        if s["freeze_encoder_layers"]:
            out += ["--freeze_encoder_layers", str(s["freeze_encoder_layers"])]
        if s.get("lora_rank"):
            out += ["--lora_rank", str(s["lora_rank"])]
        return out

    def format_table(self) -> str:
        """A human-readable breakdown (GiB) and the flags."""
        return format_estimate(
            self.estimate, title=f"{self.gpu.name}: effective batch {self.effective_batch} "
            f"(max {self.max_frames} frames, {self.target_tokens} target tokens)", budget=self.budget,
        ) + "\nflags: " + " ".join(self.flags())


def gpu_spec(gpu: str) -> GpuSpec:
    """The :class:`GpuSpec` of a known GPU name (``t4``, ``l4``, ``a100``, ``a100-80``, ``h100``) or ``auto``."""
    key = gpu.lower()
    if key == "auto":
        return detect_gpu()
    if key not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}; choose one of auto, {', '.join(GPUS)}")
    return GPUS[key]


def detect_gpu(run: Callable[[list[str]], str] | None = None) -> GpuSpec:
    """The GPU of this machine: from torch when it sees CUDA, else from ``nvidia-smi``.

    Raises :class:`ConfigError` naming the fix when there is none (a CPU runtime).
    """
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return GpuSpec(props.name, int(props.total_memory), torch.cuda.is_bf16_supported())
    run = run or _nvidia_smi
    try:
        out = run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"])
    except (OSError, subprocess.CalledProcessError):
        out = ""
    line = out.strip().splitlines()[0] if out.strip() else ""
    if not line:
        raise ConfigError(
            "--gpu auto found no GPU (torch sees no CUDA device and nvidia-smi reports none): on Colab choose "
            f"Runtime > Change runtime type > T4 GPU or better, or plan for a GPU by name (--gpu {'|'.join(GPUS)})"
        )
    name, mib, cap = (part.strip() for part in line.split(","))
    return GpuSpec(name, int(float(mib) * 1024**2), bf16=float(cap) >= 8.0)


def _nvidia_smi(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout


def _plan_basics(
    gpu: str | GpuSpec, batch_size: int, config: SignT5Config | None, decoder: DecoderSpec | None,
) -> tuple[GpuSpec, SignT5Config, DecoderSpec, str, str, int]:
    """What every plan for ``gpu`` starts from: its spec, the models, precision, decoder dtype and loss chunk."""
    spec = gpu if isinstance(gpu, GpuSpec) else gpu_spec(gpu)
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1 (got {batch_size})")
    precision = "bf16" if spec.bf16 else "fp32"
    decoder_dtype = "bf16" if spec.bf16 else "fp16"
    chunk = 1024 if spec.memory_bytes >= 30 * GIB else 256
    return spec, config or SignT5Config(), decoder or sonar_decoder_spec(), precision, decoder_dtype, chunk


def recommend(
    gpu: str | GpuSpec,
    batch_size: int = 32,
    *,
    max_frames: int = DEFAULT_MAX_FRAMES,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    config: SignT5Config | None = None,
    decoder: DecoderSpec | None = None,
) -> Plan:
    """The least intrusive settings whose estimate fits ``gpu`` at effective batch ``batch_size``.

    Ladder: AdamW before 8-bit AdamW (exact optimiser first), no recomputation before gradient
    checkpointing, micro-batches of 8 or more before 4-7 (under 4 only as a last resort),
    full fine-tuning before freezing lower encoder layers. The loss chunk shrinks with the GPU.
    If nothing fits, the last (smallest) plan is returned with ``fits`` False.
    """
    spec, config, decoder, precision, decoder_dtype, chunk = _plan_basics(gpu, batch_size, config, decoder)
    micros = [m for m in range(batch_size, 0, -1) if batch_size % m == 0]
    large, medium, small = ([m for m in micros if lo <= m < hi] for lo, hi in ((8, 1 << 30), (4, 8), (1, 4)))
    ladder: list[tuple[int, str, bool, list[int]]] = []
    for freeze in (0, config.num_encoder_layers // 4, config.num_encoder_layers // 2):
        for optimizer in ("adamw", "adamw8bit"):
            for sizes in (large, medium):
                for ckpt in (False, True):
                    ladder.append((freeze, optimizer, ckpt, sizes))
        ladder.append((freeze, "adamw8bit", True, small))
    plan: Plan | None = None
    for freeze, optimizer, ckpt, candidates in ladder:
        for micro in candidates:
            settings = {
                "batch_size": micro, "grad_accum": batch_size // micro, "precision": precision,
                "decoder_dtype": decoder_dtype, "optimizer": optimizer, "gradient_checkpointing": ckpt,
                "freeze_encoder_layers": freeze, "loss_chunk_size": chunk,
            }
            estimate = estimate_memory(
                config, batch_size=micro, grad_accum=batch_size // micro, max_frames=max_frames,
                target_tokens=target_tokens, optimizer=optimizer, precision=precision,
                gradient_checkpointing=ckpt, freeze_encoder_layers=freeze, decoder_dtype=decoder_dtype,
                loss_chunk_size=chunk, vocab=decoder.vocab, decoder=decoder,
            )
            plan = Plan(spec, batch_size, settings, estimate, max_frames, target_tokens)
            if plan.fits:
                return plan
    assert plan is not None
    return plan


def recommend_lora(
    gpu: str | GpuSpec,
    batch_size: int = 32,
    *,
    rank: int = 16,
    max_frames: int = DEFAULT_MAX_FRAMES,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    config: SignT5Config | None = None,
    decoder: DecoderSpec | None = None,
) -> Plan:
    """LoRA settings that fit ``gpu`` with the largest per-step (micro-)batch, effective batch ``batch_size``.

    Micro-batches from ``batch_size`` down; at each, no recomputation before gradient checkpointing.
    Plain AdamW always (its states are small under LoRA) and nothing frozen beyond the base weights.
    If nothing fits, the last (smallest) plan is returned with ``fits`` False.
    """
    spec, config, decoder, precision, decoder_dtype, chunk = _plan_basics(gpu, batch_size, config, decoder)
    plan: Plan | None = None
    for micro in (m for m in range(batch_size, 0, -1) if batch_size % m == 0):
        for ckpt in (False, True):
            settings = {
                "batch_size": micro, "grad_accum": batch_size // micro, "precision": precision,
                "decoder_dtype": decoder_dtype, "optimizer": "adamw", "gradient_checkpointing": ckpt,
                "freeze_encoder_layers": 0, "loss_chunk_size": chunk, "lora_rank": rank,
            }
            estimate = estimate_lora_memory(
                config, rank=rank, batch_size=micro, max_frames=max_frames, target_tokens=target_tokens,
                precision=precision, gradient_checkpointing=ckpt, decoder_dtype=decoder_dtype,
                loss_chunk_size=chunk, vocab=decoder.vocab, decoder=decoder,
            )
            plan = Plan(spec, batch_size, settings, estimate, max_frames, target_tokens)
            if plan.fits:
                return plan
    assert plan is not None
    return plan


def estimate_for(cfg: Any, config: SignT5Config, *, frames: int, target_tokens: int, precision: str,
                 decoder: DecoderSpec | None = None, attention: str = "fused") -> dict[str, int]:
    """The estimate of the run a ``TrainConfig`` describes (per process): LoRA's when ``lora_rank`` > 0, else full fine-tuning's.

    ``attention="math"`` gives the figure of the path a CPU runs (see :func:`~sonar_ft.plan.memory.encoder_activation_bytes`).
    """
    common = dict(batch_size=cfg.batch_size, max_frames=frames, target_tokens=target_tokens, precision=precision,
                  gradient_checkpointing=cfg.gradient_checkpointing, decoder_dtype=cfg.decoder_dtype,
                  loss_chunk_size=cfg.loss_chunk_size, decoder=decoder, attention=attention)
    if decoder is not None:
        common["vocab"] = decoder.vocab
    if getattr(cfg, "lora_rank", 0):
        return estimate_lora_memory(config, rank=cfg.lora_rank, lora_dropout=cfg.lora_dropout, **common)
    return estimate_memory(config, grad_accum=cfg.grad_accum, optimizer=cfg.optimizer,
                           freeze_encoder_layers=cfg.freeze_encoder_layers, **common)


def recommend_for(cfg: Any, gpu: GpuSpec, *, frames: int, target_tokens: int, config: SignT5Config,
                  decoder: DecoderSpec | None = None) -> Plan:
    """Settings that fit ``gpu`` for the kind of run ``cfg`` is (LoRA or full), at its effective batch per process."""
    batch = cfg.batch_size * cfg.grad_accum
    if getattr(cfg, "lora_rank", 0):
        return recommend_lora(gpu, batch, rank=cfg.lora_rank, max_frames=frames, target_tokens=target_tokens, config=config,
                              decoder=decoder)
    return recommend(gpu, batch, max_frames=frames, target_tokens=target_tokens, config=config, decoder=decoder)


def startup_check(
    cfg: Any, config: SignT5Config, *, frames: int, target_tokens: int, device: torch.device, precision: str
) -> dict[str, int] | None:
    """Log the memory estimate of this run on a CUDA device; warn when it exceeds the GPU.

    ``cfg`` is the run's ``TrainConfig`` (per-process batch; LoRA or full fine-tuning), ``precision`` the
    resolved one; returns the estimate (None off CUDA).
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    estimate = estimate_for(cfg, config, frames=frames, target_tokens=target_tokens, precision=precision)
    name = torch.cuda.get_device_name(device)
    kind = f"LoRA rank {cfg.lora_rank}" if getattr(cfg, "lora_rank", 0) else "full fine-tuning"
    log.info("%s", format_estimate(estimate, title=f"memory plan on {name} ({kind}, per process, batch {cfg.batch_size}, "
                                   f"{frames} frames, {target_tokens} target tokens)", budget=int(total * HEADROOM)))
    if estimate["total"] > total:
        suggestion = recommend_for(cfg, GpuSpec(name, total, torch.cuda.is_bf16_supported()), frames=frames,
                                   target_tokens=target_tokens, config=config)
        log.warning(
            "estimated %.1f GiB per step but the GPU has %.1f GiB: this run will likely run out of memory. "
            "Settings that fit: %s", estimate["total"] / GIB, total / GIB, " ".join(suggestion.flags()),
        )
    return estimate


def longest_target(decoder: Any, texts: list[str], lang: str, *, sample: int = 512) -> int:
    """Target tokens of the longest of (up to ``sample`` evenly spread) ``texts``, as the loss sees them."""
    if not texts:
        return DEFAULT_TARGET_TOKENS
    step = max(1, len(texts) // sample)
    return max(1, int(decoder.scored_tokens(texts[::step], lang).max()))
