"""Tests for sonar_ft.inference.embed: the library function and the ``sonar-ft embed`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sonar_ft import cli
from sonar_ft.inference.embed import embed_features
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder, save_encoder
from tests.numerics import assert_close_to_scale

CONFIG = SignT5Config(
    feature_dim=12,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_heads=4,
    num_encoder_layers=2,
    num_decoder_layers=1,
    vocab_size=10,
    output_dim=16,
)
LENGTHS = {"clip_c": 33, "clip_a": 5, "clip_e": 1, "clip_b": 140, "clip_d": 17}


@pytest.fixture()
def model() -> SignT5SonarEncoder:
    torch.manual_seed(0)
    return SignT5SonarEncoder(CONFIG).eval()


@pytest.fixture()
def checkpoint(tmp_path: Path, model: SignT5SonarEncoder) -> Path:
    path = tmp_path / "encoder.pt"
    save_encoder(model, path)
    return path


@pytest.fixture()
def features_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "features"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for clip_id, length in LENGTHS.items():
        np.save(folder / f"{clip_id}.npy", rng.standard_normal((length, CONFIG.feature_dim)).astype(np.float32))
    return folder


def alone(model: SignT5SonarEncoder, clip: np.ndarray | torch.Tensor) -> torch.Tensor:
    """The model's output for one clip on its own (no padding): (output_dim,)."""
    with torch.no_grad():
        return model(torch.as_tensor(clip)[None])[0]


def test_embed_features_keeps_input_order_and_matches_single_clips(model: SignT5SonarEncoder) -> None:
    torch.manual_seed(1)
    clips = [torch.randn(n, CONFIG.feature_dim) for n in (9, 2, 30, 2, 15, 1, 60)]
    model.train()

    out = embed_features(model, clips, batch_size=3, device="cpu")

    assert model.training  # mode restored
    model.eval()
    assert out.shape == (len(clips), CONFIG.output_dim) and out.dtype == torch.float32
    for i, clip in enumerate(clips):
        assert_close_to_scale(out[i], alone(model, clip))


def test_embed_command_writes_one_embedding_per_clip_and_ids(
    tmp_path: Path, model: SignT5SonarEncoder, checkpoint: Path, features_dir: Path
) -> None:
    out = tmp_path / "run" / "embeddings.npy"
    code = cli.main([
        "embed", "--encoder_checkpoint", str(checkpoint), "--features", str(features_dir),
        "--out", str(out), "--batch_size", "2", "--device", "cpu",
    ])  # fmt: skip

    assert code == 0
    embeddings = np.load(out)
    ids = (tmp_path / "run" / "embeddings.ids.txt").read_text().splitlines()
    assert ids == sorted(LENGTHS)
    assert embeddings.shape == (len(LENGTHS), CONFIG.output_dim) and embeddings.dtype == np.float32
    for row, clip_id in zip(embeddings, ids):
        expected = alone(model, np.load(features_dir / f"{clip_id}.npy"))
        assert_close_to_scale(torch.from_numpy(row), expected)
    assert sorted(p.name for p in out.parent.iterdir()) == ["embeddings.ids.txt", "embeddings.npy"]


def test_embed_command_follows_the_manifest_order(
    tmp_path: Path, model: SignT5SonarEncoder, checkpoint: Path, features_dir: Path
) -> None:
    manifest = tmp_path / "test.tsv"
    manifest.write_text("id\tlength\ttext\nclip_d\t17\thello\nclip_b\t140\tworld\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    code = cli.main([
        "embed", "--encoder_checkpoint", str(checkpoint), "--features", str(features_dir),
        "--manifest", str(manifest), "--out", str(out), "--device", "cpu",
    ])  # fmt: skip

    assert code == 0
    assert (tmp_path / "emb.ids.txt").read_text() == "clip_d\nclip_b\n"
    embeddings = np.load(out)
    expected = alone(model, np.load(features_dir / "clip_b.npy"))
    assert_close_to_scale(torch.from_numpy(embeddings[1]), expected)


def test_embed_command_accepts_a_single_feature_file(
    tmp_path: Path, model: SignT5SonarEncoder, checkpoint: Path, features_dir: Path
) -> None:
    out = tmp_path / "one.npy"
    clip = features_dir / "clip_c.npy"
    code = cli.main(["embed", "--encoder_checkpoint", str(checkpoint), "--features", str(clip), "--out", str(out)])

    assert code == 0
    assert (tmp_path / "one.ids.txt").read_text() == "clip_c\n"
    assert_close_to_scale(torch.from_numpy(np.load(out)[0]), alone(model, np.load(clip)))


def test_bad_checkpoint_path_exits_2_naming_the_path(
    tmp_path: Path, features_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nowhere" / "encoder.pt"
    out = tmp_path / "emb.npy"
    code = cli.main(["embed", "--encoder_checkpoint", str(missing), "--features", str(features_dir), "--out", str(out)])

    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists()


def test_wrong_feature_dimension_exits_2_naming_the_clip(
    tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "wide"
    folder.mkdir()
    np.save(folder / "clip_x.npy", np.zeros((4, CONFIG.feature_dim + 1), dtype=np.float32))
    out = tmp_path / "emb.npy"
    code = cli.main(["embed", "--encoder_checkpoint", str(checkpoint), "--features", str(folder), "--out", str(out)])

    assert code == 2
    err = capsys.readouterr().err
    assert "clip_x" in err and str(CONFIG.feature_dim) in err
    assert not out.exists()


def test_manifest_clip_without_features_exits_2_naming_it(
    tmp_path: Path, checkpoint: Path, features_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "test.tsv"
    manifest.write_text("id\ttext\nclip_a\thi\nclip_zz\tgone\n", encoding="utf-8")
    code = cli.main([
        "embed", "--encoder_checkpoint", str(checkpoint), "--features", str(features_dir),
        "--manifest", str(manifest), "--out", str(tmp_path / "emb.npy"),
    ])  # fmt: skip

    assert code == 2
    assert "clip_zz" in capsys.readouterr().err


def test_out_must_end_in_npy(tmp_path: Path, checkpoint: Path, features_dir: Path) -> None:
    code = cli.main([
        "embed", "--encoder_checkpoint", str(checkpoint), "--features", str(features_dir),
        "--out", str(tmp_path / "emb.bin"),
    ])  # fmt: skip
    assert code == 2
