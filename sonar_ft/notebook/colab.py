"""Helpers for the notebooks in ``notebooks/`` (Colab, Jupyter, papermill): paths, installs, display.

The notebooks stay thin: each cell calls a ``sonar_ft`` function or the recipe's command line, and
this module holds the plumbing they share —

- :func:`setup` → :class:`Project`: creates or reuses the SONAR stack's own environment
  (:mod:`sonar_ft.stack_env`; the kernel's Python stays as it is, no restart) and says where
  features, manifests, the starting encoder and run folders are, for a real project folder (on
  Google Drive in Colab) or for the offline demo (``DEMO = True``); project errors show as one line;
- :func:`run_command`: runs a step as a command of that environment's Python, streaming its output;
- :func:`show_plan`: the memory and disk plan for this runtime's GPU (``sonar-ft plan --gpu auto``);
- :func:`show_table`, :func:`show_images`, :func:`show_figure`: tables as HTML, figures as PNG.

Nothing here trains or evaluates: that is the recipe's job (``train_sonar_finetuning.py``). This
module imports neither torch nor fairseq2 nor sonar (a Colab kernel on Python 3.13 cannot have them).
"""

from __future__ import annotations

import codecs
import io as _io
import json
import os
import shlex
import select
import signal
import subprocess
import sys
import tempfile
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from sonar_ft.config import command_line
from sonar_ft.demo.paths import DemoPaths
from sonar_ft.errors import SonarFtError
from sonar_ft.progress import EVERY_SECONDS as HEARTBEAT_SECONDS
from sonar_ft.progress import format_seconds, format_size  # noqa: F401  (format_size: the notebooks' name)
from sonar_ft.run_files import BEST_ENCODER
from sonar_ft.scores import ALIASES, METRICS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from sonar_ft.stack_env import StackEnv

RECIPE = "train_sonar_finetuning.py"
DEFAULT_DEMO_DIR = "demo_runs"
SPLITS = ("train", "val", "test")
NOTEBOOK_RUNS = "notebook_runs"
"""Run folders of the notebooks in DEMO mode, under the demo folder (``make demo`` owns the others)."""
STANDALONE_DEMO_RUN = "standalone_demo_run"
PACKED_FEATURES = "features/{split}.tar"
"""Where the notebooks pack extracted features (one ``sonar-ft pack`` archive per split, in the project folder)."""


class NotebookStop(SonarFtError):
    """A notebook cannot go on; the message says what is wrong and what to do."""


# ------------------------------------------------------------------------------------------------
# Where we are
# ------------------------------------------------------------------------------------------------
def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    return "google.colab" in sys.modules


def default_env_dir(root: Path) -> Path:
    """Where the stack environment goes: ``/content/sonar_env`` in Colab (local disk, once per runtime),
    else the project's ``.venv`` (what ``make setup`` makes)."""
    return Path("/content/sonar_env") if in_colab() else root / ".venv"


# ------------------------------------------------------------------------------------------------
# The demo
# ------------------------------------------------------------------------------------------------
def demo_feature_dim(paths: DemoPaths) -> int:
    """The feature dimension the demo at ``paths`` was built with."""
    try:
        record = json.loads(paths.build_record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
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
    python_path: str = ""
    """The stack environment's Python, once known (else it is made on first use, see :meth:`stack`)."""
    env_dir: Path | None = None
    local_data: Path | None = None
    """Where features are copied once per runtime (local disk); None: read where they are."""
    _env: dict = field(default_factory=dict, compare=False, repr=False)

    def stack(self) -> StackEnv:
        """The SONAR stack's environment, created or reused (and checked) the first time a heavy step needs it.

        Notebooks that only read results never pay for it.
        """
        if "env" not in self._env:
            from sonar_ft.stack_env import ensure_stack_env

            self._env["env"] = ensure_stack_env(self.env_dir or default_env_dir(self.root), self.root, cached=True)
        return self._env["env"]

    @property
    def python(self) -> str:
        """The stack environment's Python: every heavy step runs as a command of it."""
        return self.python_path or str(self.stack().python)

    def ensure_extras(self, name: str) -> None:
        """Add optional packages (``tune``: optuna, plotly, psycopg2) to the stack environment, once."""
        from sonar_ft.stack_env import ensure_extras

        ensure_extras(self.stack().root, self.root, name)

    @property
    def has_gpu(self) -> bool:
        """True when the stack environment sees a CUDA GPU."""
        return bool(self.stack().info.get("cuda"))

    def require_gpu(self) -> None:
        """Stop a non-DEMO training notebook on a runtime without a GPU, saying how to get one."""
        if self.demo is None and not self.has_gpu:
            raise NotebookStop(
                "this runtime has no GPU, and fine-tuning the 818M-parameter encoder on a CPU would take weeks. "
                "In Colab: Runtime → Change runtime type → Hardware accelerator: T4 GPU (or better) → Save, then run "
                "the notebook again from the top. (DEMO = True runs the offline demo on a CPU.)"
            )

    def source_features(self, split: str) -> Path:
        """Where the features of ``split`` are kept (a folder or a ``sonar-ft pack`` archive, e.g. on Drive)."""
        return self.root / self.features_pattern.format(split=split)

    def features(self, split: str) -> Path:
        """Feature folder of ``split`` that steps read: a checked copy on local disk when ``local_data`` is set.

        The first call per split brings the features there (``sonar-ft unpack``: once per runtime, a
        stamp in the copy names its source); training then never opens a feature file on Drive.
        """
        source = self.source_features(split)
        if self.local_data is None or not source.exists():
            return source
        key = f"features:{split}"
        if key not in self._env:
            local = self.local_data / "features" / split
            run_command(self.cli_command("unpack", "--source", source, "--out", local))
            self._env[key] = local
        return self._env[key]

    def with_features(self, pattern: str) -> Project:
        """This project reading each split's features from ``pattern`` (e.g. archives just packed) instead."""
        env = {k: v for k, v in self._env.items() if not k.startswith("features:")}  # local copies of the old ones
        return dataclasses.replace(self, features_pattern=pattern, _env=env)

    def manifest(self, split: str) -> Path:
        """Manifest of ``split``."""
        return self.root / self.manifest_pattern.format(split=split)

    def state_dir(self, run_name: str) -> Path:
        """The local-disk folder of a run's ``--state_dir`` (fast, large, lost on disconnect): beside the local
        copy of the features (``/content/sonar_state`` in Colab), else in the temporary folder."""
        base = self.local_data.parent if self.local_data else (
            Path("/content") if Path("/content").is_dir() else Path(tempfile.gettempdir()))
        return base / "sonar_state" / run_name

    def run_dir(self, name: str) -> Path:
        """The folder of run ``name``."""
        return self.runs / name

    def recipe_command(self, output_dir: str | Path, *flags: str, split: str = "val", encoder: str | Path | None = None) -> list[str]:
        """``python train_sonar_finetuning.py`` with this project's data and models, evaluating on ``split``."""
        settings: dict[str, Any] = {
            "encoder_checkpoint": str(encoder or self.encoder_checkpoint),
            "train_features": str(self.features("train")), "train_manifest": str(self.manifest("train")),
            "val_features": str(self.features(split)), "val_manifest": str(self.manifest(split)),
            "output_dir": str(output_dir), "device": self.device,
        }
        if self.demo is not None:
            settings.update(decoder=str(self.demo.decoder_card), text_encoder=str(self.demo.text_encoder_card))
        elif self.decoder != "text_sonar_basic_decoder":
            settings["decoder"] = self.decoder
        cmd = [self.python, str(self.root / RECIPE), *command_line(settings)]
        return cmd + [str(f) for f in flags]

    def cli_command(self, *args: str) -> list[str]:
        """The ``sonar-ft`` command (``python -m sonar_ft.cli``) with ``args``."""
        return [self.python, "-m", "sonar_ft.cli", *[str(a) for a in args]]

    def step_command(self, *args: str) -> list[str]:
        """A step of :mod:`sonar_ft.notebook.steps` (demo build, encoder info) in the stack environment."""
        return [self.python, "-m", "sonar_ft.notebook.steps", *[str(a) for a in args]]

    def find_run(self, run_dir: str | Path, *, need: str = BEST_ENCODER) -> Path:
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
    env_dir: str | Path | None = None,
    features: str = "features/{split}",
    manifests: str = "manifests/{split}.tsv",
    encoder_checkpoint: str = "sonar_checkpoints/dm_70h_ub_sonar_encoder.pth",
    decoder: str = "text_sonar_basic_decoder",
    runs: str = "runs",
    device: str = "auto",
    feature_dim: int = 768,
    model_cache: str | None = "model_cache",
    local_data: str | Path | None = "auto",
) -> Project:
    """Create or reuse the stack environment, ``chdir`` into the project folder and print where everything is.

    ``env_dir`` (default :func:`default_env_dir`) is the stack environment; the kernel's own Python
    is left as it is. With ``demo`` everything comes from the offline demo (built the first time,
    by the environment's Python) and runs on the CPU. In Colab, ``model_cache`` (in the project
    folder) becomes fairseq2's download cache, so the SONAR text decoder is downloaded once.
    The environment is made when a step first needs it (:meth:`Project.stack`). ``local_data``: where
    features are copied once per runtime; ``"auto"``: ``/content/sonar_data`` in Colab, else none.
    """
    root = Path(project_dir).resolve()
    if not (root / RECIPE).is_file():
        raise NotebookStop(f"{root} is not a sonar-ft project folder (no {RECIPE}); set PROJECT_DIR to your copy of the repository")
    os.chdir(root)
    install_error_display()
    env = Path(env_dir) if env_dir else None
    if in_colab() and not demo and model_cache and "FAIRSEQ2_CACHE_DIR" not in os.environ:
        os.environ["FAIRSEQ2_CACHE_DIR"] = str(root / model_cache)  # the recipe subprocesses inherit it
    if demo:
        paths = DemoPaths(Path(demo_dir or os.environ.get("DEMO_DIR") or root / DEFAULT_DEMO_DIR).resolve())
        project = Project(
            root=root, runs=paths.root / NOTEBOOK_RUNS,
            features_pattern=str(paths.features / "{split}"), manifest_pattern=str(paths.manifests / "{split}.tsv"),
            encoder_checkpoint=paths.encoder_checkpoint, decoder=str(paths.decoder_card), device="cpu",
            feature_dim=0, demo=paths, env_dir=env,  # feature_dim: read from the build record below
        )
        run_command(project.step_command("demo", "--demo_dir", paths.root))
        project = dataclasses.replace(project, feature_dim=demo_feature_dim(paths), _env=project._env)
    else:
        checkpoint = Path(encoder_checkpoint)
        project = Project(
            root=root, runs=root / runs, features_pattern=features, manifest_pattern=manifests,
            encoder_checkpoint=checkpoint if checkpoint.is_absolute() else root / checkpoint,
            decoder=decoder, device=device, feature_dim=feature_dim, env_dir=env,
        )
    local = local_data
    if local == "auto":
        local = "/content/sonar_data" if in_colab() else ""
    if local:
        project = dataclasses.replace(project, local_data=Path(local).absolute(), _env=project._env)
    print(f"project folder: {root}" + ("  [DEMO mode: offline demo data and models, CPU]" if demo else ""))
    print(f"features:       {project.source_features('{split}')}"
          + (f" (copied to {project.local_data / 'features'} once per runtime)" if project.local_data else ""))
    print(f"manifests:      {project.manifest('{split}')}")
    print(f"encoder:        {project.encoder_checkpoint}\nruns:           {project.runs}")
    return project


def longest_clip(reports: Mapping[str, Mapping[str, Any]]) -> int | None:
    """The longest clip (frames) over ``sonar-ft verify`` reports of the splits; None when none was measured."""
    found = [int(r["length_stats"]["max"]) for r in reports.values() if r.get("length_stats")]
    return max(found) if found else None


def _verified_clips(project: Project, split: str) -> int | None:
    """Clips of ``split`` in its saved verify report (None when there is none)."""
    try:
        return int(json.loads((project.runs / "verify" / f"{split}.json").read_text(encoding="utf-8"))["counts"]["checked"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def longest_verified_clip(project: Project) -> int | None:
    """The longest clip of the verify reports saved in the runs folder (notebook 01's), or None."""
    reports = {}
    for path in sorted((project.runs / "verify").glob("*.json")):
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if report.get("ok"):
            reports[path.stem] = report
    return longest_clip(reports)


def show_plan(project: Project, effective_batch: int, run_name: str | None = None, lora_rank: int = 0,
              max_frames: int | None = None, *, epochs: int = 30, checkpoint_minutes: float = 0.0) -> list[str]:
    """The memory plan for this runtime's GPU and, for a run that keeps checkpoints, the disk plan: shown, returned as flags.

    Memory (``sonar-ft plan --gpu auto``): the micro-batch / accumulation split, precision and the rest for
    ``effective_batch``, re-planned each time (a run may resume on another GPU: these flags do not change
    its result). ``lora_rank`` > 0 plans LoRA; ``max_frames`` (the longest clip, :func:`longest_clip` of the
    verify reports) is planned for and passed on as ``--max_frames``. In DEMO mode (the demo's small encoder
    on the CPU) there is no memory to plan; a non-DEMO runtime without a GPU stops here (:meth:`Project.require_gpu`).

    Disk, with ``run_name``: the free space of the runs folder (on Colab, the Drive quota's, trash counted) and of
    the local state folder is read; ``epochs`` with their saves (``checkpoint_minutes``: time-based saves, passed on
    as ``--checkpoint_every_minutes``) are simulated over a Drive that keeps trash, the encoder and features already
    there counting as there; the chosen placement's flags (``--state_dir`` on local disk, ``--state_slots``) are
    returned. When no placement fits, the notebook stops before training, saying what to free and what would fit.
    """
    project.require_gpu()
    out = project.runs / "plan.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    lora = ["--lora_rank", str(lora_rank)] if lora_rank else []
    frames = ["--max_frames", str(max_frames)] if max_frames and project.demo is None else []
    if project.demo is not None:
        print("memory plan: none needed, DEMO mode (the demo's small encoder on the CPU); the official-size plans: "
              "`sonar-ft plan --gpu t4` (or l4, a100, h100)")
        if lora_rank:
            print(f"LoRA chosen (LORA_RANK = {lora_rank}): adapters train, the encoder's weights stay frozen")
        if run_name is None:
            return lora
        cmd = project.cli_command("plan", "--disk_only", "--encoder_checkpoint", project.encoder_checkpoint, *lora)
    else:
        cmd = project.cli_command("plan", "--gpu", "auto", "--effective_batch", effective_batch, "--lora_rank", lora_rank,
                                  *frames)
    if run_name is not None:
        cmd += _disk_arguments(project, epochs, checkpoint_minutes, effective_batch, project.run_dir(run_name))
    run_command(cmd + ["--json", out])
    plan = json.loads(out.read_text(encoding="utf-8"))
    if project.demo is None and lora_rank:
        print(f"LoRA chosen (LORA_RANK = {lora_rank}): adapters train, the encoder's weights stay frozen; "
              "best_encoder.pt is still the whole (merged) encoder")
    if plan["settings"]:
        show_table([{"setting": k, "value": str(v)} for k, v in plan["settings"].items()])
    flags = lora if project.demo is not None else [str(f) for f in plan["flags"]]  # DEMO: no memory flags
    if frames and "--max_frames" not in flags:  # the run is told the clip length the plan was made for
        flags += frames
    if run_name is None:
        return flags
    disk = plan["disk"]
    if not disk["fits"]:
        fits = "; or ".join(a["change"] for a in disk.get("alternatives", []))
        stop(f"the run's checkpoints do not fit this Drive ({format_size(disk['drive_free_bytes'])} free, trash counted; "
             f"the run needs {format_size(disk['drive_peak_bytes'])} at its peak): free space on Drive (empty its trash, remove "
             f"old runs){' — or it fits with: ' + fits if fits else ''}. LoRA (LORA_RANK = 16, notebook 04) needs least. "
             f"Models on local disk: ENCODER_CHECKPOINT = \"/content/sonar_checkpoints/dm_70h_ub_sonar_encoder.pth\" and, "
             f"before the setup cell, os.environ[\"FAIRSEQ2_CACHE_DIR\"] = \"/content/model_cache\" (each new runtime "
             f"downloads them again, minutes).")
    if disk["needs_state_dir"]:
        state = project.state_dir(run_name)
        flags += ["--state_dir", str(state), *disk["flags"]]
        print(f"last.pt is kept in {state} (local disk) and copied into the run folder in place after each save")
    if checkpoint_minutes:
        flags += ["--checkpoint_every_minutes", str(checkpoint_minutes)]
    return flags


def _disk_arguments(project: Project, epochs: int, checkpoint_minutes: float, effective_batch: int, run_dir: Path) -> list[str]:
    """``sonar-ft plan``'s disk flags for this project: real free space, and only what is not yet on Drive."""
    args = ["--drive_dir", str(project.runs), "--local_dir", str(project.state_dir("")), "--epochs", str(epochs),
            "--features_gb", "0", "--resume_dir", str(run_dir)]  # the features are on Drive already (copied to local disk)
    if checkpoint_minutes:
        args += ["--checkpoint_every_minutes", str(checkpoint_minutes)]
    if project.encoder_checkpoint.is_file():
        args += ["--encoder_gb", "0"]
    if project.demo is not None:
        # The demo's decoder is among its assets (already there) and packed into the export. No epoch-time estimate on
        # a CPU: time-based saves are counted at their most, one per optimiser step (they are checked after each).
        encoder = project.encoder_checkpoint.stat().st_size
        decoder = sum(f.stat().st_size for f in project.demo.assets.glob("text_decoder*") if f.is_file())
        args += ["--decoder_cache_gb", "0", "--tarball_gb", f"{(encoder + decoder) / 1e9:.6f}"]  # GB, as the flag says
        clips = _verified_clips(project, "train")
        if checkpoint_minutes and clips:
            args += ["--saves_per_epoch", str(1 + -(-clips // effective_batch))]
    elif not _decoder_cache_to_come(project):
        args += ["--decoder_cache_gb", "0"]
    return args


def _decoder_cache_to_come(project: Project) -> bool:
    """True when fairseq2 will download the decoder into the project folder (on Drive in Colab): its cache is set
    there (:func:`setup`) and still empty. A cache elsewhere is the runtime's local disk; a full one is counted already."""
    cache = os.environ.get("FAIRSEQ2_CACHE_DIR")
    if not cache or not Path(cache).resolve().is_relative_to(project.root):
        return False
    return not (Path(cache).is_dir() and any(Path(cache).iterdir()))


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
def run_command(cmd: Sequence[str | os.PathLike], *, env: Mapping[str, str] | None = None, check: bool = True) -> int:
    """Run ``cmd`` (a list, no shell), streaming its output into the cell; stop with a clear message if it fails.

    ``check=False`` returns a non-zero exit code instead of stopping (a check whose report says more).
    ``env`` adds environment variables (``TQDM_DISABLE=1`` in the environment hides progress bars).
    Interrupting the cell stops the command too; training runs resume when the cell runs again.
    """
    cmd = [str(c) for c in cmd]
    shown = [Path(c).name if i == 0 else c for i, c in enumerate(cmd)]  # "python", not the venv path
    print("$ " + shlex.join(shown), flush=True)
    # FAIRSEQ2_NO_PROGRESS: fairseq2's rich bars write cursor and colour codes even into a pipe.
    child_env = dict(os.environ, PYTHONUNBUFFERED="1", FAIRSEQ2_NO_PROGRESS="1", **(env or {}))
    child_env.pop("MPLBACKEND", None)  # the kernel's inline backend means nothing to a subprocess
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=child_env)
    assert proc.stdout is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    started = time.monotonic()
    try:
        while True:
            # A step silent for HEARTBEAT_SECONDS (a model load, a download with no progress of its own) gets a
            # line saying it is alive, so that a cell is never silent for minutes.
            ready, _, _ = select.select([proc.stdout], [], [], HEARTBEAT_SECONDS)
            if not ready:
                print(f"... still running ({format_seconds(time.monotonic() - started)} so far)", flush=True)
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 14)
            if not chunk:
                break
            # Raw chunks, not lines: a child's partial line shows at once.
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
    if code != 0 and check:
        what = " ".join(shown[2:4]) if shown[1:2] == ["-m"] else " ".join(shown[:1] + [Path(c).name for c in shown[1:2]])
        why = "its error message is the last line above" if code == 2 else "see its output above"
        raise NotebookStop(f"`{what}` failed (exit code {code}): {why}.")
    return code


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


# Score columns of the notebooks' tables: sonar_ft.scores.METRICS (in the order papers print them), bleu4 shown as bleu.
SCORE_COLUMNS = tuple(m for m in METRICS if m not in ALIASES)
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

    from sonar_ft.files import atomic

    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = buffer.getvalue()
    if save_as is not None:
        atomic.write_bytes(save_as, data)
    try:
        from IPython.display import Image
    except ImportError:
        Image = None  # noqa: N806
    if Image is None or not _display(Image(data=data, format="png")):
        print(f"figure saved: {save_as}" if save_as else "(figure: run in a notebook to see it)")


BROWSER_DOWNLOAD_LIMIT = 500 * 10**6
"""Larger files are not pushed through the browser (Colab sends them in 1 MiB messages; ~3 GB fails or takes ages)."""


def offer_download(path: str | Path) -> None:
    """In Colab, send ``path`` to the browser as a download when small; a large file is offered as its Drive path."""
    path = Path(path)
    size = path.stat().st_size
    if size > BROWSER_DOWNLOAD_LIMIT:
        on_drive = "/content/drive/" in str(path.resolve())
        where = str(path.resolve()).split("/content/drive/", 1)[-1] if on_drive else str(path.resolve())
        print(f"{path.name} is {format_size(size)}: too large to send through the browser reliably. It is at\n  {where}\n"
              + ("Fetch it from drive.google.com (right-click → Download), or sync it with Google Drive for desktop; "
                 "on another machine `gdown` / `rclone copy` can fetch it too." if on_drive else
                 "Copy it to your Drive first (e.g. `cp` it under /content/drive/MyDrive), then fetch it from drive.google.com."))
        return
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
def verify_splits(project: Project, splits: Iterable[str] = SPLITS, feature_dim: int | None = None) -> dict[str, dict[str, Any]]:
    """``sonar-ft verify --reuse`` of each split (features from the local copy); the reports it wrote, never older ones.

    A report whose features and manifest have not changed is reused without reading a file. Exit
    code 1 (the set cannot be trained on) comes back as a report that says NOT OK; a check that
    could not run (exit 2) writes a report with ``error`` and stops here; a report older than this
    call is never shown as this check's result.
    """
    reports = {}
    for split in splits:
        report_path = project.runs / "verify" / f"{split}.json"
        dim = [] if feature_dim is None else ["--feature_dim", feature_dim]
        started = time.time()
        code = run_command(project.cli_command("verify", "--features", project.features(split), "--manifest",
                                               project.manifest(split), *dim, "--json", report_path, "--reuse"), check=False)
        fresh = report_path.is_file() and report_path.stat().st_mtime >= started - 1
        report = json.loads(report_path.read_text(encoding="utf-8")) if fresh else None
        if report is None or code not in (0, 1):
            why = (report or {}).get("error") or "see its output above"
            raise NotebookStop(f"verifying {split} failed (exit code {code}): {why}. Fix FEATURES / MANIFESTS and run again.")
        reports[split] = report
    return reports


def verify_summary(reports: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One table row per split from ``sonar-ft verify --json`` reports: counts, errors, warnings, frames, verdict."""
    rows = []
    for split, r in reports.items():
        stats = r.get("length_stats") or {}
        rows.append({
            "split": split,
            "manifest rows": r["counts"]["manifest_rows"],
            "feature files": r["counts"]["feature_files"],
            "checked": r["counts"]["checked"],
            "errors": sum(r["errors"].values()),
            "warnings": sum(r["warnings"].values()),
            "median frames": stats.get("median"),
            "max frames": stats.get("max"),
            "result": "OK" if r["ok"] else "NOT OK",
        })
    return rows


def length_histogram(reports: Mapping[str, Mapping[str, Any]], *, max_bins: int = 50) -> Figure:
    """Histogram of frames per clip, one colour per split, on bins shared by all splits."""
    import matplotlib
    import numpy as np

    if matplotlib.get_backend().lower() not in ("module://matplotlib_inline.backend_inline", "nbagg", "widget"):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = [n for report in reports.values() for n in report["lengths"]]
    lo, hi = (min(everything), max(everything)) if everything else (0, 1)
    # Frame counts are integers: one bin per count when few, else max_bins bins over the range.
    bins = np.arange(lo, hi + 2) - 0.5 if hi - lo < max_bins else np.linspace(lo, hi + 1, max_bins + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, report in reports.items():
        if report["lengths"]:
            ax.hist(report["lengths"], bins=bins, alpha=0.55, label=f"{split} ({len(report['lengths'])} clips)")
    ax.set(xlabel="frames per clip", ylabel="clips", title="sequence lengths")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def missing_splits(project: Project, splits: Iterable[str] = SPLITS) -> list[str]:
    """Readable lines for each split whose feature folder or manifest does not exist."""
    problems = []
    for split in splits:
        for what, path in (("features", project.source_features(split)), ("manifest", project.manifest(split))):
            if not path.exists():
                problems.append(f"{split} {what}: {path} does not exist")
    return problems
