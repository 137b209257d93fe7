"""An honest export: test scores only of the packed encoder, the data really used, licence and limits
on the card; a tarball that translates from another folder; embed takes it; language errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sonar_ft.cli import main as cli
from sonar_ft.errors import ConfigError
from sonar_ft.export.pack import build_export
from sonar_ft.inference.translate import translate
from sonar_ft.scores import METRICS
from sonar_ft.evaluate import evaluate_checkpoint
from sonar_ft.training.recipe import fine_tune as train
from tests.small_data import make_data


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tiny_demo, tmp_path_factory):
    """A 1-epoch run on 8 clips whose decoder card was given as a *relative* path, then deleted.

    Returns ``(root, data, run_dir)``. Nothing of the decoder is left on disk afterwards except
    what the export packs, so translating from the tarball proves it travels.
    """
    root = tmp_path_factory.mktemp("evalcard")
    data = make_data(tiny_demo, root / "data")
    shutil.copytree(tiny_demo.assets, root / "copied_assets")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = data.config(root / "run", max_samples=8, decoder="copied_assets/text_decoder.yaml")
        train(cfg)
        evaluate_checkpoint(data.config(root / "run", eval_only=True, encoder_checkpoint=str(root / "run" / "best_encoder.pt"),
                                        decoder="copied_assets/text_decoder.yaml"))
    finally:
        os.chdir(cwd)
    return root, data, root / "run"


def test_test_results_record_the_encoder_and_the_data(run):
    root, data, run_dir = run
    result = json.loads((run_dir / "test_results.json").read_text())
    assert set(METRICS) <= set(result)
    assert result["encoder_sha256"] == _sha(run_dir / "best_encoder.pt")
    assert result["data"]["manifest_sha256"] == _sha(data.manifest("val"))
    ids = "".join(f"{i}\n" for i in sorted(data.ids("val")))
    assert result["data"]["clip_ids_sha256"] == hashlib.sha256(ids.encode()).hexdigest()
    assert result["num_samples"] == 4 and result["cosine"] is None  # no --text_encoder: no semantic scores


def test_export_packs_the_test_scores_of_its_own_encoder(run, tmp_path):
    _, _, run_dir = run
    report = build_export(run_dir, tmp_path / "mine.tar.gz")
    assert "test_results.json" in report.members and not report.notes
    with tarfile.open(report.path) as tar:
        card = tar.extractfile("README.md").read().decode()
        packed = json.loads(tar.extractfile("test_results.json").read())
    assert packed["encoder_sha256"] == _sha(run_dir / "best_encoder.pt") and "samples" not in packed
    assert "- test: BLEU-1/2/3/4" in card and "ROUGE-L" in card


def test_stale_test_results_are_left_out_and_said_so(run, tmp_path):
    _, data, run_dir = run
    stale = tmp_path / "run"
    shutil.copytree(run_dir, stale)
    # The run went on (resumed) and another encoder became best_encoder.pt after test_results.json was written.
    shutil.copy(data.demo.encoder_checkpoint, stale / "best_encoder.pt")
    report = build_export(stale, tmp_path / "stale.tar.gz")
    assert "test_results.json" not in report.members
    assert len(report.notes) == 1 and "evaluated another encoder" in report.notes[0] and "--eval_only" in report.notes[0]
    with tarfile.open(report.path) as tar:
        card = tar.extractfile("README.md").read().decode()
    assert "- test:" not in card and "test scores left out" in card


def test_foreign_test_results_are_refused_by_the_cli(run, tmp_path, capsys):
    root, data, run_dir = run
    other = tmp_path / "other"
    evaluate_checkpoint(data.config(other, eval_only=True))  # the starting encoder: another one than the run's best
    out = tmp_path / "foreign.tar.gz"
    assert cli(["export", "--run_dir", str(run_dir), "--out", str(out), "--test_results", str(other / "test_results.json")]) == 0
    printed = capsys.readouterr().out
    assert "note: test scores left out" in printed and str(other / "test_results.json") in printed
    with tarfile.open(out) as tar:
        assert "test_results.json" not in tar.getnames()


def test_missing_test_results_flag_file_is_an_error(run, tmp_path, capsys):
    _, _, run_dir = run
    missing = tmp_path / "nope" / "test_results.json"
    assert cli(["export", "--run_dir", str(run_dir), "--out", str(tmp_path / "x.tar.gz"), "--test_results", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "--test_results" in err and str(missing) in err and "Traceback" not in err
    assert not (tmp_path / "x.tar.gz").exists()


def test_card_states_data_licence_use_limits_size_and_file_name(run, tmp_path):
    _, data, run_dir = run
    report = build_export(run_dir, tmp_path / "my_asl_encoder.tar.gz")
    with tarfile.open(report.path) as tar:
        card = tar.extractfile("README.md").read().decode()
    dim = json.loads((run_dir / "config.json").read_text())["encoder_architecture"]["output_dim"]
    assert dim != 1024  # the tiny demo's size: the card must not say 1024
    assert f"-> (B, {dim})" in card and "(B, 1024)" not in card
    assert "at most 8 clips per split (`--max_samples 8`)" in card and "only part of the data was used" in card
    assert "CC-BY-NC 4.0" in card and "ssvp_slt" in card
    assert "## Intended use" in card and "## Limitations" in card and "15-19 BLEU-4" in card
    assert "--encoder my_asl_encoder.tar.gz" in card and "sonar_encoder_finetuned.tar.gz" not in card


def test_tarball_translates_from_another_folder(run, tmp_path, monkeypatch):
    root, data, run_dir = run
    tarball = tmp_path / "enc.tar.gz"
    report = build_export(run_dir, tarball)
    assert {"decoder.yaml", "decoder.pt", "tokenizer.model"} <= set(report.members)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    preds = json.loads((run_dir / "predictions_epoch1.json").read_text())["samples"]
    (root / "copied_assets").rename(root / "hidden_assets")  # the decoder the run was trained with is gone
    try:
        rows = translate(tarball, data.features("val"), ["eng_Latn"], ids=[s["id"] for s in preds], beam_size=2,
                         max_gen_len=16, device="cpu")
    finally:
        (root / "hidden_assets").rename(root / "copied_assets")
    assert [r["eng_Latn"] for r in rows] == [s["prediction"] for s in preds]
    # --decoder alone is enough: the tokenizer then comes with that decoder, not from the tarball.
    rows = translate(tarball, data.features("val"), ["eng_Latn"], ids=[preds[0]["id"]], beam_size=2, max_gen_len=16,
                     device="cpu", decoder=str(data.demo.decoder_card))
    assert rows[0]["eng_Latn"] == preds[0]["prediction"]


def test_embed_accepts_the_tarball(run, tmp_path, capsys):
    _, data, run_dir = run
    tarball = build_export(run_dir, tmp_path / "enc.tar.gz").path
    for source, out in ((tarball, tmp_path / "a.npy"), (run_dir / "best_encoder.pt", tmp_path / "b.npy")):
        assert cli(["embed", "--encoder", str(source), "--features", str(data.features("val")), "--out", str(out), "--device", "cpu"]) == 0
    assert "Python objects" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


def test_unknown_language_lists_the_languages_the_tokenizer_has(run, tmp_path):
    _, data, run_dir = run
    tarball = build_export(run_dir, tmp_path / "enc.tar.gz").path
    with pytest.raises(ConfigError) as err:
        translate(tarball, data.features("val"), ["deu_Latn"], beam_size=1, device="cpu")
    message = str(err.value)
    assert "'deu_Latn'" in message and "eng_Latn, fra_Latn" in message
    assert message.count("deu_Latn") == 1  # the refused code is not offered as an example
