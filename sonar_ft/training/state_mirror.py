"""``last.pt`` on a fast local disk, mirrored to the run folder on Drive (the disk plan's ``mirror-replace``).

At the official size ``last.pt`` (weights + AdamW moments) is 9 GB and ``best_encoder.pt`` 3 GB; an
atomic save needs the old and the new file at once, so a run folder on a free 15 GB Google Drive
cannot hold two copies of the state. The recipe can instead keep ``last.pt`` in a local folder
(``--state_dir``, e.g. ``/content/sonar_state/<run>``: fast, large, lost on disconnect) and copy
it into the run folder after each epoch. When two copies do not fit (``replace=True``), the old
copy in the run folder is removed before the new one is written; :func:`restore_state` brings
the copy back to the local folder after a disconnect so the run resumes from it.

Wiring (the recipe): save ``last.pt`` to ``state_dir`` as today; after each epoch-end save call
:func:`mirror_state`; before looking for a run to resume, call :func:`restore_state`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from sonar_ft.files import atomic

log = logging.getLogger(__name__)


def mirror_state(local: str | Path, mirror: str | Path, *, replace: bool) -> None:
    """Copy ``local`` (the fresh ``last.pt``) onto ``mirror`` (its copy in the run folder on Drive).

    ``replace=False`` keeps the old copy until the new one is complete (atomic; needs room for two);
    ``replace=True`` removes the old copy first (room for one; a disconnect during the copy leaves
    none: the run then continues from an earlier mirror only if there is one, else starts again).
    """
    local, mirror = Path(local), Path(mirror)
    if replace and mirror.exists():
        mirror.unlink()
    with atomic.atomic_path(mirror) as tmp:
        shutil.copyfile(local, tmp)
    log.info("copied %s to %s (%.1f GB)", local.name, mirror, mirror.stat().st_size / 1e9)


def restore_state(mirror: str | Path, local: str | Path) -> bool:
    """Before resuming: bring the mirrored ``last.pt`` back to the local folder if that lost it.

    Returns True when it copied (a fresh runtime after a disconnect); a local ``last.pt`` newer
    than or as new as the mirror is kept.
    """
    mirror, local = Path(mirror), Path(local)
    if not mirror.is_file():
        return False
    if local.is_file() and local.stat().st_mtime >= mirror.stat().st_mtime:
        return False
    with atomic.atomic_path(local) as tmp:
        shutil.copyfile(mirror, tmp)
    log.info("restored %s from its copy %s", local, mirror)
    return True
