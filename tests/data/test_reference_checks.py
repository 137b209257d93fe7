"""References checked before training: too many tokens for the decoder, or too long for one sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from sonar_ft.data import FeatureStore
from sonar_ft.data.bad_samples import MAX_TEXT_CHARS, find_bad_samples, read_bad_samples, write_bad_samples
from sonar_ft.data.manifest import ManifestRow
from sonar_ft.data.verify import verify_dataset

LIMIT = 8


def count_words(texts: Sequence[str]) -> list[int]:
    """A stand-in tokenizer: one token per word plus ``</s> __lang__ ... </s>``."""
    return [len(t.split()) + 3 for t in texts]


@pytest.fixture()
def store(tmp_path: Path) -> FeatureStore:
    feats = tmp_path / "features"
    feats.mkdir()
    for name in ("a", "b", "c", "d"):
        np.save(feats / f"{name}.npy", np.ones((3, 4), np.float32))
    return FeatureStore.open(feats)


def test_every_reference_over_the_token_limit_is_listed_with_line_count_and_limit(store, tmp_path):
    rows = [
        ManifestRow("a", "five words and no more", None, line=2),  # 8 tokens: the limit itself is fine
        ManifestRow("b", "six words are one too many", None, line=3),
        ManifestRow("c", "fine", None, line=4),
        ManifestRow("d", "this one is much much too long", None, line=5),
    ]
    bad = find_bad_samples(store, rows, split="training", progress=False, count_tokens=count_words, max_tokens=LIMIT)
    assert [(b.id, b.line) for b in bad] == [("b", 3), ("d", 5)]
    assert bad[0].reason == ("reference has 9 tokens, more than the 8 the decoder can read (manifest line 3); "
                             "shorten or split it in the manifest")
    assert "has 10 tokens, more than the 8" in bad[1].reason

    path = tmp_path / "bad_samples.tsv"
    write_bad_samples(path, bad)
    assert read_bad_samples(path) == bad
    assert path.read_text(encoding="utf-8").splitlines()[0] == "id\tfile\treason\tsplit\tline"


def test_texts_are_counted_in_one_call_and_only_when_a_limit_is_given(store):
    calls: list[list[str]] = []

    def counting(texts: Sequence[str]) -> list[int]:
        calls.append(list(texts))
        return count_words(texts)

    rows = [ManifestRow(n, f"text {n}", None, line=i + 2) for i, n in enumerate("abcd")]
    assert find_bad_samples(store, rows, progress=False, count_tokens=counting, max_tokens=LIMIT) == []
    assert calls == [[r.text for r in rows]]
    assert find_bad_samples(store, rows, progress=False, count_tokens=counting) == [] and len(calls) == 1


def test_a_text_too_long_for_one_sentence_is_listed_whatever_its_token_count(store):
    merged = "x" * 200_000  # two rows merged by a broken export; this tokenizer sees one "word"
    rows = [ManifestRow("a", "fine", None, line=2), ManifestRow("b", merged, None, line=3)]
    bad = find_bad_samples(store, rows, progress=False, count_tokens=count_words, max_tokens=LIMIT)
    assert [(b.id, b.line) for b in bad] == [("b", 3)]
    assert bad[0].reason.startswith(f"reference is 200,000 characters long, more than the {MAX_TEXT_CHARS:,} one "
                                    "sentence can plausibly have (manifest line 3)")


def test_verify_lists_texts_too_long_for_one_sentence(store, tmp_path):
    manifest = tmp_path / "m.tsv"
    manifest.write_text("id\ttext\na\tfine\nb\t" + "word " * 1000 + "\n", encoding="utf-8")
    report = verify_dataset(store, manifest, progress=False)
    assert report.long_text == ["b"] and not report.ok
    assert f"texts over {MAX_TEXT_CHARS:,} characters" in report.format_table()
