"""Read an export tarball back, safely: members checked before anything is extracted, then the encoder and decoder it names.

A sonar-ft export holds only the files named here (:data:`ALLOWED_MEMBERS`); absolute paths, ``..``,
links, devices, too many members or too many bytes are refused before extraction. :func:`load_any_encoder`
takes a tarball or a plain checkpoint alike.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

from sonar_ft.errors import CheckpointError, ConfigError
from sonar_ft.files import atomic
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder, load_encoder
from sonar_ft.run_files import BEST_ENCODER, CONFIG_FILE, TEST_RESULTS, TOKENIZER_FILE

ENCODER_FILE = BEST_ENCODER


REQUIRED_MEMBERS = (ENCODER_FILE, CONFIG_FILE, TOKENIZER_FILE, "README.md")


# A local decoder travels as these fixed names (never the names it had): card, weights, tokenizer.
PACKED_DECODER = ("decoder.yaml", "decoder.pt", "tokenizer.yaml", "tokenizer.model")


OPTIONAL_MEMBERS = ("metrics.json", TEST_RESULTS, *PACKED_DECODER)


ALLOWED_MEMBERS = frozenset(REQUIRED_MEMBERS + OPTIONAL_MEMBERS)


MAX_MEMBER_BYTES = 16 * 1024**3  # no real encoder is larger; refuses decompression bombs


# A real export has at most len(ALLOWED_MEMBERS) members: counted while reading headers, so a small
# tarball with 200,000 members is refused after a few headers instead of extracted for minutes.
MAX_MEMBERS = 16


MAX_TOTAL_BYTES = 32 * 1024**3


def local_file(value: Any, base: Path | None = None) -> Path | None:
    """A local file named by ``value`` (plain path, relative to ``base`` when given, or ``file://`` URI), else None."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("file://"):
        path = Path(unquote(urlparse(value).path))
    elif "://" in value:
        return None
    else:
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
    return path if path.is_file() else None


def recorded_file(record: dict[str, Any], key: str) -> Path | None:
    """The local file a ``tokenizer.json`` entry names: its recorded absolute path, else the path as typed."""
    return local_file(record.get(f"{key}_file")) or local_file(record.get(key))


def looks_local(spec: Any) -> bool:
    """Whether a ``--decoder`` / ``--tokenizer`` value names a local file rather than an asset card name."""
    text = str(spec or "")
    return "/" in text or Path(text).suffix in (".yaml", ".yml", ".pt", ".pth", ".model")


def check_members(tar: tarfile.TarFile, source: Path) -> list[tarfile.TarInfo]:
    """Refuse absolute paths, ``..``, links, devices, unexpected names and oversized members."""
    members = read_members(tar, source)
    for m in members:
        name = m.name
        if name.startswith("/") or ".." in Path(name).parts or "/" in name.strip("./"):
            raise CheckpointError(f"{source}: refusing member {name!r} (absolute path, '..' or a folder): not a sonar-ft export")
        if not m.isfile():
            raise CheckpointError(f"{source}: refusing member {name!r} (links, devices and folders are not allowed)")
        if Path(name).name not in ALLOWED_MEMBERS:
            raise CheckpointError(f"{source}: unexpected member {name!r}; a sonar-ft export holds only {', '.join(sorted(ALLOWED_MEMBERS))}")
        if m.size > MAX_MEMBER_BYTES:
            raise CheckpointError(f"{source}: member {name!r} is implausibly large ({m.size} bytes)")
    names = {Path(m.name).name for m in members}
    missing = [n for n in REQUIRED_MEMBERS if n not in names]
    if missing:
        raise CheckpointError(f"{source}: not a complete sonar-ft export (missing {', '.join(missing)})")
    return members


def read_members(tar: tarfile.TarFile, source: Path) -> list[tarfile.TarInfo]:
    """The members of ``tar``, read header by header: more than :data:`MAX_MEMBERS`, a name twice, or a total
    size above :data:`MAX_TOTAL_BYTES` is refused before any more headers are read or anything is extracted."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    for m in tar:
        members.append(m)
        if len(members) > MAX_MEMBERS:
            raise CheckpointError(
                f"{source}: more than {MAX_MEMBERS} members; a sonar-ft export holds at most {len(ALLOWED_MEMBERS)} "
                "files. Refusing it before extracting anything: it is not a sonar-ft export (export it again)"
            )
        if m.name in seen:
            raise CheckpointError(f"{source}: member {m.name!r} appears twice; not a sonar-ft export (export it again)")
        seen.add(m.name)
        total += max(m.size, 0)
        if total > MAX_TOTAL_BYTES:
            raise CheckpointError(
                f"{source}: its members add up to more than {MAX_TOTAL_BYTES:,} bytes; refusing to extract it"
            )
    return members


def open_export(path: str | Path, into: str | Path) -> dict[str, Path]:
    """Check and extract an export tarball into ``into``; return member name → path."""
    path, into = Path(path), Path(into)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = check_members(tar, path)
            into.mkdir(parents=True, exist_ok=True)
            out = {}
            for m in members:
                target = into / Path(m.name).name
                src = tar.extractfile(m)
                if src is None:
                    raise CheckpointError(f"{path}: cannot read member {m.name!r}")
                with src, atomic.atomic_path(target) as tmp, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                out[target.name] = target
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read export {path}: {exc}. The file may be truncated; export it again.") from None
    return out


def is_export(path: str | Path) -> bool:
    """Whether ``path`` names an export tarball (``.tar.gz`` / ``.tgz`` / ``.tar``) rather than a checkpoint."""
    path = Path(path)
    return path.suffixes[-2:] == [".tar", ".gz"] or path.suffix in (".tgz", ".tar")


@contextlib.contextmanager
def opened_encoder(path: str | Path) -> Iterator[tuple[Path, dict[str, Path]]]:
    """``(checkpoint, members)`` of an export tarball (checked, extracted to a temporary folder for the
    ``with`` block) or of a plain checkpoint (``members`` empty)."""
    if not is_export(path):
        yield Path(path), {}
        return
    with tempfile.TemporaryDirectory() as tmp:
        files = open_export(path, tmp)
        yield files[ENCODER_FILE], files


def load_any_encoder(path: str | Path, *, device: Any = "cpu") -> tuple[SignT5SonarEncoder, SignT5Config]:
    """:func:`sonar_ft.models.encoder.load_encoder` for a checkpoint or an export tarball."""
    with opened_encoder(path) as (checkpoint, _):
        return load_encoder(checkpoint, device=device)


def decoder_for(files: dict[str, Path], decoder: str | None, tokenizer: str | None) -> tuple[str, str | None]:
    """The decoder and tokenizer to translate with: the flags when given, else what the export packed or recorded.

    ``--decoder`` alone is enough: the tokenizer then defaults to that decoder's own, not the export's.
    """
    if decoder:
        return decoder, tokenizer
    if TOKENIZER_FILE not in files:
        return "text_sonar_basic_decoder", tokenizer
    record = json.loads(files[TOKENIZER_FILE].read_text(encoding="utf-8"))
    packed = record.get("packed") or {}
    packed_tokenizer = str(files[packed["tokenizer"]]) if packed.get("tokenizer") in files else None
    tokenizer = tokenizer or packed_tokenizer
    if packed.get("decoder") in files:
        return str(files[packed["decoder"]]), tokenizer
    recorded = str(record.get("decoder") or "text_sonar_basic_decoder")
    recorded_tokenizer = None if record.get("tokenizer") in (None, record.get("decoder")) else record.get("tokenizer")
    if looks_local(recorded) and recorded_file(record, "decoder") is None:
        raise ConfigError(
            f"the encoder was trained with the local decoder {recorded!r}, which the export does not hold and which is not "
            "found from here: give --decoder PATH (that decoder's asset card .yaml or checkpoint)"
        )
    decoder_file = recorded_file(record, "decoder")
    tokenizer_file = recorded_file(record, "tokenizer")
    return (str(decoder_file) if decoder_file else recorded,
            tokenizer or (str(tokenizer_file) if tokenizer_file and recorded_tokenizer else recorded_tokenizer))
