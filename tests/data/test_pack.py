"""`sonar-ft pack` / `unpack`: one checked archive, a local copy made once, damage refused; verify --reuse."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sonar_ft import cli
from sonar_ft.data.pack import INDEX_NAME, localize_features, pack_features
from sonar_ft.errors import DataError

DIM = 4


def _features(root: Path, n: int = 12, nested: bool = False) -> Path:
    for i in range(n):
        clip = f"clip{i:03d}"
        folder = root / "0" / clip[:5] if nested else root
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"{clip}.npy", np.full((3 + i, DIM), i, np.float32))
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.npy")}


@pytest.mark.parametrize("nested", [False, True])
def test_pack_then_unpack_gives_the_same_files(tmp_path: Path, nested: bool) -> None:
    src = _features(tmp_path / "features", nested=nested)
    report = pack_features(src, tmp_path / "features.tar", progress=False)
    assert report.files == 12
    local = localize_features(tmp_path / "features.tar", tmp_path / "local", progress=False)
    assert local.copied and local.files == 12
    assert _tree(tmp_path / "local") == _tree(src)


def test_the_archive_lists_size_and_checksum_of_every_file(tmp_path: Path) -> None:
    import hashlib

    src = _features(tmp_path / "features")
    pack_features(src, tmp_path / "f.tar", progress=False)
    with tarfile.open(tmp_path / "f.tar") as tar:
        index = json.load(tar.extractfile(INDEX_NAME))
    first = index["files"][0]
    data = (src / first["path"]).read_bytes()
    assert (first["size"], first["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())


def test_a_second_unpack_of_the_same_archive_copies_nothing(tmp_path: Path) -> None:
    pack_features(_features(tmp_path / "features"), tmp_path / "f.tar", progress=False)
    localize_features(tmp_path / "f.tar", tmp_path / "local", progress=False)
    marker = tmp_path / "local" / "clip000.npy"
    os.utime(marker, ns=(1, 1))
    again = localize_features(tmp_path / "f.tar", tmp_path / "local", progress=False)
    assert not again.copied and marker.stat().st_mtime_ns == 1


def test_a_changed_archive_is_unpacked_again(tmp_path: Path) -> None:
    src = _features(tmp_path / "features")
    pack_features(src, tmp_path / "f.tar", progress=False)
    localize_features(tmp_path / "f.tar", tmp_path / "local", progress=False)
    np.save(src / "clip999.npy", np.zeros((2, DIM), np.float32))
    pack_features(src, tmp_path / "f.tar", progress=False)
    assert localize_features(tmp_path / "f.tar", tmp_path / "local", progress=False).files == 13


def test_a_damaged_archive_is_refused_and_leaves_no_stamp(tmp_path: Path) -> None:
    pack_features(_features(tmp_path / "features"), tmp_path / "f.tar", progress=False)
    with tarfile.open(tmp_path / "f.tar") as tar:
        offset = tar.getmembers()[0].offset_data
    data = bytearray((tmp_path / "f.tar").read_bytes())
    data[offset + 100] ^= 0xFF  # inside the first member's data
    (tmp_path / "f.tar").write_bytes(bytes(data))
    with pytest.raises(DataError, match="does not match its index"):
        localize_features(tmp_path / "f.tar", tmp_path / "local", progress=False)
    # Not reused next time: the copy was never marked as checked.
    with pytest.raises(DataError, match="does not match its index"):
        localize_features(tmp_path / "f.tar", tmp_path / "local", progress=False)


def test_an_archive_without_index_is_refused(tmp_path: Path) -> None:
    src = _features(tmp_path / "features")
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:
        tar.add(src / "clip000.npy", arcname="clip000.npy")
    with pytest.raises(DataError, match="sonar-ft pack"):
        localize_features(tmp_path / "plain.tar", tmp_path / "local", progress=False)


def test_a_member_escaping_the_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.npy").write_bytes(b"x")
    with tarfile.open(tmp_path / "evil.tar", "w") as tar:
        tar.add(tmp_path / "x.npy", arcname="../escaped.npy")
    with pytest.raises(DataError, match="outside the folder"):
        localize_features(tmp_path / "evil.tar", tmp_path / "deep" / "local", progress=False)
    assert not (tmp_path / "deep" / "escaped.npy").exists()


def test_a_folder_holding_other_files_is_never_emptied(tmp_path: Path) -> None:
    pack_features(_features(tmp_path / "features"), tmp_path / "f.tar", progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="other than features"):
        localize_features(tmp_path / "f.tar", tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_folder_source_is_copied_and_reused(tmp_path: Path) -> None:
    src = _features(tmp_path / "features", nested=True)
    assert localize_features(src, tmp_path / "local", progress=False).copied
    assert not localize_features(src, tmp_path / "local", progress=False).copied
    assert _tree(tmp_path / "local") == _tree(src)


def test_pack_and_unpack_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _features(tmp_path / "features")
    assert cli.main(["pack", "--features", str(src), "--out", str(tmp_path / "f.tar")]) == 0
    assert cli.main(["unpack", "--source", str(tmp_path / "f.tar"), "--out", str(tmp_path / "local")]) == 0
    assert "copied and checked" in capsys.readouterr().out
    assert cli.main(["unpack", "--source", str(tmp_path / "missing.tar"), "--out", str(tmp_path / "l2")]) == 2


# -- --dtype fp16: half the bytes, values to float16 rounding, read back as float32 ------------------------------

WIDE = 768  # SignHiera's width: per-file headers weigh what they do on real clips


def _random_features(root: Path, n: int = 4, rows: int = 100) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    clips = {f"clip{i:03d}": (rng.standard_normal((rows + i, WIDE)) * 3).astype(np.float32) for i in range(n)}
    for clip, values in clips.items():
        np.save(root / f"{clip}.npy", values)
    return clips


def test_fp16_pack_stores_float16_npy_equal_to_the_originals_to_rounding(tmp_path: Path) -> None:
    clips = _random_features(tmp_path / "features")
    report = pack_features(tmp_path / "features", tmp_path / "f16.tar", dtype="fp16", progress=False)
    local = localize_features(tmp_path / "f16.tar", tmp_path / "local", progress=False)
    assert report.dtype == local.dtype == "float16"
    for clip, original in clips.items():
        stored = np.load(tmp_path / "local" / f"{clip}.npy", allow_pickle=False)
        assert stored.dtype == np.float16 and stored.shape == original.shape
        # float16 keeps 11 significant bits: relative error <= 2^-11; below its normal range, <= 2^-25 absolute.
        np.testing.assert_allclose(stored.astype(np.float32), original, rtol=2.0**-11, atol=2.0**-25)


def test_fp16_archive_is_about_half_the_fp32_one(tmp_path: Path) -> None:
    _random_features(tmp_path / "features")
    pack_features(tmp_path / "features", tmp_path / "f32.tar", dtype="fp32", progress=False)
    pack_features(tmp_path / "features", tmp_path / "f16.tar", dtype="fp16", progress=False)
    ratio = (tmp_path / "f16.tar").stat().st_size / (tmp_path / "f32.tar").stat().st_size
    assert 0.49 < ratio < 0.52


def test_the_index_records_the_dtype_and_none_when_files_are_kept(tmp_path: Path) -> None:
    src = _features(tmp_path / "features")
    pack_features(src, tmp_path / "kept.tar", progress=False)
    pack_features(src, tmp_path / "f16.tar", dtype="fp16", progress=False)
    for name, dtype in (("kept.tar", None), ("f16.tar", "float16")):
        with tarfile.open(tmp_path / name) as tar:
            assert json.load(tar.extractfile(INDEX_NAME))["dtype"] == dtype


def test_fp16_pack_turns_a_pt_file_into_npy(tmp_path: Path) -> None:
    import torch

    (tmp_path / "features" / "0" / "clip_").mkdir(parents=True)
    values = torch.linspace(-2, 2, 3 * DIM).reshape(3, DIM)
    torch.save({"features": values, "video_id": "clip_a"}, tmp_path / "features" / "0" / "clip_" / "clip_a.pt")
    pack_features(tmp_path / "features", tmp_path / "f16.tar", dtype="fp16", progress=False)
    localize_features(tmp_path / "f16.tar", tmp_path / "local", progress=False)
    assert sorted(p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("clip_a*")) == [
        "0/clip_/clip_a.npy"]
    stored = np.load(tmp_path / "local" / "0" / "clip_" / "clip_a.npy")
    np.testing.assert_allclose(stored.astype(np.float32), values.numpy(), rtol=2.0**-11, atol=2.0**-25)


def test_fp16_pack_refuses_a_value_beyond_float16_and_writes_nothing(tmp_path: Path) -> None:
    src = _features(tmp_path / "features")
    np.save(src / "clip005.npy", np.array([[1.0, 1e6, 0.0, 0.0]], np.float32))
    with pytest.raises(DataError, match=r"clip005\.npy.*without --dtype"):
        pack_features(src, tmp_path / "out" / "f16.tar", dtype="fp16", progress=False)
    assert not (tmp_path / "out" / "f16.tar").exists()
    assert list((tmp_path / "out").iterdir()) == []  # no temporary left beside it either


def test_fp16_pack_refuses_a_pt_and_npy_of_the_same_clip(tmp_path: Path) -> None:
    import torch

    src = _features(tmp_path / "features", n=2)
    torch.save(torch.zeros(2, DIM), src / "clip001.pt")
    with pytest.raises(DataError, match=r"clip001\.npy and .*clip001\.pt would both be stored as clip001\.npy"):
        pack_features(src, tmp_path / "f16.tar", dtype="fp16", progress=False)
    assert not (tmp_path / "f16.tar").exists()


def test_an_unpacked_fp16_folder_trains_as_float32_batches(tmp_path: Path) -> None:
    import torch

    from sonar_ft.data.dataset import SignFeatureDataset, collate
    from sonar_ft.data.features import FeatureStore
    from sonar_ft.data.manifest import ManifestRow

    clips = _random_features(tmp_path / "features", n=2)
    pack_features(tmp_path / "features", tmp_path / "f16.tar", dtype="fp16", progress=False)
    localize_features(tmp_path / "f16.tar", tmp_path / "local", progress=False)
    rows = [ManifestRow(clip, "a text") for clip in clips]
    dataset = SignFeatureDataset(FeatureStore.open(tmp_path / "local"), rows, progress=False)
    batch = collate([dataset[i] for i in range(len(dataset))])
    assert batch.features.dtype == torch.float32 and batch.features.shape == (2, 101, WIDE)
    np.testing.assert_allclose(batch.features[0, :100].numpy(), clips["clip000"], rtol=2.0**-11, atol=2.0**-25)


def test_pack_command_with_dtype_fp16(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = _features(tmp_path / "features")
    assert cli.main(["pack", "--features", str(src), "--out", str(tmp_path / "f.tar"), "--dtype", "fp16"]) == 0
    assert "stored as float16" in capsys.readouterr().out
    assert cli.main(["unpack", "--source", str(tmp_path / "f.tar"), "--out", str(tmp_path / "local")]) == 0
    assert "stored as float16, read as float32" in capsys.readouterr().out


def test_verify_accepts_an_unpacked_fp16_folder(tmp_path: Path) -> None:
    from sonar_ft.data.manifest import ManifestRow
    from sonar_ft.data.verify import verify_dataset

    clips = _random_features(tmp_path / "features", n=2)
    pack_features(tmp_path / "features", tmp_path / "f16.tar", dtype="fp16", progress=False)
    localize_features(tmp_path / "f16.tar", tmp_path / "local", progress=False)
    report = verify_dataset(tmp_path / "local", [ManifestRow(clip, "a text") for clip in clips], WIDE, workers=1,
                            progress=False)
    assert report.ok and report.dtypes == {"float16": 2}
