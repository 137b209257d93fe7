"""A Drive-like folder for the Colab simulation (tests/notebook/test_colab_simulation.py), in pure Python.

Loaded by every Python process of the simulated runtime (PYTHONPATH): each open() of a feature file
(.npy / .pt) under $SONAR_FT_SIM_DRIVE waits $SONAR_FT_SIM_DELAY seconds, as a Drive mount's round
trip does, and is logged to $SONAR_FT_SIM_LOG ("<time> <path>"). What it does not simulate: reads
that bypass Python's open() (C libraries opening files themselves), Drive's quota and trash.
"""

import builtins
import io
import os
import time

_DRIVE = os.environ.get("SONAR_FT_SIM_DRIVE")
if _DRIVE:
    _DRIVE = os.path.realpath(_DRIVE) + os.sep
    _DELAY = float(os.environ.get("SONAR_FT_SIM_DELAY", "0"))
    _LOG = os.environ["SONAR_FT_SIM_LOG"]
    _real_open = builtins.open

    def _open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(file))
            if path.startswith(_DRIVE) and path.endswith((".npy", ".pt")):
                time.sleep(_DELAY)
                with _real_open(_LOG, "a", encoding="utf-8") as log:
                    log.write(f"{time.time():.6f} {path}\n")
        return _real_open(file, *args, **kwargs)

    builtins.open = _open
    io.open = _open
