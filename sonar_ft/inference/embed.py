"""``sonar-ft embed``: sign-video features -> SONAR sentence embeddings, one row per clip.

Writes ``embeddings.npy`` (float32, shape (N, output_dim)) and ``embeddings.ids.txt`` (one clip
id per line, same order), each atomically. Clips are batched with clips of similar length so
that little compute goes to padding; the encoder's mask makes the result independent of the
batching (each embedding equals the clip's embedding on its own).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from sonar_ft.progress import Progress
from sonar_ft.data import FeatureStore, load_feature_file, read_manifest
from sonar_ft.data.features import check_feature_width
from sonar_ft.models.encoder import SignT5SonarEncoder
from sonar_ft.errors import ConfigError, DataError
from sonar_ft.export.load import load_any_encoder
from sonar_ft.files.atomic import atomic_path, write_text
from sonar_ft.files.lock import output_lock
from sonar_ft.files.guards import check_not_folder, check_output_not_input

log = logging.getLogger(__name__)

# Clips loaded at once = batch size x this: enough to sort by length usefully, while memory
# stays bounded however many clips there are.
CLIPS_PER_BATCH_LOADED = 16
MAX_LISTED = 10


def embed_features(
    model: SignT5SonarEncoder,
    features: Sequence[Tensor],
    batch_size: int = 16,
    device: str | torch.device | None = None,
) -> Tensor:
    """Embed clips of shape (T_i, D) -> (N, output_dim) float32 on the CPU, in input order.

    Clips are sorted by length, padded in batches of ``batch_size`` and masked. The model runs
    in eval mode (its previous mode is restored) and is moved to ``device`` when one is given.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for i, clip in enumerate(features):
        if clip.dim() != 2 or clip.shape[0] == 0:
            raise ValueError(f"clip {i} has shape {tuple(clip.shape)}; expected (T >= 1, D)")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    out = torch.empty(len(features), model.config.output_dim, dtype=torch.float32)
    order = sorted(range(len(features)), key=lambda i: features[i].shape[0])

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                clips = [features[i] for i in index]
                lengths = torch.tensor([c.shape[0] for c in clips])  # (B,)
                padded = torch.nn.utils.rnn.pad_sequence(clips, batch_first=True)  # (B, T, D)
                mask = torch.arange(padded.shape[1])[None, :] < lengths[:, None]  # (B, T)
                embeddings = model(padded.to(device), mask.to(device))  # (B, output_dim)
                out[index] = embeddings.float().cpu()
    finally:
        model.train(was_training)
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``embed`` to the ``sonar-ft`` command."""
    p = subparsers.add_parser(
        "embed",
        help="features -> SONAR sentence embeddings (.npy)",
        description="Embed every clip of a feature folder (or one feature file) with a SONAR ASL "
        "encoder. Writes OUT (float32, one row per clip) and OUT's name with .ids.txt instead of "
        ".npy (the clip ids, one per line, same order).",
    )
    p.add_argument("--encoder-checkpoint", "--encoder_checkpoint", "--encoder", dest="encoder_checkpoint", type=Path,
                   required=True, help="encoder checkpoint (official SONAR ASL file or one saved by sonar-ft) or a "
                   "`sonar-ft export` tarball")
    p.add_argument("--features", type=Path, required=True,
                   help="feature folder (flat or ssvp_slt nested) or a single .npy / .pt file")
    p.add_argument("--manifest", type=Path, default=None,
                   help="embed only the manifest's clips, in its order (default: every clip, sorted by id)")
    p.add_argument("--out", type=Path, required=True, help="embeddings file to write (must end in .npy)")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16,
                   help="clips per forward pass (default: 16)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run the encoder (default: auto = cuda if available)")
    p.add_argument("--epoch", default=None, help="epoch folder of a nested layout (default: the first)")
    p.set_defaults(func=_embed)


def ids_path(out: Path) -> Path:
    """``x/embeddings.npy`` -> ``x/embeddings.ids.txt``."""
    return out.with_suffix(".ids.txt")


def _resolve_device(name: str) -> torch.device:
    from sonar_ft.device import resolve_device  # the one resolver (cuda:N included), shared with training

    return resolve_device(name)


def _clips(args: argparse.Namespace) -> tuple[list[str], Callable[[str], Tensor]]:
    """The clip ids to embed, in output order, and a function loading one clip's features."""
    if args.features.is_file():
        if args.manifest is not None:
            raise ConfigError("--manifest selects clips of a feature folder; drop it when --features is one file")
        single = args.features
        return [single.stem], lambda _clip_id: load_feature_file(single)

    store = FeatureStore.open(args.features, epoch=args.epoch)
    if args.manifest is None:
        return store.ids(), store.load
    ids = [row.id for row in read_manifest(args.manifest)]
    missing = [clip_id for clip_id in ids if clip_id not in store]
    if missing:
        listed = ", ".join(missing[:MAX_LISTED]) + (" ..." if len(missing) > MAX_LISTED else "")
        raise DataError(
            f"{len(missing)} clip(s) of manifest {args.manifest} have no feature file in {args.features} "
            f"({listed}); run `sonar-ft verify` or fix the manifest"
        )
    return ids, store.load


def _embed(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.suffix != ".npy":
        raise ConfigError(f"--out {out} must end in .npy (the clip ids go beside it as .ids.txt)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {args.batch_size}")
    check_not_folder(out, example="embeddings.npy")
    inputs = {"--features": args.features, "--encoder_checkpoint": args.encoder_checkpoint, "--manifest": args.manifest}
    check_output_not_input(out, inputs)
    check_output_not_input(ids_path(out), inputs, flag="--out (its .ids.txt)")
    with output_lock(out, folder=False, command="sonar-ft embed"):
        return _embed_locked(args, out)


def _embed_locked(args: argparse.Namespace, out: Path) -> int:
    device = _resolve_device(args.device)
    ids, load = _clips(args)
    model, config = load_any_encoder(args.encoder_checkpoint, device=device)

    embeddings = np.empty((len(ids), config.output_dim), dtype=np.float32)
    chunk = args.batch_size * CLIPS_PER_BATCH_LOADED
    with Progress(len(ids), desc="embed", unit="clip") as progress:
        for start in range(0, len(ids), chunk):
            chunk_ids = ids[start : start + chunk]
            clips = [_checked(clip_id, load(clip_id), config.feature_dim, args.features, args.encoder_checkpoint)
                     for clip_id in chunk_ids]
            embeddings[start : start + len(clips)] = embed_features(model, clips, args.batch_size).numpy()
            progress.update(len(clips))
    bad = [clip_id for clip_id, row in zip(ids, np.isfinite(embeddings).all(axis=1)) if not row]
    if bad:
        listed = ", ".join(bad[:MAX_LISTED]) + (" ..." if len(bad) > MAX_LISTED else "")
        raise DataError(
            f"the encoder {args.encoder_checkpoint} gave NaN/Inf embeddings for {len(bad)} clip(s) ({listed}); nothing "
            f"was written to {out}. The checkpoint's weights may be broken (re-export it) or the clips hold extreme values"
        )

    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, embeddings)  # a file object: np.save would append ".npy" to the temp name
    write_text(ids_path(out), "".join(f"{clip_id}\n" for clip_id in ids))
    print(f"wrote {len(ids)} embeddings of size {config.output_dim} to {out} (ids: {ids_path(out)})")
    return 0


def _checked(clip_id: str, clip: Tensor, feature_dim: int, source: Path, encoder: str | Path) -> Tensor:
    check_feature_width(clip.shape[1], feature_dim, features=source, encoder=encoder, clip=clip_id)  # training's check
    if clip.shape[0] == 0:
        raise DataError(f"clip {clip_id!r} in {source} has no frames; drop it from the manifest")
    if not torch.isfinite(clip).all():
        raise DataError(
            f"clip {clip_id!r} in {source} contains NaN or Inf values; nothing was written. Re-extract its features, "
            "or pass --manifest listing the clips to embed without it (`sonar-ft verify` lists every bad clip)"
        )
    return clip
