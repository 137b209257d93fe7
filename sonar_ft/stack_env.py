"""The SONAR stack in its own virtual environment, next to a notebook kernel that never imports it.

Colab's runtime Python (3.13 in 2026) is one fairseq2 0.8.1 cannot run on: ``fairseq2n`` ships
wheels for CPython 3.10-3.12 only. So the notebooks do not install the stack into their kernel.
:func:`ensure_stack_env` creates, once per runtime, a virtual environment with a supported Python
(3.12, else 3.11 or 3.10) using `uv <https://docs.astral.sh/uv/>`_ (which finds a Python on the
machine or fetches a standalone build), installs ``requirements.txt`` and this package into it,
and checks it in a subprocess (imports fairseq2, sonar and sonar_ft; reports CUDA and the GPU).
A later call finds the environment, checks it again and reuses it. Every heavy step then runs as a
command of that environment's Python; the kernel only reads the files they write.

This module imports only the standard library: it runs inside any kernel.

    python -m sonar_ft.stack_env --env /content/sonar_env          # create or reuse, then check
    python -m sonar_ft.stack_env --env /content/sonar_env --dry_run  # print the commands only
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from sonar_ft.files import atomic
from sonar_ft.errors import SonarFtError

SUPPORTED_PYTHONS = ("3.12", "3.11", "3.10")
"""Pythons fairseq2 0.8.1 runs on (fairseq2n wheels: cp310-cp312), preferred first."""
STAMP = ".sonar-ft-env.json"
"""Written into the environment after a successful setup: what it was built from."""

CHECK_SCRIPT = """
import json, sys
import torch, fairseq2, sonar, sonar_ft
from importlib.metadata import version
cuda = torch.cuda.is_available()
info = {"python": sys.version.split()[0], "torch": torch.__version__, "fairseq2": version("fairseq2"),
        "sonar": version("sonar-space"), "cuda": cuda}
if cuda:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 1024**3, 1), bf16=torch.cuda.is_bf16_supported())
print("SONAR_FT_ENV " + json.dumps(info))
"""


class StackEnvError(SonarFtError):
    """The stack environment could not be created or does not work; the message says what to do."""


def unsupported_python_message(version: Sequence[int] | None = None) -> str:
    """Why the SONAR stack cannot go into this Python, and how to get an environment that works."""
    major, minor = tuple(version or sys.version_info[:2])[:2]
    return (
        f"Python {major}.{minor} cannot run the SONAR stack: fairseq2 0.8.1 (fairseq2n) publishes wheels for "
        f"Python {', '.join(SUPPORTED_PYTHONS[::-1])} only. Create a separate environment with one of them: "
        "`python -m sonar_ft.stack_env --env <folder>` (uses uv, which fetches Python 3.12 if the machine lacks it), "
        "or `uv venv --python 3.12 <folder>` and `<folder>/bin/python -m pip install -r requirements.txt -e .`. "
        "In the notebooks the setup cell does this for you."
    )


def check_supported_python(version: Sequence[int] | None = None) -> None:
    """Raise :class:`StackEnvError` when ``version`` (default: this Python) cannot run fairseq2."""
    major, minor = tuple(version or sys.version_info[:2])[:2]
    if f"{major}.{minor}" not in SUPPORTED_PYTHONS:
        raise StackEnvError(unsupported_python_message((major, minor)))


def require_stack(version: Sequence[int] | None = None) -> None:
    """Import fairseq2, or say why it cannot work here (unsupported Python) instead of a bare ImportError."""
    try:
        import fairseq2  # noqa: F401
    except ImportError as err:
        major, minor = tuple(version or sys.version_info[:2])[:2]
        if f"{major}.{minor}" not in SUPPORTED_PYTHONS:
            raise StackEnvError(unsupported_python_message((major, minor))) from err
        raise StackEnvError(f"the SONAR stack is not installed in this Python ({sys.executable}): {err}. Install it with "
                            "`make setup`, or `python -m pip install -r requirements.txt -e .`") from err


@dataclass
class StackEnv:
    """A stack environment: where it is and what its check reported."""

    root: Path
    info: dict = field(default_factory=dict)
    """What the check printed: python, torch, fairseq2, sonar versions, cuda, gpu, gpu_memory_gib."""
    created: bool = False
    seconds: float = 0.0

    @property
    def python(self) -> Path:
        """The environment's Python: run every heavy step with it."""
        return env_python(self.root)

    def describe(self) -> str:
        """One line: versions and the accelerator."""
        i = self.info
        gpu = (f"GPU {i['gpu']} ({i['gpu_memory_gib']} GiB{', bf16' if i.get('bf16') else ', no bf16'})"
               if i.get("cuda") else "no GPU (CPU only: enough for DEMO mode)")
        return f"Python {i.get('python')}, torch {i.get('torch')}, fairseq2 {i.get('fairseq2')}, sonar {i.get('sonar')}; {gpu}"


def env_python(root: str | Path) -> Path:
    """The Python executable of the virtual environment at ``root``."""
    root = Path(root)
    return root / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def requirements_digest(project_dir: Path) -> str:
    """A digest of what the environment is built from (requirements.txt and pyproject.toml)."""
    h = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        path = project_dir / name
        h.update(name.encode() + b"\0" + (path.read_bytes() if path.is_file() else b"") + b"\0")
    return h.hexdigest()[:16]


def create_commands(env: Path, project_dir: Path, *, python: str, uv: str = "uv", offline: bool = False) -> list[list[str]]:
    """The commands that create the environment and install the stack (as run, in order).

    ``uv venv --python 3.12`` uses a Python 3.12 found on the machine or downloads a standalone
    one; ``uv pip install`` then installs the pinned requirements and this package (editable, so a
    ``git pull`` of the project is picked up without reinstalling) into that environment only.
    """
    off = ["--offline"] if offline else []
    py = str(env_python(env))
    return [
        [uv, "venv", "--python", python, "--seed", *off, str(env)],
        [uv, "pip", "install", "--python", py, *off, "-r", str(project_dir / "requirements.txt")],
        [uv, "pip", "install", "--python", py, *off, "--no-deps", "-e", str(project_dir)],
    ]


def link_commands(env: Path, project_dir: Path, packages_from: Path, *, python: str, uv: str = "uv") -> list[list[str]]:
    """Offline variant: an environment that reads its packages from an existing one (nothing downloaded).

    For machines without network that already hold the stack in another environment (and for the
    tests): the new environment gets a ``.pth`` file naming that environment's site-packages and
    this project folder, instead of installing.
    """
    return [[uv, "venv", "--python", python, "--offline", str(env)]]


def _site_packages(env: Path) -> Path:
    found = sorted(env.glob("lib/python3*/site-packages")) or sorted(env.glob("Lib/site-packages"))
    if not found:
        raise StackEnvError(f"{env} has no site-packages folder: not a virtual environment")
    return found[0]


def _write_link(env: Path, project_dir: Path, packages_from: Path) -> None:
    lines = [str(project_dir.resolve()), str(_site_packages(packages_from).resolve())]
    atomic.write_text(_site_packages(env) / "_sonar_ft_stack.pth", "\n".join(lines) + "\n")
    # Shared libraries some wheels put in the environment's lib/ (tbb for fairseq2n) are found by prefix.
    for lib in Path(packages_from).glob("lib/*.so*"):
        target = env / "lib" / lib.name
        if not target.exists():
            target.symlink_to(lib.resolve())


Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


HEARTBEAT_SECONDS = 30.0
"""A long install says it is alive this often (uv prints little when its output is not a terminal)."""


def _run(cmd: list[str], *, heartbeat: float = HEARTBEAT_SECONDS) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` capturing its output; every ``heartbeat`` seconds print the time so far and its latest line."""
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
        start = time.monotonic()
        while True:
            try:
                code = proc.wait(timeout=heartbeat)
                break
            except subprocess.TimeoutExpired:
                out.seek(0)
                latest = _last_lines(out.read(), 1)
                out.seek(0, 2)
                print(f"  ... {Path(cmd[0]).name} {cmd[1] if len(cmd) > 1 else ''}: {time.monotonic() - start:.0f} s so far"
                      + (f" ({latest[:120]})" if latest else ""), flush=True)
        out.seek(0)
        return subprocess.CompletedProcess(cmd, code, out.read(), None)


def _check_cache(env: Path) -> Path:
    # One check per runtime and environment: a temp-folder file, gone with the runtime (Colab resets /tmp).
    python = env_python(env)
    key = f"{env.resolve()}|{python.stat().st_mtime_ns if python.exists() else 0}|{(env / STAMP).is_file()}"
    return Path(tempfile.gettempdir()) / f"sonar_ft_env_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def check_env(env: Path, *, runner: Runner = _run, cached: bool = False) -> dict | None:
    """Import the stack with the environment's Python; what it reports, or None when that fails.

    ``cached``: reuse a successful check made earlier in this runtime (the notebooks call setup in
    every notebook; importing torch and fairseq2 takes a while).
    """
    python = env_python(env)
    if not python.is_file():
        return None
    cache = _check_cache(env)
    if cached and cache.is_file():
        try:
            return json.loads(cache.read_text(encoding="utf-8"))
        except ValueError:
            pass
    proc = runner([str(python), "-c", CHECK_SCRIPT])
    for line in (proc.stdout or "").splitlines():
        if proc.returncode == 0 and line.startswith("SONAR_FT_ENV "):
            info = json.loads(line.removeprefix("SONAR_FT_ENV "))
            if cached:
                atomic.write_text(cache, json.dumps(info))
            return info
    return None


def _last_lines(text: str, n: int = 15) -> str:
    return "\n".join((text or "").strip().splitlines()[-n:])


def find_uv() -> str | None:
    """The ``uv`` executable: on PATH, or installed next to this Python (``pip install uv``)."""
    found = shutil.which("uv")
    if found:
        return found
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.is_file() else None


def ensure_uv(*, runner: Runner = _run) -> str:
    """``uv``, installed with this Python's pip (into the kernel's Python, a small binary) when missing."""
    uv = find_uv()
    if uv:
        return uv
    print("installing uv (pip install uv) ...", flush=True)
    proc = runner([sys.executable, "-m", "pip", "install", "-q", "uv"])
    uv = find_uv()
    if proc.returncode != 0 or not uv:
        raise StackEnvError(f"could not install uv with pip:\n{_last_lines(proc.stdout)}\n"
                            "Install it by hand (`pip install uv`, see docs.astral.sh/uv) and run this again.")
    return uv


def ensure_stack_env(
    env: str | Path,
    project_dir: str | Path,
    *,
    pythons: Sequence[str] = SUPPORTED_PYTHONS,
    uv: str | None = None,
    offline: bool = False,
    packages_from: str | Path | None = None,
    runner: Runner = _run,
    clock: Callable[[], float] = time.monotonic,
    cached: bool = False,
) -> StackEnv:
    """The environment at ``env``, checked; created first when missing, broken or built from other requirements.

    Tries each Python of ``pythons`` in order until ``uv venv`` succeeds. ``packages_from`` (an
    existing environment holding the stack) links its packages instead of installing (offline).
    ``cached`` reuses a check made earlier in this runtime for an existing environment.
    Prints what it does and how long it took. Raises :class:`StackEnvError` with the tool's last
    output lines when creating or checking fails.
    """
    start = clock()
    env, project_dir = Path(env).absolute(), Path(project_dir).resolve()
    if not (project_dir / "requirements.txt").is_file():
        raise StackEnvError(f"{project_dir} has no requirements.txt: pass the sonar-ft project folder")
    digest = requirements_digest(project_dir)
    stamp = env / STAMP
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("requirements") == digest and recorded.get("project") == str(project_dir):
        info = check_env(env, runner=runner, cached=cached)
        if info is not None:
            result = StackEnv(env, info, created=False, seconds=clock() - start)
            print(f"stack environment {env}: reused and checked in {result.seconds:.0f} s\n  {result.describe()}", flush=True)
            return result
        print(f"stack environment {env} is there but its check failed: creating it again", flush=True)
    elif env.exists() and not recorded:
        # Not made here (e.g. `make setup`'s .venv): use it when it works, never delete it.
        info = check_env(env, runner=runner, cached=cached)
        if info is not None:
            result = StackEnv(env, info, created=False, seconds=clock() - start)
            print(f"stack environment {env} (existing): checked in {result.seconds:.0f} s\n  {result.describe()}", flush=True)
            return result
        raise StackEnvError(f"{env} exists but is not a working stack environment (and was not made by sonar_ft, so "
                            "it is left alone): choose another folder for the environment, or delete this one")
    elif env.exists():
        print(f"stack environment {env} was built from other requirements (or not finished): creating it again", flush=True)
    if env.exists():
        shutil.rmtree(env)

    uv = uv or ensure_uv(runner=runner)
    failures = []
    for python in pythons:
        if packages_from is not None:
            commands = link_commands(env, project_dir, Path(packages_from), python=python, uv=uv)
        else:
            commands = create_commands(env, project_dir, python=python, uv=uv, offline=offline)
        print(f"creating the stack environment {env} with Python {python} (uv) ...", flush=True)
        proc = runner(commands[0])
        if proc.returncode != 0:
            failures.append(f"Python {python}: {_last_lines(proc.stdout, 3)}")
            shutil.rmtree(env, ignore_errors=True)
            continue
        for cmd in commands[1:]:
            print("$ " + " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)), flush=True)
            proc = runner(cmd)
            if proc.returncode != 0:
                raise StackEnvError(f"installing the stack into {env} failed (`{' '.join(cmd[:3])} ...`):\n"
                                    f"{_last_lines(proc.stdout)}")
        if packages_from is not None:
            _write_link(env, project_dir, Path(packages_from))
        break
    else:
        raise StackEnvError(f"no Python of {', '.join(pythons)} could be used for {env}:\n  " + "\n  ".join(failures)
                            + "\nWith network access uv downloads one; offline, install python3.12 (or 3.11/3.10).")
    info = check_env(env, runner=runner)
    if info is None:
        proc = runner([str(env_python(env)), "-c", CHECK_SCRIPT])
        raise StackEnvError(f"the new environment {env} cannot import the stack:\n{_last_lines(proc.stdout)}")
    atomic.write_text(stamp, json.dumps({"requirements": digest, "project": str(project_dir), "python": info.get("python")}))
    result = StackEnv(env, info, created=True, seconds=clock() - start)
    print(f"stack environment {env}: created and checked in {result.seconds:.0f} s\n  {result.describe()}", flush=True)
    return result


EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {"tune": ("requirements-tune.txt", ("optuna", "plotly", "psycopg2"))}
"""Optional parts of the environment: name -> (requirements file, modules that show it is installed)."""


def ensure_extras(env: str | Path, project_dir: str | Path, name: str, *, runner: Runner = _run, uv: str | None = None) -> bool:
    """Install the extras ``name`` (e.g. ``tune``) into the environment ``env`` unless they import already.

    Returns True when something was installed. Raises :class:`StackEnvError` with the tool's output when it fails.
    """
    if name not in EXTRAS:
        raise StackEnvError(f"unknown extras {name!r}: one of {', '.join(EXTRAS)}")
    requirements, modules = EXTRAS[name]
    python = str(env_python(env))
    if runner([python, "-c", "import " + ", ".join(modules)]).returncode == 0:
        return False
    print(f"installing the {name} extras ({requirements}) into {env} ...", flush=True)
    cmd = [uv or ensure_uv(runner=runner), "pip", "install", "--python", python, "-r", str(Path(project_dir) / requirements)]
    proc = runner(cmd)
    if proc.returncode != 0:
        raise StackEnvError(f"installing {requirements} into {env} failed:\n{_last_lines(proc.stdout)}")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create (or reuse) the virtual environment that runs the SONAR stack.")
    parser.add_argument("--env", required=True, help="folder of the environment (Colab: /content/sonar_env)")
    parser.add_argument("--project_dir", default=str(Path(__file__).resolve().parents[1]), help="the sonar-ft project")
    parser.add_argument("--python", action="append", help=f"Python version to try (repeatable; default {' '.join(SUPPORTED_PYTHONS)})")
    parser.add_argument("--offline", action="store_true", help="pass --offline to uv (use only its cache)")
    parser.add_argument("--packages_from", help="an existing environment holding the stack: link it, install nothing")
    parser.add_argument("--dry_run", action="store_true", help="print the commands that would run, run nothing")
    args = parser.parse_args(argv)
    pythons = args.python or list(SUPPORTED_PYTHONS)
    if args.dry_run:
        for cmd in create_commands(Path(args.env), Path(args.project_dir), python=pythons[0], offline=args.offline):
            print(" ".join(cmd))
        return 0
    try:
        ensure_stack_env(args.env, args.project_dir, pythons=pythons, offline=args.offline, packages_from=args.packages_from)
    except SonarFtError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
