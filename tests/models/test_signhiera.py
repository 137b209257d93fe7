"""Tests for sonar_ft.models.signhiera: parity with the hiera-transformer package, padded-window masking
against a reference written here (explicit -inf key masks in hiera's own token order), checkpoints."""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sonar_ft.errors import CheckpointError, ConfigError
from sonar_ft.models.signhiera import (
    SignHiera,
    SignHieraConfig,
    load_signhiera,
    save_signhiera,
    tiny_config,
)
from tests.numerics import assert_close_to_scale

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # timm's deprecation notice on import
    hiera = pytest.importorskip("hiera")

# The official module tree (hiera_base_128x224: embed 96, 1 head, stages 2-3-16-3, q_pool 3), built by the
# hiera-transformer package; SMALL_INPUT keeps every weight at its official shape except the position
# embeddings, so a CPU forward takes seconds instead of minutes.
OFFICIAL_ARGS = dict(q_stride=(1, 2, 2), mask_unit_size=(1, 8, 8), patch_kernel=(3, 7, 7), patch_stride=(2, 4, 4),
                     patch_padding=(1, 3, 3), sep_pos_embed=True, num_classes=400)
SMALL_INPUT = (16, 64, 64)


def reference_model(input_size: tuple[int, int, int], seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return hiera.Hiera(input_size=input_size, **OFFICIAL_ARGS).eval()


def ours_from(ref: torch.nn.Module) -> SignHiera:
    state = ref.state_dict()
    model = SignHiera(SignHieraConfig.from_state_dict(state)).eval()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(("head.", "norm."))}, strict=True)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[torch.nn.Module, SignHiera]:
    ref = reference_model(SMALL_INPUT)
    return ref, ours_from(ref)


# ---------------------------------------------------------------------------------------------
# A padded-window reference, written here on top of hiera's modules: the padding mask is built per
# mask unit, unrolled with hiera's own Unroll, max-pooled like the tokens, and applied as an explicit
# additive -inf key mask in a hand-written softmax (no scaled_dot_product_attention).
# ---------------------------------------------------------------------------------------------


def _attention_with_key_mask(attn: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    b, n, _ = x.shape
    windows = n // (attn.q_stride * attn.window_size) if attn.use_mask_unit_attn else 1
    qkv = attn.qkv(x).reshape(b, -1, windows, 3, attn.heads, attn.head_dim).permute(3, 0, 4, 2, 1, 5)
    q, k, v = qkv[0], qkv[1], qkv[2]
    if attn.q_stride > 1:
        q = q.view(b, attn.heads, windows, attn.q_stride, -1, attn.head_dim).max(dim=3).values
    logits = (q * attn.scale) @ k.transpose(-1, -2)
    if not attn.use_mask_unit_attn:  # global attention: padded keys get -inf
        logits = logits + torch.zeros(b, 1, 1, 1, n).masked_fill(~valid.view(b, 1, 1, 1, n), -math.inf)
    out = (logits.softmax(dim=-1) @ v).transpose(1, 3).reshape(b, -1, attn.dim_out)
    return attn.proj(out)


def reference_padded_features(ref: torch.nn.Module, x: torch.Tensor, padding: list[int]) -> list[torch.Tensor]:
    from hiera.hiera_utils import do_pool

    b = x.shape[0]
    units_t, units_h, units_w = ref.mask_spatial_shape
    keep = torch.ones(b, units_t, units_h, units_w)
    padded_units = [p // (ref.mask_unit_size[0] * 2) for p in padding]  # 2 = the temporal patch stride
    for i, n in enumerate(padded_units):
        if n:
            keep[i, -n:] = 0
    x = x * F.interpolate(keep[:, None], size=x.shape[2:]).bool()  # frames under padded units are zeroed
    tokens = ref.unroll(ref.patch_embed(x) + ref.get_pos_embed())
    valid = keep
    for axis, size in enumerate(ref.mask_unit_size):
        valid = valid.repeat_interleave(size, dim=axis + 1)
    valid = ref.unroll(valid.reshape(b, -1, 1)).bool()  # (B, N, 1) in hiera's token order
    with torch.no_grad():
        for blk in ref.blocks:
            x_norm = blk.norm1(tokens)
            if blk.dim != blk.dim_out:
                tokens = do_pool(blk.proj(x_norm), stride=blk.attn.q_stride)
            tokens = tokens + _attention_with_key_mask(blk.attn, x_norm, valid)
            tokens = tokens + blk.mlp(blk.norm2(tokens))
            if blk.attn.q_stride > 1:
                valid = valid.view(b, blk.attn.q_stride, -1, 1).amax(dim=1)
        grid = ref.reroll(tokens, len(ref.blocks) - 1)  # (B, T, H, W, C)
    features = grid.mean(dim=(2, 3))
    return [f[: f.shape[0] - n] for f, n in zip(features, padded_units)]


# ---------------------------------------------------------------------------------------------


def test_unpadded_windows_equal_the_hiera_package(pair) -> None:
    ref, ours = pair
    x = torch.randn(2, 3, *SMALL_INPUT)
    with torch.no_grad():
        _, intermediates = ref(x, return_intermediates=True)
    expected = intermediates[-1].mean(dim=(2, 3))  # (B, 8, 768)
    got = ours.extract(x)
    assert [tuple(g.shape) for g in got] == [(8, 768), (8, 768)]
    assert_close_to_scale(torch.stack(got), expected)


@pytest.mark.parametrize("padding", [[0, 2, 3, 9], [15, 1, 6, 0]])
def test_padded_windows_equal_an_explicit_key_mask_reference(pair, padding: list[int]) -> None:
    ref, ours = pair
    x = torch.randn(len(padding), 3, *SMALL_INPUT)
    expected = reference_padded_features(ref, x, padding)
    got = ours.extract(x, padding)
    for p, g, e in zip(padding, got, expected):
        assert g.shape == (8 - p // 2, 768)  # one vector per two frames; padded ones dropped
        assert_close_to_scale(g, e)


def test_padded_vectors_do_not_depend_on_what_the_padding_holds() -> None:
    torch.manual_seed(0)
    model = SignHiera(tiny_config()).init_weights(torch.Generator().manual_seed(1)).eval()
    x = torch.randn(1, 3, 128, 32, 32)
    noisy = x.clone()
    noisy[:, :, -40:] = torch.randn(1, 3, 40, 32, 32) * 5
    (a,), (b,) = model.extract(x, [40]), model.extract(noisy, [40])
    assert a.shape == (44, 64)
    assert_close_to_scale(b, a)
    (unmasked,) = model.extract(noisy, [0])  # without the mask the padding leaks into every vector
    assert (unmasked[:44] - a).abs().max() > 1e-3


def test_a_window_gives_the_same_vectors_alone_and_in_a_padded_batch() -> None:
    model = SignHiera(tiny_config()).init_weights(torch.Generator().manual_seed(2)).eval()
    x = torch.randn(3, 3, 128, 32, 32)
    batch = model.extract(x, [0, 17, 126])
    alone = [model.extract(x[i: i + 1], [p])[0] for i, p in enumerate([0, 17, 126])]
    assert [len(v) for v in batch] == [64, 56, 1]
    for b, a in zip(batch, alone):
        assert_close_to_scale(b, a)


def test_official_checkpoint_layout_loads_and_its_architecture_is_read_from_the_tensors(tmp_path: Path) -> None:
    ref = reference_model((128, 224, 224))  # the official module tree and size, random weights
    path = tmp_path / "dm_70h_ub_signhiera.pth"
    torch.save({"model": ref.state_dict(), "epoch": 10}, path)  # as the official file keeps them
    model = load_signhiera(path)
    assert model.config == SignHieraConfig()  # the official defaults
    assert model.config.input_size == (128, 224, 224) and model.config.feature_dim == 768
    assert 50e6 < sum(p.numel() for p in model.parameters()) < 52e6
    assert torch.equal(model.blocks[23].mlp.fc2.weight, ref.blocks[23].mlp.fc2.weight)


def test_small_checkpoints_load_with_overrides_of_what_tensors_cannot_tell(tmp_path: Path) -> None:
    config = tiny_config(num_heads=2, q_pool=2)
    model = SignHiera(config).init_weights(torch.Generator().manual_seed(0))
    save_signhiera(model, tmp_path / "small.pth")
    loaded = load_signhiera(tmp_path / "small.pth", num_heads=2, q_pool=2)
    assert loaded.config == config
    x = torch.randn(1, 3, 128, 32, 32)
    assert_close_to_scale(loaded.extract(x)[0], model.eval().extract(x)[0])
    with pytest.raises(ConfigError, match="cannot override.*embed_dim"):
        load_signhiera(tmp_path / "small.pth", embed_dim=16)
    with pytest.raises(ConfigError, match="not divisible into 3 heads"):
        load_signhiera(tmp_path / "small.pth", num_heads=3)


def test_files_that_are_not_a_signhiera_get_a_clear_error(tmp_path: Path) -> None:
    encoder_like = tmp_path / "encoder.pt"
    torch.save({"model": {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(2, 2),
                          "projection_out.weight": torch.zeros(2, 2)}}, encoder_like)
    with pytest.raises(CheckpointError, match="not a SignHiera.*SONAR ASL encoder"):
        load_signhiera(encoder_like)
    image = tmp_path / "image_hiera.pth"
    torch.save({"model_state": hiera.Hiera(embed_dim=8, stages=(1, 1), q_pool=1, input_size=(64, 64)).state_dict()}, image)
    with pytest.raises(CheckpointError, match="not a SignHiera.*one joint position embedding"):
        load_signhiera(image)
    html = tmp_path / "page.pth"
    html.write_text("<!doctype html><html>sign in</html>")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint.*HTML"):
        load_signhiera(html)


def test_a_truncated_block_list_names_the_missing_weights(tmp_path: Path) -> None:
    model = SignHiera(tiny_config()).init_weights()
    state = model.state_dict()
    del state["blocks.4.mlp.fc1.weight"]
    torch.save({"model": state}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="lacks 1 SignHiera weights.*blocks.4.mlp.fc1.weight"):
        load_signhiera(tmp_path / "cut.pth")
    del state["blocks.3.mlp.fc1.weight"]  # a stage's first block: read for the architecture
    torch.save({"model": state}, tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="lacks the SignHiera weight blocks.3.mlp.fc1.weight"):
        load_signhiera(tmp_path / "cut.pth")


def test_padding_outside_the_window_is_refused() -> None:
    model = SignHiera(tiny_config()).eval()
    with pytest.raises(ValueError, match="padding must be in"):
        model.extract(torch.zeros(1, 3, 128, 32, 32), [128])


def test_padded_vector_count_follows_the_mask_units() -> None:
    config = SignHieraConfig()
    assert [config.padded_vectors(p) for p in (0, 1, 2, 3, 126, 127)] == [0, 0, 1, 1, 63, 63]
    assert dataclasses.replace(config, mask_unit_size=(2, 8, 8)).padded_vectors(7) == 2  # whole units only
