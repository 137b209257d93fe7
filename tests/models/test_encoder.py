"""Tests for sonar_ft.models.encoder: official layout, T5 reference equivalence, masking, checkpoints."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from sonar_ft.models import encoder as encoder_module
from sonar_ft.models.encoder import (
    SignT5Config,
    SignT5SonarEncoder,
    count_parameters,
    extract_state_dict,
    infer_config,
    load_encoder,
    official_key_shapes,
    save_encoder,
)
from sonar_ft.errors import CheckpointError, ConfigError
from tests.numerics import assert_close_to_scale

TINY = SignT5Config(
    feature_dim=12,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=2,
    vocab_size=10,
    output_dim=16,
    dropout=0.1,
)

# A different, odd size: proves the architecture is inferred from the weights, not assumed.
ODD = SignT5Config(
    feature_dim=10,
    d_model=24,
    d_kv=6,
    d_ff=40,
    num_heads=3,
    num_encoder_layers=3,
    num_decoder_layers=1,
    num_buckets=16,
    vocab_size=7,
    output_dim=12,
    gated=False,
)


def make_model(config: SignT5Config, seed: int = 0) -> SignT5SonarEncoder:
    """A model with every weight random (norms and scales too, so that each one matters)."""
    torch.manual_seed(seed)
    model = SignT5SonarEncoder(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight") or name.endswith("feature_proj_scale"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("feature_proj.bias"):
                p.normal_(std=0.1)
    return model.eval()


def padded_batch(lengths: list[int], dim: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (B, T, dim) with garbage (not zeros) in the padding, and the mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    features = torch.randn(len(lengths), T, dim, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    features[~mask] = 100.0 * torch.randn(int((~mask).sum()), dim, generator=g)
    return features, mask


# ---------------------------------------------------------------------------------------------
# 1. The official layout
# ---------------------------------------------------------------------------------------------


def test_default_architecture_has_exactly_the_official_keys_and_shapes() -> None:
    config = SignT5Config()
    with torch.device("meta"):
        model = SignT5SonarEncoder(config)
    expected = official_key_shapes(config)
    state = model.state_dict()

    assert len(expected) == 563
    assert set(state) == set(expected)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # A state dict of exactly those keys and shapes loads strictly.
    official = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    model.load_state_dict(official, strict=True, assign=True)
    assert 817e6 <= count_parameters(model, include_tied_copies=True) <= 819e6
    assert 751e6 <= count_parameters(model, include_tied_copies=False) <= 753e6


def test_tied_embeddings_are_one_parameter() -> None:
    model = SignT5SonarEncoder(TINY)
    assert model.encoder.embed_tokens.weight is model.shared.weight
    assert model.decoder.embed_tokens.weight is model.shared.weight


# ---------------------------------------------------------------------------------------------
# 2. Equivalence with the Hugging Face T5 stacks the reference implementation is built from
# ---------------------------------------------------------------------------------------------


class _ReferenceFeatureProjection(nn.Module):
    def __init__(self, feature_dim: int, d_model: int):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, d_model)
        self.feature_proj_scale = nn.Parameter(torch.ones(d_model))


class _Reference(nn.Module):
    """ssvp_slt's construction: HF T5Stack encoder fed projected features + one-token decoder."""

    def __init__(self, config: SignT5Config):
        super().__init__()
        from transformers import T5Config
        from transformers.models.t5.modeling_t5 import T5Stack

        common = dict(
            vocab_size=config.vocab_size,
            d_model=config.d_model,
            d_kv=config.d_kv,
            d_ff=config.d_ff,
            num_heads=config.num_heads,
            relative_attention_num_buckets=config.num_buckets,
            relative_attention_max_distance=config.max_distance,
            dropout_rate=config.dropout,
            layer_norm_epsilon=config.layer_norm_eps,
            feed_forward_proj="gated-gelu" if config.gated else "relu",
            use_cache=False,
            is_encoder_decoder=False,
        )
        enc_cfg = T5Config(num_layers=config.num_encoder_layers, is_decoder=False, **common)
        dec_cfg = T5Config(num_layers=config.num_decoder_layers, is_decoder=True, **common)
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(enc_cfg, self.shared)
        # Registered on the HF stack so the keys read encoder.feature_projection.*, as officially.
        self.encoder.feature_projection = _ReferenceFeatureProjection(config.feature_dim, config.d_model)
        self.decoder = T5Stack(dec_cfg, self.shared)
        self.projection_out = nn.Linear(config.d_model, config.output_dim, bias=False)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        fp = self.encoder.feature_projection
        embeds = fp.feature_proj(features) * fp.feature_proj_scale
        encoded = self.encoder(inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False)[0]
        start = torch.zeros(features.shape[0], 1, dtype=torch.long)
        out = self.decoder(
            input_ids=start,
            encoder_hidden_states=encoded,
            encoder_attention_mask=mask.long(),
            use_cache=False,
        )[0]
        return self.projection_out(out[:, 0])


@pytest.mark.parametrize("gated", [True, False], ids=["gated-gelu", "relu"])
def test_matches_hugging_face_t5_reference_on_padded_batch(gated: bool) -> None:
    config = dataclasses.replace(TINY, gated=gated)
    torch.manual_seed(0)
    reference = _Reference(config)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("layer_norm.weight") or name.endswith("feature_proj_scale"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(std=0.3)
    reference.eval()
    ours = SignT5SonarEncoder(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)

    # T=150 > max_distance=128 reaches the far, shared buckets in both directions.
    features, mask = padded_batch([150, 97, 3, 129], config.feature_dim)
    with torch.no_grad():
        expected = reference(features, mask)
        got = ours(features, mask)
    assert expected.abs().mean() > 0.1  # a meaningful signal, not near-zero outputs
    assert_close_to_scale(got, expected)


# ---------------------------------------------------------------------------------------------
# 3. Padding
# ---------------------------------------------------------------------------------------------


def test_embedding_alone_equals_embedding_in_padded_batch() -> None:
    model = make_model(TINY)
    features, mask = padded_batch([40, 150, 7], TINY.feature_dim)
    with torch.no_grad():
        batch = model(features, mask)
        for i, length in enumerate([40, 150, 7]):
            alone = model(features[i : i + 1, :length])
            assert_close_to_scale(batch[i : i + 1], alone)


def test_bfloat16_padded_batch_is_finite_and_close_to_float32() -> None:
    model = make_model(TINY)
    features, mask = padded_batch([60, 9], TINY.feature_dim)
    with torch.no_grad():
        full = model(features, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(features, mask)
        cast = model.to(torch.bfloat16)(features, mask)
    for out in (autocast, cast):
        assert torch.isfinite(out).all()
        assert (out.float() - full).abs().max() < 0.1 * full.abs().max()


# ---------------------------------------------------------------------------------------------
# 4. Loading checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def odd_model() -> SignT5SonarEncoder:
    return make_model(ODD, seed=3)


def _assert_same_outputs(a: SignT5SonarEncoder, b: SignT5SonarEncoder, config: SignT5Config) -> None:
    features, mask = padded_batch([20, 5], config.feature_dim)
    with torch.no_grad():
        assert torch.equal(a.eval()(features, mask), b.eval()(features, mask))


@pytest.mark.parametrize("container", ["student", "model", "model_state", "state_dict", None])
def test_official_layout_loads_strictly_with_inferred_architecture(
    tmp_path: Path, odd_model: SignT5SonarEncoder, container: str | None
) -> None:
    state = odd_model.state_dict()
    path = tmp_path / "ckpt.pt"
    torch.save(state if container is None else {container: state}, path)

    model, config = load_encoder(path, dropout=0.0)

    assert config == dataclasses.replace(ODD, dropout=0.0)
    _assert_same_outputs(model, odd_model, ODD)


def test_infer_config_reads_every_inferable_field(odd_model: SignT5SonarEncoder) -> None:
    assert infer_config(odd_model.state_dict()) == dataclasses.replace(ODD, dropout=SignT5Config.dropout)


def test_ddp_prefix_legacy_names_and_extra_entries_load(
    tmp_path: Path, odd_model: SignT5SonarEncoder
) -> None:
    legacy = {
        "encoder.feature_projection.feature_proj.weight": "encoder.feature_proj.weight",
        "encoder.feature_projection.feature_proj.bias": "encoder.feature_proj.bias",
        "encoder.feature_projection.feature_proj_scale": "encoder.feature_proj_scale",
    }
    state = {"module." + legacy.get(k, k): v for k, v in odd_model.state_dict().items()}
    state["module.num_updates"] = 1200  # non-tensor entries inside the weights are ignored
    path = tmp_path / "legacy.pt"
    torch.save({"student": state, "args": {"lr": 1e-4, "name": "run"}, "epoch": 3}, path)

    model, config = load_encoder(path)

    assert config.num_encoder_layers == 3 and not config.gated
    _assert_same_outputs(model, odd_model, ODD)


def test_missing_tied_copies_are_filled_from_shared(tmp_path: Path, odd_model: SignT5SonarEncoder) -> None:
    state = odd_model.state_dict()
    del state["encoder.embed_tokens.weight"], state["decoder.embed_tokens.weight"]
    path = tmp_path / "dedup.pt"
    torch.save(state, path)
    model, _ = load_encoder(path)
    _assert_same_outputs(model, odd_model, ODD)


def test_non_encoder_checkpoint_names_what_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "classifier.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(path)
    message = str(info.value)
    assert str(path) in message and "encoder.block.0" in message and "fc.weight" in message


def test_incomplete_encoder_names_the_missing_key(tmp_path: Path, odd_model: SignT5SonarEncoder) -> None:
    state = odd_model.state_dict()
    del state["projection_out.weight"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="projection_out.weight") as info:
        load_encoder(path)
    assert str(path) in str(info.value)


def test_extract_state_dict_rejects_non_mapping() -> None:
    with pytest.raises(CheckpointError, match="list"):
        extract_state_dict([torch.zeros(1)], "weights.pt")


def test_truncated_checkpoint_raises_checkpoint_error(tmp_path: Path, odd_model: SignT5SonarEncoder) -> None:
    path = tmp_path / "truncated.pt"
    save_encoder(odd_model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_encoder(path)
    assert str(path) in str(info.value)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path: Path, odd_model: SignT5SonarEncoder) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"student": odd_model.state_dict(), "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_encoder(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 5. Saving
# ---------------------------------------------------------------------------------------------


def test_save_then_load_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    model = make_model(dataclasses.replace(TINY, max_distance=64, dropout=0.2))
    path = tmp_path / "out" / "encoder.pt"
    save_encoder(model, path, extra={"step": 7})

    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"student", "config", "step"}
    assert set(raw["student"]) == set(official_key_shapes(model.config))
    loaded, config = load_encoder(path)

    assert config == model.config  # including max_distance / dropout, which shapes cannot tell
    assert not loaded.training
    _assert_same_outputs(loaded, model, model.config)
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["encoder.pt"]  # no temp files


def test_save_refuses_extra_that_would_overwrite_weights(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="student"):
        save_encoder(make_model(TINY), tmp_path / "x.pt", extra={"student": {}})


# ---------------------------------------------------------------------------------------------
# 6. Gradient checkpointing and freezing
# ---------------------------------------------------------------------------------------------


def _loss_and_grads(model: SignT5SonarEncoder) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    features, mask = padded_batch([30, 11], TINY.feature_dim)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # same dropout masks in both runs
    loss = model(features, mask).pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_same_loss_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model(TINY).train()  # dropout 0.1 active: checkpointing must replay the same masks
    plain_loss, plain_grads = _loss_and_grads(model)

    calls = []
    real_checkpoint = encoder_module.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(encoder_module, "checkpoint", counting_checkpoint)
    model.gradient_checkpointing = True
    ckpt_loss, ckpt_grads = _loss_and_grads(model)

    assert len(calls) == TINY.num_encoder_layers + TINY.num_decoder_layers
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=0, rtol=0)
    assert ckpt_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        assert_close_to_scale(ckpt_grads[name], plain_grads[name], msg=name)


def test_freeze_encoder_layers_freezes_projection_and_lowest_blocks() -> None:
    model = make_model(TINY).train()
    model.freeze_encoder_layers(1)

    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    lowest = ("encoder.feature_projection.", "encoder.block.0.")
    expected = {n for n, _ in model.named_parameters() if n.startswith(lowest)}
    assert frozen == expected and expected
    _, grads = _loss_and_grads(model)
    assert not frozen & grads.keys()
    assert "encoder.block.1.layer.0.SelfAttention.q.weight" in grads


def test_freeze_zero_layers_freezes_nothing_and_too_many_is_an_error() -> None:
    model = make_model(TINY)
    model.freeze_encoder_layers(0)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="2"):
        model.freeze_encoder_layers(3)
