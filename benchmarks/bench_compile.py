"""(f) ``--compile``: torch.compile (inductor, dynamic shapes) of the encoder, on against off.

A small SignT5 encoder, forward + backward on batches of 8 clips whose padded length changes from
batch to batch (as length-bucketed batches do). Reports the one-off compile time and the median
step time after it, measured in turns with the eager model. ``--compile`` stays off by default
unless it helps.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import interleaved_times, result, save, threads  # noqa: E402
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder  # noqa: E402
from sonar_ft.training.perf import compile_encoder  # noqa: E402

SMALL = SignT5Config(feature_dim=128, d_model=256, d_kv=32, d_ff=512, num_heads=8, num_encoder_layers=3,
                     num_decoder_layers=2, vocab_size=8, dropout=0.1)
LENGTHS = (96, 128, 160, 200)


def batch(T: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(T)
    feats = torch.randn(8, T, SMALL.feature_dim, generator=g)
    mask = torch.arange(T)[None] < torch.randint(T // 2, T + 1, (8,), generator=g)[:, None]
    mask[:, 0] = True
    return feats, mask


def step(model: torch.nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for feats, mask in data:
        model.zero_grad(set_to_none=True)
        model(feats, mask).pow(2).mean().backward()


def main() -> None:
    threads()
    torch.manual_seed(0)
    eager = SignT5SonarEncoder(SMALL).train()
    compiled = compile_encoder(copy.deepcopy(eager))
    data = [batch(T) for T in LENGTHS]
    start = time.perf_counter()
    try:
        step(compiled, data)  # compiles (dynamic shapes: once, maybe a recompile for the second length)
    except Exception as exc:  # inductor needs a C++ compiler; report instead of failing the whole bench
        print(f"  torch.compile failed on this machine: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        save("compile", [result("compiled / eager step time", float("nan"), "report", None, note="compile failed")])
        return
    compile_seconds = time.perf_counter() - start
    times = interleaved_times({"eager": lambda: step(eager, data), "compiled": lambda: step(compiled, data)}, repeat=3)
    print(f"  compile (first pass over {len(LENGTHS)} lengths) {compile_seconds:.1f} s; per pass: eager {times['eager']:.2f} s, "
          f"compiled {times['compiled']:.2f} s")
    ratio = times["compiled"] / times["eager"]
    records = [
        result("compiled / eager step time (CPU)", ratio, "report; default on only if < 1 everywhere", None,
               note=f"one-off compile {compile_seconds:.0f} s"),
    ]
    save("compile", records, {"seconds": times, "compile_seconds": compile_seconds})


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    main()
