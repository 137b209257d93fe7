"""Manifests: which clips exist, how many feature frames each has, and its target text.

Formats read by :func:`read_manifest` (all tab-separated):

- ours: header ``id  length  text`` in any column order, ``length`` optional;
- ssvp_slt's headerless ``name  length  label``, or a headerless ``id  text``;
- How2Sign's "English translation (manually re-aligned)" CSV, which is tab-separated despite
  its name; detected by its header: id = ``SENTENCE_NAME``, text = ``SENTENCE``.

Our TSVs (and ssvp_slt's) are read byte for byte: one clip per line, fields split at tabs, and
nothing else. A double quote is text (``"Hello," she said.`` stays exactly that), so a text can hold
neither a tab nor a line break; :func:`write_manifest` refuses such a text instead of quoting it.
Only How2Sign's CSV is read with CSV quoting (a field in ``"..."`` with inner quotes doubled), as
it was written that way.
"""

from __future__ import annotations

import collections
import csv
import io
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
    "texts are read exactly as written (quotes are part of the text) and cannot hold tabs or line breaks"
)


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
    names = [f.strip().strip('"').lower() for f in first.split("\t")]
    return HOW2SIGN_ID in names or HOW2SIGN_TEXT in names


def _records(path: Path, text: str) -> Iterator[_Record]:
    """Yield non-blank records with the physical lines they span (CSV quoting only for How2Sign)."""
    if not _is_how2sign(text):
        yield from _tsv_records(text)
        return
    # newline="" keeps line endings for csv and splits only on \n, \r\n, \r (not U+2028 etc.).
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quotechar='"')
    last = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(
                f"manifest {path} line {last + 1}: {exc} (a double quote that is never closed?); "
                'How2Sign CSV texts holding tabs or quotes are written as "..." with inner quotes doubled'
            ) from None
        first, last = last + 1, reader.line_num
        if all(not f.strip() for f in fields):
            continue
        yield _Record(first, last, fields)


def _tsv_records(text: str) -> Iterator[_Record]:
    """Our TSV: one record per line, split at tabs, every other character kept as written."""
    # Only \n, \r\n and \r end a line (str.splitlines would also split at U+2028, \x0c...).
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        yield _Record(number, number, line.split("\t"))


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
    records = list(_records(path, _decode(path)))
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
            if rec.first != rec.last:
                hint = " (a double quote opened here is never closed?)"
            elif len(rec.fields) > width and not how2sign:
                hint = (" (a tab inside the text? a TSV manifest's text cannot hold tabs: replace them with spaces;"
                        " quotes are kept as text, so quoting does not help)")
            else:
                hint = ""
            problems.append(f"{_where(rec)}: expected {width} fields, found {len(rec.fields)}{hint}")
            continue
        # A quote left open swallows the following rows into one text; their tabs give it away.
        if rec.first != rec.last and any("\n" in f and "\t" in f for f in rec.fields):
            problems.append(f"{_where(rec)}: a double quote opened here is never closed")
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

    if not how2sign:
        _warn_old_quoting(path, rows)
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


def _looks_csv_quoted(text: str) -> bool:
    """True for ``"..."`` with every inner quote doubled and holding a quote: how older sonar-ft versions wrote such texts."""
    inner = text[1:-1]
    return len(text) >= 4 and text[0] == text[-1] == '"' and '""' in inner and '"' not in inner.replace('""', "")


def _warn_old_quoting(path: Path, rows: list[ManifestRow]) -> None:
    quoted = [r.line for r in rows if _looks_csv_quoted(r.text)]
    if quoted:
        log.warning(
            "manifest %s: %d text(s) look CSV-quoted (e.g. line %d), as older sonar-ft versions wrote texts holding "
            "quotes; texts are now read exactly as written, quotes included. Re-create the manifest (sonar-ft manifest "
            "how2sign) if those quotes are not part of the sentences",
            path, len(quoted), quoted[0],
        )


def _is_how2sign_layout(records: list[_Record], has_header: bool) -> bool:
    return has_header and any(f.strip().lower() in (HOW2SIGN_ID, HOW2SIGN_TEXT) for f in records[0].fields)


def duplicate_ids(rows: Iterable[ManifestRow]) -> dict[str, list[int]]:
    """Map each id that occurs more than once to the lines it occurs on."""
    lines: dict[str, list[int]] = collections.defaultdict(list)
    for row in rows:
        lines[row.id].append(row.line)
    return {clip_id: where for clip_id, where in lines.items() if len(where) > 1}


def write_manifest(path: str | Path, rows: Iterable[ManifestRow], *, source: str | Path | None = None) -> None:
    """Atomically write ``rows`` as our TSV with header ``id  length  text``, texts exactly as given.

    Nothing is quoted (quotes are text). A text or id holding a tab or line break cannot be written
    so that it reads back the same: DataError names the row (and its line in ``source``, if given).
    """
    lines = ["\t".join(HEADER)]
    bad: list[str] = []
    for row in rows:
        fields = [row.id, "" if row.length is None else str(row.length), row.text]
        if any(c in f for f in fields for c in "\t\n\r"):
            where = f"line {row.line} of {source}" if source and row.line else f"id {row.id!r}"
            bad.append(f"{where}: {row.text!r}")
            continue
        lines.append("\t".join(fields))
    if bad:
        listed = "; ".join(bad[:MAX_LISTED]) + (f"; ... and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else "")
        raise DataError(
            f"cannot write manifest {path}: {len(bad)} text(s) or id(s) hold a tab or line break, which a TSV manifest "
            f"cannot hold ({listed}); replace them with spaces in the source"
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
