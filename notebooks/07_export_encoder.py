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
# # 7 · Export the fine-tuned encoder and translate with it
#
# *(upload to Colab: File → Upload notebook)*
#
# Packs the run's best encoder, its `config.json`, `tokenizer.json`, the metrics, the test results
# and a model card into one tarball (`sonar_ft.export.pack.export_run`), lists its contents, offers it
# for download, then loads it back **from the tarball** and translates a few test clips into
# several languages — the SONAR decoder speaks 200, the encoder was only trained towards English.
#
# **Expect:** packing a few GB takes a minute or two; translating a handful of clips is quick on a
# GPU and fine on a CPU. `DEMO = True`: the demo's run and its two languages (English, French).

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

RUN_NAME = "full"                  # the run to export (notebook 04's)
TARBALL = "sonar_encoder_finetuned.tar.gz"   # written into the runs folder
TGT_LANGS = ["eng_Latn", "fra_Latn", "deu_Latn", "spa_Latn"]
N_CLIPS = 3
DEMO_TGT_LANGS = ["eng_Latn", "fra_Latn"]    # the demo decoder knows these two

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
# ## Build the tarball
#
# Re-running reuses the tarball when it is newer than the encoder and the test results.
# *If it fails:* **no best_encoder.pt / config.json** — the run has not finished an evaluation yet.

# %%
import tarfile

run_dir = P.find_run(P.run_dir(RUN_NAME))
tarball = P.runs / TARBALL
test_results = run_dir / "test_results.json"
if colab.is_up_to_date(tarball, run_dir / "best_encoder.pt", test_results):
    print(f"{tarball} is up to date")
else:
    colab.run_command(P.cli_command("export", "--run_dir", run_dir, "--out", tarball))
with tarfile.open(tarball) as tar:
    colab.show_table([{"member": m.name, "size": colab.format_size(m.size)} for m in tar.getmembers()])
print(f"{tarball}: {colab.format_size(tarball.stat().st_size)}")

# %% [markdown]
# ## Download it
#
# In Colab the browser downloads the file (allow pop-ups / multiple downloads if asked); elsewhere
# its path is printed. It also stays in the runs folder on Drive.

# %%
colab.offer_download(tarball)  # over 500 MB: its Drive path and how to fetch it instead

# %% [markdown]
# ## Translate test clips from the tarball
#
# `sonar-ft translate` checks the tarball's members before extracting anything, loads the
# encoder and the decoder recorded with it, and decodes each clip into every language.

# %%
import json

langs = DEMO_TGT_LANGS if DEMO else TGT_LANGS
out = P.runs / "translations.json"
# --manifest: the references come from the test manifest, whichever format it has (.tsv or How2Sign's .csv).
colab.run_command(P.cli_command("translate", "--encoder", tarball, "--features", P.features("test"), "--tgt_langs",
                                ",".join(langs), "--manifest", P.manifest("test"), "--limit", N_CLIPS,
                                "--device", P.device, "--out", out))
rows = json.loads(out.read_text(encoding="utf-8"))
colab.show_table([{"id": r["id"], "reference": r["reference"], **{lang: r[lang] for lang in langs}} for r in rows])

# %% [markdown]
# Next: `08_hyperparameter_tuning.ipynb` to search for better settings.
