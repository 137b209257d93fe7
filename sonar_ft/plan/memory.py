"""GPU memory of one fine-tuning step, estimated per category before it starts (full fine-tuning and LoRA).

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

:func:`estimate_lora_memory` does the same for a LoRA run. Which settings to choose:
:mod:`sonar_ft.plan.recommend`; disk: :mod:`sonar_ft.plan.disk`.

The estimate is an upper bound of the peak (all terms counted as alive at once) and assumes
fused attention (what CUDA uses); on CPU, attention saves its probabilities (``attention="math"``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from sonar_ft.errors import ConfigError
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder, count_parameters

GIB = 1024**3


SONAR_VOCAB = 256_206


DEFAULT_MAX_FRAMES = 600


DEFAULT_TARGET_TOKENS = 48


HEADROOM = 0.90
"""Share of a GPU's memory a plan may fill: the rest is the CUDA context, allocator fragmentation
and the estimate's own error."""


_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

BNB_BLOCK = 256
BNB_MIN_8BIT = 4096


def adamw8bit_state_bytes(numels: list[int]) -> int:
    """Bytes of bitsandbytes' 8-bit AdamW state for parameters of these sizes (its blockwise layout).

    Tensors of 4,096 elements or more keep each moment as one uint8 per element plus one fp32 absmax
    per block of 256; smaller ones keep both moments in fp32.
    """
    total = 0
    for n in numels:
        if n >= BNB_MIN_8BIT:
            total += 2 * (n + 4 * -(-n // BNB_BLOCK))
        else:
            total += 8 * n
    return total


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
    trainable_numels: tuple[int, ...]
    trainable_head: int
    """Trainable parameters outside the encoder blocks and the feature projection: their gradients
    are made before the blocks' backward starts (the one-query decoder stack is half the encoder)."""


_BLOCK_PREFIXES = ("encoder.block.", "encoder.feature_projection.")


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
        trainable_numels=tuple(p.numel() for p in dict.fromkeys(trainable)),
        trainable_head=sum(p.numel() for n, p in model.named_parameters()
                           if p.requires_grad and not n.startswith(_BLOCK_PREFIXES)),
    )


# ------------------------------------------------------------------------------------------------
def encoder_activation_parts(
    config: SignT5Config,
    *,
    batch_size: int,
    frames: int,
    precision: str = "fp32",
    gradient_checkpointing: bool = False,
    freeze_encoder_layers: int = 0,
    dropout: float | None = None,
    attention: str = "fused",
    bias_learns: bool | None = None,
) -> dict[str, int]:
    """The encoder's activation bytes for one batch, by when the backward pass frees them.

    Counted tensor by tensor (per token of one trainable encoder block, fp32: the two sub-layer
    inputs, their RMS-normed copies and matmul inputs = 6 x d_model; q, k, v, attention output and
    its reshaped copy = 5 x inner; the gated FFN's wi_0 / GELU / wi_1 / product = 4 x d_ff). Under
    bf16 autocast the residual stream and norms stay fp32 and matmul operands are bf16; autocast's
    bf16 weight copies live until the backward pass. Dropout adds 1-byte masks.
    ``attention="math"`` (what CPUs run when the bias learns) also keeps each layer's attention
    probabilities, and CPU dropout masks are float. With checkpointing a block keeps only its input.

    Keys: ``block`` (what one trainable block keeps), ``blocks`` (all of them), ``head`` (final
    norm, the one-query decoder stack: freed before the blocks' backward), ``base`` (the feature
    projection, the position bias: kept to the end), ``weight_copies`` (autocast's bf16 copies),
    and what exists only during the backward pass: ``recomputed`` (one block re-run under
    checkpointing, with its weight copies) and ``bias_grad`` (the bias gradient, summed over layers).
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
    if p > 0:  # dropout masks after attention, inside and after the FFN: bool on CUDA, the dropped dtype on CPU
        block += (2 * d + f) * (mm if attention == "math" else 1)
    per_prob = 4 + (8 if p > 0 else 0)  # math attention: fp32 softmax (+ dropout mask and output)
    if attention == "math":
        block += H * T * per_prob
        if half:  # the CPU math kernel computes bf16 attention in fp32: copies of q, k and v
            block += 3 * h * 4
    tokens = B * T

    kept_block = tokens * (4 * d if gradient_checkpointing else block)
    blocks = n_train * kept_block
    if freeze_encoder_layers and not gradient_checkpointing:
        blocks -= tokens * 4 * d  # the first trainable block's input needs no gradient
    # Final RMS norm (input, normed) and the encoder output that every decoder layer's cross-attention reads.
    head = tokens * 4 * 2 * d
    if half and not gradient_checkpointing:
        head += tokens * 2 * d * 2 * c.num_decoder_layers  # autocast casts the memory for each k / v matmul
    else:
        head += tokens * 4 * d
    if not gradient_checkpointing:
        # One-query decoder: cross-attention keys and values over all frames, per layer.
        head += c.num_decoder_layers * tokens * 2 * h * mm
        if attention == "math":
            head += c.num_decoder_layers * tokens * H * per_prob
            if half:
                head += c.num_decoder_layers * tokens * 2 * h * 4  # fp32 copies of keys and values
    base = tokens * (mm * c.feature_dim + 4 * d) if freeze_encoder_layers == 0 else 0
    # The (B, H, T, T) position + mask bias: the clamp input (when the bias table learns) and the
    # clamped copy that fused attention or the checkpointed blocks keep (math attention only adds it).
    if bias_learns is None:  # the position-bias table lives in the first block
        bias_learns = freeze_encoder_layers == 0
    square = B * H * T * T * mm
    base += square * (int(bias_learns) + int(attention != "math" or gradient_checkpointing))
    base += T * T * 8  # bucket indices of the position bias
    weight_copies = 2 * _param_counts(config, freeze_encoder_layers).trainable_matmul if half else 0
    return {
        "block": kept_block, "blocks": blocks, "head": head, "base": base, "weight_copies": weight_copies,
        # Checkpointed blocks cast their weights again when they are re-run, one block at a time.
        "block_copies": weight_copies // (c.num_encoder_layers + c.num_decoder_layers) if gradient_checkpointing else 0,
        "recomputed": tokens * block + weight_copies // (c.num_encoder_layers + c.num_decoder_layers)
        if gradient_checkpointing else 0,
        "bias_grad": square if bias_learns else 0, "n_train": n_train,
    }


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

    The sum of :func:`encoder_activation_parts`: what is saved, and with ``transient`` what exists
    only for a moment of the backward pass (one recomputed block, the position-bias gradient),
    which a peak must include but a count of saved tensors does not see.
    """
    parts = encoder_activation_parts(
        config, batch_size=batch_size, frames=frames, precision=precision, gradient_checkpointing=gradient_checkpointing,
        freeze_encoder_layers=freeze_encoder_layers, dropout=dropout, attention=attention)
    saved = parts["blocks"] + parts["head"] + parts["base"] + (0 if gradient_checkpointing else parts["weight_copies"])
    return int(saved + (parts["recomputed"] + parts["bias_grad"] if transient else 0))


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

    Per logit, at the peak (the chunk's backward, measured by ``benchmarks/plan_check.py``): three
    fp32 values alive at once (the logits in fp32, their log-softmax, its gradient); the projection's
    output and gradient in the decoder dtype exist before and after them, not with all three.
    """
    tokens = batch_size * target_tokens
    rows = tokens if chunk_size <= 0 else min(tokens, chunk_size)
    return rows * vocab * 12


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
    attention: str = "fused",
) -> dict[str, int]:
    """Peak GPU bytes of one training step, by kind, and their ``total``.

    ``batch_size`` is the micro-batch (per process); with ``grad_accum`` > 1 the gradients of the
    window's earlier micro-batches are there during the whole of the later ones. ``decoder`` defaults to the official SONAR text decoder.
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
    enc = encoder_activation_parts(config, batch_size=batch_size, frames=max_frames, precision=precision,
                                   gradient_checkpointing=gradient_checkpointing,
                                   freeze_encoder_layers=freeze_encoder_layers, attention=attention)
    fixed = {
        "weights": counts.total * 4,
        "optimizer_states": counts.trainable * 8 if optimizer == "adamw" else adamw8bit_state_bytes(list(counts.trainable_numels)),
        "frozen_decoder": spec.params * _BYTES[decoder_dtype],
    }
    dec = decoder_activation_bytes(spec, batch_size=batch_size, target_tokens=target_tokens, decoder_dtype=decoder_dtype,
                                   gradient_checkpointing=gradient_checkpointing)
    loss = loss_bytes(batch_size=batch_size, target_tokens=target_tokens, vocab=vocab, decoder_dtype=decoder_dtype,
                      chunk_size=loss_chunk_size)
    return _peak(fixed, enc, gradients=counts.trainable * 4, grad_accum=grad_accum, decoder_saved=dec, loss=loss,
                 checkpointing=gradient_checkpointing, weight_copies=True, head_gradients=counts.trainable_head * 4)


PHASES = ("loss", "encoder_top", "encoder_bottom")
"""The moments of a step whose sums the estimate compares: the loss's backward (every activation
saved, one chunk of logits), the start of the encoder blocks' backward (the head's activations gone,
backward temporaries there) and its end (every gradient made, only the base activations left)."""


def phase_sums(
    fixed: dict[str, int], enc: dict[str, int], *, gradients: int, grad_accum: int, decoder_saved: int, loss: int,
    checkpointing: bool, weight_copies: bool, extra_saved: int = 0, extra_transient: int = 0, head_gradients: int | None = None,
) -> dict[str, dict[str, int]]:
    """Bytes per category at each of :data:`PHASES` (``fixed``: weights, optimiser states, frozen decoder).

    Gradients of earlier micro-batches of the window are all there from the second micro-batch on;
    ``head_gradients`` (default: all) are there when the blocks' backward starts.
    """
    copies = enc["weight_copies"] if weight_copies else 0
    saved = enc["blocks"] + enc["head"] + enc["base"] + (0 if checkpointing else copies) + extra_saved
    uncopied = 0 if weight_copies else enc["block_copies"]  # LoRA: autocast does not cache frozen weights
    transient = enc["recomputed"] - uncopied + enc["bias_grad"] + extra_transient
    earlier = gradients if grad_accum > 1 else 0
    bottom = enc["base"] + enc["block"] + (0 if checkpointing else (copies + extra_saved) // max(1, enc["n_train"]))
    moments = {
        "loss": {"gradients": earlier, "activations": saved + decoder_saved, "temporaries": 0, "loss": loss},
        "encoder_top": {"gradients": max(earlier, gradients if head_gradients is None else head_gradients),
                        "activations": saved - enc["head"], "temporaries": transient, "loss": 0},
        "encoder_bottom": {"gradients": gradients, "activations": bottom, "temporaries": transient, "loss": 0},
    }
    return {name: {**fixed, **m} for name, m in moments.items()}


def _peak(fixed: dict[str, int], enc: dict[str, int], **kwargs: Any) -> dict[str, int]:
    phases = phase_sums(fixed, enc, **kwargs)
    parts = max(phases.values(), key=lambda m: sum(m.values()))
    parts = dict(parts)
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


def format_estimate(estimate: dict[str, int], *, title: str, budget: int | None = None) -> str:
    """The breakdown as a small table in GiB."""
    rows = [title]
    for key in ("weights", "gradients", "optimizer_states", "activations", "temporaries", "frozen_decoder", "loss"):
        if key in estimate:
            rows.append(f"  {key.replace('_', ' '):<18}{estimate[key] / GIB:8.2f} GiB")
    rows.append(f"  {'total':<18}{estimate['total'] / GIB:8.2f} GiB")
    if budget is not None:
        verdict = "fits" if estimate["total"] <= budget else "does NOT fit"
        rows.append(f"  {'usable':<18}{budget / GIB:8.2f} GiB ({HEADROOM:.0%} of the GPU): {verdict}")
    return "\n".join(rows)


# LoRA (--lora_rank > 0): frozen base weights, small trainable adapters
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraCounts:
    """Parameter counts of a LoRA run: the frozen base, the adapters, the fully trained small modules."""

    base: int
    adapters: int
    full_modules: int
    adapted_linears: int
    head: int = 0
    """Trainable parameters outside the encoder blocks and the feature projection (see ``_ParamCounts``)."""

    @property
    def trainable(self) -> int:
        return self.adapters + self.full_modules


@functools.lru_cache(maxsize=32)
def lora_counts(config: SignT5Config, rank: int, targets: str | None = None, trainable: str | None = None) -> LoraCounts:
    """Counts for ``--lora_rank rank`` with ``--lora_targets`` / ``--lora_trainable`` (default: the recipe's).

    Each adapted ``Linear(in, out)`` adds ``rank x (in + out)`` parameters (A and B).
    """
    from sonar_ft.models import lora

    target_names = set(lora.parse_names(targets if targets is not None else lora.DEFAULT_TARGETS))
    full_names = set(lora.parse_names(trainable if trainable is not None else lora.DEFAULT_TRAINABLE))
    with torch.device("meta"):
        model = SignT5SonarEncoder(config)
    adapters, linears, full, head = 0, 0, set(), 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and leaf in target_names:
            adapters += rank * (module.in_features + module.out_features)
            linears += 1
            head += 0 if (name + ".").startswith(_BLOCK_PREFIXES) else rank * (module.in_features + module.out_features)
        if leaf in full_names:
            full.update(id(p) for p in module.parameters())
    full_params = sum(p.numel() for p in dict.fromkeys(model.parameters()) if id(p) in full)
    head += sum(p.numel() for n, p in model.named_parameters() if id(p) in full and not n.startswith(_BLOCK_PREFIXES))
    return LoraCounts(count_parameters(model, include_tied_copies=False), adapters, full_params, linears, head)


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
    attention: str = "fused",
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
                           loss_chunk_size=loss_chunk_size, vocab=vocab, decoder=decoder, attention=attention)
    counts = lora_counts(config, rank)
    # LoRA freezes the position-bias table (it is no adapted Linear): no gradient for the bias.
    enc = encoder_activation_parts(config, batch_size=batch_size, frames=max_frames, precision=precision,
                                   gradient_checkpointing=gradient_checkpointing, attention=attention, bias_learns=False)
    extra = lora_activation_extra_bytes(config, rank=rank, batch_size=batch_size, frames=max_frames, dropout=lora_dropout,
                                        gradient_checkpointing=gradient_checkpointing)
    fixed = {"weights": (counts.base + counts.adapters) * 4, "optimizer_states": counts.trainable * 8,
             "frozen_decoder": full["frozen_decoder"]}
    dec = decoder_activation_bytes(decoder or sonar_decoder_spec(), batch_size=batch_size, target_tokens=target_tokens,
                                   decoder_dtype=decoder_dtype, gradient_checkpointing=gradient_checkpointing)
    return _peak(fixed, enc, gradients=counts.trainable * 4, grad_accum=1, decoder_saved=dec, head_gradients=counts.head * 4,
                 loss=loss_bytes(batch_size=batch_size, target_tokens=target_tokens, vocab=vocab,
                                 decoder_dtype=decoder_dtype, chunk_size=loss_chunk_size),
                 checkpointing=gradient_checkpointing, weight_copies=False,
                 extra_saved=0 if gradient_checkpointing else extra, extra_transient=extra if gradient_checkpointing else 0)
