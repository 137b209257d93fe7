"""Dataset, subset selection, length-bucketed sampling, padding and the loader."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from sonar_ft.data.dataset import (
    Batch,
    LengthBucketSampler,
    Sample,
    SignFeatureDataset,
    collate,
    make_loader,
    select_rows,
)
from sonar_ft.data.features import FeatureStore
from sonar_ft.data.manifest import ManifestRow
from sonar_ft.errors import ConfigError, DataError

DIM = 4


def clip(frames: int, value: float = 1.0) -> np.ndarray:
    return np.full((frames, DIM), value, np.float32)


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    for i, frames in enumerate([3, 7, 5, 2, 9, 4]):
        np.save(tmp_path / f"c{i}.npy", clip(frames, value=i))
    return FeatureStore.open(tmp_path)


def rows_for(store: FeatureStore, with_lengths: bool = True) -> list[ManifestRow]:
    return [
        ManifestRow(i, f"text {i}", store.num_frames(i) if with_lengths else None, line=n + 2)
        for n, i in enumerate(store.ids())
    ]


def many_rows(n: int) -> list[ManifestRow]:
    return [ManifestRow(f"r{i}", "t", 10, line=i + 1) for i in range(n)]


def padded_fraction(batches: list[list[int]], lengths: np.ndarray) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    total = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - real / total


# --- dataset ------------------------------------------------------------------------------


def test_item_is_float32_sample(store):
    ds = SignFeatureDataset(store, rows_for(store), progress=False)
    sample = ds[1]
    assert isinstance(sample, Sample) and (sample.id, sample.text) == ("c1", "text c1")
    assert sample.features.dtype == torch.float32
    assert torch.equal(sample.features, torch.full((7, DIM), 1.0))


def test_lengths_come_from_the_manifest(store):
    rows = [ManifestRow("c0", "x", 30), ManifestRow("c1", "y", 40)]
    assert SignFeatureDataset(store, rows, progress=False).lengths == [30, 40]


def test_lengths_read_from_files_when_manifest_has_none(store):
    ds = SignFeatureDataset(store, rows_for(store, with_lengths=False), progress=False)
    assert ds.lengths == [3, 7, 5, 2, 9, 4]


def test_max_frames_truncates_items_and_lengths(store):
    ds = SignFeatureDataset(store, rows_for(store), max_frames=4, progress=False)
    assert ds.lengths == [3, 4, 4, 2, 4, 4]
    assert ds[4].features.shape == (4, DIM)


def test_bad_max_frames(store):
    with pytest.raises(ConfigError, match="--max_frames must be >= 1"):
        SignFeatureDataset(store, rows_for(store), max_frames=0)


def test_row_without_features_fails_at_construction(store):
    rows = rows_for(store) + [ManifestRow("ghost", "x", 3)]
    with pytest.raises(DataError, match=r"1 of 7 manifest rows have no feature file .*\(ghost\).*sonar-ft verify"):
        SignFeatureDataset(store, rows, progress=False)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_features_fail_at_load_naming_file(tmp_path, value):
    arr = clip(5)
    arr[2, 1] = value
    np.save(tmp_path / "bad.npy", arr)
    store = FeatureStore.open(tmp_path)
    ds = SignFeatureDataset(store, [ManifestRow("bad", "x", 5)], progress=False)
    with pytest.raises(DataError, match=rf"{tmp_path / 'bad.npy'} contains NaN or Inf"):
        ds[0]


def test_zero_length_clip_fails_at_load(tmp_path):
    np.save(tmp_path / "empty.npy", clip(0))
    ds = SignFeatureDataset(FeatureStore.open(tmp_path), [ManifestRow("empty", "x", 0)], progress=False)
    with pytest.raises(DataError, match=r"empty\.npy has zero frames"):
        ds[0]


def test_cache_serves_later_epochs_from_memory(store, monkeypatch):
    ds = SignFeatureDataset(store, rows_for(store), cache=True, progress=False)
    first = ds[2].features.clone()
    monkeypatch.setattr(store, "load", lambda clip_id: pytest.fail(f"read {clip_id} from disk again"))
    assert torch.equal(ds[2].features, first)


def test_cache_dtype_halves_memory_but_returns_float32(store):
    ds = SignFeatureDataset(store, rows_for(store), cache=True, cache_dtype=torch.float16, progress=False)
    sample = ds[0]
    assert ds._cache[0].dtype == torch.float16
    assert sample.features.dtype == torch.float32


def test_without_cache_nothing_is_kept(store):
    ds = SignFeatureDataset(store, rows_for(store), progress=False)
    ds[0]
    assert ds._cache == {}


# --- select_rows -------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3])
def test_max_samples_below_one(bad):
    with pytest.raises(ConfigError, match=r"--max_samples must be >= 1"):
        select_rows(many_rows(5), max_samples=bad)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_subset_fraction_out_of_range(bad):
    with pytest.raises(ConfigError, match=r"--subset_fraction must be in \(0, 1\]"):
        select_rows(many_rows(5), subset_fraction=bad)


def test_max_samples_above_available_uses_all_and_warns(caplog):
    rows = many_rows(5)
    with caplog.at_level(logging.WARNING, logger="sonar_ft.data.dataset"):
        assert select_rows(rows, max_samples=50) == rows
    assert "more than the 5 rows available" in caplog.text


def test_subset_is_seeded_and_in_manifest_order():
    rows = many_rows(100)
    first = select_rows(rows, max_samples=10, seed=3)
    assert first == select_rows(rows, max_samples=10, seed=3)
    assert first != select_rows(rows, max_samples=10, seed=4)
    assert [r.line for r in first] == sorted(r.line for r in first)


def test_smaller_subset_is_contained_in_larger():
    rows = many_rows(100)
    small = set(select_rows(rows, max_samples=10, seed=1))
    assert small <= set(select_rows(rows, max_samples=40, seed=1))


def test_subset_fraction_and_max_samples_smaller_wins():
    rows = many_rows(100)
    assert len(select_rows(rows, subset_fraction=0.25)) == 25
    assert len(select_rows(rows, subset_fraction=0.25, max_samples=7)) == 7


def test_no_limits_keeps_everything():
    rows = many_rows(7)
    assert select_rows(rows) == rows


# --- LengthBucketSampler --------------------------------------------------------------------


@pytest.fixture(scope="module")
def lognormal_lengths() -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(rng.lognormal(mean=np.log(120), sigma=0.8, size=20_000), 20, 600).astype(np.int64)


def test_bucketing_pads_at_most_ten_percent(lognormal_lengths):
    lengths = lognormal_lengths
    bucketed = list(LengthBucketSampler(lengths, 32, seed=0))
    order = np.random.default_rng(1).permutation(len(lengths))
    random_batches = [order[i : i + 32] for i in range(0, len(order), 32)]
    bucket_pad, random_pad = padded_fraction(bucketed, lengths), padded_fraction(random_batches, lengths)
    assert bucket_pad <= 0.10
    assert random_pad > 3 * bucket_pad  # random batching of the same data pads far more


def test_every_index_once_and_batch_size_respected():
    sampler = LengthBucketSampler(np.arange(1000) % 97, 32, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(batches) == len(sampler) == 32
    assert sum(len(b) < 32 for b in batches) == 1  # only one short batch


def test_same_seed_and_epoch_give_same_batches():
    lengths = np.random.default_rng(0).integers(20, 600, size=500)
    a, b = LengthBucketSampler(lengths, 16, seed=5), LengthBucketSampler(lengths, 16, seed=5)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)


def test_epochs_and_seeds_change_the_order():
    lengths = np.random.default_rng(0).integers(20, 600, size=500)
    sampler = LengthBucketSampler(lengths, 16, seed=5)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert list(LengthBucketSampler(lengths, 16, seed=6)) != epoch0


def test_without_shuffle_batches_follow_length():
    lengths = [5, 1, 4, 2, 3]
    assert list(LengthBucketSampler(lengths, 2, shuffle=False)) == [[1, 3], [4, 2], [0]]


def test_drop_last():
    sampler = LengthBucketSampler(list(range(10)), 4, drop_last=True)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 and all(len(b) == 4 for b in batches)


@pytest.mark.parametrize("n_items", [100, 33, 5])
def test_ranks_get_equal_batch_counts_and_cover_everything(n_items):
    lengths = np.random.default_rng(0).integers(20, 600, size=n_items)
    samplers = [LengthBucketSampler(lengths, 8, seed=2, num_replicas=3, rank=r) for r in range(3)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    assert all(len(b) == len(s) for b, s in zip(per_rank, samplers))
    assert {i for batches in per_rank for b in batches for i in b} == set(range(n_items))


def test_invalid_sampler_settings():
    with pytest.raises(ConfigError, match="--batch_size must be >= 1"):
        LengthBucketSampler([1, 2], 0)
    with pytest.raises(ConfigError, match="rank 2 is not valid for 2"):
        LengthBucketSampler([1, 2], 1, num_replicas=2, rank=2)


# --- collate / Batch / loader -----------------------------------------------------------------


def test_collate_pads_to_longest_with_mask():
    samples = [Sample("a", torch.ones(2, DIM), "x"), Sample("b", torch.full((4, DIM), 2.0), "y")]
    batch = collate(samples)
    assert (batch.ids, batch.texts) == (["a", "b"], ["x", "y"])
    assert batch.features.shape == (2, 4, DIM) and batch.features.dtype == torch.float32
    assert batch.mask.tolist() == [[True, True, False, False], [True] * 4]
    assert torch.equal(batch.features[0, 2:], torch.zeros(2, DIM))
    assert torch.equal(batch.features[1], torch.full((4, DIM), 2.0))


def test_collate_refuses_mixed_feature_dims():
    samples = [Sample("a", torch.ones(2, DIM), "x"), Sample("b", torch.ones(2, DIM + 1), "y")]
    with pytest.raises(DataError, match=r"different feature dims \[4, 5\] \(a: 4, b: 5\)"):
        collate(samples)


def test_batch_to_moves_tensors():
    batch = collate([Sample("a", torch.ones(2, DIM), "x")])
    moved = batch.to("meta")
    assert moved.features.device.type == "meta" and moved.mask.device.type == "meta"
    assert moved.mask.dtype == torch.bool and moved.ids == ["a"]
    assert batch.features.device.type == "cpu"  # the original is left alone


def test_make_loader_yields_every_clip_once(store):
    ds = SignFeatureDataset(store, rows_for(store), progress=False)
    loader = make_loader(ds, 4, shuffle=True, seed=0)
    batches = list(loader)
    assert all(isinstance(b, Batch) for b in batches)
    assert sorted(i for b in batches for i in b.ids) == store.ids()
    frames = {r.id: n for r, n in zip(ds.rows, ds.lengths)}
    for b in batches:
        assert b.mask.sum(1).tolist() == [frames[i] for i in b.ids]


def test_make_loader_epochs_are_reproducible(store):
    ds = SignFeatureDataset(store, rows_for(store), progress=False)
    loader = make_loader(ds, 2, shuffle=True, seed=7)
    loader.batch_sampler.set_epoch(4)
    first = [b.ids for b in loader]
    loader.batch_sampler.set_epoch(4)
    assert [b.ids for b in loader] == first


def test_make_loader_reads_a_caching_dataset_in_main_process(store):
    ds = SignFeatureDataset(store, rows_for(store), cache=True, progress=False)
    assert make_loader(ds, 2, shuffle=False, num_workers=2).num_workers == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for pinned memory")
def test_pinned_batches_move_to_gpu(store):
    ds = SignFeatureDataset(store, rows_for(store), progress=False)
    batch = next(iter(make_loader(ds, 2, shuffle=False, pin_memory=True)))
    assert batch.features.is_pinned()
    assert batch.to("cuda").features.is_cuda


# --- windows at the effective batch (a split of micro-batch x accumulation may change on resume) ---------------
def _window_clips(sampler: LengthBucketSampler) -> list[list[int]]:
    return [sorted(i for batch in window for i in batch) for window in sampler.windows()]


@pytest.mark.parametrize("n_items", [40, 37, 3])
def test_micro_batch_split_does_not_change_the_clips_of_a_step(n_items):
    lengths = np.random.default_rng(1).integers(20, 600, size=n_items)
    whole = LengthBucketSampler(lengths, 8, seed=5, pool_factor=2)
    split = LengthBucketSampler(lengths, 4, seed=5, pool_factor=2, grad_accum=2)
    fine = LengthBucketSampler(lengths, 1, seed=5, pool_factor=2, grad_accum=8)
    for s in (whole, split, fine):
        s.set_epoch(3)
    assert _window_clips(whole) == _window_clips(split) == _window_clips(fine)
    assert all(len(b) <= 4 for b in split) and sum(split.window_sizes()) == len(split) == len(list(split))
    assert sorted(i for b in split for i in b) == list(range(n_items))


def test_ranks_with_accumulation_split_the_windows_of_one_process():
    lengths = np.random.default_rng(4).integers(20, 600, size=45)
    single = LengthBucketSampler(lengths, 8, seed=2, pool_factor=2)
    ranks = [LengthBucketSampler(lengths, 2, seed=2, pool_factor=2, grad_accum=2, num_replicas=2, rank=r) for r in range(2)]
    together = [sorted(a + b) for a, b in zip(*(_window_clips(r) for r in ranks))]
    assert together == _window_clips(single)


def test_resume_skips_whole_windows_whatever_the_new_split():
    lengths = np.random.default_rng(3).integers(20, 600, size=50)
    before = LengthBucketSampler(lengths, 8, seed=1, pool_factor=2)
    after = LengthBucketSampler(lengths, 2, seed=1, pool_factor=2, grad_accum=4)
    before.set_epoch(2)
    after.set_epoch(2, skip=3)  # three optimiser steps were taken before the stop
    seen = [i for window in before.windows()[:3] for batch in window for i in batch]
    rest = [i for batch in after for i in batch]
    assert sorted(seen + rest) == list(range(50)) and _window_clips(after)[3:] == _window_clips(before)[3:]
