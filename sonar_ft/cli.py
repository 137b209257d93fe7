"""The ``sonar-ft`` command: one sub-command per job, each defined next to the code it drives.

Every sub-command module exposes ``register(subparsers)``, which adds its parser and sets
``func`` (a callable taking the parsed ``argparse.Namespace`` and returning an exit code).
Errors a user can cause (:class:`~sonar_ft.errors.SonarFtError`) become one line on stderr
and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence, TextIO

from sonar_ft.errors import SonarFtError

# Sub-command modules, imported lazily so `sonar-ft --help` stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "sonar_ft.data.commands",  # manifest how2sign, verify
    "sonar_ft.embed",  # embed
    "sonar_ft.export",  # export, translate
    "sonar_ft.tune_cli",  # tune, train-from-tuning
    "sonar_ft.plan",  # plan
    "sonar_ft.download",  # download
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sonar-ft",
        description="Fine-tune the SONAR ASL encoder on How2Sign (see README.md).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def run(func, args: argparse.Namespace) -> int:
    """Call ``func(args)``, turning project errors into one clear line and exit code 2."""
    try:
        return int(func(args) or 0)
    except SonarFtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def setup_logging(stream: TextIO | None = None) -> None:
    """Our INFO messages as plain lines; libraries' INFO chatter (fairseq2 announcing its file
    systems on every start) stays hidden, their warnings do not."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=stream)
    logging.getLogger("fairseq2").setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
