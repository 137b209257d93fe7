# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
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
# # 2 · Download the SONAR ASL encoder
#
# *(upload to Colab: File → Upload notebook)*
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

CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/SONAR/asl/dm_70h_ub_sonar_encoder.pth"
EXPECTED_SIZE = None               # bytes; None: trust the Content-Length the server sends
SHA256 = None                      # optional: the file's SHA-256, checked after download

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
