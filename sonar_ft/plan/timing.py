"""Time of a run, estimated before it starts: counted FLOPs of a step over a GPU's peak at a stated utilisation.

A step's FLOPs are counted from the shapes (2 per multiply-add): the encoder's matmuls over every frame
(its blocks, and the one-query decoder stack's keys and values), attention's two ``T x T`` products, the
frozen decoder over the target tokens and the vocabulary projection. The backward pass costs twice the
forward for trained weights (input and weight gradients) and once for frozen ones (input gradients only);
gradient checkpointing re-runs the forward of the blocks, and the chunked loss re-runs the projection.
The result is an estimate: ``make gpu-check`` measures the utilisation on a lent GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sonar_ft.models.encoder import SignT5Config
from sonar_ft.plan.memory import DecoderSpec, sonar_decoder_spec

UTILISATION = 0.35
"""Share of the GPU's peak matmul throughput a fine-tuning step reaches (eager PyTorch, mixed sizes);
the figure to replace with the GPU check's measurement."""

HOW2SIGN_CLIPS = 31_128
"""Training clips of How2Sign (the official train split)."""

EPOCHS = 30


@dataclass(frozen=True)
class LengthStats:
    """Mean clip length (frames), mean square length and mean target tokens of a data set."""

    frames: float
    frames_sq: float
    target_tokens: float


def how2sign_lengths(max_frames: int = 600, n: int = 100_000, seed: int = 0) -> LengthStats:
    """How2Sign-like lengths: log-normal around 28 % of ``max_frames`` (sigma 0.6), capped; ~14 frames a word."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(math.log(max_frames * 0.28), 0.6, n).round(), max(2, max_frames // 30), max_frames)
    words = np.clip(lengths / 14, 2, 44)
    return LengthStats(float(lengths.mean()), float((lengths**2).mean()), float(words.mean() * 1.3 + 1))


def step_flops(config: SignT5Config, decoder: DecoderSpec, *, clips: int, frames: float, frames_sq: float,
               target_tokens: float, gradient_checkpointing: bool, trained: bool = True) -> float:
    """FLOPs of forward + backward for ``clips`` clips of mean ``frames`` (mean square ``frames_sq``).

    ``trained`` False: LoRA (the base weights get no weight gradients; the adapters' own FLOPs are small).
    """
    c = config
    d, h, f = c.d_model, c.num_heads * c.d_kv, c.d_ff
    ff_in = 3 if c.gated else 2
    block = 4 * d * h + ff_in * d * f  # q, k, v, o + the FFN, per frame
    per_frame = c.num_encoder_layers * block + c.num_decoder_layers * 2 * d * h + c.feature_dim * d
    enc_fwd = 2 * clips * frames * per_frame + c.num_encoder_layers * 4 * clips * frames_sq * h
    dec_per_token = decoder.num_layers * (8 * decoder.model_dim**2 + 2 * decoder.model_dim * decoder.ffn_dim)
    dec_fwd = 2 * clips * target_tokens * dec_per_token
    proj_fwd = 2 * clips * target_tokens * decoder.model_dim * decoder.vocab
    enc = enc_fwd * (3 if trained else 2) + (enc_fwd if gradient_checkpointing else 0)
    dec = dec_fwd * 2 + (dec_fwd if gradient_checkpointing else 0)
    proj = proj_fwd * 3  # forward, re-run in the chunk's backward, input gradient
    return float(enc + dec + proj)


@dataclass(frozen=True)
class TimePlan:
    """Estimated time per epoch and per run."""

    epoch_s: float
    run_s: float
    tflops_per_epoch: float
    peak_tflops: float
    utilisation: float
    clips: int
    epochs: int

    def format_table(self) -> str:
        return "\n".join([
            f"time (estimate: counted FLOPs at {self.utilisation:.0%} of the GPU's {self.peak_tflops:.0f} TFLOP/s):",
            f"  {'per epoch':<18}{self.epoch_s / 60:8.1f} min ({self.clips:,} clips, How2Sign-like lengths, "
            f"{self.tflops_per_epoch / 1e3:.0f} PFLOP)",
            f"  {f'{self.epochs} epochs':<18}{self.run_s / 3600:8.1f} h (training only; validation adds beam search)",
        ])


def time_plan(peak_tflops: float, *, config: SignT5Config | None = None, decoder: DecoderSpec | None = None,
              gradient_checkpointing: bool = False, lora: bool = False, max_frames: int = 600,
              clips: int = HOW2SIGN_CLIPS, epochs: int = EPOCHS, utilisation: float = UTILISATION) -> TimePlan:
    """Time per epoch and per ``epochs`` epochs of ``clips`` clips on a GPU of ``peak_tflops`` (dense, the run's precision)."""
    config = config or SignT5Config()
    spec = decoder or sonar_decoder_spec()
    stats = how2sign_lengths(max_frames)
    flops = step_flops(config, spec, clips=clips, frames=stats.frames, frames_sq=stats.frames_sq,
                       target_tokens=stats.target_tokens, gradient_checkpointing=gradient_checkpointing, trained=not lora)
    epoch_s = flops / (peak_tflops * 1e12 * utilisation)
    return TimePlan(epoch_s, epoch_s * epochs, flops / 1e12, peak_tflops, utilisation, clips, epochs)
