"""``last.pt`` on a fast local disk, its copies in the run folder on Drive written so that Drive keeps no trash.

At the official size ``last.pt`` (weights + AdamW moments) is 9 GB and ``best_encoder.pt`` 3 GB. With
``--state_dir`` the recipe writes both atomically on the local disk (fast, lost on disconnect) and copies
them into the run folder: ``last.pt`` into ``--state_slots`` fixed slot files (``last.pt``,
``last.slot1.pt``; 2 slots keep the previous copy while the next one is written), ``best_encoder.pt``
onto itself. :func:`restore_state` brings the newest complete copy back after a disconnect.

What Drive does with files (our assumption, from Google's documentation of the Drive API; it cannot be
checked from a test): a file deleted, or replaced by renaming another file onto its name, goes to Drive's
trash and counts against the quota until the trash is emptied (or after 30 days), so an atomic
write-and-rename of a 9 GB file leaves 9 GB of trash each time. A file overwritten in place (the same file
opened, truncated, written) keeps its identity and gets a new revision; Drive purges the older revision of
a binary file on its own and counts only revisions marked "keep forever" against the quota. So every copy
here is written into the same file, opened for update and truncated, never deleted or renamed. The small
``state_slots.json`` that says which slot is complete is replaced atomically (a few hundred bytes of
trash per save).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sonar_ft.files import atomic
from sonar_ft.run_files import BEST_ENCODER, LAST_STATE, LAST_STATE_SLOTS, STATE_SLOTS_FILE

log = logging.getLogger(__name__)

CHUNK = 64 * 2**20


def copy_in_place(src: str | Path, dst: str | Path) -> None:
    """Copy ``src`` over ``dst`` without deleting or renaming ``dst``: the same file, truncated to its new size, fsync'd."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(src, "rb") as fin, open(dst, "r+b" if dst.exists() else "wb") as fout:
            shutil.copyfileobj(fin, fout, CHUNK)
            fout.truncate()
            fout.flush()
            os.fsync(fout.fileno())
    except OSError as exc:
        if atomic.is_disk_full(exc, dst.parent):
            raise atomic.disk_full_error(dst, exc, needed=src.stat().st_size,
                                         kept=f"{src} is intact (only its copy {dst.name} is incomplete)") from exc
        raise


def read_slots(out: str | Path) -> dict[str, Any]:
    """``state_slots.json`` of the run folder (empty when missing or unreadable)."""
    try:
        return json.loads((Path(out) / STATE_SLOTS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def mirror_state(local: str | Path, out: str | Path, *, slots: int, step: int) -> None:
    """Copy the fresh local ``last.pt`` into the next of ``slots`` slot files of the run folder ``out``.

    With 2 slots the newest complete copy is never the one being written; with 1 a disconnect during the
    copy leaves none (the run then starts again, or continues from ``best_encoder.pt`` as a new run).
    """
    local, out = Path(local), Path(out)
    if slots < 1:
        return
    record = read_slots(out)
    names = LAST_STATE_SLOTS[:slots]
    newest = record.get("last", {}).get("slot")
    target = names[(names.index(newest) + 1) % slots] if newest in names else names[0]
    record.setdefault("complete", {}).pop(target, None)  # being written: not a copy to restore from
    atomic.write_json(out / STATE_SLOTS_FILE, record)
    copy_in_place(local, out / target)
    record["complete"][target] = {"step": step, "local": _stamp(local)}
    record["last"] = {"slot": target, "step": step}
    atomic.write_json(out / STATE_SLOTS_FILE, record)
    log.info("copied %s to %s (%.1f GB)", local.name, out / target, (out / target).stat().st_size / 1e9)


def mirror_best(local: str | Path, out: str | Path) -> None:
    """Copy the fresh local ``best_encoder.pt`` onto the run folder's, in place (marked incomplete while written)."""
    local, out = Path(local), Path(out)
    record = read_slots(out)
    record["best_complete"] = False
    atomic.write_json(out / STATE_SLOTS_FILE, record)
    copy_in_place(local, out / BEST_ENCODER)
    record["best_complete"] = True
    atomic.write_json(out / STATE_SLOTS_FILE, record)


def best_copy_is_torn(out: str | Path) -> bool:
    """True when the run folder's ``best_encoder.pt`` was being overwritten when the runtime stopped."""
    return read_slots(out).get("best_complete") is False


def restore_state(out: str | Path, local: str | Path) -> bool:
    """Before resuming: bring the newest complete copy of ``last.pt`` in the run folder ``out`` to ``local``.

    Returns True when it copied (a fresh runtime after a disconnect). A local ``last.pt`` that is the one
    the copy was made from, or newer, is kept. A run folder without ``state_slots.json`` (older runs)
    counts its ``last.pt`` as the copy.
    """
    out, local = Path(out), Path(local)
    record = read_slots(out)
    if record:
        slot = record.get("last", {}).get("slot")
        done = record.get("complete", {})
        if slot not in done:  # the newest was being written: the other slot, if complete
            slot = next(iter(sorted(done, key=lambda n: done[n]["step"], reverse=True)), None)
        if slot is None:
            return False
        mirror, source = out / slot, done[slot]["local"]
        if local.is_file() and (_stamp(local) == source or local.stat().st_mtime_ns > source[1]):
            return False
    else:
        mirror = out / LAST_STATE
        if not mirror.is_file() or (local.is_file() and local.stat().st_mtime >= mirror.stat().st_mtime):
            return False
    with atomic.atomic_path(local, needed=mirror.stat().st_size) as tmp:
        shutil.copyfile(mirror, tmp)
    log.info("restored %s from its copy %s", local, mirror)
    return True
