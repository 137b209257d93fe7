"""Package a fine-tuned encoder as a tarball, load it back safely, and translate with it.

``sonar-ft export --run_dir DIR --out sonar_encoder_finetuned.tar.gz`` packs ``best_encoder.pt``,
``config.json``, ``tokenizer.json``, the final metrics and a model card (``README.md``).
``sonar-ft translate --encoder TARBALL_OR_CKPT --features ... --tgt_langs eng_Latn,fra_Latn``
loads it back (members are checked before anything is extracted) and decodes each clip into every
requested language — SONAR's decoder speaks 200 of them.
"""

from __future__ import annotations

import argparse
import json
import logging
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from sonar_ft import io
from sonar_ft.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

ENCODER_FILE = "best_encoder.pt"
REQUIRED_MEMBERS = (ENCODER_FILE, "config.json", "tokenizer.json", "README.md")
OPTIONAL_MEMBERS = ("metrics.json", "test_results.json")
ALLOWED_MEMBERS = frozenset(REQUIRED_MEMBERS + OPTIONAL_MEMBERS)
MAX_MEMBER_BYTES = 16 * 1024**3  # no real encoder is larger; refuses decompression bombs
# A real export has at most len(ALLOWED_MEMBERS) members: counted while reading headers, so a small
# tarball with 200,000 members is refused after a few headers instead of extracted for minutes.
MAX_MEMBERS = 16
MAX_TOTAL_BYTES = 32 * 1024**3


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def _latest_metrics(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted(run_dir.glob("metrics_epoch*.json"), key=lambda p: int(p.stem.removeprefix("metrics_epoch") or 0))
    out = []
    for f in files:
        try:
            out.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            log.warning("skipping unreadable %s", f)
    return out


def model_card(config: dict[str, Any], tokenizer: dict[str, Any], history: list[dict[str, Any]], test: dict[str, Any] | None) -> str:
    """A short README: what the model is, how it was trained, its scores and how to load it."""
    s = config.get("settings", {})
    arch = config.get("encoder_architecture", {})
    evaluated = [h for h in history if h.get("val_bleu") is not None]
    best = max(evaluated, key=lambda h: h["val_bleu"]) if evaluated else None
    lines = [
        "# Fine-tuned SONAR ASL encoder",
        "",
        "A SignT5 SONAR encoder (ssvp_slt `SignT5SonarEncoder` checkpoint layout, weights under `student`) that maps",
        "SignHiera video features `(T, D)` to a SONAR sentence embedding, fine-tuned with token cross-entropy",
        "through the frozen SONAR text decoder (only the encoder was trained).",
        "",
        "## Architecture",
        f"d_model {arch.get('d_model')}, {arch.get('num_encoder_layers')}+{arch.get('num_decoder_layers')} layers, "
        f"{arch.get('num_heads')} heads, feature dim {arch.get('feature_dim')}, embedding dim {arch.get('output_dim')}.",
        "",
        "## Training",
        f"- started from: `{s.get('encoder_checkpoint')}`",
        f"- data: `{s.get('train_manifest')}` (validation `{s.get('val_manifest')}`)",
        f"- decoder: `{tokenizer.get('decoder')}`, target language `{tokenizer.get('tgt_lang')}`",
        f"- epochs {s.get('epochs')}, batch {s.get('batch_size')} x accumulation {s.get('grad_accum')}, "
        f"learning rate {s.get('learning_rate')}, weight decay {s.get('weight_decay')}, label smoothing {s.get('label_smoothing')}",
        "",
        "## Scores",
    ]
    if best:
        lines.append(f"- best validation epoch {best['epoch']}: BLEU {best['val_bleu']:.2f}, chrF {best['val_chrf']:.2f}, loss {best['val_loss']:.4f}")
    if test:
        lines.append(f"- test: BLEU {test.get('bleu', 0):.2f}, chrF {test.get('chrf', 0):.2f} on {test.get('num_samples')} clips")
        lines.append(f"- `{test.get('bleu_signature', '')}`")
    if not best and not test:
        lines.append("- no evaluation recorded")
    lines += [
        "",
        "## Use",
        "```bash",
        "sonar-ft translate --encoder sonar_encoder_finetuned.tar.gz --features FEATURES_DIR --tgt_langs eng_Latn,fra_Latn",
        "python train_sonar_finetuning.py --eval_only --encoder_checkpoint best_encoder.pt --val_features ... --val_manifest ...",
        "```",
        "```python",
        "from sonar_ft.encoder import load_encoder",
        "encoder, config = load_encoder('best_encoder.pt')  # features (B,T,D), mask (B,T) -> (B, 1024)",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_run(run_dir: str | Path, out: str | Path, *, test_results: str | Path | None = None) -> Path:
    """Pack a run folder's best encoder, records and a model card into ``out`` (.tar.gz), atomically."""
    run_dir, out = Path(run_dir), Path(out)
    needed = [run_dir / ENCODER_FILE, run_dir / "config.json", run_dir / "tokenizer.json"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(
            f"--run_dir {run_dir} has no {', '.join(missing)}: export needs a finished training run "
            "(train with train_sonar_finetuning.py first)"
        )
    check_export_paths(run_dir, out, needed, test_results)
    config = _read_record(run_dir / "config.json")
    tokenizer = _read_record(run_dir / "tokenizer.json")
    history = _latest_metrics(run_dir)
    test_path = Path(test_results) if test_results else run_dir / "test_results.json"
    test = _read_record(test_path) if test_path.is_file() else None
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        io.write_text(staged / "README.md", model_card(config, tokenizer, history, test))
        io.write_json(staged / "metrics.json", history)
        if test:
            summary = {k: v for k, v in test.items() if k != "samples"}
            io.write_json(staged / "test_results.json", summary)
        with io.atomic_path(out) as tmp_out:
            with tarfile.open(tmp_out, "w:gz") as tar:
                for p in needed:
                    tar.add(p, arcname=p.name, recursive=False)
                for name in ("README.md", "metrics.json", "test_results.json"):
                    if (staged / name).exists():
                        tar.add(staged / name, arcname=name, recursive=False)
    return out


def check_export_paths(run_dir: Path, out: Path, needed: list[Path], test_results: str | Path | None) -> None:
    """Refuse an --out that is a folder or would replace one of the run's files, and a missing --test_results."""
    from sonar_ft.paths import check_not_folder, check_not_run_record, check_output_not_input

    check_not_folder(out, example="sonar_encoder_finetuned.tar.gz")
    check_not_run_record(out)
    check_output_not_input(out, [("--run_dir's", p) for p in needed] + [("--test_results", test_results)])
    if test_results and not Path(test_results).is_file():
        raise ConfigError(f"--test_results {test_results} not found; give the test_results.json written by --eval_only, or leave it out")


def _read_record(path: Path) -> dict[str, Any]:
    """A JSON record of a run (config.json...), with an error naming it when it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read {path}: {exc}. The run's records are damaged; re-run training into this folder (or "
            "evaluate again for test_results.json) before exporting"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object; the run's records are damaged")
    return data


# ------------------------------------------------------------------------------------------------
# Safe loading
# ------------------------------------------------------------------------------------------------
def check_members(tar: tarfile.TarFile, source: Path) -> list[tarfile.TarInfo]:
    """Refuse absolute paths, ``..``, links, devices, unexpected names and oversized members."""
    members = read_members(tar, source)
    for m in members:
        name = m.name
        if name.startswith("/") or ".." in Path(name).parts or "/" in name.strip("./"):
            raise CheckpointError(f"{source}: refusing member {name!r} (absolute path, '..' or a folder): not a sonar-ft export")
        if not m.isfile():
            raise CheckpointError(f"{source}: refusing member {name!r} (links, devices and folders are not allowed)")
        if Path(name).name not in ALLOWED_MEMBERS:
            raise CheckpointError(f"{source}: unexpected member {name!r}; a sonar-ft export holds only {', '.join(sorted(ALLOWED_MEMBERS))}")
        if m.size > MAX_MEMBER_BYTES:
            raise CheckpointError(f"{source}: member {name!r} is implausibly large ({m.size} bytes)")
    names = {Path(m.name).name for m in members}
    missing = [n for n in REQUIRED_MEMBERS if n not in names]
    if missing:
        raise CheckpointError(f"{source}: not a complete sonar-ft export (missing {', '.join(missing)})")
    return members


def read_members(tar: tarfile.TarFile, source: Path) -> list[tarfile.TarInfo]:
    """The members of ``tar``, read header by header: more than :data:`MAX_MEMBERS`, a name twice, or a total
    size above :data:`MAX_TOTAL_BYTES` is refused before any more headers are read or anything is extracted."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    for m in tar:
        members.append(m)
        if len(members) > MAX_MEMBERS:
            raise CheckpointError(
                f"{source}: more than {MAX_MEMBERS} members; a sonar-ft export holds at most {len(ALLOWED_MEMBERS)} "
                "files. Refusing it before extracting anything: it is not a sonar-ft export (export it again)"
            )
        if m.name in seen:
            raise CheckpointError(f"{source}: member {m.name!r} appears twice; not a sonar-ft export (export it again)")
        seen.add(m.name)
        total += max(m.size, 0)
        if total > MAX_TOTAL_BYTES:
            raise CheckpointError(
                f"{source}: its members add up to more than {MAX_TOTAL_BYTES:,} bytes; refusing to extract it"
            )
    return members


def open_export(path: str | Path, into: str | Path) -> dict[str, Path]:
    """Check and extract an export tarball into ``into``; return member name → path."""
    path, into = Path(path), Path(into)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = check_members(tar, path)
            into.mkdir(parents=True, exist_ok=True)
            out = {}
            for m in members:
                target = into / Path(m.name).name
                src = tar.extractfile(m)
                if src is None:
                    raise CheckpointError(f"{path}: cannot read member {m.name!r}")
                with src, io.atomic_path(target) as tmp, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                out[target.name] = target
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read export {path}: {exc}. The file may be truncated; export it again.") from None
    return out


# ------------------------------------------------------------------------------------------------
# Translate
# ------------------------------------------------------------------------------------------------
def translate(
    encoder: str | Path,
    features: str | Path,
    tgt_langs: list[str],
    *,
    decoder: str | None = None,
    tokenizer: str | None = None,
    ids: list[str] | None = None,
    beam_size: int = 5,
    max_gen_len: int = 128,
    batch_size: int = 16,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Translate feature clips with an exported (or plain checkpoint) encoder into each language.

    Returns one ``{"id": ..., "eng_Latn": text, ...}`` per clip. The decoder defaults to the one the
    encoder was trained with (recorded in the export's ``tokenizer.json``).
    """
    import torch

    from sonar_ft.data import FeatureStore, load_feature_file
    from sonar_ft.decoder import FrozenTextDecoder
    from sonar_ft.embed import embed_features
    from sonar_ft.encoder import load_encoder
    from sonar_ft.train import resolve_device

    dev = resolve_device(device)
    encoder = Path(encoder)
    with tempfile.TemporaryDirectory() as tmp:
        if encoder.suffixes[-2:] == [".tar", ".gz"] or encoder.suffix in (".tgz", ".tar"):
            files = open_export(encoder, tmp)
            record = json.loads(files["tokenizer.json"].read_text(encoding="utf-8"))
            decoder = decoder or record.get("decoder")
            tokenizer = tokenizer or record.get("tokenizer")
            model, _ = load_encoder(files[ENCODER_FILE], device=dev)
        else:
            model, _ = load_encoder(encoder, device=dev)
    dec = FrozenTextDecoder.load(decoder or "text_sonar_basic_decoder", tokenizer, device=dev)
    for lang in tgt_langs:
        dec.check_lang(lang)
    features = Path(features)
    if features.is_file():
        clip_ids, clips = [features.stem], [load_feature_file(features)]
    else:
        store = FeatureStore.open(features)
        clip_ids = list(ids) if ids else store.ids()
        unknown = [i for i in clip_ids if store.path(i) is None]
        if unknown:
            raise DataError(f"no feature file for {', '.join(unknown[:5])} in {features}")
        clips = [store.load(i) for i in clip_ids]
    _check_clips(clip_ids, clips, model.config.feature_dim, features)
    emb = embed_features(model, clips, batch_size=batch_size, device=dev)
    rows: list[dict[str, Any]] = [{"id": i} for i in clip_ids]
    for lang in tgt_langs:
        texts = dec.generate(emb.to(dev), lang, beam_size=beam_size, max_gen_len=max_gen_len, batch_size=batch_size)
        for row, text in zip(rows, texts):
            row[lang] = text
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return rows


def _check_clips(clip_ids: list[str], clips: list[Any], feature_dim: int, source: Path) -> None:
    """Refuse clips the encoder cannot embed, naming each (zero frames, wrong dimension, NaN / Inf)."""
    import torch

    problems = []
    for clip_id, clip in zip(clip_ids, clips):
        if clip.shape[0] == 0:
            problems.append(f"{clip_id}: has zero frames")
        elif clip.shape[1] != feature_dim:
            problems.append(f"{clip_id}: has {clip.shape[1]} features per frame but the encoder expects {feature_dim}")
        elif not torch.isfinite(clip).all():
            problems.append(f"{clip_id}: contains NaN or Inf values")
    if problems:
        listed = "; ".join(problems[:10]) + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(
            f"{len(problems)} clip(s) in {source} cannot be translated ({listed}). Re-extract them, or pass --ids "
            "with the clips to translate (`sonar-ft verify` lists every bad clip)"
        )


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    from sonar_ft.lock import output_lock

    out = Path(args.out)
    if out.is_dir():  # before the lock, which would put its file inside the folder
        raise ConfigError(f"--out {out} is a folder; give the tarball to write, e.g. {out / 'sonar_encoder_finetuned.tar.gz'}")
    with output_lock(out, folder=False, command="sonar-ft export"):
        out = export_run(args.run_dir, out, test_results=args.test_results)
    with tarfile.open(out) as tar:
        names = tar.getnames()
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {', '.join(names)}")
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    langs = [x.strip() for x in args.tgt_langs.split(",") if x.strip()]
    if not langs:
        raise ConfigError("--tgt_langs needs at least one language code, e.g. eng_Latn,fra_Latn")
    ids = [x for x in args.ids.split(",") if x] if args.ids else None
    for flag, value in (("--batch_size", args.batch_size), ("--limit", args.limit), ("--beam_size", args.beam_size),
                        ("--max_gen_len", args.max_gen_len)):
        if value is not None and value < 1:
            hint = "; leave --limit out to print every clip" if flag == "--limit" else ""
            raise ConfigError(f"{flag} must be at least 1 (got {value}){hint}")
    if args.out:
        from sonar_ft.paths import check_not_folder, check_output_not_input

        check_not_folder(args.out, example="translations.json")
        check_output_not_input(args.out, {"--encoder": args.encoder, "--features": args.features})
    rows = translate(
        args.encoder, args.features, langs, decoder=args.decoder, tokenizer=args.tokenizer, ids=ids,
        beam_size=args.beam_size, max_gen_len=args.max_gen_len, batch_size=args.batch_size, device=args.device,
    )
    if args.limit is not None:
        rows = rows[: args.limit]
    for row in rows:
        print(row["id"])
        for lang in langs:
            print(f"  {lang}: {row[lang]}")
    if args.out:
        io.write_json(args.out, rows)
        print(f"wrote {args.out}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="pack a run's best encoder + records + model card as a tarball")
    p.add_argument("--run_dir", "--run-dir", required=True, help="output folder of a training run")
    p.add_argument("--out", default="sonar_encoder_finetuned.tar.gz", help="tarball to write")
    p.add_argument("--test_results", "--test-results", help="test_results.json to include (default: the run folder's)")
    p.set_defaults(func=_cmd_export)

    t = subparsers.add_parser("translate", help="translate feature clips with a fine-tuned encoder")
    t.add_argument("--encoder", required=True, help="export tarball or encoder checkpoint")
    t.add_argument("--features", required=True, help="feature folder or one feature file")
    t.add_argument("--tgt_langs", "--tgt-langs", default="eng_Latn", help="comma-separated FLORES-200 codes")
    t.add_argument("--ids", help="comma-separated clip ids (default: all in the folder)")
    t.add_argument("--limit", type=int, help="print at most this many clips")
    t.add_argument("--decoder", help="decoder (default: the one recorded in the export, else text_sonar_basic_decoder)")
    t.add_argument("--tokenizer", help="tokenizer (default: the decoder's)")
    t.add_argument("--beam_size", "--beam-size", type=int, default=5)
    t.add_argument("--max_gen_len", "--max-gen-len", type=int, default=128)
    t.add_argument("--batch_size", "--batch-size", type=int, default=16)
    t.add_argument("--device", default="auto")
    t.add_argument("--out", help="also write the translations as JSON here")
    t.set_defaults(func=_cmd_translate)
