"""The Colab notebooks: jupytext sources in sync, one shared setup cell, and a Colab-like kernel run.

The notebooks' kernel never holds the SONAR stack (Colab's Python 3.13 cannot): the execution tests
run every notebook with ``DEMO = True`` in a separate virtual environment holding only what a
kernel needs to display (``requirements-kernel.txt``: ipykernel, papermill, matplotlib, pandas,
nbformat, jupytext — no torch), made by ``make kernel-venv``; the heavy steps run in this project's
environment, passed as the notebooks' ``ENV_DIR``. They check the files, the figures and the number
of output lines of each notebook.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path
from typing import Any

import nbformat
import pytest

from sonar_ft.notebook import colab
from sonar_ft.demo.paths import DemoPaths

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
SERIES = (
    "01_setup_and_verify_features",
    "01b_extract_features",
    "02_download_sonar_encoder",
    "03_quick_test",
    "04_finetune",
    "05_monitor_and_predictions",
    "06_test_evaluation",
    "07_export_encoder",
    "08_hyperparameter_tuning",
)
ALL = ("00_all_in_one", *SERIES)
EXTRACTION = "01b_extract_features"
TRAINING_SERIES = tuple(name for name in SERIES if name != EXTRACTION)
"""Executed in order on one demo; the extraction notebook stands apart (its own fixture, nothing reads its output)."""
KERNEL = "sonar-ft-colab-like"
KERNEL_VENV = Path(os.environ.get("SONAR_FT_KERNEL_VENV", ROOT / ".kernel-venv"))
SETUP_MARK = "# Setup: the project, Google Drive, the SONAR stack's environment."
MAX_OUTPUT_LINES = 600
"""Per notebook in DEMO mode: a cell that floods (progress bars redrawn line by line) shows up here."""
SECRET_PATTERNS = (
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face token
    r"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{20,}",
    r"AKIA[0-9A-Z]{16}",  # AWS access key id
    r"sk-[A-Za-z0-9]{20,}",  # OpenAI-style keys
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)\b(api_?key|secret|password|passwd|token)\s*=\s*['\"][^'\"]+['\"]",
)


def _notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


# ------------------------------------------------------------------------------------------------
# The saved notebooks and their jupytext sources
# ------------------------------------------------------------------------------------------------
def test_series_is_complete_and_every_notebook_has_its_source() -> None:
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == list(ALL)
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.py")) == list(ALL)


@pytest.mark.parametrize("name", ALL)
def test_notebook_is_in_sync_with_its_percent_source(name: str) -> None:
    import jupytext

    source = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    saved = _notebook(name)
    cells = lambda nb: [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]  # noqa: E731
    assert cells(saved) == cells(source), f"run: jupytext --sync notebooks/{name}.py"
    assert saved.metadata.get("jupytext", {}).get("formats") == "ipynb,py:percent"


def test_the_setup_cell_and_the_common_parameters_are_identical_everywhere() -> None:
    setups, commons = set(), set()
    for name in ALL:
        cells = _code_cells(_notebook(name))
        [setup] = [c.source for c in cells if c.source.startswith(SETUP_MARK)]
        setups.add(setup)
        commons.add(cells[0].source.split("\n\n")[0])  # the parameters cell's first block
    assert len(setups) == 1 and len(commons) == 1
    setup = setups.pop()
    assert "REPO_URL" in setup and "colab.setup(" in setup and "import torch" not in setup


@pytest.mark.parametrize("name", ALL)
def test_saved_notebook_has_no_outputs(name: str) -> None:
    for cell in _code_cells(_notebook(name)):
        assert cell.outputs == [] and cell.execution_count is None, f"{name}: a code cell was saved with outputs"


@pytest.mark.parametrize("name", ALL)
def test_first_code_cell_is_the_parameters_cell(name: str) -> None:
    first = _code_cells(_notebook(name))[0]
    assert "parameters" in first.metadata.get("tags", [])
    values = {
        node.targets[0].id: node.value
        for node in ast.parse(first.source).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    assert isinstance(values.get("DEMO"), ast.Constant) and values["DEMO"].value is False
    for name_ in ("REPO_URL", "DRIVE_FOLDER", "PROJECT_DIR", "ENV_DIR", "DEMO_DIR", "RUNS_DIR"):
        assert name_ in values, f"{name}: parameter {name_} missing"


@pytest.mark.parametrize("name", ALL)
def test_saved_notebook_holds_no_secrets_or_local_paths(name: str) -> None:
    for suffix in (".ipynb", ".py"):
        text = (NOTEBOOK_DIR / f"{name}{suffix}").read_text(encoding="utf-8")
        for pattern in SECRET_PATTERNS:
            assert not re.search(pattern, text), f"{name}: looks like a secret ({pattern})"
        for local in ("/work/", "/home/", "/tmp/", "/root/", "/Users/"):
            assert local not in text, f"{name}: machine-specific path {local!r}"


def test_the_kernel_side_of_the_notebooks_imports_no_torch() -> None:
    # Whatever a notebook imports from sonar_ft in its own kernel must import without the stack.
    modules = set()
    for name in ALL:
        for cell in _code_cells(_notebook(name)):
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sonar_ft"):
                    modules.add(node.module)
                elif isinstance(node, ast.Import):
                    modules |= {a.name for a in node.names}
    assert not modules & {"torch", "fairseq2", "sonar"} and {"sonar_ft.plots"} <= modules
    code = ("import importlib, sys\nfor m in ('torch', 'fairseq2', 'sonar'): sys.modules[m] = None\n"
            f"for m in {sorted(m for m in modules if m.startswith('sonar_ft'))!r} + ['sonar_ft.notebook.colab']:\n"
            "    importlib.import_module(m)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


# ------------------------------------------------------------------------------------------------
# sonar_ft.notebook.colab helpers
# ------------------------------------------------------------------------------------------------
def _fake_colab(monkeypatch: pytest.MonkeyPatch, **attributes: Any) -> None:
    module = types.ModuleType("google.colab")
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, "google.colab", module)


def test_offer_download_hands_the_file_to_colab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []
    _fake_colab(monkeypatch, files=types.SimpleNamespace(download=sent.append))
    (tmp_path / "model.tar.gz").write_bytes(b"x" * 10)
    colab.offer_download(tmp_path / "model.tar.gz")
    assert sent == [str(tmp_path / "model.tar.gz")]


def test_a_large_file_is_offered_as_its_drive_path_not_sent_through_the_browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    sent = []
    _fake_colab(monkeypatch, files=types.SimpleNamespace(download=sent.append))
    big = tmp_path / "content" / "drive" / "MyDrive" / "sonar_ft" / "runs" / "model.tar.gz"
    big.parent.mkdir(parents=True)
    with open(big, "wb") as f:
        f.truncate(colab.BROWSER_DOWNLOAD_LIMIT + 1)  # sparse: no real 500 MB written
    colab.offer_download(big)
    out = capsys.readouterr().out
    assert sent == [] and "MyDrive/sonar_ft/runs/model.tar.gz" in out and "drive.google.com" in out


def _project(tmp_path: Path, **kw: Any) -> colab.Project:
    return colab.Project(root=tmp_path, runs=tmp_path, features_pattern="f/{split}", manifest_pattern="m/{split}.tsv",
                         encoder_checkpoint=tmp_path / "e.pth", decoder="text_sonar_basic_decoder", device="auto",
                         feature_dim=768, **kw)


def test_training_without_a_gpu_stops_and_says_how_to_get_one(tmp_path: Path) -> None:
    from sonar_ft.stack_env import StackEnv

    project = _project(tmp_path)
    project._env["env"] = StackEnv(tmp_path / "env", {"cuda": False})
    with pytest.raises(colab.NotebookStop, match="Change runtime type"):
        colab.show_plan(project, 32)
    project._env["env"] = StackEnv(tmp_path / "env", {"cuda": True})
    project.require_gpu()  # a GPU: no stop


def _fake_plan(monkeypatch: pytest.MonkeyPatch, disk: dict[str, Any]) -> list[list[str]]:
    """``sonar-ft plan`` replaced: records its command line and writes ``disk`` as the plan's disk part."""
    seen: list[list[str]] = []

    def run(cmd: list[str], check: bool = True) -> int:
        cmd = [str(c) for c in cmd]
        seen.append(cmd)
        Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"flags": ["--batch_size", "32"], "settings": {}, "disk": disk}))
        return 0

    monkeypatch.setattr(colab, "run_command", run)
    return seen


def test_the_disk_plan_reads_this_drive_and_its_placement_reaches_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sonar_ft.stack_env import StackEnv

    project = _project(tmp_path, local_data=tmp_path / "content" / "sonar_data")
    project._env["env"] = StackEnv(tmp_path / "env", {"cuda": True})
    seen = _fake_plan(monkeypatch, {"fits": True, "needs_state_dir": True, "flags": ["--state_slots", "2"]})
    flags = colab.show_plan(project, 32, run_name="full", epochs=30, checkpoint_minutes=20)
    cmd = seen[0]
    for flag, value in (("--drive_dir", str(project.runs)), ("--resume_dir", str(project.run_dir("full"))),
                        ("--epochs", "30"), ("--checkpoint_every_minutes", "20")):
        assert cmd[cmd.index(flag) + 1] == value, flag
    assert "--encoder_gb" not in cmd  # not downloaded yet: it will add to Drive
    state = tmp_path / "content" / "sonar_state" / "full"
    assert flags == ["--batch_size", "32", "--state_dir", str(state), "--state_slots", "2", "--checkpoint_every_minutes", "20"]
    assert colab.show_plan(project, 8) == ["--batch_size", "32"] and "--drive_dir" not in seen[-1]  # no checkpoints kept


def test_checkpoints_that_cannot_fit_stop_before_training_with_what_to_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sonar_ft.stack_env import StackEnv

    project = _project(tmp_path)
    project._env["env"] = StackEnv(tmp_path / "env", {"cuda": True})
    _fake_plan(monkeypatch, {"fits": False, "needs_state_dir": True, "flags": ["--state_slots", "0"],
                             "drive_free_bytes": 6_700_000_000, "drive_peak_bytes": 12_500_000_000,
                             "alternatives": [{"change": "keep the encoder download and the decoder cache on local disk"}]})
    with pytest.raises(colab.NotebookStop, match=r"6.7 GB free.*12.5 GB.*keep the encoder download.*FAIRSEQ2_CACHE_DIR"):
        colab.show_plan(project, 32, run_name="full")


def test_the_plan_is_given_the_longest_verified_clip(tmp_path: Path) -> None:
    reports = {"train": {"ok": True, "length_stats": {"max": 812}}, "val": {"ok": True, "length_stats": {"max": 640}},
               "test": {"ok": False, "error": "x", "length_stats": None}}
    assert colab.longest_clip(reports) == 812
    for split, report in reports.items():
        (tmp_path / "verify").mkdir(exist_ok=True)
        (tmp_path / "verify" / f"{split}.json").write_text(json.dumps(report))
    assert colab.longest_verified_clip(_project(tmp_path)) == 812


def test_a_stale_report_is_never_shown_as_this_checks_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = tmp_path / "verify" / "train.json"
    old.parent.mkdir()
    old.write_text(json.dumps({"ok": True}))
    os.utime(old, (1, 1))
    monkeypatch.setattr(colab, "run_command", lambda cmd, check=True: 2)  # a verify that died without writing
    project = _project(tmp_path, python_path=sys.executable)
    (tmp_path / "f" / "train").mkdir(parents=True)
    with pytest.raises(colab.NotebookStop, match="verifying train failed"):
        colab.verify_splits(project, ["train"])


def test_every_address_agrees_with_the_one_setting() -> None:
    from sonar_ft.notebook import address

    stale = [str(p) for p, text in address.render(ROOT).items() if p.read_text(encoding="utf-8") != text]
    assert stale == [], "run: python -m sonar_ft.notebook.address && jupytext --sync notebooks/*.py"
    repo = address.repository(ROOT)
    for name in ALL:
        text = (NOTEBOOK_DIR / f"{name}.ipynb").read_text(encoding="utf-8")
        assert f'REPO_URL = \\"{address.repo_url(repo)}\\"' in text
        assert repo or "colab.research.google.com/github" not in text


@pytest.mark.parametrize("name", ALL)
def test_notebooks_that_train_ask_colab_for_a_gpu(name: str) -> None:
    meta = _notebook(name).metadata
    if name in ("02_download_sonar_encoder", "05_monitor_and_predictions"):  # download / plots: no GPU to waste
        assert "accelerator" not in meta
    else:
        assert meta.get("accelerator") == "GPU" and meta["colab"]["gpuType"] == "T4"


def test_colab_puts_the_stack_environment_on_local_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert colab.default_env_dir(tmp_path) == tmp_path / ".venv"
    _fake_colab(monkeypatch)
    assert colab.default_env_dir(tmp_path) == Path("/content/sonar_env")


def test_run_command_streams_output_and_stops_on_failure(capsys: pytest.CaptureFixture) -> None:
    colab.run_command([sys.executable, "-c", "print('hello from the child')"])
    assert "hello from the child" in capsys.readouterr().out
    with pytest.raises(colab.NotebookStop, match="exit code 3"):
        colab.run_command([sys.executable, "-c", "import sys; sys.exit(3)"])
    assert colab.run_command([sys.executable, "-c", "import sys; sys.exit(1)"], check=False) == 1


def test_find_run_outside_demo_names_the_notebook_to_run(tmp_path: Path) -> None:
    project = colab.Project(root=tmp_path, runs=tmp_path, features_pattern="f/{split}", manifest_pattern="m/{split}.tsv",
                            encoder_checkpoint=tmp_path / "e.pth", decoder="text_sonar_basic_decoder", device="cpu",
                            feature_dim=768)
    with pytest.raises(colab.NotebookStop, match="04_finetune"):
        project.find_run(tmp_path / "full")


def test_heavy_steps_run_with_the_stack_environments_python(tmp_path: Path) -> None:
    project = colab.Project(root=tmp_path, runs=tmp_path, features_pattern="f/{split}", manifest_pattern="m/{split}.tsv",
                            encoder_checkpoint=tmp_path / "e.pth", decoder="text_sonar_basic_decoder", device="cpu",
                            feature_dim=768, python_path="/content/sonar_env/bin/python")
    assert project.recipe_command(tmp_path / "run")[:2] == ["/content/sonar_env/bin/python", str(tmp_path / colab.RECIPE)]
    assert project.cli_command("plan")[:3] == ["/content/sonar_env/bin/python", "-m", "sonar_ft.cli"]


def test_features_packed_in_step_0_are_what_the_later_steps_read(tmp_path: Path) -> None:
    project = colab.Project(root=tmp_path, runs=tmp_path, features_pattern="f/{split}", manifest_pattern="m/{split}.tsv",
                            encoder_checkpoint=tmp_path / "e.pth", decoder="text_sonar_basic_decoder", device="cpu",
                            feature_dim=768, python_path="/content/sonar_env/bin/python")
    project._env["features:train"] = tmp_path / "old_local_copy"
    packed = project.with_features(colab.PACKED_FEATURES)
    assert packed.source_features("train") == tmp_path / "features" / "train.tar"
    assert packed.features("val") == tmp_path / "features" / "val.tar"  # no LOCAL_DATA here: read in place
    assert "features:train" not in packed._env and packed.python == project.python


def test_all_in_one_extracts_each_splits_videos_and_reads_the_archives_when_video_dir_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [cell] = [c.source for c in _code_cells(_notebook("00_all_in_one")) if c.source.startswith("if not VIDEO_DIR")]
    project = colab.Project(root=tmp_path, runs=tmp_path / "runs", features_pattern="f/{split}", manifest_pattern="m/{split}.csv",
                            encoder_checkpoint=tmp_path / "e.pth", decoder="text_sonar_basic_decoder", device="cuda",
                            feature_dim=768, python_path="py")
    for split in colab.SPLITS:
        (tmp_path / "videos" / split).mkdir(parents=True)
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "val.tar").write_bytes(b"packed before")  # a split already packed is not extracted again
    commands: list[list[str]] = []
    monkeypatch.setattr(colab, "run_command", lambda cmd, **_: commands.append([str(c) for c in cmd]) or 0)
    scope = {"VIDEO_DIR": "videos/{split}", "DEMO": False, "P": project, "colab": colab}
    exec(cell, scope)
    steps = [c[3] for c in commands]  # python -m sonar_ft.cli COMMAND ...
    assert steps == ["download", "extract", "pack", "extract", "pack"]
    extract = commands[1]
    assert extract[4:8] == ["--how2sign-csv", str(tmp_path / "m" / "train.csv"), "--video-dir", str(tmp_path / "videos" / "train")]
    assert commands[2][-4:] == ["--out", str(tmp_path / "features" / "train.tar"), "--dtype", "fp16"]  # half the Drive
    assert scope["P"].source_features("test") == tmp_path / "features" / "test.tar"


# ------------------------------------------------------------------------------------------------
# Executing every notebook in a Colab-like kernel
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A Jupyter kernel ``sonar-ft-colab-like`` running the kernel venv's Python (no torch in it)."""
    python = KERNEL_VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no Colab-like kernel environment at {KERNEL_VENV}: create it with `make kernel-venv`")
    no_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0, f"{KERNEL_VENV} must not hold torch (it stands for Colab's 3.13 kernel)"
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Colab-like kernel (no torch)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return {"JUPYTER_PATH": str(jupyter_path)}


def _execute(name: str, out_dir: Path, env: dict[str, str], cwd: Path = NOTEBOOK_DIR,
             **parameters: Any) -> tuple[nbformat.NotebookNode, BaseException | None, float]:
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{name}.ipynb"
    error = None
    start = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            papermill.execute_notebook(
                str(NOTEBOOK_DIR / f"{name}.ipynb"), str(output), parameters={"ENV_DIR": sys.prefix, **parameters},
                kernel_name=KERNEL, cwd=str(cwd), progress_bar=False, log_output=False, execution_timeout=600,
            )
        except papermill.PapermillExecutionError as exc:
            error = exc
    return nbformat.read(output, as_version=4), error, time.monotonic() - start


def _private_demo(tiny_demo: DemoPaths, tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    demo_dir = tmp_path_factory.mktemp(name)
    for part in ("data", "assets"):  # the shared fixture stays read-only; notebooks write run folders
        shutil.copytree(tiny_demo.root / part, demo_dir / part)
    return demo_dir


@pytest.fixture(scope="module")
def series(tiny_demo: DemoPaths, kernel_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Notebooks 01-08 executed in order with DEMO = True on a private copy of the tiny demo."""
    demo_dir = _private_demo(tiny_demo, tmp_path_factory, "notebook_demo")
    out_dir = tmp_path_factory.mktemp("executed")
    executed = {name: _execute(name, out_dir, kernel_env, DEMO=True, DEMO_DIR=str(demo_dir)) for name in TRAINING_SERIES}
    report = {name: {"seconds": round(t, 1), "output_lines": _line_count(nb), "ok": e is None}
              for name, (nb, e, t) in executed.items()}
    print("\nnotebook runs (Colab-like kernel, DEMO):\n" + json.dumps(report, indent=1))
    return {"demo": DemoPaths(demo_dir), "runs": demo_dir / colab.NOTEBOOK_RUNS, "notebooks": executed,
            "out_dir": out_dir, "env": kernel_env}


def _ran(series: dict[str, Any], name: str) -> nbformat.NotebookNode:
    nb, error, _ = series["notebooks"][name]
    assert error is None, f"{name} failed: {error}"
    return nb


def _outputs(nb: nbformat.NotebookNode) -> list[dict]:
    return [o for cell in _code_cells(nb) for o in cell.get("outputs", [])]


def _pngs(nb: nbformat.NotebookNode) -> int:
    return sum(1 for o in _outputs(nb) if "image/png" in o.get("data", {}))


def _tables(nb: nbformat.NotebookNode) -> list[str]:
    return [o["data"]["text/html"] for o in _outputs(nb) if "text/html" in o.get("data", {}) and "<table" in o["data"]["text/html"]]


def _has_table(nb: nbformat.NotebookNode, *headers: str) -> bool:
    return any(all(f"<th>{h}</th>" in table for h in headers) for table in _tables(nb))


def _text(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in _outputs(nb) if o.get("output_type") == "stream")


def _line_count(nb: nbformat.NotebookNode) -> int:
    """Lines a reader scrolls through: every newline and every carriage-return redraw counts."""
    return len([line for line in re.split(r"\r\n|\r|\n", _text(nb)) if line.strip()])


@pytest.mark.slow
def test_01b_extracts_synthetic_videos_packs_them_and_estimates_the_time(
    tiny_demo: DemoPaths, kernel_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    demo_dir = _private_demo(tiny_demo, tmp_path_factory, "extract_demo")
    nb, error, seconds = _execute(EXTRACTION, tmp_path_factory.mktemp("executed_01b"), kernel_env,
                                  DEMO=True, DEMO_DIR=str(demo_dir))
    print(f"\n{EXTRACTION} (Colab-like kernel, DEMO): {seconds:.1f} s, {_line_count(nb)} output lines")
    assert error is None, f"{EXTRACTION} failed: {error}"
    work = demo_dir / colab.NOTEBOOK_RUNS / "extract_demo"
    with tarfile.open(work / "features" / "train.tar") as tar:
        packed = {Path(n).name for n in tar.getnames()}
    assert {f"demo_clip0{i}.npy" for i in range(3)} <= packed
    assert _has_table(nb, "id", "frames", "windows", "status")
    assert re.search(r"estimate: [\d.e-]+ h of video -> about [\d.]+ min", _text(nb))
    assert 0 < _line_count(nb) <= MAX_OUTPUT_LINES


@pytest.mark.slow
def test_01_verifies_every_split_with_a_table_and_a_histogram(series: dict[str, Any]) -> None:
    nb = _ran(series, "01_setup_and_verify_features")
    for split in colab.SPLITS:
        report = json.loads((series["runs"] / "verify" / f"{split}.json").read_text())
        assert report["ok"] and report["counts"]["checked"] > 0
    assert _has_table(nb, "split", "manifest rows", "errors", "result")
    assert _pngs(nb) == 1 and (series["runs"] / "verify" / "lengths.png").is_file()
    assert "All splits can be trained on" in _text(nb) and "stack environment" in _text(nb)


@pytest.mark.slow
def test_02_shows_the_encoder_architecture_and_parameter_count(series: dict[str, Any]) -> None:
    from sonar_ft.models.encoder import count_parameters, load_encoder

    nb = _ran(series, "02_download_sonar_encoder")
    encoder, _ = load_encoder(series["demo"].encoder_checkpoint)
    assert f"{count_parameters(encoder):,} parameters" in _text(nb)
    assert _has_table(nb, "setting", "value") and "num_encoder_layers" in "".join(_tables(nb))


@pytest.mark.slow
def test_03_runs_the_quick_test_and_plots_it(series: dict[str, Any]) -> None:
    nb = _ran(series, "03_quick_test")
    run = series["runs"] / "quick_test"
    settings = json.loads((run / "config.json").read_text())["settings"]
    assert (settings["max_samples"], settings["epochs"], settings["eval_every"]) == (50, 5, 1)
    assert sorted(p.name for p in run.glob("metrics_epoch*.json")) == [f"metrics_epoch{i}.json" for i in range(1, 6)]
    assert _pngs(nb) == 2 and _has_table(nb, "epoch", "train_loss", "val_loss", "val_bleu")
    assert "memory plan: none needed, DEMO mode" in _text(nb)


@pytest.mark.slow
def test_04_fine_tunes_into_the_run_folder(series: dict[str, Any]) -> None:
    nb = _ran(series, "04_finetune")
    run = series["runs"] / "full"
    assert (run / "best_encoder.pt").is_file() and (run / "last.pt").is_file()
    assert len(list(run.glob("metrics_epoch*.json"))) == json.loads((run / "config.json").read_text())["settings"]["epochs"]
    assert _pngs(nb) == 2 and "best epoch" in _text(nb)


@pytest.mark.slow
def test_05_monitors_run_04_and_tables_its_predictions(series: dict[str, Any]) -> None:
    nb = _ran(series, "05_monitor_and_predictions")
    assert not (series["runs"] / colab.STANDALONE_DEMO_RUN).exists(), "05 should have read notebook 04's run"
    assert (series["runs"] / "full" / "plots" / "bleu.png").is_file()
    assert _pngs(nb) == 2
    assert _has_table(nb, "epoch", "train_loss", "val_bleu") and _has_table(nb, "reference", "prediction", "bleu_score")


@pytest.mark.slow
def test_06_scores_the_best_encoder_on_the_test_split(series: dict[str, Any]) -> None:
    nb = _ran(series, "06_test_evaluation")
    results = json.loads((series["runs"] / "full" / "test_results.json").read_text())
    assert results["num_samples"] == len(series["demo"].split_manifest("test").read_text().splitlines()) - 1
    assert results["encoder_checkpoint"].endswith("full/best_encoder.pt")
    assert _has_table(nb, "num_samples", "bleu", "chrf") and _has_table(nb, "reference", "prediction")


@pytest.mark.slow
def test_07_exports_the_tarball_and_translates_from_it(series: dict[str, Any]) -> None:
    nb = _ran(series, "07_export_encoder")
    with tarfile.open(series["runs"] / "sonar_encoder_finetuned.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"best_encoder.pt", "config.json", "tokenizer.json", "README.md", "test_results.json"} <= names
    assert _has_table(nb, "member", "size")
    assert _has_table(nb, "id", "reference", "eng_Latn", "fra_Latn")


@pytest.mark.slow
def test_08_runs_a_study_shows_its_plots_and_trains_from_it(series: dict[str, Any]) -> None:
    nb = _ran(series, "08_hyperparameter_tuning")
    study = series["runs"] / "tuning"
    for name in ("best_hyperparameters.json", "best_config.yaml", "trials.csv", "study_summary.json",
                 "plots/optimization_history.png"):
        assert (study / name).is_file(), name
    assert _pngs(nb) >= 1 and _has_table(nb, "parameter", "value")
    assert (series["runs"] / "from_tuning" / "best_encoder.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING_SERIES)
def test_each_notebook_prints_a_readable_amount(series: dict[str, Any], name: str) -> None:
    nb = _ran(series, name)
    assert 0 < _line_count(nb) <= MAX_OUTPUT_LINES, f"{name}: {_line_count(nb)} output lines"


@pytest.mark.slow
def test_a_missing_run_stops_with_a_one_line_message(series: dict[str, Any], tmp_path: Path) -> None:
    nb, error, _ = _execute("06_test_evaluation", tmp_path, series["env"], RUNS_DIR=str(tmp_path / "no_runs"))
    assert error is not None and error.ename == "NotebookStop"
    assert "04_finetune" in error.evalue
    [shown] = [o for o in _outputs(nb) if o.get("output_type") == "error"]
    assert len(shown["traceback"]) == 1  # the message, not a traceback
