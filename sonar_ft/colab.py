"""Helpers for the notebooks in ``notebooks/`` (Colab, Jupyter, papermill): paths, installs, display.

The notebooks stay thin: each cell calls a ``sonar_ft`` function or the recipe's command line, and
this module holds the plumbing they share —

- :func:`setup` → :class:`Project`: where features, manifests, the starting encoder and run folders
  are, for a real project folder (on Google Drive in Colab) or for the offline demo (``DEMO = True``);
  it also makes project errors show as one readable line instead of a traceback;
- :func:`ensure_requirements`: installs the pinned ``requirements.txt`` in Colab and restarts the
  runtime when that replaced an already-loaded torch (the old one stays in memory otherwise);
- :func:`run_command`: runs a CLI step as a subprocess, streaming its output into the cell;
- :func:`show_table`, :func:`show_images`, :func:`show_figure`: tables as HTML, figures as PNG.

Nothing here trains or evaluates: that is the recipe's job (``train_sonar_finetuning.py``).
"""

from __future__ import annotations

import codecs
import importlib
import importlib.metadata
import io as _io
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from sonar_ft.errors import SonarFtError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sonar_ft.data.verify import VerifyReport
    from sonar_ft.demo.build import DemoPaths

RECIPE = "train_sonar_finetuning.py"
DEFAULT_DEMO_DIR = "demo_runs"
SPLITS = ("train", "val", "test")
NOTEBOOK_RUNS = "notebook_runs"
"""Run folders of the notebooks in DEMO mode, under the demo folder (``make demo`` owns the others)."""
STANDALONE_DEMO_RUN = "standalone_demo_run"


class NotebookStop(SonarFtError):
    """A notebook cannot go on; the message says what is wrong and what to do."""


# ------------------------------------------------------------------------------------------------
# Where we are
# ------------------------------------------------------------------------------------------------
def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def describe_device() -> str:
    """One line on the accelerator this runtime has (what the training steps will use)."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        bf16 = "bf16" if torch.cuda.is_bf16_supported() else "no bf16 (fp32 training)"
        return f"GPU: {props.name}, {props.total_memory / 1024**3:.1f} GiB, {bf16}"
    hint = "" if not in_colab() else " (Colab: Runtime > Change runtime type > T4 GPU or better)"
    return f"no GPU: CPU only — enough for DEMO mode, far too slow for real fine-tuning{hint}"


# ------------------------------------------------------------------------------------------------
# Requirements
# ------------------------------------------------------------------------------------------------
@dataclass
class RequirementsCheck:
    """What :func:`ensure_requirements` found and did."""

    requirements: Path
    unsatisfied: list[str] = field(default_factory=list)
    """Requirement lines not met before installing (missing, or another version)."""
    installed: bool = False
    torch_before: str | None = None
    torch_after: str | None = None
    restart_reason: str | None = None
    """Why the runtime was (or must be) restarted; None when no restart is needed."""


def read_requirements(path: str | Path) -> list[str]:
    """The requirement lines of a pip requirements file (comments, blank lines and options dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            lines.append(line)
    return lines


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unsatisfied_requirements(lines: Iterable[str], version_of: Callable[[str], str | None] = installed_version) -> list[str]:
    """The requirement lines whose distribution is missing or outside the pinned/allowed versions."""
    from packaging.requirements import Requirement

    missing = []
    for line in lines:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = version_of(req.name)
        if version is None or (req.specifier and not req.specifier.contains(version, prereleases=True)):
            missing.append(line)
    return missing


def _pip_install(requirements: Path) -> None:
    run_command([sys.executable, "-m", "pip", "install", "-q", "-r", str(requirements)])


def _restart_runtime() -> None:
    # Colab restarts a runtime whose kernel process dies; SIGKILL is the standard way to ask for it.
    os.kill(os.getpid(), signal.SIGKILL)


def ensure_requirements(
    requirements: str | Path,
    *,
    install: bool | None = None,
    pip: Callable[[Path], None] = _pip_install,
    restart: Callable[[], None] = _restart_runtime,
    version_of: Callable[[str], str | None] = installed_version,
) -> RequirementsCheck:
    """Make sure the pinned requirements are installed; restart the runtime if torch was replaced.

    ``install`` defaults to "only in Colab": elsewhere the missing lines are listed with the command
    that installs them (a local environment is yours to change, e.g. with ``make setup``). When the
    install changed torch's version, the runtime is restarted after saying why (a running Python
    keeps the torch it loaded first; Colab's kernel may load it at start-up): in Colab the kernel
    process is killed and Colab starts a fresh one. Run the notebook again from the top then.
    """
    requirements = Path(requirements)
    if not requirements.is_file():
        raise NotebookStop(f"{requirements} not found: PROJECT_DIR must be a copy of the sonar-ft repository")
    check = RequirementsCheck(requirements=requirements)
    check.unsatisfied = unsatisfied_requirements(read_requirements(requirements), version_of)
    if not check.unsatisfied:
        print(f"All requirements of {requirements.name} are installed.")
        return check
    shown = ", ".join(check.unsatisfied)
    if not (in_colab() if install is None else install):
        print(f"Not installed or another version: {shown}.\n"
              f"Install them with `make setup` or `{Path(sys.executable).name} -m pip install -r {requirements}`.")
        return check
    print(f"Installing {len(check.unsatisfied)} requirement(s): {shown} (a few minutes the first time).", flush=True)
    check.torch_before = version_of("torch")
    pip(requirements)
    importlib.invalidate_caches()
    check.torch_after = version_of("torch")
    check.installed = True
    if check.torch_before != check.torch_after:
        check.restart_reason = (
            f"torch {check.torch_before or '(none)'} was replaced by torch {check.torch_after} (pinned in "
            f"{requirements.name}: fairseq2 needs exactly this version), and a running Python keeps the torch it loaded"
        )
        print(f"\nRESTARTING THE RUNTIME: {check.restart_reason}.\n"
              "When it is back (a few seconds), run this notebook again from the top; this step will then be quick.",
              flush=True)
        restart()
    else:
        print("Requirements installed; no restart needed.")
    return check


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------
def demo_paths(demo_dir: str | Path | None = None) -> DemoPaths:
    """The offline demo under ``demo_dir`` (default: ``$DEMO_DIR`` or ``demo_runs/``), built the first time.

    A complete build already there is reused whatever its sizes (the tests build a smaller one);
    otherwise the default demo is built (about a minute on a laptop CPU, cached afterwards).
    """
    from sonar_ft.demo.build import BUILD_VERSION, DemoConfig, DemoPaths, build_demo

    root = Path(demo_dir or os.environ.get("DEMO_DIR") or DEFAULT_DEMO_DIR)
    paths = DemoPaths(root)
    record = _build_record(paths)
    if record is not None and record.get("version") == BUILD_VERSION:
        print(f"DEMO: using the offline demo in {root}")
        return paths
    print(f"DEMO: building the offline demo in {root} (once; about a minute on a CPU) ...", flush=True)
    return build_demo(root, DemoConfig())


def _build_record(paths: DemoPaths) -> dict[str, Any] | None:
    try:
        return json.loads(paths.build_record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def demo_feature_dim(paths: DemoPaths) -> int:
    """The feature dimension the demo at ``paths`` was built with."""
    record = _build_record(paths) or {}
    return int(record.get("config", {}).get("feature_dim", 768))


# ------------------------------------------------------------------------------------------------
# The project a notebook works on
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Project:
    """Paths and models of one notebook session: a real project folder, or the offline demo."""

    root: Path
    """The project folder (a copy of this repository holding the data); the working directory."""
    runs: Path
    """Where run folders go."""
    features_pattern: str
    """Feature folder of a split, ``{split}`` replaced (relative to ``root`` unless absolute)."""
    manifest_pattern: str
    encoder_checkpoint: Path
    """The encoder to start fine-tuning from."""
    decoder: str
    """The frozen text decoder: asset card name or card file."""
    device: str
    feature_dim: int
    demo: DemoPaths | None = None

    def features(self, split: str) -> Path:
        """Feature folder of ``split`` (train / val / test)."""
        return self.root / self.features_pattern.format(split=split)

    def manifest(self, split: str) -> Path:
        """Manifest of ``split``."""
        return self.root / self.manifest_pattern.format(split=split)

    def run_dir(self, name: str) -> Path:
        """The folder of run ``name``."""
        return self.runs / name

    def recipe_command(self, output_dir: str | Path, *flags: str, split: str = "val", encoder: str | Path | None = None) -> list[str]:
        """``python train_sonar_finetuning.py`` with this project's data and models, evaluating on ``split``."""
        cmd = [
            sys.executable, str(self.root / RECIPE),
            "--encoder_checkpoint", str(encoder or self.encoder_checkpoint),
            "--train_features", str(self.features("train")),
            "--train_manifest", str(self.manifest("train")),
            "--val_features", str(self.features(split)),
            "--val_manifest", str(self.manifest(split)),
            "--output_dir", str(output_dir),
            "--device", self.device,
        ]
        if self.demo is not None:
            cmd += ["--decoder", str(self.demo.decoder_card), "--text_encoder", str(self.demo.text_encoder_card)]
        elif self.decoder != "text_sonar_basic_decoder":
            cmd += ["--decoder", self.decoder]
        return cmd + [str(f) for f in flags]

    def cli_command(self, *args: str) -> list[str]:
        """The ``sonar-ft`` command (``python -m sonar_ft.cli``) with ``args``."""
        return [sys.executable, "-m", "sonar_ft.cli", *[str(a) for a in args]]

    def find_run(self, run_dir: str | Path, *, need: str = "best_encoder.pt") -> Path:
        """``run_dir`` when it holds ``need``; in DEMO mode a small run made here otherwise.

        The notebooks build on each other (04 trains, 05-07 read its folder). In DEMO mode each must
        also run alone, so a missing run is replaced by a short demo fine-tuning of its own.
        """
        run_dir = Path(run_dir)
        if _has(run_dir, need):
            return run_dir
        if self.demo is None:
            raise NotebookStop(
                f"{run_dir} has no {need} yet: run notebook 04_finetune first (or set RUN_NAME to the run folder you want)."
            )
        standalone = self.run_dir(STANDALONE_DEMO_RUN)
        if not _has(standalone, need):
            print(f"DEMO: {run_dir} has no {need} (notebook 04 makes it); training a short demo run in {standalone} "
                  "so that this notebook also works on its own ...")
            run_command(self.recipe_command(standalone, *STANDALONE_FLAGS))
        return standalone


# Short demo fine-tuning for notebooks run on their own (distillation keeps French decoding working).
STANDALONE_FLAGS = ("--batch_size", "16", "--epochs", "3", "--learning_rate", "1e-3", "--eval_every", "1",
                    "--beam_size", "2", "--distill_weight", "1.0")


def _has(run_dir: Path, need: str) -> bool:
    return any(run_dir.glob(need)) if any(c in need for c in "*?[") else (run_dir / need).is_file()


def setup(
    project_dir: str | Path,
    *,
    demo: bool = False,
    demo_dir: str | Path | None = None,
    features: str = "features/{split}",
    manifests: str = "manifests/{split}.tsv",
    encoder_checkpoint: str = "sonar_checkpoints/dm_70h_ub_sonar_encoder.pth",
    decoder: str = "text_sonar_basic_decoder",
    runs: str = "runs",
    device: str = "auto",
    feature_dim: int = 768,
    model_cache: str | None = "model_cache",
) -> Project:
    """Resolve a notebook's paths, ``chdir`` into the project folder and print where everything is.

    With ``demo`` everything comes from the offline demo (built the first time) and runs on the CPU.
    In Colab, ``model_cache`` (in the project folder) becomes fairseq2's download cache, so the SONAR
    text decoder is downloaded once instead of after every disconnect. Library log lines are shown,
    and project errors raised in later cells show as one line (see :func:`install_error_display`).
    """
    root = Path(project_dir).resolve()
    if not (root / RECIPE).is_file():
        raise NotebookStop(f"{root} is not a sonar-ft project folder (no {RECIPE}); set PROJECT_DIR to your copy of the repository")
    os.chdir(root)
    install_error_display()
    _show_library_logs()
    if in_colab() and not demo and model_cache and "FAIRSEQ2_CACHE_DIR" not in os.environ:
        os.environ["FAIRSEQ2_CACHE_DIR"] = str(root / model_cache)  # the recipe subprocesses inherit it
    if demo:
        paths = demo_paths(Path(demo_dir) if demo_dir else None)
        paths = type(paths)(paths.root.resolve())
        project = Project(
            root=root, runs=paths.root / NOTEBOOK_RUNS,
            features_pattern=str(paths.features / "{split}"), manifest_pattern=str(paths.manifests / "{split}.tsv"),
            encoder_checkpoint=paths.encoder_checkpoint, decoder=str(paths.decoder_card), device="cpu",
            feature_dim=demo_feature_dim(paths), demo=paths,
        )
    else:
        checkpoint = Path(encoder_checkpoint)
        project = Project(
            root=root, runs=root / runs, features_pattern=features, manifest_pattern=manifests,
            encoder_checkpoint=checkpoint if checkpoint.is_absolute() else root / checkpoint,
            decoder=decoder, device=device, feature_dim=feature_dim,
        )
    print(f"project folder: {root}" + ("  [DEMO mode: offline demo data and models, CPU]" if demo else ""))
    print(f"features:       {project.features('{split}')}\nmanifests:      {project.manifest('{split}')}")
    print(f"encoder:        {project.encoder_checkpoint}\nruns:           {project.runs}")
    return project


def _show_library_logs() -> None:
    # The library reports progress with logging (files indexed, encoder loaded, download skipped);
    # a notebook shows it whatever the kernel did with the root logger.
    logger = logging.getLogger("sonar_ft")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def install_error_display() -> None:
    """In IPython, show project errors (bad paths, failed checks) as their message, not a traceback."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def handler(self: Any, etype: type, value: BaseException, tb: Any, tb_offset: int | None = None) -> list[str]:
        # Shown as the cell's error output (the kernel's own path for tracebacks), one line instead of
        # a traceback. The cell still fails, so "Run all" and papermill stop there.
        stb = [f"{etype.__name__}: {value}"]
        self._showtraceback(etype, value, stb)
        return stb

    shell.set_custom_exc((SonarFtError,), handler)


def stop(message: str) -> None:
    """Stop the notebook here with a readable message."""
    raise NotebookStop(message)


# ------------------------------------------------------------------------------------------------
# Running the command-line steps
# ------------------------------------------------------------------------------------------------
def run_command(cmd: Sequence[str | os.PathLike], *, env: Mapping[str, str] | None = None) -> None:
    """Run ``cmd`` (a list, no shell), streaming its output into the cell; stop with a clear message if it fails.

    ``env`` adds environment variables (``TQDM_DISABLE=1`` in the environment hides progress bars).
    Interrupting the cell stops the command too; training runs resume when the cell runs again.
    """
    cmd = [str(c) for c in cmd]
    shown = [Path(c).name if i == 0 else c for i, c in enumerate(cmd)]  # "python", not the venv path
    print("$ " + shlex.join(shown), flush=True)
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    child_env.pop("MPLBACKEND", None)  # the kernel's inline backend means nothing to a subprocess
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env)
    assert proc.stdout is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        while chunk := os.read(proc.stdout.fileno(), 1 << 14):
            # Raw chunks, not lines: progress bars redraw with "\r" and notebooks render that.
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("\nstopped. Run this cell again to continue (training resumes from its last checkpoint).")
        raise
    finally:
        proc.stdout.close()
    if code != 0:
        what = " ".join(shown[2:4]) if shown[1:2] == ["-m"] else " ".join(shown[:1] + [Path(c).name for c in shown[1:2]])
        why = "its error message is the last line above" if code == 2 else "see its output above"
        raise NotebookStop(f"`{what}` failed (exit code {code}): {why}.")


# ------------------------------------------------------------------------------------------------
# Display
# ------------------------------------------------------------------------------------------------
def _display(obj: Any) -> bool:
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    display(obj)
    return True


def show_table(rows: Sequence[Mapping[str, Any]] | Any, columns: Sequence[str] | None = None, *, digits: int = 4) -> None:
    """Show ``rows`` (dicts, or a DataFrame) as a table: HTML in notebooks, text elsewhere.

    Returns nothing, so that a call ending a cell does not show the table twice.
    """
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(columns) if columns else None)
    if columns is not None:
        frame = frame[list(columns)]
    frame = frame.round(digits)
    if not _display(frame):
        print(frame.to_string(index=False))


# Score columns of the notebooks' tables, in the order papers print them (sonar_ft.scores names).
SCORE_COLUMNS = ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "chrf", "cosine", "r1", "r5", "loss")
SAMPLE_SCORE_COLUMNS = ("bleu_score", "rougeL", "chrf", "cosine", "rank")


def score_columns(rows: Sequence[Mapping[str, Any]], prefix: str = "", *, first: Sequence[str] = (), last: Sequence[str] = ()) -> list[str]:
    """``first`` + the score columns that ``rows`` really hold (a value other than None) + ``last``.

    ``prefix`` is ``"val_"`` for ``metrics_epoch*.json`` history, ``""`` for ``test_results.json``;
    semantic scores (cosine, R@1, R@5) appear only for runs given a ``--text_encoder``. With
    ``prefix="sample"`` the per-sentence columns of predictions are used instead.
    """
    names = SAMPLE_SCORE_COLUMNS if prefix == "sample" else tuple(f"{prefix}{n}" for n in SCORE_COLUMNS)
    present = [n for n in names if any(r.get(n) is not None for r in rows)]
    return [*first, *[n for n in present if n not in first and n not in last], *last]


def show_images(paths: Iterable[str | Path]) -> None:
    """Show PNG files (as image outputs in notebooks; their paths elsewhere)."""
    for path in paths:
        path = Path(path)
        try:
            from IPython.display import Image
        except ImportError:
            Image = None  # noqa: N806
        if Image is None or not _display(Image(filename=str(path))):
            print(f"figure: {path}")


def show_figure(fig: Figure, save_as: str | Path | None = None) -> None:
    """Show a matplotlib figure as a PNG output whatever the backend (optionally also saving it); close it."""
    import matplotlib.pyplot as plt

    from sonar_ft import io

    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buffer.getvalue()
    if save_as is not None:
        io.write_bytes(save_as, data)
    try:
        from IPython.display import Image
    except ImportError:
        Image = None  # noqa: N806
    if Image is None or not _display(Image(data=data, format="png")):
        print(f"figure saved: {save_as}" if save_as else "(figure: run in a notebook to see it)")


def format_size(num_bytes: int) -> str:
    """``1.2 GB``-style size."""
    size = float(num_bytes)
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def offer_download(path: str | Path) -> None:
    """In Colab, send ``path`` to the browser as a download; elsewhere print where it is."""
    path = Path(path)
    if in_colab():
        from google.colab import files  # type: ignore[import-not-found]

        files.download(str(path))
        print(f"download started: {path.name} ({format_size(path.stat().st_size)})")
    else:
        print(f"not in Colab: the file is at {path.resolve()} ({format_size(path.stat().st_size)})")


def is_up_to_date(target: str | Path, *sources: str | Path) -> bool:
    """True when ``target`` exists and is newer than every existing ``source`` (re-running can skip it)."""
    target = Path(target)
    if not target.is_file():
        return False
    newest = max((Path(s).stat().st_mtime for s in sources if Path(s).exists()), default=0.0)
    return target.stat().st_mtime >= newest


# ------------------------------------------------------------------------------------------------
# Feature verification (notebook 01)
# ------------------------------------------------------------------------------------------------
def verify_summary(reports: Mapping[str, VerifyReport]) -> list[dict[str, Any]]:
    """One table row per split: counts, errors, warnings, frames per clip and the verdict."""
    rows = []
    for split, r in reports.items():
        stats = r.length_stats() or {}
        rows.append({
            "split": split,
            "manifest rows": r.num_rows,
            "feature files": r.num_feature_files,
            "checked": r.num_checked,
            "errors": sum(r.errors.values()),
            "warnings": sum(r.warnings.values()),
            "median frames": stats.get("median"),
            "max frames": stats.get("max"),
            "result": "OK" if r.ok else "NOT OK",
        })
    return rows


def length_histogram(reports: Mapping[str, VerifyReport], *, max_bins: int = 50) -> Figure:
    """Histogram of frames per clip, one colour per split, on bins shared by all splits."""
    import matplotlib
    import numpy as np

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = [n for report in reports.values() for n in report.lengths]
    lo, hi = (min(everything), max(everything)) if everything else (0, 1)
    # Frame counts are integers: one bin per count when few, else max_bins bins over the range.
    bins = np.arange(lo, hi + 2) - 0.5 if hi - lo < max_bins else np.linspace(lo, hi + 1, max_bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, report in reports.items():
        if report.lengths:
            ax.hist(report.lengths, bins=bins, alpha=0.55, label=f"{split} ({len(report.lengths)} clips)")
    ax.set(xlabel="frames per clip", ylabel="clips", title="sequence lengths")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def missing_splits(project: Project, splits: Iterable[str] = SPLITS) -> list[str]:
    """Readable lines for each split whose feature folder or manifest does not exist."""
    problems = []
    for split in splits:
        for what, path in (("features", project.features(split)), ("manifest", project.manifest(split))):
            if not path.exists():
                problems.append(f"{split} {what}: {path} does not exist")
    return problems
