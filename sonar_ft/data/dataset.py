"""From manifest rows and feature files to padded, length-bucketed batches.

Clips range from a few dozen to several hundred frames; batching random clips together pads
most of each batch. :class:`LengthBucketSampler` sorts clips by length inside large random
pools, so batches hold clips of similar length yet every epoch still mixes the data.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sonar_ft.progress import Progress
from sonar_ft.data.features import FeatureStore
from sonar_ft.data.manifest import ManifestRow
from sonar_ft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MAX_LISTED = 10


@dataclass(frozen=True)
class Sample:
    """One clip: id, features ``(T, D)`` float32, target text."""

    id: str
    features: torch.Tensor
    text: str


def prepare_features(
    features: torch.Tensor, *, clip_id: str, path: object, max_frames: int | None, cache_dtype: torch.dtype | None
) -> torch.Tensor:
    """A clip's ``(T, D)`` features as a dataset keeps them: the first ``max_frames`` frames, in
    ``cache_dtype`` (when caching). :class:`DataError` naming ``path`` for no frames or NaN/Inf."""
    if max_frames is not None and features.shape[0] > max_frames:
        # clone: a cached view would keep the whole untruncated clip alive.
        features = features[:max_frames].clone()
    if features.shape[0] == 0:
        raise DataError(
            f"feature file {path} has zero frames; drop clip {clip_id!r} from the manifest "
            "(`sonar-ft verify` lists all such clips)"
        )
    if cache_dtype is not None:
        features = features.to(cache_dtype)
    if not bool(torch.isfinite(features).all()):
        overflow = f" after conversion to {cache_dtype}" if cache_dtype else ""
        raise DataError(
            f"feature file {path} contains NaN or Inf values{overflow}; re-extract it or drop clip "
            f"{clip_id!r} from the manifest (`sonar-ft verify` lists all such files)"
        )
    return features


class SignFeatureDataset(Dataset[Sample]):
    """Manifest rows backed by a :class:`FeatureStore`.

    ``max_frames`` keeps the first ``max_frames`` frames of longer clips. With ``cache=True``
    each clip is kept in memory after its first read (as ``cache_dtype``, e.g. ``torch.float16``
    to halve the memory; samples are still returned as float32).
    Raises :class:`DataError` at construction when a row has no feature file, and at load time
    when a file is zero-length or holds NaN/Inf. ``preloaded`` (clip id -> features already in
    the form :func:`prepare_features` gives, e.g. kept from the bad-sample scan) fills the cache
    up front, so those files are not read again.
    """

    def __init__(
        self,
        store: FeatureStore,
        rows: Sequence[ManifestRow],
        max_frames: int | None = None,
        *,
        cache: bool = False,
        cache_dtype: torch.dtype | None = None,
        progress: bool = True,
        preloaded: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if max_frames is not None and max_frames < 1:
            raise ConfigError(f"--max_frames must be >= 1 (got {max_frames}); leave it unset to keep every frame")
        self.store = store
        self.rows: list[ManifestRow] = list(rows)
        self.max_frames = max_frames
        self.cache = cache
        self.cache_dtype = cache_dtype
        self._cache: dict[int, torch.Tensor] = {}
        if cache and preloaded:
            self._cache = {i: preloaded[r.id] for i, r in enumerate(self.rows) if r.id in preloaded}

        missing = [r.id for r in self.rows if r.id not in store]
        if missing:
            more = f" (+{len(missing) - MAX_LISTED} more)" if len(missing) > MAX_LISTED else ""
            raise DataError(
                f"{len(missing)} of {len(self.rows)} manifest rows have no feature file in {store.root} "
                f"({', '.join(missing[:MAX_LISTED])}{more}); run `sonar-ft verify` for the full report, "
                "or rebuild the manifest from the files present with `sonar-ft manifest how2sign`"
            )
        self.lengths: list[int] = self._read_lengths(progress)

    def _read_lengths(self, progress: bool) -> list[int]:
        unknown = [i for i, r in enumerate(self.rows) if r.length is None]
        frames = {
            i: self.store.num_frames(self.rows[i].id)
            for i in Progress(len(unknown), desc="reading frame counts", unit="clip", enabled=progress and bool(unknown)).wrap(unknown)
        }
        lengths = [frames[i] if r.length is None else r.length for i, r in enumerate(self.rows)]
        if self.max_frames is not None:
            lengths = [min(n, self.max_frames) for n in lengths]
        return lengths

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Sample:
        row = self.rows[index]
        features = self._cache.get(index)
        if features is None:
            features = self._load(row)
            if self.cache:
                self._cache[index] = features
        return Sample(id=row.id, features=features.to(torch.float32), text=row.text)

    def _load(self, row: ManifestRow) -> torch.Tensor:
        return prepare_features(self.store.load(row.id), clip_id=row.id, path=self.store.path(row.id),
                                max_frames=self.max_frames, cache_dtype=self.cache_dtype if self.cache else None)


def select_rows(
    rows: Sequence[ManifestRow],
    max_samples: int | None = None,
    subset_fraction: float | None = None,
    seed: int = 0,
) -> list[ManifestRow]:
    """A seeded random subset of ``rows``, kept in manifest order.

    ``subset_fraction`` keeps that share of the rows, ``max_samples`` caps the count; with both
    the smaller wins. The same seed gives the same subset, and a smaller subset is contained in
    a larger one drawn with the same seed.
    """
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"--max_samples must be >= 1 (got {max_samples}); leave it unset to use every row")
    if subset_fraction is not None and not 0.0 < subset_fraction <= 1.0:
        raise ConfigError(f"--subset_fraction must be in (0, 1] (got {subset_fraction})")
    rows = list(rows)
    keep = len(rows)
    if subset_fraction is not None and rows:
        keep = max(1, round(len(rows) * subset_fraction))
    if max_samples is not None:
        if max_samples > len(rows):
            log.warning(
                "--max_samples %d is more than the %d rows available; using all of them", max_samples, len(rows)
            )
        keep = min(keep, max_samples)
    if keep >= len(rows):
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[:keep])]


class LengthBucketSampler(Sampler[list[int]]):
    """Micro-batches of indices with similar lengths, grouped into optimiser-step windows; a DataLoader ``batch_sampler``.

    A *window* holds the clips of one optimiser step: ``batch_size * grad_accum * num_replicas``
    of them (the effective batch). With ``shuffle`` the indices are randomly split into pools of
    ``pool_factor`` windows, sorted by length inside each pool and cut into windows, and the window
    order is shuffled; all of it is a function of ``(seed, epoch)`` and of the effective batch only
    (call :meth:`set_epoch` each epoch). Without ``shuffle`` the whole set is sorted by length
    (least padding, fixed order, for evaluation). Each window is then split into micro-batches of
    ``batch_size``: so ``batch_size 8`` and ``batch_size 4, grad_accum 2`` put the very same clips
    into every step, and a run may change that split on resume.

    For DDP (``num_replicas > 1``) ``batch_size`` is per rank: rank ``r`` takes every
    ``num_replicas``-th clip of each window, from ``r``, so each step of N processes sees the same
    clips as one process with the whole window and every rank gets the same number of windows, of
    similar lengths. A last window with fewer clips than ranks repeats some (or is dropped with
    ``drop_last``). Only the last window before shuffling can be short; after it it may come anywhere,
    so the caller groups micro-batches with :meth:`window_sizes`, not by counting ``grad_accum``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pool_factor: int = 100,
        drop_last: bool = False,
        grad_accum: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1 (got {batch_size})")
        if grad_accum < 1:
            raise ConfigError(f"--grad_accum must be >= 1 (got {grad_accum})")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank {rank} is not valid for {num_replicas} replica(s)")
        if pool_factor < 1:
            raise ConfigError(f"pool_factor must be >= 1 (got {pool_factor})")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.pool_factor = pool_factor
        self.drop_last = drop_last
        self.epoch = 0
        self.skip = 0
        self._cached: tuple[int, list[list[list[int]]]] | None = None

    @property
    def window_clips(self) -> int:
        """Clips of one optimiser step over all ranks (the effective batch)."""
        return self.batch_size * self.grad_accum * self.num_replicas

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch whose order the next iteration yields.

        ``skip`` leaves out that epoch's first ``skip`` windows (optimiser steps): a run resumed
        mid-epoch continues with exactly the clips it had not yet seen, whatever micro-batch split
        it resumes with.
        """
        if skip < 0:
            raise ValueError(f"skip must be >= 0 (got {skip})")
        self.epoch = epoch
        self.skip = skip

    def windows(self) -> list[list[list[int]]]:
        """This rank's micro-batches of every window of the epoch (skipped ones included)."""
        if self._cached is None or self._cached[0] != self.epoch:
            self._cached = (self.epoch, self._windows())
        return self._cached[1]

    def window_sizes(self) -> list[int]:
        """Micro-batches per window of the epoch (skipped ones included), in order."""
        return [len(w) for w in self.windows()]

    def _windows(self) -> list[list[list[int]]]:
        n, size = len(self.lengths), self.window_clips
        if self.shuffle:
            # Masking keeps negative seeds valid for numpy's SeedSequence.
            rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self.epoch & 0xFFFFFFFF])
            order = rng.permutation(n)
            # A pool is a whole number of windows, so only the very last window can be short.
            pool = self.pool_factor * size
            pools = np.split(order, range(pool, n, pool))
            order = np.concatenate([p[np.argsort(self.lengths[p], kind="stable")] for p in pools])
        else:
            order = np.argsort(self.lengths, kind="stable")
        windows = [order[i : i + size].tolist() for i in range(0, n, size)]
        if self.drop_last and windows and len(windows[-1]) < size:
            windows.pop()
        if self.shuffle:
            windows = [windows[i] for i in rng.permutation(len(windows))]
        world = self.num_replicas
        if world > 1:
            # Interleaved slices of a length-sorted window: every rank pads to a similar length.
            windows = [(w * math.ceil(world / len(w)))[:world] if len(w) < world else w for w in windows]
            windows = [w[self.rank :: world] for w in windows]
        b = self.batch_size
        return [[w[i : i + b] for i in range(0, len(w), b)] for w in windows]

    def __iter__(self) -> Iterator[list[int]]:
        return (batch for window in self.windows()[self.skip :] for batch in window)

    def __len__(self) -> int:
        return sum(self.window_sizes()[self.skip :])


@dataclass
class Batch:
    """Padded clips: ``features (B, T, D)`` float32, ``mask (B, T)`` bool, True on real frames."""

    ids: list[str]
    features: torch.Tensor
    mask: torch.Tensor
    texts: list[str]

    def to(self, device: torch.device | str, *, non_blocking: bool = True) -> Batch:
        """A copy with tensors on ``device`` (non-blocking from pinned memory)."""
        return replace(
            self,
            features=self.features.to(device, non_blocking=non_blocking),
            mask=self.mask.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) so ``.to(cuda)`` can overlap with compute."""
        return replace(self, features=self.features.pin_memory(), mask=self.mask.pin_memory())

    def __len__(self) -> int:
        return len(self.ids)


def collate(samples: Sequence[Sample]) -> Batch:
    """Pad ``samples`` with zeros to the longest one and build the mask."""
    if not samples:
        raise ValueError("collate() needs at least one sample")
    dims = sorted({s.features.shape[1] for s in samples})
    if len(dims) > 1:
        raise DataError(
            f"clips in one batch have different feature dims {dims} "
            f"({', '.join(f'{s.id}: {s.features.shape[1]}' for s in samples[:MAX_LISTED])}); "
            "run `sonar-ft verify --feature-dim D` to find the odd files"
        )
    longest = max(s.features.shape[0] for s in samples)
    features = torch.zeros(len(samples), longest, dims[0], dtype=torch.float32)
    mask = torch.zeros(len(samples), longest, dtype=torch.bool)
    for i, s in enumerate(samples):
        frames = s.features.shape[0]
        features[i, :frames] = s.features
        mask[i, :frames] = True
    return Batch(ids=[s.id for s in samples], features=features, mask=mask, texts=[s.text for s in samples])


def make_loader(
    dataset: SignFeatureDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    grad_accum: int = 1,
) -> DataLoader:
    """A DataLoader of :class:`Batch` with a :class:`LengthBucketSampler`.

    Call ``loader.batch_sampler.set_epoch(epoch)`` before each epoch for a fresh order. With
    ``grad_accum`` the clips of each optimiser step are chosen at the effective batch and split into
    micro-batches of ``batch_size`` (see :class:`LengthBucketSampler`).
    A caching dataset is read in the main process: worker processes would each fill a cache
    of their own, multiplying memory and losing it at exit.
    """
    if dataset.cache and num_workers > 0:
        log.info("feature cache is on: loading in the main process (num_workers %d -> 0)", num_workers)
        num_workers = 0
    sampler = LengthBucketSampler(
        dataset.lengths,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=drop_last,
        grad_accum=grad_accum,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=pin_memory,
    )
