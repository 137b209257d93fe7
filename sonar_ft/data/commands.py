"""``sonar-ft verify`` and ``sonar-ft manifest how2sign``: the data layer's command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from sonar_ft.data.manifest import how2sign_to_tsv
from sonar_ft.data.verify import verify_dataset
from sonar_ft.files.atomic import write_json
from sonar_ft.files.lock import output_lock
from sonar_ft.files.guards import check_not_folder, check_output_not_input

MAX_LISTED = 10


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``verify`` and ``manifest how2sign`` to the ``sonar-ft`` command."""
    verify = subparsers.add_parser(
        "verify",
        help="check a manifest + feature folder before training",
        description="Read every feature file the manifest names and report what would break training. "
        "Exit code 1 when the set cannot be trained on as is, 0 otherwise (warnings allowed).",
    )
    verify.add_argument("--features", type=Path, required=True, help="feature folder (flat or ssvp_slt nested)")
    verify.add_argument("--manifest", type=Path, required=True, help="manifest TSV or How2Sign CSV")
    verify.add_argument("--feature-dim", "--feature_dim", dest="feature_dim", type=int, default=None,
                        help="the feature dimension D every file must have (e.g. 768)")
    verify.add_argument("--json", type=Path, default=None, help="also write the full report here as JSON")
    verify.add_argument("--epoch", type=int, default=None, help="epoch folder of a nested layout (default: the first)")
    verify.add_argument("--workers", type=int, default=8, help="files read in parallel (default: 8)")
    verify.set_defaults(func=_verify)

    manifest = subparsers.add_parser("manifest", help="build manifests", description="Build manifests.")
    kinds = manifest.add_subparsers(dest="manifest_command", metavar="KIND", required=True)
    how2sign = kinds.add_parser(
        "how2sign",
        help="How2Sign re-aligned CSV -> manifest TSV with frame counts",
        description="Convert How2Sign's re-aligned translation CSV to a manifest TSV, reading each "
        "clip's frame count from its feature file; clips without features are left out and listed.",
    )
    how2sign.add_argument("csv", type=Path, help="How2Sign 'manually re-aligned' CSV (tab-separated)")
    how2sign.add_argument("--features", type=Path, required=True, help="feature folder")
    how2sign.add_argument("--out", type=Path, required=True, help="manifest TSV to write (e.g. manifests/train.tsv)")
    how2sign.add_argument("--epoch", type=int, default=None, help="epoch folder of a nested layout (default: the first)")
    how2sign.set_defaults(func=_how2sign)


def _verify(args: argparse.Namespace) -> int:
    if args.json is not None:
        check_not_folder(args.json, flag="--json", example="verify.json")
        check_output_not_input(args.json, {"--features": args.features, "--manifest": args.manifest}, flag="--json")
    report = verify_dataset(args.features, args.manifest, args.feature_dim, epoch=args.epoch, workers=args.workers)
    print(report.format_table())
    if args.json is not None:
        write_json(args.json, report.to_dict())
        print(f"report written to {args.json}")
    return 0 if report.ok else 1


def _how2sign(args: argparse.Namespace) -> int:
    check_not_folder(args.out, example="train.tsv")
    check_output_not_input(args.out, {"the CSV argument": args.csv, "--features": args.features})
    with output_lock(args.out, folder=False, command="sonar-ft manifest how2sign"):
        report = how2sign_to_tsv(args.csv, args.features, args.out, epoch=args.epoch)
    print(f"rows read:        {report['rows']}")
    print(f"rows written:     {report['written']} -> {report['out']}")
    for key, label in (("missing", "missing features"), ("unreadable", "unreadable files")):
        ids = list(report[key])
        print(f"{label + ':':<18}{len(ids)}")
        for clip_id in ids[:MAX_LISTED]:
            reason = f"  ({report[key][clip_id]})" if key == "unreadable" else ""
            print(f"  {clip_id}{reason}")
        if len(ids) > MAX_LISTED:
            print(f"  ... and {len(ids) - MAX_LISTED} more")
    return 0
