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
# # 6 · Evaluate on the test split
#
# *(upload to Colab: File → Upload notebook)*
#
# Scores the run's `best_encoder.pt` on the held-out **test** split with the recipe's `--eval_only`
# mode: beam-search translations, corpus BLEU and chrF (sacrebleu, signature recorded) and the
# token loss, written to `test_results.json` in the run folder — nothing else there is touched.
#
# **Expect:** a GPU runtime; about as long as one validation pass of notebook 04 over the test
# clips (How2Sign has ~2.4k). Re-running the cell reuses
# `test_results.json` if it is newer than the encoder (set `REEVALUATE = True` to score again).

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

RUN_NAME = "full"                  # the run whose best_encoder.pt is scored (notebook 04's)
BATCH_SIZE = 16
BEAM_SIZE = 5
REEVALUATE = False
N_EXAMPLES = 10

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
# ## Evaluate
#
# *If it fails:* **no best_encoder.pt** — train first (notebook 04) or fix `RUN_NAME`.
# **Out of memory** — lower `BATCH_SIZE` (evaluation holds no gradients, so it rarely happens).

# %%
run_dir = P.find_run(P.run_dir(RUN_NAME))
results_path = run_dir / "test_results.json"
if not REEVALUATE and colab.is_up_to_date(results_path, run_dir / "best_encoder.pt"):
    print(f"{results_path} is newer than the encoder: showing it (REEVALUATE = True scores again)")
else:
    colab.run_command(P.recipe_command(
        run_dir, "--eval_only", "--batch_size", BATCH_SIZE, "--beam_size", BEAM_SIZE,
        split="test", encoder=run_dir / "best_encoder.pt",
    ))

# %% [markdown]
# ## `test_results.json`

# %%
import json

results = json.loads(results_path.read_text(encoding="utf-8"))
colab.show_table([results], colab.score_columns([results], "", first=["num_samples"], last=["beam_size", "tgt_lang"]), digits=2)
print(results["bleu_signature"])
colab.show_table(results["samples"][:N_EXAMPLES], colab.score_columns(results["samples"], "sample", first=["id", "reference", "prediction"]), digits=1)

# %% [markdown]
# Next: `07_export_encoder.ipynb`.
