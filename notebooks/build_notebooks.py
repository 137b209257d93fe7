"""Write the numbered notebooks in this folder from the cell texts below (no outputs, stable cell ids).

    python notebooks/build_notebooks.py          # rewrite the .ipynb files
    python notebooks/build_notebooks.py --check  # exit 1 if a saved notebook differs from this script

The notebooks share their parameter and setup cells; keeping them here keeps the eight in step.
Edit a notebook's text here, run the script, commit both. ``tests/test_notebooks.py`` checks that
the saved notebooks are what this script writes and executes each one with ``DEMO = True``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sonar_ft import io  # noqa: E402  (every file the project writes goes through sonar_ft.io)

HERE = Path(__file__).resolve().parent
COLAB_URL = "https://colab.research.google.com/github/sonar-ft/sonar-ft/blob/main/notebooks/{name}"


def md(text: str) -> dict:
    return {"cell_type": "markdown", "source": textwrap.dedent(text).strip()}


def code(text: str, *tags: str) -> dict:
    return {"cell_type": "code", "source": textwrap.dedent(text).strip(), "tags": list(tags)}


def badge(name: str) -> str:
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({COLAB_URL.format(name=name)})"


# ------------------------------------------------------------------------------------------------
# Shared cells
# ------------------------------------------------------------------------------------------------
COMMON_PARAMETERS = '''
# Parameters: edit them here (papermill overrides them, e.g. -p DEMO True).
DEMO = False                       # True: the offline demo (no Drive, no network, CPU), a minute or two
DRIVE_FOLDER = "MyDrive/sonar_ft"  # Colab: your project folder on Google Drive (repository + data)
PROJECT_DIR = ""                   # empty: the Drive folder in Colab, else the repository holding this notebook
DEMO_DIR = ""                      # DEMO mode only; empty: $DEMO_DIR, else demo_runs/ in the project folder
FEATURES = "features/{split}"      # feature folder of each split, relative to the project folder
MANIFESTS = "manifests/{split}.tsv"  # manifest of each split (.tsv, or How2Sign's re-aligned .csv)
ENCODER_CHECKPOINT = "sonar_checkpoints/dm_70h_ub_sonar_encoder.pth"  # the pretrained encoder (notebook 02)
RUNS_DIR = "runs"                  # where run folders go (DEMO mode: DEMO_DIR/notebook_runs)
'''

FIND_PROJECT = '''
# Mount Google Drive (Colab), find the project folder, import sonar_ft. The same in every notebook.
import os
import sys
from pathlib import Path

if "google.colab" in sys.modules and not DEMO:
    from google.colab import drive

    drive.mount("/content/drive")  # Colab asks for permission the first time
    PROJECT_DIR = PROJECT_DIR or os.path.join("/content/drive", DRIVE_FOLDER)
elif DEMO:
    print("DEMO mode: no Google Drive mount.")
else:
    print("Not running in Google Colab: skipping the Google Drive mount (local paths).")
start = Path(PROJECT_DIR or os.getcwd()).resolve()
ROOT = next((p for p in (start, *start.parents) if (p / "train_sonar_finetuning.py").is_file()), None)
if ROOT is None:
    raise SystemExit(f"No sonar-ft project at {start}: set PROJECT_DIR to your copy of the repository "
                     f"(Colab: put the repository in /content/drive/{DRIVE_FOLDER}, with features/ and manifests/).")
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sonar_ft import colab
'''

INSTALL = '''
requirements = colab.ensure_requirements(ROOT / "requirements.txt")  # Colab: installs what is missing; may restart once
'''

SETUP = '''
P = colab.setup(ROOT, demo=DEMO, demo_dir=DEMO_DIR, features=FEATURES, manifests=MANIFESTS,
                encoder_checkpoint=ENCODER_CHECKPOINT, runs=RUNS_DIR)
print(colab.describe_device())
'''

SETUP_MD = '''
## Setup

Mounts Google Drive in Colab (it asks for permission; outside Colab the mount is skipped), finds the
project folder, checks the pinned requirements (in Colab, installs what is missing — see notebook 01)
and prints where data, models and runs are, and which GPU this runtime has.

*If it fails:* **"No sonar-ft project"** — the Drive folder is not a copy of this repository
(fix `DRIVE_FOLDER` or `PROJECT_DIR`). **Drive not mounted / "Mountpoint must not already contain
files"** — *Runtime > Disconnect and delete runtime*, then run again.
'''


def standard_setup() -> list[dict]:
    return [md(SETUP_MD), code(FIND_PROJECT + "\n" + INSTALL.strip() + "\n" + SETUP.strip())]


def parameters(extra: str) -> dict:
    return code(COMMON_PARAMETERS.strip() + ("\n\n" + textwrap.dedent(extra).strip() if extra.strip() else ""), "parameters")


# ------------------------------------------------------------------------------------------------
# 01 setup and verify features
# ------------------------------------------------------------------------------------------------
NB01 = [
    md(f'''
    # 1 · Setup and feature check

    {badge("01_setup_and_verify_features.ipynb")}

    Prepares a Colab runtime for the SONAR ASL fine-tuning and checks that the How2Sign features can
    be trained on: installs the pinned requirements, mounts Google Drive, moves into the project folder
    and verifies the features of the train / val / test splits against their manifests.

    **Your Drive folder** (`DRIVE_FOLDER`) holds a copy of this repository and the data:

    ```
    MyDrive/sonar_ft/                  <- git clone of the repository
      features/{{train,val,test}}/       <- <id>.npy / <id>.pt, (T, 768) SignHiera features (or ssvp_slt's nested layout)
      manifests/{{train,val,test}}.tsv   <- id, length, text (or How2Sign's re-aligned .csv)
      sonar_checkpoints/               <- notebook 02 downloads the encoder here
      runs/                            <- notebooks 03-08 write their runs here
    ```

    **Expect:** no GPU needed. The first install takes a few minutes (torch 2.9.1, fairseq2, sonar-space)
    and restarts the runtime once if it replaced Colab's torch; afterwards this notebook only reads
    the features — every file once, so time grows with the dataset and Drive's speed (a first read
    from Drive is much slower than later ones). `DEMO = True` runs it all on the built-in offline demo
    in seconds, after building the demo once (a minute or more on a CPU; cached in `demo_runs/`).
    '''),
    parameters('''
    SPLITS = ["train", "val", "test"]
    FEATURE_DIM = 768                  # what the SONAR ASL encoder reads (SignHiera features); None: do not check
    '''),
    md('''
    ## Mount Google Drive and find the project

    In Colab this asks for access to your Drive and then uses `DRIVE_FOLDER`; elsewhere the mount is
    skipped and the repository holding this notebook is used.

    *If it fails:* **"No sonar-ft project"** — the folder is missing or is not a copy of the repository:
    fix `DRIVE_FOLDER` / `PROJECT_DIR` (Colab: `!git clone https://github.com/sonar-ft/sonar-ft /content/drive/MyDrive/sonar_ft`).
    **Mount errors** — *Runtime > Disconnect and delete runtime*, then run again.
    '''),
    code(FIND_PROJECT),
    md('''
    ## Install the pinned requirements

    `requirements.txt` pins `torch==2.9.1` because fairseq2 0.8.1 is built against exactly that
    version. In Colab, missing or different packages are installed with pip. **If that replaced
    Colab's own torch, the runtime restarts automatically** (the old torch is already loaded in
    memory and cannot be swapped in place): wait for it to reconnect and run the notebook again from
    the top — this step is then quick. Outside Colab nothing is installed; missing packages are listed
    (`make setup` installs them).
    '''),
    code(INSTALL),
    md('''
    ## Project paths

    Moves into the project folder (every relative path below is relative to it) and shows where the
    features, manifests, encoder and runs are, and which accelerator this runtime has.
    '''),
    code(SETUP),
    md('''
    ## Verify the features

    For each split, `sonar_ft.data.verify_dataset` reads every feature file the manifest names and
    checks: ids without a feature file, duplicate ids, unreadable files, the feature dimension,
    NaN/Inf values, zero-length clips and empty texts (**errors**: training would fail), plus feature
    files not in the manifest and manifest lengths that differ from the files (**warnings**).

    *If it fails:* **missing features** — the copy to Drive is incomplete, or `FEATURES` points to the
    wrong folder (ssvp_slt's nested `features/<epoch>/<id[:5]>/<id>.pt` layout is detected by itself).
    **wrong feature dimension** — the features come from another extractor; the SONAR encoder reads
    768-d SignHiera features. **unreadable** — re-copy those files. The reports are saved as
    `runs/verify/<split>.json`.
    '''),
    code('''
    from sonar_ft import io
    from sonar_ft.data import verify_dataset

    problems = colab.missing_splits(P, SPLITS)
    if problems:
        colab.stop("missing data:\\n  " + "\\n  ".join(problems)
                   + "\\nCopy the features and manifests into the project folder, or fix FEATURES / MANIFESTS above.")

    expected_dim = P.feature_dim if DEMO else FEATURE_DIM
    reports = {}
    for split in SPLITS:
        reports[split] = verify_dataset(P.features(split), P.manifest(split), feature_dim=expected_dim)
        io.write_json(P.runs / "verify" / f"{split}.json", reports[split].to_dict())
        print(f"\\n[{split}]\\n{reports[split].format_table()}")
    '''),
    md('''
    ## Summary and sequence lengths

    One row per split, and the distribution of clip lengths (frames). Very long clips cost GPU memory
    in every batch they are in: if the longest are far beyond the rest, consider the recipe's
    `--max_frames` (truncates them).
    '''),
    code('''
    colab.show_table(colab.verify_summary(reports))
    colab.show_figure(colab.length_histogram(reports), save_as=P.runs / "verify" / "lengths.png")
    '''),
    md('''
    ## Verdict

    Stops here with the reason if any split cannot be trained on; otherwise go on with
    `02_download_sonar_encoder.ipynb`.
    '''),
    code('''
    failed = [split for split, report in reports.items() if not report.ok]
    if failed:
        colab.stop(f"{', '.join(failed)} cannot be trained on as is: see the ERROR lines in the tables above, "
                   "fix the data (or the paths) and run this notebook again.")
    warned = [split for split, report in reports.items() if any(report.warnings.values())]
    print("All splits can be trained on" + (f" (warnings in {', '.join(warned)}: worth a look)" if warned else "") + ".")
    print("Next: 02_download_sonar_encoder.ipynb")
    '''),
]

# ------------------------------------------------------------------------------------------------
# 02 download the encoder
# ------------------------------------------------------------------------------------------------
NB02 = [
    md(f'''
    # 2 · Download the SONAR ASL encoder

    {badge("02_download_sonar_encoder.ipynb")}

    Downloads Meta's pretrained SONAR ASL encoder `dm_70h_ub_sonar_encoder.pth` into
    `sonar_checkpoints/` in the project folder (skipped when it is already there and complete), then
    loads it once to show its architecture — read from the weights themselves — and parameter count.

    **Expect:** a download of a few GB (~818M parameters); the bytes go to `…pth.part` first and the
    file appears only when complete, so an interrupted download resumes when you run the cell again.
    Loading needs about 4 GB of RAM, no GPU. `DEMO = True` downloads nothing and shows the demo's
    small starting encoder instead.
    '''),
    parameters('''
    CHECKPOINT_URL = "https://dl.fbaipublicfiles.com/SONAR/asl/dm_70h_ub_sonar_encoder.pth"
    EXPECTED_SIZE = None               # bytes; None: trust the Content-Length the server sends
    SHA256 = None                      # optional: the file's SHA-256, checked after download
    '''),
    *standard_setup(),
    md('''
    ## Download

    Uses `sonar_ft.download.download`: resumable, checked against the expected size (and SHA-256 when
    given), written atomically. A complete file already in place is not downloaded again.

    *If it fails:* **cannot reach / HTTP error** — check the URL and the runtime's network, then run
    the cell again (it resumes). **size or SHA-256 differs** — nothing was written; check
    `EXPECTED_SIZE` / `SHA256`. **Drive full** — the file needs a few GB of free Drive space.
    '''),
    code('''
    if DEMO:
        checkpoint = P.encoder_checkpoint
        print(f"DEMO: nothing to download, using the demo's starting encoder {checkpoint}")
    else:
        from sonar_ft.download import download

        if P.encoder_checkpoint.is_file():
            print(f"{P.encoder_checkpoint} is already there: checking it instead of downloading again")
        checkpoint = download(CHECKPOINT_URL, P.encoder_checkpoint, expected_size=EXPECTED_SIZE, sha256=SHA256)
    print(f"{checkpoint}: {colab.format_size(checkpoint.stat().st_size)}")
    '''),
    md('''
    ## Architecture and size

    `sonar_ft.encoder.load_encoder` infers the architecture from the tensor shapes (and loads the
    weights strictly, so a damaged or foreign file is reported here rather than during training).
    The official encoder is T5-v1.1-large-like: 24 + 24 layers, `d_model` 1024, 768-d input features,
    1024-d SONAR embeddings.
    '''),
    code('''
    import dataclasses

    from sonar_ft.encoder import count_parameters, load_encoder

    encoder, architecture = load_encoder(checkpoint)
    colab.show_table([{"setting": k, "value": str(v)} for k, v in dataclasses.asdict(architecture).items()])
    total = count_parameters(encoder)
    distinct = count_parameters(encoder, include_tied_copies=False)
    print(f"{total:,} parameters, counting the tied token-embedding copies ({distinct:,} distinct)")
    del encoder  # frees its memory (~3.3 GB for the official encoder)
    '''),
    md("Next: `03_quick_test.ipynb`."),
]

# ------------------------------------------------------------------------------------------------
# 03 quick test
# ------------------------------------------------------------------------------------------------
NB03 = [
    md(f'''
    # 3 · Quick test: 50 clips, 5 epochs

    {badge("03_quick_test.ipynb")}

    Runs the whole training loop on 50 clips of each split for 5 epochs, evaluating after every
    epoch, to show that data, encoder, decoder and GPU work together before the long run. The loss
    should fall; BLEU on 50 clips after 5 epochs means little.

    **Expect:** a GPU runtime (T4 or better). The first run downloads the SONAR text decoder into
    `model_cache/` on Drive (a few GB, once), then loads the 818M-parameter encoder; the 5 epochs
    themselves take a few minutes on a T4. **Out of memory:** lower `BATCH_SIZE`, or add memory flags
    to `EXTRA_FLAGS` (`sonar-ft plan --gpu t4` recommends some, e.g. `--gradient_checkpointing`,
    `--decoder_dtype fp16`). `DEMO = True`: the same command on the offline demo, on the CPU.
    '''),
    parameters('''
    RUN_NAME = "quick_test"
    BATCH_SIZE = 8
    EPOCHS = 5
    LEARNING_RATE = 1e-4
    MAX_SAMPLES = 50
    EXTRA_FLAGS = []                   # more recipe flags, e.g. ["--gradient_checkpointing"]
    '''),
    *standard_setup(),
    md('''
    ## Train

    The recipe's own command line (printed first, so you can run it in a terminal too). Re-running
    the cell is safe: a finished run is left as it is, an interrupted one resumes from its `last.pt`.
    To start over, delete the run folder (or add `--overwrite` to `EXTRA_FLAGS`).
    '''),
    code('''
    run_dir = P.run_dir(RUN_NAME)
    colab.run_command(P.recipe_command(
        run_dir,
        "--batch_size", BATCH_SIZE, "--epochs", EPOCHS, "--learning_rate", LEARNING_RATE,
        "--freeze_decoder", "--eval_every", 1, "--max_samples", MAX_SAMPLES, *EXTRA_FLAGS,
    ))
    '''),
    md('''
    ## Curves and scores

    Train and validation loss, validation BLEU / chrF per epoch, from the run's `metrics_epoch*.json`.
    '''),
    code('''
    from sonar_ft.plots import best_epoch, plot_history, read_history

    history = read_history(run_dir)
    colab.show_table(history, ["epoch", "train_loss", "val_loss", "val_bleu", "val_chrf", "lr", "seconds"])
    colab.show_images(plot_history(run_dir, run_dir / "plots", title=RUN_NAME).values())
    best = best_epoch(history)
    print(f"best epoch {best['epoch']}: val BLEU {best['val_bleu']:.2f}" if best else "no evaluation yet")
    '''),
    md("Next: `04_finetune.ipynb` for the full run."),
]

# ------------------------------------------------------------------------------------------------
# 04 fine-tune
# ------------------------------------------------------------------------------------------------
NB04 = [
    md(f'''
    # 4 · Fine-tune the encoder

    {badge("04_finetune.ipynb")}

    The full fine-tuning run: the SONAR ASL encoder learns to produce embeddings the frozen SONAR
    text decoder turns into the English sentence (token cross-entropy through the decoder). The run
    folder on Drive receives per-epoch metrics and predictions, `best_encoder.pt` and the resumable
    `last.pt`.

    **Expect:** a GPU runtime and hours for the whole How2Sign training split on a T4 (an L4 or
    A100 is faster and trains in bf16; a T4 trains in fp32). Memory: the encoder with AdamW needs ~13 GB before activations — on a
    16 GB T4 use the flags `sonar-ft plan --gpu t4` recommends (e.g. `--gradient_checkpointing`,
    `--decoder_dtype fp16`, `--optimizer adamw8bit`, smaller `BATCH_SIZE` with `--grad_accum`).
    `DEMO = True` trains the demo's small encoder for a few epochs on the CPU (about a minute).
    '''),
    parameters('''
    RUN_NAME = "full"
    BATCH_SIZE = 8
    EPOCHS = 30
    LEARNING_RATE = 1e-4
    EVAL_EVERY = 1
    CHECKPOINT_EVERY_STEPS = 0         # also save last.pt every N steps (mid-epoch resume; each save is ~10 GB to Drive)
    EXTRA_FLAGS = []                   # e.g. ["--gradient_checkpointing", "--grad_accum", "4", "--early_stopping_patience", "5"]
    # DEMO mode trains the demo's small encoder with these instead:
    DEMO_EPOCHS = 4
    DEMO_BATCH_SIZE = 16
    DEMO_LEARNING_RATE = 1e-3
    DEMO_FLAGS = ["--beam_size", "2", "--distill_weight", "1.0"]  # distillation keeps French decoding working
    '''),
    *standard_setup(),
    md('''
    ## Train (resumable)

    **After a Colab disconnect:** reconnect, run the setup cell and this cell again — the recipe finds
    `last.pt` in the run folder and continues from the last finished epoch (or step, with
    `CHECKPOINT_EVERY_STEPS`); a finished run is not trained again. Changing a setting that makes it
    another run (learning rate, batch size, data…) is refused: choose another `RUN_NAME`, or add
    `--overwrite` to start over.

    *If it fails:* **CUDA out of memory** — the error names flags that fit (see above).
    **Loss is NaN** — lower `LEARNING_RATE`. **Drive quota** — each `last.pt` holds the weights and
    optimiser state (~10 GB for the full encoder).
    '''),
    code('''
    if DEMO:
        EPOCHS, BATCH_SIZE, LEARNING_RATE = DEMO_EPOCHS, DEMO_BATCH_SIZE, DEMO_LEARNING_RATE
        EXTRA_FLAGS = [*DEMO_FLAGS, *EXTRA_FLAGS]
    run_dir = P.run_dir(RUN_NAME)
    colab.run_command(P.recipe_command(
        run_dir,
        "--batch_size", BATCH_SIZE, "--epochs", EPOCHS, "--learning_rate", LEARNING_RATE,
        "--eval_every", EVAL_EVERY, "--checkpoint_every_steps", CHECKPOINT_EVERY_STEPS, *EXTRA_FLAGS,
    ))
    '''),
    md('''
    ## Result

    The best epoch and the curves (notebook 05 shows the same while a run is still going).
    '''),
    code('''
    from sonar_ft.plots import best_epoch, plot_history, read_history

    history = read_history(run_dir)
    best = best_epoch(history)
    colab.show_images(plot_history(run_dir, run_dir / "plots", title=RUN_NAME).values())
    if best:
        print(f"best epoch {best['epoch']} of {len(history)}: val BLEU {best['val_bleu']:.2f}, "
              f"chrF {best['val_chrf']:.2f}, val loss {best['val_loss']:.4f}")
    print(f"best encoder: {run_dir / 'best_encoder.pt'}")
    '''),
    md("Next: `05_monitor_and_predictions.ipynb` (predictions), `06_test_evaluation.ipynb` (test BLEU)."),
]

# ------------------------------------------------------------------------------------------------
# 05 monitor and predictions
# ------------------------------------------------------------------------------------------------
NB05 = [
    md(f'''
    # 5 · Monitor a run and read its predictions

    {badge("05_monitor_and_predictions.ipynb")}

    Plots train loss, validation loss and validation BLEU per epoch from the run folder's
    `metrics_epoch*.json`, shows the best epoch so far, and a table of references next to the
    model's translations (with sentence BLEU) from the latest `predictions_epoch*.json`.

    **Expect:** seconds, no GPU. It only reads files, so it also works **while training is still
    running** — open it in a second Colab tab (Drive may show a finished epoch a minute or so late)
    and re-run the cells to refresh. `DEMO = True` reads notebook 04's demo run (or makes a short one
    if 04 has not run).
    '''),
    parameters('''
    RUN_NAME = "full"                  # the run folder to look at (notebook 04's)
    N_EXAMPLES = 10                    # rows of the predictions table
    '''),
    *standard_setup(),
    md('''
    ## Curves

    *If it fails:* **no metrics yet** — the first epoch has not finished (or `RUN_NAME` is wrong):
    wait and re-run.
    '''),
    code('''
    from sonar_ft.plots import best_epoch, plot_history, read_history

    run_dir = P.find_run(P.run_dir(RUN_NAME), need="metrics_epoch*.json")
    history = read_history(run_dir)
    colab.show_images(plot_history(run_dir, run_dir / "plots", title=run_dir.name).values())
    colab.show_table(history, ["epoch", "train_loss", "val_loss", "val_bleu", "val_chrf", "lr", "seconds", "samples_per_second"])
    '''),
    md("## Best epoch so far"),
    code('''
    best = best_epoch(history)
    if best is None:
        print(f"{len(history)} epoch(s) done, none evaluated yet")
    else:
        print(f"best epoch {best['epoch']} (of {len(history)} done): val BLEU {best['val_bleu']:.2f}, "
              f"chrF {best['val_chrf']:.2f}, val loss {best['val_loss']:.4f}")
    '''),
    md('''
    ## Latest predictions

    References and translations of the latest evaluated epoch, with each sentence's BLEU
    (sacrebleu's smoothed sentence BLEU; the corpus BLEU above is not their average).
    '''),
    code('''
    from sonar_ft.plots import latest_predictions

    predictions = latest_predictions(run_dir)
    if predictions is None:
        print("no predictions_epoch*.json yet: they are written at each evaluation")
    else:
        print(f"epoch {predictions['epoch']}: corpus BLEU {predictions['bleu']:.2f} on {len(predictions['samples'])} clips")
        colab.show_table(predictions["samples"][:N_EXAMPLES], ["id", "reference", "prediction", "bleu_score"], digits=1)
    '''),
]

# ------------------------------------------------------------------------------------------------
# 06 test evaluation
# ------------------------------------------------------------------------------------------------
NB06 = [
    md(f'''
    # 6 · Evaluate on the test split

    {badge("06_test_evaluation.ipynb")}

    Scores the run's `best_encoder.pt` on the held-out **test** split with the recipe's `--eval_only`
    mode: beam-search translations, corpus BLEU and chrF (sacrebleu, signature recorded) and the
    token loss, written to `test_results.json` in the run folder — nothing else there is touched.

    **Expect:** a GPU runtime; about as long as one validation pass of notebook 04 over the test
    clips (How2Sign has ~2.4k). Re-running the cell reuses
    `test_results.json` if it is newer than the encoder (set `REEVALUATE = True` to score again).
    '''),
    parameters('''
    RUN_NAME = "full"                  # the run whose best_encoder.pt is scored (notebook 04's)
    BATCH_SIZE = 16
    BEAM_SIZE = 5
    REEVALUATE = False
    N_EXAMPLES = 10
    '''),
    *standard_setup(),
    md('''
    ## Evaluate

    *If it fails:* **no best_encoder.pt** — train first (notebook 04) or fix `RUN_NAME`.
    **Out of memory** — lower `BATCH_SIZE` (evaluation holds no gradients, so it rarely happens).
    '''),
    code('''
    run_dir = P.find_run(P.run_dir(RUN_NAME))
    results_path = run_dir / "test_results.json"
    if not REEVALUATE and colab.is_up_to_date(results_path, run_dir / "best_encoder.pt"):
        print(f"{results_path} is newer than the encoder: showing it (REEVALUATE = True scores again)")
    else:
        colab.run_command(P.recipe_command(
            run_dir, "--eval_only", "--batch_size", BATCH_SIZE, "--beam_size", BEAM_SIZE,
            split="test", encoder=run_dir / "best_encoder.pt",
        ))
    '''),
    md("## `test_results.json`"),
    code('''
    import json

    results = json.loads(results_path.read_text(encoding="utf-8"))
    colab.show_table([{k: results[k] for k in ("num_samples", "bleu", "chrf", "loss", "beam_size", "tgt_lang")}], digits=2)
    print(results["bleu_signature"])
    colab.show_table(results["samples"][:N_EXAMPLES], ["id", "reference", "prediction", "bleu_score"], digits=1)
    '''),
    md("Next: `07_export_encoder.ipynb`."),
]

# ------------------------------------------------------------------------------------------------
# 07 export
# ------------------------------------------------------------------------------------------------
NB07 = [
    md(f'''
    # 7 · Export the fine-tuned encoder and translate with it

    {badge("07_export_encoder.ipynb")}

    Packs the run's best encoder, its `config.json`, `tokenizer.json`, the metrics, the test results
    and a model card into one tarball (`sonar_ft.export.export_run`), lists its contents, offers it
    for download, then loads it back **from the tarball** and translates a few test clips into
    several languages — the SONAR decoder speaks 200, the encoder was only trained towards English.

    **Expect:** packing a few GB takes a minute or two; translating a handful of clips is quick on a
    GPU and fine on a CPU. `DEMO = True`: the demo's run and its two languages (English, French).
    '''),
    parameters('''
    RUN_NAME = "full"                  # the run to export (notebook 04's)
    TARBALL = "sonar_encoder_finetuned.tar.gz"   # written into the runs folder
    TGT_LANGS = ["eng_Latn", "fra_Latn", "deu_Latn", "spa_Latn"]
    N_CLIPS = 3
    DEMO_TGT_LANGS = ["eng_Latn", "fra_Latn"]    # the demo decoder knows these two
    '''),
    *standard_setup(),
    md('''
    ## Build the tarball

    Re-running reuses the tarball when it is newer than the encoder and the test results.
    *If it fails:* **no best_encoder.pt / config.json** — the run has not finished an evaluation yet.
    '''),
    code('''
    import tarfile

    from sonar_ft.export import export_run

    run_dir = P.find_run(P.run_dir(RUN_NAME))
    tarball = P.runs / TARBALL
    test_results = run_dir / "test_results.json"
    if colab.is_up_to_date(tarball, run_dir / "best_encoder.pt", test_results):
        print(f"{tarball} is up to date")
    else:
        export_run(run_dir, tarball, test_results=test_results if test_results.is_file() else None)
    with tarfile.open(tarball) as tar:
        colab.show_table([{"member": m.name, "size": colab.format_size(m.size)} for m in tar.getmembers()])
    print(f"{tarball}: {colab.format_size(tarball.stat().st_size)}")
    '''),
    md('''
    ## Download it

    In Colab the browser downloads the file (allow pop-ups / multiple downloads if asked); elsewhere
    its path is printed. It also stays in the runs folder on Drive.
    '''),
    code('''
    colab.offer_download(tarball)
    '''),
    md('''
    ## Translate test clips from the tarball

    `sonar_ft.export.translate` checks the tarball's members before extracting anything, loads the
    encoder and the decoder recorded with it, and decodes each clip into every language.
    '''),
    code('''
    from sonar_ft.data import read_manifest
    from sonar_ft.export import translate

    langs = DEMO_TGT_LANGS if DEMO else TGT_LANGS
    references = {row.id: row.text for row in read_manifest(P.manifest("test"))}
    clip_ids = list(references)[:N_CLIPS]
    rows = translate(tarball, P.features("test"), langs, ids=clip_ids, device=P.device)
    colab.show_table([{"id": r["id"], "reference": references[r["id"]], **{lang: r[lang] for lang in langs}} for r in rows])
    '''),
    md("Next: `08_hyperparameter_tuning.ipynb` to search for better settings."),
]

# ------------------------------------------------------------------------------------------------
# 08 hyperparameter tuning
# ------------------------------------------------------------------------------------------------
NB08 = [
    md(f'''
    # 8 · Hyperparameter tuning

    {badge("08_hyperparameter_tuning.ipynb")}

    Runs an Optuna study over the fine-tuning settings (`sonar-ft tune`, see `configs/tuning/`):
    each trial is a short training run (few epochs on a fraction of the data) scored on validation
    BLEU; unpromising trials are pruned early. Then shows the optimisation history, which parameters
    mattered, the best parameters, and trains with them (`sonar-ft train-from-tuning`).

    **Expect:** a GPU runtime; each trial costs about `TRIAL_EPOCHS` epochs of notebook 04 on the
    fraction of the training clips the tuning config sets (`subset_fraction`, a quarter by default),
    so a study takes many hours: start small. A study is resumable (it lives in `study.db` in the
    study folder): after a disconnect just run the cell again; `N_TRIALS` is the study's total, not
    "more trials". `DEMO = True`: 2 trials of 1 epoch on a small subset
    of the demo, a couple of minutes on a CPU.
    '''),
    parameters('''
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
    '''),
    *standard_setup(),
    md('''
    ## Run the study

    The study folder (`runs/tuning`) receives `study.db`, `trials.csv`, `study_summary.json`,
    `best_hyperparameters.json`, `best_config.yaml` and `plots/` (HTML and PNG). Running the cell
    again continues the study up to `N_TRIALS`; with all trials done it only rewrites the reports.

    *If it fails:* **"trials in a row failed"** — see `fail_reason` in `trials.csv` (often out of
    memory: narrow the batch sizes in the search space or add memory flags). **Out of memory in one
    trial** — recorded as a failed trial, the study goes on.
    '''),
    code('''
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
    '''),
    md('''
    ## Optimisation history and parameter importances

    The history shows each trial's validation BLEU and the best so far; the importances (fANOVA)
    which settings explained most of the differences — with few trials, treat them as a hint. The
    interactive HTML versions are in `plots/` beside the PNGs.
    '''),
    code('''
    plots = study_dir / "plots"
    shown = [plots / f"{name}.png" for name in ("optimization_history", "param_importances", "intermediate_values")]
    colab.show_images([p for p in shown if p.is_file()])
    missing = [p.stem for p in shown if not p.is_file()]
    if missing:
        print(f"not drawn yet (need more completed trials): {', '.join(missing)}")
    '''),
    md("## Trials and the best parameters"),
    code('''
    import json

    import pandas as pd

    colab.show_table(pd.read_csv(study_dir / "trials.csv"))
    best = json.loads((study_dir / "best_hyperparameters.json").read_text(encoding="utf-8"))
    print(f"best: trial {best['trial']}, {best['metric']} {best['value']:.3f}")
    colab.show_table([{"parameter": k, "value": v} for k, v in best["params"].items()])
    '''),
    md('''
    ## Train with the best parameters

    `sonar-ft train-from-tuning` trains with the study's `best_config.yaml` (all training clips,
    `FINAL_EPOCHS` epochs) into its own run folder — resumable like notebook 04; notebooks 05–07
    work on it with `RUN_NAME = "from_tuning"`.
    '''),
    code('''
    final_dir = P.run_dir(FINAL_RUN_NAME)
    epochs = DEMO_FINAL_EPOCHS if DEMO else FINAL_EPOCHS
    colab.run_command(P.cli_command("train-from-tuning", "--study_dir", study_dir, "--epochs", epochs, "--output_dir", final_dir))

    from sonar_ft.plots import best_epoch, read_history

    final = best_epoch(read_history(final_dir))
    print(f"best epoch {final['epoch']}: val BLEU {final['val_bleu']:.2f} -> {final_dir / 'best_encoder.pt'}" if final else "no evaluation")
    '''),
]

NOTEBOOKS: dict[str, list[dict]] = {
    "01_setup_and_verify_features.ipynb": NB01,
    "02_download_sonar_encoder.ipynb": NB02,
    "03_quick_test.ipynb": NB03,
    "04_finetune.ipynb": NB04,
    "05_monitor_and_predictions.ipynb": NB05,
    "06_test_evaluation.ipynb": NB06,
    "07_export_encoder.ipynb": NB07,
    "08_hyperparameter_tuning.ipynb": NB08,
}
GPU_NOTEBOOKS = {"03_quick_test.ipynb", "04_finetune.ipynb", "06_test_evaluation.ipynb", "08_hyperparameter_tuning.ipynb"}


def build(name: str, cells: list[dict]) -> nbformat.NotebookNode:
    """The notebook ``name``: its cells with stable ids, no outputs, Colab metadata."""
    nb = nbformat.v4.new_notebook()
    stem = name.removesuffix(".ipynb")
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "markdown":
            new = nbformat.v4.new_markdown_cell(cell["source"])
        else:
            new = nbformat.v4.new_code_cell(cell["source"])
            if cell["tags"]:
                new.metadata["tags"] = cell["tags"]
        new["id"] = f"{stem[:2]}-{i:02d}"
        nb.cells.append(new)
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"name": name, "provenance": [], "toc_visible": True},
    }
    if name in GPU_NOTEBOOKS:
        nb.metadata["accelerator"] = "GPU"
        nb.metadata["colab"]["gpuType"] = "T4"
    nbformat.validate(nb)
    return nb


def render(nb: nbformat.NotebookNode) -> str:
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a notebook is out of date")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / name
        text = render(build(name, cells))
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            io.write_text(path, text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/build_notebooks.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
