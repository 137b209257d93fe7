"""``sonar-ft verify``, ``pack``, ``unpack`` and ``manifest how2sign``: the data layer's command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from sonar_ft.data.features import FeatureStore
from sonar_ft.data.manifest import how2sign_to_tsv
from sonar_ft.data.pack import PACK_DTYPES, localize_features, pack_features
from sonar_ft.data.verify import failed_report, reusable_report, verify_dataset, verify_fingerprint
from sonar_ft.errors import SonarFtError
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
        "Exit code 0: the set can be trained on (warnings allowed); 1: it cannot as is; 2: the check could not run "
        "(the --json report then says why, with ok false).",
    )
    verify.add_argument("--features", type=Path, required=True, help="feature folder (flat or ssvp_slt nested)")
    verify.add_argument("--manifest", type=Path, required=True, help="manifest TSV or How2Sign CSV")
    verify.add_argument("--feature-dim", "--feature_dim", dest="feature_dim", type=int, default=None,
                        help="the feature dimension D every file must have (e.g. 768)")
    verify.add_argument("--json", type=Path, default=None, help="also write the full report here as JSON")
    verify.add_argument("--epoch", type=int, default=None, help="epoch folder of a nested layout (default: the first)")
    verify.add_argument("--workers", type=int, default=8, help="files read in parallel (default: 8)")
    verify.add_argument("--reuse", action="store_true",
                        help="keep the --json report when the manifest and every feature file are unchanged (same sizes "
                        "and modification times) since it was written, instead of reading every file again")
    verify.set_defaults(func=_verify)

    pack = subparsers.add_parser(
        "pack", help="a feature folder -> one archive with sizes and checksums (copy it to Drive once)",
        description="Write every feature file of a folder (flat or nested) into one uncompressed .tar with an index of "
        "sizes and SHA-256 checksums, atomically. One file travels to and from Google Drive far faster than 31k.")
    pack.add_argument("--features", type=Path, required=True, help="feature folder")
    pack.add_argument("--out", type=Path, required=True, help="archive to write (e.g. features_train.tar)")
    pack.add_argument("--dtype", choices=list(PACK_DTYPES), default=None,
                      help="store every file as <stem>.npy of this dtype (a .pt becomes .npy). fp16 halves a float32 "
                      "archive; each value then differs from the original by at most ~5e-4 relative (float16 keeps "
                      "11 significant bits: 2^-11 = 4.9e-4; below 6e-5 in magnitude, at most 3e-8 absolute), and a "
                      "file holding NaN, Inf or values beyond +-65504 stops the pack (leave --dtype out for it). "
                      "Training, verify and embed read such files as float32, like every feature file. "
                      "Default: every file kept as it is, byte for byte")
    pack.set_defaults(func=_pack)

    unpack = subparsers.add_parser(
        "unpack", help="an archive (or a folder) -> a checked copy on local disk, once per runtime",
        description="Copy features to a local folder and check every file (size and checksum for a `sonar-ft pack` "
        "archive, size for a folder). A folder already holding a checked copy of the same source is kept as is.")
    unpack.add_argument("--source", type=Path, required=True, help="archive from `sonar-ft pack`, or a feature folder")
    unpack.add_argument("--out", type=Path, required=True, help="local folder for the copy (e.g. /content/features/train)")
    unpack.set_defaults(func=_unpack)

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
    try:
        store = FeatureStore.open(args.features, epoch=args.epoch)  # indexed once, for the fingerprint and the check
        fingerprint = verify_fingerprint(store, args.manifest, args.feature_dim)
        if args.reuse and args.json is not None and (old := reusable_report(args.json, fingerprint)) is not None:
            write_json(args.json, old)  # rewritten: its time says it was confirmed now
            print(f"{args.manifest} and {old['counts']['feature_files']} feature files unchanged since {args.json} was "
                  f"written: reusing it (result: {'OK' if old['ok'] else 'NOT OK'}; drop --reuse to read every file again)")
            return 0 if old["ok"] else 1
        report = verify_dataset(store, args.manifest, args.feature_dim, workers=args.workers)
    except SonarFtError as exc:
        if args.json is not None:  # a report that says so: an older one must never pass for this check's result
            write_json(args.json, failed_report(args.features, args.manifest, args.feature_dim, str(exc)))
        raise
    print(report.format_table())
    if args.json is not None:
        write_json(args.json, {**report.to_dict(), "fingerprint": fingerprint})
        print(f"report written to {args.json}")
    return 0 if report.ok else 1


def _pack(args: argparse.Namespace) -> int:
    check_not_folder(args.out, example="features_train.tar")
    report = pack_features(args.features, args.out, dtype=args.dtype)
    stored = f" (stored as {report.dtype})" if report.dtype else ""
    print(f"{report.archive}: {report.files} files{stored}, {report.total_bytes / 1e9:.2f} GB, in {report.seconds:.0f} s")
    return 0


def _unpack(args: argparse.Namespace) -> int:
    report = localize_features(args.source, args.out)
    what = "copied and checked" if report.copied else "already there (checked copy of the same source)"
    stored = f" (stored as {report.dtype}, read as float32)" if report.dtype else ""
    print(f"{report.dest}: {report.files} feature files{stored}, {report.total_bytes / 1e9:.2f} GB, {what} in "
          f"{report.seconds:.0f} s")
    return 0


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
