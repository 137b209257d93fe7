"""No file a user hands us can run code: pickled ``.pt`` features and ``.pth`` checkpoints are
refused (or read as tensors only), exported tarballs are checked member by member before anything
is extracted, and the source never calls ``torch.load`` unsafely or a shell with ``shell=True``.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from sonar_ft.cli import main as sonar_ft_cli
from sonar_ft.data import FeatureStore, load_feature_file
from sonar_ft.models.encoder import load_encoder
from sonar_ft.errors import CheckpointError, DataError
from sonar_ft.export.load import REQUIRED_MEMBERS, open_export

ROOT = Path(__file__).resolve().parents[2]


class _RunsACommand:
    """Unpickling this runs ``touch MARKER`` (what a malicious file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(path: Path, marker: Path, *, wrap) -> Path:
    torch.save(wrap(_RunsACommand(marker)), path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "MARKER"
    # The attack is real: unpickling it without protection would run the command.
    probe = tmp_path / "probe.pt"
    torch.save(_RunsACommand(path), probe)
    torch.load(probe, weights_only=False)
    assert path.exists()
    path.unlink()
    return path


def test_pickled_feature_file_is_refused_and_never_runs(tmp_path, marker):
    feats = tmp_path / "features"
    feats.mkdir()
    bad = _malicious(feats / "clip.pt", marker, wrap=lambda evil: {"features": torch.ones(3, 4), "extra": evil})
    with pytest.raises(DataError, match=re.escape(str(bad)) + ".*refusing to load it"):
        load_feature_file(bad)
    with pytest.raises(DataError):
        FeatureStore.open(feats).load("clip")
    assert not marker.exists()


def test_pickled_feature_file_is_unreadable_in_verify_cli(tmp_path, marker, capsys):
    feats = tmp_path / "features"
    feats.mkdir()
    _malicious(feats / "clip.pt", marker, wrap=lambda evil: evil)
    (tmp_path / "m.tsv").write_text("id\ttext\nclip\thello\n")
    assert sonar_ft_cli(["verify", "--features", str(feats), "--manifest", str(tmp_path / "m.tsv")]) == 1
    assert "refusing to load it" in capsys.readouterr().out
    assert not marker.exists()


def test_pickled_npy_is_refused_and_never_runs(tmp_path, marker):
    arr = np.array([_RunsACommand(marker)], dtype=object)
    with open(tmp_path / "clip.npy", "wb") as f:
        np.save(f, arr, allow_pickle=True)
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_feature_file(tmp_path / "clip.npy")
    assert not marker.exists()


def test_pickled_checkpoint_is_refused_and_never_runs(tiny_demo, tmp_path, marker):
    state = torch.load(tiny_demo.encoder_checkpoint, weights_only=True)
    bad = _malicious(tmp_path / "enc.pth", marker, wrap=lambda evil: {**state, "trainer": evil})
    with pytest.raises(CheckpointError, match=re.escape(str(bad)) + ".*refusing to load it"):
        load_encoder(bad)
    assert not marker.exists()


def test_pickled_checkpoint_is_refused_by_embed_cli(tiny_demo, tmp_path, marker, capsys):
    bad = _malicious(tmp_path / "enc.pth", marker, wrap=lambda evil: evil)
    code = sonar_ft_cli(["embed", "--encoder-checkpoint", str(bad), "--features", str(tiny_demo.split_features("val")),
                         "--out", str(tmp_path / "e.npy"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to load it" in err and "Traceback" not in err
    assert not marker.exists()


def test_decoder_card_cannot_switch_off_safe_loading(tiny_demo, tmp_path, marker):
    from sonar_ft.models.decoder import FrozenTextDecoder
    from sonar_ft.errors import ConfigError

    assets = tmp_path / "assets"
    shutil.copytree(tiny_demo.assets, assets)
    state = torch.load(assets / "text_decoder.pt", weights_only=True)
    _malicious(assets / "text_decoder.pt", marker, wrap=lambda evil: {**state, "trainer": evil})
    card = assets / "text_decoder.yaml"
    card.write_text(card.read_text() + "restrict: false\n")  # asks fairseq2 for torch.load(weights_only=False)
    with pytest.raises(ConfigError, match="cannot load SONAR model"):
        FrozenTextDecoder.load(str(card), device="cpu")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Export tarballs
# ------------------------------------------------------------------------------------------------
def _member(name: str, data: bytes = b"x", **attrs) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    return info, (data if info.isfile() else None)


def _tarball(path: Path, extra: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A complete export (every required member) plus ``extra`` members."""
    with tarfile.open(path, "w:gz") as tar:
        for name in REQUIRED_MEMBERS:
            info, data = _member(name, b"{}")
            tar.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


BAD_MEMBERS = {
    "absolute_path": (lambda tmp: _member(str(tmp / "evil.txt")), "absolute path"),
    "dot_dot": (lambda tmp: _member("../evil.txt"), "'..'"),
    "nested_dot_dot": (lambda tmp: _member("a/../../evil.txt"), "'..'"),
    "symlink": (lambda tmp: _member("metrics.json", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"), "links"),
    "hardlink": (lambda tmp: _member("metrics.json", b"", type=tarfile.LNKTYPE, linkname="README.md"), "links"),
    "char_device": (lambda tmp: _member("metrics.json", b"", type=tarfile.CHRTYPE, devmajor=1, devminor=3), "devices"),
    "fifo": (lambda tmp: _member("metrics.json", b"", type=tarfile.FIFOTYPE), "devices"),
    "folder": (lambda tmp: _member("sub", b"", type=tarfile.DIRTYPE), "folders"),
    "unexpected_file": (lambda tmp: _member("run_me.sh", b"#!/bin/sh\n"), "unexpected member"),
}


@pytest.mark.parametrize("kind", BAD_MEMBERS)
def test_export_with_a_dangerous_member_is_refused_library(tmp_path, kind):
    make, reason = BAD_MEMBERS[kind]
    tarball = _tarball(tmp_path / "enc.tar.gz", [make(tmp_path)])
    into = tmp_path / "into"
    with pytest.raises(CheckpointError, match=re.escape(str(tarball))) as err:
        open_export(tarball, into)
    assert reason in str(err.value)
    assert not into.exists()  # checked before anything is extracted
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


@pytest.mark.parametrize("kind", BAD_MEMBERS)
def test_export_with_a_dangerous_member_is_refused_translate_cli(tmp_path, capsys, kind):
    make, reason = BAD_MEMBERS[kind]
    tarball = _tarball(tmp_path / "enc.tar.gz", [make(tmp_path)])
    feats = tmp_path / "features"
    feats.mkdir()
    np.save(feats / "clip.npy", np.ones((3, 4), np.float32))
    code = sonar_ft_cli(["translate", "--encoder", str(tarball), "--features", str(feats), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and str(tarball) in err and reason in err and "Traceback" not in err


def test_complete_export_members_are_extracted(tmp_path):
    tarball = _tarball(tmp_path / "enc.tar.gz", [_member("metrics.json", b"[]")])
    files = open_export(tarball, tmp_path / "into")
    assert sorted(files) == sorted([*REQUIRED_MEMBERS, "metrics.json"])
    assert files["metrics.json"].read_bytes() == b"[]"


def test_truncated_export_is_named(tmp_path):
    tarball = _tarball(tmp_path / "enc.tar.gz", [])
    raw = tarball.read_bytes()
    tarball.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=re.escape(str(tarball)) + ".*truncated"):
        open_export(tarball, tmp_path / "into")


# ------------------------------------------------------------------------------------------------
# The source itself
# ------------------------------------------------------------------------------------------------
def _sources() -> list[Path]:
    return sorted((ROOT / "sonar_ft").rglob("*.py")) + [ROOT / "train_sonar_finetuning.py"]


def _calls(path: Path):
    """Every call in ``path`` as (dotted name of the callee, keyword -> constant value, line)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            keywords = {k.arg: k.value.value if isinstance(k.value, ast.Constant) else ... for k in node.keywords}
            yield ast.unparse(node.func), keywords, node.lineno


def test_torch_load_is_only_called_through_the_safe_loader():
    loads = [(str(p.relative_to(ROOT)), kw.get("weights_only")) for p in _sources()
             for name, kw, _ in _calls(p) if name == "torch.load"]
    assert loads == [("sonar_ft/files/atomic.py", True)]
    numpy_loads = [kw.get("allow_pickle") for p in _sources() for name, kw, _ in _calls(p) if name == "np.load"]
    assert numpy_loads and all(flag is False for flag in numpy_loads)


def test_no_shell_true_pickle_or_eval_in_the_source():
    risky = {"pickle.load", "pickle.loads", "eval", "exec", "os.system", "os.popen"}
    hits = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in _sources() for name, kw, line in _calls(p)
            if name in risky or kw.get("shell") not in (None, False) or kw.get("allow_pickle") not in (None, False)]
    assert hits == []
