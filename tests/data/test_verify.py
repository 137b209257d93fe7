"""verify_dataset / `sonar-ft verify`: each defect it must catch, and what it lets through."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sonar_ft import cli
from sonar_ft.data import commands
from sonar_ft.data.verify import verify_dataset
from sonar_ft.errors import ConfigError

DIM = 8
CLIPS = {"a": 5, "b": 9, "c": 20, "d": 3}  # id -> frames


def write_manifest(path: Path, rows: list[tuple[str, int | str, str]]) -> Path:
    path.write_text("id\tlength\ttext\n" + "".join(f"{i}\t{n}\t{t}\n" for i, n, t in rows), encoding="utf-8")
    return path


@pytest.fixture()
def dataset(tmp_path):
    """A clean set: .npy features for every manifest row, lengths that agree."""
    feats = tmp_path / "features"
    feats.mkdir()
    for clip_id, n in CLIPS.items():
        np.save(feats / f"{clip_id}.npy", np.ones((n, DIM), np.float32))
    manifest = write_manifest(tmp_path / "train.tsv", [(i, n, f"text {i}") for i, n in CLIPS.items()])
    return feats, manifest


def verify(feats, manifest, feature_dim=None):
    return verify_dataset(feats, manifest, feature_dim, progress=False)


def run_cli(argv: list[str]) -> int:
    # sonar_ft.cli.main also imports sonar_ft.inference.embed (another module); build only our commands.
    parser = argparse.ArgumentParser(prog="sonar-ft")
    commands.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return cli.run(args.func, args)


def test_clean_set_is_ok(dataset):
    report = verify(*dataset, feature_dim=DIM)
    assert report.ok
    assert (report.num_rows, report.num_feature_files, report.num_checked) == (4, 4, 4)
    assert not any(report.errors.values()) and not any(report.warnings.values())
    assert report.dims == {DIM: 4} and report.dtypes == {"float32": 4}


def test_length_statistics(dataset):
    report = verify(*dataset)
    assert sorted(report.lengths) == [3, 5, 9, 20]
    stats = report.length_stats()
    assert (stats["min"], stats["mean"], stats["median"], stats["max"]) == (3, 9.2, 7.0, 20)
    assert stats["p95"] == pytest.approx(np.percentile([3, 5, 9, 20], 95))


def test_missing_feature_file(dataset):
    feats, manifest = dataset
    (feats / "b.npy").unlink()
    report = verify(feats, manifest)
    assert report.missing_features == ["b"] and not report.ok


def test_extra_feature_file_is_only_a_warning(dataset):
    feats, manifest = dataset
    np.save(feats / "extra.npy", np.ones((4, DIM), np.float32))
    report = verify(feats, manifest)
    assert report.extra_features == ["extra"] and report.ok


def test_duplicate_ids(dataset, tmp_path):
    feats, _ = dataset
    manifest = write_manifest(tmp_path / "m.tsv", [("a", 5, "x"), ("b", 9, "y"), ("a", 5, "z")])
    report = verify(feats, manifest)
    assert report.duplicate_ids == {"a": [2, 4]} and not report.ok


def test_dimension_differs_from_expected(dataset):
    report = verify(*dataset, feature_dim=DIM + 1)
    assert report.bad_dim == list(CLIPS) and not report.ok


def test_dimensions_disagree_between_files(dataset):
    feats, manifest = dataset
    np.save(feats / "c.npy", np.ones((20, DIM * 2), np.float32))
    report = verify(feats, manifest)
    assert report.bad_dim == ["c"] and report.dims == {DIM: 3, DIM * 2: 1} and not report.ok


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf(dataset, value):
    feats, manifest = dataset
    arr = np.ones((9, DIM), np.float32)
    arr[4, 2] = value
    np.save(feats / "b.npy", arr)
    report = verify(feats, manifest)
    assert report.non_finite == ["b"] and not report.ok


def test_float64_beyond_float32_range_counts_as_inf(dataset):
    feats, manifest = dataset
    arr = np.ones((9, DIM), np.float64)
    arr[0, 0] = 1e300
    np.save(feats / "b.npy", arr)
    report = verify(feats, manifest)
    assert report.non_finite == ["b"] and report.dtypes == {"float32": 3, "float64": 1}


def test_zero_length_clip(dataset, tmp_path):
    feats, _ = dataset
    np.save(feats / "z.npy", np.ones((0, DIM), np.float32))
    manifest = write_manifest(tmp_path / "m.tsv", [("a", 5, "x"), ("z", 0, "y")])
    report = verify(feats, manifest)
    assert report.zero_length == ["z"] and not report.ok


def test_empty_text(dataset, tmp_path):
    feats, _ = dataset
    manifest = write_manifest(tmp_path / "m.tsv", [("a", 5, "x"), ("b", 9, "  ")])
    report = verify(feats, manifest)
    assert report.empty_text == ["b"] and not report.ok


def test_length_mismatch_is_only_a_warning(dataset, tmp_path):
    feats, _ = dataset
    manifest = write_manifest(tmp_path / "m.tsv", [("a", 6, "x"), ("b", 9, "y")])
    report = verify(feats, manifest)
    assert report.length_mismatch == [{"id": "a", "manifest": 6, "file": 5}] and report.ok


def test_unreadable_file(dataset):
    feats, manifest = dataset
    (feats / "c.npy").write_bytes(b"\x93NUMPY garbage")
    report = verify(feats, manifest)
    assert list(report.unreadable) == ["c"] and "c.npy" in report.unreadable["c"] and not report.ok


def test_pt_and_nested_layout(tmp_path):
    feats = tmp_path / "features"
    for epoch in ("0", "1"):
        (feats / epoch / "clip_").mkdir(parents=True)
        torch.save({"features": torch.ones(4, DIM, dtype=torch.float16)}, feats / epoch / "clip_" / "clip_a.pt")
    manifest = write_manifest(tmp_path / "m.tsv", [("clip_a", 4, "x")])
    report = verify(feats, manifest, feature_dim=DIM)
    assert report.ok and report.layout == "nested" and report.dtypes == {"float16": 1}


def test_bad_feature_dim_flag(dataset):
    with pytest.raises(ConfigError, match="--feature-dim must be >= 1"):
        verify(*dataset, feature_dim=0)


def test_to_dict_is_json(dataset):
    feats, manifest = dataset
    (feats / "b.npy").unlink()
    data = json.loads(json.dumps(verify(feats, manifest).to_dict()))
    assert data["ok"] is False
    assert data["errors"]["missing_features"] == 1 and data["missing_features"] == ["b"]
    assert data["counts"] == {"manifest_rows": 4, "feature_files": 3, "checked": 3}
    assert sorted(data["lengths"]) == [3, 5, 20]


def test_format_table_marks_errors_with_examples(dataset):
    feats, manifest = dataset
    (feats / "b.npy").unlink()
    table = verify(feats, manifest).format_table()
    assert any(line.split()[-2:] == ["1", "ERROR"] for line in table.splitlines() if "without a feature" in line)
    assert "ids without a feature file: b" in table
    assert "result: NOT OK" in table


def test_cli_exit_code_1_and_json_on_errors(dataset, tmp_path, capsys):
    feats, manifest = dataset
    (feats / "b.npy").unlink()
    out = tmp_path / "reports" / "verify.json"
    assert run_cli(["verify", "--features", str(feats), "--manifest", str(manifest), "--json", str(out)]) == 1
    assert "result: NOT OK" in capsys.readouterr().out
    assert json.loads(out.read_text())["missing_features"] == ["b"]


def test_cli_exit_code_0_with_warnings_only(dataset, capsys):
    feats, manifest = dataset
    np.save(feats / "extra.npy", np.ones((4, DIM), np.float32))
    argv = ["verify", "--features", str(feats), "--manifest", str(manifest), "--feature-dim", str(DIM)]
    assert run_cli(argv) == 0
    assert "result: OK (with warnings)" in capsys.readouterr().out


def test_cli_unreadable_manifest_is_one_line_exit_2(dataset, tmp_path, capsys):
    feats, _ = dataset
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"a\t1\tcaf\xe9\n")
    assert run_cli(["verify", "--features", str(feats), "--manifest", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: manifest ") and "bad.tsv" in err and err.count("\n") == 1


def test_sonar_ft_main_wires_verify(dataset, capsys):
    pytest.importorskip("sonar_ft.inference.embed")  # cli.main also registers the embed command
    feats, manifest = dataset
    assert cli.main(["verify", "--features", str(feats), "--manifest", str(manifest)]) == 0
    assert "result: OK" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# Reports reused while nothing changed; a verify that cannot run still writes one
# ------------------------------------------------------------------------------------------------
def _verify_cli(feats: Path, manifest: Path, report: Path, *extra: str) -> int:
    return cli.main(["verify", "--features", str(feats), "--manifest", str(manifest), "--json", str(report), *extra])


def test_reuse_keeps_the_report_while_nothing_changed(dataset, tmp_path, npy_reads) -> None:
    feats, manifest = dataset
    report = tmp_path / "verify.json"
    assert _verify_cli(feats, manifest, report, "--reuse") == 0
    first_reads = sum(npy_reads.values())
    assert first_reads >= len(CLIPS)
    assert _verify_cli(feats, manifest, report, "--reuse") == 0
    assert sum(npy_reads.values()) == first_reads  # no feature file read again
    assert json.loads(report.read_text())["ok"]


def test_reuse_checks_again_when_a_feature_file_changed(dataset, tmp_path) -> None:
    feats, manifest = dataset
    report = tmp_path / "verify.json"
    assert _verify_cli(feats, manifest, report, "--reuse") == 0
    np.save(feats / "a.npy", np.full((5, DIM), np.nan, np.float32))
    assert _verify_cli(feats, manifest, report, "--reuse") == 1
    assert json.loads(report.read_text())["non_finite"] == ["a"]


def test_reuse_checks_again_when_the_manifest_changed(dataset, tmp_path) -> None:
    feats, manifest = dataset
    report = tmp_path / "verify.json"
    assert _verify_cli(feats, manifest, report, "--reuse") == 0
    write_manifest(manifest, [(i, n, f"text {i}") for i, n in CLIPS.items()] + [("zz", 4, "no file")])
    assert _verify_cli(feats, manifest, report, "--reuse") == 1
    assert json.loads(report.read_text())["missing_features"] == ["zz"]


def test_a_verify_that_cannot_run_replaces_an_old_ok_report(dataset, tmp_path) -> None:
    feats, manifest = dataset
    report = tmp_path / "verify.json"
    assert _verify_cli(feats, manifest, report) == 0
    assert _verify_cli(tmp_path / "no_such_folder", manifest, report, "--reuse") == 2
    written = json.loads(report.read_text())
    assert written["ok"] is False and "no_such_folder" in written["error"]
