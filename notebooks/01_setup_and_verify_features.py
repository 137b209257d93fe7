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
# # 1 · Setup and feature check
#
# *(upload to Colab: File → Upload notebook)*
#
# Prepares a Colab runtime for the SONAR ASL fine-tuning and checks that the How2Sign features can
# be trained on: brings the project, mounts Google Drive, creates the SONAR stack's environment
# and verifies the features of the train / val / test splits against their manifests.
#
# **Your Drive folder** (`DRIVE_FOLDER`) holds a copy of this repository and the data:
#
# ```
# MyDrive/sonar_ft/                  <- git clone of the repository
#   features/{train,val,test}/       <- <id>.npy / <id>.pt, (T, 768) SignHiera features (or ssvp_slt's nested layout)
#   manifests/{train,val,test}.tsv   <- id, length, text (or How2Sign's re-aligned .csv)
#   sonar_checkpoints/               <- notebook 02 downloads the encoder here
#   runs/                            <- notebooks 03-08 write their runs here
# ```
#
# **Expect:** no GPU needed. Creating the stack environment takes a few minutes once per runtime
# (torch 2.9.1, fairseq2, sonar-space; no restart); afterwards this notebook only reads
# the features — every file once, so time grows with the dataset and Drive's speed (a first read
# from Drive is much slower than later ones). `DEMO = True` runs it all on the built-in offline demo
# in seconds, after building the demo once (a minute or more on a CPU; cached in `demo_runs/`).

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

SPLITS = ["train", "val", "test"]
FEATURE_DIM = 768                  # what the SONAR ASL encoder reads (SignHiera features); None: do not check

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
# ## Verify the features
#
# For each split, `sonar-ft verify` reads every feature file the manifest names and
# checks: ids without a feature file, duplicate ids, unreadable files, the feature dimension,
# NaN/Inf values, zero-length clips and empty texts (**errors**: training would fail), plus feature
# files not in the manifest and manifest lengths that differ from the files (**warnings**).
#
# *If it fails:* **missing features** — the copy to Drive is incomplete, or `FEATURES` points to the
# wrong folder (ssvp_slt's nested `features/<epoch>/<id[:5]>/<id>.pt` layout is detected by itself).
# **wrong feature dimension** — the features come from another extractor; the SONAR encoder reads
# 768-d SignHiera features. **unreadable** — re-copy those files. The reports are saved as
# `runs/verify/<split>.json`, and reused while the manifest and the feature files are unchanged.
# With `LOCAL_DATA` set (Colab: by default) the features are first copied to the runtime's disk
# (`sonar-ft unpack`, once per runtime; a `sonar-ft pack` archive on Drive is one file to copy
# instead of thousands) and checked and trained on there.

# %%
problems = colab.missing_splits(P, SPLITS)
if problems:
    colab.stop("missing data:\n  " + "\n  ".join(problems)
               + "\nCopy the features and manifests into the project folder, or fix FEATURES / MANIFESTS above.")

reports = colab.verify_splits(P, SPLITS, P.feature_dim if DEMO else FEATURE_DIM)  # NOT OK splits: shown below

# %% [markdown]
# ## Summary and sequence lengths
#
# One row per split, and the distribution of clip lengths (frames). Very long clips cost GPU memory
# in every batch they are in: if the longest are far beyond the rest, consider the recipe's
# `--max_frames` (truncates them).

# %%
colab.show_table(colab.verify_summary(reports))
colab.show_figure(colab.length_histogram(reports), save_as=P.runs / "verify" / "lengths.png")

# %% [markdown]
# ## Verdict
#
# Stops here with the reason if any split cannot be trained on; otherwise go on with
# `02_download_sonar_encoder.ipynb`.

# %%
failed = [split for split, report in reports.items() if not report["ok"]]
if failed:
    colab.stop(f"{', '.join(failed)} cannot be trained on as is: see the ERROR lines in the tables above, "
               "fix the data (or the paths) and run this notebook again.")
warned = [split for split, report in reports.items() if any(report["warnings"].values())]
print("All splits can be trained on" + (f" (warnings in {', '.join(warned)}: worth a look)" if warned else "") + ".")
print("Next: 02_download_sonar_encoder.ipynb")
