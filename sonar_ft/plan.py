"""Will it fit? GPU memory of a fine-tuning run, estimated before it starts, and settings that fit.

``estimate_memory`` adds up what one training step keeps on the GPU:

- ``weights``: the encoder in fp32 (the master copy; bf16 runs use autocast);
- ``gradients``: fp32, trainable parameters only (``--freeze_encoder_layers`` shrinks them);
- ``optimizer_states``: AdamW's two moments (8 bytes per trainable parameter) or 8-bit AdamW's (2);
- ``activations``: what the encoder and the frozen decoder save for the backward pass, from a
  per-tensor account of the encoder blocks (checked against a count of the tensors autograd
  really saves, see ``measure_saved_bytes``), plus autocast's bf16 weight copies;
- ``frozen_decoder``: the SONAR text decoder's weights in ``--decoder_dtype``;
- ``loss``: one chunk of vocabulary logits (``--loss_chunk_size`` positions x 256,206) and its
  gradient.

``recommend`` walks a ladder of settings, from the least intrusive (plain AdamW, no recomputation,
the whole batch at once) to the most (8-bit AdamW, gradient checkpointing, small micro-batches,
frozen lower layers), and returns the first that fits; gradient accumulation keeps the effective
batch. ``sonar-ft plan`` prints it; the recipe logs the same estimate at start-up on a GPU and warns
before an obvious out-of-memory.

The estimate is an upper bound of the peak (all terms counted as alive at once) and assumes
fused attention (what CUDA uses); on CPU, attention saves its probabilities (``attention="math"``).
"""

from __future__ import annotations

import argparse
import functools
import logging
import subprocess
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from sonar_ft.encoder import SignT5Config, SignT5SonarEncoder, count_parameters
from sonar_ft.errors import ConfigError

log = logging.getLogger(__name__)

GIB = 1024**3
SONAR_VOCAB = 256_206
DEFAULT_MAX_FRAMES = 600
DEFAULT_TARGET_TOKENS = 48
HEADROOM = 0.90
"""Share of a GPU's memory a plan may fill: the rest is the CUDA context, allocator fragmentation
and the estimate's own error."""

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class GpuSpec:
    """A GPU as the planner sees it: memory PyTorch reports and whether it computes in bf16."""

    name: str
    memory_bytes: int
    bf16: bool


GPUS: dict[str, GpuSpec] = {
    # Memory as torch.cuda.get_device_properties reports it on Colab (a little under the label).
    "t4": GpuSpec("T4 (16 GB)", int(15.0 * GIB), bf16=False),
    "l4": GpuSpec("L4 (24 GB)", int(22.0 * GIB), bf16=True),
    "a100": GpuSpec("A100 (40 GB)", int(39.4 * GIB), bf16=True),
    "a100-80": GpuSpec("A100 (80 GB)", int(79.1 * GIB), bf16=True),
    "h100": GpuSpec("H100 (80 GB)", int(79.1 * GIB), bf16=True),
}


@dataclass(frozen=True)
class DecoderSpec:
    """Sizes of the frozen text decoder that the estimate needs."""

    params: int
    model_dim: int
    ffn_dim: int
    num_layers: int
    vocab: int


@functools.lru_cache(maxsize=1)
def sonar_decoder_spec() -> DecoderSpec:
    """The official SONAR text decoder's sizes, from sonar-space's ``basic`` architecture.

    The model is built on the meta device (no memory, no download) to count its parameters.
    """
    from fairseq2.models.hub import ModelFamily, ModelHubAccessor
    from fairseq2.runtime.dependency import get_dependency_resolver
    from sonar.models.sonar_text.config import SONAR_TEXT_DECODER_FAMILY, SonarTextDecoderConfig
    from sonar.models.sonar_text.factory import SonarTextDecoderFactory

    family = get_dependency_resolver().resolve(ModelFamily, key=SONAR_TEXT_DECODER_FAMILY)
    hub = ModelHubAccessor(SONAR_TEXT_DECODER_FAMILY, family.kls, SonarTextDecoderConfig)()
    config = hub.get_arch_config("basic")
    with torch.device("meta"):
        model = SonarTextDecoderFactory(config).create_model()
    return DecoderSpec(
        params=sum(p.numel() for p in model.parameters()),
        model_dim=config.model_dim,
        ffn_dim=config.ffn_inner_dim,
        num_layers=config.num_decoder_layers,
        vocab=config.vocab_info.size,
    )


@dataclass(frozen=True)
class _ParamCounts:
    total: int
    trainable: int
    trainable_matmul: int


@functools.lru_cache(maxsize=32)
def _param_counts(config: SignT5Config, freeze_encoder_layers: int) -> _ParamCounts:
    with torch.device("meta"):
        model = SignT5SonarEncoder(config)
    model.freeze_encoder_layers(freeze_encoder_layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    matmul = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    return _ParamCounts(
        total=count_parameters(model, include_tied_copies=False),
        trainable=sum(p.numel() for p in trainable),
        trainable_matmul=sum(p.numel() for p in trainable if id(p) in matmul),
    )


# ------------------------------------------------------------------------------------------------
# Activations
# ------------------------------------------------------------------------------------------------
def encoder_activation_bytes(
    config: SignT5Config,
    *,
    batch_size: int,
    frames: int,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    freeze_encoder_layers: int = 0,
    dropout: float | None = None,
    attention: str = "fused",
    transient: bool = True,
) -> int:
    """Bytes the encoder keeps for backward for one batch of ``batch_size`` clips of ``frames`` frames.

    Counted tensor by tensor (per token of one trainable encoder block, fp32: the two sub-layer
    inputs, their RMS-normed copies and matmul inputs = 6 x d_model; q, k, v, attention output and
    its reshaped copy = 5 x inner; the gated FFN's wi_0 / GELU / wi_1 / product = 4 x d_ff). Under
    bf16 autocast the residual stream and norms stay fp32 and matmul operands are bf16; autocast's
    bf16 weight copies live until the backward pass. Dropout adds 1-byte masks.
    ``attention="math"`` (what CPUs run when the bias learns) also keeps each layer's attention
    probabilities, and CPU dropout masks are float. With checkpointing
    a block keeps only its input. ``transient`` adds what exists only for a moment of the backward
    pass (one recomputed block, the position-bias gradient), which a peak must include but a count
    of saved tensors does not see.
    """
    c = config
    d, h, f, H = c.d_model, c.num_heads * c.d_kv, c.d_ff, c.num_heads
    B, T = batch_size, frames
    p = c.dropout if dropout is None else dropout
    n_train = c.num_encoder_layers - freeze_encoder_layers
    half = precision == "bf16"
    mm = 2 if half else 4  # bytes of a matmul operand
    ff_units = 4 if c.gated else 2  # wi_0, gelu, wi_1, product | wi, relu
    block = (20 * d + 10 * h + 2 * ff_units * f) if half else 4 * (6 * d + 5 * h + ff_units * f)
    if p > 0:  # dropout masks after attention, inside and after the FFN: bool on CUDA, float on CPU
        block += (2 * d + f) * (4 if attention == "math" else 1)
    per_prob = 4 + (8 if p > 0 else 0)  # math attention: fp32 softmax (+ dropout mask and output)
    if attention == "math":
        block += H * T * per_prob
    tokens = B * T

    saved = n_train * tokens * (4 * d if gradient_checkpointing else block)
    if freeze_encoder_layers and not gradient_checkpointing:
        saved -= tokens * 4 * d  # the first trainable block's input needs no gradient
    # Final RMS norm (input, normed), the feature projection unless frozen, and the encoder output
    # that every decoder layer's cross-attention reads.
    saved += tokens * 4 * 2 * d
    if freeze_encoder_layers == 0:
        saved += tokens * (mm * c.feature_dim + 4 * d)
    if half and not gradient_checkpointing:
        saved += tokens * 2 * d * 2 * c.num_decoder_layers  # autocast casts the memory for each k / v matmul
    else:
        saved += tokens * 4 * d
    if not gradient_checkpointing:
        # One-query decoder: cross-attention keys and values over all frames, per layer.
        saved += c.num_decoder_layers * tokens * 2 * h * mm
        if attention == "math":
            saved += c.num_decoder_layers * tokens * H * per_prob
    # The (B, H, T, T) position + mask bias: the clamp input (when the bias table learns) and the
    # clamped copy that fused attention or the checkpointed blocks keep (math attention only adds it).
    bias_learns = freeze_encoder_layers == 0
    square = B * H * T * T * mm
    saved += square * (int(bias_learns) + int(attention != "math" or gradient_checkpointing))
    saved += T * T * 8  # bucket indices of the position bias
    weight_copies = 2 * _param_counts(config, freeze_encoder_layers).trainable_matmul if half else 0
    if not gradient_checkpointing:
        saved += weight_copies
    if not transient:
        return int(saved)
    moment = 2 * square if bias_learns else 0  # the bias gradient, accumulated over layers
    if gradient_checkpointing:
        moment += tokens * block + weight_copies  # one block recomputed; autocast copies during forward
    return int(saved + moment)


def decoder_activation_bytes(
    spec: DecoderSpec, *, batch_size: int, target_tokens: int, decoder_dtype: str, gradient_checkpointing: bool
) -> int:
    """Bytes the frozen text decoder saves so that the loss's gradient reaches the embedding.

    Its weights are frozen, so matmuls keep no inputs for weight gradients; per token and layer
    about 9 x model_dim + ffn_dim values remain (layer norms, attention, ReLU), measured on small
    SONAR-architecture decoders. Checkpointing keeps one layer input per layer.
    """
    e = _BYTES[decoder_dtype]
    tokens = batch_size * target_tokens
    per_layer = tokens * (9 * spec.model_dim + spec.ffn_dim) * e
    if gradient_checkpointing:
        return tokens * spec.model_dim * e * spec.num_layers + per_layer
    return per_layer * spec.num_layers


def loss_bytes(*, batch_size: int, target_tokens: int, vocab: int, decoder_dtype: str, chunk_size: int) -> int:
    """Peak bytes of the chunked projection + cross-entropy: one chunk of logits and its gradients.

    Per logit: the projection output in the decoder dtype, its fp32 copy (omitted for fp32), the
    fp32 log-softmax, and the fp32 and decoder-dtype gradients in the backward pass.
    """
    tokens = batch_size * target_tokens
    rows = tokens if chunk_size <= 0 else min(tokens, chunk_size)
    e = _BYTES[decoder_dtype]
    per_logit = 4 + 4 + 4 + e + (0 if decoder_dtype == "fp32" else e)
    return rows * vocab * per_logit


def estimate_memory(
    config: SignT5Config | None = None,
    *,
    batch_size: int,
    grad_accum: int = 1,
    max_frames: int = DEFAULT_MAX_FRAMES,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    optimizer: str = "adamw",
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    freeze_encoder_layers: int = 0,
    decoder_dtype: str = "fp32",
    loss_chunk_size: int = 1024,
    vocab: int = SONAR_VOCAB,
    decoder: DecoderSpec | None = None,
) -> dict[str, int]:
    """Peak GPU bytes of one training step, by kind, and their ``total``.

    ``batch_size`` is the micro-batch (per process); ``grad_accum`` changes the effective batch,
    not the memory. ``decoder`` defaults to the official SONAR text decoder.
    """
    config = config or SignT5Config()
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16 (got {precision!r})")
    if decoder_dtype not in _BYTES:
        raise ConfigError(f"decoder_dtype must be one of {', '.join(_BYTES)} (got {decoder_dtype!r})")
    if optimizer not in ("adamw", "adamw8bit"):
        raise ConfigError(f"optimizer must be adamw or adamw8bit (got {optimizer!r})")
    if batch_size < 1 or grad_accum < 1 or max_frames < 1 or target_tokens < 1:
        raise ConfigError("batch_size, grad_accum, max_frames and target_tokens must be at least 1")
    if not 0 <= freeze_encoder_layers <= config.num_encoder_layers:
        raise ConfigError(f"freeze_encoder_layers must be 0..{config.num_encoder_layers} (got {freeze_encoder_layers})")
    spec = decoder or sonar_decoder_spec()
    counts = _param_counts(config, freeze_encoder_layers)
    activations = encoder_activation_bytes(
        config, batch_size=batch_size, frames=max_frames, precision=precision,
        gradient_checkpointing=gradient_checkpointing, freeze_encoder_layers=freeze_encoder_layers,
    ) + decoder_activation_bytes(
        spec, batch_size=batch_size, target_tokens=target_tokens, decoder_dtype=decoder_dtype,
        gradient_checkpointing=gradient_checkpointing,
    )
    parts = {
        "weights": counts.total * 4,
        "gradients": counts.trainable * 4,
        "optimizer_states": counts.trainable * (8 if optimizer == "adamw" else 2),
        "activations": activations,
        "frozen_decoder": spec.params * _BYTES[decoder_dtype],
        "loss": loss_bytes(batch_size=batch_size, target_tokens=target_tokens, vocab=vocab,
                           decoder_dtype=decoder_dtype, chunk_size=loss_chunk_size),
    }
    parts["total"] = sum(parts.values())
    return parts


def measure_saved_bytes(fn: Callable[[], Any], exclude: nn.Module | None = None) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn()`` runs.

    Storages are counted once however often they are saved; ``exclude``'s parameters (and bf16
    copies autocast caches of them are *not* excluded) are left out. Works on CPU, where CUDA's
    allocator statistics do not exist; used to check :func:`encoder_activation_bytes`.
    """
    params = {p.untyped_storage().data_ptr() for p in exclude.parameters()} if exclude is not None else set()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------------
# Recommendations
# ------------------------------------------------------------------------------------------------
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


def format_estimate(estimate: dict[str, int], *, title: str, budget: int | None = None) -> str:
    """The breakdown as a small table in GiB."""
    rows = [title]
    for key in ("weights", "gradients", "optimizer_states", "activations", "frozen_decoder", "loss"):
        rows.append(f"  {key.replace('_', ' '):<18}{estimate[key] / GIB:8.2f} GiB")
    rows.append(f"  {'total':<18}{estimate['total'] / GIB:8.2f} GiB")
    if budget is not None:
        verdict = "fits" if estimate["total"] <= budget else "does NOT fit"
        rows.append(f"  {'usable':<18}{budget / GIB:8.2f} GiB ({HEADROOM:.0%} of the GPU): {verdict}")
    return "\n".join(rows)


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


# ------------------------------------------------------------------------------------------------
# Disk: what a run keeps where
# ------------------------------------------------------------------------------------------------
GB = 1000**3
DRIVE_FREE_BYTES = 15 * GIB
"""A free Google Drive: "15 GB", which Drive's quota API reports as 15 GiB."""


@dataclass(frozen=True)
class DiskPlan:
    """Where ``best_encoder.pt`` and ``last.pt`` live, their sizes and the peak each disk must hold."""

    strategy: str
    """``drive`` (both in the run folder on Drive, atomic saves) or ``mirror-replace`` (last.pt on local
    disk, ``--state_dir``, copied to Drive after each epoch; the old Drive copy is deleted first)."""
    best_bytes: int
    state_bytes: int
    drive_peak: int
    local_peak: int
    drive_budget: int

    @property
    def fits(self) -> bool:
        return self.drive_peak <= self.drive_budget

    def format_table(self) -> str:
        """What is kept where, the peaks, and what a disconnect can cost."""
        b, st = self.best_bytes / GB, self.state_bytes / GB
        where = {
            "drive": f"run folder on Drive: best_encoder.pt {b:.1f} GB + last.pt {st:.1f} GB (each save writes a "
                     "temporary copy next to the old file)",
            "mirror-replace": f"Drive: best_encoder.pt {b:.1f} GB + a copy of last.pt {st:.1f} GB; local disk "
                              f"(--state_dir): last.pt {st:.1f} GB; the old Drive copy is deleted before the new one "
                              "is written (two copies do not fit)",
        }[self.strategy]
        cost = ("a disconnect loses the work since the last save of last.pt (an epoch, or --checkpoint_every_steps)"
                if self.strategy != "mirror-replace" else
                "a disconnect loses the work since the last copy to Drive (an epoch); one during the copy itself (a "
                "minute or two) leaves no copy of last.pt: continue by fine-tuning from best_encoder.pt (the "
                "optimiser state and the epochs after the best one are lost)")
        verdict = "fits" if self.fits else "does NOT fit"
        return "\n".join([
            f"disk plan ({self.strategy}): {where}",
            f"  Drive peak {self.drive_peak / GB:.1f} GB of {self.drive_budget / GB:.1f} GB: {verdict}; "
            f"local disk peak {self.local_peak / GB:.1f} GB",
            f"  {cost}",
            "  (files deleted through Colab's Drive mount go to Drive's trash, which counts until emptied)",
        ])


def checkpoint_sizes(config: SignT5Config | None = None, *, optimizer: str = "adamw",
                     freeze_encoder_layers: int = 0, lora_rank: int = 0) -> tuple[int, int]:
    """Bytes of ``best_encoder.pt`` (fp32 weights) and ``last.pt`` (trained weights + optimiser moments), from parameter counts.

    With LoRA ``last.pt`` holds only the adapters and the fully trained small modules (and their AdamW moments);
    ``best_encoder.pt`` is always the whole (merged) encoder.
    """
    config = config or SignT5Config()
    counts = _param_counts(config, freeze_encoder_layers)
    best = counts.total * 4
    if lora_rank:
        return best, lora_counts(config, lora_rank).trainable * (4 + 8)
    moments = counts.trainable * (8 if optimizer == "adamw" else 2)
    return best, best + moments


def disk_plan(config: SignT5Config | None = None, *, optimizer: str = "adamw", freeze_encoder_layers: int = 0,
              lora_rank: int = 0, drive_budget: int = DRIVE_FREE_BYTES) -> DiskPlan:
    """The simplest placement of a run's checkpoints whose peak on Drive fits ``drive_budget``.

    An atomic save needs the old file and the new one at once; ``best_encoder.pt`` and ``last.pt``
    are saved one after the other, so a peak is the larger of the two moments. If nothing fits, the
    last (smallest) placement is returned with ``fits`` False.
    """
    b, s = checkpoint_sizes(config, optimizer=optimizer, freeze_encoder_layers=freeze_encoder_layers, lora_rank=lora_rank)
    candidates = [
        DiskPlan("drive", b, s, max(2 * b + s, b + 2 * s), 0, drive_budget),
        DiskPlan("mirror-replace", b, s, max(2 * b + s, b + s), 2 * s, drive_budget),
    ]
    return next((p for p in candidates if p.fits), candidates[-1])


# LoRA (--lora_rank > 0): frozen base weights, small trainable adapters
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraCounts:
    """Parameter counts of a LoRA run: the frozen base, the adapters, the fully trained small modules."""

    base: int
    adapters: int
    full_modules: int
    adapted_linears: int

    @property
    def trainable(self) -> int:
        return self.adapters + self.full_modules


@functools.lru_cache(maxsize=32)
def lora_counts(config: SignT5Config, rank: int, targets: str | None = None, trainable: str | None = None) -> LoraCounts:
    """Counts for ``--lora_rank rank`` with ``--lora_targets`` / ``--lora_trainable`` (default: the recipe's).

    Each adapted ``Linear(in, out)`` adds ``rank x (in + out)`` parameters (A and B).
    """
    from sonar_ft import lora

    target_names = set(lora.parse_names(targets if targets is not None else lora.DEFAULT_TARGETS))
    full_names = set(lora.parse_names(trainable if trainable is not None else lora.DEFAULT_TRAINABLE))
    with torch.device("meta"):
        model = SignT5SonarEncoder(config)
    adapters, linears, full = 0, 0, set()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in target_names:
            adapters += rank * (module.in_features + module.out_features)
            linears += 1
        if leaf in full_names:
            full.update(id(p) for p in module.parameters())
    full_params = sum(p.numel() for p in dict.fromkeys(model.parameters()) if id(p) in full)
    return LoraCounts(count_parameters(model, include_tied_copies=False), adapters, full_params, linears)


def lora_activation_extra_bytes(
    config: SignT5Config, *, rank: int, batch_size: int, frames: int, dropout: float = 0.0, gradient_checkpointing: bool = False,
) -> int:
    """What LoRA adds to a step's saved activations in the encoder blocks.

    Per adapted Linear and token: the dropped-out input that A's gradient needs (peft drops out
    each adapter's input separately; fp32 plus a mask byte; none without dropout, when A reads the
    input the block keeps anyway) and the rank-``r`` product that B's gradient needs. With
    checkpointing only the recomputed block holds them. The one-query decoder stack adds little.
    """
    c = config
    d, h, f = c.d_model, c.num_heads * c.d_kv, c.d_ff
    ff_in = (2 * d + f) if c.gated else (d + f)  # wi_0 and wi_1 read d each, wo reads f
    per_token_block = (3 * d + h + ff_in) * 5 * (dropout > 0) + (6 if c.gated else 5) * rank * 4
    blocks = 1 if gradient_checkpointing else c.num_encoder_layers
    return int(blocks * batch_size * frames * per_token_block)


def estimate_lora_memory(
    config: SignT5Config | None = None,
    *,
    rank: int,
    batch_size: int,
    max_frames: int = DEFAULT_MAX_FRAMES,
    target_tokens: int = DEFAULT_TARGET_TOKENS,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    decoder_dtype: str = "fp32",
    loss_chunk_size: int = 1024,
    lora_dropout: float = 0.0,
    vocab: int = SONAR_VOCAB,
    decoder: DecoderSpec | None = None,
) -> dict[str, int]:
    """Peak GPU bytes of one LoRA training step (same keys as :func:`estimate_memory`).

    The base weights stay fp32 and frozen: no gradients, no optimiser states and no cached
    autocast copies for them (autocast caches only weights that require grad); AdamW's moments
    and the gradients cover the adapters and the fully trained small modules. The backward pass
    still runs through every block (every block has adapters), so the encoder's activations are
    counted as those of full fine-tuning minus the weight copies, plus the adapters' own: an upper
    bound, since frozen matmuls keep no inputs for weight gradients (measured on CPU, fp32, a
    4+4-layer encoder: LoRA without adapter dropout saves 22% fewer activation bytes than full
    fine-tuning; with adapter dropout 0.1, 29% more).
    """
    config = config or SignT5Config()
    if rank < 1:
        raise ConfigError(f"--lora_rank must be at least 1 for a LoRA estimate (got {rank}); 0 is full fine-tuning")
    full = estimate_memory(config, batch_size=batch_size, max_frames=max_frames, target_tokens=target_tokens,
                           precision=precision, gradient_checkpointing=gradient_checkpointing, decoder_dtype=decoder_dtype,
                           loss_chunk_size=loss_chunk_size, vocab=vocab, decoder=decoder)
    counts = lora_counts(config, rank)
    weight_copies = 2 * _param_counts(config, 0).trainable_matmul if precision == "bf16" else 0
    activations = full["activations"] - weight_copies + lora_activation_extra_bytes(
        config, rank=rank, batch_size=batch_size, frames=max_frames, dropout=lora_dropout,
        gradient_checkpointing=gradient_checkpointing)
    parts = {
        "weights": (counts.base + counts.adapters) * 4,
        "gradients": counts.trainable * 4,
        "optimizer_states": counts.trainable * 8,
        "activations": activations,
        "frozen_decoder": full["frozen_decoder"],
        "loss": full["loss"],
    }
    parts["total"] = sum(parts.values())
    return parts


def disk_estimate(config: SignT5Config | None = None, *, rank: int = 0) -> dict[str, int]:
    """Bytes of a run's files: ``last.pt`` (per save), ``best_encoder.pt`` and, with LoRA, ``adapter/``."""
    config = config or SignT5Config()
    best, last = checkpoint_sizes(config, lora_rank=rank)
    # The adapter folder also holds the fully trained small modules (peft's modules_to_save).
    return {"last_pt": last, "best_encoder": best, "adapter": lora_counts(config, rank).trainable * 4 if rank else 0}


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


# ------------------------------------------------------------------------------------------------
# The recipe's start-up check
# ------------------------------------------------------------------------------------------------
def startup_check(
    cfg: Any, config: SignT5Config, *, frames: int, target_tokens: int, device: torch.device, precision: str
) -> dict[str, int] | None:
    """Log the memory estimate of this run on a CUDA device; warn when it exceeds the GPU.

    ``cfg`` is the run's ``TrainConfig`` (per-process batch), ``precision`` the resolved one;
    returns the estimate (None off CUDA).
    """
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    estimate = estimate_memory(
        config, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_frames=frames, target_tokens=target_tokens,
        optimizer=cfg.optimizer, precision=precision, gradient_checkpointing=cfg.gradient_checkpointing,
        freeze_encoder_layers=cfg.freeze_encoder_layers, decoder_dtype=cfg.decoder_dtype,
        loss_chunk_size=cfg.loss_chunk_size,
    )
    name = torch.cuda.get_device_name(device)
    log.info("%s", format_estimate(estimate, title=f"memory plan on {name} (per process, batch {cfg.batch_size}, "
                                   f"{frames} frames, {target_tokens} target tokens)", budget=int(total * HEADROOM)))
    if estimate["total"] > total:
        suggestion = recommend(GpuSpec(name, total, torch.cuda.is_bf16_supported()), cfg.batch_size * cfg.grad_accum,
                               max_frames=frames, target_tokens=target_tokens, config=config)
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
    _, lens = decoder.tokenize(texts[::step], lang)
    return max(1, int(lens.max()) - 2)  # </s> and the language token are read, not scored


# ------------------------------------------------------------------------------------------------
# sonar-ft plan
# ------------------------------------------------------------------------------------------------
def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sonar-ft plan``."""
    p = subparsers.add_parser(
        "plan",
        help="estimate GPU memory of fine-tuning the official-size encoder and recommend settings that fit",
        description="Estimate memory (weights, gradients, optimiser states, activations, frozen decoder, loss) of "
        "fine-tuning the official SONAR ASL encoder and recommend recipe flags that fit the GPU.",
    )
    p.add_argument("--gpu", required=True, help=f"auto (this machine's GPU) or one of {', '.join(GPUS)}")
    p.add_argument("--batch_size", type=int, default=32, help="effective batch (reached with --grad_accum)")
    p.add_argument("--max_frames", type=int, default=DEFAULT_MAX_FRAMES, help="longest clip in frames (the recipe's --max_frames)")
    p.add_argument("--target_tokens", type=int, default=DEFAULT_TARGET_TOKENS, help="longest target sentence in tokens")
    p.add_argument("--drive_gb", type=float, default=DRIVE_FREE_BYTES / GIB,
                   help="free space (GiB) where the run folder is, e.g. Google Drive (default: a free Drive's 15)")
    p.add_argument("--json", dest="json_path", help="also write the plan (flags, estimate, disk plan) to this JSON file")
    p.add_argument("--lora_rank", type=int, default=0, help="plan LoRA fine-tuning with adapters of this rank (0: full fine-tuning)")
    p.set_defaults(func=_plan_command)


def plan_record(plan: Plan, disk: DiskPlan) -> dict[str, Any]:
    """The plan as JSON-ready data (what the notebooks read): flags, settings, estimate and disk plan."""
    return {
        "gpu": plan.gpu.name, "gpu_memory_gib": round(plan.gpu.memory_bytes / GIB, 1), "bf16": plan.gpu.bf16,
        "fits": plan.fits, "flags": plan.flags(), "settings": plan.settings, "effective_batch": plan.effective_batch,
        "estimate_gib": {k: round(v / GIB, 2) for k, v in plan.estimate.items()}, "budget_gib": round(plan.budget / GIB, 2),
        "table": plan.format_table(),
        "disk": {"strategy": disk.strategy, "fits": disk.fits, "best_encoder_gb": round(disk.best_bytes / GB, 2),
                 "last_gb": round(disk.state_bytes / GB, 2), "drive_peak_gb": round(disk.drive_peak / GB, 2),
                 "local_peak_gb": round(disk.local_peak / GB, 2), "table": disk.format_table()},
    }


def _plan_command(args: argparse.Namespace) -> int:
    if args.lora_rank < 0:
        raise ConfigError(f"--lora_rank must be >= 0 (got {args.lora_rank})")
    gpu = gpu_spec(args.gpu)
    if args.lora_rank:
        plan = recommend_lora(gpu, args.batch_size, rank=args.lora_rank, max_frames=args.max_frames, target_tokens=args.target_tokens)
    else:
        plan = recommend(gpu, args.batch_size, max_frames=args.max_frames, target_tokens=args.target_tokens)
    s = plan.settings
    disk = disk_plan(optimizer=s["optimizer"], freeze_encoder_layers=s["freeze_encoder_layers"], lora_rank=args.lora_rank,
                     drive_budget=int(args.drive_gb * GIB))
    print(plan.format_table())
    print(disk.format_table())
    if args.lora_rank:
        adapter = disk_estimate(rank=args.lora_rank)["adapter"]
        print(f"  LoRA: adapter/ {adapter / 2**20:.1f} MiB (peft's format) next to best_encoder.pt (the merged encoder)")
    if args.json_path:
        from sonar_ft import io

        io.write_json(args.json_path, plan_record(plan, disk))
    if not plan.fits:
        print("no setting fits this GPU by the estimate; lower --max_frames or use a larger GPU")
        return 1
    return 0
