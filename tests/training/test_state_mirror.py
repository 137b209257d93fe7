"""last.pt and best_encoder.pt kept on local disk, copied into the run folder (Drive) without leaving trash:
fixed slot files overwritten in place, the newest complete copy restored after a disconnect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sonar_ft.run_files import BEST_ENCODER, LAST_STATE, STATE_SLOTS_FILE
from sonar_ft.training import state_mirror
from sonar_ft.training.state_mirror import best_copy_is_torn, mirror_best, mirror_state, read_slots, restore_state


class DriveTrash:
    """Counts the bytes a Drive-like folder would move to its trash: files deleted or replaced by a rename."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.bytes, self.files = root.resolve(), 0, []
        real_replace, real_rename, real_unlink = os.replace, os.rename, os.unlink

        def gone(path) -> None:
            path = Path(path).resolve()
            if path.is_file() and self.root in path.parents:
                self.bytes += path.stat().st_size
                self.files.append(path.name)

        def replace(src, dst, *a, **k):
            gone(dst)
            return real_replace(src, dst, *a, **k)

        def rename(src, dst, *a, **k):
            gone(dst)
            return real_rename(src, dst, *a, **k)

        def unlink(path, *a, **k):
            gone(path)
            return real_unlink(path, *a, **k)

        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "unlink", unlink)


@pytest.mark.parametrize("slots", [1, 2])
def test_thirty_epochs_of_copies_leave_no_state_in_the_trash(tmp_path, monkeypatch, slots):
    local, drive = tmp_path / "local", tmp_path / "drive"
    local.mkdir()
    trash = DriveTrash(drive, monkeypatch)
    inodes: dict[str, int] = {}
    for step in range(1, 91):  # 30 epochs, 3 saves each
        (local / LAST_STATE).write_bytes(bytes([step % 256]) * (100_000 + step))  # sizes change a little
        mirror_state(local / LAST_STATE, drive, slots=slots, step=step)
        if step % 3 == 0:
            (local / BEST_ENCODER).write_bytes(b"b" * 50_000)
            mirror_best(local / BEST_ENCODER, drive)
        for p in drive.glob("*.pt"):
            assert inodes.setdefault(p.name, p.stat().st_ino) == p.stat().st_ino  # the same file, rewritten
    assert len(inodes) == slots + 1
    assert set(trash.files) <= {STATE_SLOTS_FILE} and trash.bytes < 1000 * 90  # only the small marker is replaced
    newest = drive / read_slots(drive)["last"]["slot"]
    assert newest.read_bytes() == (local / LAST_STATE).read_bytes()


def test_a_fresh_runtime_gets_the_newest_complete_copy_back(tmp_path):
    local, drive = tmp_path / "content" / LAST_STATE, tmp_path / "drive"
    local.parent.mkdir()
    for step in (1, 2):
        local.write_bytes(f"step {step}".encode())
        mirror_state(local, drive, slots=2, step=step)
    assert not restore_state(drive, local)  # the same runtime: its own last.pt is the copy's source
    local.unlink()  # a fresh runtime
    assert restore_state(drive, local) and local.read_bytes() == b"step 2"
    assert not restore_state(drive, local)  # already there


def test_a_disconnect_during_a_copy_falls_back_to_the_other_slot(tmp_path, monkeypatch):
    local, drive = tmp_path / "content" / LAST_STATE, tmp_path / "drive"
    local.parent.mkdir()
    local.write_bytes(b"step 1")
    mirror_state(local, drive, slots=2, step=1)
    local.write_bytes(b"step 2, longer")

    def torn(src, dst):
        Path(dst).write_bytes(b"step 2, lon")
        raise KeyboardInterrupt  # the runtime goes away in the middle of the copy

    monkeypatch.setattr(state_mirror, "copy_in_place", torn)
    with pytest.raises(KeyboardInterrupt):
        mirror_state(local, drive, slots=2, step=2)
    monkeypatch.undo()
    local.unlink()
    assert restore_state(drive, local) and local.read_bytes() == b"step 1"


def test_a_torn_best_copy_is_known(tmp_path, monkeypatch):
    local, drive = tmp_path / BEST_ENCODER, tmp_path / "drive"
    local.write_bytes(b"best")
    mirror_best(local, drive)
    assert not best_copy_is_torn(drive) and (drive / BEST_ENCODER).read_bytes() == b"best"
    monkeypatch.setattr(state_mirror, "copy_in_place", lambda src, dst: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        mirror_best(local, drive)
    assert best_copy_is_torn(drive)


def test_a_newer_local_state_is_not_overwritten(tmp_path: Path) -> None:
    local, drive = tmp_path / "last.pt", tmp_path / "drive"
    drive.mkdir()
    (drive / LAST_STATE).write_bytes(b"old")  # a run folder from before state_slots.json: its last.pt is the copy
    local.write_bytes(b"newer")
    os.utime(drive / LAST_STATE, (1_000, 1_000))
    assert not restore_state(drive, local) and local.read_bytes() == b"newer"
    assert not restore_state(tmp_path / "none", local)
