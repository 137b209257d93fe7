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
from sonar_ft.run_files import (
    BAD_SAMPLES, BEST_ENCODER, CONFIG_FILE, LAST_STATE, METRICS_GLOB, PREDICTIONS_GLOB, TEST_RESULTS, TOKENIZER_FILE,
)

# Files a training run keeps in its output folder: never to be overwritten by another command.
RUN_RECORDS = (BEST_ENCODER, LAST_STATE, CONFIG_FILE, TOKENIZER_FILE, TEST_RESULTS, BAD_SAMPLES)


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
    if target.name in RUN_RECORDS and (target.parent / CONFIG_FILE).is_file():
        raise ConfigError(
            f"{flag} {out} would replace {target.name} of the training run in {target.parent}. "
            f"Choose another {flag} (e.g. {target.parent / 'sonar_encoder_finetuned.tar.gz'})."
        )


def check_not_folder(out: str | Path, *, flag: str = "--out", example: str = "") -> None:
    """Refuse an output file path that names an existing folder."""
    if Path(out).is_dir():
        hint = f", e.g. {Path(out) / example}" if example else ""
        raise ConfigError(f"{flag} {out} is a folder; give the path of the file to write{hint}")


# Files and patterns a training run writes (or deletes with --overwrite) directly in its --output_dir.
RUN_WRITES = RUN_RECORDS + ("README.md",)
RUN_WRITE_PATTERNS = (METRICS_GLOB, PREDICTIONS_GLOB)
# TrainConfig fields naming files or folders a run reads.
RECIPE_INPUT_FIELDS = ("train_features", "train_manifest", "val_features", "val_manifest", "encoder_checkpoint",
                       "decoder", "tokenizer", "text_encoder")


def recipe_inputs(cfg: object) -> dict[str, str]:
    """``{"--train_features": path, ...}`` for the input fields of a recipe config that name existing paths.

    Model settings (``decoder``, ``tokenizer``, ``text_encoder``) may be asset-card names instead of files:
    they count only when such a path exists.
    """
    found = {}
    for name in RECIPE_INPUT_FIELDS:
        value = getattr(cfg, name, None)
        if value and (name.endswith(("_features", "_manifest", "_checkpoint")) or Path(str(value)).exists()):
            found[f"--{name}"] = str(value)
    return found


def check_output_dir(
    output_dir: str | Path,
    inputs: Mapping[str, str | Path | None],
    *,
    flag: str = "--output_dir",
) -> None:
    """Refuse a run folder that is an input, lies inside an input folder, or would overwrite an input file.

    Inputs elsewhere inside the run folder (``RUN/data/features``) are fine; an input that is one of
    the files a run writes or deletes there (``RUN/best_encoder.pt`` given as --encoder_checkpoint, with
    --overwrite or a new run) is not. Feature folders matter most: a run folder inside one would put
    ``last.pt`` / ``best_encoder.pt`` among the clips.
    """
    import fnmatch

    target = resolved(output_dir)
    for in_flag, value in inputs.items():
        if value is None:
            continue
        source = resolved(value)
        if target == source:
            raise ConfigError(f"{flag} {output_dir} is the same path as {in_flag} {value}. Choose another {flag}.")
        if _inside(target, source):
            raise ConfigError(
                f"{flag} {output_dir} is inside {in_flag} {value}: the run's files would mix with its inputs. "
                f"Choose an {flag} outside it."
            )
        if source.parent == target and (
            source.name in RUN_WRITES or any(fnmatch.fnmatch(source.name, p) for p in RUN_WRITE_PATTERNS)
        ):
            raise ConfigError(
                f"{in_flag} {value} is a file this run writes in {flag} {output_dir}: it would be replaced. Copy it "
                f"elsewhere first (e.g. cp {value} {target.parent / ('input_' + source.name)}) or choose another {flag}."
            )
