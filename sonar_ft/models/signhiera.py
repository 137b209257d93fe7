"""SignHiera: the video transformer whose features the SONAR ASL encoder was trained on.

One window of 128 normalised frames goes in, 64 feature vectors come out (one per two frames):

    window (B, 3, T=128, H=224, W=224)
      -> patch embedding: Conv3d, kernel (3, 7, 7), stride (2, 4, 4)           (B, 64, 56, 56, 96)
      -> + separate temporal and spatial position embeddings
      -> stage 1:  2 blocks, attention inside each mask unit (1 x 8 x 8 tokens)  (B, 64, 56, 56, 96)
      -> stage 2:  3 blocks, first one max-pools queries and skip 2x2 in space   (B, 64, 28, 28, 192)
      -> stage 3: 16 blocks, global attention                                    (B, 64, 14, 14, 384)
      -> stage 4:  3 blocks, global attention                                    (B, 64,  7,  7, 768)
      -> mean over the 7 x 7 grid                                                (B, 64, 768)

This is ``hiera_base_128x224`` of the Hiera paper (Ryali et al. 2023) as ssvp_slt trained it for sign
language, written here in the natural (B, T, H, W, C) layout: a mask unit is a block of tokens, query
pooling is a max-pool, and the result equals the official implementation (its "unrolled" token order
is a speed trick that does not change what is computed; ``tests/models/test_signhiera.py`` checks it
against the ``hiera-transformer`` package to 1e-4).

The last window of a video is padded by repeating its final frame. Like the reference, the padded
frames are masked per *mask unit* (two frames each): their pixels are zeroed before the patch
embedding, they are masked as keys in every global-attention block, and their vectors are dropped at
the end. With an odd padding the one leftover repeated frame stays visible, as in the reference.

Parameter names follow the official checkpoint, so its state dict loads without renaming; the
classifier (``head.*``) and final norm (``norm.*``) it may carry are not used for features.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sonar_ft.download import KNOWN_FILES
from sonar_ft.errors import CheckpointError, ConfigError
from sonar_ft.files import atomic

logger = logging.getLogger(__name__)

OFFICIAL_URL = KNOWN_FILES["signhiera"][0]
"""The SignHiera weights the SONAR ASL encoder was trained on (licence: CC-BY-NC 4.0)."""

OFFICIAL_FILE_NAME = OFFICIAL_URL.rsplit("/", 1)[1]

WEIGHT_CONTAINER_KEYS: tuple[str, ...] = ("model", "model_state", "state_dict")
"""Where checkpoints keep the weights, in the order they are looked for (else: a bare state dict)."""

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Weights an official file may carry that feature extraction does not use.
_UNUSED_PREFIXES = ("head.", "norm.")
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignHieraConfig:
    """Architecture of a SignHiera. Defaults are the official ``hiera_base_128x224``.

    The first group is read from a checkpoint's tensors (:meth:`from_state_dict`); the second cannot
    be, and comes from these defaults or the caller's overrides (:data:`OVERRIDABLE`).
    """

    in_chans: int = 3
    """Colour channels of the input."""

    embed_dim: int = 96
    """Width of stage 1 (the patch embedding's output channels)."""

    stage_depths: tuple[int, ...] = (2, 3, 16, 3)
    """Blocks per stage."""

    stage_dims: tuple[int, ...] = (96, 192, 384, 768)
    """Width of each stage; the last one is the feature size."""

    mlp_hidden: tuple[int, ...] = (384, 768, 1536, 3072)
    """Hidden width of each stage's MLP."""

    patch_kernel: tuple[int, int, int] = (3, 7, 7)
    """Kernel (t, h, w) of the patch-embedding convolution."""

    token_grid: tuple[int, int, int] = (64, 56, 56)
    """Tokens (t, h, w) after the patch embedding, i.e. the position embeddings' grid."""

    # --- not determined by the tensors -----------------------------------------------------
    num_heads: int = 1
    """Attention heads of stage 1; each later stage multiplies them by ``head_mul``."""

    head_mul: float = 2.0
    """Factor on the number of heads at each new stage."""

    q_pool: int | None = None
    """How many stage transitions pool (``None``: every one, at most 3, as the official model)."""

    q_stride: tuple[int, int, int] = (1, 2, 2)
    """Max-pool stride (t, h, w) of queries and skip at a pooling stage transition."""

    mask_unit_size: tuple[int, int, int] = (1, 8, 8)
    """Tokens (t, h, w) of a mask unit at stage 1: the window of mask-unit attention and of padding."""

    mask_unit_attn: tuple[bool, ...] | None = None
    """Per stage, attention inside mask units (True) or global (False); ``None``: the first two stages."""

    patch_stride: tuple[int, int, int] = (2, 4, 4)
    """Stride (t, h, w) of the patch-embedding convolution."""

    patch_padding: tuple[int, int, int] = (1, 3, 3)
    """Zero padding (t, h, w) of the patch-embedding convolution."""

    layer_norm_eps: float = 1e-6
    """Epsilon of every LayerNorm."""

    # ------------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stage_depths)

    @property
    def depth(self) -> int:
        return sum(self.stage_depths)

    @property
    def feature_dim(self) -> int:
        """Width of one output vector (768 for the official model)."""
        return self.stage_dims[-1]

    @property
    def input_size(self) -> tuple[int, int, int]:
        """Frames, height and width of one input window: (128, 224, 224) for the official model."""
        return tuple(n * s for n, s in zip(self.token_grid, self.patch_stride))  # type: ignore[return-value]

    @property
    def pooling_stages(self) -> int:
        """Stage transitions that pool (queries and skip), counted from the first."""
        return min(3, self.num_stages - 1) if self.q_pool is None else self.q_pool

    @property
    def attn_in_mask_units(self) -> tuple[bool, ...]:
        if self.mask_unit_attn is not None:
            return self.mask_unit_attn
        return tuple(i < 2 for i in range(self.num_stages))

    @property
    def frames_per_unit(self) -> int:
        """Input frames in one mask unit along time (2): padding is masked in steps of this many frames."""
        return self.mask_unit_size[0] * self.patch_stride[0]

    @property
    def final_temporal_pool(self) -> int:
        return self.q_stride[0] ** self.pooling_stages

    @property
    def vectors_per_window(self) -> int:
        """Feature vectors per window: 64 for the official model."""
        return self.token_grid[0] // self.final_temporal_pool

    def heads(self, stage: int) -> int:
        return int(self.num_heads * self.head_mul**stage)

    def padded_vectors(self, padding: int) -> int:
        """Vectors dropped from a window padded with ``padding`` repeated frames (``padding // 2``)."""
        units = padding // self.frames_per_unit
        return units * self.mask_unit_size[0] // self.final_temporal_pool

    def validate(self) -> None:
        """Raise :class:`ConfigError` when the settings cannot describe one model."""
        n = self.num_stages
        problems = []
        if not (len(self.stage_dims) == len(self.mlp_hidden) == n) or n < 1:
            problems.append(f"stage_depths {self.stage_depths}, stage_dims {self.stage_dims} and mlp_hidden "
                            f"{self.mlp_hidden} must have one entry per stage")
        if len(self.attn_in_mask_units) != n:
            problems.append(f"mask_unit_attn {self.mask_unit_attn} needs one entry per stage ({n})")
        if not 0 <= self.pooling_stages < n:
            problems.append(f"q_pool {self.q_pool} must be between 0 and {n - 1} (the stage transitions)")
        for stage in range(n):
            heads = self.heads(stage)
            if heads < 1 or self.stage_dims[stage] % heads:
                problems.append(f"stage {stage + 1}: width {self.stage_dims[stage]} is not divisible into {heads} "
                                f"heads (num_heads={self.num_heads}, head_mul={self.head_mul})")
        pool = [self.q_stride[i] ** self.pooling_stages for i in range(3)]
        for axis, name in enumerate("thw"):
            if self.token_grid[axis] % self.mask_unit_size[axis] or self.token_grid[axis] % pool[axis]:
                problems.append(f"the token grid {self.token_grid} is not divisible along {name} by the mask unit "
                                f"{self.mask_unit_size} and the total pooling {tuple(pool)}")
        unit = list(self.mask_unit_size)
        for stage in range(n):
            if self.attn_in_mask_units[stage] and min(unit) < 1:
                problems.append(f"stage {stage + 1} attends inside mask units, but pooling has shrunk them to {unit}")
            if stage < self.pooling_stages:
                # The first block of the next stage attends as this one, pooling queries inside the unit.
                if self.attn_in_mask_units[stage] and any(u % s for u, s in zip(unit, self.q_stride)):
                    problems.append(f"the mask unit {tuple(unit)} of stage {stage + 1} is not divisible by q_stride "
                                    f"{self.q_stride}")
                unit = [u // s for u, s in zip(unit, self.q_stride)]
        if problems:
            raise ConfigError("invalid SignHiera settings: " + "; ".join(problems))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], *, source: str = "state dict", **overrides: Any) -> "SignHieraConfig":
        """Read what the tensors determine from ``state``; the rest from ``overrides`` or the defaults.

        Raises :class:`CheckpointError` when ``state`` is not a SignHiera, and :class:`ConfigError`
        for an override of something the tensors determine.
        """
        unknown = set(overrides) - set(OVERRIDABLE)
        if unknown:
            raise ConfigError(f"cannot override {sorted(unknown)} of a SignHiera: the checkpoint's tensors determine "
                              f"them; what can be set is {list(OVERRIDABLE)}")
        required = ("patch_embed.proj.weight", "pos_embed_temporal", "pos_embed_spatial", "blocks.0.attn.qkv.weight")
        missing = [k for k in required if k not in state]
        if missing:
            hint = ""
            if any(k.startswith(("encoder.block.", "encoder.feature_projection", "projection_out")) for k in state):
                hint = " It looks like a SONAR ASL encoder (SignT5): pass it as the encoder, not as the video model."
            elif "pos_embed" in state:
                hint = " It has one joint position embedding: an image Hiera or a video Hiera without separate embeddings."
            raise CheckpointError(
                f"{source} is not a SignHiera video checkpoint: it has no {', '.join(missing)}.{hint} Expected the "
                f"official {OFFICIAL_FILE_NAME} ({OFFICIAL_URL}) or a file saved by sonar_ft.models.signhiera"
            )
        try:
            return _config_from_tensors(state, overrides)
        except KeyError as exc:
            raise CheckpointError(f"{source} lacks the SignHiera weight {exc.args[0]}: it is truncated or not a "
                                  "SignHiera checkpoint") from None
        except (IndexError, ValueError) as exc:
            raise CheckpointError(f"{source} is not a SignHiera checkpoint this code can read: {exc}") from None


OVERRIDABLE: tuple[str, ...] = (
    "num_heads", "head_mul", "q_pool", "q_stride", "mask_unit_size", "mask_unit_attn", "patch_stride",
    "patch_padding", "layer_norm_eps",
)
"""Settings the tensors do not determine: the only ones :func:`load_signhiera` accepts as overrides."""


def _config_from_tensors(state: Mapping[str, Tensor], overrides: Mapping[str, Any]) -> SignHieraConfig:
    patch = state["patch_embed.proj.weight"]
    if patch.dim() != 5:
        raise ValueError(f"patch_embed.proj.weight has shape {tuple(patch.shape)}, not that of a Conv3d (5 dims)")
    embed_dim, in_chans, *kernel = patch.shape
    depth = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    dims_out = [state[f"blocks.{i}.attn.qkv.weight"].shape[0] // 3 for i in range(depth)]
    starts = [0] + [i for i in range(1, depth) if f"blocks.{i}.proj.weight" in state]
    ends = starts[1:] + [depth]
    stage_depths = tuple(e - s for s, e in zip(starts, ends))
    stage_dims = tuple(dims_out[s] for s in starts)
    mlp_hidden = tuple(state[f"blocks.{s}.mlp.fc1.weight"].shape[0] for s in starts)
    temporal = state["pos_embed_temporal"].shape[1]
    spatial = state["pos_embed_spatial"].shape[1]
    side = math.isqrt(spatial)
    if side * side != spatial:
        raise ValueError(f"pos_embed_spatial has {spatial} positions, not a square grid")
    values = dict(overrides)
    for name in ("q_stride", "mask_unit_size", "patch_stride", "patch_padding", "mask_unit_attn"):
        if values.get(name) is not None:
            values[name] = tuple(values[name])
    config = SignHieraConfig(
        in_chans=int(in_chans), embed_dim=int(embed_dim), stage_depths=stage_depths, stage_dims=stage_dims,
        mlp_hidden=mlp_hidden, patch_kernel=tuple(int(k) for k in kernel),  # type: ignore[arg-type]
        token_grid=(int(temporal), side, side), **values,
    )
    config.validate()
    return config


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


def max_pool(x: Tensor, stride: Sequence[int]) -> Tensor:
    """Max over non-overlapping (st, sh, sw) blocks of a (B, T, H, W, C) map."""
    st, sh, sw = stride
    if st == sh == sw == 1:
        return x
    b, t, h, w, c = x.shape
    x = x.view(b, t // st, st, h // sh, sh, w // sw, sw, c)
    return x.amax(dim=(2, 4, 6))


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention, inside mask units or global, optionally max-pooling the queries.

    With ``window`` set, the (T, H, W) grid is cut into blocks of that many tokens and each block
    attends only to itself (no padding mask: a mask unit is all real or all padding). Globally, keys of
    padded frames are masked. Pooled queries make the output grid ``q_stride`` times smaller.
    """

    def __init__(self, dim: int, dim_out: int, heads: int, q_stride: tuple[int, int, int],
                 window: tuple[int, int, int] | None) -> None:
        super().__init__()
        self.dim_out, self.heads, self.head_dim = dim_out, heads, dim_out // heads
        self.q_stride, self.window = q_stride, window
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: Tensor, key_valid: Tensor | None) -> Tensor:
        """x (B, T, H, W, dim), key_valid (B, T) or None -> (B, T/qt, H/qh, W/qw, dim_out)."""
        b, t, h, w, _ = x.shape
        qt, qh, qw = self.q_stride
        qkv = self.qkv(x)  # (B, T, H, W, 3 * dim_out)
        if self.window is not None:
            wt, wh, ww = self.window
            groups = (t // wt, h // wh, w // ww)
            qkv = qkv.view(b, groups[0], wt, groups[1], wh, groups[2], ww, -1)
            qkv = qkv.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, nT, nH, nW, wt, wh, ww, 3D)
            n, grid = b * math.prod(groups), (wt, wh, ww)
        else:
            n, grid = b, (t, h, w)
        qkv = qkv.reshape(n, math.prod(grid), 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (n, heads, L, head_dim)
        out_grid = (grid[0] // qt, grid[1] // qh, grid[2] // qw)
        if (qt, qh, qw) != (1, 1, 1):
            q = q.reshape(n, self.heads, out_grid[0], qt, out_grid[1], qh, out_grid[2], qw, self.head_dim)
            q = q.amax(dim=(3, 5, 7)).reshape(n, self.heads, -1, self.head_dim)
        mask = None
        if key_valid is not None and self.window is None:
            mask = key_valid[:, None, None, :, None].expand(b, 1, 1, t, h * w).reshape(b, 1, 1, t * h * w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (n, heads, L', head_dim)
        out = out.transpose(1, 2).reshape(n, *out_grid, self.dim_out)
        if self.window is not None:
            out = out.view(b, *groups, *out_grid, self.dim_out).permute(0, 1, 4, 2, 5, 3, 6, 7)
        out = out.reshape(b, t // qt, h // qh, w // qw, self.dim_out)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block; at a stage transition it widens (``proj``) and pools the skip path."""

    def __init__(self, dim: int, dim_out: int, heads: int, mlp_hidden: int, q_stride: tuple[int, int, int],
                 window: tuple[int, int, int] | None, eps: float) -> None:
        super().__init__()
        self.dim, self.dim_out = dim, dim_out
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, dim_out, heads, q_stride, window)
        self.norm2 = nn.LayerNorm(dim_out, eps=eps)
        self.mlp = Mlp(dim_out, mlp_hidden)
        if dim != dim_out:
            self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: Tensor, key_valid: Tensor | None) -> Tensor:
        x_norm = self.norm1(x)
        if self.dim != self.dim_out:
            x = max_pool(self.proj(x_norm), self.attn.q_stride)
        x = x + self.attn(x_norm, key_valid)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, config: SignHieraConfig) -> None:
        super().__init__()
        self.proj = nn.Conv3d(config.in_chans, config.embed_dim, config.patch_kernel, config.patch_stride,
                              config.patch_padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)  # (B, C, T, H, W) -> (B, T, H, W, C)


class SignHiera(nn.Module):
    """SignHiera feature extractor: normalised windows (B, 3, T, H, W) -> features (B, T_out, D)."""

    def __init__(self, config: SignHieraConfig = SignHieraConfig()) -> None:
        super().__init__()
        config.validate()
        self.config = config
        t, h, w = config.token_grid
        self.patch_embed = PatchEmbed(config)
        self.pos_embed_spatial = nn.Parameter(torch.zeros(1, h * w, config.embed_dim))
        self.pos_embed_temporal = nn.Parameter(torch.zeros(1, t, config.embed_dim))
        self.blocks = nn.ModuleList()
        unit = config.mask_unit_size
        dim = config.embed_dim
        for stage, depth in enumerate(config.stage_depths):
            for i in range(depth):
                first = i == 0 and stage > 0
                pools = first and stage <= config.pooling_stages
                q_stride = config.q_stride if pools else (1, 1, 1)
                # The first block of a stage still attends as the stage before it (the reference's "lag by
                # one block"), over the previous resolution, pooling its queries to the new one.
                attn_stage = stage - 1 if first else stage
                window = unit if config.attn_in_mask_units[attn_stage] else None
                self.blocks.append(Block(dim, config.stage_dims[stage], config.heads(stage), config.mlp_hidden[stage],
                                         q_stride, window, config.layer_norm_eps))
                dim = config.stage_dims[stage]
                if pools:
                    unit = tuple(u // s for u, s in zip(unit, config.q_stride))

    def init_weights(self, generator: torch.Generator | None = None) -> "SignHiera":
        """Random weights (truncated normal, std 0.02) for tests and demos; returns ``self``."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif "norm" in name:
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator).clamp_(-2, 2) * 0.02)
        return self

    def key_validity(self, padding: Tensor) -> Tensor | None:
        """(B,) padded frames -> (B, T_tokens) True where the temporal token is real; None when none is padded."""
        config = self.config
        units = torch.div(padding, config.frames_per_unit, rounding_mode="floor")
        if not bool((units > 0).any()):
            return None
        t = config.token_grid[0]
        valid_tokens = t - units * config.mask_unit_size[0]
        return torch.arange(t, device=padding.device)[None, :] < valid_tokens[:, None]

    def forward(self, x: Tensor, padding: Tensor | None = None) -> Tensor:
        """Windows (B, 3, T, H, W), padding (B,) frames -> (B, T_out, D) per-window vectors, padded ones included.

        Use :meth:`extract` to get the vectors with the padded ones dropped.
        """
        config = self.config
        if tuple(x.shape[1:]) != (config.in_chans, *config.input_size):
            raise ValueError(f"expected windows of shape (B, {config.in_chans}, {', '.join(map(str, config.input_size))}), "
                             f"got {tuple(x.shape)}")
        key_valid = None
        if padding is not None:
            padding = torch.as_tensor(padding, device=x.device).long().reshape(-1)
            key_valid = self.key_validity(padding)
        if key_valid is not None:
            # Zero the frames of padded mask units, so the patch embedding sees no padding content
            # where the reference zeroes it (an odd leftover frame stays, as there).
            frames = key_valid.repeat_interleave(config.patch_stride[0], dim=1)  # (B, T)
            x = x * frames[:, None, :, None, None].to(x.dtype)
        tokens = self.patch_embed(x)  # (B, T', H', W', C)
        t, h, w = config.token_grid
        pos = self.pos_embed_temporal.view(1, t, 1, 1, -1) + self.pos_embed_spatial.view(1, 1, h, w, -1)
        tokens = tokens + pos
        for block in self.blocks:
            tokens = block(tokens, key_valid)
            qt = block.attn.q_stride[0]
            if key_valid is not None and qt > 1:
                key_valid = key_valid.view(key_valid.shape[0], -1, qt).any(dim=-1)
        return tokens.mean(dim=(2, 3))  # (B, T_out, D)

    @torch.inference_mode()
    def extract(self, windows: Tensor, padding: Tensor | Sequence[int] | None = None) -> list[Tensor]:
        """Features of a batch of windows, padded vectors dropped: one (T_out - padding // 2, D) tensor per window.

        ``windows`` are normalised (see :mod:`sonar_ft.data.video`), shape (B, 3, T, H, W); ``padding`` is
        how many of each window's last frames repeat its final frame (0 for full windows).
        """
        if padding is None:
            padding = [0] * windows.shape[0]
        padding = torch.as_tensor(padding, dtype=torch.long).reshape(-1).cpu()
        if padding.shape[0] != windows.shape[0]:
            raise ValueError(f"{windows.shape[0]} windows but {padding.shape[0]} padding values")
        if bool((padding < 0).any()) or bool((padding >= self.config.input_size[0]).any()):
            raise ValueError(f"padding must be in [0, {self.config.input_size[0] - 1}] frames, got {padding.tolist()}")
        out = self(windows, padding.to(windows.device))
        n = self.config.vectors_per_window
        return [out[i, : n - self.config.padded_vectors(int(p))] for i, p in enumerate(padding)]


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def extract_state_dict(obj: Any, *, source: str = "checkpoint") -> dict[str, Tensor]:
    """The SignHiera weights in a loaded checkpoint: under ``model`` / ``model_state`` / ``state_dict``, or bare."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source} holds a {type(obj).__name__}, not a dict of SignHiera weights")
    for key in WEIGHT_CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state = {}
    for key, value in obj.items():
        if not isinstance(value, Tensor):
            continue
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def load_signhiera(path: str | Path, *, device: str | torch.device = "cpu", **overrides: Any) -> SignHiera:
    """Load a SignHiera from a checkpoint (the official ``dm_70h_ub_signhiera.pth`` or one saved here), in eval mode.

    The architecture is read from the tensors; ``overrides`` set what they cannot determine
    (:data:`OVERRIDABLE`: heads, q_pool, mask unit, ...). Loading never runs code from the file.
    Raises :class:`CheckpointError` naming the file when it is not a SignHiera or a weight is missing.
    """
    path = Path(path)
    fix = "download the official file again (sonar-ft download signhiera --out checkpoints/)"
    obj = atomic.load_torch(path, what="SignHiera checkpoint", fix=fix)
    state = extract_state_dict(obj, source=str(path))
    config = SignHieraConfig.from_state_dict(state, source=str(path), **overrides)
    model = SignHiera(config)
    expected = model.state_dict()
    used = {k: v for k, v in state.items() if k in expected}
    missing = sorted(set(expected) - set(used))
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} SignHiera weights (first: {', '.join(missing[:3])}); {fix}")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in used.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: weights of the wrong shape for the architecture its tensors describe: "
                              f"{'; '.join(wrong[:3])}. Check the overrides (num_heads, q_stride, mask_unit_size)")
    unused = sorted(k for k in state if k not in expected)
    if unused:
        level = logging.DEBUG if all(k.startswith(_UNUSED_PREFIXES) for k in unused) else logging.INFO
        logger.log(level, "%s: %d weights not used for features (e.g. %s)", path.name, len(unused), ", ".join(unused[:3]))
    model.load_state_dict(used, strict=True)
    return model.to(device).eval()


def save_signhiera(model: SignHiera, path: str | Path) -> None:
    """Save ``model``'s weights the way the official file keeps them (``{"model": state_dict}``), atomically."""
    atomic.save_torch(path, {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}})


def tiny_config(**changes: Any) -> SignHieraConfig:
    """A small SignHiera with the official structure (4 stages, 3 poolings) for tests and the offline demo.

    Windows of the official 128 frames at 32 x 32 pixels; 64 vectors of width 64 per window.
    """
    base = SignHieraConfig(
        embed_dim=8, stage_depths=(1, 2, 2, 1), stage_dims=(8, 16, 32, 64), mlp_hidden=(16, 32, 64, 128),
        token_grid=(64, 8, 8),
    )
    return dataclasses.replace(base, **changes)
