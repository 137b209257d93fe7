"""Files, safely: atomic fsync'd writes and pickle-free loads (``atomic``), one writer per output (``lock``),
and output-versus-input checks made before anything is written (``guards``).

Imports nothing of the project but :mod:`sonar_ft.errors`; every other package writes through it.
"""
