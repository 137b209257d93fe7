"""What a study shows while it runs: one line per trial and a progress bar, instead of the training loop's
per-epoch lines, Optuna's own trial logs and its experimental-feature warnings.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator

import optuna

# Loggers whose INFO lines a study silences unless ``verbose``.
CHATTY_LOGGERS = ("sonar_ft.training", "sonar_ft.data", "sonar_ft.models", "sonar_ft.evaluate", "fairseq2", "sonar")


@contextlib.contextmanager
def quiet_optuna_warnings() -> Iterator[None]:
    """Optuna flags heartbeats, grouped TPE etc. as experimental; we rely on them knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


@contextlib.contextmanager
def optuna_verbosity(level: int) -> Iterator[None]:
    """Optuna's log level set to ``level`` inside the block, restored after it."""
    saved = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(level)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(saved)


@contextlib.contextmanager
def quiet_training(verbose: bool) -> Iterator[None]:
    """One line per trial: silence the training loop's per-epoch INFO lines, and Optuna's own trial logs."""
    saved = {name: logging.getLogger(name).level for name in CHATTY_LOGGERS}
    if not verbose:
        for name in CHATTY_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        # Our trial line replaces Optuna's (and the tracebacks it logs for trials we fail on purpose).
        with optuna_verbosity(optuna.logging.ERROR):
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar that suits where it is shown (terminal or notebook)."""
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


@contextlib.contextmanager
def logging_through(bar: Any) -> Iterator[None]:
    """Log lines go through tqdm.write so they do not tear the progress bar."""
    if getattr(bar, "disable", True):
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield
