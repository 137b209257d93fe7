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
import re
import sys
from typing import Sequence, TextIO

from sonar_ft.errors import SonarFtError

# Sub-command name -> (module that registers it, one-line help). Only the module of the command
# being run is imported (most import torch, ~5-10 s); `sonar-ft --help` lists them from this table.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("sonar_ft.training.cli", "fine-tune the encoder (the recipe; same flags as train_sonar_finetuning.py)"),
    "verify": ("sonar_ft.data.commands", "check a manifest + feature folder before training"),
    "manifest": ("sonar_ft.data.commands", "build manifests"),
    "pack": ("sonar_ft.data.commands", "a feature folder -> one archive with sizes and checksums (copy it to Drive once)"),
    "unpack": ("sonar_ft.data.commands", "an archive (or a folder) -> a checked copy on local disk, once per runtime"),
    "extract": ("sonar_ft.inference.extract", "sign videos -> SignHiera features (<id>.npy) for training and translation"),
    "embed": ("sonar_ft.inference.embed", "features -> SONAR sentence embeddings (.npy)"),
    "export": ("sonar_ft.export.pack", "pack a run's best encoder + records + model card as a tarball"),
    "translate": ("sonar_ft.inference.translate", "translate feature clips or videos with a fine-tuned encoder"),
    "tune": ("sonar_ft.tune.cli", "Optuna search over the fine-tuning settings (resumable, prunable, parallel)"),
    "train-from-tuning": ("sonar_ft.tune.cli", "train with a study's best settings (its best_config.yaml), overrides allowed"),
    "plan": ("sonar_ft.plan.cli", "estimate GPU memory of fine-tuning the official-size encoder and recommend settings that fit"),
    "download": ("sonar_ft.download", "download one file safely (resumable, size / SHA-256 checked, written atomically)"),
}
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))


# A negative number as argparse does not recognise one (it knows -1 and -0.5, not -1e-4, -5. or -inf).
_NEGATIVE_NUMBER = re.compile(r"-(\d[\d_]*\.?\d*|\.\d+)([eE][-+]?\d+)?|-inf(inity)?|-nan", re.IGNORECASE)


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--flag -1e-4`` written as ``--flag=-1e-4``.

    argparse takes a value that starts with ``-`` and is not a plain negative number for a flag and
    answers "expected one argument", which hides the real problem; joined, the value reaches the
    flag's own check (:meth:`~sonar_ft.config.TrainConfig.validate`: ``--learning_rate must be in (0, inf) (got -0.0001)``).
    No sonar-ft flag looks like a number, so a number after a long flag is always that flag's value.
    Everything after ``--`` is left alone.
    """
    args = list(argv)
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            out.extend(args[i:])
            break
        value = args[i + 1] if i + 1 < len(args) else None
        if arg.startswith("--") and "=" not in arg and value is not None and _NEGATIVE_NUMBER.fullmatch(value):
            out.append(f"{arg}={value}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``sonar-ft`` parser; with ``argv``, only the chosen command's module is imported."""
    parser = argparse.ArgumentParser(
        prog="sonar-ft",
        description="Fine-tune the SONAR ASL encoder on How2Sign (see README.md).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in (argv or []) if not a.startswith("-")), None) if argv is not None else None
    if argv is None or chosen not in COMMANDS:
        if argv is None:  # every real parser (for tools that inspect them all)
            for name in COMMAND_MODULES:
                importlib.import_module(name).register(subparsers)
        else:  # help or a typo: the names and one line each, no imports
            for name, (_, help_text) in COMMANDS.items():
                subparsers.add_parser(name, help=help_text, add_help=False)
        return parser
    module = COMMANDS[chosen][0]
    importlib.import_module(module).register(subparsers)
    for name, (other, help_text) in COMMANDS.items():
        if other != module:
            subparsers.add_parser(name, help=help_text, add_help=False)
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
    systems on every start) stays hidden, their warnings do not; no dependency draws bars into a pipe."""
    from sonar_ft.progress import quiet_dependencies

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=stream)
    logging.getLogger("fairseq2").setLevel(logging.WARNING)
    quiet_dependencies()


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    argv = join_negative_values(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return run(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
