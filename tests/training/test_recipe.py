"""The recipe ``train_sonar_finetuning.py`` on the tiny demo: outputs, eval-only, resume, export."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

import train_sonar_finetuning as recipe
from sonar_ft.models.encoder import load_encoder
from tests.conftest import recipe_args

QUICK = ["--batch_size", "8", "--epochs", "2", "--learning_rate", "1e-3", "--freeze_decoder", "--eval_every", "1", "--max_samples", "24"]
METRIC_KEYS = {"epoch", "train_loss", "val_loss", "val_bleu", "val_chrf", "lr", "seconds", "samples_per_second"}


@pytest.fixture(scope="module")
def quick_run(tiny_demo, tmp_path_factory) -> Path:
    """The Colab quick-test command line with only its paths changed (a shared, read-only run)."""
    out = tmp_path_factory.mktemp("quick") / "run"
    assert recipe.main(recipe_args(tiny_demo, out, *QUICK)) == 0
    return out


def test_quick_test_writes_every_output(quick_run):
    names = {p.name for p in quick_run.iterdir()}
    assert {"metrics_epoch1.json", "metrics_epoch2.json", "predictions_epoch1.json", "predictions_epoch2.json",
            "best_encoder.pt", "config.json", "tokenizer.json", "last.pt"} <= names
    assert not [n for n in names if n.startswith(".tmp-")]


def test_metrics_schema(quick_run):
    m = json.loads((quick_run / "metrics_epoch2.json").read_text())
    assert METRIC_KEYS <= set(m)
    assert m["epoch"] == 2 and m["val_bleu"] is not None and m["samples_per_second"] > 0


def test_predictions_schema(quick_run):
    p = json.loads((quick_run / "predictions_epoch2.json").read_text())
    assert p["epoch"] == 2 and isinstance(p["bleu"], float)
    assert len(p["samples"]) == 16  # the tiny val split
    assert set(p["samples"][0]) == {"id", "reference", "prediction", "bleu_score", "chrf", "rougeL"}


def test_config_records_settings_architecture_versions_and_data(quick_run):
    c = json.loads((quick_run / "config.json").read_text())
    assert c["settings"]["max_samples"] == 24 and c["settings"]["learning_rate"] == 1e-3
    assert c["encoder_architecture"]["d_model"] == 32
    assert c["versions"]["fairseq2"] == "0.8.1" and c["versions"]["sonar-space"] == "0.5.0"
    assert len(c["data"]["train_manifest_sha256"]) == 64
    t = json.loads((quick_run / "tokenizer.json").read_text())
    assert t["tgt_lang"] == "eng_Latn" and t["target_prefix"] == ["</s>", "__eng_Latn__"]


def test_config_file_reproduces_the_run(quick_run, tiny_demo, tmp_path):
    # config.json's settings, as YAML, are a complete --config for the same run.
    import yaml

    settings = json.loads((quick_run / "config.json").read_text())["settings"]
    settings["output_dir"] = str(tmp_path / "again")
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(settings))
    assert recipe.main(["--config", str(cfg_file)]) == 0
    a = json.loads((quick_run / "metrics_epoch2.json").read_text())
    b = json.loads((tmp_path / "again" / "metrics_epoch2.json").read_text())
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert a["val_bleu"] == pytest.approx(b["val_bleu"], abs=1e-6)


def test_best_encoder_is_official_layout_and_reloads(quick_run, tiny_demo):
    raw = torch.load(quick_run / "best_encoder.pt", weights_only=True)
    assert "student" in raw and "projection_out.weight" in raw["student"]
    model, cfg = load_encoder(quick_run / "best_encoder.pt")
    assert cfg.output_dim == 64


def test_best_checkpoint_scores_the_same_with_eval_only(quick_run, tiny_demo, tmp_path):
    history = [json.loads((quick_run / f"metrics_epoch{i}.json").read_text()) for i in (1, 2)]
    best = max(history, key=lambda h: (h["val_bleu"], -h["val_loss"]))
    out = tmp_path / "eval"
    args = recipe_args(tiny_demo, out, "--eval_only", "--encoder_checkpoint", str(quick_run / "best_encoder.pt"), "--max_samples", "24")
    assert recipe.main(args) == 0
    result = json.loads((out / "test_results.json").read_text())
    assert result["bleu"] == pytest.approx(best["val_bleu"], abs=1e-6)
    assert result["loss"] == pytest.approx(best["val_loss"], rel=1e-4)


def test_eval_only_writes_only_test_results(quick_run, tiny_demo, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    args = recipe_args(tiny_demo, run, "--eval_only", "--encoder_checkpoint", str(run / "best_encoder.pt"))
    assert recipe.main(args) == 0
    after = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert set(after) - set(before) == {"test_results.json"}
    assert all(after[n] == t for n, t in before.items())
    result = json.loads((run / "test_results.json").read_text())
    assert {"bleu", "chrf", "bleu_signature", "num_samples", "samples"} <= set(result)
    assert "BLEU|" in result["bleu_signature"] or "nrefs" in result["bleu_signature"]


def test_resume_continues_where_it_stopped(quick_run, tiny_demo, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    first = json.loads((run / "metrics_epoch2.json").read_text())
    # Same command with more epochs: resumes from last.pt (epoch 2) instead of starting over.
    args = recipe_args(tiny_demo, run, *QUICK[:2], "--epochs", "3", *QUICK[4:])
    assert recipe.main(args) == 0
    assert json.loads((run / "metrics_epoch2.json").read_text()) == first
    assert json.loads((run / "metrics_epoch3.json").read_text())["epoch"] == 3
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and len(state["history"]) == 3


def test_output_dir_of_another_run_is_refused(quick_run, tiny_demo, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    args = recipe_args(tiny_demo, run, *QUICK[:4], "--learning_rate", "5e-4", *QUICK[6:])
    assert recipe.main(args) == 2
    err = capsys.readouterr().err
    assert "learning_rate" in err and "--overwrite" in err and "Traceback" not in err


def test_export_translate_round_trip(quick_run, tiny_demo, tmp_path):
    from sonar_ft.cli import main as cli

    tarball = tmp_path / "enc.tar.gz"
    assert cli(["export", "--run_dir", str(quick_run), "--out", str(tarball)]) == 0
    with tarfile.open(tarball) as tar:
        # + the demo's local decoder card and its files (small), so the tarball translates from anywhere.
        assert set(tar.getnames()) == {"best_encoder.pt", "config.json", "tokenizer.json", "README.md", "metrics.json",
                                       "decoder.yaml", "decoder.pt", "tokenizer.model"}
        card = tar.extractfile("README.md").read().decode()
    assert "Fine-tuned SONAR ASL encoder" in card and "BLEU" in card
    # Predictions of the best epoch were made with beam 2; translating from the tarball must agree.
    history = [json.loads((quick_run / f"metrics_epoch{i}.json").read_text()) for i in (1, 2)]
    best = max(history, key=lambda h: (h["val_bleu"], -h["val_loss"]))["epoch"]
    preds = json.loads((quick_run / f"predictions_epoch{best}.json").read_text())["samples"][:4]
    from sonar_ft.inference.translate import translate

    rows = translate(tarball, tiny_demo.split_features("val"), ["eng_Latn", "fra_Latn"], ids=[s["id"] for s in preds], beam_size=2, device="cpu")
    assert [r["eng_Latn"] for r in rows] == [s["prediction"] for s in preds]
    assert all(isinstance(r["fra_Latn"], str) for r in rows)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (["--train_manifest", "/nonexistent/train.tsv"], "/nonexistent/train.tsv"),
        (["--val_features", "/nonexistent/features"], "/nonexistent/features"),
        (["--encoder_checkpoint", "/nonexistent/enc.pth"], "/nonexistent/enc.pth"),
        (["--precision", "fp16"], "--precision"),
        (["--batch_size", "0"], "--batch_size"),
        (["--max_samples", "0"], "--max_samples"),
        (["--tgt_lang", "english"], "english"),
        (["--decoder", "/nonexistent/card.yaml"], "/nonexistent/card.yaml"),
    ],
)
def test_cli_errors_name_the_bad_flag_or_file(tiny_demo, tmp_path, capsys, change, needle):
    args = recipe_args(tiny_demo, tmp_path / "out", *QUICK) + change
    with pytest.raises(SystemExit) if change[0] == "--precision" else _no_raise():
        code = recipe.main(args)
        assert code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_device_cuda_without_gpu_is_explained(tiny_demo, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert recipe.main(recipe_args(tiny_demo, tmp_path / "o", *QUICK) + ["--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_config_file_values_yield_to_flags(tiny_demo, tmp_path):
    from sonar_ft.config import config_from_sources

    f = tmp_path / "run.yaml"
    f.write_text("batch_size: 4\nlearning_rate: 3.0e-4\n# a comment\n")
    cfg = config_from_sources({"batch_size": 16}, f)
    assert cfg.batch_size == 16 and cfg.learning_rate == 3e-4


def test_config_file_unknown_key_is_named(tmp_path):
    from sonar_ft.config import config_from_sources
    from sonar_ft.errors import ConfigError

    f = tmp_path / "run.yaml"
    f.write_text("batchsize: 4\n")
    with pytest.raises(ConfigError, match="batchsize"):
        config_from_sources({}, f)


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
