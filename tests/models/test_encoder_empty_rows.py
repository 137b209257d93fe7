"""The encoder's public call refuses a batch row whose mask is all padding: pooling over no frames has no meaning."""

from __future__ import annotations

import pytest
import torch

from sonar_ft.errors import DataError
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder

CONFIG = SignT5Config(feature_dim=6, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_encoder_layers=1,
                      num_decoder_layers=1, vocab_size=10, output_dim=8)


@pytest.fixture()
def model() -> SignT5SonarEncoder:
    torch.manual_seed(0)
    return SignT5SonarEncoder(CONFIG).eval()


def test_a_row_whose_mask_is_all_padding_is_refused_naming_it(model):
    features = torch.randn(3, 5, CONFIG.feature_dim)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False  # a 0-frame clip padded into the batch by hand
    with pytest.raises(DataError, match=r"^batch row\(s\) 1 of 3 have no real frame \(their mask is all padding\)"):
        model(features, mask)


def test_a_batch_of_zero_frames_is_refused(model):
    with pytest.raises(DataError, match=r"batch row\(s\) 0, 1 of 2 have no real frame"):
        model(torch.randn(2, 0, CONFIG.feature_dim))


def test_rows_with_at_least_one_frame_are_embedded(model):
    mask = torch.tensor([[True, False, False], [True, True, True]])
    with torch.no_grad():
        out = model(torch.randn(2, 3, CONFIG.feature_dim), mask)
    assert out.shape == (2, CONFIG.output_dim) and bool(torch.isfinite(out).all())
