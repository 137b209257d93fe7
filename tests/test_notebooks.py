"""The Colab notebooks: saved clean, and executed top to bottom with ``DEMO = True`` in a real kernel.

The slow tests run every notebook of ``notebooks/`` in order (01 → 08) with papermill on a copy of
the session's tiny demo, in a Jupyter kernel of this interpreter, then check what each produced:
files in the run folders, PNG figures and tables among the cell outputs.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shutil
import sys
import tarfile
import types
from pathlib import Path
from typing import Any

import nbformat
import pytest

from sonar_ft import colab
from sonar_ft.demo.build import DemoPaths

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
SERIES = (
    "01_setup_and_verify_features",
    "02_download_sonar_encoder",
    "03_quick_test",
    "04_finetune",
    "05_monitor_and_predictions",
    "06_test_evaluation",
    "07_export_encoder",
    "08_hyperparameter_tuning",
)
KERNEL = "sonar-ft-tests"
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
# The saved notebooks
# ------------------------------------------------------------------------------------------------
def test_series_is_complete() -> None:
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == list(SERIES)


@pytest.mark.parametrize("name", SERIES)
def test_saved_notebook_has_no_outputs(name: str) -> None:
    for cell in _code_cells(_notebook(name)):
        assert cell.outputs == [], f"{name}: a code cell was saved with outputs"
        assert cell.execution_count is None, f"{name}: a code cell was saved with an execution count"
    assert "widgets" not in _notebook(name).metadata


@pytest.mark.parametrize("name", SERIES)
def test_first_code_cell_is_the_parameters_cell(name: str) -> None:
    first = _code_cells(_notebook(name))[0]
    assert "parameters" in first.metadata.get("tags", [])
    values = {
        node.targets[0].id: node.value
        for node in ast.parse(first.source).body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    assert isinstance(values.get("DEMO"), ast.Constant) and values["DEMO"].value is False
    for name_ in ("DRIVE_FOLDER", "PROJECT_DIR", "DEMO_DIR", "RUNS_DIR"):
        assert name_ in values, f"{name}: parameter {name_} missing"


@pytest.mark.parametrize("name", SERIES)
def test_saved_notebook_holds_no_secrets_or_local_paths(name: str) -> None:
    text = (NOTEBOOK_DIR / f"{name}.ipynb").read_text(encoding="utf-8")
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text), f"{name}: looks like a secret ({pattern})"
    for local in ("/work/", "/home/", "/tmp/", "/root/", "/Users/"):
        assert local not in text, f"{name}: machine-specific path {local!r}"


def test_saved_notebooks_are_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOK_DIR / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run python notebooks/build_notebooks.py after editing it"


# ------------------------------------------------------------------------------------------------
# sonar_ft.colab helpers
# ------------------------------------------------------------------------------------------------
def _requirements(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "requirements.txt"
    path.write_text("# pinned\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_ensure_requirements_restarts_when_torch_was_replaced(tmp_path: Path) -> None:
    versions = {"torch": "2.5.1"}
    installs, restarts = [], []

    def pip(path: Path) -> None:
        installs.append(path)
        versions["torch"] = "2.9.1"

    check = colab.ensure_requirements(_requirements(tmp_path, "torch==2.9.1"), install=True, pip=pip,
                                      restart=lambda: restarts.append(1), version_of=versions.get)
    assert installs and restarts == [1]
    assert "2.5.1" in check.restart_reason and "2.9.1" in check.restart_reason


def test_ensure_requirements_does_not_restart_when_torch_is_unchanged(tmp_path: Path) -> None:
    versions = {"torch": "2.9.1", "sacrebleu": None}
    restarts = []

    def pip(path: Path) -> None:
        versions["sacrebleu"] = "2.4.0"

    check = colab.ensure_requirements(_requirements(tmp_path, "torch==2.9.1", "sacrebleu"), install=True, pip=pip,
                                      restart=lambda: restarts.append(1), version_of=versions.get)
    assert check.installed and check.unsatisfied == ["sacrebleu"]
    assert restarts == [] and check.restart_reason is None


def test_ensure_requirements_skips_pip_when_everything_is_installed(tmp_path: Path) -> None:
    installs = []
    check = colab.ensure_requirements(_requirements(tmp_path, "torch==2.9.1", "numpy"), install=True,
                                      pip=installs.append, version_of={"torch": "2.9.1", "numpy": "2.0"}.get)
    assert installs == [] and check.unsatisfied == []


def test_ensure_requirements_only_lists_what_is_missing_outside_colab(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    installs = []
    check = colab.ensure_requirements(_requirements(tmp_path, "torch==2.9.1"), pip=installs.append,
                                      version_of={"torch": "2.5.1"}.get)
    assert installs == [] and not check.installed
    assert "torch==2.9.1" in capsys.readouterr().out


def _fake_colab(monkeypatch: pytest.MonkeyPatch, **attributes: Any) -> None:
    module = types.ModuleType("google.colab")
    for key, value in attributes.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, "google.colab", module)


def test_ensure_requirements_installs_by_default_in_colab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_colab(monkeypatch)
    installs = []
    check = colab.ensure_requirements(_requirements(tmp_path, "sacrebleu"), pip=installs.append,
                                      restart=lambda: pytest.fail("torch did not change"), version_of={"torch": "2.9.1"}.get)
    assert installs == [tmp_path / "requirements.txt"] and check.installed


def test_offer_download_hands_the_file_to_colab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent = []
    _fake_colab(monkeypatch, files=types.SimpleNamespace(download=sent.append))
    (tmp_path / "model.tar.gz").write_bytes(b"x" * 10)
    colab.offer_download(tmp_path / "model.tar.gz")
    assert sent == [str(tmp_path / "model.tar.gz")]


def test_run_command_streams_output_and_stops_on_failure(capsys: pytest.CaptureFixture) -> None:
    colab.run_command([sys.executable, "-c", "print('hello from the child')"])
    assert "hello from the child" in capsys.readouterr().out
    with pytest.raises(colab.NotebookStop, match="exit code 3"):
        colab.run_command([sys.executable, "-c", "import sys; sys.exit(3)"])


def test_find_run_outside_demo_names_the_notebook_to_run(tmp_path: Path) -> None:
    project = colab.Project(root=tmp_path, runs=tmp_path, features_pattern="f/{split}", manifest_pattern="m/{split}.tsv",
                            encoder_checkpoint=tmp_path / "e.pth", decoder="text_sonar_basic_decoder", device="cpu",
                            feature_dim=768)
    with pytest.raises(colab.NotebookStop, match="04_finetune"):
        project.find_run(tmp_path / "full")


# ------------------------------------------------------------------------------------------------
# Executing the series
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment whose Jupyter kernel ``sonar-ft-tests`` is this interpreter (whatever other kernels exist)."""
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "sonar-ft tests", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return {"JUPYTER_PATH": str(jupyter_path), "TQDM_DISABLE": "1"}


def _execute(name: str, out_dir: Path, env: dict[str, str], **parameters: Any) -> tuple[nbformat.NotebookNode, BaseException | None]:
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / f"{name}.ipynb"
    error = None
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        try:
            papermill.execute_notebook(
                str(NOTEBOOK_DIR / f"{name}.ipynb"), str(output), parameters=parameters, kernel_name=KERNEL,
                cwd=str(NOTEBOOK_DIR), progress_bar=False, log_output=False, execution_timeout=600,
            )
        except papermill.PapermillExecutionError as exc:
            error = exc
    return nbformat.read(output, as_version=4), error


@pytest.fixture(scope="module")
def series(tiny_demo: DemoPaths, kernel_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every notebook executed in order with DEMO = True on a private copy of the tiny demo."""
    demo_dir = tmp_path_factory.mktemp("notebook_demo")
    for part in ("data", "assets"):  # the shared fixture stays read-only; notebooks write run folders
        shutil.copytree(tiny_demo.root / part, demo_dir / part)
    out_dir = tmp_path_factory.mktemp("executed")
    executed = {name: _execute(name, out_dir, kernel_env, DEMO=True, DEMO_DIR=str(demo_dir)) for name in SERIES}
    return {"demo": DemoPaths(demo_dir), "runs": demo_dir / colab.NOTEBOOK_RUNS, "notebooks": executed,
            "out_dir": out_dir, "env": kernel_env}


def _ran(series: dict[str, Any], name: str) -> nbformat.NotebookNode:
    nb, error = series["notebooks"][name]
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


@pytest.mark.slow
def test_01_verifies_every_split_with_a_table_and_a_histogram(series: dict[str, Any]) -> None:
    nb = _ran(series, "01_setup_and_verify_features")
    for split in colab.SPLITS:
        report = json.loads((series["runs"] / "verify" / f"{split}.json").read_text())
        assert report["ok"] and report["counts"]["checked"] > 0
    assert _has_table(nb, "split", "manifest rows", "errors", "result")
    assert _pngs(nb) == 1 and (series["runs"] / "verify" / "lengths.png").is_file()
    assert "All splits can be trained on" in _text(nb)


@pytest.mark.slow
def test_02_shows_the_encoder_architecture_and_parameter_count(series: dict[str, Any]) -> None:
    from sonar_ft.encoder import count_parameters, load_encoder

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
    assert results["features"] == str(series["demo"].split_features("test").resolve())
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
                 "plots/optimization_history.png", "plots/optimization_history.html"):
        assert (study / name).is_file(), name
    assert json.loads((study / "study_summary.json").read_text())["trials"]["total"] == 2
    assert _pngs(nb) >= 1 and _has_table(nb, "parameter", "value") and _has_table(nb, "number", "state", "value")
    assert (series["runs"] / "from_tuning" / "best_encoder.pt").is_file()


@pytest.mark.slow
def test_rerunning_the_finetune_notebook_does_not_train_again(series: dict[str, Any]) -> None:
    _ran(series, "04_finetune")
    run = series["runs"] / "full"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.glob("metrics_epoch*.json")}
    last = (run / "last.pt").stat().st_mtime_ns
    nb, error = _execute("04_finetune", series["out_dir"] / "again", series["env"], DEMO=True, DEMO_DIR=str(series["demo"].root))
    assert error is None, error
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.glob("metrics_epoch*.json")} == before
    assert (run / "last.pt").stat().st_mtime_ns == last


@pytest.mark.slow
def test_a_missing_run_stops_with_a_one_line_message(series: dict[str, Any], tmp_path: Path) -> None:
    nb, error = _execute("06_test_evaluation", tmp_path, series["env"], RUNS_DIR=str(tmp_path / "no_runs"))
    assert error is not None and error.ename == "NotebookStop"
    assert "04_finetune" in error.evalue
    [shown] = [o for o in _outputs(nb) if o.get("output_type") == "error"]
    assert len(shown["traceback"]) == 1  # the message, not a traceback
