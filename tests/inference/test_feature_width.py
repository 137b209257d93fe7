"""Features of another width than the encoder's input: --eval_only, embed and translate say what training says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sonar_ft import cli
from sonar_ft.config import TrainConfig
from sonar_ft.errors import DataError
from sonar_ft.evaluate import evaluate_checkpoint
from sonar_ft.inference.translate import translate
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder, save_encoder

CONFIG = SignT5Config(feature_dim=12, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_encoder_layers=1,
                      num_decoder_layers=1, vocab_size=10, output_dim=8)
WIDTH = 10  # the features' width: another extractor's


def training_message(features: Path) -> str:
    """The start of the message training gives (sonar_ft.data.splits.check_feature_dim)."""
    return f"the clips in {features} have {WIDTH} features per frame"


@pytest.fixture()
def encoder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    save_encoder(SignT5SonarEncoder(CONFIG), path)
    return path


@pytest.fixture()
def features(tmp_path: Path) -> Path:
    folder = tmp_path / "features"
    folder.mkdir()
    for clip_id in ("a", "b"):
        np.save(folder / f"{clip_id}.npy", np.ones((4, WIDTH), np.float32))
    (tmp_path / "test.tsv").write_text("id\ttext\na\thello\nb\tworld\n", encoding="utf-8")
    return folder


def assert_training_message(text: str, features: Path, encoder: Path) -> None:
    assert text.startswith(training_message(features)), text
    assert f"but the encoder {encoder} expects {CONFIG.feature_dim}: use features from the extractor" in text


def test_eval_only_gives_trainings_message(encoder, features, tmp_path):
    cfg = TrainConfig(eval_only=True, encoder_checkpoint=str(encoder), val_features=str(features),
                      val_manifest=str(tmp_path / "test.tsv"), output_dir=str(tmp_path / "eval"), device="cpu",
                      decoder=str(tmp_path / "never_loaded.yaml"))
    with pytest.raises(DataError) as err:
        evaluate_checkpoint(cfg)
    assert_training_message(str(err.value), features, encoder)


def test_embed_gives_trainings_message_in_one_line(encoder, features, tmp_path, capsys):
    code = cli.main(["embed", "--encoder_checkpoint", str(encoder), "--features", str(features),
                     "--out", str(tmp_path / "emb.npy"), "--device", "cpu"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1
    assert_training_message(errors[0].removeprefix("error: "), features, encoder)
    assert not (tmp_path / "emb.npy").exists()


def test_translate_gives_trainings_message_before_loading_a_decoder(encoder, features, tmp_path):
    with pytest.raises(DataError) as err:
        translate(encoder, features, ["eng_Latn"], decoder=str(tmp_path / "never_loaded.yaml"), device="cpu")
    assert_training_message(str(err.value), features, encoder)
