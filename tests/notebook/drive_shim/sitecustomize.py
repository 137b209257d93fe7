"""A Drive-like folder for the Colab simulation (tests/notebook/test_colab_simulation.py), in pure Python.

Loaded by every Python process of the simulated runtime (PYTHONPATH). Under $SONAR_FT_SIM_DRIVE:

- **Slow opens.** Each open() of a feature file (.npy / .pt) waits $SONAR_FT_SIM_DELAY seconds, as a
  Drive mount's round trip does, and is logged to $SONAR_FT_SIM_LOG ("<time> <path>").
- **A quota with its trash** ($SONAR_FT_SIM_QUOTA bytes). A file deleted (os.remove / os.unlink /
  shutil.rmtree), or replaced by renaming another file onto its name (os.replace / os.rename, every
  atomic save), goes to the trash: its bytes are appended to $SONAR_FT_SIM_TRASH ("<time> <bytes>
  <path>") and count against the quota from then on. A file overwritten in place (opened and
  truncated) only gets a new revision, which is not counted: that is our reading of Drive's
  documentation, not something observed. shutil.disk_usage() of a path there reports the quota:
  free = quota - live bytes - trash, as Colab's Drive mount reports the account's free space. Before
  every delete or rename the usage (live + trash, the moment both the old and the new copy exist) is
  appended to $SONAR_FT_SIM_USAGE ("<time> <bytes>"), so that the test sees the peaks between its samples.
- **A kill.** With $SONAR_FT_SIM_KILL = "<run folder name>:<n>", the first training command
  (train_sonar_finetuning.py) whose --output_dir is that folder SIGKILLs itself a moment after its
  n-th save of last.pt, once: $SONAR_FT_SIM_KILL_FLAG is written first ("<time> <saves seen>").

Not simulated: reads or writes that bypass Python (C libraries opening files themselves), Drive's own
errors (its "Input/output error"), a quota that refuses writes (the test checks the peak instead).
"""

import builtins
import io
import os
import shutil
import signal
import sys
import threading
import time

_DRIVE = os.environ.get("SONAR_FT_SIM_DRIVE")
if _DRIVE:
    _DRIVE = os.path.realpath(_DRIVE) + os.sep
    _DELAY = float(os.environ.get("SONAR_FT_SIM_DELAY", "0"))
    _LOG = os.environ["SONAR_FT_SIM_LOG"]
    _QUOTA = int(os.environ.get("SONAR_FT_SIM_QUOTA", "0"))
    _TRASH = os.environ.get("SONAR_FT_SIM_TRASH")
    _USAGE = os.environ.get("SONAR_FT_SIM_USAGE")
    _real_open = builtins.open
    _real = {name: getattr(os, name) for name in ("replace", "rename", "remove", "unlink")}
    _real_rmtree = shutil.rmtree
    _real_disk_usage = shutil.disk_usage

    def _on_drive(path) -> str | None:
        if not isinstance(path, (str, bytes, os.PathLike)):
            return None
        path = os.path.realpath(os.fsdecode(path))
        return path if (path + os.sep).startswith(_DRIVE) else None

    def _append(log: str | None, line: str) -> None:
        if log:
            with _real_open(log, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def trash_bytes() -> int:
        try:
            with _real_open(_TRASH, encoding="utf-8") as f:
                return sum(int(line.split(" ", 2)[1]) for line in f if line.strip())
        except (OSError, TypeError):
            return 0

    def live_bytes() -> int:
        total = 0
        for folder, _, files in os.walk(_DRIVE):
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
        return total

    def _size(path: str) -> int:
        try:
            return os.lstat(path).st_size if os.path.isfile(path) else 0
        except OSError:
            return 0

    def _to_trash(path: str, size: int) -> None:
        if size:
            _append(_USAGE, f"{time.time():.6f} {live_bytes() + trash_bytes()}")
            _append(_TRASH, f"{time.time():.6f} {size} {path}")

    def _open(file, *args, **kwargs):
        path = _on_drive(file)
        if path and path.endswith((".npy", ".pt")):
            time.sleep(_DELAY)
            _append(_LOG, f"{time.time():.6f} {path}")
        return _real_open(file, *args, **kwargs)

    def _renamer(name):
        def rename(src, dst, *args, **kwargs):
            target, source = _on_drive(dst), _on_drive(src)
            if not kwargs.get("dst_dir_fd") and target:
                _to_trash(target, _size(target))  # the old file's bytes: replaced, so in the trash
            elif not kwargs.get("src_dir_fd") and source and not target:
                _to_trash(source, _size(source))  # moved off Drive: deleted there
            return _real[name](src, dst, *args, **kwargs)
        return rename

    def _deleter(name):
        def delete(path, *args, **kwargs):
            target = None if kwargs.get("dir_fd") is not None else _on_drive(path)
            if target:
                _to_trash(target, _size(target))
            return _real[name](path, *args, **kwargs)
        return delete

    def _rmtree(path, *args, **kwargs):
        target = _on_drive(path)
        if target and os.path.isdir(target):
            size = sum(_size(os.path.join(d, f)) for d, _, fs in os.walk(target) for f in fs)
            _to_trash(target, size)
        return _real_rmtree(path, *args, **kwargs)

    def _disk_usage(path):
        if _QUOTA and _on_drive(path):
            used = live_bytes() + trash_bytes()
            return shutil._ntuple_diskusage(_QUOTA, used, max(0, _QUOTA - used))
        return _real_disk_usage(path)

    builtins.open = _open
    io.open = _open
    os.replace, os.rename = _renamer("replace"), _renamer("rename")
    os.remove, os.unlink = _deleter("remove"), _deleter("unlink")
    shutil.rmtree = _rmtree
    shutil.disk_usage = _disk_usage

    _KILL = os.environ.get("SONAR_FT_SIM_KILL")
    _FLAG = os.environ.get("SONAR_FT_SIM_KILL_FLAG")
    if _KILL and _FLAG and any(a.endswith("train_sonar_finetuning.py") for a in sys.argv) and not os.path.exists(_FLAG):
        _name, _n = _KILL.rsplit(":", 1)
        _argv = sys.argv
        _out = next((_argv[i + 1] for i, a in enumerate(_argv[:-1]) if a == "--output_dir"), "")
        if os.path.basename(os.path.normpath(_out)) == _name:

            def _kill_after_saves(run_dir: str, n: int) -> None:
                names = [os.path.join(run_dir, f) for f in ("last.pt", "last.slot1.pt")]
                seen, saves = None, 0
                while True:
                    stamps = tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else 0 for p in names)
                    if seen is not None and stamps != seen:
                        saves += 1
                        if saves >= n:
                            time.sleep(0.02)  # a moment into the next step: killed between saves, mid-epoch
                            with _real_open(_FLAG, "w", encoding="utf-8") as f:
                                f.write(f"{time.time():.6f} {saves}\n")
                            os.kill(os.getpid(), signal.SIGKILL)
                    seen = stamps
                    time.sleep(0.01)

            threading.Thread(target=_kill_after_saves, args=(_out, int(_n)), daemon=True).start()
