"""Every memory / speed option computes what the plain version computes.

Chunked loss, gradient checkpointing (encoder and frozen decoder), batched beam search, the feature
cache, the bf16 decoder, and the recipe flags that switch them on.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

import train_sonar_finetuning as recipe
from sonar_ft import device as device_mod
from sonar_ft.data import splits
from sonar_ft.training import perf
from sonar_ft.config import config_from_sources
from sonar_ft.data import FeatureStore, SignFeatureDataset, read_manifest
from sonar_ft.models.decoder import FrozenTextDecoder, chunked_cross_entropy
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder, load_encoder
from sonar_ft.errors import ConfigError
from tests.conftest import recipe_args

TEXTS = ["The cat eats the apple.", "My mother sees a red book at home.", "The dog likes the ball.", "A boy runs."]
SMALL = SignT5Config(feature_dim=12, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_encoder_layers=3, num_decoder_layers=2, dropout=0.0)


@pytest.fixture(scope="module")
def decoder(tiny_demo) -> FrozenTextDecoder:
    return FrozenTextDecoder.load(tiny_demo.decoder_card)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of a whole tensor (elementwise ratios blow up where sums cancel to ~0)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _full_logits_loss(hidden, weight, bias, targets, label_smoothing):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum", label_smoothing=label_smoothing)


# -- chunked projection + cross-entropy ---------------------------------------------------------
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 5, 8, 36, 37, 64])  # 37 rows: non-dividing, exact and larger chunks
def test_chunked_loss_and_gradients_equal_full_logits(chunk, label_smoothing):
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    bias = torch.randn(101, requires_grad=True)
    targets = torch.randint(0, 101, (37,))
    full = _full_logits_loss(hidden, weight, bias, targets, label_smoothing)
    grads_full = torch.autograd.grad(full, (hidden, weight, bias))
    part = chunked_cross_entropy(hidden, weight, bias, targets, label_smoothing=label_smoothing, chunk_size=chunk)
    grads_part = torch.autograd.grad(part, (hidden, weight, bias))
    assert float(part.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    for g_part, g_full in zip(grads_part, grads_full):
        assert rel_err(g_part, g_full) < 1e-5


def test_decoder_loss_in_chunks_equals_unchunked(decoder):
    torch.manual_seed(1)
    emb = torch.randn(4, decoder.embedding_dim, requires_grad=True)
    full = decoder.loss(emb, TEXTS, label_smoothing=0.1, chunk_size=0)
    (g_full,) = torch.autograd.grad(full.loss, emb)
    chunked = decoder.loss(emb, TEXTS, label_smoothing=0.1, chunk_size=3)
    (g_chunked,) = torch.autograd.grad(chunked.loss, emb)
    assert float(chunked.loss.detach()) == pytest.approx(float(full.loss.detach()), rel=1e-5)
    assert rel_err(g_chunked, g_full) < 1e-5


# -- gradient checkpointing ---------------------------------------------------------------------
def _encoder_loss_and_grads(model: SignT5SonarEncoder, feats: torch.Tensor, mask: torch.Tensor):
    model.zero_grad(set_to_none=True)
    loss = model(feats, mask).pow(2).mean()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_encoder_gradient_checkpointing_gives_same_loss_and_gradients():
    torch.manual_seed(0)
    model = SignT5SonarEncoder(SMALL).train()
    feats = torch.randn(3, 11, SMALL.feature_dim)
    mask = torch.arange(11)[None] < torch.tensor([11, 7, 4])[:, None]
    plain_loss, plain = _encoder_loss_and_grads(model, feats, mask)
    model.gradient_checkpointing = True
    ckpt_loss, ckpt = _encoder_loss_and_grads(model, feats, mask)
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-6)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for name in plain:
        assert rel_err(ckpt[name], plain[name]) < 1e-5, name


def test_decoder_checkpointing_gives_same_loss_gradient_and_generation(tiny_demo):
    plain = FrozenTextDecoder.load(tiny_demo.decoder_card)
    ckpt = FrozenTextDecoder.load(tiny_demo.decoder_card)
    assert perf.checkpoint_decoder_layers(ckpt.model) == len(ckpt.model.decoder.layers)
    torch.manual_seed(2)
    emb = torch.randn(4, plain.embedding_dim, requires_grad=True)
    a = plain.loss(emb, TEXTS, label_smoothing=0.1)
    (g_a,) = torch.autograd.grad(a.loss, emb)
    b = ckpt.loss(emb, TEXTS, label_smoothing=0.1)
    (g_b,) = torch.autograd.grad(b.loss, emb)
    assert float(b.loss.detach()) == pytest.approx(float(a.loss.detach()), rel=1e-6)
    assert rel_err(g_b, g_a) < 1e-5
    assert ckpt.generate(emb.detach(), beam_size=2) == plain.generate(emb.detach(), beam_size=2)


# -- batched beam search ------------------------------------------------------------------------
def test_batched_decoding_equals_one_clip_at_a_time(tiny_demo, decoder):
    from sonar_ft.models.text_encoder import FrozenTextEncoder

    refs = [row.text for row in read_manifest(tiny_demo.split_manifest("val"))]
    emb = FrozenTextEncoder.load(tiny_demo.text_encoder_card).embed(refs)
    emb = emb + 0.05 * torch.randn(emb.shape, generator=torch.Generator().manual_seed(0))  # imperfect, like an encoder's
    one_by_one = decoder.generate(emb, beam_size=3, batch_size=1)
    batched = decoder.generate(emb, beam_size=3, batch_size=len(refs))
    assert batched == one_by_one
    assert len(set(batched)) > 1  # real sentences, not one degenerate output


# -- feature cache ------------------------------------------------------------------------------
def test_recipe_feature_cache_returns_the_same_features(tiny_demo):
    store = FeatureStore.open(tiny_demo.split_features("val"))
    rows = read_manifest(tiny_demo.split_manifest("val"))
    plain = SignFeatureDataset(store, rows, progress=False)
    cfg32 = config_from_sources({"cache_features": True})
    cfg16 = config_from_sources({"cache_features": True, "cache_dtype": "fp16"})
    cached32 = SignFeatureDataset(store, rows, progress=False, **splits.feature_cache(cfg32))
    cached16 = SignFeatureDataset(store, rows, progress=False, **splits.feature_cache(cfg16))
    for i in range(len(rows)):
        ref = plain[i].features
        for _ in range(2):  # first read fills the cache, the second is served from it
            assert torch.equal(cached32[i].features, ref)
            torch.testing.assert_close(cached16[i].features, ref, rtol=1e-3, atol=1e-3)
    assert len(cached16._cache) == len(rows) and cached16._cache[0].dtype == torch.float16
    assert splits.feature_cache(config_from_sources({})) == {}


@pytest.mark.parametrize("cache", [True, False])
def test_recipe_reads_each_feature_file_once_with_the_cache(tiny_demo, tmp_path, npy_reads, cache):
    """The bad-sample scan reads every file anyway: its frame counts (and, when caching, the features)
    are kept, so neither the dataset's length pass nor epoch 1 opens a file again."""
    reads = npy_reads
    flags = ["--batch_size", "8", "--epochs", "2", "--max_samples", "16", "--max_gen_len", "8"]
    out = tmp_path / "run"
    assert recipe.main(recipe_args(tiny_demo, out, *flags, *(["--cache_features"] if cache else []))) == 0
    assert reads and not [k for k in reads if k[1] == "header"]  # no separate pass for the lengths
    # Cached: the scan's read is the only one. Not cached: the scan, then once per epoch, plus one
    # read of a single clip per split by the feature-dimension check.
    expected = 1 if cache else 3
    extra = {k: n for k, n in reads.items() if n != expected}
    assert len(reads) == 32 and (not extra if cache else list(extra.values()) == [expected + 1] * 2), reads
    assert json.loads((out / "metrics_epoch2.json").read_text())["train_loss"] > 0


# -- frozen decoder in bf16 ---------------------------------------------------------------------
def test_bf16_decoder_loss_is_close_to_fp32_and_encoder_still_learns(tiny_demo, decoder):
    half = FrozenTextDecoder.load(tiny_demo.decoder_card, dtype=device_mod.decoder_dtype("bf16", torch.device("cpu")))
    assert half.dtype == torch.bfloat16
    encoder, _ = load_encoder(tiny_demo.encoder_checkpoint)
    encoder.train()
    feats = torch.randn(4, 9, encoder.config.feature_dim, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(4, 9, dtype=torch.bool)
    emb = encoder(feats, mask)
    ref = decoder.loss(emb, TEXTS, label_smoothing=0.1)
    out = half.loss(emb, TEXTS, label_smoothing=0.1)
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=2e-2)
    out.loss.backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert encoder.projection_out.weight.grad.abs().sum() > 0


def test_fp16_decoder_gradients_survive_only_with_loss_scaling(tiny_demo, decoder):
    """Through an fp16 decoder, small gradients (a mean over thousands of tokens) underflow unless scaled.

    The loss is multiplied by 1e-5 to give per-element gradients the size a real batch gives
    (~1e-7 here); the fp16 decoder is loaded directly since the recipe allows it on GPUs only.
    """
    half = FrozenTextDecoder.load(tiny_demo.decoder_card, dtype=torch.float16)
    emb0 = 0.1 * torch.randn(4, decoder.embedding_dim, generator=torch.Generator().manual_seed(0))

    def grad(dec: FrozenTextDecoder, scaler: torch.amp.GradScaler) -> torch.Tensor:
        emb = emb0.clone().requires_grad_(True)
        scaler.scale(dec.loss(emb, TEXTS).loss * 1e-5).backward()
        return emb.grad / scaler.get_scale() if scaler.is_enabled() else emb.grad

    off = perf.grad_scaler("bf16", torch.device("cpu"))
    on = perf.grad_scaler("fp16", torch.device("cpu"))
    assert not off.is_enabled() and on.is_enabled() and on.get_scale() == 2.0**16
    reference = grad(decoder, off)  # fp32 decoder
    unscaled, scaled = grad(half, off), grad(half, on)
    assert rel_err(unscaled, reference) > 0.1  # fp16 loses them...
    assert rel_err(scaled, reference) < 0.02  # ...scaling keeps them (fp16 weights and activations: ~5e-3)


def test_no_weight_decay_on_norms_biases_and_the_shared_embedding():
    encoder = SignT5SonarEncoder(SMALL)
    encoder.freeze_encoder_layers(1)
    groups = perf.parameter_groups(encoder, 0.1)
    names = {id(p): n for n, p in encoder.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.1, 0.0)
    assert {"shared.weight", "encoder.final_layer_norm.weight", "encoder.feature_projection.feature_proj.bias"} - no_decay \
        == {"encoder.feature_projection.feature_proj.bias"}  # frozen with block 0: in no group
    assert "projection_out.weight" in decay and "encoder.block.1.layer.1.DenseReluDense.wi_0.weight" in decay
    assert not any(n.startswith(("encoder.block.0.", "encoder.feature_projection.")) for n in decay | no_decay)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable and not decay & no_decay


def test_adamw_steps_leave_unused_embedding_rows_exactly_as_loaded():
    torch.manual_seed(0)
    encoder = SignT5SonarEncoder(SMALL)
    before = encoder.shared.weight.detach().clone()
    optimizer = perf.build_optimizer(perf.parameter_groups(encoder, 0.5), "adamw", lr=1e-2, weight_decay=0.5,
                                     device=torch.device("cpu"))
    for _ in range(3):
        encoder(torch.randn(2, 5, SMALL.feature_dim)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = encoder.shared.weight.detach()
    assert not torch.equal(after[0], before[0])  # the start token's row learns
    assert torch.equal(after[1:], before[1:])  # the other rows: no gradient, no decay


# -- the flags' errors --------------------------------------------------------------------------
def test_fp16_decoder_is_refused_on_cpu():
    with pytest.raises(ConfigError, match="--decoder_dtype fp16 .*bf16"):
        device_mod.decoder_dtype("fp16", torch.device("cpu"))


def test_8bit_adamw_needs_cuda():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="--optimizer adamw8bit needs a CUDA GPU"):
        perf.build_optimizer(p, "adamw8bit", lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))


def test_8bit_adamw_without_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        perf.build_optimizer(p, "adamw8bit", lr=1e-3, weight_decay=0.0, device=torch.device("cuda"))


def test_unknown_memory_flag_values_are_refused():
    for flags, match in (({"optimizer": "sgd"}, "--optimizer"), ({"decoder_dtype": "int8"}, "--decoder_dtype"),
                         ({"cache_dtype": "bf16"}, "--cache_dtype"), ({"freeze_encoder_layers": -1}, "--freeze_encoder_layers")):
        cfg = config_from_sources({"encoder_checkpoint": "e", "val_features": "v", "val_manifest": "m", "eval_only": True, **flags})
        with pytest.raises(ConfigError, match=match):
            cfg.validate()


# -- the recipe with the memory flags -----------------------------------------------------------
@pytest.mark.slow
def test_recipe_with_memory_flags_trains_and_keeps_frozen_layers(tiny_demo, tmp_path):
    out = tmp_path / "run"
    flags = ["--batch_size", "8", "--epochs", "1", "--max_samples", "16", "--learning_rate", "1e-2",
             "--gradient_checkpointing", "--decoder_dtype", "bf16", "--freeze_encoder_layers", "1",
             "--optimizer", "adamw", "--cache_features", "--cache_dtype", "fp16"]
    assert recipe.main(recipe_args(tiny_demo, out, *flags)) == 0
    settings = json.loads((out / "config.json").read_text())["settings"]
    assert settings["gradient_checkpointing"] and settings["cache_features"] and settings["decoder_dtype"] == "bf16"
    start = load_encoder(tiny_demo.encoder_checkpoint)[0].state_dict()
    tuned = load_encoder(out / "best_encoder.pt")[0].state_dict()
    frozen = [k for k in start if k.startswith(("encoder.block.0.", "encoder.feature_projection."))]
    assert frozen and all(torch.equal(start[k], tuned[k]) for k in frozen)
    assert not torch.equal(start["projection_out.weight"], tuned["projection_out.weight"])  # the rest learned
