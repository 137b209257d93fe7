"""``sonar-ft translate``: sign clips -> fine-tuned encoder -> frozen SONAR decoder -> text in each language.

``--video clip.mp4 [more ...]`` starts from videos instead of features: they go through SignHiera first
(:mod:`sonar_ft.inference.extract`, ``--signhiera`` / ``--crop``), in memory.

``sonar-ft translate --encoder TARBALL_OR_CKPT --features ... --tgt_langs eng_Latn,fra_Latn`` loads the
encoder (an export is checked before anything is extracted, :mod:`sonar_ft.export.load`) and decodes
each clip into every requested language — SONAR's decoder speaks 200 of them. The decoder defaults to
the one the encoder was trained with.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from sonar_ft.data import FeatureStore, load_feature_file
from sonar_ft.data.features import check_feature_width
from sonar_ft.device import resolve_device
from sonar_ft.errors import ConfigError, DataError
from sonar_ft.export.load import decoder_for, opened_encoder
from sonar_ft.files import atomic
from sonar_ft.files.guards import check_not_folder, check_output_not_input
from sonar_ft.inference.embed import embed_features
from sonar_ft.models.decoder import FrozenTextDecoder
from sonar_ft.models.encoder import load_encoder


def translate(
    encoder: str | Path,
    features: str | Path | None,
    tgt_langs: list[str],
    *,
    videos: list[str | Path] | None = None,
    signhiera: str | Path | None = None,
    crop: str = "face",
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
    encoder was trained with (packed in the export, or recorded in its ``tokenizer.json``). With
    ``videos`` (and no ``features``), the clips are those videos' SignHiera features (``signhiera``
    checkpoint, ``crop``), extracted first; a video that cannot be used raises :class:`VideoError`.
    """
    if (features is None) == (not videos):
        raise ConfigError("give either --features or --video, not both")
    dev = resolve_device(device)
    if videos:  # SignHiera first, freed before the encoder and decoder need the memory
        video_clips = _video_features(videos, signhiera, crop, dev)
        clip_ids, clips, features = list(video_clips), list(video_clips.values()), Path(str(videos[0]))
    else:
        features = Path(features)
    with opened_encoder(encoder) as (checkpoint, files):
        model, _ = load_encoder(checkpoint, device=dev)
        if not videos:
            clip_ids, clips = _read_clips(features, ids)
        _check_clips(clip_ids, clips, model.config.feature_dim, features, encoder)  # before the decoder is loaded
        decoder_spec, tokenizer_spec = decoder_for(files, decoder, tokenizer)
        dec = FrozenTextDecoder.load(decoder_spec, tokenizer_spec, device=dev)  # while packed files still exist
    for lang in tgt_langs:
        dec.check_lang(lang)
    emb = embed_features(model, clips, batch_size=batch_size, device=dev)
    rows: list[dict[str, Any]] = [{"id": i} for i in clip_ids]
    for lang in tgt_langs:
        texts = dec.generate(emb.to(dev), lang, beam_size=beam_size, max_gen_len=max_gen_len, batch_size=batch_size)
        for row, text in zip(rows, texts):
            row[lang] = text
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return rows


def _video_features(videos: list[str | Path], signhiera: str | Path | None, crop: str,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """SignHiera features of ``videos`` (loaded, used, and freed before the encoder needs the memory)."""
    from sonar_ft.inference.extract import DEFAULT_SIGNHIERA, ExtractSettings, extract_features, load_for_extraction

    stems = [Path(v).stem for v in videos]
    if len(set(stems)) != len(stems):
        raise ConfigError(f"--video: two videos share a name ({', '.join(stems)}); the output is keyed by file name")
    model = load_for_extraction(signhiera or DEFAULT_SIGNHIERA, str(device))
    features = extract_features(model, videos, settings=ExtractSettings(crop=crop, device=str(device)))
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return features


def _read_clips(features: Path, ids: list[str] | None) -> tuple[list[str], list[Any]]:
    """The clip ids to translate and their features: one file, or ``ids`` (default: all) of a feature folder."""
    if features.is_file():
        return [features.stem], [load_feature_file(features)]
    store = FeatureStore.open(features)
    clip_ids = list(ids) if ids else store.ids()
    unknown = [i for i in clip_ids if store.path(i) is None]
    if unknown:
        raise DataError(f"no feature file for {', '.join(unknown[:5])} in {features}")
    return clip_ids, [store.load(i) for i in clip_ids]


def _check_clips(clip_ids: list[str], clips: list[Any], feature_dim: int, source: Path, encoder: str | Path) -> None:
    """Refuse clips the encoder cannot embed, naming each (zero frames, wrong dimension, NaN / Inf).

    Clips that all have another width than the encoder's input (features of another extractor) get
    training's message for it (:func:`~sonar_ft.data.features.check_feature_width`)."""
    widths = {clip.shape[1] for clip in clips if clip.shape[0]}
    if len(widths) == 1:
        first = next(i for i, clip in zip(clip_ids, clips) if clip.shape[0])
        check_feature_width(widths.pop(), feature_dim, features=source, encoder=encoder, clip=first)
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


def _cmd_translate(args: argparse.Namespace) -> int:
    langs = [x.strip() for x in args.tgt_langs.split(",") if x.strip()]
    if not langs:
        raise ConfigError("--tgt_langs needs at least one language code, e.g. eng_Latn,fra_Latn")
    ids = [x for x in args.ids.split(",") if x] if args.ids else None
    references: dict[str, str] = {}
    if args.manifest:
        from sonar_ft.data.manifest import read_manifest

        # Any manifest the recipe reads (our TSV, How2Sign's CSV with SENTENCE_NAME / SENTENCE): its texts become references.
        manifest_rows = read_manifest(args.manifest, allow_duplicates=True)
        references = {r.id: r.text for r in reversed(manifest_rows)}  # the first row of an id wins
        if ids is None:
            ids = list(dict.fromkeys(r.id for r in manifest_rows))[: args.limit]
    for flag, value in (("--batch_size", args.batch_size), ("--limit", args.limit), ("--beam_size", args.beam_size),
                        ("--max_gen_len", args.max_gen_len)):
        if value is not None and value < 1:
            hint = "; leave --limit out to print every clip" if flag == "--limit" else ""
            raise ConfigError(f"{flag} must be at least 1 (got {value}){hint}")
    if (args.features is None) == (not args.video):
        raise ConfigError("give the clips to translate with --features (feature folder or file) or --video (video files)")
    if args.out:
        check_not_folder(args.out, example="translations.json")
        check_output_not_input(args.out, {"--encoder": args.encoder, "--features": args.features,
                                          **{"--video": v for v in args.video or []}})
    rows = translate(
        args.encoder, args.features, langs, videos=args.video, signhiera=args.signhiera, crop=args.crop,
        decoder=args.decoder, tokenizer=args.tokenizer, ids=ids,
        beam_size=args.beam_size, max_gen_len=args.max_gen_len, batch_size=args.batch_size, device=args.device,
    )
    if args.limit is not None:
        rows = rows[: args.limit]
    if references:
        for row in rows:
            row["reference"] = references.get(row["id"])
    for row in rows:
        print(row["id"])
        if "reference" in row:
            print(f"  reference: {row['reference']}")
        for lang in langs:
            print(f"  {lang}: {row[lang]}")
    if args.out:
        atomic.write_json(args.out, rows)
        print(f"wrote {args.out}")
    return 0


def register(subparsers: Any) -> None:
    """Add ``sonar-ft translate``."""
    from sonar_ft.data.video import CROPS
    from sonar_ft.inference.extract import DEFAULT_SIGNHIERA

    t = subparsers.add_parser("translate", help="translate feature clips or videos with a fine-tuned encoder")
    t.add_argument("--encoder", required=True, help="export tarball or encoder checkpoint")
    t.add_argument("--features", help="feature folder or one feature file")
    t.add_argument("--video", nargs="+", help="video file(s) to translate instead of --features (SignHiera runs first)")
    t.add_argument("--signhiera", default=str(DEFAULT_SIGNHIERA),
                   help=f"with --video: SignHiera checkpoint (default: {DEFAULT_SIGNHIERA}; sonar-ft download signhiera)")
    t.add_argument("--crop", choices=CROPS, default="face", help="with --video: face | center | none (see sonar-ft extract)")
    t.add_argument("--tgt_langs", "--tgt-langs", default="eng_Latn", help="comma-separated FLORES-200 codes")
    t.add_argument("--ids", help="comma-separated clip ids (default: all in the folder)")
    t.add_argument("--limit", type=int, help="print at most this many clips (with --manifest and no --ids: translate only these)")
    t.add_argument("--manifest", help="a manifest (.tsv, or How2Sign's .csv): its texts are written as each clip's reference; "
                   "without --ids its clips are translated, in its order")
    t.add_argument("--decoder", help="decoder: asset card name, card .yaml or checkpoint (default: the one packed in or "
                   "recorded by the export, else text_sonar_basic_decoder)")
    t.add_argument("--tokenizer", help="tokenizer (default: --decoder's own when --decoder is given, else the export's)")
    t.add_argument("--beam_size", "--beam-size", type=int, default=5)
    t.add_argument("--max_gen_len", "--max-gen-len", type=int, default=128)
    t.add_argument("--batch_size", "--batch-size", type=int, default=16)
    t.add_argument("--device", default="auto")
    t.add_argument("--out", help="also write the translations as JSON here")
    t.set_defaults(func=_cmd_translate)
