"""The stack environment: the commands it runs on Colab (as text), and a real one made offline here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sonar_ft import stack_env
from sonar_ft.stack_env import StackEnvError, create_commands, ensure_stack_env

ROOT = Path(__file__).resolve().parents[1]


class FakeRunner:
    """Records commands; ``uv venv`` makes the folders a venv has; the check prints its JSON line."""

    def __init__(self, fail_pythons: tuple[str, ...] = (), check_ok: bool = True) -> None:
        self.commands: list[list[str]] = []
        self.fail_pythons = fail_pythons
        self.check_ok = check_ok

    def __call__(self, cmd: list[str]) -> subprocess.CompletedProcess[str]:
        self.commands.append(cmd)
        if cmd[1:3] == ["venv", "--python"]:
            if cmd[3] in self.fail_pythons:
                return subprocess.CompletedProcess(cmd, 2, f"No interpreter found for Python {cmd[3]}")
            env = Path(cmd[-1])
            (env / "bin").mkdir(parents=True)
            (env / "bin" / "python").write_text("")
            (env / "lib" / "python3.12" / "site-packages").mkdir(parents=True)
        if cmd[1:2] == ["-c"]:
            if not self.check_ok:
                return subprocess.CompletedProcess(cmd, 1, "ModuleNotFoundError: No module named 'fairseq2n'")
            info = {"python": "3.12.11", "torch": "2.9.1+cu128", "fairseq2": "0.8.1", "sonar": "0.5.0", "cuda": True,
                    "gpu": "Tesla T4", "gpu_memory_gib": 14.7, "bf16": False}
            return subprocess.CompletedProcess(cmd, 0, "SONAR_FT_ENV " + json.dumps(info) + "\n")
        return subprocess.CompletedProcess(cmd, 0, "")


def test_the_commands_run_on_colab(tmp_path: Path) -> None:
    env, project = Path("/content/sonar_env"), Path("/content/sonar-ft")
    cmds = [" ".join(c) for c in create_commands(env, project, python="3.12")]
    assert cmds == [
        "uv venv --python 3.12 --seed /content/sonar_env",
        "uv pip install --python /content/sonar_env/bin/python -r /content/sonar-ft/requirements.txt",
        "uv pip install --python /content/sonar_env/bin/python --no-deps -e /content/sonar-ft",
    ]


def test_creation_runs_those_commands_then_the_check_and_times_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runner = FakeRunner()
    ticks = iter([100.0, 254.0])
    result = ensure_stack_env(tmp_path / "env", ROOT, uv="uv", runner=runner, clock=lambda: next(ticks))
    assert [c[:3] for c in runner.commands[:3]] == [["uv", "venv", "--python"], ["uv", "pip", "install"], ["uv", "pip", "install"]]
    assert runner.commands[0][3] == "3.12" and runner.commands[3][1] == "-c"
    assert result.created and result.seconds == 154.0 and result.python == tmp_path / "env" / "bin" / "python"
    out = capsys.readouterr().out
    assert "created and checked in 154 s" in out and "GPU Tesla T4 (14.7 GiB, no bf16)" in out


def test_falls_back_to_3_11_when_3_12_cannot_be_had(tmp_path: Path) -> None:
    runner = FakeRunner(fail_pythons=("3.12",))
    ensure_stack_env(tmp_path / "env", ROOT, uv="uv", runner=runner)
    assert [c[3] for c in runner.commands if c[1] == "venv"] == ["3.12", "3.11"]


def test_no_usable_python_names_the_versions_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(StackEnvError, match="(?s)no Python of 3.12, 3.11, 3.10.*install python3.12"):
        ensure_stack_env(tmp_path / "env", ROOT, uv="uv", runner=FakeRunner(fail_pythons=("3.12", "3.11", "3.10")))


def test_a_checked_environment_is_reused_and_a_broken_one_rebuilt(tmp_path: Path) -> None:
    ensure_stack_env(tmp_path / "env", ROOT, uv="uv", runner=FakeRunner())
    runner = FakeRunner()
    again = ensure_stack_env(tmp_path / "env", ROOT, uv="uv", runner=runner)
    assert not again.created and [c[1] for c in runner.commands] == ["-c"]  # only the check
    broken = FakeRunner(check_ok=False)
    with pytest.raises(StackEnvError, match="(?s)cannot import the stack.*fairseq2n"):
        ensure_stack_env(tmp_path / "env", ROOT, uv="uv", runner=broken)
    assert any(c[1] == "venv" for c in broken.commands)  # it tried to create it again


def test_unsupported_python_names_the_supported_ones_and_the_way_out() -> None:
    with pytest.raises(StackEnvError) as err:
        stack_env.check_supported_python((3, 13))
    assert "Python 3.13 cannot run the SONAR stack" in str(err.value)
    assert "3.10, 3.11, 3.12" in str(err.value) and "python -m sonar_ft.stack_env --env" in str(err.value)
    stack_env.check_supported_python((3, 12))


def test_the_module_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; sys.modules['fairseq2'] = None\n"
            "import sonar_ft.stack_env, sonar_ft.notebook.colab")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_a_real_environment_made_offline_with_this_machines_python(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # No download: uv uses this machine's Python 3.x, and the packages come from the running environment.
    uv = stack_env.find_uv()
    if uv is None:
        pytest.skip("uv is not installed in this environment (it is in requirements-dev.txt: run make setup)")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = tmp_path / "sonar_env"
    made = ensure_stack_env(env, ROOT, pythons=(version,), uv=uv, packages_from=sys.prefix)
    assert made.created and made.info["fairseq2"] == "0.8.1" and made.info["python"].startswith(version)
    assert made.info["cuda"] in (True, False)
    where = subprocess.run([str(made.python), "-c", "import sonar_ft, sys; print(sonar_ft.__file__, sys.prefix)"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert where == [str(ROOT / "sonar_ft" / "__init__.py"), str(env)]
    again = ensure_stack_env(env, ROOT, pythons=(version,), uv=uv, packages_from=sys.prefix)
    assert not again.created
    assert "reused and checked" in capsys.readouterr().out


def test_importing_the_stack_on_an_unsupported_python_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fairseq2", None)  # as on Python 3.13: not installable
    with pytest.raises(StackEnvError, match="Python 3.13 cannot run the SONAR stack.*3.10, 3.11, 3.12"):
        stack_env.require_stack((3, 13))
    with pytest.raises(StackEnvError, match="not installed in this Python.*make setup"):
        stack_env.require_stack((3, 12))


def test_an_environment_not_made_here_is_used_when_it_works_and_never_deleted(tmp_path: Path) -> None:
    env = tmp_path / ".venv"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python").write_text("")
    runner = FakeRunner()
    assert not ensure_stack_env(env, ROOT, uv="uv", runner=runner).created
    assert [c[1] for c in runner.commands] == ["-c"]
    with pytest.raises(StackEnvError, match="left alone"):
        ensure_stack_env(env, ROOT, uv="uv", runner=FakeRunner(check_ok=False))
    assert (env / "bin" / "python").is_file()


def test_the_stack_environment_installs_no_notebook_test_or_tuning_tools() -> None:
    root = Path(__file__).resolve().parents[1]
    names = {line.split("==")[0].split(";")[0].strip().lower() for line in (root / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")}
    assert not names & {"jupyter", "papermill", "pytest", "optuna", "plotly", "psycopg2-binary", "jupytext", "nbclient"}
    assert {"torch", "fairseq2", "sonar-space"} <= names
    dev = (root / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev and "-r requirements-tune.txt" in dev  # `make test` still installs everything


def test_tuning_extras_install_only_when_missing(tmp_path: Path) -> None:
    from sonar_ft.stack_env import ensure_extras

    calls = []

    def runner(cmd):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1 if cmd[1:2] == ["-c"] and len(calls) == 1 else 0, "", None)

    assert ensure_extras(tmp_path / "env", tmp_path, "tune", runner=runner, uv="uv") is True
    assert calls[1][:3] == ["uv", "pip", "install"] and calls[1][-1].endswith("requirements-tune.txt")
    calls.clear()
    assert ensure_extras(tmp_path / "env", tmp_path, "tune", runner=lambda cmd: calls.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", None), uv="uv") is False
    assert len(calls) == 1  # only the import check
