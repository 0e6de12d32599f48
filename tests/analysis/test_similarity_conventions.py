"""CCA-family conventions: SVCCA's k (fraction of variance or of singular values, or a count), the
numerical rank tolerance tied to the storage dtype, google/svcca's PWCCA convention against a
re-derivation from its description, per-pair refusals decided before the SVD, and the conventions
named in ``similarity.json``."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis import cca as CC
from analysis.similarity_cca import cca_matrices
from analysis.similarity_run import similarity_matrix
from common.errors import UserError
from tests.fakedata import write_features_one_split


def ref_pwcca_svcca_code(x, y):
    """google/svcca's compute_pwcca as its paper and docstrings describe it, written from covariances:
    u = left singular vectors of Sxx^-1/2 Sxy Syy^-1/2; directions u^T (x - mean) + mean; QR; weights
    sum_j |<p_i, x_j>| with uncentred x."""
    a1, a2 = x.T, y.T
    cx = len(a1)
    cov = np.cov(a1, a2)
    sxx, sxy, syy = cov[:cx, :cx], cov[:cx, cx:], cov[cx:, cx:]

    def isqrt(m):
        w, v = np.linalg.eigh(np.linalg.pinv(m))
        return v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T

    u, s, _ = np.linalg.svd(isqrt(sxx) @ sxy @ isqrt(syy))
    mu = a1.mean(1, keepdims=True)
    p, _ = np.linalg.qr((u.T @ (a1 - mu) + mu).T)
    w = np.abs(p.T @ a1.T).sum(1)
    return float(np.sum(w / w.sum() * s))


def latent_net(n=200, maps=4, channels=16, seed=0):
    """A float32 net of ``channels`` channels that mix ``maps`` latent maps (rank ``maps``), and the maps."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, maps, 3, 3))
    x = np.einsum("nchw,cd->ndhw", z, rng.normal(size=(maps, channels))) + 1.0
    return x.astype(np.float32), z.astype(np.float32)


def test_svcca_k_rules_against_numpy_cumsum():
    s = np.array([10.0, 5.0, 3.0, 1.0, 0.5, 0.1])
    var = np.cumsum(s ** 2) / np.sum(s ** 2)
    sing = np.cumsum(s) / np.sum(s)
    for f in (0.5, 0.9, 0.99):
        assert CC.svcca_k(s, f, "variance") == int(np.argmax(var >= f)) + 1
        assert CC.svcca_k(s, f, "singular") == int(np.argmax(sing >= f)) + 1
    assert CC.svcca_k(s, 0.99, "singular") > CC.svcca_k(s, 0.99, "variance")
    assert CC.svcca_k(s, 3, "variance") == 3 and CC.svcca_k(s, 20) == 6
    for bad in (0.0, -1, 2.5):
        with pytest.raises(UserError, match="svcca_keep"):
            CC.svcca_k(s, bad)
    with pytest.raises(UserError, match="singular"):
        CC.svcca_k(s, 0.9, "energy")


def test_svcca_at_a_fixed_count_is_cca_of_the_leading_directions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(150, 8)) @ rng.normal(size=(8, 8))
    y = x[:, :6] @ rng.normal(size=(6, 6)) + rng.normal(size=(150, 6))
    ux = np.linalg.svd(x - x.mean(0), full_matrices=False)[0][:, :3]
    uy = np.linalg.svd(y - y.mean(0), full_matrices=False)[0][:, :3]
    want = np.linalg.svd(ux.T @ uy, compute_uv=False).mean()
    assert CC.svcca_similarity(x, y, keep_variance=3) == pytest.approx(want, rel=1e-10)


def test_pwcca_svcca_code_variant_reproduces_the_google_recipe():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)) + 2
    y = np.tanh(x @ rng.normal(size=(5, 7))) + 0.5 * rng.normal(size=(300, 7))
    got = CC.pwcca_similarity(x, y, variant="svcca-code")
    assert got == pytest.approx(ref_pwcca_svcca_code(x, y), rel=1e-9)
    assert abs(got - CC.pwcca_similarity(x, y)) > 0.02          # a different number than the paper's formula
    with pytest.raises(CC.SimilarityError, match="no more dimensions"):
        CC.pwcca_similarity(y, x, variant="svcca-code")


def test_float32_net_of_four_latent_maps_has_rank_four_and_pwcca_one_against_its_span():
    x, z = latent_net()
    xs, norm = CC.cca_data(x, "pooled")
    view = CC.CCAView.of(xs, norm, CC.storage_eps(x.dtype))
    assert view.rank == 4
    # float64's tolerance counts float32 rounding as dimensions
    s = np.linalg.svd(xs - xs.mean(0), compute_uv=False)
    assert int(np.sum(s > s[0] * max(xs.shape) * np.finfo(np.float64).eps)) > 4
    assert CC.pwcca_similarity(x, z, features="pooled") == pytest.approx(1.0, abs=1e-5)
    assert CC.pwcca_similarity(x, x, features="flat") == pytest.approx(1.0, abs=1e-5)
    # a net holding x's whole span (its 4 maps) and 4 more: weighted by its neurons, x's rounding
    # dimensions would pair with its extra variates; at rank 4 only the 4 shared pairs count
    a = np.concatenate([z, np.random.default_rng(5).normal(size=(len(z), 4, 3, 3)).astype(np.float32)], 1)
    assert CC.pwcca_similarity(a, x, features="pooled") == pytest.approx(1.0, abs=1e-6)
    assert CC.pwcca_similarity(a, x, features="pooled", rank_tol=1e-15) < 0.8      # float64's tolerance
    a16, x16 = a.astype(np.float16), x.astype(np.float16)
    assert CC.pwcca_similarity(a16, x16, features="pooled") == pytest.approx(1.0, abs=1e-6)
    # float16 storage: the tolerance grows with its eps, the rank stays 4
    assert CC.CCAView.of(*CC.cca_data(x.astype(np.float16), "pooled"), CC.storage_eps(np.float16)).rank == 4
    # an explicit relative tolerance overrides the dtype's
    assert CC.CCAView.of(xs, norm, CC.storage_eps(x.dtype), rank_tol=1e-15).rank > 4


def test_refusals_are_per_pair_and_decided_before_the_svd(tmp_path):
    rng = np.random.default_rng(3)
    a = rng.normal(size=(40, 4, 2, 2)).astype(np.float32)
    nets = {"a": a, "b": (a[:, ::-1] * 2).astype(np.float32), "w": rng.normal(size=(40, 38, 2, 2)).astype(np.float32)}
    path = write_features_one_split(tmp_path / "f.h5", nets)
    body = similarity_matrix(path, "conv", metrics="pwcca,r2cca,svcca", permutations=3, svcca_keep=0.5)
    for m in ("pwcca", "r2cca"):
        e = body["metrics"][m]
        assert e["matrix"][0][1] == pytest.approx(1.0, abs=1e-6)
        assert e["matrix"][0][2] is None and e["matrix"][2][2] is None
        pairs = {tuple(r["pair"]) for r in e["refused"]}
        assert (0, 2) in pairs and (2, 2) in pairs and (0, 1) not in pairs
        assert all(r["when"] == "before the SVD" and "meaningless" in r["reason"] for r in e["refused"])
        assert set(e["nets"]) == {"a", "b"}            # w is decomposed only for the metric that needs it
    assert body["metrics"]["svcca"]["matrix"][0][2] is not None     # half of w's variance fits: computed
    assert "w" in body["metrics"]["svcca"]["nets"]
    json.dumps(body, allow_nan=False)


def test_one_refused_metric_leaves_the_others_running(cli, tmp_path):
    rng = np.random.default_rng(4)
    a = rng.normal(size=(30, 3, 3, 3)).astype(np.float32)
    path = write_features_one_split(tmp_path / "f.h5", {"a": a, "b": a + 0.1 * rng.normal(size=a.shape)})
    code, out, err = cli("similarity", "--features", path, "--layer", "conv", "--metric", "svcca,pwcca",
                         "--cca_features", "flat", "--svcca_keep", "0.5", "--permutations", "0",
                         "--out_dir", tmp_path / "o")
    assert code == 0, err
    body = json.loads((tmp_path / "o" / "similarity.json").read_text())
    assert body["metrics"]["svcca"]["matrix"][0][1] > 0.5
    assert body["metrics"]["pwcca"]["matrix"] == [[None, None], [None, None]]
    assert len(body["metrics"]["pwcca"]["refused"]) == 4
    assert "blank: refused (PWCCA is meaningless here" in out


def test_conventions_are_named_in_the_json(tmp_path):
    x, z = latent_net(n=80)
    path = write_features_one_split(tmp_path / "f.h5", {"x": x, "z": z})
    body = similarity_matrix(path, "conv", metrics="svcca,pwcca", permutations=0, svcca_keep=0.9,
                             svcca_rule="singular", pwcca_variant="svcca-code")
    sv, pw = body["metrics"]["svcca"], body["metrics"]["pwcca"]
    assert sv["svcca_rule"].startswith("singular") and sv["svcca_keep"] == 0.9 and sv["cca_features"] == "pooled"
    assert sv["nets"]["x"]["rank"] == 4 and sv["nets"]["x"]["k"] <= 4 and sv["nets"]["x"]["rank_tol"] > 0
    assert sv["nets"]["x"]["storage_eps"] == pytest.approx(np.finfo(np.float32).eps)
    assert "numerical rank" in sv["rank_rule"]
    assert pw["pwcca_variant"] == "svcca-code" and pw["weights"].startswith("row net")
    assert "google/svcca" in pw["weights"]
    # x has 16 channels at rank 4, z 4: svcca-code refuses x as the row net (wider: before the SVD;
    # rank-deficient: after it), with the reasons
    why = {tuple(e["pair"]): (e["when"], e["reason"]) for e in pw["refused"]}
    assert why[(0, 1)][0] == "before the SVD" and "no more dimensions" in why[(0, 1)][1]
    assert why[(0, 0)][0] == "after the SVD" and "full rank" in why[(0, 0)][1]
    assert pw["matrix"][1][0] == pytest.approx(1.0, abs=1e-5) and pw["matrix"][1][1] == pytest.approx(1.0, abs=1e-6)


def test_cca_matrix_vectors_are_the_canonical_correlations():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(100, 3))
    y = np.c_[x @ rng.normal(size=(3, 3)), rng.normal(size=(100, 1))]
    res = cca_matrices([x, y], ["r2cca"], features="flat")["r2cca"]
    rho = res.vectors[(0, 1)]
    np.testing.assert_allclose(rho, [1, 1, 1], atol=1e-10)
    assert res.matrix[0, 1] == pytest.approx(np.mean(rho ** 2))


def test_each_entry_carries_a_one_line_convention_for_tables(tmp_path):
    x, z = latent_net(n=80)
    path = write_features_one_split(tmp_path / "f.h5", {"x": x, "z": z})
    body = similarity_matrix(path, "conv", metrics="svcca,pwcca,cka,shape", permutations=0, svcca_keep=3)
    line = body["metrics"]["svcca"]["convention"]
    assert line.startswith("svcca: pooled features") and "keep 3 directions" in line and "k x 3, z 3" in line
    assert "rank x 4" in line
    assert "weights from the row net" in body["metrics"]["pwcca"]["convention"]
    assert "form (exact)" in body["metrics"]["cka"]["convention"] and "alpha 1" in body["metrics"]["shape"]["convention"]
