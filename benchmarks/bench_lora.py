"""LoRA (``--lora_rank``) against full fine-tuning.

(a) Official size (random weights of the official SONAR ASL encoder's shapes, built here), CPU, one
    AdamW step on a batch of 2 clips of 256 frames. Each variant runs in its own process; its
    step peak is the rise of the peak resident set over the built model, its training state the
    bytes ``torch.save`` writes for what ``last.pt`` keeps (full: the encoder's state dict + AdamW's
    moments; LoRA: the trainable tensors + their moments). The frozen text decoder and the loss are
    the same in both runs and left out: the step ends in an MSE to a random 1024-d target.
    Goals: LoRA rank 16 state <= 5% of full; step peak clearly lower.
(b) The demo (``make demo``'s assets, starting encoder pretrained on the shifted source domain): test
    BLEU after the same epochs (the demo's fine-tuning flags), LoRA ranks 4 and 16 vs full
    fine-tuning, and their trainable-parameter counts. Reported, whichever wins.

    python benchmarks/bench_lora.py [--part official|demo|all]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, current_rss_bytes, max_rss_bytes, result, run_child, save, threads  # noqa: E402

FRAMES, BATCH, RANK = 256, 2, 16


class _CountingWriter:
    """A write-only file that counts bytes: what ``torch.save`` would write, without writing it."""

    def __init__(self) -> None:
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _saved_bytes(obj) -> int:
    writer = _CountingWriter()
    torch.save(obj, writer)
    return writer.bytes


def child(variant: str) -> None:
    from sonar_ft.models import lora
    from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder

    threads()
    torch.manual_seed(0)
    config = SignT5Config()  # the official architecture (752M parameters)
    encoder = SignT5SonarEncoder(config).train()
    if variant == "lora":
        settings = types.SimpleNamespace(lora_rank=RANK, lora_alpha=2.0 * RANK, lora_dropout=0.0, lora_targets=lora.DEFAULT_TARGETS,
                                         lora_trainable=lora.DEFAULT_TRAINABLE, freeze_encoder_layers=0, compile=False)
        _, params = lora.apply_lora(encoder, settings)
    else:
        params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    features = torch.randn(BATCH, FRAMES, config.feature_dim)
    mask = torch.ones(BATCH, FRAMES, dtype=torch.bool)
    target = torch.randn(BATCH, config.output_dim)
    before, built_peak = current_rss_bytes(), max_rss_bytes()
    start = time.perf_counter()
    loss = torch.nn.functional.mse_loss(encoder(features, mask), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    peak = max_rss_bytes() - before
    weights = lora.trainable_state_dict(encoder) if variant == "lora" else encoder.state_dict()
    state = _saved_bytes({"encoder": weights, "optimizer": optimizer.state_dict()})
    print(json.dumps({"peak": peak, "built": before, "built_peak": built_peak, "state": state, "seconds": seconds,
                      "trainable": sum(p.numel() for p in params)}))


def official() -> list[dict]:
    runs = {}
    for variant in ("full", "lora"):
        runs[variant] = run_child("bench_lora", variant)
        r = runs[variant]
        print(f"  {variant:<5} step peak +{r['peak'] / 2**30:6.2f} GiB over the built model ({r['built'] / 2**30:.2f} GiB) | "
              f"state {r['state'] / 2**30:7.3f} GiB | trainable {r['trainable'] / 1e6:7.1f} M | {r['seconds']:.1f} s", flush=True)
    state = runs["lora"]["state"] / runs["full"]["state"]
    peak = runs["lora"]["peak"] / runs["full"]["peak"]
    total = (runs["lora"]["built"] + runs["lora"]["peak"]) / (runs["full"]["built"] + runs["full"]["peak"])
    records = [
        result(f"official size: training state, LoRA r{RANK} / full", state, "<= 0.05", state <= 0.05),
        result(f"official size: step peak over the model, LoRA r{RANK} / full", peak, "clearly < 1", peak < 0.8),
        result(f"official size: process peak, LoRA r{RANK} / full", total, "report", None, note="weights included"),
    ]
    save("lora_official", records, {"runs": runs, "frames": FRAMES, "batch": BATCH, "rank": RANK})
    return records


def demo(demo_dir: Path, epochs: int | None) -> list[dict]:
    from sonar_ft.demo.__main__ import FINETUNE_FLAGS, recipe_command
    from sonar_ft.demo.build import DemoConfig, build_demo

    paths = build_demo(demo_dir, DemoConfig())
    flags = list(FINETUNE_FLAGS)
    if epochs:
        flags[flags.index("--epochs") + 1] = str(epochs)
    distill = ["--text_encoder", str(paths.text_encoder_card), "--distill_weight", "1.0"]
    out = demo_dir / "bench_lora"
    scores, trainable = {}, {}
    import subprocess

    def run(cmd: list[str]) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "TQDM_DISABLE": "1"})
        if done.returncode:
            raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])

    run(recipe_command(paths, out / "start", ["--eval_only", "--beam_size", "4"], split="test"))
    scores["start"] = json.loads((out / "start" / "test_results.json").read_text())["bleu"]
    for rank in (0, 4, 16):
        name = "full" if rank == 0 else f"lora_r{rank}"
        lora_flags = ["--lora_rank", str(rank), "--lora_alpha", str(2 * rank)] if rank else []
        run(recipe_command(paths, out / name, flags + distill + lora_flags + ["--overwrite"]))
        run(recipe_command(paths, out / f"{name}_test", ["--eval_only", "--beam_size", "4"], split="test",
                           encoder=out / name / "best_encoder.pt"))
        scores[name] = json.loads((out / f"{name}_test" / "test_results.json").read_text())["bleu"]
        trainable[name] = _trainable(paths.encoder_checkpoint, rank)
        print(f"  {name:<9} test BLEU {scores[name]:5.1f} (start {scores['start']:.1f}) | trainable {trainable[name]:,}", flush=True)
    records = [result(f"demo test BLEU, {k}", v, "report", None) for k, v in scores.items()]
    records += [result(f"demo trainable parameters, {k}", v, "report", None) for k, v in trainable.items()]
    save("lora_demo", records, {"scores": scores, "trainable": trainable, "flags": flags})
    return records


def _trainable(checkpoint: Path, rank: int) -> int:
    from sonar_ft.models import lora
    from sonar_ft.models.encoder import load_encoder

    encoder, _ = load_encoder(checkpoint)
    if rank == 0:
        return sum(p.numel() for p in dict.fromkeys(encoder.parameters()))
    settings = types.SimpleNamespace(lora_rank=rank, lora_alpha=2.0 * rank, lora_dropout=0.0, lora_targets=lora.DEFAULT_TARGETS,
                                     lora_trainable=lora.DEFAULT_TRAINABLE, freeze_encoder_layers=0, compile=False)
    model, _ = lora.apply_lora(encoder, settings)
    return lora.count_trainable(model)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=["full", "lora"])
    p.add_argument("--part", choices=["official", "demo", "all"], default="all")
    p.add_argument("--demo-dir", type=Path, default=ROOT / "demo_runs")
    p.add_argument("--epochs", type=int, help="override the demo's fine-tuning epochs")
    a = p.parse_args()
    if a.child:
        child(a.child)
    else:
        if a.part in ("official", "all"):
            official()
        if a.part in ("demo", "all"):
            demo(a.demo_dir, a.epochs)
