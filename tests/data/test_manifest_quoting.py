"""Manifests written by pandas and Python's ``csv`` read back exactly; quotes that are not CSV quoting stay text."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from sonar_ft.data.manifest import ManifestRow, read_manifest, write_manifest
from sonar_ft.errors import DataError

# Texts a How2Sign-like corpus holds, and the ones a CSV writer has to quote.
TEXTS = [
    'He said "hi" to me.',
    '"Stop," she said.',
    '"All of it in quotes."',
    'ends with a quote"',
    'a lone " in the middle',
    '""',
    "a\ttab inside",
    "two\nlines",
    "windows\r\nline end",
    "a bare\rcarriage return",
    '"quoted\tand tabbed"',
    "  spaces kept  ",
    "Café — 日本語 ✓",
    "plain",
]
ROWS = [ManifestRow(f"clip_{i}", text, 10 + i, line=0) for i, text in enumerate(TEXTS)]


def _texts(path: Path) -> list[str]:
    return [r.text for r in read_manifest(path)]


def _with_lines(rows: list[ManifestRow], path: Path) -> list[ManifestRow]:
    """``rows`` with the lines they start on in ``path`` (a text holding line breaks spans several)."""
    lines = [r.line for r in read_manifest(path)]
    return [ManifestRow(r.id, r.text, r.length, line=n) for r, n in zip(rows, lines)]


# pandas writes a bare \r unquoted under its \n line terminator: no reader (its own, csv's) gets it back.
PANDAS_ROWS = [r for r in ROWS if r.text != "a bare\rcarriage return"]


def test_a_manifest_written_by_pandas_reads_back_the_texts_written(tmp_path):
    path = tmp_path / "train.tsv"
    frame = pd.DataFrame({"id": [r.id for r in PANDAS_ROWS], "length": [r.length for r in PANDAS_ROWS],
                          "text": [r.text for r in PANDAS_ROWS]})
    frame.to_csv(path, sep="\t", index=False)
    assert read_manifest(path) == _with_lines(PANDAS_ROWS, path)


def test_a_manifest_written_by_the_csv_module_reads_back_the_texts_written(tmp_path):
    path = tmp_path / "train.tsv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")  # the default \r\n line terminator
        writer.writerow(["id", "length", "text"])
        writer.writerows([r.id, r.length, r.text] for r in ROWS)
    assert _texts(path) == TEXTS


def test_every_field_may_be_quoted(tmp_path):
    path = tmp_path / "train.tsv"
    frame = pd.DataFrame({"id": [r.id for r in ROWS], "length": [str(r.length) for r in ROWS], "text": TEXTS})
    frame.to_csv(path, sep="\t", index=False, quoting=csv.QUOTE_ALL)  # a bare \r is quoted with the rest
    assert read_manifest(path) == _with_lines(ROWS, path)


def test_write_manifest_is_read_back_exactly_by_csv_pandas_and_read_manifest(tmp_path):
    path = tmp_path / "train.tsv"
    write_manifest(path, ROWS)
    assert read_manifest(path) == _with_lines(ROWS, path)
    with open(path, encoding="utf-8", newline="") as f:
        assert [row["text"] for row in csv.DictReader(f, delimiter="\t")] == TEXTS
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    assert frame["text"].tolist() == TEXTS


@pytest.mark.parametrize("text", ['"Stop," she said.', '"never closed', 'one " lone', 'He said "no"', '"a" and "b"'])
def test_quotes_that_are_not_csv_quoting_are_kept_byte_for_byte(tmp_path, text):
    path = tmp_path / "m.tsv"
    path.write_text(f"id\tlength\ttext\na\t3\t{text}\nb\t4\tnext row\n", encoding="utf-8")
    assert read_manifest(path) == [ManifestRow("a", text, 3, line=2), ManifestRow("b", "next row", 4, line=3)]


def test_line_numbers_count_the_lines_a_quoted_text_spans(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text('id\ttext\na\t"one\ntwo\nthree"\nb\tafter\n', encoding="utf-8")
    assert [(r.id, r.text, r.line) for r in read_manifest(path)] == [("a", "one\ntwo\nthree", 2), ("b", "after", 5)]


def test_an_open_quote_closed_rows_later_stays_text_and_merges_nothing(tmp_path):
    # Two clips of one quoted utterance: the first text opens a quote, a later one closes it.
    path = tmp_path / "m.tsv"
    path.write_text('id\ttext\na\t"I went home.\nb\tfine\nc\tThen I slept."\n', encoding="utf-8")
    assert [(r.id, r.text, r.line) for r in read_manifest(path)] == [
        ("a", '"I went home.', 2), ("b", "fine", 3), ("c", 'Then I slept."', 4)]


def test_a_text_that_would_read_back_as_merged_rows_is_refused_on_write(tmp_path):
    path = tmp_path / "m.tsv"
    with pytest.raises(DataError, match=r"cannot write manifest .*line break followed by a tab, which would read back "
                                        r"as a row of its own \(id 'x'"):
        write_manifest(path, [ManifestRow("x", "one\ntwo\tthree", 3)])
    assert not path.exists()


def test_an_unquoted_tab_still_names_the_line_and_the_fix(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("id\tlength\ttext\na\t3\tone\ttwo\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: expected 3 fields, found 4 \(a tab inside the text\? write that text "
                                        r"CSV-quoted"):
        read_manifest(path)
