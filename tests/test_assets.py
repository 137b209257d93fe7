"""Resolving SONAR models/tokenizers: card names, local cards, bare files, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sonar_ft import assets
from sonar_ft.config import config_from_sources
from sonar_ft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_official_decoder_uses_the_text_encoder_tokenizer():
    assert assets.default_tokenizer_for("text_sonar_basic_decoder") == "text_sonar_basic_encoder"
    assert assets.default_tokenizer_for("/drive/sonar_text_decoder.pt") == "text_sonar_basic_encoder"
    assert assets.default_tokenizer_for("cards/my_decoder.yaml") == "cards/my_decoder.yaml"


def test_flores200_language_list_comes_from_sonar_space():
    langs = assets.flores200_langs()
    assert len(langs) >= 200 and {"eng_Latn", "fra_Latn", "zho_Hans"} <= set(langs)


def test_local_card_resolves_relative_files_against_its_folder(tmp_path):
    card = tmp_path / "cards" / "dec.yaml"
    card.parent.mkdir()
    card.write_text("name: dec\nmodel_family: transformer_decoder\ncheckpoint: ../weights/dec.pt\ntokenizer: tok.model\n")
    meta = assets.read_card_file(card)
    assert meta["checkpoint"] == (tmp_path / "weights" / "dec.pt").as_uri()
    assert meta["tokenizer"] == (tmp_path / "cards" / "tok.model").as_uri()


def test_card_without_name_is_refused(tmp_path):
    card = tmp_path / "bad.yaml"
    card.write_text("model_family: transformer_decoder\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        assets.read_card_file(card)


def test_bare_checkpoint_is_wrapped_as_the_official_architecture(tmp_path):
    ckpt = tmp_path / "sonar_text_decoder.pt"
    ckpt.write_bytes(b"x")
    card = assets.resolve_card(ckpt, family=assets.DECODER_FAMILY, kind="model")
    assert card.metadata["model_arch"] == "basic" and card.metadata["checkpoint"] == ckpt.as_uri()


def test_unreachable_card_name_gives_an_offline_hint():
    with pytest.raises(ConfigError, match="local asset card"):
        assets.load_sonar_model("no_such_card_anywhere", family=assets.DECODER_FAMILY, device="cpu", dtype=None)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_are_valid(path):
    cfg = config_from_sources({}, path)
    assert cfg.train_manifest and cfg.encoder_checkpoint
