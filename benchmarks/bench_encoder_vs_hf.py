"""(b) Our SignT5 encoder (SDPA + relative bias) against Hugging Face's T5 stacks at equal sizes.

Both models: feature projection, a T5-v1.1 encoder stack, a T5 decoder stack read with one start
token, an output projection; the same weights (our state dict loads into the HF modules), dropout
0.1, training mode. One step = forward + backward of the mean squared embedding, timed in turns
(median of 7). Memory = bytes of the tensors autograd saves for backward (``measure_saved_bytes``;
a CPU process's peak resident set mostly shows the allocator, not the model). Goal: ours is not
slower. On CPU both run unfused attention; on CUDA ours runs fused SDPA kernels, HF's eager T5 not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import interleaved_times, result, save, threads  # noqa: E402
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder  # noqa: E402
from sonar_ft.plan.memory import measure_saved_bytes  # noqa: E402

CONFIG = SignT5Config(feature_dim=256, d_model=512, d_kv=64, d_ff=1024, num_heads=8, num_encoder_layers=4,
                      num_decoder_layers=4, vocab_size=128, dropout=0.1)
BATCH, FRAMES = 4, 256


class HFSignT5(nn.Module):
    """The same architecture from ``transformers``' T5Stack (eager attention, HF's position bias)."""

    def __init__(self, config: SignT5Config) -> None:
        super().__init__()
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Stack

        def stack_config(layers: int, decoder: bool) -> T5Config:
            return T5Config(vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv, d_ff=config.d_ff,
                            num_heads=config.num_heads, num_layers=layers, is_decoder=decoder, use_cache=False,
                            relative_attention_num_buckets=config.num_buckets, dropout_rate=config.dropout,
                            relative_attention_max_distance=config.max_distance, is_encoder_decoder=False,
                            feed_forward_proj="gated-gelu", layer_norm_epsilon=config.layer_norm_eps)

        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.feature_proj = nn.Linear(config.feature_dim, config.d_model)
        self.feature_proj_scale = nn.Parameter(torch.ones(config.d_model))
        self.encoder = T5Stack(stack_config(config.num_encoder_layers, False), self.shared)
        self.decoder = T5Stack(stack_config(config.num_decoder_layers, True), self.shared)
        self.projection_out = nn.Linear(config.d_model, config.output_dim, bias=False)

    def load_from(self, ours: SignT5SonarEncoder) -> None:
        state = ours.state_dict()
        mine = {k.replace("encoder.feature_projection.", ""): v for k, v in state.items()}
        missing, _ = self.load_state_dict(mine, strict=False)
        assert not [k for k in missing if "embed_tokens" not in k], missing

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        embeds = self.feature_proj(features) * self.feature_proj_scale
        encoded = self.encoder(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False)[0]
        start = torch.zeros(features.shape[0], 1, dtype=torch.long, device=features.device)
        out = self.decoder(input_ids=start, encoder_hidden_states=encoded, encoder_attention_mask=mask.long(), use_cache=False)[0]
        return self.projection_out(out[:, 0])


def build() -> tuple[SignT5SonarEncoder, HFSignT5, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ours = SignT5SonarEncoder(CONFIG).train()
    theirs = HFSignT5(CONFIG).train()
    theirs.load_from(ours)
    feats = torch.randn(BATCH, FRAMES, CONFIG.feature_dim)
    lengths = torch.linspace(FRAMES // 2, FRAMES, BATCH).long()
    mask = torch.arange(FRAMES)[None] < lengths[:, None]
    return ours, theirs, feats, mask


def step(model: nn.Module, feats: torch.Tensor, mask: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(feats, mask).pow(2).mean().backward()


def main() -> None:
    n = threads()
    ours, theirs, feats, mask = build()
    with torch.no_grad():
        ours.eval(), theirs.eval()
        diff = float((ours(feats, mask) - theirs(feats, mask)).abs().max())
        ours.train(), theirs.train()
    print(f"  same weights, eval outputs differ by at most {diff:.2e}; {n} threads; "
          f"d_model {CONFIG.d_model}, {CONFIG.num_encoder_layers}+{CONFIG.num_decoder_layers} layers, batch {BATCH} x {FRAMES} frames")
    times = interleaved_times({"ours": lambda: step(ours, feats, mask), "hf": lambda: step(theirs, feats, mask)}, repeat=7)
    saved = {name: measure_saved_bytes(lambda m=m: m(feats, mask), exclude=m) for name, m in (("ours", ours), ("hf", theirs))}
    for name in ("ours", "hf"):
        print(f"  {name:<5} step {times[name] * 1e3:7.0f} ms   saved activations {saved[name] / 2**20:7.1f} MiB")
    records = [
        result("encoder step time, ours / HF T5", times["ours"] / times["hf"], "<= 1.0 (not slower)", times["ours"] <= times["hf"]),
        result("encoder activation memory, ours / HF T5", saved["ours"] / saved["hf"], "<= 1.0", saved["ours"] <= saved["hf"]),
    ]
    save("encoder_vs_hf", records, {"step_seconds": times, "saved_bytes": saved, "max_abs_diff": diff})


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    main()
