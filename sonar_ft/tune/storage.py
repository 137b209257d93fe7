"""Where a study lives: the ``storage`` setting resolved to an SQL database (SQLite in the study folder by
default, any SQLAlchemy URL) or an Optuna journal file, opened with bounded waits and heartbeats, so a worker
that dies mid-trial is noticed by the others.

Optuna is imported only when a storage is opened (``sonar-ft tune --help`` stays fast).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sonar_ft.errors import ConfigError
from sonar_ft.tune.names import STUDY_DB

if TYPE_CHECKING:
    import optuna

log = logging.getLogger(__name__)

_STORAGE_ATTEMPTS = 4


def resolve_storage(spec: str | None, study_dir: Path) -> tuple[str, str]:
    """``("rdb", url)`` or ``("journal", path)`` for a ``storage`` setting (None: SQLite in ``study_dir``)."""
    if not spec:
        return "rdb", f"sqlite:///{(study_dir / STUDY_DB).resolve()}"
    if "://" in spec:
        return "rdb", spec
    if spec.startswith("journal:"):
        return "journal", spec.removeprefix("journal:")
    suffix = Path(spec).suffix.lower()
    if suffix in (".db", ".sqlite", ".sqlite3"):
        return "rdb", f"sqlite:///{Path(spec).resolve()}"
    if suffix in (".log", ".journal", ".jsonl"):
        return "journal", spec
    raise ConfigError(
        f"--storage {spec!r} is neither a SQLAlchemy URL (sqlite:///study.db, postgresql://user@host/db), a SQLite "
        "file (*.db) nor an Optuna journal file (journal:PATH or *.log); leave it out for SQLite in the study folder"
    )


def describe_storage(spec: str | None, study_dir: Path) -> str:
    """The storage as text safe to print and write to files (passwords hidden)."""
    kind, location = resolve_storage(spec, study_dir)
    if kind == "journal":
        return f"journal:{location}"
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(location).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL fails later with its own message
        return location


def make_storage(
    spec: str | None,
    study_dir: Path,
    *,
    timeout: float = 30.0,
    heartbeat_interval: int = 0,
    grace_period: int | None = None,
    retry_stale_trials: int = 0,
) -> optuna.storages.BaseStorage:
    """Open (creating if needed) the storage ``spec`` (see :func:`resolve_storage`), with heartbeats on SQL storages.

    ``timeout`` bounds every wait on a database server; ``heartbeat_interval`` seconds between a running trial's
    heartbeats (0: off), ``grace_period`` without one before it is declared dead, ``retry_stale_trials`` times its
    parameters are queued again.
    """
    import optuna

    from sonar_ft.tune.console import quiet_optuna_warnings

    kind, location = resolve_storage(spec, study_dir)
    shown = describe_storage(spec, study_dir)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        Path(location).parent.mkdir(parents=True, exist_ok=True)
        if heartbeat_interval:
            log.info("journal storage %s: Optuna has no heartbeat for journal files, so a dead worker's trial stays "
                     "'running'; use an SQL storage for that", shown)
        try:
            return JournalStorage(JournalFileBackend(location))
        except OSError as exc:
            raise ConfigError(f"--storage {shown}: cannot open the journal file: {exc.strerror or exc}") from None

    location = with_installed_driver(location)
    engine_kwargs = engine_options(location, timeout)
    if location.startswith("sqlite"):
        db_path = location.removeprefix("sqlite:///")
        if db_path and db_path != ":memory:":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    heartbeat: dict[str, Any] = {}
    with quiet_optuna_warnings():
        if heartbeat_interval:
            heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period}
            if retry_stale_trials:
                heartbeat["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=retry_stale_trials
                )
    for attempt in range(_STORAGE_ATTEMPTS):
        try:
            with quiet_optuna_warnings():
                return optuna.storages.RDBStorage(location, engine_kwargs=engine_kwargs, **heartbeat)
        except ImportError as exc:
            raise ConfigError(f"--storage {shown}: its database driver is not installed ({exc}); e.g. pip install psycopg2-binary") from None
        except Exception as exc:  # sqlalchemy raises many kinds for unreachable / malformed databases
            error = exc
            if _is_timeout(exc):
                # Retrying would multiply the wait; a server that does not answer will not answer the next time.
                raise ConfigError(
                    f"--storage {shown}: the database server did not answer within storage_timeout "
                    f"({timeout:g}s): {_first_line(exc)}. Check that the host and port are a running "
                    "database server (not a proxy or another service), or raise storage_timeout"
                ) from exc
            # Workers started together on a fresh database race to create Optuna's tables: the loser retries.
            time.sleep(0.5 + random.random())
    raise ConfigError(
        f"--storage {shown}: cannot open the database: {_first_line(error)}. Check the URL, that the server runs and "
        "that the database exists (PostgreSQL: createdb NAME)"
    )


def with_installed_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed (SQLAlchemy 2.1 means psycopg 3 by it).

    psycopg2 is what ``pip install psycopg2-binary`` (the usual advice) gives; when only it is there, the
    bare scheme is pointed at it instead of failing with "driver not installed".
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    if importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2") is not None:
        return f"postgresql+psycopg2://{rest}"
    return f"postgresql://{rest}" if scheme == "postgres" else url


def engine_options(url: str, timeout: float) -> dict[str, Any]:
    """SQLAlchemy ``engine_kwargs`` that bound every wait on the database to about ``timeout`` seconds."""
    seconds = max(1, math.ceil(timeout))
    backend = url.partition("://")[0].partition("+")[0]
    if backend == "sqlite":
        # Several local workers share one SQLite file: wait for the write lock instead of failing at once.
        return {"connect_args": {"timeout": max(timeout, 60)}}
    options: dict[str, Any] = {"pool_pre_ping": True, "pool_timeout": seconds}
    if backend in ("postgresql", "postgres"):
        # libpq's connect_timeout bounds the whole connection start-up (at least 2 s); statement_timeout bounds
        # each statement on the server. A server that accepts and never answers is then an error, not a hang.
        options["connect_args"] = {"connect_timeout": max(2, seconds), "options": f"-c statement_timeout={seconds * 1000}"}
    elif backend in ("mysql", "mariadb"):
        options["connect_args"] = {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
    return options


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark trials of dead workers failed (and re-queue them, if configured) now rather than at the next ask."""
    import optuna

    from sonar_ft.tune.console import quiet_optuna_warnings

    with quiet_optuna_warnings():
        optuna.storages.fail_stale_trials(study)


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timeout" in text or "timed out" in text or "statement_timeout" in text


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
