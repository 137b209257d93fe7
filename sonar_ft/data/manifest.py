"""Manifests: which clips exist, how many feature frames each has, and its target text.

Formats read by :func:`read_manifest` (all tab-separated):

- ours: header ``id  length  text`` in any column order, ``length`` optional;
- ssvp_slt's headerless ``name  length  label``, or a headerless ``id  text``;
- How2Sign's "English translation (manually re-aligned)" CSV, which is tab-separated despite
  its name; detected by its header: id = ``SENTENCE_NAME``, text = ``SENTENCE``.

Quoting (the same rule for every format): a field that is CSV-quoted the way Python's ``csv`` module
and pandas' ``to_csv(sep="\t")`` write it -- it starts and ends with a double quote and every quote
inside is doubled -- is read as the text that was written, and may then hold tabs and line breaks.
Any other field is kept byte for byte, quotes included (``"Stop," she said.``, a lone opening
quote, or one opened in a row and closed rows later). :func:`write_manifest` quotes exactly as
Python's ``csv`` module does, so what it writes reads back equal here and with ``csv`` / pandas.
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from tqdm.auto import tqdm

from sonar_ft.data.features import FeatureStore
from sonar_ft.errors import DataError
from sonar_ft.files.atomic import write_text

log = logging.getLogger(__name__)

HEADER: tuple[str, ...] = ("id", "length", "text")
# Header names accepted for each role (compared case-insensitively).
ID_NAMES = ("id", "name")
LENGTH_NAMES = ("length", "frames", "num_frames")
TEXT_NAMES = ("text", "label")
HOW2SIGN_ID = "sentence_name"
HOW2SIGN_TEXT = "sentence"
# A message listing thousands of broken rows helps nobody; the count is always exact.
MAX_LISTED = 20

_FORMAT_HINT = (
    "expected tab-separated columns id, length (optional), text, one clip per line; "
    "a text holding a tab or a line break is written CSV-quoted (in double quotes, inner quotes doubled), "
    "as Python's csv module and pandas write it"
)
QUOTE = '"'
_LINE_ENDS = "\r\n"


@dataclass(frozen=True)
class ManifestRow:
    """One clip: its id (feature file stem), target text, frame count if known, source line."""

    id: str
    text: str
    length: int | None = None
    line: int = 0  # 1-based line in the source file, for error messages; 0 if not from a file


class _Record(NamedTuple):
    first: int
    last: int
    fields: list[str]


def _where(rec: _Record) -> str:
    return f"line {rec.first}" if rec.first == rec.last else f"lines {rec.first}-{rec.last}"


def _decode(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"manifest not found: {path}")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    bad = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(number)
    listed = ", ".join(str(n) for n in bad[:MAX_LISTED]) + (" ..." if len(bad) > MAX_LISTED else "")
    raise DataError(
        f"manifest {path} is not UTF-8 text: undecodable bytes on line(s) {listed}; "
        "re-save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.tsv > out.tsv`)"
    )


def _is_how2sign(text: str) -> bool:
    first = next((line for line in text.splitlines() if line.strip()), "")
    names = [f.strip().strip(QUOTE).lower() for f in first.split("\t")]
    return HOW2SIGN_ID in names or HOW2SIGN_TEXT in names


def _quoted_field(text: str, start: int) -> tuple[str, int] | None:
    """The CSV-quoted field opening at ``text[start]`` (a quote): ``(value, end)``, or None when it is not one.

    It is one when a closing quote (not doubled) comes before the end of the data and is followed by
    a tab, a line end or the end of the data; every quote between is doubled. Anything else -- a
    quote that never closes, or one followed by more text (``"Stop," she said.``) -- is text. So is
    a "field" that would take in whole rows (a line after a line break holds a tab): that is a text
    opening a quote in one row and another closing one rows later, and merging them would lose clips.
    """
    pos = start + 1
    while True:
        close = text.find(QUOTE, pos)
        if close < 0:
            return None
        if text.startswith(QUOTE, close + 1):
            pos = close + 2  # a doubled quote inside the field
            continue
        after = close + 1
        if after < len(text) and text[after] not in "\t" + _LINE_ENDS:
            return None
        value = text[start + 1 : close]
        if _holds_a_row(value):
            return None
        return value.replace(QUOTE * 2, QUOTE), after


def _line_breaks(text: str) -> int:
    """Line breaks in ``text`` (``\\r\\n``, ``\\n`` and ``\\r`` count one each, nothing else does)."""
    return text.count("\n") + text.count("\r") - text.count("\r\n")


def _records(text: str) -> Iterator[_Record]:
    """Non-blank records with the physical lines they span: fields split at tabs, records at line ends.

    Only ``\\n``, ``\\r\\n`` and ``\\r`` end a line (``str.splitlines`` would also split at U+2028,
    ``\\x0c``...). A CSV-quoted field (:func:`_quoted_field`) is decoded and may span lines; every
    other field is kept exactly as written.
    """
    pos, line, size = 0, 1, len(text)
    while pos < size:
        first = line
        fields: list[str] = []
        while True:
            quoted = _quoted_field(text, pos) if text.startswith(QUOTE, pos) else None
            if quoted is not None:
                value, end = quoted
                line += _line_breaks(text[pos:end])
            else:
                end = pos
                while end < size and text[end] not in "\t" + _LINE_ENDS:
                    end += 1
                value = text[pos:end]
            fields.append(value)
            pos = end
            if pos < size and text[pos] == "\t":
                pos += 1
                continue
            break
        pos += 2 if text.startswith("\r\n", pos) else 1  # the line end (or past the end of the data)
        if any(f.strip() for f in fields):
            yield _Record(first, line, fields)
        line += 1


def _find(names: list[str], wanted: Iterable[str]) -> int | None:
    for i, name in enumerate(names):
        if name in wanted:
            return i
    return None


def _layout(path: Path, records: list[_Record]) -> tuple[int, int | None, int, int, bool]:
    """Return (id column, length column or None, text column, field count, has header)."""
    names = [f.strip().lower() for f in records[0].fields]
    if HOW2SIGN_ID in names or HOW2SIGN_TEXT in names:
        missing = [n.upper() for n in (HOW2SIGN_ID, HOW2SIGN_TEXT) if n not in names]
        if missing:
            raise DataError(
                f"manifest {path} line 1: How2Sign header lacks column(s) {', '.join(missing)} "
                f"(found: {', '.join(records[0].fields)}); use the re-aligned translation CSV"
            )
        return names.index(HOW2SIGN_ID), None, names.index(HOW2SIGN_TEXT), len(names), True
    known = set(ID_NAMES) | set(LENGTH_NAMES) | set(TEXT_NAMES)
    if any(n in known for n in names):
        i_id, i_len, i_text = (_find(names, ID_NAMES), _find(names, LENGTH_NAMES), _find(names, TEXT_NAMES))
        missing = [role for role, i in (("id", i_id), ("text", i_text)) if i is None]
        if missing:
            raise DataError(
                f"manifest {path} line 1: header has no {' or '.join(repr(m) for m in missing)} column "
                f"(found: {', '.join(records[0].fields)}); {_FORMAT_HINT}"
            )
        assert i_id is not None and i_text is not None
        return i_id, i_len, i_text, len(names), True
    # Headerless: trust the field count most rows agree on, so one broken first row is reported
    # as a broken row instead of making the whole file unreadable.
    counts = collections.Counter(len(r.fields) for r in records if len(r.fields) in (2, 3))
    if not counts:
        hint = " (it looks comma-separated; use tabs)" if "," in "".join(records[0].fields) else ""
        raise DataError(
            f"manifest {path}: no row has 2 or 3 tab-separated fields{hint}; {_FORMAT_HINT}"
        )
    width = counts.most_common(1)[0][0]
    return (0, 1, 2, 3, False) if width == 3 else (0, None, 1, 2, False)


def read_manifest(path: str | Path, *, allow_duplicates: bool = False) -> list[ManifestRow]:
    """Read a manifest (our TSV, ssvp_slt TSV or How2Sign re-aligned CSV) into rows.

    Raises :class:`DataError` naming the file and every bad line at once: non-UTF-8 bytes,
    no rows, missing header columns, wrong field count, a length that is not a whole number,
    an empty id, duplicate ids (unless ``allow_duplicates``; ``verify`` reports them instead).
    Rows with an empty text are kept; ``verify`` reports them.
    """
    path = Path(path)
    records = list(_records(_decode(path)))
    if not records:
        raise DataError(f"manifest {path} is empty; {_FORMAT_HINT}")
    i_id, i_len, i_text, width, has_header = _layout(path, records)
    body = records[1:] if has_header else records
    if not body:
        raise DataError(f"manifest {path} has a header but no rows")

    how2sign = _is_how2sign_layout(records, has_header)
    rows: list[ManifestRow] = []
    problems: list[str] = []
    for rec in body:
        if len(rec.fields) != width:
            hint = ""
            if len(rec.fields) > width and rec.first == rec.last:
                hint = (" (a tab inside the text? write that text CSV-quoted -- in double quotes, inner quotes doubled, "
                        "as Python's csv module and pandas do -- or replace the tab with a space)")
            problems.append(f"{_where(rec)}: expected {width} fields, found {len(rec.fields)}{hint}")
            continue
        clip_id = rec.fields[i_id].strip()
        if not clip_id:
            problems.append(f"{_where(rec)}: empty id")
            continue
        length = None
        if i_len is not None:
            raw = rec.fields[i_len].strip()
            if raw:
                if not (raw.isascii() and raw.isdigit()):
                    problems.append(f"{_where(rec)}: length {raw!r} is not a whole number of frames")
                    continue
                length = int(raw)
        # How2Sign's texts carry stray spaces; ours are kept exactly as written.
        text = rec.fields[i_text].strip() if how2sign else rec.fields[i_text]
        rows.append(ManifestRow(id=clip_id, text=text, length=length, line=rec.first))

    if not allow_duplicates:
        problems.extend(
            f"duplicate id {clip_id!r} on lines {', '.join(str(n) for n in lines)}"
            for clip_id, lines in duplicate_ids(rows).items()
        )
    if problems:
        listed = "; ".join(problems[:MAX_LISTED])
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"manifest {path} has {len(problems)} problem(s): {listed}{more}")
    return rows


def _holds_a_row(value: str) -> bool:
    """True when a line after a line break in ``value`` holds a tab, i.e. looks like a manifest row of its own."""
    return any("\t" in part for part in value.replace("\r\n", "\n").replace("\r", "\n").split("\n")[1:])


def _is_how2sign_layout(records: list[_Record], has_header: bool) -> bool:
    return has_header and any(f.strip().lower() in (HOW2SIGN_ID, HOW2SIGN_TEXT) for f in records[0].fields)


def duplicate_ids(rows: Iterable[ManifestRow]) -> dict[str, list[int]]:
    """Map each id that occurs more than once to the lines it occurs on."""
    lines: dict[str, list[int]] = collections.defaultdict(list)
    for row in rows:
        lines[row.id].append(row.line)
    return {clip_id: where for clip_id, where in lines.items() if len(where) > 1}


def csv_field(value: str) -> str:
    """``value`` as Python's ``csv`` module writes it into a TSV (``QUOTE_MINIMAL``): quoted, inner quotes
    doubled, when it holds a tab, a quote or a line end (``\\r`` too, which ``csv.writer`` leaves bare
    under a ``\\n`` line terminator although its reader ends a line there); as is otherwise."""
    if any(c in value for c in "\t" + QUOTE + _LINE_ENDS):
        return QUOTE + value.replace(QUOTE, QUOTE * 2) + QUOTE
    return value


def write_manifest(path: str | Path, rows: Iterable[ManifestRow], *, source: str | Path | None = None) -> None:
    """Atomically write ``rows`` as our TSV with header ``id  length  text``.

    Fields are CSV-quoted where Python's ``csv`` needs it (:func:`csv_field`), so the file reads back
    equal with :func:`read_manifest`, ``csv.reader(delimiter="\\t")`` and ``pandas.read_csv(sep="\\t")``.
    The one text that cannot be written so is one holding a line break followed by a tab (read back,
    that line would be taken for a row of its own): DataError names the row (and its line in
    ``source``, if given) and nothing is written.
    """
    lines = ["\t".join(HEADER)]
    bad: list[str] = []
    for row in rows:
        fields = [row.id, "" if row.length is None else str(row.length), row.text]
        if any(_holds_a_row(f) for f in fields):
            where = f"line {row.line} of {source}" if source and row.line else f"id {row.id!r}"
            bad.append(f"{where}: {row.text!r}")
            continue
        lines.append("\t".join(csv_field(f) for f in fields))
    if bad:
        listed = "; ".join(bad[:MAX_LISTED]) + (f"; ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
        raise DataError(
            f"cannot write manifest {path}: {len(bad)} text(s) or id(s) hold a line break followed by a tab, which "
            f"would read back as a row of its own ({listed}); replace those tabs with spaces in the source"
        )
    write_text(path, "\n".join(lines) + "\n")


def how2sign_to_tsv(
    csv_path: str | Path,
    features_dir: str | Path,
    out_path: str | Path,
    *,
    epoch: int | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert a How2Sign CSV (or any manifest) to our TSV with ``length`` read from the features.

    Rows without a feature file, or whose file cannot be read, are left out and reported.
    Returns ``{"csv", "features", "out", "rows", "written", "missing": [ids],
    "unreadable": {id: message}}``.
    """
    from sonar_ft.files.guards import check_output_not_input

    check_output_not_input(out_path, {"the CSV": csv_path, "--features": features_dir})
    rows = read_manifest(csv_path)
    store = FeatureStore.open(features_dir, epoch=epoch)
    kept: list[ManifestRow] = []
    missing: list[str] = []
    unreadable: dict[str, str] = {}
    for row in tqdm(rows, desc="reading frame counts", unit="clip", disable=None if progress else True):  # None: bars only in a terminal
        if row.id not in store:
            missing.append(row.id)
            continue
        try:
            kept.append(replace(row, length=store.num_frames(row.id)))
        except DataError as exc:
            unreadable[row.id] = str(exc)
    if not kept:
        raise DataError(
            f"none of the {len(rows)} clips in {csv_path} has a readable feature file in {features_dir} "
            f"(e.g. no {rows[0].id}.npy / .pt); check that --features points at the right folder"
        )
    write_manifest(out_path, kept, source=csv_path)
    log.info("wrote %d of %d rows to %s", len(kept), len(rows), out_path)
    return {
        "csv": str(csv_path),
        "features": str(features_dir),
        "out": str(out_path),
        "rows": len(rows),
        "written": len(kept),
        "missing": missing,
        "unreadable": unreadable,
    }
