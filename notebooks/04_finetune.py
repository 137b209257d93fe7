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
# # 4 · Fine-tune the encoder
#
# *(upload to Colab: File → Upload notebook)*
#
# The full fine-tuning run: the SONAR ASL encoder learns to produce embeddings the frozen SONAR
# text decoder turns into the English sentence (token cross-entropy through the decoder). The run
# folder on Drive receives per-epoch metrics and predictions, `best_encoder.pt` and the resumable
# `last.pt`.
#
# **Expect:** a GPU runtime and hours for the whole How2Sign training split on a T4 (an L4 or
# A100 is faster and trains in bf16; a T4 trains in fp32). Memory settings come from the planner
# for this runtime's GPU (cell "Memory settings"): on a 16 GB T4, 8-bit AdamW, gradient
# checkpointing and micro-batches with `--grad_accum`. **Drive:** `best_encoder.pt` is 3.0 GB and
# `last.pt` 9.0 GB with AdamW (4.5 GB with 8-bit AdamW); the disk plan printed with the memory
# plan says where they go so that a free 15 GB Drive holds the run at its peak.
# `DEMO = True` trains the demo's small encoder for a few epochs on the CPU (about a minute).

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

RUN_NAME = "full"
BATCH_SIZE = 32                    # the effective batch; the memory plan splits it into micro-batches x --grad_accum
EPOCHS = 30
LEARNING_RATE = 1e-4
EVAL_EVERY = 1
CHECKPOINT_MINUTES = 20            # also save last.pt every 20 min inside epochs: a disconnect costs at most that (0: epoch ends only)
CHECKPOINT_EVERY_STEPS = 0         # or every N steps (each save is 4.5-9 GB; the disk plan counts the saves)
LORA_RANK = 0                      # 16: LoRA adapters (on a T4: plain AdamW, batch 32 per step, last.pt 0.2 GB); 0: full fine-tuning
EXTRA_FLAGS = []                   # e.g. ["--gradient_checkpointing", "--grad_accum", "4", "--early_stopping_patience", "5"]
# DEMO mode trains the demo's small encoder with these instead:
DEMO_EPOCHS = 4
DEMO_BATCH_SIZE = 16
DEMO_LEARNING_RATE = 1e-3
DEMO_CHECKPOINT_MINUTES = 0.0005   # ~30 ms: saves inside the demo's sub-second epochs
DEMO_FLAGS = ["--beam_size", "2", "--distill_weight", "1.0"]  # distillation keeps French decoding working

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
# estimate, the flags and where the checkpoints go: the disk plan reads this Drive's free space (trash
# counted), simulates the whole run's saves, and stops here, before training, when they cannot fit,
# saying what to free or what fits. The training cell uses these flags. In DEMO mode (CPU) there is no
# memory to plan; the disk plan is made for the demo's encoder.

# %%
if DEMO:
    EPOCHS, BATCH_SIZE, LEARNING_RATE, CHECKPOINT_MINUTES = DEMO_EPOCHS, DEMO_BATCH_SIZE, DEMO_LEARNING_RATE, DEMO_CHECKPOINT_MINUTES
PLAN_FLAGS = colab.show_plan(P, BATCH_SIZE, run_name=RUN_NAME, lora_rank=LORA_RANK, epochs=EPOCHS,
                             checkpoint_minutes=CHECKPOINT_MINUTES,
                             max_frames=colab.longest_verified_clip(P))  # notebook 01's reports
BATCH_FLAGS = PLAN_FLAGS if "--batch_size" in PLAN_FLAGS else ["--batch_size", BATCH_SIZE, *PLAN_FLAGS]
print("flags used:", " ".join(map(str, BATCH_FLAGS)))

# %% [markdown]
# ## Train (resumable)
#
# **After a Colab disconnect:** reconnect, run the setup cell, the memory cell and this cell again —
# the recipe finds `last.pt` (or its copy on Drive) and continues from the last save (every
# `CHECKPOINT_MINUTES`); a finished run is not trained again. Another GPU is fine: the memory flags
# are planned again and do not change the result. Changing a setting that makes it
# another run (learning rate, batch size, data…) is refused: choose another `RUN_NAME`, or add
# `--overwrite` to start over.
#
# *If it fails:* **CUDA out of memory** — the error names flags that fit (see above).
# **Loss is NaN** — lower `LEARNING_RATE`. **Drive quota** — `last.pt` holds the weights and
# optimiser state (9.0 GB with AdamW, 4.5 GB with 8-bit AdamW); see the disk plan above, and empty
# Drive's trash (replaced checkpoints land there).

# %%
if DEMO:
    EXTRA_FLAGS = [*DEMO_FLAGS, *EXTRA_FLAGS]
run_dir = P.run_dir(RUN_NAME)
colab.run_command(P.recipe_command(
    run_dir,
    *BATCH_FLAGS, "--epochs", EPOCHS, "--learning_rate", LEARNING_RATE,
    "--eval_every", EVAL_EVERY, "--checkpoint_every_steps", CHECKPOINT_EVERY_STEPS, *EXTRA_FLAGS,
))

# %% [markdown]
# ## Result
#
# The best epoch and the curves (notebook 05 shows the same while a run is still going).

# %%
from sonar_ft.plots import best_epoch, plot_history, read_history

history = read_history(run_dir)
best = best_epoch(history)
colab.show_images(plot_history(run_dir, run_dir / "plots", title=RUN_NAME).values())
if best:
    print(f"best epoch {best['epoch']} of {len(history)}: val BLEU {best['val_bleu']:.2f}, "
          f"chrF {best['val_chrf']:.2f}, val loss {best['val_loss']:.4f}")
print(f"best encoder: {run_dir / 'best_encoder.pt'}")

# %% [markdown]
# Next: `05_monitor_and_predictions.ipynb` (predictions), `06_test_evaluation.ipynb` (test BLEU).
