"""Output-versus-input checks, made before a command reads or writes anything.

A command whose output is one of its own inputs destroys that input (``sonar-ft manifest how2sign
CSV --out CSV`` replaced the CSV; ``sonar-ft export --out RUN/best_encoder.pt`` replaced the trained
encoder with the tarball). :func:`check_output_not_input` refuses an output that is, contains or is
inside an input, or that is one of the files a run folder keeps.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

from sonar_ft.errors import ConfigError

# Files a training run keeps in its output folder: never to be overwritten by another command.
RUN_RECORDS = ("best_encoder.pt", "last.pt", "config.json", "tokenizer.json", "test_results.json", "bad_samples.tsv")


def resolved(path: str | Path) -> Path:
    """``path`` made absolute with symlinks and ``..`` resolved (even where it does not exist yet)."""
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_not_input(
    out: str | Path,
    inputs: Mapping[str, str | Path | None] | Iterable[tuple[str, str | Path | None]],
    *,
    flag: str = "--out",
    out_is_folder: bool = False,
) -> None:
    """Refuse an output that would overwrite or sit inside one of ``inputs``; ConfigError names both flags.

    ``inputs`` maps the flag that named each input to its path (None entries are skipped). For a file
    output, it may not be an input file, lie inside an input folder, or hold an input inside it (a
    folder given as the file to write). For a folder output (``out_is_folder``), no input may be in it,
    and it may not be an input or lie inside an input folder: whatever it writes would mix with, or
    replace, what it reads.
    """
    items = inputs.items() if isinstance(inputs, Mapping) else inputs
    target = resolved(out)
    for in_flag, value in items:
        if value is None:
            continue
        source = resolved(value)
        if target == source:
            raise ConfigError(
                f"{flag} {out} is the same path as {in_flag} {value}: writing it would destroy the input. "
                f"Choose another {flag}."
            )
        if _inside(target, source):
            raise ConfigError(
                f"{flag} {out} is inside {in_flag} {value}: writing there would mix the output into the input. "
                f"Choose an {flag} outside it."
            )
        if _inside(source, target):
            what = "folder" if out_is_folder else "path"
            raise ConfigError(
                f"{flag} {out} would replace or write into {in_flag} {value}, which is inside that {what}. "
                f"Choose another {flag}."
            )


def check_not_run_record(out: str | Path, *, flag: str = "--out") -> None:
    """Refuse an output file named like a run's own records (``best_encoder.pt``, ``last.pt``...) in a run folder."""
    target = resolved(out)
    if target.name in RUN_RECORDS and (target.parent / "config.json").is_file():
        raise ConfigError(
            f"{flag} {out} would replace {target.name} of the training run in {target.parent}. "
            f"Choose another {flag} (e.g. {target.parent / 'sonar_encoder_finetuned.tar.gz'})."
        )


def check_not_folder(out: str | Path, *, flag: str = "--out", example: str = "") -> None:
    """Refuse an output file path that names an existing folder."""
    if Path(out).is_dir():
        hint = f", e.g. {Path(out) / example}" if example else ""
        raise ConfigError(f"{flag} {out} is a folder; give the path of the file to write{hint}")
