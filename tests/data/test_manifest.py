"""Manifest reading / writing and the How2Sign CSV conversion."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from sonar_ft import cli
from sonar_ft.data import commands
from sonar_ft.data.manifest import ManifestRow, how2sign_to_tsv, read_manifest, write_manifest
from sonar_ft.errors import DataError

H2S_HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE\n"


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


def h2s_line(name: str, sentence_field: str) -> str:
    video = name.split("-")[0]
    return f"{video}\t{video}-rgb_front\t{video}_0\t{name}\t1.5\t4.25\t{sentence_field}\n"


def run_cli(argv: list[str]) -> int:
    # sonar_ft.cli.main also imports sonar_ft.inference.embed (another module); build only our commands.
    parser = argparse.ArgumentParser(prog="sonar-ft")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return cli.run(args.func, args)


# --- formats ------------------------------------------------------------------------------


def test_reads_tsv_with_header(tmp_path):
    path = write(tmp_path / "m.tsv", "id\tlength\ttext\na\t10\thello\nb\t\tworld\n")
    assert read_manifest(path) == [
        ManifestRow("a", "hello", 10, line=2),
        ManifestRow("b", "world", None, line=3),
    ]


def test_header_columns_in_any_order(tmp_path):
    path = write(tmp_path / "m.tsv", "text\tid\tlength\nhello\ta\t7\n")
    assert read_manifest(path) == [ManifestRow("a", "hello", 7, line=2)]


def test_length_column_is_optional(tmp_path):
    path = write(tmp_path / "m.tsv", "id\ttext\na\thello\n")
    assert read_manifest(path) == [ManifestRow("a", "hello", None, line=2)]


def test_headerless_ssvp_three_columns(tmp_path):
    path = write(tmp_path / "m.tsv", "clip_1\t120\tHi there.\nclip_2\t64\tBye.\n")
    assert read_manifest(path) == [
        ManifestRow("clip_1", "Hi there.", 120, line=1),
        ManifestRow("clip_2", "Bye.", 64, line=2),
    ]


def test_headerless_two_columns(tmp_path):
    path = write(tmp_path / "m.tsv", "clip_1\tHi there.\n")
    assert read_manifest(path) == [ManifestRow("clip_1", "Hi there.", None, line=1)]


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_bytes("\ufeffid\ttext\r\na\thello\r\n".encode("utf-8"))
    assert read_manifest(path) == [ManifestRow("a", "hello", None, line=2)]


@pytest.mark.parametrize(
    ("field", "text"),
    [
        ('"He said ""hi"" to me."', 'He said "hi" to me.'),
        ('"First, second, and third."', "First, second, and third."),
        ("Commas, unquoted, are fine.", "Commas, unquoted, are fine."),
        ('"a tab\there"', "a tab\there"),
        ("Café, naïve señor — 日本語 ✓", "Café, naïve señor — 日本語 ✓"),
    ],
    ids=["quotes", "quoted-commas", "commas", "tab-in-quotes", "non-ascii"],
)
def test_how2sign_csv_texts(tmp_path, field, text):
    path = write(tmp_path / "h2s.csv", H2S_HEADER + h2s_line("vid1_0-1-rgb_front", field))
    assert read_manifest(path) == [ManifestRow("vid1_0-1-rgb_front", text, None, line=2)]


def test_line_numbers_count_physical_lines(tmp_path):
    path = write(tmp_path / "m.tsv", "id\ttext\na\tone\n\nb\tlast\n")
    rows = read_manifest(path)
    assert [(r.id, r.text, r.line) for r in rows] == [("a", "one", 2), ("b", "last", 4)]


def test_empty_text_is_kept(tmp_path):
    path = write(tmp_path / "m.tsv", "id\tlength\ttext\na\t3\t\n")
    assert read_manifest(path) == [ManifestRow("a", "", 3, line=2)]


def test_write_then_read_round_trips(tmp_path):
    rows = [
        ManifestRow("a", 'quote " and, comma', 5, line=2),
        ManifestRow("b", '"Hello," she said.', None, line=3),
        ManifestRow("c", "ünïcode ✓", 0, line=4),
    ]
    out = tmp_path / "sub" / "m.tsv"
    write_manifest(out, rows)
    assert out.read_text(encoding="utf-8").startswith("id\tlength\ttext\n")
    assert read_manifest(out) == rows
    assert [p.name for p in out.parent.iterdir()] == ["m.tsv"]  # no temporary left behind


# --- bad input ------------------------------------------------------------------------------


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_bytes(b"id\ttext\na\tfine\nb\tcaf\xe9\n")
    with pytest.raises(DataError, match=r"m\.tsv.*not UTF-8.*line\(s\) 3"):
        read_manifest(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="manifest not found.*nope.tsv"):
        read_manifest(tmp_path / "nope.tsv")


@pytest.mark.parametrize("content", ["", "\n\n"], ids=["zero-bytes", "blank-lines"])
def test_empty_manifest(tmp_path, content):
    path = write(tmp_path / "m.tsv", content)
    with pytest.raises(DataError, match=r"m\.tsv is empty"):
        read_manifest(path)


def test_header_without_rows(tmp_path):
    path = write(tmp_path / "m.tsv", "id\tlength\ttext\n")
    with pytest.raises(DataError, match=r"m\.tsv has a header but no rows"):
        read_manifest(path)


def test_missing_text_column(tmp_path):
    path = write(tmp_path / "m.tsv", "id\tlength\na\t3\n")
    with pytest.raises(DataError, match=r"m\.tsv line 1: header has no 'text' column"):
        read_manifest(path)


def test_how2sign_header_without_sentence(tmp_path):
    path = write(tmp_path / "h2s.csv", "VIDEO_ID\tSENTENCE_NAME\nv\tv_0\n")
    with pytest.raises(DataError, match=r"h2s\.csv line 1: .*lacks column\(s\) SENTENCE\b"):
        read_manifest(path)


def test_wrong_field_count(tmp_path):
    path = write(tmp_path / "m.tsv", "id\tlength\ttext\na\t3\tok\nb\t4\n")
    with pytest.raises(DataError, match=r"m\.tsv has 1 problem.*line 3: expected 3 fields, found 2"):
        read_manifest(path)


def test_non_integer_length(tmp_path):
    path = write(tmp_path / "m.tsv", "a\t12.5\thello\n")
    with pytest.raises(DataError, match=r"m\.tsv .*line 1: length '12.5' is not a whole number"):
        read_manifest(path)


def test_duplicate_ids_name_their_lines(tmp_path):
    path = write(tmp_path / "m.tsv", "id\ttext\na\tx\nb\ty\na\tz\n")
    with pytest.raises(DataError, match=r"m\.tsv .*duplicate id 'a' on lines 2, 4"):
        read_manifest(path)


def test_duplicates_allowed_on_request(tmp_path):
    path = write(tmp_path / "m.tsv", "id\ttext\na\tx\na\tz\n")
    assert [r.line for r in read_manifest(path, allow_duplicates=True)] == [2, 3]


def test_all_problems_are_listed_at_once(tmp_path):
    path = write(tmp_path / "m.tsv", "id\tlength\ttext\na\tx\thi\nb\t1\nc\t2\tok\nc\t3\tdup\n")
    with pytest.raises(DataError) as err:
        read_manifest(path)
    msg = str(err.value)
    assert "has 3 problem(s)" in msg
    assert "line 2: length 'x'" in msg
    assert "line 3: expected 3 fields" in msg
    assert "duplicate id 'c' on lines 4, 5" in msg


def test_quote_in_our_tsv_is_text_not_an_opening(tmp_path):
    path = write(tmp_path / "m.tsv", 'a\t1\t"never closed\nb\t2\tfine\n')
    assert [(r.id, r.text) for r in read_manifest(path)] == [("a", '"never closed'), ("b", "fine")]


# --- How2Sign conversion ----------------------------------------------------------------


@pytest.fixture()
def h2s(tmp_path):
    feats = tmp_path / "features"
    feats.mkdir()
    np.save(feats / "v1_0-rgb_front.npy", np.zeros((12, 4), np.float32))
    torch.save(torch.zeros(7, 4), feats / "v1_1-rgb_front.pt")
    missing = [f"v2_{i}-rgb_front" for i in range(12)]
    csv = write(
        tmp_path / "h2s.csv",
        H2S_HEADER
        + h2s_line("v1_0-rgb_front", '"Hello, ""world""."')
        + h2s_line("v1_1-rgb_front", "Bye.")
        + "".join(h2s_line(name, "gone") for name in missing),
    )
    return csv, feats, missing


def test_how2sign_to_tsv_fills_lengths(tmp_path, h2s):
    csv, feats, _ = h2s
    out = tmp_path / "manifests" / "train.tsv"
    how2sign_to_tsv(csv, feats, out, progress=False)
    assert [(r.id, r.length, r.text) for r in read_manifest(out)] == [
        ("v1_0-rgb_front", 12, 'Hello, "world".'),
        ("v1_1-rgb_front", 7, "Bye."),
    ]


def test_how2sign_to_tsv_reports_missing(tmp_path, h2s):
    csv, feats, missing = h2s
    report = how2sign_to_tsv(csv, feats, tmp_path / "out.tsv", progress=False)
    assert (report["rows"], report["written"], report["missing"]) == (14, 2, missing)


def test_how2sign_to_tsv_without_any_features(tmp_path, h2s):
    csv, _, _ = h2s
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "unrelated.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(DataError, match="none of the 14 clips"):
        how2sign_to_tsv(csv, other, tmp_path / "out.tsv", progress=False)
    assert not (tmp_path / "out.tsv").exists()


def test_cli_manifest_how2sign_prints_report(tmp_path, h2s, capsys):
    csv, feats, missing = h2s
    out = tmp_path / "train.tsv"
    assert run_cli(["manifest", "how2sign", str(csv), "--features", str(feats), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "rows read:        14" in printed
    assert "rows written:     2" in printed
    assert "missing features: 12" in printed
    assert all(name in printed for name in missing[:10])
    assert missing[10] not in printed and "... and 2 more" in printed
    assert out.is_file()
