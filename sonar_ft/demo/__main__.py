"""``make demo``: the whole project on the built-in offline demo, as a user would run it.

build demo assets (cached; the starting encoder is pretrained by the recipe on a shifted source
domain, "other signers", see ``sonar_ft.demo.build.SourceDomain``) → ``sonar-ft verify`` → the Colab quick test (50 clips, 5 epochs) →
score the starting encoder on the test split → fine-tune on the whole demo train split →
``--eval_only`` of the best encoder on the test split → plots → export tarball → translate a few
test clips into English and French → video in, text out: a few synthetic videos through
``sonar-ft extract`` and ``sonar-ft translate --video`` with a small random-weight SignHiera (the text is
meaningless; the step exercises the whole path videos → features → fine-tuned encoder → decoder).
Each training/evaluation step runs the real recipe (``train_sonar_finetuning.py``) in a subprocess with
the flags a user would type, and the video step the ``sonar-ft`` commands; the command lines are printed.
Everything goes under ``DEMO_DIR`` (default ``demo_runs/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from sonar_ft.cli import setup_logging
from sonar_ft.config import command_line
from sonar_ft.run_files import BEST_ENCODER, CONFIG_FILE, TEST_RESULTS
from sonar_ft.demo.build import DemoConfig, build_demo
from sonar_ft.demo.paths import DemoPaths

RECIPE = Path(__file__).resolve().parents[2] / "train_sonar_finetuning.py"

# The demo fine-tuning run: enough epochs for the tiny encoder to learn the grammar. The
# distillation term (towards the demo text encoder's embedding) keeps the embedding in the shared
# multilingual space, so French decoding works too.
FINETUNE_FLAGS = ["--batch_size", "16", "--epochs", "12", "--learning_rate", "1e-3", "--eval_every", "2", "--beam_size", "4"]
# The Colab seed's quick test, unchanged but for the paths and the device.
QUICK_FLAGS = ["--batch_size", "8", "--epochs", "5", "--learning_rate", "1e-4", "--freeze_decoder", "--eval_every", "1", "--max_samples", "50"]
# The demo owns its run folders: each `make demo` trains afresh, so results always match the code.
FRESH = ["--overwrite"]


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def _run(cmd: list[str]) -> None:
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ, TQDM_DISABLE=os.environ.get("TQDM_DISABLE", "1"), PYTHONUNBUFFERED="1")
    completed = subprocess.run(cmd, env=env)
    if completed.returncode != 0:
        sys.exit(f"demo step failed (exit code {completed.returncode}): {' '.join(cmd[:3])} ...")


def sonar_ft_command(*args: str | Path) -> list[str]:
    """The ``sonar-ft`` command with ``args``, run by this Python (``python -m sonar_ft.cli``)."""
    return [sys.executable, "-m", "sonar_ft.cli", *[str(a) for a in args]]


def recipe_command(paths: DemoPaths, output_dir: Path, flags: list[str], *, split: str = "val", encoder: Path | None = None) -> list[str]:
    """The recipe's command line on the demo data (``split`` is the evaluation split)."""
    settings = {**paths.recipe_settings(output_dir, split=split, encoder=encoder), "device": "cpu"}
    return [sys.executable, str(RECIPE), *command_line(settings), *flags]


def run_demo(root: Path, cfg: DemoConfig = DemoConfig()) -> dict:
    """Run every step on the demo ``cfg`` (``make demo``: the defaults); return the summary also written to ``DEMO_DIR/demo_summary.json``."""
    started = time.perf_counter()
    from sonar_ft.data import verify_dataset
    from sonar_ft.export.pack import export_run
    from sonar_ft.inference.translate import translate
    from sonar_ft.files.atomic import write_json
    from sonar_ft.plots import plot_history

    _banner("1/9 building the offline demo assets (cached after the first run)")
    paths = build_demo(root, cfg)
    print(f"demo data and models in {paths.root}")

    _banner("2/9 sonar-ft verify: checking features against manifests")
    for split in ("train", "val", "test"):
        report = verify_dataset(paths.split_features(split), paths.split_manifest(split), feature_dim=cfg.feature_dim, progress=False)
        print(f"[{split}]")
        print(report.format_table())
        if not report.ok:
            sys.exit(f"demo data for {split} failed verification")

    _banner("3/9 quick test: the Colab command (50 clips, 5 epochs), shows the flow")
    _run(recipe_command(paths, root / "quick_test", QUICK_FLAGS + FRESH))

    _banner("4/9 the starting encoder (pretrained on the source domain) on the target test split, zero-shot")
    _run(recipe_command(paths, root / "baseline_evaluation", ["--eval_only", "--beam_size", "4"], split="test"))

    _banner("5/9 fine-tuning on the whole demo train split")
    distill = ["--text_encoder", str(paths.text_encoder_card), "--distill_weight", "1.0"]
    _run(recipe_command(paths, root / "finetune", FINETUNE_FLAGS + distill + FRESH))

    _banner("6/9 --eval_only: the best fine-tuned encoder on the held-out test split")
    best = root / "finetune" / BEST_ENCODER
    _run(recipe_command(paths, root / "test_evaluation", ["--eval_only", "--beam_size", "4"], split="test", encoder=best))

    _banner("7/9 plots and export")
    plots = plot_history(root / "finetune", root / "plots", title="demo fine-tuning")
    print("plots: " + ", ".join(str(p) for p in plots.values()))
    tarball = export_run(root / "finetune", root / "sonar_encoder_finetuned.tar.gz", test_results=root / "test_evaluation" / TEST_RESULTS)
    print(f"exported: {tarball}")

    _banner("8/9 translating test clips from the tarball into English and French")
    test_ids = [line.split("\t")[0] for line in paths.split_manifest("test").read_text(encoding="utf-8").splitlines()[1:4]]
    rows = translate(tarball, paths.split_features("test"), ["eng_Latn", "fra_Latn"], ids=test_ids, beam_size=4, device="cpu")
    refs = {line.split("\t")[0]: line.split("\t")[-1] for line in paths.split_manifest("test").read_text(encoding="utf-8").splitlines()[1:]}
    for row in rows:
        print(f"{row['id']}\n  reference: {refs[row['id']]}\n  eng_Latn:  {row['eng_Latn']}\n  fra_Latn:  {row['fra_Latn']}")

    _banner("9/9 video in, text out: synthetic videos -> sonar-ft extract / translate --video")
    video = video_step(paths, tarball, cfg.feature_dim)

    before = json.loads((root / "baseline_evaluation" / TEST_RESULTS).read_text())
    after = json.loads((root / "test_evaluation" / TEST_RESULTS).read_text())
    quick = json.loads((root / "quick_test" / CONFIG_FILE).read_text())
    summary = {
        "test_bleu_before": before["bleu"],
        "test_bleu_after": after["bleu"],
        "test_chrf_before": before["chrf"],
        "test_chrf_after": after["chrf"],
        "test_clips": after["num_samples"],
        "bleu_signature": after["bleu_signature"],
        "quick_test_epochs": quick["settings"]["epochs"],
        "seconds": round(time.perf_counter() - started, 1),
        "translations": rows,
        **video,
    }
    write_json(root / "demo_summary.json", summary)
    _banner("demo finished")
    print(f"test BLEU before fine-tuning {before['bleu']:.1f} -> after {after['bleu']:.1f} "
          f"(chrF {before['chrf']:.1f} -> {after['chrf']:.1f}) on {after['num_samples']} held-out clips")
    print(f"""everything is under {root}/:
  data/ (features, manifests)   assets/ (demo decoder, tokenizer, starting encoder)
  quick_test/   finetune/ (metrics_epoch*.json, predictions_epoch*.json, best_encoder.pt, last.pt, config.json)
  baseline_evaluation/ and test_evaluation/test_results.json
  plots/loss.png plots/bleu.png   sonar_encoder_finetuned.tar.gz   demo_summary.json
  videos/ (synthetic .mp4)   video_features/ (extract_report.jsonl)   video_translations.json
took {summary['seconds']:.0f} s""")
    return summary


def video_step(paths: DemoPaths, encoder: Path, feature_dim: int) -> dict:
    """Videos to text with the user's two commands: ``sonar-ft extract``, then ``sonar-ft translate --video``.

    The SignHiera has random weights (the official one is a 51M-parameter, CC-BY-NC download) and
    ``feature_dim`` outputs, the demo encoder's input width, so the path runs end to end offline.
    Returns the summary's video entries.
    """
    from sonar_ft.demo.videos import render_demo_videos, save_random_signhiera
    from sonar_ft.inference.extract import read_report

    started = time.perf_counter()
    videos = render_demo_videos(paths.videos)
    signhiera = save_random_signhiera(paths.random_signhiera, feature_dim)
    features = paths.video_features
    # Fresh every run, like the training steps: a folder extracted by another SignHiera is refused.
    shutil.rmtree(features, ignore_errors=True)
    _run(sonar_ft_command("extract", *videos, "--signhiera", signhiera, "--out", features,
                          "--crop", "center", "--device", "cpu"))
    out = paths.video_translations
    _run(sonar_ft_command("translate", "--video", *videos, "--encoder", encoder, "--signhiera", signhiera,
                          "--crop", "center", "--tgt_langs", "eng_Latn", "--beam_size", "4", "--device", "cpu",
                          "--out", out))
    report = read_report(features)
    rows = json.loads(out.read_text(encoding="utf-8"))
    print("The SignHiera above has random weights, so these sentences are meaningless: this step only shows the\n"
          "whole path running (videos -> features -> fine-tuned encoder -> decoder). With the official SignHiera\n"
          "(sonar-ft download signhiera) and an encoder fine-tuned on its features, the same two commands translate signing.")
    for row in rows:
        entry = report[row["id"]]
        print(f"{row['id']} ({entry['video_seconds']:g} s, {entry['windows']} window(s), "
              f"{entry['vectors']} feature rows) -> {row['eng_Latn']}")
    return {
        "video_clips": len(videos),
        "video_windows": sum(e["windows"] for e in report.values()),
        "video_feature_rows": sum(e["vectors"] for e in report.values()),
        "video_translations": rows,
        "video_step_seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sonar_ft.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default=os.environ.get("DEMO_DIR", "demo_runs"), help="where everything goes (env DEMO_DIR)")
    args = parser.parse_args(argv)
    setup_logging(sys.stdout)
    run_demo(Path(args.demo_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
