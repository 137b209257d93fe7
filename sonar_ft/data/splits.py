"""A run's data splits: manifest + feature folder -> a checked, subset, optionally cached dataset.

The settings come from :class:`~sonar_ft.config.TrainConfig` (``--max_samples``, ``--subset_fraction``,
``--max_frames``, ``--cache_features``); the bad-clip scan (:mod:`sonar_ft.data.bad_samples`) runs
here, once, and what it reads is kept. Batches: :func:`sonar_ft.data.dataset.make_loader`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sonar_ft.config import TrainConfig
from sonar_ft.data.bad_samples import BadSample, CountTokens, find_bad_samples
from sonar_ft.data.dataset import SignFeatureDataset, prepare_features, select_rows
from sonar_ft.data.features import FeatureStore, check_feature_width
from sonar_ft.data.manifest import read_manifest
from sonar_ft.errors import ConfigError, DataError

CACHE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16}


def cache_dtype(name: str) -> torch.dtype:
    """The dtype cached features are stored in for ``--cache_dtype name``."""
    if name not in CACHE_DTYPES:
        raise ConfigError(f"--cache_dtype must be one of {', '.join(CACHE_DTYPES)} (got {name!r})")
    return CACHE_DTYPES[name]


def feature_cache(cfg: Any) -> dict[str, Any]:
    """``SignFeatureDataset`` keyword arguments for ``--cache_features`` / ``--cache_dtype``."""
    if not cfg.cache_features:
        return {}
    return {"cache": True, "cache_dtype": cache_dtype(cfg.cache_dtype)}


def load_split(
    features: str, manifest: str, *, cfg: TrainConfig, split: str, fraction: float | None = None,
    bad: list[BadSample] | None = None, reuse: dict[tuple, Any] | None = None,
    count_tokens: CountTokens | None = None, max_tokens: int | None = None,
) -> SignFeatureDataset:
    """Manifest rows with a feature file each, subset as asked, as a dataset.

    With ``bad`` (a list), every selected clip's file is read once first; the clips training
    would fail on are appended to ``bad`` and left out (the caller decides whether to stop).
    ``count_tokens`` (the run's tokenizer) and ``max_tokens`` (the decoder's limit) add the
    references the decoder cannot read to them.
    ``reuse`` (a dict the caller keeps, e.g. across tuning trials) hands back the dataset and bad
    clips of an earlier call with the same split, files and data settings instead of scanning (and,
    with ``--cache_features``, reading) every file again. A manifest is recognised by its size and
    modification time; feature files changed in between are not noticed.
    """
    key = _split_key(features, manifest, cfg, split, fraction, max_tokens) if reuse is not None and bad is not None else None
    if key is not None and key in reuse:
        dataset, found = reuse[key]
        bad.extend(found)
        return dataset
    found: list[BadSample] | None = [] if bad is not None else None
    dataset = _read_split(features, manifest, cfg=cfg, split=split, fraction=fraction, bad=found,
                          count_tokens=count_tokens, max_tokens=max_tokens)
    if bad is not None:
        bad.extend(found)
    if key is not None:
        reuse[key] = (dataset, found)
    return dataset


def _split_key(
    features: str, manifest: str, cfg: TrainConfig, split: str, fraction: float | None, max_tokens: int | None,
) -> tuple | None:
    """Everything that decides a split's dataset; None when the manifest cannot be looked at."""
    try:
        stat = Path(manifest).stat()
    except OSError:
        return None  # _read_split says what is wrong
    return (split, str(Path(features).resolve()), str(Path(manifest).resolve()), stat.st_size, stat.st_mtime_ns,
            cfg.max_samples, fraction, cfg.seed, cfg.max_frames, cfg.cache_features, cfg.cache_dtype,
            cfg.decoder, cfg.tokenizer, cfg.tgt_lang, max_tokens)  # what decides which references are too long


def _read_split(
    features: str, manifest: str, *, cfg: TrainConfig, split: str, fraction: float | None, bad: list[BadSample] | None,
    count_tokens: CountTokens | None = None, max_tokens: int | None = None,
) -> SignFeatureDataset:
    store = FeatureStore.open(features)
    rows = read_manifest(manifest)
    if bad is not None:
        # Subset first: a quick --max_samples test should not read the whole corpus.
        rows = select_rows(rows, max_samples=cfg.max_samples, subset_fraction=fraction, seed=cfg.seed)
        # The scan reads every file: keep what it learns (frame counts; the features themselves when
        # caching) so that neither the dataset's length pass nor epoch 1 reads the files again.
        frames: dict[str, int] = {}
        cache = feature_cache(cfg)
        preloaded: dict[str, torch.Tensor] = {}

        def keep(clip_id: str, features: torch.Tensor) -> None:
            preloaded[clip_id] = prepare_features(features, clip_id=clip_id, path=store.path(clip_id),
                                                  max_frames=cfg.max_frames, cache_dtype=cache.get("cache_dtype"))

        found = find_bad_samples(store, rows, split=split, frames=frames, keep=keep if cache else None,
                                 count_tokens=count_tokens, max_tokens=max_tokens)
        bad.extend(found)
        dropped = {b.id for b in found}
        rows = [replace(r, length=frames[r.id]) for r in rows if r.id not in dropped]
        return SignFeatureDataset(store, rows, max_frames=cfg.max_frames, preloaded=preloaded, **cache)
    missing = [r for r in rows if store.path(r.id) is None]
    if missing:
        listed = ", ".join(f"{r.id} (line {r.line})" for r in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise DataError(
            f"{len(missing)} clip(s) of {split} manifest {manifest} have no feature file in {features}: {listed}{more}. "
            "Run `sonar-ft verify` on this split, fix the manifest or the features, then start again."
        )
    rows = select_rows(rows, max_samples=cfg.max_samples, subset_fraction=fraction, seed=cfg.seed)
    return SignFeatureDataset(store, rows, max_frames=cfg.max_frames, **feature_cache(cfg))


def check_feature_dim(dataset: SignFeatureDataset, expected: int, *, features: str, encoder: str) -> None:
    """Stop before training (or evaluating) when the clips' feature dimension is not the encoder's input size."""
    if len(dataset) == 0:
        return
    check_feature_width(dataset[0].features.shape[1], expected, features=features, encoder=encoder)
