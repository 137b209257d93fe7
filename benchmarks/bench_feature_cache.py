"""(e) Feature caching: how much of a training step waits for data, epoch 1 (files) vs epoch 2 (memory).

The demo's 600 training clips (768-d features) through ``SignFeatureDataset(cache=True,
cache_dtype=float16)`` and the recipe's length-bucketed loader (batch 16, no worker processes,
as with the cache), each batch a forward + backward of a small encoder. Data wait = time spent
in the loader's ``next()``. Twice: from local disk as is, and with 15 ms added to every file read
(a simulated Google Drive mount, whose per-file latency is of that order; not a measurement of
Drive itself). Goal: from epoch 2 on, data wait is a negligible share of the step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, result, save, threads  # noqa: E402
from sonar_ft.data import FeatureStore, SignFeatureDataset, make_loader, read_manifest  # noqa: E402
from sonar_ft.demo.build import DemoConfig, build_demo  # noqa: E402
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder  # noqa: E402

DRIVE_LATENCY = 0.015
SMALL = SignT5Config(feature_dim=768, d_model=64, d_kv=16, d_ff=128, num_heads=4, num_encoder_layers=2,
                     num_decoder_layers=1, vocab_size=8, dropout=0.1)


def epoch_shares(demo, latency: float) -> list[tuple[float, float]]:
    store = FeatureStore.open(demo.split_features("train"))
    if latency:
        read = store.load
        store.load = lambda clip_id: (time.sleep(latency), read(clip_id))[1]
    dataset = SignFeatureDataset(store, read_manifest(demo.split_manifest("train")), cache=True,
                                 cache_dtype=torch.float16, progress=False)
    loader = make_loader(dataset, 16, shuffle=True, seed=0)
    torch.manual_seed(0)
    model = SignT5SonarEncoder(SMALL).train()
    out = []
    for epoch in (1, 2):
        loader.batch_sampler.set_epoch(epoch)
        wait = compute = 0.0
        batches = iter(loader)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - start
            if batch is None:
                break
            start = time.perf_counter()
            model.zero_grad(set_to_none=True)
            model(batch.features, batch.mask).pow(2).mean().backward()
            compute += time.perf_counter() - start
        out.append((wait, compute))
    return out


def main() -> None:
    threads()
    demo = build_demo(Path(os.environ.get("DEMO_DIR", ROOT / "demo_runs")), DemoConfig())
    records, raw = [], {}
    for label, latency in (("local disk", 0.0), ("simulated Drive, +15 ms/file", DRIVE_LATENCY)):
        shares = epoch_shares(demo, latency)
        raw[label] = shares
        for epoch, (wait, compute) in enumerate(shares, start=1):
            share = wait / (wait + compute)
            print(f"  {label:<30} epoch {epoch}: data wait {wait:6.2f} s, compute {compute:6.2f} s -> {share:.1%} of step time")
            goal = "report" if epoch == 1 else "<= 0.05"
            records.append(result(f"data-wait share of step time, {label}, epoch {epoch}", share, goal,
                                  None if epoch == 1 else share <= 0.05))
    save("feature_cache", records, {"wait_compute_seconds": raw})


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    main()
