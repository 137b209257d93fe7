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
# # 0 · All in one: from a fresh runtime to an exported encoder
#
# *(upload to Colab: File → Upload notebook)*
#
# The whole workflow in one runtime: setup → (optional, with `VIDEO_DIR`: features from videos) →
# verify the features → download the encoder → 50-clip quick test → full fine-tuning → curves →
# predictions → test-set `--eval_only` → export and download the tarball. Each step is also a
# notebook of its own (01–07) with more explanations. Every heavy step runs in the SONAR stack's environment; re-running a cell after a
# disconnect continues where it stopped (a finished run is not trained again).
#
# **Expect:** a GPU runtime (T4 or better) and hours for the full run. `DEMO = True` runs the same
# cells on the offline demo on a CPU, from `/content` with no Drive, in a few minutes.

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

VIDEO_DIR = ""                     # optional: each split's videos, e.g. "videos/{split}" (How2Sign's clips): extracted into FEATURES first (step 0); "" skips it
CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/SONAR/asl/dm_70h_ub_sonar_encoder.pth"
QUICK_BATCH_SIZE = 8               # quick test: effective batch, 50 clips, 5 epochs
BATCH_SIZE = 32                    # full run: effective batch (the memory plan picks micro-batches)
EPOCHS = 30
LEARNING_RATE = 1e-4
CHECKPOINT_MINUTES = 20            # last.pt is also saved every 20 min inside epochs: a disconnect costs at most that
N_EXAMPLES = 10
TARBALL = "sonar_encoder_finetuned.tar.gz"
# DEMO mode: the demo's small encoder, a few epochs on the CPU
DEMO_BATCH_SIZE = 16
DEMO_EPOCHS = 3
DEMO_CHECKPOINT_MINUTES = 0.0005     # ~30 ms: saves inside the demo's sub-second epochs
DEMO_FLAGS = ["--learning_rate", "1e-3", "--beam_size", "2", "--distill_weight", "1.0"]  # memory flags added here win

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
# ## 0 · Optional: extract features from videos (`sonar-ft extract`, `sonar-ft pack`)
#
# Only when `VIDEO_DIR` is set: SignHiera (downloaded once, CC-BY-NC 4.0) turns each split's videos
# into features on local disk — on a GPU; hours for all of How2Sign — and `sonar-ft pack` writes one
# archive per split, `features/{split}.tar`, which the steps below then read as `FEATURES`. With How2Sign's
# `.csv` as `MANIFESTS`, only the clips it names are extracted. A split already packed is not extracted
# again. Notebook 01b does the same step by step (crop, batch size, time estimate, demo videos).
#
# *If it fails:* **no videos** — fix `VIDEO_DIR`. **some videos failed** — the list is above; fix or
# drop them and run the cell again (videos done are skipped).

# %%
if not VIDEO_DIR or DEMO:
    print("0 · skipped: " + ("DEMO mode reads the demo's features (notebook 01b extracts demo videos)." if DEMO else
                             "set VIDEO_DIR in the parameters cell to extract features from your videos first "
                             "(notebook 01b does it step by step)."))
else:
    signhiera = P.root / "checkpoints" / "dm_70h_ub_signhiera.pth"
    if not signhiera.is_file():
        colab.run_command(P.cli_command("download", "signhiera", "--out", signhiera))
    for split in colab.SPLITS:
        archive = P.root / colab.PACKED_FEATURES.format(split=split)
        if archive.is_file():
            print(f"{split}: {archive} is there, not extracted again (delete it to extract again)")
            continue
        videos, manifest = P.root / VIDEO_DIR.format(split=split), P.manifest(split)
        if not videos.is_dir():
            colab.stop(f"no folder {videos}: fix VIDEO_DIR above (the folder of each split's .mp4 videos)")
        inputs = ["--how2sign-csv", manifest, "--video-dir", videos] if manifest.suffix == ".csv" else [videos]
        extracted = (P.local_data or P.runs) / "extracted" / split  # local disk: Drive is slow with many small files
        colab.run_command(P.cli_command("extract", *inputs, "--signhiera", signhiera, "--out", extracted,
                                        "--progress-every", 60))
        # float16 halves the archive (How2Sign: ~19 GB -> ~9.5 GB), so that a free 15 GB Drive can hold it
        colab.run_command(P.cli_command("pack", "--features", extracted, "--out", archive, "--dtype", "fp16"))
    P = P.with_features(colab.PACKED_FEATURES)

# %% [markdown]
# ## 1 · Features onto local disk, and verify them (`sonar-ft unpack`, `sonar-ft verify`)
#
# With `LOCAL_DATA` (Colab: by default) each split's features — a folder, or better one
# `sonar-ft pack` archive on Drive — are copied to the runtime's disk once per runtime and checked;
# every later step reads that copy, never Drive. Verify reports are reused while nothing changed.

# %%
import json

problems = colab.missing_splits(P)
if problems:
    colab.stop("missing data:\n  " + "\n  ".join(problems) + "\nFix FEATURES / MANIFESTS above.")
reports = colab.verify_splits(P, colab.SPLITS, P.feature_dim)
colab.show_table(colab.verify_summary(reports))
colab.show_figure(colab.length_histogram(reports), save_as=P.runs / "verify" / "lengths.png")
if not all(r["ok"] for r in reports.values()):
    colab.stop("some split cannot be trained on: see the tables above (notebook 01 explains each check)")

# %% [markdown]
# ## 2 · Download the SONAR ASL encoder (`sonar-ft download`, resumable)

# %%
if DEMO:
    print(f"DEMO: using the demo's starting encoder {P.encoder_checkpoint}")
else:
    colab.run_command(P.cli_command("download", CHECKPOINT_URL, "--out", P.encoder_checkpoint))
print(f"{P.encoder_checkpoint}: {colab.format_size(P.encoder_checkpoint.stat().st_size)}")

# %% [markdown]
# ## 3 · Memory settings for this GPU, and the quick test (50 clips, 5 epochs)
#
# `sonar-ft plan --gpu auto` prints the memory estimate, the flags and the disk plan.

# %%
MAX_FRAMES = colab.longest_clip(reports)  # the plan is made for the real longest clip, and the run is told it
QUICK_FLAGS = colab.show_plan(P, QUICK_BATCH_SIZE, max_frames=MAX_FRAMES) or ["--batch_size", QUICK_BATCH_SIZE]
if DEMO:
    QUICK_FLAGS = ["--batch_size", DEMO_BATCH_SIZE, *DEMO_FLAGS]
quick_dir = P.run_dir("quick_test")
# The quick test keeps no checkpoints (--save_checkpoints false): at the official size they would take 12 GB of Drive.
colab.run_command(P.recipe_command(quick_dir, *QUICK_FLAGS, "--epochs", 2 if DEMO else 5, "--eval_every", 1,
                                   "--max_samples", 50, "--save_checkpoints", "false"))

# %% [markdown]
# ## 4 · Full fine-tuning (resumable: after a disconnect, run the setup cell and this one again)
#
# The plan above is made again for the GPU attached now, and for this Drive: its free space (trash
# counted) decides where the checkpoints go, and the run stops here before training when they do
# not fit. `last.pt` is also saved every `CHECKPOINT_MINUTES` inside epochs. Resuming on another GPU
# (T4 today, L4 tomorrow) is fine: the memory flags may change, the result does not.

# %%
if DEMO:
    BATCH_SIZE, EPOCHS, CHECKPOINT_MINUTES = DEMO_BATCH_SIZE, DEMO_EPOCHS, DEMO_CHECKPOINT_MINUTES
PLAN_FLAGS = colab.show_plan(P, BATCH_SIZE, run_name="full", max_frames=MAX_FRAMES, epochs=EPOCHS,
                             checkpoint_minutes=CHECKPOINT_MINUTES)
FULL_FLAGS = PLAN_FLAGS if "--batch_size" in PLAN_FLAGS else ["--batch_size", BATCH_SIZE, *PLAN_FLAGS]
FULL_FLAGS += DEMO_FLAGS if DEMO else ["--learning_rate", LEARNING_RATE]
run_dir = P.run_dir("full")
colab.run_command(P.recipe_command(run_dir, *FULL_FLAGS, "--epochs", EPOCHS, "--eval_every", 1))

# %% [markdown]
# ## 5 · Curves and predictions

# %%
from sonar_ft.plots import best_epoch, latest_predictions, plot_history, read_history

history = read_history(run_dir)
colab.show_images(plot_history(run_dir, run_dir / "plots", title="full").values())
best = best_epoch(history)
print(f"best epoch {best['epoch']} of {len(history)}: val BLEU {best['val_bleu']:.2f}" if best else "no evaluation yet")
predictions = latest_predictions(run_dir)
if predictions is not None:
    colab.show_table(predictions["samples"][:N_EXAMPLES], colab.score_columns(predictions["samples"], "sample", first=["id", "reference", "prediction"]), digits=1)

# %% [markdown]
# ## 6 · Test-set evaluation (`--eval_only`)

# %%
results_path = run_dir / "test_results.json"
if colab.is_up_to_date(results_path, run_dir / "best_encoder.pt"):
    print(f"{results_path} is newer than the encoder: showing it")
else:
    colab.run_command(P.recipe_command(run_dir, "--eval_only", "--batch_size", 16, "--beam_size", 2 if DEMO else 5,
                                       split="test", encoder=run_dir / "best_encoder.pt"))
results = json.loads(results_path.read_text(encoding="utf-8"))
colab.show_table([results], colab.score_columns([results], "", first=["num_samples"]), digits=2)

# %% [markdown]
# ## 7 · Export the encoder and download the tarball

# %%
tarball = P.runs / TARBALL
if not colab.is_up_to_date(tarball, run_dir / "best_encoder.pt", results_path):
    colab.run_command(P.cli_command("export", "--run_dir", run_dir, "--out", tarball))
colab.offer_download(tarball)
