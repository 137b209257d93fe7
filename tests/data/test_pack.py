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
