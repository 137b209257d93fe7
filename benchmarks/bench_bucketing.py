"""(c) Length-bucketed batches against random batches on a How2Sign-like length distribution.

2,000 clip lengths drawn log-normal and clipped to 20-600 frames. Padded fraction = padding
frames / all frames of the padded batches, over one epoch of batches of 32 (LengthBucketSampler
vs. a random permutation cut into batches). Step time: a small encoder's forward + backward over
the same 24 batches' worth of clips from each scheme (the same clips, only grouped differently).
Goal: bucketed padding <= 10%.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import result, save, threads  # noqa: E402
from sonar_ft.data import LengthBucketSampler  # noqa: E402
from sonar_ft.encoder import SignT5Config, SignT5SonarEncoder  # noqa: E402

N, BATCH, TIMED_BATCHES = 2000, 32, 12
SMALL = SignT5Config(feature_dim=64, d_model=128, d_kv=16, d_ff=256, num_heads=8, num_encoder_layers=2,
                     num_decoder_layers=1, vocab_size=8, dropout=0.1)


def lengths_like_how2sign(n: int, seed: int = 0) -> np.ndarray:
    """Log-normal frame counts (median ~160, long right tail), clipped to 20-600."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=np.log(160), sigma=0.6, size=n), 20, 600).astype(int)


def padded_fraction(lengths: np.ndarray, batches: list[list[int]]) -> float:
    padded = sum(len(b) * lengths[b].max() for b in batches)
    return 1.0 - lengths.sum() / padded


def random_batches(n: int, size: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i : i + size].tolist() for i in range(0, n, size)]


def time_batches(model: SignT5SonarEncoder, lengths: np.ndarray, batches: list[list[int]], batch_size: int) -> float:
    total = 0.0
    for b in batches:
        T = int(lengths[b].max())
        feats = torch.randn(len(b), T, SMALL.feature_dim)
        mask = torch.arange(T)[None] < torch.as_tensor(lengths[b])[:, None]
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        model(feats, mask).pow(2).mean().backward()
        total += time.perf_counter() - start
    return total


def main() -> None:
    threads()
    lengths = lengths_like_how2sign(N)
    sampler = LengthBucketSampler(lengths, BATCH, seed=0)
    sampler.set_epoch(1)
    bucketed = list(sampler)
    randomly = random_batches(N, BATCH, seed=1)
    pad_b, pad_r = padded_fraction(lengths, bucketed), padded_fraction(lengths, randomly)
    print(f"  {N} clips, median {int(np.median(lengths))} frames, batch {BATCH}: padding bucketed {pad_b:.1%}, random {pad_r:.1%}")

    torch.manual_seed(0)
    model = SignT5SonarEncoder(SMALL).train()
    # The same clips in both schemes: the first TIMED_BATCHES random batches, re-grouped by the bucketing
    # sampler with the same batch size (pools of the whole subset).
    subset = sorted(i for b in randomly[:TIMED_BATCHES] for i in b)
    sub_sampler = LengthBucketSampler(lengths[subset], BATCH, seed=0)
    regrouped = [[subset[i] for i in b] for b in sub_sampler]
    time_batches(model, lengths, regrouped[:2], BATCH)  # warm-up
    t_r = time_batches(model, lengths, randomly[:TIMED_BATCHES], BATCH)
    t_b = time_batches(model, lengths, regrouped, BATCH)
    t_r2 = time_batches(model, lengths, randomly[:TIMED_BATCHES], BATCH)
    t_b2 = time_batches(model, lengths, regrouped, BATCH)
    ratio = (t_b + t_b2) / (t_r + t_r2)
    records = [
        result("padded fraction, length-bucketed", pad_b, "<= 0.10", pad_b <= 0.10),
        result("padded fraction, random batches", pad_r, "report", None),
        result("epoch step time, bucketed / random", ratio, "< 1", ratio < 1, note=f"{len(subset)} clips, small encoder"),
    ]
    save("bucketing", records, {"padding": {"bucketed": pad_b, "random": pad_r}, "seconds": {"bucketed": t_b + t_b2, "random": t_r + t_r2}})


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    main()
