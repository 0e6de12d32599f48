"""Extraction reading its inputs from the decoded-once image cache held on the device
(``extract --data_on device``): the same features as the DataLoader path, resumable, the cache shared
with training and written only for whole splits, and a clear refusal where the path does not apply."""
from __future__ import annotations

from pathlib import Path

import h5py
import pytest
import torch

from common.distributed import DistInfo
from common.errors import UserError
from features.extract import ExtractConfig, SimulatedKill, extract_features, inputs_on
from features.nets import FeatureData, build_feature_data, data_spec_for, load_net
from tests.fakedata import EXTRACT_BATCH as BS
from tests.fakedata import EXTRACT_ROWS as N
from tests.fakedata import tiny_checkpoint
from tests.tolerance import assert_features_close, feature_tolerance
from training import device_data
from training.data import build_dataset, transform_spec
from training.datasets import DataSpec


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {"a": tiny_checkpoint(d / "a.pt", seed=0), "b": tiny_checkpoint(d / "b.pt", seed=1)}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "image-cache"
    monkeypatch.setenv("KC_DATA_CACHE", str(folder))
    return folder


def _extract(ckpts, out: Path, limit: int = N, split: str = "test", mode: str = "auto", **cfg):
    nets = [load_net(n, ckpts[n]) for n in ("a", "b")]
    c = ExtractConfig(split=split, dtype="float32", batch_size=BS, limit=limit, logits=True, **cfg)
    data = build_feature_data(data_spec_for(nets, {}), c.split.split(","), c.limit)
    return lambda **kw: extract_features(nets, data, [("features.4", 4)], out, c, mode, command="test", **kw)


def _assert_same(a: Path, b: Path) -> None:
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        keys = []
        fa.visititems(lambda k, v: keys.append(k) if isinstance(v, h5py.Dataset) else None)
        assert keys and all(k in fb for k in keys)
        for k in keys:
            assert_features_close(fa[k][...], fb[k][...], feature_tolerance(fa[k], fb[k]), k)


def test_device_inputs_give_the_loader_features(ckpts, cache, tmp_path):
    loader = _extract(ckpts, tmp_path / "loader.h5", split="train,test", data_on="loader")()
    held = _extract(ckpts, tmp_path / "device.h5", split="train,test", data_on="device")()
    assert (loader.data_on, held.data_on) == ("loader", "device")
    assert held.rows == {"train": N, "test": N}
    _assert_same(tmp_path / "loader.h5", tmp_path / "device.h5")
    assert not list(cache.glob("*.pt")), "a --limit extraction must not cache a partial split"


def test_a_whole_split_is_cached_once_and_read_back(ckpts, cache, tmp_path, monkeypatch):
    _extract(ckpts, tmp_path / "whole.h5", limit=0, data_on="device")()
    assert len(list(cache.glob("animal-mnist-test-*.pt"))) == 1

    def no_decoding(*a, **k):
        raise AssertionError("the cached split was decoded again")

    monkeypatch.setattr(device_data, "decode_all", no_decoding)
    _extract(ckpts, tmp_path / "again.h5", data_on="device")()        # the first N rows, sliced from the cache
    _extract(ckpts, tmp_path / "loader.h5", data_on="loader")()
    _assert_same(tmp_path / "loader.h5", tmp_path / "again.h5")
    with h5py.File(tmp_path / "whole.h5", "r") as f, h5py.File(tmp_path / "again.h5", "r") as g:
        for net in ("a", "b"):
            whole, part = f[f"test/{net}/features.4"], g[f"test/{net}/features.4"]
            assert_features_close(whole[:N], part[...], feature_tolerance(whole, part), net)   # bitwise on the CPU


def test_device_inputs_resume_after_a_kill(ckpts, cache, tmp_path):
    out = tmp_path / "killed.h5"
    with pytest.raises(SimulatedKill):
        _extract(ckpts, out, data_on="device", flush_s=0.0)(stop_after=2)
    res = _extract(ckpts, out, mode="resume", data_on="device")()
    assert 0 < res.rows["test"] < N                       # only the rows after the last flushed batch
    _extract(ckpts, tmp_path / "loader.h5", data_on="loader")()
    _assert_same(tmp_path / "loader.h5", out)


def test_the_training_and_extraction_caches_agree_where_their_steps_do(tmp_path):
    ds = build_dataset(DataSpec(), "test", train_transform=False)
    for preset, shared in (("paper", True), ("plain", True), ("small", True), ("ke", False)):
        spec = DataSpec(transform=preset)
        tspec = transform_spec(spec)
        paths = {device_data.cache_path(ds, spec, device_data.split_preset(tspec, train)[0], tmp_path)
                 for train in (True, False)}
        assert (len(paths) == 1) == shared, preset


def test_parallel_decoding_equals_decoding_in_process():
    ds = build_dataset(DataSpec(), "test", train_transform=False)
    steps, _ = device_data.split_preset(transform_spec(DataSpec()), False)
    alone = device_data.decode_all(ds, steps, num_workers=0, rows=70, batch_size=16)
    workers = device_data.decode_all(ds, steps, num_workers=2, rows=70, batch_size=16)
    assert alone.shape == (70, 1, 32, 32) and alone.dtype == torch.uint8
    assert torch.equal(alone, workers)


def test_auto_reads_through_the_loader_off_cuda_and_bad_choices_are_named(ckpts, tmp_path):
    nets = [load_net("a", ckpts["a"])]
    data = build_feature_data(data_spec_for(nets, {}), ["test"], N)
    one = DistInfo()
    assert inputs_on(ExtractConfig(), data, ["test"], torch.device("cpu"), one) == "loader"
    with pytest.raises(UserError, match=r"--data_on 'gpu'.*auto, loader, device"):
        extract_features(nets, data, [("features.4", 4)], tmp_path / "x.h5", ExtractConfig(data_on="gpu"))
    tensors = FeatureData(**{**data.__dict__, "splits": {"test": torch.utils.data.TensorDataset(torch.zeros(N, 1))}})
    with pytest.raises(UserError, match="--data_on device needs data sets of images"):
        inputs_on(ExtractConfig(data_on="device"), tensors, ["test"], torch.device("cpu"), one)
