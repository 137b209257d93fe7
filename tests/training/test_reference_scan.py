"""References the decoder cannot read are found by the bad-clip scan before training, each with its clip and line."""

from __future__ import annotations

import pytest

import train_sonar_finetuning as recipe
from sonar_ft.data import read_manifest
from sonar_ft.data.bad_samples import MAX_TEXT_CHARS, read_bad_samples
from sonar_ft.errors import DataError
from sonar_ft.run_files import BAD_SAMPLES
from sonar_ft.training.recipe import fine_tune
from tests.small_data import Data, make_data


@pytest.fixture
def data(tiny_demo, tmp_path) -> Data:
    return make_data(tiny_demo, tmp_path / "data")


def _too_long_references(data: Data) -> tuple[str, str]:
    """Training row 3 (line 4) gets a reference of many sentences, row 6 (line 7) one of two merged corpora."""
    rows = read_manifest(data.manifest("train"))
    lines = [f"{r.id}\t{r.length}\t{r.text}" for r in rows]
    lines[2] = f"{rows[2].id}\t{rows[2].length}\t" + " ".join([rows[2].text] * 12)
    lines[5] = f"{rows[5].id}\t{rows[5].length}\t" + "x" * (MAX_TEXT_CHARS + 1)
    data.manifest("train").write_text("id\tlength\ttext\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return rows[2].id, rows[5].id


def test_every_too_long_reference_stops_training_before_it_starts(data, tmp_path):
    long_id, merged_id = _too_long_references(data)
    with pytest.raises(DataError, match=r"^2 clip\(s\) cannot be trained on") as err:
        fine_tune(data.config(tmp_path / "out"))
    assert f"{long_id} (training, " in str(err.value) and "more than the 32 the decoder can read (manifest line 4)" in str(err.value)
    listed = read_bad_samples(tmp_path / "out" / BAD_SAMPLES)
    assert [(b.id, b.line) for b in listed] == [(long_id, 4), (merged_id, 7)]
    assert "tokens, more than the 32" in listed[0].reason
    assert f"{MAX_TEXT_CHARS + 1:,} characters long" in listed[1].reason
    assert not (tmp_path / "out" / "last.pt").exists()


def test_skip_trains_without_the_too_long_references_cli(data, tmp_path, capsys):
    long_id, merged_id = _too_long_references(data)
    out = tmp_path / "out"
    assert recipe.main(data.recipe_args(out, "--on_bad_sample", "skip")) == 0, capsys.readouterr().err
    assert [b.id for b in read_bad_samples(out / BAD_SAMPLES)] == [long_id, merged_id]
