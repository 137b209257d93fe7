"""(c) Length-bucketed batches against random batches on a How2Sign-like length distribution.

2,000 clip lengths drawn log-normal and clipped to 20-600 frames. Padded fraction = padding
frames / all frames of the padded batches, over one epoch of batches of 32 (LengthBucketSampler
vs. a random permutation cut into batches). Step time: a small encoder's forward + backward over
the clips of 6 random batches of 8, and over the same clips grouped by the bucketing sampler
(in turns, median of 3).
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
from benchmarks.common import interleaved_times, result, save, threads  # noqa: E402
from sonar_ft.data import LengthBucketSampler  # noqa: E402
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder  # noqa: E402

N, BATCH, TIMED_BATCH, TIMED_BATCHES = 2000, 32, 8, 6
SMALL = SignT5Config(feature_dim=32, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=1, vocab_size=8, dropout=0.1)


def lengths_like_how2sign(n: int, seed: int = 0) -> np.ndarray:
    """Log-normal frame counts (median ~160, long right tail), clipped to 20-600."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=np.log(160), sigma=0.6, size=n), 20, 600).astype(int)


def padded_fraction(lengths: np.ndarray, batches: list[list[int]]) -> float:
    padded = sum(len(b) * lengths[b].max() for b in batches)
    real = sum(lengths[b].sum() for b in batches)  # only the clips in these batches
    return 1.0 - real / padded


def random_batches(n: int, size: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i : i + size].tolist() for i in range(0, n, size)]


def time_batches(model: SignT5SonarEncoder, lengths: np.ndarray, batches: list[list[int]]) -> float:
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
    # The same clips in both schemes: TIMED_BATCHES random batches, re-grouped by the bucketing sampler.
    timed_random = random_batches(N, TIMED_BATCH, seed=2)[:TIMED_BATCHES]
    subset = sorted(i for b in timed_random for i in b)
    regrouped = [[subset[i] for i in b] for b in LengthBucketSampler(lengths[subset], TIMED_BATCH, seed=0)]
    # In turns, three times each, medians: the machine's background load hits both alike.
    times = interleaved_times({"random": lambda: time_batches(model, lengths, timed_random),
                               "bucketed": lambda: time_batches(model, lengths, regrouped)}, repeat=3, warmup=0)
    t_r, t_b = times["random"], times["bucketed"]
    frames = padded_fraction(lengths, regrouped), padded_fraction(lengths, timed_random)
    padded_r = sum(len(b) * lengths[b].max() for b in timed_random)
    padded_b = sum(len(b) * lengths[b].max() for b in regrouped)
    print(f"  timed {len(subset)} clips: padded frames bucketed/random {padded_b / padded_r:.2f} "
          f"(padding {frames[0]:.1%} vs {frames[1]:.1%}); step time {t_b:.2f} s vs {t_r:.2f} s")
    ratio = t_b / t_r
    records = [
        result("padded fraction, length-bucketed", pad_b, "<= 0.10", pad_b <= 0.10),
        result("padded fraction, random batches", pad_r, "report", None),
        result("epoch step time, bucketed / random", ratio, "< 1", ratio < 1, note=f"{len(subset)} clips, small encoder"),
    ]
    save("bucketing", records, {"padding": {"bucketed": pad_b, "random": pad_r}, "seconds": {"bucketed": t_b, "random": t_r}})


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    main()
