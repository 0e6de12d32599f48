"""Similarity metrics on NaN/inf features: a clear error naming the net, layer, split and first row,
for every metric and both CKA forms, never a NaN similarity or a numpy LinAlgError."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from analysis import cca, cka, minibatch_cka
from analysis.similarity_run import similarity_matrix
from analysis.sources import NonFiniteFeatures, check_finite
from tests.fakedata import write_features_one_split
from tests.processes import flat

BAD_ROW = 23


@pytest.fixture
def bad_file(tmp_path):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(40, 3, 2, 2)).astype(np.float32)
    b = (a + 0.3 * rng.normal(size=a.shape)).astype(np.float32)
    c = rng.normal(size=a.shape).astype(np.float32)
    b[BAD_ROW, 1, 0, 1] = np.inf                  # what a float16 overflow leaves behind
    b[BAD_ROW + 5, 0, 1, 1] = np.nan
    return write_features_one_split(tmp_path / "f.h5", {"a": a, "b": b, "c": c}, layer="conv")


@pytest.mark.parametrize("metric, extra", [
    ("cka", {"cka_form": "gram"}), ("cka", {"cka_form": "features"}), ("cka_unbiased", {}),
    ("procrustes", {}), ("cka_minibatch", {"batch_size": 8}), ("svcca", {}), ("pwcca", {}),
    ("svcca", {"cca_features": "flat"}), ("pwcca", {"cca_features": "positions"}),
])
def test_every_metric_names_net_layer_split_and_row(bad_file, metric, extra):
    with pytest.raises(NonFiniteFeatures) as e:
        similarity_matrix(bad_file, "conv", metrics=metric, permutations=3, **extra)
    msg = flat(str(e.value))
    assert "net 'b'" in msg and "layer 'conv'" in msg and "split 'test'" in msg, msg
    assert "--dtype float32" in msg
    if metric != "cka_minibatch":                 # a minibatch sees a random subset: its first bad row
        assert f"first at row {BAD_ROW}" in msg, msg


def test_the_command_exits_with_the_message_not_a_traceback(cli, bad_file, tmp_path):
    code, _, err = cli("similarity", "--features", bad_file, "--layer", "conv", "--metric", "svcca",
                       "--out_dir", tmp_path / "sim")
    assert code == 1
    assert "net 'b'" in err and "LinAlgError" not in err and "Traceback" not in err
    assert not (tmp_path / "sim" / "similarity.json").exists()


def test_counts_stored_at_extraction_fail_before_any_read(bad_file):
    with h5py.File(bad_file, "a") as f:
        f["test/c/conv"].attrs["nonfinite"] = 7
    with pytest.raises(NonFiniteFeatures, match=r"net 'c'.*7 NaN/inf values \(counted at extraction\)"):
        similarity_matrix(bad_file, "conv", nets=["a", "c"], metrics="cka", permutations=0)


def test_arrays_and_the_one_pair_functions_refuse_too():
    x = np.random.default_rng(0).normal(size=(30, 6))
    y = x.copy()
    y[4, 2] = np.nan
    for fn in (cka.linear_cka_similarity, cka.unbiased_cka_similarity, cka.procrustes_distance,
               cca.svcca_similarity, cca.pwcca_similarity, minibatch_cka.minibatch_cka_similarity):
        with pytest.raises(NonFiniteFeatures, match=r"an array of shape \(30, 6\).*first at row 4"):
            fn(x, y)


def test_check_finite_against_numpy():
    rng = np.random.default_rng(1)
    for _ in range(50):
        blk = rng.normal(size=(rng.integers(1, 9), 5)).astype(rng.choice([np.float16, np.float32, np.float64]))
        bad = rng.random(blk.shape) < 0.05
        blk[bad] = rng.choice([np.nan, np.inf, -np.inf])
        want = np.flatnonzero(~np.isfinite(blk).all(1))
        if len(want):
            with pytest.raises(NonFiniteFeatures, match=f"first at row {10 + want[0]}"):
                check_finite(blk, blk, first_row=10)
        else:
            check_finite(blk, blk, first_row=10)
    big = np.full((2, 4), 6e4, dtype=np.float16)   # finite values whose float16 sum would overflow
    check_finite(big, big)
