"""Resolving SONAR models/tokenizers: card names, local cards, bare files, shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sonar_ft.models import assets
from sonar_ft.config import config_from_sources
from sonar_ft.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


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


def test_unknown_card_name_says_so_without_a_network_hint():
    import torch

    with pytest.raises(ConfigError, match="not a card name fairseq2 / sonar-space knows") as err:
        assets.load_sonar_model("no_such_card_anywhere", family=assets.DECODER_FAMILY, device=torch.device("cpu"), dtype=None)
    assert "network" not in str(err.value) and "ModelNotKnownError" in str(err.value)


def _failing_load(monkeypatch, error):
    import fairseq2.models

    def load_model(*args, **kwargs):
        try:
            raise error
        except Exception as exc:
            raise RuntimeError("model could not be loaded") from exc

    monkeypatch.setattr(fairseq2.models, "load_model", load_model)


def test_a_broken_install_keeps_its_real_cause_and_no_network_hint(monkeypatch):
    # Colab 3.12 runtimes: torch downgraded, torchvision left built for another torch.
    _failing_load(monkeypatch, RuntimeError("operator torchvision::nms does not exist"))
    with pytest.raises(ConfigError) as err:
        assets.load_sonar_model("text_sonar_basic_decoder", family=assets.DECODER_FAMILY, device=None, dtype=None)
    assert "operator torchvision::nms does not exist" in str(err.value) and "network" not in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)


def test_a_network_failure_gets_the_offline_hint(monkeypatch):
    import urllib.error

    _failing_load(monkeypatch, urllib.error.URLError("[Errno -3] Temporary failure in name resolution"))
    with pytest.raises(ConfigError, match="Without network access, pass a local asset card") as err:
        assets.load_sonar_model("text_sonar_basic_decoder", family=assets.DECODER_FAMILY, device=None, dtype=None)
    assert "name resolution" in str(err.value)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_run_configs_are_valid(path):
    cfg = config_from_sources({}, path)
    assert cfg.train_manifest and cfg.encoder_checkpoint
