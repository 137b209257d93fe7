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
# # 1b · Extract SignHiera features from sign videos
#
# *(upload to Colab: File → Upload notebook; needs a GPU runtime)*
#
# Turns How2Sign videos (or any sign videos) into the features the SONAR ASL encoder reads:
# `sonar-ft extract` runs the SignHiera video model (the one the encoder was trained on, 224×224
# crops around the signer, 128-frame windows) and writes `<id>.npy` (T, 768) onto the runtime's
# local disk; `sonar-ft pack` then puts them onto Drive as **one archive per split**, the form
# notebooks 00-08 read fastest (`FEATURES = "features/{split}.tar"`).
#
# ```
# MyDrive/sonar_ft/
#   videos/train/*.mp4                  <- VIDEO_DIR: How2Sign's clips (or your own)
#   manifests/train.csv                 <- optional HOW2SIGN_CSV: extract only the clips it names
#   checkpoints/dm_70h_ub_signhiera.pth <- downloaded here once (CC-BY-NC 4.0 licence)
#   features/train.tar                  <- what this notebook writes
# ```
#
# **Expect:** a GPU (Runtime → Change runtime type → T4 or better). Extraction is resumable: run
# the notebook again after a disconnect and it skips the videos already done (their features are on
# local disk only until packed, so pack before the runtime goes). The time for your hours of video
# is estimated from the first videos (below). `DEMO = True` renders a few synthetic videos and
# extracts them with a small random-weight SignHiera on the CPU, in seconds: the features are
# meaningless, the path is the real one.

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

VIDEO_DIR = "videos/{split}"       # the videos of a split (relative to the project folder); DEMO: synthetic ones
HOW2SIGN_CSV = ""                  # optional How2Sign re-aligned CSV (e.g. "manifests/{split}.csv"): only the clips it names
SPLIT = "train"                    # which split these videos are (run once per split)
SIGNHIERA = "checkpoints/dm_70h_ub_signhiera.pth"  # the SignHiera weights; downloaded here when missing
CROP = "face"                      # face: box around the signer (face detection); center; none: videos already cropped
PACKED = "features/{split}.tar"    # the archive written onto Drive; set FEATURES to this pattern in the other notebooks
PACK_DTYPE = "fp16"                # fp16: half the archive (How2Sign ~9.5 GB, not ~19), read as float32; "": files as extracted
HOURS_OF_VIDEO = 0.0               # your hours of video, for the time estimate; 0: the videos found here
BATCH_SIZE = 8                     # windows per forward pass (lower it if the GPU runs out of memory)

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
# ## The videos and the SignHiera weights
#
# Lists the videos of `SPLIT` and downloads the official SignHiera weights once (about 200 MB,
# resumable; licence CC-BY-NC 4.0). In DEMO mode: synthetic moving-pattern videos and a small
# random-weight SignHiera whose output width is the demo's feature size, made here.
#
# *If it fails:* **no videos** — fix `VIDEO_DIR` (the folder of `.mp4` files on Drive).

# %%
import json

if DEMO:
    work = P.runs / "extract_demo"
    videos = work / "videos" / SPLIT
    signhiera = work / "signhiera_demo_random.pth"
    colab.run_command(P.step_command("demo-videos", "--out", videos, "--signhiera", signhiera,
                                     "--feature_dim", str(P.feature_dim)))
    crop, device, csv = "center", "cpu", None
    local_out = work / "extracted" / SPLIT
    packed = work / PACKED.format(split=SPLIT)
else:
    videos = P.root / VIDEO_DIR.format(split=SPLIT)
    signhiera = P.root / SIGNHIERA
    csv = P.root / HOW2SIGN_CSV.format(split=SPLIT) if HOW2SIGN_CSV else None
    crop, device = CROP, "auto"
    local_out = (P.local_data or P.runs) / "extracted" / SPLIT  # local disk: Drive is slow with thousands of small files
    packed = P.root / PACKED.format(split=SPLIT)
    if not P.has_gpu:
        print("WARNING: this runtime has no GPU; extraction will be very slow. In Colab: Runtime → Change runtime "
              "type → T4 GPU, then run again.")
    if not signhiera.is_file():
        colab.run_command(P.cli_command("download", "signhiera", "--out", signhiera))
found = sorted(videos.glob("*.mp4")) if videos.is_dir() else []
if not found:
    colab.stop(f"no .mp4 videos in {videos}: copy the videos there or fix VIDEO_DIR above")
print(f"{len(found)} videos in {videos}; SignHiera: {signhiera} ({colab.format_size(signhiera.stat().st_size)})")

# %% [markdown]
# ## Extract (`sonar-ft extract`, resumable)
#
# One `<id>.npy` per video on local disk, plus `extract_report.jsonl` (one line per video: frames,
# fps, windows, seconds, crop box, or why it failed). Videos that cannot be used (corrupt, no video
# stream, too long) are listed and the rest go on; a progress line every minute.
#
# *If it fails:* **CUDA out of memory** — lower `BATCH_SIZE`. **no face found** (crop `face`) — the
# centre is used; `CROP = "none"` if your videos are already cropped around the signer.

# %%
inputs = ["--how2sign-csv", csv, "--video-dir", videos] if csv else [videos]
code = colab.run_command(P.cli_command("extract", *inputs, "--signhiera", signhiera, "--out", local_out,
                                       "--crop", crop, "--device", device, "--batch-size", BATCH_SIZE,
                                       "--progress-every", 60), check=False)
report = [json.loads(line) for line in (local_out / "extract_report.jsonl").read_text().splitlines() if line.strip()]
ok = [r for r in report if r.get("status") == "ok"]
failed = [r for r in report if r.get("status") != "ok"]
colab.show_table([{k: r.get(k) for k in ("id", "frames", "fps", "windows", "vectors", "seconds", "status")}
                  for r in report[:10]])
if failed:
    print(f"{len(failed)} videos failed (first: {failed[0]['id']}: {failed[0].get('reason', failed[0].get('status'))}); "
          f"the full list is in {local_out / 'extract_report.jsonl'}")
if not ok:
    colab.stop("no video could be extracted: see the reasons above")

# %% [markdown]
# ## How long your videos will take
#
# An **estimate**, from the speed measured on the videos above on this runtime (windows per second
# of the model; a new window every 128 frames: about 0.23 windows per second of video at 30 fps). Decoding and the first batches'
# warm-up make it pessimistic for a few short videos.

# %%
windows = sum(r["windows"] for r in ok)
model_seconds = sum(r["seconds"] for r in ok)
video_seconds = sum(r["video_seconds"] for r in ok)
rate = windows / model_seconds if model_seconds > 0 else 0.0
hours = HOURS_OF_VIDEO or video_seconds / 3600
expected_min = hours * 3600 * (windows / video_seconds) / rate / 60 if rate > 0 else float("nan")
where = "this runtime's GPU" if not DEMO and P.has_gpu else "this CPU"
print(f"measured: {windows} windows of {video_seconds / 60:.1f} min of video in {model_seconds:.1f} s "
      f"({rate:.2f} windows/s on {where})")
print(f"estimate: {hours:.3g} h of video -> about {expected_min:.1f} min of extraction on {where}"
      + (" (DEMO: a tiny random model, so this says nothing about the real one)" if DEMO else ""))

# %% [markdown]
# ## Pack onto Drive (`sonar-ft pack`)
#
# One archive with sizes and checksums: the training notebooks copy it to local disk once per runtime
# (`sonar-ft unpack`) instead of reading thousands of files from Drive. Then set, in notebooks 00-08,
# `FEATURES = "features/{split}.tar"` and point `MANIFESTS` at your manifests. With `PACK_DTYPE = "fp16"`
# the features are stored as float16, half the bytes (all of How2Sign then fits a free 15 GB Drive), each
# value within ~5e-4 relative of the original; training reads them as float32.
#
# *If it fails:* **"beyond float16's range"** — a clip holds values float16 cannot store: set `PACK_DTYPE = ""`.

# %%
colab.run_command(P.cli_command("pack", "--features", local_out, "--out", packed,
                                 *(["--dtype", PACK_DTYPE] if PACK_DTYPE else [])))
print(f"{packed}: {colab.format_size(packed.stat().st_size)}, {len(ok)} clips of split {SPLIT!r}")
if code != 0:
    print("Some videos failed (see above): fix or drop them, run again (done videos are skipped), and pack again.")
print("Next: 01_setup_and_verify_features.ipynb with FEATURES = " + repr(PACKED))
