#!/usr/bin/env python
"""What the median pruner saves on the demo study, measured side by side in one run.

Runs the demo study (``configs/tuning/demo.yaml``: same search space, sampler seed, trial count and
epochs per trial) twice on the offline demo: once with ``pruner: none`` and once with the study's
median pruner. Reports, for each, the trial-epochs trained, the fraction of the no-pruning budget
(``n_trials x epochs``) they saved, wall time, and the best validation value each study reached.

    python benchmarks/bench_pruner.py [--demo_dir demo_runs] [--n_trials 12] [--seeds 0 1]

Caveat printed with the numbers: after the first pruned trial the two studies may sample different
points (TPE learns from pruned trials too, as "bad" ones), so "best value" compares two searches with
the same size and seed; how many trials got the same parameters in both is reported.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sonar_ft.demo.build import build_demo  # noqa: E402
from sonar_ft.files.atomic import write_json  # noqa: E402
from sonar_ft.tune.settings import load_settings  # noqa: E402
from sonar_ft.tune.study import run_study  # noqa: E402
from sonar_ft.tune.report import trial_epochs  # noqa: E402


def run_variant(config: Path, demo: Path, out: Path, *, pruner: str | None, seed: int, n_trials: int | None) -> dict:
    overrides = {
        "output_dir": str(out),
        "encoder_checkpoint": str(demo / "assets" / "sonar_encoder_demo.pth"),
        "decoder": str(demo / "assets" / "text_decoder.yaml"),
        "text_encoder": str(demo / "assets" / "text_encoder.yaml"),
        "train_features": str(demo / "data" / "features" / "train"),
        "train_manifest": str(demo / "data" / "manifests" / "train.tsv"),
        "val_features": str(demo / "data" / "features" / "val"),
        "val_manifest": str(demo / "data" / "manifests" / "val.tsv"),
        "sampler_seed": seed,
        "plots": False,
    }
    if pruner:
        overrides["pruner"] = pruner
    if n_trials:
        overrides["n_trials"] = n_trials
    settings = load_settings(config, overrides)
    started = time.perf_counter()
    report = run_study(settings, progress=False)
    seconds = time.perf_counter() - started
    import optuna

    study = optuna.load_study(study_name=settings.study_name, storage=f"sqlite:///{(out / 'study.db').resolve()}")
    trials = study.get_trials()
    epochs = trial_epochs(trials, settings.train.epochs)
    return {
        "pruner": settings.pruner,
        "seed": seed,
        "n_trials": settings.n_trials,
        "epochs_per_trial": settings.train.epochs,
        "trials": report.counts,
        "trial_epochs": epochs["run"],
        "trial_epochs_without_pruning": epochs["without_pruning"],
        "saved_fraction_of_budget": epochs["saved_fraction"],
        "best_value": report.best_value,
        "best_trial": report.best_trial,
        "metric": f"val_{settings.optimize}",
        "seconds": round(seconds, 1),
        "params": [t.params for t in trials],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "configs" / "tuning" / "demo.yaml"))
    p.add_argument("--demo_dir", default=str(REPO / "demo_runs"))
    p.add_argument("--out", default=str(REPO / "runs" / "bench_pruner"))
    p.add_argument("--n_trials", type=int, help="trials per study (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampler seeds; each runs both variants")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)

    demo = build_demo(args.demo_dir).root
    out = Path(args.out)
    results = []
    for seed in args.seeds:
        for name, pruner in (("none", "none"), ("median", None)):  # None: the config's median pruner
            folder = out / f"seed{seed}_{name}"
            if folder.exists():
                sys.exit(f"{folder} exists: remove it (or pass another --out) so both studies start empty")
            print(f"\n=== seed {seed}: pruner {name} ===", flush=True)
            results.append(run_variant(Path(args.config), demo, folder, pruner=pruner, seed=seed, n_trials=args.n_trials))

    print("\nseed | pruner | trials (complete/pruned/failed) | trial-epochs | saved vs budget | best | time")
    for r in results:
        t = r["trials"]
        print(f"{r['seed']:>4} | {r['pruner']['type']:>6} | {t['complete']}/{t['pruned']}/{t['fail']:<25} | "
              f"{r['trial_epochs']:>4}/{r['trial_epochs_without_pruning']:<4} | {r['saved_fraction_of_budget']:>14.1%} | "
              f"{r['metric']} {r['best_value']:.2f} | {r['seconds']:.0f}s")
    pairs = []
    for seed in args.seeds:
        none, median = (r for r in results if r["seed"] == seed)
        same = sum(a == b for a, b in zip(none["params"], median["params"]))
        pairs.append({
            "seed": seed,
            "trials_with_same_params": same,
            "trial_epochs_ratio_median_over_none": median["trial_epochs"] / none["trial_epochs"],
            "time_ratio_median_over_none": median["seconds"] / none["seconds"],
            "best_none": none["best_value"],
            "best_median": median["best_value"],
        })
        print(f"seed {seed}: the median pruner trained {pairs[-1]['trial_epochs_ratio_median_over_none']:.2f}x the trial-epochs "
              f"and took {pairs[-1]['time_ratio_median_over_none']:.2f}x the time of the unpruned study; best "
              f"{none['metric']} {none['best_value']:.2f} (none) vs {median['best_value']:.2f} (median); "
              f"{same}/{len(none['params'])} trials sampled the same parameters in both")
    if len(pairs) > 1:
        mean = sum(p["trial_epochs_ratio_median_over_none"] for p in pairs) / len(pairs)
        wins = sum(p["best_median"] >= p["best_none"] for p in pairs) if results[0]["metric"] == "val_bleu" else \
            sum(p["best_median"] <= p["best_none"] for p in pairs)
        print(f"over {len(pairs)} seeds: the median pruner trained {mean:.2f}x the trial-epochs on average; its best was at "
              f"least as good in {wins}/{len(pairs)} seeds")
    print("note: once a trial is pruned the two studies may sample different points (TPE learns from pruned trials),\n"
          "so the best values compare two searches of the same size and seed, not necessarily the same trials.")
    write_json(out / "bench_pruner.json", {"results": results, "pairs": pairs})
    summary = {"config": args.config, "seeds": args.seeds, "pairs": pairs,
               "results": [{k: v for k, v in r.items() if k != "params"} for r in results]}
    write_json(REPO / "benchmarks" / "out" / "pruner.json", summary)  # beside the other benchmarks' figures
    print(f"written: {out / 'bench_pruner.json'} and benchmarks/out/pruner.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
