"""Second reliability pass (issue #15): one lock per output, output never an input, readers that refuse
what they cannot hold before allocating it, manifest text read exactly as written, database timeouts,
and the messages of the remaining bad inputs. Every test builds its own tiny files and runs in seconds."""

from __future__ import annotations

import errno
import io as _io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sonar_ft import cli
from sonar_ft.export import load as export_load
from sonar_ft.export import pack as export
from sonar_ft.inference import translate as translate_mod
from sonar_ft.files import atomic
from sonar_ft.files import lock
from sonar_ft.data import features as features_mod
from sonar_ft.data.features import load_feature_file
from sonar_ft.data.manifest import ManifestRow, read_manifest, write_manifest
from sonar_ft.inference.embed import ids_path
from sonar_ft.models.encoder import SignT5Config, SignT5SonarEncoder, save_encoder
from sonar_ft.errors import CheckpointError, ConfigError, DataError, DiskFullError, OutputDirError
from sonar_ft.files.guards import check_output_not_input

ROOT = Path(__file__).resolve().parents[2]
TINY = SignT5Config(feature_dim=6, d_model=16, d_kv=4, d_ff=24, num_heads=4, num_encoder_layers=1,
                    num_decoder_layers=1, vocab_size=10, output_dim=8)


def _python(code: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, env=env)


def _holder(folder: Path, *, folder_lock: bool = True) -> subprocess.Popen:
    """A child process that takes the lock, says so, and sleeps until killed."""
    proc = _python(f"""
        import time
        from sonar_ft.files.lock import output_lock
        with output_lock({str(folder)!r}, command="holder", folder={folder_lock}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


# ------------------------------------------------------------------------------------------------
# One writer per output
# ------------------------------------------------------------------------------------------------
def test_second_writer_is_refused_naming_the_holders_pid_and_start(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(OutputDirError) as err:
            with lock.output_lock(tmp_path / "run", command="second"):
                pass
        record = lock.read_holder(lock.lock_path(tmp_path / "run"))
        assert record is not None and record.pid == holder.pid
        assert f"PID {holder.pid}" in str(err.value) and record.started in str(err.value) and "(holder)" in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    holder = _holder(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.read_holder(lock.lock_path(tmp_path / "run")).pid == holder.pid  # its record stays behind
    with caplog.at_level("INFO", logger="sonar_ft.files.lock"):
        with lock.output_lock(tmp_path / "run", command="next") as me:
            assert lock.read_holder(lock.lock_path(tmp_path / "run")) == me
    assert f"PID {holder.pid}" in caplog.text and "taking it over" in caplog.text
    assert not lock.lock_path(tmp_path / "run").exists()  # removed when released


def test_lock_is_free_again_after_the_block_and_refused_inside_it(tmp_path):
    with lock.output_lock(tmp_path / "out.tsv", folder=False):
        with pytest.raises(OutputDirError, match=f"PID {os.getpid()}"):
            with lock.output_lock(tmp_path / "out.tsv", folder=False):
                pass
    with lock.output_lock(tmp_path / "out.tsv", folder=False):
        pass


def test_many_processes_racing_for_one_lock_never_share_it(tmp_path):
    counter = tmp_path / "inside"
    procs = [_python(f"""
        import os, time
        from pathlib import Path
        from sonar_ft.errors import OutputDirError
        from sonar_ft.files.lock import output_lock
        got = 0
        deadline = time.time() + 2
        while time.time() < deadline:
            try:
                with output_lock({str(tmp_path / 'run')!r}):
                    marker = Path({str(counter)!r})
                    marker.mkdir()  # fails if another process is inside too
                    time.sleep(0.002)
                    marker.rmdir()
                    got += 1
            except OutputDirError:
                pass
        print(got)
    """) for _ in range(3)]
    counts = [int(p.communicate(timeout=30)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs) and sum(counts) > 0


def test_manifest_command_refuses_an_output_another_process_writes(tmp_path, capsys):
    csv, feats = _how2sign_input(tmp_path)
    out = tmp_path / "train.tsv"
    holder = _holder(out, folder_lock=False)
    try:
        code = cli.main(["manifest", "how2sign", str(csv), "--features", str(feats), "--out", str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2 and f"PID {holder.pid}" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------------------
# Output never an input
# ------------------------------------------------------------------------------------------------
def _how2sign_input(tmp_path: Path) -> tuple[Path, Path]:
    feats = tmp_path / "features"
    feats.mkdir()
    np.save(feats / "v1.npy", np.zeros((5, 4), np.float32))
    csv = tmp_path / "h2s.csv"
    csv.write_text("VIDEO_ID\tSENTENCE_NAME\tSENTENCE\nv\tv1\thello\nv\tv2\tgone\n", encoding="utf-8")
    return csv, feats


def test_manifest_output_equal_to_the_csv_is_refused_and_the_csv_kept(tmp_path, capsys):
    csv, feats = _how2sign_input(tmp_path)
    before = csv.read_bytes()
    code = cli.main(["manifest", "how2sign", str(csv), "--features", str(feats), "--out", str(tmp_path / "." / "h2s.csv")])
    assert code == 2 and "same path as the CSV argument" in capsys.readouterr().err
    assert csv.read_bytes() == before


def test_output_inside_an_input_folder_or_through_a_symlink_is_refused(tmp_path):
    (tmp_path / "feats").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "feats")
    with pytest.raises(ConfigError, match="inside --features"):
        check_output_not_input(tmp_path / "feats" / "emb.npy", {"--features": tmp_path / "feats"})
    with pytest.raises(ConfigError, match="same path as --features"):
        check_output_not_input(tmp_path / "link", {"--features": tmp_path / "feats"}, flag="--output_dir", out_is_folder=True)
    with pytest.raises(ConfigError, match="would replace or write into --manifest"):
        check_output_not_input(tmp_path, {"--manifest": tmp_path / "m.tsv"}, flag="--output_dir", out_is_folder=True)
    check_output_not_input(tmp_path / "out", {"--features": tmp_path / "feats", "--manifest": None})  # fine


def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "best_encoder.pt").write_bytes(b"trained weights")
    (run / "config.json").write_text(json.dumps({"settings": {}}))
    (run / "tokenizer.json").write_text(json.dumps({"decoder": "x"}))
    return run


@pytest.mark.parametrize("name", ["best_encoder.pt", "last.pt", "config.json"])
def test_export_over_a_file_of_the_run_is_refused_and_the_file_kept(tmp_path, capsys, name):
    run = _fake_run(tmp_path)
    (run / "last.pt").write_bytes(b"state")
    before = (run / name).read_bytes()
    code = cli.main(["export", "--run_dir", str(run), "--out", str(run / name)])
    assert code == 2 and name in capsys.readouterr().err and (run / name).read_bytes() == before


def test_export_to_a_folder_is_refused(tmp_path, capsys):
    run = _fake_run(tmp_path)
    code = cli.main(["export", "--run_dir", str(run), "--out", str(tmp_path)])
    assert code == 2 and "is a folder" in capsys.readouterr().err


def test_export_of_a_run_with_a_corrupt_config_names_it(tmp_path):
    run = _fake_run(tmp_path)
    (run / "config.json").write_text('{"settings": {', encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"cannot read {run / 'config.json'}.*damaged"):
        export.export_run(run, tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()


def test_export_with_a_missing_test_results_file_is_refused(tmp_path):
    run = _fake_run(tmp_path)
    with pytest.raises(ConfigError, match="--test_results .*nope.json not found"):
        export.export_run(run, tmp_path / "out.tar.gz", test_results=tmp_path / "nope.json")


# ------------------------------------------------------------------------------------------------
# Readers refuse what they cannot hold, before allocating it
# ------------------------------------------------------------------------------------------------
def _npy_with_header(path: Path, shape: tuple[int, ...], data: bytes = b"") -> Path:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        f.write(data)
    return path


def test_npy_claiming_a_terabyte_is_refused_naming_the_file(tmp_path, monkeypatch):
    path = _npy_with_header(tmp_path / "bomb.npy", (1_000_000, 1_000_000), b"\0" * 64)
    allocations = []
    monkeypatch.setattr(features_mod, "bytearray", lambda n: allocations.append(n) or bytearray(0), raising=False)
    with pytest.raises(DataError, match=rf"{path} cannot be read: its header declares an array of shape \(1000000, 1000000\)"):
        load_feature_file(path)
    assert allocations == []


def test_npy_over_the_memory_budget_is_refused_even_when_the_file_is_that_big(tmp_path, monkeypatch):
    monkeypatch.setattr(features_mod, "MAX_FEATURE_BYTES", 1000)
    path = tmp_path / "big.npy"
    np.save(path, np.zeros((100, 4), np.float32))  # 1600 bytes as float32
    with pytest.raises(DataError, match=rf"{path} declares an array of shape \(100, 4\), more than the 1,000 bytes"):
        features_mod.feature_shape(path)


def test_stride_zero_pt_expanding_to_terabytes_is_refused_before_materialising(tmp_path):
    path = tmp_path / "bomb.pt"
    torch.save(torch.zeros(1, 1).expand(300_000_000, 1024), path)  # 1.2 TB as float32
    assert path.stat().st_size < 10_000
    start = time.perf_counter()
    with pytest.raises(DataError, match=rf"feature file {path} declares a tensor of shape \(300000000, 1024\)"):
        load_feature_file(path)
    assert time.perf_counter() - start < 5


def test_stride_zero_pt_within_the_budget_is_refused_too(tmp_path):
    path = tmp_path / "view.pt"
    torch.save({"features": torch.zeros(1, 4).expand(1000, 4)}, path)
    with pytest.raises(CheckpointError, match=r"\(features\) holds a tensor of shape \(1000, 4\) with strides \(0, 1\)"):
        atomic.load_torch(path, what="feature file")


def test_zip_records_over_the_budget_are_refused_before_torch_reads_them(tmp_path, monkeypatch):
    path = tmp_path / "big.pt"
    torch.save(torch.zeros(1000), path)
    monkeypatch.setattr(atomic, "MAX_TENSOR_BYTES", 1000)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    with pytest.raises(CheckpointError, match=rf"{path} declares [\d,]+ bytes of data"):
        atomic.load_torch(path)


def _members(tmp_path: Path, names: list[str]) -> Path:
    path = tmp_path / "export.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, _io.BytesIO(b"x"))
    return path


def test_tarball_with_thousands_of_allowed_members_is_refused_at_once(tmp_path):
    path = _members(tmp_path, ["README.md"] * 2_000)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match="'README.md' appears twice"):
        export_load.open_export(path, tmp_path / "x")
    assert time.perf_counter() - start < 1 and not (tmp_path / "x").exists()


def test_tarball_member_count_and_total_size_limits(tmp_path, monkeypatch):
    names = ["README.md", "config.json", "tokenizer.json", "best_encoder.pt"]
    monkeypatch.setattr(export_load, "MAX_MEMBERS", 3)
    with pytest.raises(CheckpointError, match="more than 3 members"):
        export_load.open_export(_members(tmp_path, names), tmp_path / "x")
    monkeypatch.setattr(export_load, "MAX_MEMBERS", 16)
    monkeypatch.setattr(export_load, "MAX_TOTAL_BYTES", 3)
    with pytest.raises(CheckpointError, match="add up to more than 3 bytes"):
        export_load.open_export(_members(tmp_path, names), tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# Checkpoint messages
# ------------------------------------------------------------------------------------------------
HTML = b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head><body>...</body></html>"


@pytest.mark.parametrize(("content", "looks"), [
    (HTML, "an HTML page"),
    (bytes(range(256)) * 8, "random bytes"),
    (b"model weights here\n", "a text file"),
    (b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix", "a plain Python pickle"),
], ids=["html", "random", "text", "pickle"])
def test_a_file_that_is_not_a_checkpoint_says_what_it_looks_like(tmp_path, content, looks):
    path = tmp_path / "encoder.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        atomic.load_torch(path, what="encoder checkpoint")
    wanted = f"it is {looks}" if looks.startswith("a plain") else f"it looks like {looks}"
    assert f"{path} is not a PyTorch checkpoint ({wanted}" in str(err.value)
    assert "Python objects that would have to be executed" not in str(err.value)


def test_html_checkpoint_in_embed_is_one_line_naming_drive(tmp_path, capsys):
    path = tmp_path / "encoder.pth"
    path.write_bytes(HTML)
    np.save(tmp_path / "c.npy", np.zeros((3, 6), np.float32))
    code = cli.main(["embed", "--encoder_checkpoint", str(path), "--features", str(tmp_path / "c.npy"),
                     "--out", str(tmp_path / "out" / "e.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "Google Drive virus-scan" in err and err.count("\n") == 1


def test_corrupt_last_pt_says_how_to_go_on(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"encoder": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError) as err:
        atomic.load_torch(path, what="training state")
    assert str(path) in str(err.value) and "--overwrite" in str(err.value) and "best_encoder.pt" in str(err.value)


# ------------------------------------------------------------------------------------------------
# Full disk
# ------------------------------------------------------------------------------------------------
def test_full_disk_in_torch_save_names_the_folder_and_free_space_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic.save_torch(path, {"step": 1})

    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(DiskFullError) as err:
        atomic.save_torch(path, {"step": 2})
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert f"in {tmp_path}: the disk is full (" in str(err.value) and "MB free" in str(err.value)
    assert "enforce" not in str(err.value).split(";")[0]
    monkeypatch.undo()
    assert atomic.load_torch(path) == {"step": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_enospc_from_a_plain_write_is_explained(tmp_path):
    with pytest.raises(DiskFullError, match=rf"cannot write m.tsv in {tmp_path}: the disk is full"):
        with atomic.atomic_path(tmp_path / "m.tsv"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    with pytest.raises(PermissionError):
        with atomic.atomic_path(tmp_path / "m.tsv"):
            raise PermissionError(errno.EACCES, "Permission denied")


# ------------------------------------------------------------------------------------------------
# Manifest text byte for byte
# ------------------------------------------------------------------------------------------------
# Texts whose quotes are not CSV quoting (tests/data/test_manifest_quoting.py has the ones that are).
QUOTED = ['"Hello," she said.', 'He said "no"', 'one " lone', '"open only', 'closed only"', "it's 'single'", '  spaced  ']


def test_quotes_in_our_tsv_are_read_exactly_as_written(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("id\tlength\ttext\n" + "".join(f"c{i}\t3\t{t}\n" for i, t in enumerate(QUOTED)), encoding="utf-8")
    assert [r.text for r in read_manifest(path)] == QUOTED


def test_quoted_texts_round_trip_and_are_written_as_csv_writes_them(tmp_path):
    import csv

    rows = [ManifestRow(f"c{i}", t, 3, line=i + 2) for i, t in enumerate(QUOTED)]
    path = tmp_path / "m.tsv"
    write_manifest(path, rows)
    assert path.read_text(encoding="utf-8").splitlines()[1] == 'c0\t3\t"""Hello,"" she said."'
    assert read_manifest(path) == rows
    with open(path, encoding="utf-8", newline="") as f:
        assert [r["text"] for r in csv.DictReader(f, delimiter="\t")] == QUOTED


def test_a_tab_inside_a_text_is_refused_clearly_unless_quoted(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("id\tlength\ttext\na\t3\tfine\nb\t3\tone\ttwo\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: expected 3 fields, found 4 \(a tab inside the text\? write that text CSV-quoted"):
        read_manifest(path)
    write_manifest(tmp_path / "out.tsv", [ManifestRow("b", "one\ttwo", 3)])
    assert read_manifest(tmp_path / "out.tsv")[0].text == "one\ttwo"


def test_how2sign_csv_keeps_its_csv_quoting(tmp_path):
    path = tmp_path / "h2s.csv"
    path.write_text('VIDEO_ID\tSENTENCE_NAME\tSENTENCE\nv\tv1\t"""Hello,"" she said."\n', encoding="utf-8")
    assert read_manifest(path)[0].text == '"Hello," she said.'


def test_how2sign_text_with_quotes_converts_to_a_tsv_that_reads_back_the_same(tmp_path, capsys):
    feats = tmp_path / "features"
    feats.mkdir()
    np.save(feats / "v1.npy", np.zeros((5, 4), np.float32))
    csv = tmp_path / "h2s.csv"
    csv.write_text('VIDEO_ID\tSENTENCE_NAME\tSENTENCE\nv\tv1\t"""Hello,"" she said."\n', encoding="utf-8")
    assert cli.main(["manifest", "how2sign", str(csv), "--features", str(feats), "--out", str(tmp_path / "m.tsv")]) == 0
    assert (tmp_path / "m.tsv").read_text(encoding="utf-8") == 'id\tlength\ttext\nv1\t5\t"""Hello,"" she said."\n'
    assert read_manifest(tmp_path / "m.tsv")[0].text == '"Hello," she said.'


# ------------------------------------------------------------------------------------------------
# Database storages
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def silent_server():
    """A TCP server that accepts connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_postgresql_server_that_never_answers_is_an_error_not_a_hang(tmp_path, silent_server):
    pytest.importorskip("psycopg2")
    from sonar_ft.tune.storage import make_storage

    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        make_storage(f"postgresql://user:secret@127.0.0.1:{silent_server}/db", tmp_path / "study", timeout=2)
    assert time.perf_counter() - start < 20
    assert "did not answer within storage_timeout (2s)" in str(err.value) and "secret" not in str(err.value)


def test_postgresql_url_uses_the_installed_driver(monkeypatch):
    import importlib.util

    from sonar_ft.tune.storage import with_installed_driver

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "psycopg" else real(name, *a))
    if real("psycopg2") is not None:
        assert with_installed_driver("postgresql://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert with_installed_driver("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert with_installed_driver("sqlite:///x.db") == "sqlite:///x.db"


def test_engine_options_bound_every_wait():
    from sonar_ft.tune.storage import engine_options

    pg = engine_options("postgresql+psycopg2://u@h/db", 5)
    assert pg["connect_args"] == {"connect_timeout": 5, "options": "-c statement_timeout=5000"}
    assert engine_options("sqlite:///x.db", 5)["connect_args"]["timeout"] >= 5


def test_tuning_bounds_written_the_yaml_1_1_way_are_numbers():
    import yaml

    from sonar_ft.tune.space import parse_search_space

    raw = yaml.safe_load("learning_rate: {type: float, low: 1e-5, high: 1e-3, log: true}")
    assert raw["learning_rate"]["low"] == "1e-5"  # what PyYAML gives
    (spec,) = parse_search_space(raw)
    assert (spec.low, spec.high) == (1e-5, 1e-3)
    with pytest.raises(ConfigError, match="low must be a number, got 'small'"):
        parse_search_space({"learning_rate": {"type": "float", "low": "small", "high": 1e-3}})


# ------------------------------------------------------------------------------------------------
# embed / translate
# ------------------------------------------------------------------------------------------------
@pytest.fixture()
def tiny_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "encoder.pt"
    save_encoder(SignT5SonarEncoder(TINY).eval(), path)
    return path


def test_embed_of_a_nan_clip_is_refused_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    feats = tmp_path / "features"
    feats.mkdir()
    np.save(feats / "good.npy", np.ones((4, 6), np.float32))
    bad = np.ones((4, 6), np.float32)
    bad[2, 3] = np.nan
    np.save(feats / "bad.npy", bad)
    out = tmp_path / "out" / "emb.npy"
    code = cli.main(["embed", "--encoder_checkpoint", str(tiny_checkpoint), "--features", str(feats), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "clip 'bad'" in err and "contains NaN or Inf" in err
    assert not out.exists() and not ids_path(out).exists()


def test_embed_output_inside_the_feature_folder_is_refused(tmp_path, tiny_checkpoint, capsys):
    feats = tmp_path / "features"
    feats.mkdir()
    np.save(feats / "good.npy", np.ones((4, 6), np.float32))
    code = cli.main(["embed", "--encoder_checkpoint", str(tiny_checkpoint), "--features", str(feats),
                     "--out", str(feats / "emb.npy")])
    assert code == 2 and "inside --features" in capsys.readouterr().err and not (feats / "emb.npy").exists()


@pytest.mark.parametrize("flag", ["--batch_size", "--limit"])
def test_translate_refuses_zero_counts_before_loading_anything(tmp_path, capsys, flag):
    code = cli.main(["translate", "--encoder", str(tmp_path / "none.tar.gz"), "--features", str(tmp_path), flag, "0"])
    assert code == 2 and f"{flag} must be at least 1 (got 0)" in capsys.readouterr().err


def test_translate_names_each_clip_it_cannot_embed(tmp_path):
    nan = torch.ones(3, 6)
    nan[1, 1] = float("nan")
    clips = [torch.ones(3, 6), torch.ones(0, 6), torch.ones(3, 5), nan]
    with pytest.raises(DataError) as err:
        translate_mod._check_clips(["ok", "empty", "narrow", "nan"], clips, 6, tmp_path, "enc.pt")
    msg = str(err.value)
    assert "3 clip(s)" in msg and "empty: has zero frames" in msg and "narrow: has 5 features" in msg
    assert "nan: contains NaN" in msg and "ok" not in msg.split("(")[1].split(":")[0]


# ------------------------------------------------------------------------------------------------
# Decoder: a text encoder given as decoder; references longer than the decoder reads
# ------------------------------------------------------------------------------------------------
class _FakeDecoderModel(torch.nn.Module):
    max_target_seq_len = 8

    def __init__(self) -> None:
        super().__init__()
        self.final_proj = torch.nn.Linear(4, 10)

    def decode(self, *args):  # pragma: no cover - never called here
        raise AssertionError


class _FakeTokenizer:
    vocab_info = type("V", (), {"size": 10, "pad_idx": 0})()

    def create_decoder(self, **kwargs):
        return None

    def create_encoder(self, **kwargs):
        return lambda text: torch.arange(len(text.split()) + 3)  # </s> lang words... </s>


def test_a_text_encoder_given_as_decoder_is_named():
    from sonar_ft.models.decoder import FrozenTextDecoder

    encoder_like = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ConfigError, match=r"--decoder 'text_encoder.yaml' is not a SONAR text decoder \(it loads as a Sequential"):
        FrozenTextDecoder(encoder_like, _FakeTokenizer(), langs=["eng_Latn"], source="text_encoder.yaml")


def test_a_reference_longer_than_the_decoder_reads_is_named_with_its_row(tmp_path):
    from sonar_ft.data import FeatureStore
    from sonar_ft.data.bad_samples import find_bad_samples
    from sonar_ft.models.decoder import FrozenTextDecoder

    decoder = FrozenTextDecoder(_FakeDecoderModel(), _FakeTokenizer(), langs=["eng_Latn"], source="dec")
    long_text = "one two three four five six"  # 9 tokens > 8
    assert decoder.count_tokens(["short one", long_text], "eng_Latn") == [5, 9] and decoder.max_target_len == 8
    with pytest.raises(DataError, match=r"the reference 'one two three four five six' has 9 tokens, more than the 8"):
        decoder.tokenize(["ok", long_text], "eng_Latn")
    assert decoder.tokenize([long_text], "eng_Latn", max_len=8)[0].shape == (1, 8)  # truncation asked for: no error

    feats = tmp_path / "f"
    feats.mkdir()
    for name in ("a", "b"):
        np.save(feats / f"{name}.npy", np.ones((3, 4), np.float32))
    rows = [ManifestRow("a", "fine", None, line=2), ManifestRow("b", long_text, None, line=3)]
    bad = find_bad_samples(FeatureStore.open(feats), rows, progress=False,
                           count_tokens=lambda texts: decoder.count_tokens(texts, "eng_Latn"), max_tokens=decoder.max_target_len)
    assert [(b.id, "manifest line 3" in b.reason, "9 tokens" in b.reason) for b in bad] == [("b", True, True)]


def test_run_folder_checks_for_the_recipe(tmp_path):
    from types import SimpleNamespace

    from sonar_ft.files.guards import check_output_dir, recipe_inputs

    feats = tmp_path / "features"
    feats.mkdir()
    cfg = SimpleNamespace(train_features=str(feats), train_manifest=str(tmp_path / "t.tsv"), val_features=None,
                          val_manifest=None, encoder_checkpoint=str(tmp_path / "run" / "best_encoder.pt"),
                          decoder="text_sonar_basic_decoder", tokenizer=None, text_encoder="text_sonar_basic_encoder")
    inputs = recipe_inputs(cfg)
    assert set(inputs) == {"--train_features", "--train_manifest", "--encoder_checkpoint"}
    with pytest.raises(ConfigError, match="--encoder_checkpoint .*best_encoder.pt is a file this run writes"):
        check_output_dir(tmp_path / "run", inputs)
    with pytest.raises(ConfigError, match="--output_dir .* is inside --train_features"):
        check_output_dir(feats / "run", {"--train_features": str(feats)})
    with pytest.raises(ConfigError, match="same path as --train_features"):
        check_output_dir(feats, {"--train_features": str(feats)})
    check_output_dir(tmp_path / "run2", inputs)
    check_output_dir(tmp_path, {"--train_features": str(feats)})  # inputs in a subfolder of the run folder are fine


def test_texts_quoted_by_the_old_csv_writer_read_back_as_written(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text('id\ttext\na\t"""Hello,"" she said."\nb\t"Hello," she said.\n', encoding="utf-8")
    assert [r.text for r in read_manifest(path)] == ['"Hello," she said.', '"Hello," she said.']
