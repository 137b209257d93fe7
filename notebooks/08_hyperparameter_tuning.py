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
# # 8 · Hyperparameter tuning
#
# *(upload to Colab: File → Upload notebook)*
#
# Runs an Optuna study over the fine-tuning settings (`sonar-ft tune`, see `configs/tuning/`):
# each trial is a short training run (few epochs on a fraction of the data) scored on validation
# BLEU; unpromising trials are pruned early. Then shows the optimisation history, which parameters
# mattered, the best parameters, and trains with them (`sonar-ft train-from-tuning`).
#
# **Expect:** a GPU runtime; each trial costs about `TRIAL_EPOCHS` epochs of notebook 04 on the
# fraction of the training clips the tuning config sets (`subset_fraction`, a quarter by default),
# so a study takes many hours: start small. A study is resumable (it lives in `study.db` in the
# study folder): after a disconnect just run the cell again; `N_TRIALS` is the study's total, not
# "more trials". `DEMO = True`: 2 trials of 1 epoch on a small subset
# of the demo, a couple of minutes on a CPU.

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

TUNING_CONFIG = "configs/tuning/default.yaml"  # search space and fixed settings
STUDY_NAME = "sonar-ft-how2sign"
N_TRIALS = 20
TRIAL_EPOCHS = 5
FINAL_EPOCHS = 30                  # the training run with the best settings
FINAL_RUN_NAME = "from_tuning"
# DEMO mode: a tiny study on the demo
DEMO_N_TRIALS = 2
DEMO_TRIAL_EPOCHS = 1
DEMO_FINAL_EPOCHS = 1
DEMO_MAX_SAMPLES = 48

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
# ## Run the study
#
# The study folder (`runs/tuning`) receives `study.db`, `trials.csv`, `study_summary.json`,
# `best_hyperparameters.json`, `best_config.yaml` and `plots/` (HTML and PNG). Running the cell
# again continues the study up to `N_TRIALS`; with all trials done it only rewrites the reports.
#
# *If it fails:* **"trials in a row failed"** — see `fail_reason` in `trials.csv` (often out of
# memory: narrow the batch sizes in the search space or add memory flags). **Out of memory in one
# trial** — recorded as a failed trial, the study goes on.

# %%
P.ensure_extras("tune")  # optuna, plotly, psycopg2: only this notebook needs them
if not DEMO:
    P.require_gpu()
study_dir = P.run_dir("tuning")
args = ["tune", "--config", TUNING_CONFIG, "--study_name", STUDY_NAME, "--output_dir", study_dir, "--no_progress"]
if DEMO:
    demo = P.demo
    args = ["tune", "--config", "configs/tuning/demo.yaml", "--study_name", "notebook-demo", "--output_dir", study_dir,
            "--no_progress", "--n_trials", DEMO_N_TRIALS, "--epochs", DEMO_TRIAL_EPOCHS, "--max_samples", DEMO_MAX_SAMPLES,
            "--final_epochs", DEMO_FINAL_EPOCHS,
            "--encoder_checkpoint", demo.encoder_checkpoint, "--decoder", demo.decoder_card,
            "--text_encoder", demo.text_encoder_card, "--device", "cpu",
            "--train_features", P.features("train"), "--train_manifest", P.manifest("train"),
            "--val_features", P.features("val"), "--val_manifest", P.manifest("val")]
else:
    args += ["--n_trials", N_TRIALS, "--epochs", TRIAL_EPOCHS, "--final_epochs", FINAL_EPOCHS,
             "--encoder_checkpoint", P.encoder_checkpoint,
             "--train_features", P.features("train"), "--train_manifest", P.manifest("train"),
             "--val_features", P.features("val"), "--val_manifest", P.manifest("val")]
colab.run_command(P.cli_command(*args))

# %% [markdown]
# ## Optimisation history and parameter importances
#
# The history shows each trial's validation BLEU and the best so far; the importances (fANOVA)
# which settings explained most of the differences — with few trials, treat them as a hint. The
# interactive HTML versions are in `plots/` beside the PNGs.

# %%
plots = study_dir / "plots"
shown = [plots / f"{name}.png" for name in ("optimization_history", "param_importances", "intermediate_values")]
colab.show_images([p for p in shown if p.is_file()])
missing = [p.stem for p in shown if not p.is_file()]
if missing:
    print(f"not drawn yet (need more completed trials): {', '.join(missing)}")

# %% [markdown]
# ## Trials and the best parameters

# %%
import json

import pandas as pd

colab.show_table(pd.read_csv(study_dir / "trials.csv"))
best = json.loads((study_dir / "best_hyperparameters.json").read_text(encoding="utf-8"))
print(f"best: trial {best['trial']}, {best['metric']} {best['value']:.3f}")
colab.show_table([{"parameter": k, "value": v} for k, v in best["params"].items()])

# %% [markdown]
# ## Train with the best parameters
#
# `sonar-ft train-from-tuning` trains with the study's `best_config.yaml` (all training clips,
# `FINAL_EPOCHS` epochs) into its own run folder — resumable like notebook 04; notebooks 05–07
# work on it with `RUN_NAME = "from_tuning"`.

# %%
final_dir = P.run_dir(FINAL_RUN_NAME)
epochs = DEMO_FINAL_EPOCHS if DEMO else FINAL_EPOCHS
colab.run_command(P.cli_command("train-from-tuning", "--study_dir", study_dir, "--epochs", epochs, "--output_dir", final_dir))

from sonar_ft.plots import best_epoch, read_history

final = best_epoch(read_history(final_dir))
print(f"best epoch {final['epoch']}: val BLEU {final['val_bleu']:.2f} -> {final_dir / 'best_encoder.pt'}" if final else "no evaluation")
