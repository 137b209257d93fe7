"""``sonar-ft translate --video``: video -> SignHiera -> encoder -> decoder, with the tiny demo's models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sonar_ft import cli
from sonar_ft.data.video import write_synthetic_video
from sonar_ft.inference.translate import translate
from sonar_ft.models.signhiera import SignHiera, save_signhiera, tiny_config

pytest.importorskip("av")


def test_translate_video_gives_text_per_language_and_json(tiny_demo, tmp_path: Path, capsys) -> None:
    # A random SignHiera whose vectors have the demo encoder's feature size (24).
    model = SignHiera(tiny_config(embed_dim=3, stage_dims=(3, 6, 12, 24), mlp_hidden=(6, 12, 24, 48)))
    save_signhiera(model.init_weights(torch.Generator().manual_seed(0)), tmp_path / "sh.pth")
    clips = [write_synthetic_video(tmp_path / f"clip{i}.mp4", 60 + 200 * i, fps=25, seed=i) for i in range(2)]
    out = tmp_path / "translations.json"
    code = cli.main(["translate", "--encoder", str(tiny_demo.encoder_checkpoint), "--video", *map(str, clips),
                     "--signhiera", str(tmp_path / "sh.pth"), "--crop", "none", "--decoder", str(tiny_demo.decoder_card), "--tgt_langs", "eng_Latn,fra_Latn",
                     "--beam_size", "1", "--max_gen_len", "8", "--device", "cpu", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [r["id"] for r in rows] == ["clip0", "clip1"]
    assert all(isinstance(r["eng_Latn"], str) and isinstance(r["fra_Latn"], str) for r in rows)
    with pytest.raises(Exception, match="--features or --video"):
        translate(tiny_demo.encoder_checkpoint, None, ["eng_Latn"], decoder=str(tiny_demo.decoder_card))


def test_translate_needs_features_or_video(tmp_path: Path, capsys) -> None:
    assert cli.main(["translate", "--encoder", str(tmp_path / "e.pt")]) == 2
    assert "--features" in capsys.readouterr().err
