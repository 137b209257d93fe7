"""(a) Memory-bounded token loss at the real vocabulary and width.

The decoder's final projection (1024 -> 256,206) + cross-entropy for a batch of 32 sentences of
48 target tokens (1,536 positions), forward and backward into the decoder states, the projection
weight frozen as in training. Each variant runs in its own process; its peak memory is the rise
of the peak resident set (``ru_maxrss``) over what the inputs already take. Goal: the chunked
loss peaks at <= 25% of the plain full-logits loss, with loss and gradient equal within 1e-5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import current_rss_bytes, max_rss_bytes, result, run_child, save, threads  # noqa: E402
from sonar_ft.models.decoder import chunked_cross_entropy  # noqa: E402

VOCAB, WIDTH, BATCH, TOKENS = 256_206, 1024, 32, 48


def child(variant: str, chunk: int, dump: str) -> None:
    threads()
    torch.manual_seed(0)
    # In place: a temporary here would raise the process's peak above what the loss step needs.
    weight = torch.randn(VOCAB, WIDTH).mul_(WIDTH**-0.5)  # frozen projection (tied embedding)
    hidden = torch.randn(BATCH * TOKENS, WIDTH, requires_grad=True)
    targets = torch.randint(0, VOCAB, (BATCH * TOKENS,))
    assert max_rss_bytes() < current_rss_bytes() + 64 * 2**20, "set-up left a higher peak than the inputs"
    before = current_rss_bytes()
    start = time.perf_counter()
    if variant == "full":
        loss = F.cross_entropy(F.linear(hidden, weight), targets, reduction="sum", label_smoothing=0.1)
    else:
        loss = chunked_cross_entropy(hidden, weight, None, targets, label_smoothing=0.1, chunk_size=chunk)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = max_rss_bytes() - before
    torch.save({"loss": loss.detach(), "grad": hidden.grad}, dump)
    print(json.dumps({"peak": peak, "seconds": seconds}))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, chunk in (("full", 0), ("chunk256", 256)):
            dump = str(Path(tmp) / f"{name}.pt")
            runs[name] = {**run_child("bench_loss_memory", name, str(chunk), dump), "dump": dump}
            print(f"  {name:<10} peak {runs[name]['peak'] / 2**30:6.2f} GiB   {runs[name]['seconds']:6.1f} s", flush=True)
        ref = torch.load(runs["full"]["dump"], weights_only=True)
        records = []
        logits_gib = BATCH * TOKENS * VOCAB * 4 / 2**30
        print(f"  (one fp32 copy of the full logits: {logits_gib:.2f} GiB)")
        for name, chunk in (("chunk256", 256),):
            got = torch.load(runs[name]["dump"], weights_only=True)
            loss_err = float((got["loss"] - ref["loss"]).abs() / ref["loss"].abs())
            grad_err = float((got["grad"] - ref["grad"]).norm() / ref["grad"].norm())
            ratio = runs[name]["peak"] / runs["full"]["peak"]
            records.append(result(f"loss peak memory, chunk {chunk} / full logits", ratio, "<= 0.25", ratio <= 0.25))
            records.append(result(f"loss / gradient relative error, chunk {chunk}", max(loss_err, grad_err), "<= 1e-5",
                                  max(loss_err, grad_err) <= 1e-5))
            records.append(result(f"loss step time, chunk {chunk} / full logits", runs[name]["seconds"] / runs["full"]["seconds"],
                                  "report", None, note="recomputes each chunk's logits in backward"))
        save("loss_memory", records, {"peaks_bytes": {k: v["peak"] for k, v in runs.items()},
                                      "seconds": {k: v["seconds"] for k, v in runs.items()}})


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "CHUNK", "DUMP"))
    a = p.parse_args()
    if a.child:
        child(a.child[0], int(a.child[1]), a.child[2])
    else:
        main()
