"""last.pt kept on local disk and mirrored to the run folder: copy, replace, restore after a disconnect."""

from __future__ import annotations

import os
from pathlib import Path

from sonar_ft.training.state_mirror import mirror_state, restore_state


def test_mirror_copies_and_replaces_the_old_copy(tmp_path: Path) -> None:
    local, drive = tmp_path / "local" / "last.pt", tmp_path / "drive" / "last.pt"
    local.parent.mkdir()
    local.write_bytes(b"epoch 1")
    mirror_state(local, drive, replace=True)
    assert drive.read_bytes() == b"epoch 1"
    local.write_bytes(b"epoch 2 state")
    mirror_state(local, drive, replace=True)
    assert drive.read_bytes() == b"epoch 2 state"
    assert sorted(p.name for p in drive.parent.iterdir()) == ["last.pt"]  # no temporary left behind


def test_a_fresh_runtime_gets_the_mirrored_state_back(tmp_path: Path) -> None:
    local, drive = tmp_path / "content" / "last.pt", tmp_path / "drive" / "last.pt"
    drive.parent.mkdir()
    drive.write_bytes(b"state")
    assert restore_state(drive, local) and local.read_bytes() == b"state"
    assert not restore_state(drive, local)  # already there and as new


def test_a_newer_local_state_is_not_overwritten(tmp_path: Path) -> None:
    local, drive = tmp_path / "last.pt", tmp_path / "drive.pt"
    drive.write_bytes(b"old")
    local.write_bytes(b"newer")
    os.utime(drive, (1_000, 1_000))
    assert not restore_state(drive, local) and local.read_bytes() == b"newer"
    assert not restore_state(tmp_path / "none.pt", local)
