"""The bad-input catalogue: every input a user can get wrong gets a clear error that names the
file / row / flag (or, for training clips with ``--on_bad_sample skip``, a recorded skip), on the
library call and on the command line (the recipe and ``sonar-ft``), never a traceback.

Each case builds a small copy of the tiny demo (8 training, 4 validation clips) and breaks one
thing in it. Inputs that are odd but valid (integer / float16 arrays, a header in another order,
How2Sign's CSV with quotes and commas, ``--max_samples`` / ``--batch_size`` beyond the data) share
one real recipe run, started as a user would (a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import train_sonar_finetuning as recipe
from sonar_ft.cli import main as sonar_ft_cli
from sonar_ft.data import LengthBucketSampler, load_feature_file, read_manifest, select_rows
from sonar_ft.data.bad_samples import read_bad_samples
from sonar_ft.models.encoder import load_encoder
from sonar_ft.errors import CheckpointError, ConfigError, DataError, OutputDirError
from sonar_ft.files.atomic import load_torch
from sonar_ft.data.splits import load_split
from sonar_ft.run_files import BAD_SAMPLES
from sonar_ft.training.failures import screen_bad_samples
from sonar_ft.training.recipe import fine_tune as train
from sonar_ft.training.run_dir import prepare_output_dir
from tests.conftest import TINY_DEMO
from tests.small_data import N_TRAIN, N_VAL, Data, make_data, save_npy

D = TINY_DEMO.feature_dim
RECIPE = Path(recipe.__file__)


@pytest.fixture
def data(tiny_demo, tmp_path) -> Data:
    return make_data(tiny_demo, tmp_path / "data")


def cli_error(capsys, code: int, *needles: str, expected: int = 2) -> str:
    """Assert a CLI failed with ``expected`` and one ``error:`` line naming every needle, no traceback."""
    captured = capsys.readouterr()
    assert code == expected, captured.out[-2000:] + captured.err[-2000:]
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, captured.err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ------------------------------------------------------------------------------------------------
# Feature files
# ------------------------------------------------------------------------------------------------
def _missing(path: Path) -> tuple[str, str]:
    path.unlink()
    return path.stem, "no feature file"


def _truncated(path: Path) -> tuple[str, str]:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return str(path), "truncated"


def _random_bytes(path: Path) -> tuple[str, str]:
    path.write_bytes(np.random.default_rng(0).bytes(300))
    return str(path), "no NumPy header"


def _empty(path: Path) -> tuple[str, str]:
    path.write_bytes(b"")
    return str(path), "empty (0 bytes)"


def _wrong_dim(path: Path) -> tuple[str, str]:
    save_npy(path, np.ones((7, D + 1), np.float32))
    return str(path), f"feature dimension {D + 1}"


def _one_d(path: Path) -> tuple[str, str]:
    save_npy(path, np.ones(D, np.float32))
    return str(path), "1-D"


def _three_d(path: Path) -> tuple[str, str]:
    save_npy(path, np.ones((1, 7, D), np.float32))
    return str(path), f"shape (1, 7, {D})"


def _nan(path: Path) -> tuple[str, str]:
    arr = np.ones((7, D), np.float32)
    arr[3, 5] = np.nan
    save_npy(path, arr)
    return str(path), "NaN or Inf"


def _inf(path: Path) -> tuple[str, str]:
    arr = np.ones((7, D), np.float32)
    arr[0, 0] = -np.inf
    save_npy(path, arr)
    return str(path), "NaN or Inf"


def _zero_length(path: Path) -> tuple[str, str]:
    save_npy(path, np.zeros((0, D), np.float32))
    return str(path), "zero frames"


def _pt_without_features(path: Path) -> tuple[str, str]:
    path.unlink()
    pt = path.with_suffix(".pt")
    torch.save({"feats": torch.ones(7, D), "video_id": "x"}, pt)
    return str(pt), "without a 'features' entry"


FEATURE_CASES: dict[str, Callable[[Path], tuple[str, str]]] = {
    "missing": _missing,
    "truncated_npy": _truncated,
    "random_bytes": _random_bytes,
    "empty_file": _empty,
    "wrong_dim": _wrong_dim,
    "1d_array": _one_d,
    "3d_array": _three_d,
    "nan": _nan,
    "inf": _inf,
    "zero_length": _zero_length,
    "pt_dict_without_features": _pt_without_features,
}


@pytest.mark.parametrize("kind", FEATURE_CASES)
def test_bad_feature_file_stops_training_before_it_starts_library(data, tmp_path, kind):
    named, reason = FEATURE_CASES[kind](data.npy("train", 3))
    with pytest.raises(DataError) as err:
        train(data.config(tmp_path / "out"))
    assert named in str(err.value) and reason in str(err.value) and "--on_bad_sample skip" in str(err.value)
    listed = read_bad_samples(tmp_path / "out" / BAD_SAMPLES)
    assert [b.id for b in listed] == [data.ids("train")[3]]
    assert not (tmp_path / "out" / "last.pt").exists()


def test_features_that_overflow_the_fp16_cache_are_named_before_training(data, tmp_path, capsys):
    # Finite in float32, Inf in float16: found while the scan fills the cache, not in epoch 1.
    path = data.npy("train", 2)
    np.save(path, np.full((7, D), 1.0e5, dtype=np.float32))
    code = recipe.main(data.recipe_args(tmp_path / "out", "--cache_features", "--cache_dtype", "fp16"))
    cli_error(capsys, code, str(path), "NaN or Inf values after conversion to torch.float16")
    assert not (tmp_path / "out" / "last.pt").exists()


@pytest.mark.parametrize("kind", FEATURE_CASES)
def test_bad_feature_file_stops_the_recipe_naming_it_cli(data, tmp_path, capsys, kind):
    named, reason = FEATURE_CASES[kind](data.npy("val", 1))
    cli_error(capsys, recipe.main(data.recipe_args(tmp_path / "out")), named, reason)


@pytest.mark.parametrize("kind", FEATURE_CASES)
def test_bad_feature_file_is_an_error_line_in_verify_cli(data, capsys, kind):
    FEATURE_CASES[kind](data.npy("train", 5))
    code = sonar_ft_cli(["verify", "--features", str(data.features("train")), "--manifest", str(data.manifest("train"))])
    out = capsys.readouterr().out
    assert code == 1 and "result: NOT OK" in out and data.ids("train")[5] in out


def _all_wrong_dim(data: Data) -> None:
    for split in ("train", "val"):
        for path in data.features(split).glob("*.npy"):
            save_npy(path, np.ones((6, D + 2), np.float32))


def test_features_of_another_dimension_than_the_encoder_stop_training_library(data, tmp_path):
    _all_wrong_dim(data)  # consistent among themselves, so only the encoder can tell
    with pytest.raises(DataError, match=rf"have {D + 2} features per frame but the encoder .* expects {D}"):
        train(data.config(tmp_path / "out"))


def test_features_of_another_dimension_than_the_encoder_stop_the_recipe_cli(data, tmp_path, capsys):
    _all_wrong_dim(data)
    cli_error(capsys, recipe.main(data.recipe_args(tmp_path / "out")), str(data.features("train")), f"expects {D}")


def test_every_bad_clip_of_both_splits_is_listed_at_once(data, tmp_path):
    _nan(data.npy("train", 0))
    _empty(data.npy("train", 6))
    _missing(data.npy("val", 2))
    with pytest.raises(DataError, match=r"^3 clip\(s\) cannot be trained on") as err:
        train(data.config(tmp_path / "out"))
    wanted = [data.ids("train")[0], data.ids("train")[6], data.ids("val")[2]]
    assert all(clip_id in str(err.value) for clip_id in wanted)
    assert [b.id for b in read_bad_samples(tmp_path / "out" / BAD_SAMPLES)] == wanted


def test_skip_leaves_bad_clips_out_and_records_them_library(data, tmp_path):
    _nan(data.npy("train", 0))
    _truncated(data.npy("train", 4))
    cfg = data.config(tmp_path / "out", on_bad_sample="skip")
    bad: list = []
    dataset = load_split(cfg.train_features, cfg.train_manifest, cfg=cfg, split="training", bad=bad)
    assert [r.id for r in dataset.rows] == [i for n, i in enumerate(data.ids("train")) if n not in (0, 4)]
    (tmp_path / "out").mkdir()
    screen_bad_samples(tmp_path / "out", cfg, bad)  # does not raise with skip
    rows = read_bad_samples(tmp_path / "out" / BAD_SAMPLES)
    assert [(b.id, b.split) for b in rows] == [(data.ids("train")[0], "training"), (data.ids("train")[4], "training")]
    assert rows[1].file == str(data.npy("train", 4)) and "truncated" in rows[1].reason


def test_skip_trains_without_bad_clips_cli(data, tmp_path, capsys):
    _zero_length(data.npy("train", 2))
    _pt_without_features(data.npy("val", 0))
    out = tmp_path / "out"
    assert recipe.main(data.recipe_args(out, "--on_bad_sample", "skip")) == 0, capsys.readouterr().err
    assert {b.id for b in read_bad_samples(out / BAD_SAMPLES)} == {data.ids("train")[2], data.ids("val")[0]}
    predicted = json.loads((out / "predictions_epoch1.json").read_text())["samples"]
    assert sorted(s["id"] for s in predicted) == sorted(data.ids("val")[1:])


@pytest.mark.parametrize("dtype", ["int16", "int32", "int64", "uint8", "float16", "float64"])
def test_integer_and_float16_arrays_load_as_float32_library(tmp_path, dtype):
    arr = (np.arange(5 * D) % 7).reshape(5, D).astype(dtype)
    save_npy(tmp_path / "a.npy", arr)
    torch.save({"features": torch.from_numpy(arr.copy())}, tmp_path / "b.pt")
    for name in ("a.npy", "b.pt"):
        loaded = load_feature_file(tmp_path / name)
        assert loaded.dtype == torch.float32 and torch.equal(loaded, torch.from_numpy(arr.astype(np.float32)))


# ------------------------------------------------------------------------------------------------
# Manifests
# ------------------------------------------------------------------------------------------------
def _tsv(data: Data, lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _rows(data: Data) -> list[str]:
    return [f"{r.id}\t{r.length}\t{r.text}" for r in read_manifest(data.manifest("train"))]


MANIFEST_CASES: dict[str, tuple[Callable[[Data], bytes], str]] = {
    "empty": (lambda d: b"", "is empty"),
    "missing_column": (lambda d: _tsv(d, ["id\tlength"] + [f"{i}\t5" for i in d.ids("train")]), "no 'text' column"),
    "malformed_row": (lambda d: _tsv(d, ["id\tlength\ttext"] + _rows(d)[:3] + ["broken\t5\ttext\textra field"] + _rows(d)[3:]),
                      "line 5: expected 3 fields, found 4"),
    "duplicate_ids": (lambda d: _tsv(d, ["id\tlength\ttext"] + _rows(d) + [_rows(d)[1]]), "duplicate id"),
    "non_utf8": (lambda d: _tsv(d, ["id\tlength\ttext"] + _rows(d)[:2]) + "x\t5\tcaf\u00e9 au lait\n".encode("latin-1"),
                 "not UTF-8 text: undecodable bytes on line(s) 4"),
}


@pytest.mark.parametrize("kind", MANIFEST_CASES)
def test_bad_manifest_is_named_with_its_line_library(data, kind):
    make, reason = MANIFEST_CASES[kind]
    data.manifest("train").write_bytes(make(data))
    with pytest.raises(DataError) as err:
        read_manifest(data.manifest("train"))
    assert str(data.manifest("train")) in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("kind", MANIFEST_CASES)
def test_bad_manifest_stops_the_recipe_cli(data, tmp_path, capsys, kind):
    make, reason = MANIFEST_CASES[kind]
    data.manifest("train").write_bytes(make(data))
    cli_error(capsys, recipe.main(data.recipe_args(tmp_path / "out")), str(data.manifest("train")), reason)


@pytest.mark.parametrize("kind", [k for k in MANIFEST_CASES if k != "duplicate_ids"])
def test_bad_manifest_stops_verify_cli(data, capsys, kind):
    make, reason = MANIFEST_CASES[kind]
    data.manifest("train").write_bytes(make(data))
    code = sonar_ft_cli(["verify", "--features", str(data.features("train")), "--manifest", str(data.manifest("train"))])
    cli_error(capsys, code, str(data.manifest("train")), reason)


def test_duplicate_ids_are_an_error_line_in_verify_cli(data, capsys):
    # verify reads on past duplicates so that it can report everything else too.
    make, _ = MANIFEST_CASES["duplicate_ids"]
    twice = data.ids("train")[1]
    data.manifest("train").write_bytes(make(data))
    code = sonar_ft_cli(["verify", "--features", str(data.features("train")), "--manifest", str(data.manifest("train"))])
    out = capsys.readouterr().out
    assert code == 1 and "duplicate ids in manifest" in out and twice in out


def _empty_text(data: Data) -> str:
    lines = _rows(data)
    clip_id = lines[2].split("\t")[0]
    lines[2] = f"{clip_id}\t5\t   "
    data.manifest("train").write_bytes(_tsv(data, ["id\tlength\ttext"] + lines))
    return clip_id


def test_empty_text_stops_training_naming_clip_and_line_library(data, tmp_path):
    clip_id = _empty_text(data)
    with pytest.raises(DataError, match=rf"{clip_id} \(training, .*\): empty text \(manifest line 4\)"):
        train(data.config(tmp_path / "out"))


def test_empty_text_stops_the_recipe_cli(data, tmp_path, capsys):
    clip_id = _empty_text(data)
    cli_error(capsys, recipe.main(data.recipe_args(tmp_path / "out")), clip_id, "empty text (manifest line 4)")


def test_empty_text_is_an_error_line_in_verify_cli(data, capsys):
    clip_id = _empty_text(data)
    code = sonar_ft_cli(["verify", "--features", str(data.features("train")), "--manifest", str(data.manifest("train"))])
    out = capsys.readouterr().out
    assert code == 1 and "empty texts" in out and clip_id in out


def test_header_in_another_order_reads_the_same_rows_library(data):
    rows = read_manifest(data.manifest("train"))
    lines = ["text\tlength\tid"] + [f"{r.text}\t{r.length}\t{r.id}" for r in rows]
    data.manifest("train").write_text("\n".join(lines) + "\n")
    assert [(r.id, r.length, r.text) for r in read_manifest(data.manifest("train"))] == [(r.id, r.length, r.text) for r in rows]


H2S_HEADER = "VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE"
H2S_TEXTS = [
    'Hello, my name is "Bob", and I sign.',
    "It's 5,000 dollars, right?",
    'He said: "wait, what?"',
    "Plain text, with commas, everywhere.",
]


def _how2sign_csv(data: Data, split: str) -> Path:
    """The split's manifest as How2Sign's CSV, with texts holding quotes and commas."""
    csv = data.root / f"{split}_how2sign.csv"
    lines = [H2S_HEADER]
    for n, clip_id in enumerate(data.ids(split)):
        text = H2S_TEXTS[n % len(H2S_TEXTS)]
        lines.append(f"v{n}\tv{n}-1-rgb_front\ts{n}\t{clip_id}\t{n}.0\t{n + 1}.5\t{text}")
    csv.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv


def test_how2sign_csv_with_quotes_and_commas_library(data):
    rows = read_manifest(_how2sign_csv(data, "val"))
    assert [r.id for r in rows] == data.ids("val") and [r.text for r in rows] == H2S_TEXTS


def test_how2sign_csv_with_quotes_and_commas_converts_cli(data, capsys):
    csv, out = _how2sign_csv(data, "val"), data.root / "converted.tsv"
    assert sonar_ft_cli(["manifest", "how2sign", str(csv), "--features", str(data.features("val")), "--out", str(out)]) == 0
    rows = read_manifest(out)
    assert [r.text for r in rows] == H2S_TEXTS and all(r.length for r in rows)


# ------------------------------------------------------------------------------------------------
# Odd but valid inputs: one real run of the recipe, as a user starts it
# ------------------------------------------------------------------------------------------------
ODD_DTYPES = ["int16", "int32", "int64", "uint8", "float16", "float64", "float16", "int32"]


@pytest.fixture(scope="module")
def odd_run(tiny_demo, tmp_path_factory) -> tuple[Data, Path, subprocess.CompletedProcess]:
    """Integer / float16 / float64 features, a header in another order, How2Sign CSV validation
    manifest with quotes and commas, --max_samples and --batch_size beyond the data."""
    data = make_data(tiny_demo, tmp_path_factory.mktemp("odd") / "data")
    for n, clip_id in enumerate(data.ids("train")):
        path = data.features("train") / f"{clip_id}.npy"
        arr = np.load(path).astype(np.float32)
        if ODD_DTYPES[n].startswith(("int", "uint")):
            arr = np.clip(np.round(arr * 20 + 60), 0, 120)  # quantised, as some extractors store them
        save_npy(path, arr.astype(ODD_DTYPES[n]))
    rows = read_manifest(data.manifest("train"))
    data.manifest("train").write_text("\n".join(["text\tlength\tid"] + [f"{r.text}\t{r.length}\t{r.id}" for r in rows]) + "\n")
    val_csv = _how2sign_csv(data, "val")
    out = data.root.parent / "run"
    args = data.recipe_args(out, "--max_samples", "1000", "--batch_size", "64")
    args[args.index("--val_manifest") + 1] = str(val_csv)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, env=env, timeout=600)
    return data, out, done


def test_odd_but_valid_inputs_train_cli(odd_run):
    _, out, done = odd_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    metrics = json.loads((out / "metrics_epoch1.json").read_text())
    assert np.isfinite(metrics["train_loss"]) and np.isfinite(metrics["val_loss"])


def test_integer_and_float16_features_are_used_for_training_cli(odd_run):
    data, _, done = odd_run
    assert f"training {N_TRAIN} clips" in done.stdout  # none was dropped for its dtype
    assert not (data.root.parent / "run" / BAD_SAMPLES).exists()


def test_how2sign_csv_texts_reach_the_references_intact_cli(odd_run):
    _, out, _ = odd_run
    samples = json.loads((out / "predictions_epoch1.json").read_text())["samples"]
    assert sorted(s["reference"] for s in samples) == sorted(H2S_TEXTS)


def test_max_samples_larger_than_the_data_uses_all_of_it_cli(odd_run):
    _, _, done = odd_run
    assert "more than the" in done.stdout and f"training {N_TRAIN} clips, validating on {N_VAL}" in done.stdout


def test_max_samples_larger_than_the_data_uses_all_of_it_library(data):
    rows = read_manifest(data.manifest("train"))
    assert select_rows(rows, max_samples=1000, seed=3) == rows


def test_batch_size_larger_than_the_dataset_makes_one_batch_cli(odd_run):
    _, _, done = odd_run
    assert f"--batch_size 64 is larger than the {N_TRAIN} training clips" in done.stdout


def test_batch_size_larger_than_the_dataset_makes_one_batch_library():
    batches = list(LengthBucketSampler([5, 9, 3], batch_size=64, seed=1))
    assert len(batches) == 1 and sorted(batches[0]) == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------
def test_unknown_target_language_is_named_library(data, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown target language 'english'.*eng_Latn"):
        train(data.config(tmp_path / "out", tgt_lang="english"))


def test_unknown_target_language_is_named_recipe_cli(data, tmp_path, capsys):
    cli_error(capsys, recipe.main(data.recipe_args(tmp_path / "out", "--tgt_lang", "english")), "'english'", "eng_Latn")


def test_unknown_target_language_is_named_translate_cli(data, tiny_demo, capsys):
    code = sonar_ft_cli(["translate", "--encoder", str(tiny_demo.encoder_checkpoint), "--features", str(data.features("val")),
                         "--decoder", str(tiny_demo.decoder_card), "--tgt_langs", "eng_Latn,english", "--device", "cpu"])
    cli_error(capsys, code, "'english'", "eng_Latn")


def test_max_samples_zero_is_refused_library(data, tmp_path):
    with pytest.raises(ConfigError, match=r"--max_samples must be in \[1, inf\)"):
        data.config(tmp_path / "out", max_samples=0).validate()


def test_max_samples_zero_is_refused_cli(data, tmp_path, capsys):
    cli_error(capsys, recipe.main(data.recipe_args(tmp_path / "out", "--max_samples", "0")), "--max_samples")


def test_on_bad_sample_must_be_error_or_skip_library(data, tmp_path):
    with pytest.raises(ConfigError, match="--on_bad_sample"):
        data.config(tmp_path / "out", on_bad_sample="ignore").validate()


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------
def _not_sonar(demo, path: Path) -> str:
    torch.save({"model": {"linear.weight": torch.zeros(3, 3), "linear.bias": torch.zeros(3)}}, path)
    return "no encoder.block.0.* keys"


def _incomplete(demo, path: Path) -> str:
    state = load_torch(demo.encoder_checkpoint)
    del state["student"]["projection_out.weight"]
    torch.save(state, path)
    return "missing projection_out.weight"


def _truncated_checkpoint(demo, path: Path) -> str:
    raw = demo.encoder_checkpoint.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return "truncated"


CHECKPOINT_CASES = {"not_a_sonar_encoder": _not_sonar, "incomplete_encoder": _incomplete, "truncated": _truncated_checkpoint}


@pytest.mark.parametrize("kind", CHECKPOINT_CASES)
def test_bad_checkpoint_is_named_library(tiny_demo, tmp_path, kind):
    path = tmp_path / "enc.pth"
    reason = CHECKPOINT_CASES[kind](tiny_demo, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(path)
    assert str(path) in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("kind", CHECKPOINT_CASES)
def test_bad_checkpoint_stops_the_recipe_cli(data, tiny_demo, tmp_path, capsys, kind):
    path = tmp_path / "enc.pth"
    reason = CHECKPOINT_CASES[kind](tiny_demo, path)
    args = data.recipe_args(tmp_path / "out")
    args[args.index("--encoder_checkpoint") + 1] = str(path)
    cli_error(capsys, recipe.main(args), str(path), reason)


@pytest.mark.parametrize("kind", CHECKPOINT_CASES)
def test_bad_checkpoint_stops_embed_cli(data, tiny_demo, tmp_path, capsys, kind):
    path = tmp_path / "enc.pth"
    reason = CHECKPOINT_CASES[kind](tiny_demo, path)
    code = sonar_ft_cli(["embed", "--encoder-checkpoint", str(path), "--features", str(data.features("val")),
                         "--out", str(tmp_path / "emb.npy"), "--device", "cpu"])
    cli_error(capsys, code, str(path), reason)
    assert not (tmp_path / "emb.npy").exists()


# ------------------------------------------------------------------------------------------------
# Output folders
# ------------------------------------------------------------------------------------------------
def _another_run(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"settings": {"learning_rate": 0.5, "epochs": 3}}))
    (folder / "metrics_epoch1.json").write_text(json.dumps({"epoch": 1, "train_loss": 9.0}))


def test_folder_of_another_run_is_refused_library(data, tmp_path):
    _another_run(tmp_path / "out")
    with pytest.raises(OutputDirError, match=r"already holds another run's files .*--overwrite"):
        prepare_output_dir(data.config(tmp_path / "out"))


def test_folder_of_another_run_is_refused_cli(data, tmp_path, capsys):
    _another_run(tmp_path / "out")
    cli_error(capsys, recipe.main(data.recipe_args(tmp_path / "out")), str(tmp_path / "out"), "--overwrite")
    assert json.loads((tmp_path / "out" / "metrics_epoch1.json").read_text())["train_loss"] == 9.0  # untouched


def test_folder_of_another_run_is_replaced_with_overwrite_cli(data, tmp_path, capsys):
    _another_run(tmp_path / "out")
    assert recipe.main(data.recipe_args(tmp_path / "out", "--overwrite")) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "metrics_epoch1.json").read_text())["train_loss"] != 9.0


def _unwritable(tmp_path: Path) -> Path:
    # Tests often run as root, whom chmod does not stop; a folder "inside" a regular file
    # cannot be created by anyone.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "run"


def test_unwritable_output_folder_is_named_library(data, tmp_path):
    out = _unwritable(tmp_path)
    with pytest.raises(OutputDirError, match=rf"cannot write to --output_dir {out}"):
        train(data.config(out))


def test_unwritable_output_folder_is_named_cli(data, tmp_path, capsys):
    out = _unwritable(tmp_path)
    cli_error(capsys, recipe.main(data.recipe_args(out)), f"cannot write to --output_dir {out}")


def test_read_only_output_folder_is_named_cli(data, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("running as root, where chmod does not stop writes; the unwritable-folder tests cover this case")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        cli_error(capsys, recipe.main(data.recipe_args(out)), f"cannot write to --output_dir {out}")
    finally:
        out.chmod(0o700)
