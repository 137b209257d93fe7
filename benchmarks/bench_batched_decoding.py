"""(d) Beam search in batches against one clip at a time, on the demo's SONAR-architecture decoder.

Embeddings: the demo text encoder's embeddings of the validation sentences plus a little
noise (as an imperfect sign encoder would give). Beam 5, as the recipe evaluates. Goal: batched
decoding >= 5x faster, with the same sentences.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, interleaved_times, result, save, threads  # noqa: E402
from sonar_ft.data import read_manifest  # noqa: E402
from sonar_ft.models.decoder import FrozenTextDecoder  # noqa: E402
from sonar_ft.demo.build import DemoConfig, build_demo  # noqa: E402
from sonar_ft.models.text_encoder import FrozenTextEncoder  # noqa: E402

BEAM = 5


def main() -> None:
    threads()
    demo = build_demo(Path(os.environ.get("DEMO_DIR", ROOT / "demo_runs")), DemoConfig())  # cached after `make demo`
    decoder = FrozenTextDecoder.load(demo.decoder_card)
    texts = [r.text for r in read_manifest(demo.split_manifest("val"))]
    emb = FrozenTextEncoder.load(demo.text_encoder_card).embed(texts)
    emb = emb + 0.05 * emb.std() * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))
    outputs: dict[str, list[str]] = {}

    def decode(name: str, batch_size: int) -> None:
        outputs[name] = decoder.generate(emb, beam_size=BEAM, batch_size=batch_size)

    times = interleaved_times({"one": lambda: decode("one", 1), "batched": lambda: decode("batched", 64)}, repeat=5)
    t_one, t_batched = times["one"], times["batched"]
    one, batched = outputs["one"], outputs["batched"]
    same = sum(a == b for a, b in zip(one, batched))
    print(f"  {len(texts)} clips, beam {BEAM} (median of 5, in turns): one at a time {t_one:.2f} s, in batches of 64 {t_batched:.2f} s; "
          f"{same}/{len(texts)} identical; exact matches with the source sentence: {sum(a == b for a, b in zip(batched, texts))}")
    records = [
        result("evaluation decoding speed-up, batched / one at a time", t_one / t_batched, ">= 5", t_one / t_batched >= 5, unit="x"),
        result("identical outputs, batched vs one at a time", same / len(texts), "= 1", same == len(texts)),
    ]
    save("batched_decoding", records, {"seconds": {"one_at_a_time": t_one, "batched": t_batched}, "clips": len(texts)})


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    main()
