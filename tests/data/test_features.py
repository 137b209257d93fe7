"""Feature stores (flat / nested layouts) and safe loading of one feature file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sonar_ft.data import features as features_mod
from sonar_ft.data.features import FeatureStore, feature_shape, load_feature_file
from sonar_ft.errors import ConfigError, DataError


def save_npy(folder: Path, clip_id: str, arr: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{clip_id}.npy", arr)
    return folder / f"{clip_id}.npy"


def save_pt(folder: Path, clip_id: str, obj: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(obj, folder / f"{clip_id}.pt")
    return folder / f"{clip_id}.pt"


def frames(t: int, d: int = 4, start: float = 0.0) -> np.ndarray:
    return (np.arange(t * d, dtype=np.float32) + start).reshape(t, d)


# --- layouts ------------------------------------------------------------------------------


def test_flat_npy_and_pt_in_one_folder(tmp_path):
    save_npy(tmp_path, "a", frames(3))
    save_pt(tmp_path, "b", torch.from_numpy(frames(5)))
    store = FeatureStore.open(tmp_path)
    assert (store.layout, store.ids()) == ("flat", ["a", "b"])
    assert torch.equal(store.load("a"), torch.from_numpy(frames(3)))
    assert torch.equal(store.load("b"), torch.from_numpy(frames(5)))


def test_pt_dict_with_features(tmp_path):
    save_pt(tmp_path, "a", {"features": torch.ones(6, 4), "video_id": "vid", "text": "hello"})
    assert torch.equal(FeatureStore.open(tmp_path).load("a"), torch.ones(6, 4))


def test_nested_layout_uses_numerically_first_epoch(tmp_path):
    # "10" sorts before "2" as text; the numerically-first epoch is 2.
    save_pt(tmp_path / "10" / "clip1", "clip1_x", torch.zeros(3, 4))
    save_pt(tmp_path / "2" / "clip1", "clip1_x", torch.ones(3, 4))
    save_pt(tmp_path / "2" / "other", "other_y", torch.ones(2, 4))
    store = FeatureStore.open(tmp_path)
    assert (store.layout, store.epoch, store.ids()) == ("nested", "2", ["clip1_x", "other_y"])
    assert torch.equal(store.load("clip1_x"), torch.ones(3, 4))


def test_nested_layout_epoch_can_be_chosen(tmp_path):
    save_pt(tmp_path / "0" / "clip1", "clip1_x", torch.zeros(3, 4))
    save_pt(tmp_path / "1" / "clip1", "clip1_x", torch.ones(3, 4))
    store = FeatureStore.open(tmp_path, epoch=1)
    assert torch.equal(store.load("clip1_x"), torch.ones(3, 4))


def test_nested_layout_unknown_epoch(tmp_path):
    save_pt(tmp_path / "0" / "clip1", "clip1_x", torch.zeros(3, 4))
    with pytest.raises(DataError, match=r"epoch 5 not found in .*available: 0"):
        FeatureStore.open(tmp_path, epoch=5)


def test_epoch_on_flat_folder_is_a_config_error(tmp_path):
    save_npy(tmp_path, "a", frames(3))
    with pytest.raises(ConfigError, match="--epoch"):
        FeatureStore.open(tmp_path, epoch=0)


def test_one_epoch_folder_with_prefix_folders(tmp_path):
    # An all-digit prefix folder must not be taken for an epoch.
    save_pt(tmp_path / "12345", "12345abc", torch.zeros(2, 4))
    save_pt(tmp_path / "abcde", "abcdefg", torch.zeros(3, 4))
    store = FeatureStore.open(tmp_path)
    assert (store.layout, store.ids()) == ("nested", ["12345abc", "abcdefg"])


def test_temporary_and_hidden_files_are_ignored(tmp_path):
    save_npy(tmp_path, "a", frames(3))
    (tmp_path / ".tmp-b.npy").write_bytes(b"half written")
    (tmp_path / "._a.npy").write_bytes(b"macOS resource fork")
    (tmp_path / "notes.txt").write_text("not a feature file")
    assert FeatureStore.open(tmp_path).ids() == ["a"]


def test_same_id_twice_is_refused(tmp_path):
    save_npy(tmp_path, "a", frames(3))
    save_pt(tmp_path, "a", torch.zeros(3, 4))
    with pytest.raises(DataError, match=r"more than one feature file.*a\.npy, .*a\.pt"):
        FeatureStore.open(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="features folder not found.*nope"):
        FeatureStore.open(tmp_path / "nope")


def test_folder_without_feature_files(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no .npy or .pt feature files in"):
        FeatureStore.open(tmp_path)


def test_folder_is_indexed_once(tmp_path, monkeypatch):
    save_npy(tmp_path, "a", frames(3))
    store = FeatureStore.open(tmp_path)

    def no_scandir(path):
        raise AssertionError(f"folder walked again: {path}")

    monkeypatch.setattr(features_mod.os, "scandir", no_scandir)
    assert store.load("a").shape == (3, 4)
    assert store.num_frames("a") == 3


def test_unknown_id(tmp_path):
    save_npy(tmp_path, "a", frames(3))
    store = FeatureStore.open(tmp_path)
    assert store.path("zzz") is None
    with pytest.raises(DataError, match="no feature file for clip 'zzz'"):
        store.load("zzz")


# --- one file ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int16, np.int64, np.uint8, np.float16, np.float64])
def test_npy_dtypes_become_float32(tmp_path, dtype):
    arr = np.arange(12).reshape(3, 4).astype(dtype)
    out = load_feature_file(save_npy(tmp_path, "a", arr))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.arange(12, dtype=torch.float32).reshape(3, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int32])
def test_pt_dtypes_become_float32(tmp_path, dtype):
    out = load_feature_file(save_pt(tmp_path, "a", torch.arange(12).reshape(3, 4).to(dtype)))
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.arange(12, dtype=torch.float32).reshape(3, 4))


def test_pt_slice_does_not_keep_parent_storage(tmp_path):
    big = torch.zeros(1000, 4)
    out = load_feature_file(save_pt(tmp_path, "a", big[:2]))
    assert out.untyped_storage().nbytes() == 2 * 4 * 4


@pytest.mark.parametrize(
    ("shape", "hint"), [((5,), "1-D array"), ((1, 5, 4), "batch of one clip"), ((5, 0), "D > 0")]
)
def test_npy_wrong_rank_names_file(tmp_path, shape, hint):
    path = save_npy(tmp_path, "bad", np.zeros(shape, np.float32))
    with pytest.raises(DataError, match=rf"{path}.*expected 2-D.*{hint}"):
        load_feature_file(path)


def test_pt_wrong_rank_names_file(tmp_path):
    path = save_pt(tmp_path, "bad", torch.zeros(1, 5, 4))
    with pytest.raises(DataError, match=rf"{path}.*shape \(1, 5, 4\); expected 2-D"):
        load_feature_file(path)


def test_pt_dict_without_features(tmp_path):
    path = save_pt(tmp_path, "bad", {"feats": torch.zeros(3, 4)})
    with pytest.raises(DataError, match=rf"{path} is a dict without a 'features' entry \(keys: 'feats'\)"):
        load_feature_file(path)


def test_pt_holding_a_list(tmp_path):
    path = save_pt(tmp_path, "bad", [torch.zeros(3, 4)])
    with pytest.raises(DataError, match=rf"{path} holds a list, not a tensor"):
        load_feature_file(path)


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"a{suffix}"
    path.write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_feature_file(path)
    assert str(path) in str(err.value) and "empty" in str(err.value)


def test_truncated_npy(tmp_path):
    path = save_npy(tmp_path, "a", frames(100))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=rf"{path} cannot be read.*truncated"):
        load_feature_file(path)


def test_truncated_pt(tmp_path):
    path = save_pt(tmp_path, "a", torch.zeros(100, 4))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=rf"cannot read feature file {path}.*truncated"):
        load_feature_file(path)


def test_npy_without_header(tmp_path):
    path = tmp_path / "a.npy"
    path.write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match=rf"{path} is not a .npy file"):
        load_feature_file(path)


def test_npy_with_python_objects_is_refused(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.array([[object()]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=rf"{path} holds Python objects"):
        load_feature_file(path)


class _RunsCommand:
    """Pickles to a call of os.system: loading it with plain torch.load runs the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pt_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = save_pt(tmp_path / "feats", "evil", {"features": _RunsCommand(marker)})
    store = FeatureStore.open(tmp_path / "feats")
    with pytest.raises(DataError, match=rf"{path}.*refusing to load"):
        store.load("evil")
    assert not marker.exists()


def test_unknown_suffix(tmp_path):
    path = tmp_path / "a.h5"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match=r"a\.h5 has suffix '\.h5'"):
        load_feature_file(path)


def test_feature_shape_reads_npy_header_only(tmp_path, monkeypatch):
    path = save_npy(tmp_path, "a", frames(7, 3))
    calls = []
    real_memmap, real_frombuffer = np.memmap, np.frombuffer

    def memmap(*args, **kwargs):
        calls.append(("memmap", kwargs.get("mode")))
        return real_memmap(*args, **kwargs)

    def frombuffer(*args, **kwargs):
        calls.append(("frombuffer", None))  # the data read into memory
        return real_frombuffer(*args, **kwargs)

    monkeypatch.setattr(features_mod.np, "memmap", memmap)
    monkeypatch.setattr(features_mod.np, "frombuffer", frombuffer)
    assert feature_shape(path) == (7, 3)
    assert calls == [("memmap", "r")]  # mapped (which also catches a truncated file), not read


def test_feature_shape_of_pt(tmp_path):
    assert feature_shape(save_pt(tmp_path, "a", {"features": torch.zeros(9, 2)})) == (9, 2)


# -- .npy reading without np.load: same arrays, headers parsed one thread at a time ---------------
@pytest.mark.parametrize("dtype", ["<f4", ">f8", "<f2", "<i2", "u1"])
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_npy_reader_returns_what_numpy_saved(tmp_path, dtype, order, version):
    arr = np.asarray(np.random.default_rng(0).normal(size=(6, 5)) * 10, dtype=dtype, order=order)
    path = tmp_path / "clip.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array(f, arr, version=version)
    for mmap in (False, True):
        got = features_mod._read_npy(path, mmap=mmap)
        assert got.dtype == arr.dtype and got.shape == arr.shape and np.array_equal(got, arr)
    tensor = load_feature_file(path)
    assert torch.equal(tensor, torch.from_numpy(arr.astype(np.float32)))


def test_npy_headers_are_never_parsed_by_two_threads_at_once(tmp_path, monkeypatch):
    """NumPy parses headers with ast.literal_eval, which CPython 3.11 does not make thread-safe."""
    import ast
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    for i in range(16):
        np.save(tmp_path / f"c{i}.npy", np.ones((3, 4), dtype=np.float32))
    inside, most, lock = 0, 0, threading.Lock()
    real = ast.literal_eval

    def watched(node):
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.005)  # widen the window two unguarded parses would overlap in
        try:
            return real(node)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(ast, "literal_eval", watched)
    with ThreadPoolExecutor(max_workers=8) as pool:
        shapes = list(pool.map(lambda i: features_mod._read_npy(tmp_path / f"c{i % 16}.npy", mmap=i % 2 == 0).shape, range(64)))
    assert shapes == [(3, 4)] * 64
    assert most == 1
