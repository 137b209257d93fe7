"""Project exceptions: every error a user can cause is one of these.

Their messages name the file / row / flag at fault and say how to fix it; the CLIs print
them as one line and exit non-zero (no traceback).
"""

from __future__ import annotations


class SonarFtError(Exception):
    """Base class for errors a user can cause and fix."""


class DataError(SonarFtError):
    """A manifest or feature file is missing, unreadable or inconsistent."""


class CheckpointError(SonarFtError):
    """A checkpoint cannot be read or is not a SONAR (SignT5) encoder."""


class ConfigError(SonarFtError):
    """A flag, config file or combination of settings is invalid."""


class OutputDirError(SonarFtError):
    """The output folder cannot be used as asked (another run's files, not writable...)."""


class DiskFullError(OutputDirError, OSError):
    """A file could not be written because its disk is full (also an OSError, for callers that catch those)."""


class TrainingError(SonarFtError):
    """Training cannot go on (diverged to NaN/Inf, out of GPU memory); the message says what fits."""


class DownloadError(SonarFtError):
    """A download failed, or what arrived is not what was asked for (size, SHA-256)."""


class VideoError(DataError):
    """A video cannot be turned into features (corrupt, no video stream, no frames, too large, variable frame rate)."""
