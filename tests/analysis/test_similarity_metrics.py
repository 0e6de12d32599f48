"""RBF CKA, R²_CCA and the generalized shape metric against independent references (numpy/scipy
definitions, closed-form relations to Procrustes and CCA, the triangle inequality), and their
matrix nulls against the one-pair permutation test."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from analysis import similarity as S
from analysis.cka_rbf import rbf_cka_matrices
from analysis.similarity_shape import shape_matrix
from common.errors import UserError


def ref_rbf_gram(x, sigma):
    """Kornblith et al.'s recipe: exp(-d^2 / (2 sigma^2 median(d^2))) over all n^2 entries."""
    x = x.reshape(len(x), -1)
    d2 = cdist(x, x, "sqeuclidean")
    return np.exp(-d2 / (2 * sigma ** 2 * np.median(d2)))


def ref_hsic(k, l, unbiased):
    n = len(k)
    if not unbiased:
        h = np.eye(n) - 1.0 / n
        return np.trace(k @ h @ l @ h) / (n - 1) ** 2
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def ref_rbf_cka(x, y, sigma, unbiased=False):
    k, l = ref_rbf_gram(x, sigma), ref_rbf_gram(y, sigma)
    return ref_hsic(k, l, unbiased) / np.sqrt(ref_hsic(k, k, unbiased) * ref_hsic(l, l, unbiased))


@pytest.fixture
def trio():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 3, 2, 2))
    y = np.tanh(np.einsum("nchw,cd->ndhw", x, rng.normal(size=(3, 4)))) + 0.3 * rng.normal(size=(50, 4, 2, 2))
    z = rng.normal(size=(50, 3, 2, 2))
    return x, y, z


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("sigma", [0.4, 0.8])
def test_rbf_cka_matches_the_kernel_definition(trio, unbiased, sigma):
    x, y, _ = trio
    name = "cka_rbf_unbiased" if unbiased else "cka_rbf"
    assert S.get_metric(name)(x, y, sigma=sigma) == pytest.approx(ref_rbf_cka(x, y, sigma, unbiased), rel=1e-9)


def test_rbf_cka_is_one_for_a_rotated_scaled_copy_and_refuses_a_bad_bandwidth(trio):
    x, _, _ = trio
    flat = x.reshape(50, -1)
    q, _ = np.linalg.qr(np.random.default_rng(8).normal(size=(12, 12)))
    assert S.get_metric("cka_rbf")(flat, 3.0 * flat @ q + 1.0) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(UserError, match="rbf_sigma"):
        S.get_metric("cka_rbf")(x, x, sigma=0.0)


def test_rbf_cka_matrix_and_null_equal_the_one_pair_permutation_test(trio):
    nets = list(trio)
    res = rbf_cka_matrices(nets, ["cka_rbf", "cka_rbf_unbiased"], sigma=0.8, permutations=5, seed=4)
    for m in ("cka_rbf", "cka_rbf_unbiased"):
        ref = S.permutation_test(m, nets[0], nets[1], permutations=5, seed=4, sigma=0.8)
        assert res[m].matrix[0, 1] == pytest.approx(ref.observed, rel=1e-10)
        np.testing.assert_allclose(res[m].null[:, 0, 1], ref.null, rtol=1e-9)
        assert res[m].matrix[1, 0] == res[m].matrix[0, 1]
        assert set(res[m].details["bandwidth"]) == {"0", "1", "2"}


def test_r2cca_is_the_mean_squared_canonical_correlation():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(200, 4))
    y = np.c_[x[:, :2] @ rng.normal(size=(2, 2)), rng.normal(size=(200, 2))]      # two shared dims of four
    a, b = x - x.mean(0), y - y.mean(0)
    qa, qb = np.linalg.qr(a)[0], np.linalg.qr(b)[0]
    rho = np.linalg.svd(qa.T @ qb, compute_uv=False)
    assert S.get_metric("r2cca")(x, y) == pytest.approx(np.mean(rho ** 2), rel=1e-10)
    assert 0.5 <= S.get_metric("r2cca")(x, y) < 0.55                       # (1 + 1 + ~0 + ~0) / 4


def test_shape_metric_at_alpha_one_is_the_angular_procrustes_distance(trio):
    x, y, _ = trio
    p = S.get_metric("procrustes")(x, y)                    # ||A R - B||^2 = 2 - 2 cos(theta)
    got = S.get_metric("shape")(x, y, alpha=1.0, features="flat")
    assert got == pytest.approx(np.arccos(1 - p / 2), rel=1e-9)


def test_shape_metric_at_alpha_zero_is_the_angle_of_the_mean_canonical_correlation(trio):
    x, _, z = trio
    xs, zs = x.mean((2, 3)), z.mean((2, 3))                # pooled: 3 channels each, full rank
    rho = np.linalg.svd(np.linalg.qr(xs - xs.mean(0))[0].T @ np.linalg.qr(zs - zs.mean(0))[0], compute_uv=False)
    got = S.get_metric("shape")(x, z, alpha=0.0, features="pooled")
    assert got == pytest.approx(np.arccos(rho.mean()), rel=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_shape_metric_satisfies_the_triangle_inequality(alpha):
    rng = np.random.default_rng(10)
    base = rng.normal(size=(60, 4))
    nets = [base @ rng.normal(size=(4, 4)) + s * rng.normal(size=(60, 4)) for s in (0.2, 0.5, 1.0, 2.0, 4.0)]
    d = shape_matrix(nets, alpha=alpha, features="flat").matrix
    assert np.allclose(np.diag(d), 0, atol=1e-6) and np.allclose(d, d.T)
    k = len(nets)
    for i in range(k):
        for j in range(k):
            for m in range(k):
                assert d[i, m] <= d[i, j] + d[j, m] + 1e-9


def test_shape_matrix_null_equals_the_one_pair_permutation_test_and_whitening_is_refused_on_few_rows(trio):
    x, y, z = trio
    res = shape_matrix([x, y, z], alpha=0.5, features="pooled", permutations=4, seed=1)
    ref = S.permutation_test("shape", y, z, permutations=4, seed=1, alpha=0.5, features="pooled")
    assert res.matrix[1, 2] == pytest.approx(ref.observed, rel=1e-9)
    np.testing.assert_allclose(res.null[:, 1, 2], ref.null, rtol=1e-9)
    res = shape_matrix([x, y], alpha=0.5, features="flat")          # 50 rows, 12 + 16 dims: fine
    assert np.isfinite(res.matrix).all()
    few = shape_matrix([x[:20], y[:20]], alpha=0.5, features="flat")
    assert np.isnan(few.matrix[0, 1]) and "meaningless" in few.refused[0]["reason"]
    assert np.isfinite(shape_matrix([x[:20], y[:20]], alpha=1.0, features="flat").matrix).all()


def test_the_command_writes_the_new_metrics_and_the_canonical_correlations(cli, trio, tmp_path):
    import json

    from tests.fakedata import write_features_one_split

    x, y, z = (a.astype(np.float32) for a in trio)
    path = write_features_one_split(tmp_path / "f.h5", {"x": x, "y": y, "z": z})
    code, out, err = cli("similarity", "--features", path, "--layer", "conv", "--metric",
                         "cka_rbf,cka_rbf_unbiased,r2cca,svcca,shape", "--rbf_sigma", "0.4", "--shape_alpha", "0.5",
                         "--svcca_keep", "2", "--permutations", "3", "--out_dir", tmp_path / "o")
    assert code == 0, err
    body = json.loads((tmp_path / "o" / "similarity.json").read_text())
    ms = body["metrics"]
    assert ms["cka_rbf"]["rbf_sigma"] == 0.4 and ms["shape"]["shape_alpha"] == 0.5
    assert ms["shape"]["direction"] == "distance" and ms["shape"]["matrix"][0][0] == pytest.approx(0, abs=1e-6)
    assert ms["cka_rbf"]["matrix"][0][1] == pytest.approx(ref_rbf_cka(x.astype(float), y.astype(float), 0.4), rel=1e-6)
    assert ms["svcca"]["nets"]["x"]["k"] == 2 and ms["svcca"]["correlations_file"] == "cca_correlations.npz"
    vec = np.load(tmp_path / "o" / "cca_correlations.npz")
    assert vec["svcca/x/y"].shape == (2,) and vec["r2cca/x/z"].shape == (3,)
    assert ms["r2cca"]["matrix"][0][2] == pytest.approx(np.mean(vec["r2cca/x/z"] ** 2))


# --------------------------------------------------------------------------- fit on one split, score on another

def test_fitting_and_scoring_on_the_same_rows_gives_the_in_sample_values(trio):
    from analysis.similarity_cca import CCAOptions
    from analysis.similarity_split import split_matrices

    nets = list(trio)
    opts = CCAOptions(features="pooled", keep=0.99)
    res = split_matrices(nets, nets, ["svcca", "pwcca", "r2cca", "procrustes", "shape"], opts=opts, alpha=0.5)
    for m, kw in (("svcca", dict(features="pooled")), ("pwcca", dict(features="pooled")),
                  ("r2cca", dict(features="pooled")), ("procrustes", {}), ("shape", dict(alpha=0.5, features="pooled"))):
        for i, j in ((0, 1), (1, 2), (2, 0)):
            assert res[m].matrix[i, j] == pytest.approx(S.get_metric(m)(nets[i], nets[j], **kw), rel=1e-8, abs=1e-10), m


def test_held_out_scores_remove_the_in_sample_inflation_of_unrelated_nets(cli, tmp_path):
    import json

    from tests.fakedata import write_features_by_split

    rng = np.random.default_rng(11)
    split = {s: {"a": rng.normal(size=(n, 8, 2, 2)), "b": rng.normal(size=(n, 8, 2, 2))}
             for s, n in (("train", 30), ("test", 400))}
    mix = rng.normal(size=(8, 8)) + 3 * np.eye(8)
    for s in split:                                   # c is an invertible channel mixing of a: related
        split[s]["c"] = np.einsum("nchw,cd->ndhw", split[s]["a"], mix)
    path = write_features_by_split(tmp_path / "f.h5", split, layer="conv")
    common = ["similarity", "--features", path, "--layer", "conv", "--metric", "r2cca,svcca,procrustes,shape,cka",
              "--svcca_keep", "1.0", "--permutations", "5"]
    assert cli(*common, "--split", "train", "--out_dir", tmp_path / "in")[0] == 0
    code, _, err = cli(*common, "--fit_split", "train", "--score_split", "test", "--out_dir", tmp_path / "out")
    assert code == 0, err
    ins = json.loads((tmp_path / "in" / "similarity.json").read_text())["metrics"]
    out = json.loads((tmp_path / "out" / "similarity.json").read_text())
    assert out["fit_split"] == "train" and out["split"] == "test"
    held = out["metrics"]
    assert ins["r2cca"]["matrix"][0][1] > 0.15 and abs(held["r2cca"]["matrix"][0][1]) < 0.05   # a vs b unrelated
    assert held["r2cca"]["matrix"][0][2] == pytest.approx(1.0, abs=1e-6)                      # a vs c: exact map
    assert held["procrustes"]["held_out"].startswith("alignment fitted") and held["procrustes"]["fit_rows"] == 30
    assert "in-sample on the test rows" in held["cka"]["in_sample"]
    assert held["svcca"]["p_values"][0][2] == pytest.approx(1 / 6)
    code, _, err = cli(*common, "--score_split", "test", "--out_dir", tmp_path / "bad")
    assert code == 1 and "needs --fit_split" in err


# --------------------------------------------------------------------------- layers of different spatial size

def _axis_matrix(size: int, out: int, mode: str) -> np.ndarray:
    """The (out, size) linear map of one axis, written out independently: adaptive windows
    floor(i*size/out) .. ceil((i+1)*size/out) for pool; half-pixel centres clamped to the edge for bilinear."""
    m = np.zeros((out, size))
    for i in range(out):
        if mode == "pool":
            a, b = (i * size) // out, -(-((i + 1) * size) // out)
            m[i, a:b] = 1.0 / (b - a)
        else:
            src = max((i + 0.5) * size / out - 0.5, 0.0)
            lo = min(int(np.floor(src)), size - 1)
            hi = min(lo + 1, size - 1)
            m[i, lo] += 1.0 - (src - lo)
            m[i, hi] += src - lo
    return m


@pytest.mark.parametrize("mode", ["pool", "interpolate"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_spatial_resizing_is_the_per_axis_linear_map_in_the_storage_dtype(tmp_path, mode, dtype):
    """R_h X R_w^T per channel, read from an HDF5 dataset, kept in its storage dtype."""
    import h5py

    from analysis.similarity_spatial import resize

    x = np.random.default_rng(12).normal(size=(3, 2, 7, 5)).astype(dtype)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["x"] = x
        got = resize(f["x"], (3, 2), mode)
    want = np.einsum("ih,nchw,jw->ncij", _axis_matrix(7, 3, mode), x.astype(np.float64), _axis_matrix(5, 2, mode))
    assert got.dtype == dtype and got.shape == (3, 2, 3, 2)
    np.testing.assert_allclose(got.astype(np.float64), want.astype(dtype), rtol=1e-3 if dtype == np.float16 else 1e-6,
                               atol=1e-3 if dtype == np.float16 else 1e-6)


def test_positions_mode_compares_layers_of_different_size_after_pooling(tmp_path):
    from analysis.similarity_run import similarity_matrix
    from tests.fakedata import write_features_one_split

    rng = np.random.default_rng(13)
    big = rng.normal(size=(40, 3, 4, 4)).astype(np.float32)
    small = big.reshape(40, 3, 2, 2, 2, 2).mean((3, 5))[:, ::-1].copy()        # 2x2 average pool, channels reversed
    path = write_features_one_split(tmp_path / "f.h5", {"big": big})
    from features.store import create_features, mark_complete, open_features
    with open_features(path, "a") as f:
        ds = create_features(f, "test", "small", "conv", small.shape, "float32", {})
        ds[...] = small
        mark_complete(ds)
    kw = dict(metrics="svcca,cka", permutations=0, cca_features="positions", svcca_keep=1.0)
    with pytest.raises(UserError, match="--spatial"):
        similarity_matrix(path, "conv", **kw)
    body = similarity_matrix(path, "conv", spatial="pool", **kw)
    sv = body["metrics"]["svcca"]
    assert sv["matrix"][0][1] == pytest.approx(1.0, abs=1e-6)
    assert sv["spatial"]["mode"] == "pool" and sv["spatial"]["size"] == [2, 2]
    assert sv["spatial"]["from"] == {"big": [4, 4], "small": [2, 2]} and "spatial" not in body["metrics"]["cka"]


def test_partial_whitening_follows_the_eigendecomposition_recipe(trio):
    """Z = Xc V diag(alpha + (1 - alpha) lam^-1/2) V^T with lam, V the eigenpairs of Xc^T Xc (netrep's
    convention), then the angle of the best orthogonal alignment."""
    x, y, _ = trio
    alpha = 0.3

    def whiten(a):
        a = a.mean((2, 3)).astype(float)
        a = a - a.mean(0)
        lam, v = np.linalg.eigh(a.T @ a)
        return a @ (v * (alpha + (1 - alpha) * lam ** -0.5)) @ v.T

    zx, zy = whiten(x), whiten(y)
    want = np.arccos(np.linalg.svd(zx.T @ zy, compute_uv=False).sum() / (np.linalg.norm(zx) * np.linalg.norm(zy)))
    assert S.get_metric("shape")(x, y, alpha=alpha, features="pooled") == pytest.approx(want, rel=1e-9)


def test_the_parsers_metric_names_are_the_registry_names():
    from analysis import config
    from analysis.similarity import METRICS

    assert list(config.METRICS) == METRICS.names(), "update analysis/config.py METRICS"
