"""The SONAR ASL encoder: sign-video features (B, T, D) -> sentence embedding (B, 1024).

The architecture is ssvp_slt's ``SignT5SonarEncoder``, re-written here to be read top to bottom:

    features (B, T, D)
      -> feature projection: Linear(D, d_model) * feature_proj_scale          (B, T, d_model)
      -> T5-v1.1 encoder: pre-norm blocks of [self-attention, gated-GELU FFN]   (B, T, d_model)
      -> T5 decoder, queried with ONE start token (id 0): [causal self-attention,
         cross-attention to the encoder output, gated-GELU FFN]                 (B, 1, d_model)
      -> projection_out: Linear(d_model, output_dim, bias=False)              (B, output_dim)

T5 conventions kept on purpose (the pretrained weights depend on them):
- RMS norm ("T5LayerNorm"): no mean subtraction, no bias, variance computed in float32.
- Attention logits are NOT scaled by 1/sqrt(d_kv); T5 folds that scale into the q weights' init.
- Positions enter only through a learned relative-position bias (bucketed by distance), held by
  block 0 of each stack and shared by all its blocks.
- Nothing scales the token embedding.

Parameter names follow the official checkpoint (Hugging Face T5 naming), so its state dict loads
with ``strict=True`` and no renaming.

Precision: T5-v1.1 overflows in float16. Run in float32, or in bfloat16 (``torch.autocast`` with
``dtype=torch.bfloat16``, or the model cast to bfloat16); RMS norms always compute the variance in
float32 and the attention masks are built in the dtype attention runs in.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from sonar_ft.errors import CheckpointError, ConfigError, DataError
from sonar_ft.files.atomic import load_torch, save_torch

logger = logging.getLogger(__name__)

START_TOKEN_ID = 0
"""The decoder is queried with this one token (T5's decoder start token, the pad id)."""

WEIGHT_CONTAINER_KEYS: tuple[str, ...] = ("student", "model", "model_state", "state_dict")
"""Where checkpoints keep the weights, in the order they are looked for (else: a bare state dict)."""

_TIED_EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

# Older SignT5 files kept the feature projection directly on the encoder stack.
_LEGACY_RENAMES = {
    "encoder.feature_proj.weight": "encoder.feature_projection.feature_proj.weight",
    "encoder.feature_proj.bias": "encoder.feature_projection.feature_proj.bias",
    "encoder.feature_proj_scale": "encoder.feature_projection.feature_proj_scale",
}

# Wrappers that prefix every key: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignT5Config:
    """Architecture of a SignT5 SONAR encoder. Defaults are the official (T5-v1.1-large) values."""

    feature_dim: int = 768
    """Size D of one input feature vector (SignHiera video features are 768-dimensional)."""

    d_model: int = 1024
    """Width of the residual stream in both stacks."""

    d_kv: int = 64
    """Size of one attention head; the attention inner width is ``num_heads * d_kv``."""

    d_ff: int = 2816
    """Hidden width of the feed-forward sub-layers."""

    num_heads: int = 16
    """Attention heads per attention sub-layer."""

    num_encoder_layers: int = 24
    """Blocks in the encoder stack."""

    num_decoder_layers: int = 24
    """Blocks in the (one-step) decoder stack."""

    num_buckets: int = 32
    """Relative-position buckets (half per direction in the bidirectional encoder)."""

    max_distance: int = 128
    """Distances at or beyond this share the last bucket. Cannot be read from weights."""

    vocab_size: int = 32128
    """Rows of the shared token embedding (only the start token's row is ever used)."""

    output_dim: int = 1024
    """Size of the sentence embedding (the SONAR space is 1024-dimensional)."""

    gated: bool = True
    """Gated-GELU feed-forward (T5 v1.1) if True, else the original T5 ReLU feed-forward."""

    dropout: float = 0.1
    """Dropout after the embeddings, on attention weights, inside and after every sub-layer."""

    layer_norm_eps: float = 1e-6
    """Epsilon of the RMS norms."""


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square; no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # The mean of squares overflows / loses precision in half types, so it is taken in fp32.
        variance = x.float().pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
        normed = x.float() * torch.rsqrt(variance + self.eps)
        return self.weight * normed.to(self.weight.dtype)


def relative_position_bucket(
    relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """Map ``key_pos - query_pos`` to a bucket id in ``[0, num_buckets)`` (T5's scheme).

    Small distances get one bucket each; larger ones share logarithmically wider buckets up to
    ``max_distance``, beyond which all distances share the last bucket. Bidirectional attention
    spends half the buckets on keys after the query; unidirectional (causal) attention only
    distinguishes keys before it.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    num_exact = num_buckets // 2
    # log-spaced buckets for distances in [num_exact, max_distance); clamp(min=1) only avoids
    # log(0) in entries that torch.where below discards anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / num_exact) / math.log(max_distance / num_exact)
    far = num_exact + (log_ratio * (num_buckets - num_exact)).long()
    far = far.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < num_exact, distance, far)


class Attention(nn.Module):
    """Multi-head attention without 1/sqrt(d_kv) scaling; block 0 also owns the position bias."""

    def __init__(self, config: SignT5Config, *, has_relative_bias: bool, bidirectional: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.dropout = config.dropout
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.bidirectional = bidirectional
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_distance
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(config.num_buckets, config.num_heads)

    def position_bias(self, query_len: int, key_len: int, device: torch.device) -> Tensor:
        """Learned bias for every (query, key) pair: (1, H, query_len, key_len)."""
        query_pos = torch.arange(query_len, device=device)[:, None]  # (Tq, 1)
        key_pos = torch.arange(key_len, device=device)[None, :]  # (1, Tk)
        buckets = relative_position_bucket(
            key_pos - query_pos,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # (Tq, Tk)
        bias = self.relative_attention_bias(buckets)  # (Tq, Tk, H)
        return bias.permute(2, 0, 1).unsqueeze(0)  # (1, H, Tq, Tk)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor) -> Tensor:
        """``x`` (B, Tq, d_model) attends to ``context`` (B, Tk, d_model) -> (B, Tq, d_model).

        ``bias`` (broadcastable to (B, H, Tq, Tk)) is added to the logits: position bias plus a
        large negative value on keys that must not be seen.
        """
        B, Tq, _ = x.shape
        Tk = context.shape[1]
        q = self.q(x).view(B, Tq, self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, Tq, d_kv)
        k = self.k(context).view(B, Tk, self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, Tk, d_kv)
        v = self.v(context).view(B, Tk, self.num_heads, self.d_kv).transpose(1, 2)  # (B, H, Tk, d_kv)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.to(q.dtype),
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0,  # T5: no 1/sqrt(d_kv)
        )  # (B, H, Tq, d_kv)
        y = y.transpose(1, 2).reshape(B, Tq, self.num_heads * self.d_kv)  # (B, Tq, H*d_kv)
        return self.o(y)  # (B, Tq, d_model)


class FeedForward(nn.Module):
    """T5 v1.1 gated GELU ``wo(gelu_tanh(wi_0 x) * wi_1 x)`` or original T5 ``wo(relu(wi x))``."""

    def __init__(self, config: SignT5Config):
        super().__init__()
        self.gated = config.gated
        if config.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)  # (B, T, d_ff)
        else:
            h = F.relu(self.wi(x))  # (B, T, d_ff)
        return self.wo(self.dropout(h))  # (B, T, d_model)


# Pre-norm residual sub-layers. Their attribute names (SelfAttention, EncDecAttention,
# DenseReluDense, layer_norm) are the official checkpoint's key names.


class SelfAttentionSublayer(nn.Module):
    """``x + dropout(SelfAttention(norm(x)))``."""

    def __init__(self, config: SignT5Config, *, has_relative_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = Attention(
            config, has_relative_bias=has_relative_bias, bidirectional=bidirectional
        )
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        h = self.layer_norm(x)
        return x + self.dropout(self.SelfAttention(h, h, bias))


class CrossAttentionSublayer(nn.Module):
    """``x + dropout(EncDecAttention(norm(x), encoder_out))``."""

    def __init__(self, config: SignT5Config):
        super().__init__()
        self.EncDecAttention = Attention(config, has_relative_bias=False, bidirectional=True)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, encoder_out: Tensor, bias: Tensor) -> Tensor:
        return x + self.dropout(self.EncDecAttention(self.layer_norm(x), encoder_out, bias))


class FeedForwardSublayer(nn.Module):
    """``x + dropout(DenseReluDense(norm(x)))``."""

    def __init__(self, config: SignT5Config):
        super().__init__()
        self.DenseReluDense = FeedForward(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.dropout(self.DenseReluDense(self.layer_norm(x)))


class EncoderBlock(nn.Module):
    """Self-attention then feed-forward; ``layer`` is a ModuleList to match the official keys."""

    def __init__(self, config: SignT5Config, *, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList(
            [
                SelfAttentionSublayer(config, has_relative_bias=has_relative_bias, bidirectional=True),
                FeedForwardSublayer(config),
            ]
        )

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        x = self.layer[0](x, bias)
        return self.layer[1](x)


class DecoderBlock(nn.Module):
    """Causal self-attention, cross-attention to the encoder, feed-forward."""

    def __init__(self, config: SignT5Config, *, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList(
            [
                SelfAttentionSublayer(config, has_relative_bias=has_relative_bias, bidirectional=False),
                CrossAttentionSublayer(config),
                FeedForwardSublayer(config),
            ]
        )

    def forward(self, x: Tensor, self_bias: Tensor, encoder_out: Tensor, cross_bias: Tensor) -> Tensor:
        x = self.layer[0](x, self_bias)
        x = self.layer[1](x, encoder_out, cross_bias)
        return self.layer[2](x)


class FeatureProjection(nn.Module):
    """``feature_proj(x) * feature_proj_scale``: video features into the model width."""

    def __init__(self, feature_dim: int, d_model: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, d_model)
        self.feature_proj_scale = nn.Parameter(torch.ones(d_model))

    def forward(self, features: Tensor) -> Tensor:
        return self.feature_proj(features) * self.feature_proj_scale  # (B, T, d_model)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on, else ``x``'s own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _key_mask_bias(key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, Tk) bool, True on real keys -> (B, 1, 1, Tk) additive bias: 0 or the dtype's minimum.

    A finite minimum (not -inf) keeps a fully masked row from producing NaN, and building it in
    the compute dtype avoids the fp32 minimum overflowing to -inf when cast to bfloat16.
    """
    zero = torch.zeros((), dtype=dtype, device=key_mask.device)
    hidden = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=key_mask.device)
    return torch.where(key_mask, zero, hidden)[:, None, None, :]


def _add_bias(position_bias: Tensor, mask_bias: Tensor) -> Tensor:
    """Sum of position and mask biases in the mask's dtype, kept finite."""
    total = position_bias.to(mask_bias.dtype) + mask_bias
    return total.clamp(min=torch.finfo(mask_bias.dtype).min)


# --------------------------------------------------------------------------------------------
# The two stacks and the full model
# --------------------------------------------------------------------------------------------


class EncoderStack(nn.Module):
    """Feature projection + T5 encoder blocks + final norm: (B, T, D) -> (B, T, d_model)."""

    def __init__(self, config: SignT5Config, shared: nn.Embedding):
        super().__init__()
        self.embed_tokens = shared  # unused by the encoder; kept because the official file has it
        self.feature_projection = FeatureProjection(config.feature_dim, config.d_model)
        self.block = nn.ModuleList(
            [EncoderBlock(config, has_relative_bias=(i == 0)) for i in range(config.num_encoder_layers)]
        )
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, features: Tensor, mask: Tensor, *, use_checkpoint: bool = False) -> Tensor:
        T = features.shape[1]
        x = self.dropout(self.feature_projection(features))  # (B, T, d_model)
        position_bias = self.block[0].layer[0].SelfAttention.position_bias(T, T, x.device)  # (1, H, T, T)
        bias = _add_bias(position_bias, _key_mask_bias(mask, _compute_dtype(x)))  # (B, H, T, T)
        for block in self.block:
            if use_checkpoint:
                x = checkpoint(block, x, bias, use_reentrant=False)
            else:
                x = block(x, bias)
        return self.dropout(self.final_layer_norm(x))  # (B, T, d_model)


class DecoderStack(nn.Module):
    """T5 decoder blocks + final norm: tokens (B, L) + encoder output -> (B, L, d_model)."""

    def __init__(self, config: SignT5Config, shared: nn.Embedding):
        super().__init__()
        self.embed_tokens = shared
        self.block = nn.ModuleList(
            [DecoderBlock(config, has_relative_bias=(i == 0)) for i in range(config.num_decoder_layers)]
        )
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, tokens: Tensor, encoder_out: Tensor, encoder_mask: Tensor, *, use_checkpoint: bool = False
    ) -> Tensor:
        L = tokens.shape[1]
        x = self.dropout(self.embed_tokens(tokens))  # (B, L, d_model)
        dtype = _compute_dtype(x)
        position_bias = self.block[0].layer[0].SelfAttention.position_bias(L, L, x.device)  # (1, H, L, L)
        future = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)  # (L, L) True above diagonal
        causal = torch.where(future, torch.finfo(dtype).min, 0.0).to(dtype)  # (L, L)
        self_bias = _add_bias(position_bias, causal)  # (1, H, L, L)
        cross_bias = _key_mask_bias(encoder_mask, dtype)  # (B, 1, 1, T)
        for block in self.block:
            if use_checkpoint:
                x = checkpoint(block, x, self_bias, encoder_out, cross_bias, use_reentrant=False)
            else:
                x = block(x, self_bias, encoder_out, cross_bias)
        return self.dropout(self.final_layer_norm(x))  # (B, L, d_model)


def _refuse_empty_rows(mask: Tensor) -> None:
    """Raise :class:`DataError` naming the rows of ``mask`` (B, T) without a real frame (one device sync)."""
    if torch.compiler.is_compiling() or is_fake(mask):
        # A data-dependent branch would break a compiled graph, and shape-only (fake) tensors hold no data to look
        # at (the memory plan check); training's bad-clip scan refuses zero-frame clips before any of that anyway.
        return
    empty = ~mask.any(dim=1)  # (B,)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        listed = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
        raise DataError(
            f"batch row(s) {listed} of {mask.shape[0]} have no real frame (their mask is all padding): an embedding "
            "pools over a clip's frames, and over none it has no meaning. Leave clips with zero frames out of the batch "
            "(`sonar-ft verify` lists them)"
        )


class SignT5SonarEncoder(nn.Module):
    """SONAR ASL encoder: ``forward(features (B, T, D), mask (B, T) bool) -> (B, output_dim)``.

    Set ``model.gradient_checkpointing = True`` to recompute block activations in the backward
    pass (training only) instead of storing them.
    """

    def __init__(self, config: SignT5Config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        # The same module under three names: the official file stores the tied copies as keys.
        self.encoder = EncoderStack(config, self.shared)
        self.decoder = DecoderStack(config, self.shared)
        self.projection_out = nn.Linear(config.d_model, config.output_dim, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Mesh-TensorFlow T5 initialisation: with it, unscaled attention logits start at O(1).
        # Only used for models built from scratch (tests); real runs load pretrained weights.
        c = self.config
        for module in self.modules():
            if isinstance(module, Attention):
                module.q.weight.normal_(std=(c.d_model * c.d_kv) ** -0.5)
                module.k.weight.normal_(std=c.d_model**-0.5)
                module.v.weight.normal_(std=c.d_model**-0.5)
                module.o.weight.normal_(std=(c.num_heads * c.d_kv) ** -0.5)
                if hasattr(module, "relative_attention_bias"):
                    module.relative_attention_bias.weight.normal_(std=c.d_model**-0.5)
            elif isinstance(module, FeedForward):
                for name in ("wi_0", "wi_1", "wi"):
                    if hasattr(module, name):
                        getattr(module, name).weight.normal_(std=c.d_model**-0.5)
                module.wo.weight.normal_(std=c.d_ff**-0.5)
            elif isinstance(module, FeatureProjection):
                module.feature_proj.weight.normal_(std=c.feature_dim**-0.5)
                module.feature_proj.bias.zero_()
                module.feature_proj_scale.fill_(1.0)
        self.shared.weight.normal_(std=1.0)
        self.projection_out.weight.normal_(std=c.d_model**-0.5)

    def forward(self, features: Tensor, mask: Tensor | None = None) -> Tensor:
        """Embed a padded batch: ``features`` (B, T, D), ``mask`` (B, T) True on real frames.

        Every item needs at least one real frame: a row whose mask is all padding (or ``T == 0``) raises
        :class:`DataError` naming it, since pooling over no frames has no meaning. Returns (B, output_dim).
        """
        if features.dim() != 3 or features.shape[-1] != self.config.feature_dim:
            raise ValueError(
                f"expected features of shape (B, T, {self.config.feature_dim}), got {tuple(features.shape)}"
            )
        B, T, _ = features.shape
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=features.device)
        mask = mask.bool()
        if mask.shape != (B, T):
            raise ValueError(f"expected a mask of shape ({B}, {T}) for features {tuple(features.shape)}, got {tuple(mask.shape)}")
        _refuse_empty_rows(mask)
        features = features.to(self.encoder.feature_projection.feature_proj.weight.dtype)
        use_checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        encoded = self.encoder(features, mask, use_checkpoint=use_checkpoint)  # (B, T, d_model)
        start = torch.full((B, 1), START_TOKEN_ID, dtype=torch.long, device=features.device)  # (B, 1)
        pooled = self.decoder(start, encoded, mask, use_checkpoint=use_checkpoint)  # (B, 1, d_model)
        return self.projection_out(pooled[:, 0])  # (B, output_dim)

    def freeze_encoder_layers(self, n: int) -> None:
        """Freeze the feature projection and the lowest ``n`` encoder blocks (``n=0``: nothing).

        Block 0 holds the relative-position bias table that every encoder block uses, so any
        ``n >= 1`` also freezes the position bias of the blocks above.
        """
        if not 0 <= n <= self.config.num_encoder_layers:
            raise ConfigError(
                f"cannot freeze {n} encoder layers: the encoder has {self.config.num_encoder_layers}; "
                f"use a value from 0 to {self.config.num_encoder_layers}"
            )
        if n == 0:
            return
        frozen = [self.encoder.feature_projection, *self.encoder.block[:n]]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)


def count_parameters(model: nn.Module, include_tied_copies: bool = True) -> int:
    """Number of parameters; with ``include_tied_copies`` a tied tensor counts once per name."""
    params = model.named_parameters(remove_duplicate=not include_tied_copies)
    return sum(p.numel() for _, p in params)


# --------------------------------------------------------------------------------------------
# The official checkpoint layout
# --------------------------------------------------------------------------------------------


def official_key_shapes(config: SignT5Config) -> dict[str, tuple[int, ...]]:
    """Every key of an official-layout state dict for ``config`` and its tensor shape.

    Written out from the layout itself (not from the model), so it can check the model.
    """
    c = config
    d, inner = c.d_model, c.num_heads * c.d_kv
    shapes: dict[str, tuple[int, ...]] = {key: (c.vocab_size, d) for key in _TIED_EMBEDDING_KEYS}
    shapes["encoder.feature_projection.feature_proj.weight"] = (d, c.feature_dim)
    shapes["encoder.feature_projection.feature_proj.bias"] = (d,)
    shapes["encoder.feature_projection.feature_proj_scale"] = (d,)

    def attention(prefix: str, with_bias: bool) -> None:
        for name in ("q", "k", "v"):
            shapes[f"{prefix}.{name}.weight"] = (inner, d)
        shapes[f"{prefix}.o.weight"] = (d, inner)
        if with_bias:
            shapes[f"{prefix}.relative_attention_bias.weight"] = (c.num_buckets, c.num_heads)

    def feed_forward(prefix: str) -> None:
        for name in ("wi_0", "wi_1") if c.gated else ("wi",):
            shapes[f"{prefix}.{name}.weight"] = (c.d_ff, d)
        shapes[f"{prefix}.wo.weight"] = (d, c.d_ff)

    for i in range(c.num_encoder_layers):
        p = f"encoder.block.{i}.layer"
        attention(f"{p}.0.SelfAttention", with_bias=i == 0)
        shapes[f"{p}.0.layer_norm.weight"] = (d,)
        feed_forward(f"{p}.1.DenseReluDense")
        shapes[f"{p}.1.layer_norm.weight"] = (d,)
    shapes["encoder.final_layer_norm.weight"] = (d,)

    for i in range(c.num_decoder_layers):
        p = f"decoder.block.{i}.layer"
        attention(f"{p}.0.SelfAttention", with_bias=i == 0)
        shapes[f"{p}.0.layer_norm.weight"] = (d,)
        attention(f"{p}.1.EncDecAttention", with_bias=False)
        shapes[f"{p}.1.layer_norm.weight"] = (d,)
        feed_forward(f"{p}.2.DenseReluDense")
        shapes[f"{p}.2.layer_norm.weight"] = (d,)
    shapes["decoder.final_layer_norm.weight"] = (d,)

    shapes["projection_out.weight"] = (c.output_dim, d)
    return shapes


def _key_examples(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(sorted(keys)[:n])
    return (shown + (", ..." if len(keys) > n else "")) or "(none)"


def extract_state_dict(obj: Any, source: str | Path) -> dict[str, Tensor]:
    """Find the encoder weights in a loaded checkpoint and return them in the official layout.

    Looks under ``"student"``, ``"model"``, ``"model_state"``, ``"state_dict"`` (in that order),
    else treats ``obj`` as a bare state dict. Non-tensor entries are ignored, a ``module.`` /
    ``_orig_mod.`` prefix is stripped, legacy ``encoder.feature_proj*`` names are renamed and
    missing tied embedding copies are filled in. ``source`` names the file in errors.
    Raises :class:`CheckpointError` if the result is not a SignT5 SONAR encoder.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a dict of encoder weights")
    weights: Mapping[Any, Any] = obj
    for key in WEIGHT_CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            weights = obj[key]
            break
    state = {k: v for k, v in weights.items() if isinstance(k, str) and isinstance(v, Tensor)}

    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    state = {_LEGACY_RENAMES.get(k, k): v for k, v in state.items()}

    if not any(k.startswith("encoder.block.0.") for k in state):
        top = [k for k in obj if isinstance(k, str)]
        raise CheckpointError(
            f"{source} is not a SONAR (SignT5) encoder checkpoint: no encoder.block.0.* keys; "
            f"found keys like {_key_examples(list(state))} (top-level entries: {_key_examples(top)})"
        )
    _tie_embeddings(state, source)
    return state


def _tie_embeddings(state: dict[str, Tensor], source: str | Path) -> None:
    """Make the three tied embedding keys hold one tensor (the decoder's copy, the one used)."""
    present = [k for k in reversed(_TIED_EMBEDDING_KEYS) if k in state]
    if not present:
        return  # reported as missing by infer_config
    chosen = state[present[0]]
    for key in present[1:]:
        other = state[key]
        if other.data_ptr() == chosen.data_ptr():
            continue  # saved from a tied model: one storage
        if other.shape != chosen.shape or not torch.equal(other, chosen):
            logger.warning("%s: %s differs from %s; using the latter (the one used)", source, key, present[0])
    for key in _TIED_EMBEDDING_KEYS:
        state[key] = chosen


def _layer_count(state: Mapping[str, Tensor], stack: str) -> int:
    pattern = re.compile(rf"^{stack}\.block\.(\d+)\.")
    indices = [int(m.group(1)) for k in state if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def infer_config(state_dict: Mapping[str, Tensor], *, source: str | Path = "state dict") -> SignT5Config:
    """Read the architecture off the tensor shapes of an official-layout state dict.

    ``max_distance``, ``dropout`` and ``layer_norm_eps`` cannot be seen in weights and keep
    their defaults. Raises :class:`CheckpointError` naming the first missing key.
    """

    def shape(*keys: str) -> tuple[int, ...]:
        for key in keys:
            if key in state_dict:
                return tuple(state_dict[key].shape)
        raise CheckpointError(
            f"{source} is not a complete SONAR (SignT5) encoder: missing {keys[0]}; "
            f"found keys like {_key_examples(list(state_dict))}"
        )

    attn = "encoder.block.0.layer.0.SelfAttention"
    ffn = "encoder.block.0.layer.1.DenseReluDense"
    vocab_size, d_model = shape(*_TIED_EMBEDDING_KEYS)
    _, feature_dim = shape("encoder.feature_projection.feature_proj.weight")
    num_buckets, num_heads = shape(f"{attn}.relative_attention_bias.weight")
    inner, _ = shape(f"{attn}.q.weight")
    gated = f"{ffn}.wi_0.weight" in state_dict
    d_ff, _ = shape(f"{ffn}.wi_0.weight", f"{ffn}.wi.weight")
    output_dim, _ = shape("projection_out.weight")
    num_decoder_layers = _layer_count(state_dict, "decoder")
    if num_decoder_layers == 0:
        shape("decoder.block.0.layer.0.SelfAttention.q.weight")  # raises: names what is missing
    if inner % num_heads:
        raise CheckpointError(
            f"{source}: attention width {inner} is not a multiple of the {num_heads} heads "
            "implied by relative_attention_bias; the file is damaged or not a SignT5 encoder"
        )
    return SignT5Config(
        feature_dim=feature_dim,
        d_model=d_model,
        d_kv=inner // num_heads,
        d_ff=d_ff,
        num_heads=num_heads,
        num_encoder_layers=_layer_count(state_dict, "encoder"),
        num_decoder_layers=num_decoder_layers,
        num_buckets=num_buckets,
        vocab_size=vocab_size,
        output_dim=output_dim,
        gated=gated,
    )


def _checkpoint_config(obj: Any, state: Mapping[str, Tensor], path: str | Path) -> SignT5Config:
    """The architecture from the tensor shapes, plus what they cannot show from the file's ``"config"`` entry."""
    config = infer_config(state, source=path)
    saved = obj.get("config") if isinstance(obj, Mapping) else None
    if isinstance(saved, Mapping):
        unseen = {"max_distance", "layer_norm_eps", "dropout"}  # not visible in tensor shapes
        config = dataclasses.replace(config, **{k: saved[k] for k in unseen if k in saved})
    return config


def read_config(path: str | Path) -> SignT5Config:
    """The architecture of the encoder checkpoint at ``path`` (memory-mapped: its weights are not read)."""
    obj = load_torch(path, what="encoder checkpoint", mmap=True)
    return _checkpoint_config(obj, extract_state_dict(obj, path), path)


def load_encoder(
    path: str | Path,
    *,
    dropout: float | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[SignT5SonarEncoder, SignT5Config]:
    """Load a SignT5 SONAR encoder of any size from ``path``; returns ``(model, config)`` in eval mode.

    The architecture is read from the weights (plus ``max_distance`` / ``layer_norm_eps`` /
    ``dropout`` from a ``"config"`` entry if the file has one); ``dropout`` overrides it.
    Weights load with ``strict=True``. Raises :class:`CheckpointError` naming the file.
    """
    obj = load_torch(path, what="encoder checkpoint")
    state = extract_state_dict(obj, path)
    config = _checkpoint_config(obj, state, path)
    if dropout is not None:
        config = dataclasses.replace(config, dropout=dropout)
    if dtype == torch.float16:
        logger.warning("T5-v1.1 overflows in float16; use bfloat16 autocast or float32")

    # Built on the meta device and filled by assignment: no random init of ~750M parameters
    # and no second copy of the weights in memory.
    with torch.device("meta"):
        model = SignT5SonarEncoder(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not match the SignT5 encoder inferred from its weights: {_short(exc)}"
        ) from None
    model.to(device=device, dtype=dtype)
    model.eval()
    logger.info(
        "loaded encoder %s: %d+%d layers, d_model %d, %.1fM parameters",
        path,
        config.num_encoder_layers,
        config.num_decoder_layers,
        config.d_model,
        count_parameters(model, include_tied_copies=False) / 1e6,
    )
    return model, config


def _short(exc: Exception, limit: int = 600) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def save_encoder(
    model: SignT5SonarEncoder, path: str | Path, extra: Mapping[str, Any] | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
) -> None:
    """Atomically write ``{"student": state_dict, "config": asdict(config), **extra}``.

    ``state_dict`` replaces ``model.state_dict()`` (LoRA: the merged weights, see sonar_ft.models.lora).

    ``extra`` must hold only tensors and plain Python values, so that the file loads with
    ``weights_only=True``.
    """
    extra = dict(extra or {})
    clash = {"student", "config"} & extra.keys()
    if clash:
        raise ValueError(f"extra entries {sorted(clash)} would overwrite the weights or config")
    save_torch(path, {"student": dict(state_dict) if state_dict is not None else model.state_dict(), "config": dataclasses.asdict(model.config), **extra})
