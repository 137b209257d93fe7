# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     gpuType: T4
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab,kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 3 · Quick test: 50 clips, 5 epochs
#
# *(upload to Colab: File → Upload notebook)*
#
# Runs the whole training loop on 50 clips of each split for 5 epochs, evaluating after every
# epoch, to show that data, encoder, decoder and GPU work together before the long run. The loss
# should fall; BLEU on 50 clips after 5 epochs means little.
#
# **Expect:** a GPU runtime (T4 or better). The first run downloads the SONAR text decoder into
# `model_cache/` on Drive (a few GB, once), then loads the 818M-parameter encoder; the 5 epochs
# themselves take a few minutes on a T4. **Out of memory:** lower `BATCH_SIZE`, or add memory flags
# to `EXTRA_FLAGS` (`sonar-ft plan --gpu t4` recommends some, e.g. `--gradient_checkpointing`,
# `--decoder_dtype fp16`). `DEMO = True`: the same command on the offline demo, on the CPU.

# %% tags=["parameters"]
# Parameters: edit them here (papermill overrides them, e.g. -p DEMO True).
DEMO = False                       # True: the offline demo (no Drive, no GPU, no downloads but the stack), minutes
REPO_URL = ""                      # the project's git URL: cloned into /content/sonar-ft when no project folder is found
DRIVE_FOLDER = "MyDrive/sonar_ft"  # Colab: your project folder on Google Drive (repository + data)
PROJECT_DIR = ""                   # empty: the Drive folder in Colab, else the repository holding this notebook
ENV_DIR = ""                       # the SONAR stack's environment; empty: /content/sonar_env in Colab, else <project>/.venv
DEMO_DIR = ""                      # DEMO mode only; empty: $DEMO_DIR, else demo_runs/ in the project folder
FEATURES = "features/{split}"      # features of each split: a folder, or a `sonar-ft pack` archive (.tar, faster on Drive)
MANIFESTS = "manifests/{split}.tsv"  # manifest of each split (.tsv, or How2Sign's re-aligned .csv)
ENCODER_CHECKPOINT = "sonar_checkpoints/dm_70h_ub_sonar_encoder.pth"  # the pretrained encoder (notebook 02)
RUNS_DIR = "runs"                  # where run folders go (DEMO mode: DEMO_DIR/notebook_runs)
LOCAL_DATA = "auto"                # features copied here once per runtime and read from here; auto: /content/sonar_data in Colab, "" read in place

RUN_NAME = "quick_test"
BATCH_SIZE = 8
EPOCHS = 5
LEARNING_RATE = 1e-4
MAX_SAMPLES = 50
EXTRA_FLAGS = []                   # more recipe flags, e.g. ["--gradient_checkpointing"]

# %% [markdown]
# ## Setup (the same cell in every notebook)
#
# Brings the project onto the runtime (the Drive folder in Colab; else a clone of `REPO_URL` into
# `/content/sonar-ft`), mounts Google Drive (Colab, not in DEMO mode). The **SONAR stack's own
# environment** (`ENV_DIR`: Python 3.12 with torch 2.9.1, fairseq2 0.8.1 and sonar-space, made with
# `uv`, about 5 minutes once per runtime) is created or reused the first time a step needs it —
# notebooks that only read results never build it. Colab's Python (3.13) cannot run fairseq2, so
# the stack never enters this notebook's kernel: every heavy step runs as a command of that
# environment's Python, and the notebook only reads and draws what it writes. No runtime restart.
#
# *If it fails:* **"No sonar-ft project"** — fix `DRIVE_FOLDER` / `PROJECT_DIR`, or set `REPO_URL`.
# **Mount errors** — *Runtime > Disconnect and delete runtime*, then run again. **uv / install
# errors** — the last lines of the tool's output are shown; run the cell again (it resumes).

# %%
# Setup: the project, Google Drive, the SONAR stack's environment. Identical in every notebook.
import os
import subprocess
import sys
from pathlib import Path

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB and not DEMO:
    from google.colab import drive

    drive.mount("/content/drive")  # Colab asks for permission the first time
    PROJECT_DIR = PROJECT_DIR or os.path.join("/content/drive", DRIVE_FOLDER)
start = Path(PROJECT_DIR or os.getcwd()).resolve()
ROOT = next((p for p in (start, *start.parents) if (p / "train_sonar_finetuning.py").is_file()), None)
if ROOT is None and REPO_URL:
    ROOT = Path.cwd().resolve() / "sonar-ft"  # the runtime's own disk (/content), never a folder holding data
    if not (ROOT / "train_sonar_finetuning.py").is_file():
        if ROOT.exists() and any(ROOT.iterdir()):
            raise SystemExit(f"{ROOT} exists but is not a sonar-ft project: move it away or set PROJECT_DIR")
        print(f"no project at {start}: cloning {REPO_URL} into {ROOT}", flush=True)
        clone = subprocess.run(["git", "clone", "--quiet", "--depth", "1", REPO_URL, str(ROOT)], capture_output=True, text=True)
        if clone.returncode != 0:
            raise SystemExit(f"git clone {REPO_URL} failed:\n{clone.stderr.strip()}\nCheck REPO_URL (or bring the project as said below).")
if ROOT is None:
    raise SystemExit(f"No sonar-ft project at {start}. Bring it onto this runtime one way: copy the repository folder to "
                     f"Google Drive as {DRIVE_FOLDER} (it then also holds your data and runs); or set REPO_URL to its git "
                     "URL (cloned into /content/sonar-ft); or upload it and set PROJECT_DIR to where it is.")
sys.path.insert(0, str(ROOT))

from sonar_ft import colab

P = colab.setup(ROOT, demo=DEMO, demo_dir=DEMO_DIR, env_dir=ENV_DIR, features=FEATURES, manifests=MANIFESTS,
                encoder_checkpoint=ENCODER_CHECKPOINT, runs=RUNS_DIR, local_data=LOCAL_DATA)

# %% [markdown]
# ## Memory settings for this GPU
#
# `sonar-ft plan --gpu auto` (run by the stack environment) reads this runtime's GPU and picks the
# least intrusive settings whose estimate fits it at the effective batch `BATCH_SIZE`; it prints the
# estimate, the flags and where the checkpoints go (the disk plan). The training cell uses these flags.
# In DEMO mode (CPU) there is nothing to plan.

# %%
PLAN_FLAGS = colab.show_plan(P, BATCH_SIZE, max_frames=colab.longest_verified_clip(P))
BATCH_FLAGS = PLAN_FLAGS or ["--batch_size", BATCH_SIZE]
print("flags used:", " ".join(map(str, BATCH_FLAGS)))

# %% [markdown]
# ## Train
#
# The recipe's own command line (printed first, so you can run it in a terminal too). Re-running
# the cell is safe: a finished run is left as it is, an interrupted one resumes from its `last.pt`.
# To start over, delete the run folder (or add `--overwrite` to `EXTRA_FLAGS`).

# %%
run_dir = P.run_dir(RUN_NAME)
colab.run_command(P.recipe_command(
    run_dir,
    *BATCH_FLAGS, "--epochs", EPOCHS, "--learning_rate", LEARNING_RATE,
    "--freeze_decoder", "--eval_every", 1, "--max_samples", MAX_SAMPLES, *EXTRA_FLAGS,
    "--save_checkpoints", "false",  # no 12 GB of checkpoints on Drive for a test: metrics and predictions are written
))

# %% [markdown]
# ## Curves and scores
#
# Train and validation loss, validation BLEU / chrF per epoch, from the run's `metrics_epoch*.json`.

# %%
from sonar_ft.plots import best_epoch, plot_history, read_history

history = read_history(run_dir)
colab.show_table(history, colab.score_columns(history, "val_", first=["epoch", "train_loss"], last=["lr", "seconds"]))
colab.show_images(plot_history(run_dir, run_dir / "plots", title=RUN_NAME).values())
best = best_epoch(history)
print(f"best epoch {best['epoch']}: val BLEU {best['val_bleu']:.2f}" if best else "no evaluation yet")

# %% [markdown]
# Next: `04_finetune.ipynb` for the full run.
