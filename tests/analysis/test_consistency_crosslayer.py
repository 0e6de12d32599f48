"""Cross-layer consistency: net A at one layer -> net B at another (A = B allowed), with the source
pooled or interpolated to the target's H x W where the sizes differ (transnet/spatial.py).

The planted file holds two nets at four layers. ``a`` at ``late`` is a fixed 1x1 channel mix M of
``a`` at ``early`` (4 -> 3 channels, both 4x4); ``small`` is that mix averaged over 2x2 blocks (2x2);
``big`` is that mix upsampled bilinearly (8x8, half-pixel centres, written here with numpy). Every
layer of ``b`` is independent noise. So a@early rebuilds a@late, a@small (after pooling) and a@big
(after interpolation) linearly and almost exactly, and b@late not at all.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from analysis.consistency import (
    ConsistencyConfig,
    pair_dirname,
    plan_pairs,
    read_table,
    run_consistency,
    table_columns,
)
from common.errors import UserError
from features import store
from tests.fakedata import FAST_FIT, FAST_FIT_ARGS
from transnet.fit import FitConfig
from transnet.variance_file import run_variance

N_TRAIN, N_TEST, C_IN, C_OUT, HW = 64, 32, 4, 3, 4


def _bilinear_axis(size: int, out: int) -> np.ndarray:
    """(out, size): bilinear weights, output o at source coordinate (o + 0.5) * size / out - 0.5."""
    m = np.zeros((out, size))
    for o in range(out):
        s = min(max((o + 0.5) * size / out - 0.5, 0.0), size - 1)
        lo = int(np.floor(s))
        hi = min(lo + 1, size - 1)
        m[o, lo] += 1 - (s - lo)
        m[o, hi] += s - lo
    return m


def _crosslayer_features(path: Path) -> Path:
    rng = np.random.default_rng(1)
    mix = rng.normal(size=(C_OUT, C_IN))
    up = _bilinear_axis(HW, 2 * HW)
    with h5py.File(path, "w") as f:
        store.init_root(f, "planted", {}, HW, "tests.analysis.test_consistency_crosslayer")
        for split, n in (("train", N_TRAIN), ("test", N_TEST)):
            early = rng.normal(size=(n, C_IN, HW, HW))
            late = np.einsum("oc,nchw->nohw", mix, early)
            nets = {"a": {"early": early, "late": late,
                          "small": late.reshape(n, C_OUT, HW // 2, 2, HW // 2, 2).mean(axis=(3, 5)),
                          "big": np.einsum("ih,nchw,jw->ncij", up, late, up)},
                    "b": {"early": rng.normal(size=early.shape), "late": rng.normal(size=late.shape),
                          "small": rng.normal(size=(n, C_OUT, 2, 2)), "big": rng.normal(size=(n, C_OUT, 8, 8))}}
            store.init_split(f, split, np.arange(n), np.arange(n) % 3)
            for name, layers in nets.items():
                for layer, x in layers.items():
                    ds = store.create_features(f, split, name, layer, x.shape, "float32", {"arch": "planted"})
                    ds[...] = x.astype(np.float32)
                    store.mark_complete(ds)
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return _crosslayer_features(tmp_path_factory.mktemp("crosslayer") / "features.h5")


def _quiet(msg: str) -> None:
    """The log of the runs under test: messages are not checked here."""


# --------------------------------------------------------------------------- pure parts

def test_cross_layer_plans_allow_a_net_onto_itself_and_same_layer_plans_do_not():
    assert plan_pairs(["a", "b"], "all", cross=True) == [("a", "a"), ("a", "b"), ("b", "b"), ("b", "a")]
    assert plan_pairs(["a"], "a>a", cross=True) == [("a", "a")]
    assert plan_pairs(["a", "b"], "all") == [("a", "b"), ("b", "a")]
    with pytest.raises(UserError, match="onto itself.*--target_layer"):
        plan_pairs(["a", "b"], "a>a")


def test_cross_layer_folders_and_columns_never_look_like_same_layer_ones():
    assert pair_dirname("a", "b") == pair_dirname("a", "b", "conv", "conv") == "a__b"
    assert pair_dirname("a", "b", "early", "late") == "a@early__b@late"
    same = [{"source": "a", "target": "b", "orders": 1}]
    assert not {"source_layer", "target_layer", "spatial"} & set(table_columns(same))
    cross = same + [{"source": "a", "target": "a", "orders": 1, "target_layer": "late"}]
    cols = table_columns(cross)
    assert cols[cols.index("layer") + 1:cols.index("layer") + 4] == ["source_layer", "target_layer", "spatial"]
    assert FitConfig(layer="x", target_layer="x").target_layer == ""          # one spelling of same-layer


# --------------------------------------------------------------------------- refusals (nothing is fitted)

def test_mismatched_sizes_and_bad_layers_are_refused_before_anything_is_written(planted, tmp_path):
    cfg = ConsistencyConfig(str(planted), "early", "a>a", "a,b", target_layer="small")
    with pytest.raises(UserError, match=r"differ in spatial size.*at early: a: 4x4.*at small: a: 2x2.*"
                                        r"--spatial pool\|interpolate"):
        run_consistency(cfg, FAST_FIT, tmp_path / "x", log=_quiet)
    with pytest.raises(UserError, match=r"pair a>a: source maps 4x4, target maps 8x8.*pool only shrinks"):
        run_consistency(ConsistencyConfig(str(planted), "early", "a>a", "a", target_layer="big", spatial="pool"),
                        FAST_FIT, tmp_path / "x", log=_quiet)
    with pytest.raises(UserError, match="unknown layer 'lat'.*Valid layer names: big, early, late, small"):
        run_consistency(ConsistencyConfig(str(planted), "early", "all", target_layer="lat"), FAST_FIT,
                        tmp_path / "x", log=_quiet)
    with pytest.raises(UserError, match="unknown --spatial 'nearest'.*pool, interpolate"):
        run_consistency(ConsistencyConfig(str(planted), "early", "a>a", "a", target_layer="small",
                                          spatial="nearest"), FAST_FIT, tmp_path / "x", log=_quiet)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- fits

@pytest.mark.slow
def test_cross_layer_pairs_rebuild_a_planted_linear_map_and_keep_their_own_folders(planted, tmp_path, cli):
    out = tmp_path / "cons"
    code, _, err = cli("consistency", "--features", planted, "--layer", "early", "--target_layer", "late",
                       "--pairs", "a>a,a>b", "--nets", "a,b", *FAST_FIT_ARGS, "--no_figures", "--out_dir", out)
    assert code == 0, err
    rows = {(r["source"], r["target"]): r for r in read_table(out)}
    assert rows[("a", "a")]["r2"] > 0.98 and rows[("a", "a")]["fraction_order0"] > 0.9
    assert rows[("a", "b")]["r2"] < 0.2 and rows[("a", "b")]["fraction_residual"] > 0.8
    for r in rows.values():
        assert (r["layer"], r["source_layer"], r["target_layer"], r["spatial"]) == ("early", "early", "late", None)
    assert rows[("a", "a")]["transnet_dir"] == "pairs/a@early__a@late"
    fitted = json.loads((out / "pairs" / "a@early__a@late" / "metrics.json").read_text())
    assert fitted["source_layer"] == "early" and fitted["target_layer"] == "late" and "spatial" not in fitted
    with open(out / "table.csv") as fh:
        assert "target_layer" in csv.DictReader(fh).fieldnames
    mats = json.loads((out / "matrices.json").read_text())
    assert mats["target_layer"] == "late"
    assert mats["matrices"]["r2"][0][0] == pytest.approx(rows[("a", "a")]["r2"])      # a net to itself
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["source_layer"] == "early" and summary["target_layer"] == "late"

    # The same nets at one layer are another fit in another folder, written as same-layer fits always were.
    same = run_consistency(ConsistencyConfig(str(planted), "early", "a>b", "a,b"), FAST_FIT, out, "resume",
                           log=_quiet)
    assert same["reused"] == 0
    same_metrics = json.loads((out / "pairs" / "a__b" / "metrics.json").read_text())
    assert not {"source_layer", "target_layer", "spatial"} & set(same_metrics)
    assert "source_layer" not in same["rows"][0]
    again = run_consistency(ConsistencyConfig(str(planted), "early", "a>a,a>b", "a,b", target_layer="late"),
                            FAST_FIT, out, "resume", log=_quiet)
    assert again["reused"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("layer, spatial, size", [("small", "pool", [2, 2]), ("big", "interpolate", [8, 8])])
def test_resized_sources_rebuild_the_target_and_record_the_convention(planted, tmp_path, layer, spatial, size):
    out = tmp_path / spatial
    res = run_consistency(ConsistencyConfig(str(planted), "early", "a>a", "a", target_layer=layer, spatial=spatial),
                          FAST_FIT, out, log=_quiet)
    row = res["rows"][0]
    assert row["r2"] > 0.95                        # measured 0.985 (pool), 0.995 (interpolate); nearest: 0.23
    assert row["spatial"] == spatial and row["source_size"] == [HW, HW] and row["target_size"] == size
    assert json.loads((out / "metrics.json").read_text())["resized_pairs"] == ["a>a"]
    pair = out / "pairs" / f"a@early__a@{layer}"
    assert json.loads((pair / "config.json").read_text())["config"]["spatial"] == spatial
    # The variance command reads the pair back the same way (source resized as in the fit).
    rep = run_variance(pair, split="test", device="cpu")
    assert rep["spatial"] == spatial and rep["target_layer"] == layer
    assert rep["r2"] == pytest.approx(row["r2"], abs=1e-4)


def test_disk_and_memory_sources_serve_the_same_resized_source(planted):
    import torch

    from transnet.data import make_source, open_pair
    from transnet.spatial import resize_maps

    info = open_pair(planted, "a", "a", "early", "test", target_layer="small", spatial="pool")
    assert (info.shape_a, info.held_shape_a, info.shape_b) == ((C_IN, HW, HW), (C_IN, 2, 2), (C_OUT, 2, 2))
    cpu = torch.device("cpu")
    with h5py.File(planted) as f:
        want = resize_maps(torch.from_numpy(f["test/a/early"][...]), (2, 2), "pool")
    for placement in ("ram", "disk"):
        src = make_source(info, cpu, placement, block_rows=7)
        xa = torch.cat([a for a, _ in src.sequential(10)])
        torch.testing.assert_close(xa, want)
        torch.testing.assert_close(torch.cat(list(src.source_blocks(5))), want)
