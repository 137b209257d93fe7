# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2 · Download the SONAR ASL encoder
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/sonar-ft/sonar-ft/blob/main/notebooks/02_download_sonar_encoder.ipynb)
#
# Downloads Meta's pretrained SONAR ASL encoder `dm_70h_ub_sonar_encoder.pth` into
# `sonar_checkpoints/` in the project folder (skipped when it is already there and complete), then
# loads it once to show its architecture — read from the weights themselves — and parameter count.
#
# **Expect:** a download of a few GB (~818M parameters); the bytes go to `…pth.part` first and the
# file appears only when complete, so an interrupted download resumes when you run the cell again.
# Loading needs about 4 GB of RAM, no GPU. `DEMO = True` downloads nothing and shows the demo's
# small starting encoder instead.

# %% tags=["parameters"]
# Parameters: edit them here (papermill overrides them, e.g. -p DEMO True).
DEMO = False                       # True: the offline demo (no Drive, no GPU, no downloads but the stack), minutes
REPO_URL = "https://github.com/sonar-ft/sonar-ft"  # cloned when no project folder is found (Colab DEMO: /content/sonar-ft)
DRIVE_FOLDER = "MyDrive/sonar_ft"  # Colab: your project folder on Google Drive (repository + data)
PROJECT_DIR = ""                   # empty: the Drive folder in Colab, else the repository holding this notebook
ENV_DIR = ""                       # the SONAR stack's environment; empty: /content/sonar_env in Colab, else <project>/.venv
DEMO_DIR = ""                      # DEMO mode only; empty: $DEMO_DIR, else demo_runs/ in the project folder
FEATURES = "features/{split}"      # feature folder of each split, relative to the project folder
MANIFESTS = "manifests/{split}.tsv"  # manifest of each split (.tsv, or How2Sign's re-aligned .csv)
ENCODER_CHECKPOINT = "sonar_checkpoints/dm_70h_ub_sonar_encoder.pth"  # the pretrained encoder (notebook 02)
RUNS_DIR = "runs"                  # where run folders go (DEMO mode: DEMO_DIR/notebook_runs)

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/SONAR/asl/dm_70h_ub_sonar_encoder.pth"
EXPECTED_SIZE = None               # bytes; None: trust the Content-Length the server sends
SHA256 = None                      # optional: the file's SHA-256, checked after download

# %% [markdown]
# ## Setup (the same cell in every notebook)
#
# Brings the project onto the runtime (the Drive folder in Colab; else a clone of `REPO_URL`),
# mounts Google Drive (Colab, not in DEMO mode), then creates — once per runtime, about
# 5 minutes — or reuses the **SONAR stack's own environment** (`ENV_DIR`): Python 3.12 with
# torch 2.9.1, fairseq2 0.8.1 and sonar-space, made with `uv`. Colab's Python (3.13) cannot run
# fairseq2, so the stack never enters this notebook's kernel: every heavy step below runs as a
# command of that environment's Python, and the notebook only reads and draws what it writes.
# No runtime restart. It prints the versions and the GPU.
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
    ROOT = start if PROJECT_DIR else start / "sonar-ft"
    if not (ROOT / "train_sonar_finetuning.py").is_file():
        print(f"no project at {start}: cloning {REPO_URL} into {ROOT}", flush=True)
        subprocess.run(["git", "clone", "--quiet", "--depth", "1", REPO_URL, str(ROOT)], check=True)
if ROOT is None:
    raise SystemExit(f"No sonar-ft project at {start}: set PROJECT_DIR to your copy of the repository, or REPO_URL.")
sys.path.insert(0, str(ROOT))

from sonar_ft import colab

P = colab.setup(ROOT, demo=DEMO, demo_dir=DEMO_DIR, env_dir=ENV_DIR, features=FEATURES, manifests=MANIFESTS,
                encoder_checkpoint=ENCODER_CHECKPOINT, runs=RUNS_DIR)

# %% [markdown]
# ## Download
#
# Uses `sonar-ft download`: resumable, checked against the expected size (and SHA-256 when
# given), written atomically. A complete file already in place is not downloaded again.
#
# *If it fails:* **cannot reach / HTTP error** — check the URL and the runtime's network, then run
# the cell again (it resumes). **size or SHA-256 differs** — nothing was written; check
# `EXPECTED_SIZE` / `SHA256`. **Drive full** — the file needs a few GB of free Drive space.

# %%
if DEMO:
    checkpoint = P.encoder_checkpoint
    print(f"DEMO: nothing to download, using the demo's starting encoder {checkpoint}")
else:
    checkpoint = P.encoder_checkpoint
    check = [*(["--size", EXPECTED_SIZE] if EXPECTED_SIZE else []), *(["--sha256", SHA256] if SHA256 else [])]
    colab.run_command(P.cli_command("download", CHECKPOINT_URL, "--out", checkpoint, *check))
print(f"{checkpoint}: {colab.format_size(checkpoint.stat().st_size)}")

# %% [markdown]
# ## Architecture and size
#
# `sonar_ft.models.encoder.load_encoder` (run by the stack environment) infers the architecture from the tensor shapes (and loads the
# weights strictly, so a damaged or foreign file is reported here rather than during training).
# The official encoder is T5-v1.1-large-like: 24 + 24 layers, `d_model` 1024, 768-d input features,
# 1024-d SONAR embeddings.

# %%
import json

info_path = P.runs / "encoder_info.json"
colab.run_command(P.step_command("encoder-info", "--checkpoint", checkpoint, "--json", info_path))
info = json.loads(info_path.read_text(encoding="utf-8"))
colab.show_table([{"setting": k, "value": str(v)} for k, v in info["architecture"].items()])
print(f"{info['parameters']:,} parameters, counting the tied token-embedding copies ({info['distinct_parameters']:,} distinct)")

# %% [markdown]
# Next: `03_quick_test.ipynb`.
