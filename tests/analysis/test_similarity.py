"""Similarity baselines: every metric against an independent numpy/scipy reference, the invariances
of methods.md §4, streaming = in-memory, the permutation null, and the ``similarity`` command."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from analysis import cca as CC
from analysis import cka as C
from analysis import minibatch_cka as MB
from analysis import similarity as S
from analysis import similarity_results as R
from analysis import sources as SRC
from analysis.similarity_run import similarity_matrix
from common.errors import UserError
from features.store import create_features, mark_complete, open_features
from tests.fakedata import write_features_one_split

FORMS = ("features", "gram")


# --------------------------------------------------------------------------- references (independent)

def ref_cka(x, y):
    """Biased linear CKA with the explicit centring matrix H."""
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def ref_hsic_u_bruteforce(k, l):
    """The HSIC U-statistic by its definition: mean over ordered distinct quadruples (i, j, q, r) of
    k_ij l_ij + k_ij l_qr - 2 k_ij l_iq."""
    n = len(k)
    quads = np.array(list(itertools.permutations(range(n), 4)))
    i, j, q, r = quads.T
    return float(np.mean(k[i, j] * l[i, j] + k[i, j] * l[q, r] - 2 * k[i, j] * l[i, q]))


def ref_hsic_u(k, l):
    """Song et al. 2012 closed form with explicitly zeroed diagonals (for n too large for brute force)."""
    n = len(k)
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (np.trace(kt @ lt) + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ kt @ lt @ one) / (n * (n - 3))


def ref_unbiased_cka(x, y):
    x, y = x.reshape(len(x), -1), y.reshape(len(y), -1)
    k, l = x @ x.T, y @ y.T
    return ref_hsic_u(k, l) / np.sqrt(ref_hsic_u(k, k) * ref_hsic_u(l, l))


def inv_sqrt(c):
    w, v = np.linalg.eigh(c)
    return v @ np.diag(w ** -0.5) @ v.T


def ref_cca(x, y):
    """Classical CCA by covariance whitening: rho = svd(Sxx^-1/2 Sxy Syy^-1/2); x's canonical variates
    h = Xc Sxx^-1/2 u (unit norm); PWCCA weights sum_j |<h_i, xc_j>|."""
    a, b = x - x.mean(0), y - y.mean(0)
    wx, wy = inv_sqrt(a.T @ a), inv_sqrt(b.T @ b)
    u, rho, _ = np.linalg.svd(wx @ a.T @ b @ wy, full_matrices=False)
    h = a @ wx @ u
    alpha = np.abs(h.T @ a).sum(1)
    return rho, float(alpha @ rho / alpha.sum())


def ref_svd_truncate(x, keep):
    a = x - x.mean(0)
    u, s, _ = np.linalg.svd(a, full_matrices=False)
    k = int(np.argmax(np.cumsum(s ** 2) / np.sum(s ** 2) >= keep - 1e-12)) + 1
    return u[:, :k] * s[:k]


def ref_procrustes(x, y):
    """min_R ||A R - B||_F^2 with scipy's orthogonal_procrustes, A and B centred, unit Frobenius norm,
    the narrower one zero-padded."""
    a, b = x.reshape(len(x), -1), y.reshape(len(y), -1)
    a, b = a - a.mean(0), b - b.mean(0)
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    d = max(a.shape[1], b.shape[1])
    a, b = np.pad(a, ((0, 0), (0, d - a.shape[1]))), np.pad(b, ((0, 0), (0, d - b.shape[1])))
    r, _ = sl.orthogonal_procrustes(a, b)
    return float(np.sum((a @ r - b) ** 2))


def planted(seed=0, n=40, c=3, hw=2, cy=4, noise=1.0, offset=5.0):
    """x (n, c, hw, hw) with a large mean, y a channel mixing of x plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, c, hw, hw)) + offset
    y = np.einsum("nchw,cd->ndhw", x, rng.normal(size=(c, cy))) + noise * rng.normal(size=(n, cy, hw, hw))
    return x, y


def random_orthogonal(d, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q


# --------------------------------------------------------------------------- CKA

@pytest.mark.parametrize("form", FORMS)
def test_cka_of_features_with_themselves_is_one(form):
    x, _ = planted()
    assert S.linear_cka_similarity(x, x, form=form) == pytest.approx(1.0, abs=1e-12)
    assert S.unbiased_cka_similarity(x, x, form=form) == pytest.approx(1.0, abs=1e-12)
    assert S.procrustes_distance(x, x, form=form) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("side", ["x", "y"])
def test_cka_and_procrustes_invariant_to_orthogonal_transform_and_isotropic_scaling(form, side):
    x, y = planted(seed=1)
    x2, y2 = x.reshape(len(x), -1), y.reshape(len(y), -1)
    if side == "x":
        x2 = 3.7 * x2 @ random_orthogonal(x2.shape[1], 5)
    else:
        y2 = 0.02 * y2 @ random_orthogonal(y2.shape[1], 6)
    for fn in (S.linear_cka_similarity, S.unbiased_cka_similarity, S.procrustes_distance):
        assert fn(x2, y2, form=form) == pytest.approx(fn(x, y, form=form), rel=1e-9, abs=1e-12)
    assert S.linear_cka_similarity(x, y) < 0.99        # the planted pair is not trivially identical


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("block_bytes", [300, 2368, 1 << 20])   # 2368: 2 of 3 channels per Gram block
def test_biased_cka_matches_centring_matrix_reference(form, block_bytes):
    x, y = planted(seed=2, n=37, cy=5)
    assert S.linear_cka_similarity(x, y, form=form, block_bytes=block_bytes) == pytest.approx(ref_cka(x, y), rel=1e-11)


def test_unbiased_hsic_matches_u_statistic_definition():
    x, y = planted(seed=3, n=8, c=2, hw=1, cy=2)
    x, y = x.reshape(8, -1), y.reshape(8, -1)
    k, l = x @ x.T, y @ y.T
    want = ref_hsic_u_bruteforce(k, l)
    assert C.hsic_unbiased(k, l) == pytest.approx(want, rel=1e-10)
    assert C.feature_moments(x, y, block_bytes=40).hsic_unbiased == pytest.approx(want, rel=1e-10)
    kc = C.centred_gram(x, block_bytes=8 * 8)      # translation invariance: centred Grams give the same
    assert C.gram_moments(kc, C.centred_gram(y)).hsic_unbiased == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("form", FORMS)
def test_unbiased_cka_matches_reference(form):
    x, y = planted(seed=4, n=45)
    assert S.unbiased_cka_similarity(x, y, form=form, block_bytes=500) == pytest.approx(ref_unbiased_cka(x, y),
                                                                                          rel=1e-9)


def test_unbiased_cka_of_independent_features_is_near_zero_where_biased_is_not():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(1000, 50)), rng.normal(size=(1000, 50))
    assert abs(S.unbiased_cka_similarity(x, y)) < 0.01
    assert S.linear_cka_similarity(x, y) > 0.03       # the plug-in estimator's bias ~ sqrt(p q) / n


def test_torch_tensors_are_accepted():
    x, y = planted(seed=8)
    assert S.linear_cka_similarity(torch.from_numpy(x).float(), torch.from_numpy(y)) == pytest.approx(
        ref_cka(x.astype(np.float32).astype(np.float64), y), rel=1e-9)


def test_zero_variance_features_raise_a_clear_error():
    x, _ = planted()
    with pytest.raises(SRC.SimilarityError, match="zero variance"):
        S.linear_cka_similarity(x, np.ones_like(x))
    with pytest.raises(SRC.SimilarityError, match="zero variance"):
        S.procrustes_distance(np.ones_like(x), x, form="gram")


# --------------------------------------------------------------------------- streaming from a feature file

@pytest.mark.parametrize("form", FORMS)
def test_streaming_from_h5_equals_in_memory_reference(tmp_path, form):
    x, y = planted(seed=9, n=50)
    x, y = x.astype(np.float32), y.astype(np.float32)
    path = write_features_one_split(tmp_path / "f.h5", {"a": x, "b": y})
    with open_features(path) as f:
        dx, dy = f["test/a/conv"], f["test/b/conv"]
        xy, xx, yy = C.pair_moments(dx, dy, form=form, nuclear=True, block_bytes=16 * 8 * 5)  # many blocks
        assert C.cka_from_moments(xy, xx, yy) == pytest.approx(ref_cka(x.astype(float), y.astype(float)), rel=1e-10)
        assert C.procrustes_from_moments(xy) == pytest.approx(ref_procrustes(x.astype(float), y.astype(float)),
                                                              rel=1e-9)
        mb_h5 = S.minibatch_cka_similarity(dx, dy, batch_size=16, seed=3)
    assert mb_h5 == pytest.approx(S.minibatch_cka_similarity(x, y, batch_size=16, seed=3), rel=1e-12)


def test_minibatch_cka_matches_reference_over_the_same_batches():
    x, y = planted(seed=10, n=70)
    batches = MB.minibatch_indices(70, 16, seed=2)
    assert len(batches) == 4 and all(len(b) == 16 for b in batches)
    assert len(np.unique(np.concatenate(batches))) == 64
    xf, yf = x.reshape(70, -1), y.reshape(70, -1)
    h = np.mean([[ref_hsic_u(a[b] @ a[b].T, c[b] @ c[b].T) for a, c in ((xf, yf), (xf, xf), (yf, yf))]
                 for b in batches], axis=0)
    want = h[0] / np.sqrt(h[1] * h[2])
    assert S.minibatch_cka_similarity(x, y, batch_size=16, seed=2) == pytest.approx(want, rel=1e-9)
    # one batch holding every sample is the unbiased CKA itself
    assert S.minibatch_cka_similarity(x, y, batch_size=100) == pytest.approx(ref_unbiased_cka(x, y), rel=1e-9)


# --------------------------------------------------------------------------- SVCCA / PWCCA / Procrustes

def test_svcca_and_pwcca_match_covariance_whitening_reference():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3
    y = np.tanh(x[:, :5] @ rng.normal(size=(5, 5))) + 0.5 * rng.normal(size=(200, 5))
    rho, pw = ref_cca(x, y)
    assert S.svcca_similarity(x, y, keep_variance=1.0) == pytest.approx(rho.mean(), rel=1e-10)
    assert S.pwcca_similarity(x, y) == pytest.approx(pw, rel=1e-10)
    assert S.pwcca_similarity(y, x) == pytest.approx(ref_cca(y, x)[1], rel=1e-10)
    assert abs(S.pwcca_similarity(x, y) - S.pwcca_similarity(y, x)) > 1e-4     # weights come from x's side
    # SVCCA's SVD step: truncate each side to 99% of its variance, then plain CCA
    xr, yr = ref_svd_truncate(x, 0.9), ref_svd_truncate(y, 0.9)
    assert xr.shape[1] < 6
    assert S.svcca_similarity(x, y, keep_variance=0.9) == pytest.approx(ref_cca(xr, yr)[0].mean(), rel=1e-10)


def test_cca_of_features_with_themselves_or_an_invertible_map_of_them_is_one():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(100, 2, 2, 2))
    y = np.einsum("nchw,cd->ndhw", x, rng.normal(size=(2, 2)))           # invertible channel mixing
    for mode in ("flat", "pooled", "positions"):
        assert S.svcca_similarity(x, x, features=mode) == pytest.approx(1.0, abs=1e-10)
        assert S.pwcca_similarity(x, x, features=mode) == pytest.approx(1.0, abs=1e-10)
    assert S.svcca_similarity(x, y, keep_variance=1.0, features="positions") == pytest.approx(1.0, abs=1e-10)


def test_cca_feature_modes_shape_samples_as_documented():
    x = np.arange(2 * 3 * 2 * 2, dtype=float).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(CC.cca_samples(x, "pooled"), x.mean((2, 3)))
    np.testing.assert_allclose(CC.cca_samples(x, "flat"), x.reshape(2, -1))
    pos = CC.cca_samples(x, "positions")
    assert pos.shape == (8, 3)
    np.testing.assert_allclose(pos[5], x[1, :, 0, 1])


def test_cca_refuses_fewer_samples_than_dimensions():
    rng = np.random.default_rng(13)
    x, y = rng.normal(size=(20, 3, 3, 3)), rng.normal(size=(20, 3, 3, 3))
    with pytest.raises(SRC.SimilarityError, match="pooled"):
        S.pwcca_similarity(x, y, features="flat")
    with pytest.raises(SRC.SimilarityError, match="samples"):
        S.svcca_similarity(x, y, features="flat")
    assert 0 < S.svcca_similarity(x, y, features="pooled") < 1


@pytest.mark.parametrize("form", FORMS)
def test_procrustes_matches_scipy_reference_and_is_zero_for_rotated_copies(form):
    x, y = planted(seed=14, n=30, c=2, cy=3)
    assert S.procrustes_distance(x, y, form=form) == pytest.approx(ref_procrustes(x, y), rel=1e-9)
    xf = x.reshape(30, -1)
    rotated = 5.0 * xf @ random_orthogonal(xf.shape[1], 3) + 2.0
    assert S.procrustes_distance(x, rotated, form=form) == pytest.approx(0.0, abs=1e-9)


# --------------------------------------------------------------------------- permutation null

def test_permutation_null_small_p_for_planted_and_uniform_p_for_independent():
    x, y = planted(seed=15, n=40, noise=2.0)
    for metric in ("cka", "procrustes", "svcca"):
        r = S.permutation_test(metric, x, y, permutations=49, seed=1)
        assert r.p_value == pytest.approx(1 / 50)
    close = S.permutation_test("cka", x, y, permutations=49, seed=1)
    assert close.null_mean < close.observed
    rng = np.random.default_rng(16)
    ps = np.array([S.permutation_test("cka", rng.normal(size=(30, 3)), rng.normal(size=(30, 3)),
                                      permutations=39, seed=s).p_value for s in range(40)])
    assert 0.35 < ps.mean() < 0.65
    assert np.mean(ps <= 0.1) <= 0.25
    # the same seed gives the same null
    a = S.permutation_test("cka", x, y, permutations=10, seed=4)
    np.testing.assert_array_equal(a.null, S.permutation_test("cka", x, y, permutations=10, seed=4).null)


def test_null_summary_direction():
    null = np.array([0.1, 0.2, 0.3, 0.4])
    assert R.null_summary(0.35, null, "similarity").p_value == pytest.approx(2 / 5)
    assert R.null_summary(0.35, null, "distance").p_value == pytest.approx(4 / 5)


# --------------------------------------------------------------------------- the command

@pytest.fixture
def family(tmp_path):
    rng = np.random.default_rng(20)
    a = rng.normal(size=(60, 4, 3, 3)).astype(np.float32)
    b = (2.0 * a[:, [2, 0, 3, 1]]).astype(np.float32)              # an orthogonal map of a, scaled
    c = rng.normal(size=(60, 5, 3, 3)).astype(np.float32)           # unrelated, other width
    path = write_features_one_split(tmp_path / "feats.h5", {"a": a, "b": b, "c": c})
    return path, {"a": a, "b": b, "c": c}


def test_similarity_command_writes_matrices_with_null(cli, family, tmp_path):
    path, x = family
    out = tmp_path / "sim"
    code, stdout, err = cli("similarity", "--features", path, "--layer", "conv", "--metric",
                            "cka,cka_unbiased,cka_minibatch,svcca,pwcca,procrustes", "--permutations", "19",
                            "--batch_size", "20", "--out_dir", out)
    assert code == 0, err
    assert "similarity.json" in stdout
    body = json.loads((out / "similarity.json").read_text())
    assert (out / "config.json").exists() and json.loads((out / "config.json").read_text())["inputs"]["a"]["dataset"] \
        == "/test/a/conv"
    assert body["nets"] == ["a", "b", "c"] and body["split"] == "test" and body["layer"] == "conv"
    assert body["n_samples"] == 60 and body["warnings"] == []
    ms = body["metrics"]
    assert list(ms) == ["cka", "cka_unbiased", "cka_minibatch", "svcca", "pwcca", "procrustes"]
    for name, m in ms.items():
        mat = np.array(m["matrix"], dtype=float)
        assert mat.shape == (3, 3) and np.all(np.isfinite(mat))
        assert m["direction"] == ("distance" if name == "procrustes" else "similarity")
        assert m["permutations"] == 19
        p = np.array(m["p_values"], dtype=float)
        close = mat[0, 1]
        if name == "procrustes":
            assert close == pytest.approx(0.0, abs=1e-6) and mat[0, 2] > 0.5
        else:
            assert close == pytest.approx(1.0, abs=1e-6) and mat[0, 2] < 0.6
        assert p[0, 1] == pytest.approx(1 / 20)
        assert p[0, 2] > 0.05
    cka = np.array(ms["cka"]["matrix"])
    np.testing.assert_allclose(cka, cka.T)
    assert cka[0, 2] == pytest.approx(ref_cka(x["a"].astype(float), x["c"].astype(float)), rel=1e-6)
    # the command's optimised null is the generic one with the same seed
    ref = S.permutation_test("cka", x["a"], x["c"], permutations=19, seed=0)
    assert ms["cka"]["null_mean"][0][2] == pytest.approx(ref.null_mean, rel=1e-9)
    ref = S.permutation_test("pwcca", x["c"], x["a"], permutations=19, seed=0, features="pooled")
    assert ms["pwcca"]["null_mean"][2][0] == pytest.approx(ref.null_mean, rel=1e-9)
    assert ms["pwcca"]["symmetric"] is False


def test_gram_form_equals_feature_form_including_the_null(family):
    path, _ = family
    kw = dict(metrics="cka,cka_unbiased,procrustes", permutations=7, seed=3)
    f = similarity_matrix(path, "conv", cka_form="features", **kw)["metrics"]
    g = similarity_matrix(path, "conv", cka_form="gram", **kw)["metrics"]
    assert f["cka"]["form"] == "features" and g["cka"]["form"] == "gram"
    for m in ("cka", "cka_unbiased", "procrustes"):
        for key in ("matrix", "null_mean", "p_values"):
            np.testing.assert_allclose(np.array(f[m][key], float), np.array(g[m][key], float), rtol=1e-8, atol=1e-9)


def test_missing_layer_error_lists_what_the_net_has(cli, tmp_path):
    rng = np.random.default_rng(21)
    path = tmp_path / "f.h5"
    write_features_one_split(path, {"a": rng.normal(size=(10, 2, 2, 2)), "b": rng.normal(size=(10, 2, 2, 2))})
    with open_features(path, "a") as f:
        ds = create_features(f, "test", "a", "extra", (10, 3), "float32", {})
        ds[...] = rng.normal(size=(10, 3))
        mark_complete(ds)
    code, _, err = cli("similarity", "--features", path, "--layer", "extra", "--out_dir", tmp_path / "o")
    assert code == 1
    assert "'extra' is missing for net(s) b" in err and "b has conv" in err and "Nets with 'extra': a" in err
    code, _, err = cli("similarity", "--features", path, "--layer", "conv", "--metric", "cka,cca",
                       "--out_dir", tmp_path / "o2")
    assert code == 1 and "unknown similarity metric 'cca'" in err and "pwcca" in err


def test_cca_with_flat_features_and_few_samples_is_refused(cli, family, tmp_path):
    path, _ = family
    code, _, err = cli("similarity", "--features", path, "--layer", "conv", "--metric", "pwcca",
                       "--cca_features", "flat", "--out_dir", tmp_path / "o")
    assert code == 1 and "meaningless" in " ".join(err.split()) and "pooled" in err


def test_memory_limits_give_an_error_or_a_labelled_warning_never_nan(family):
    path, _ = family
    with pytest.raises(UserError, match="memory_gb"):
        similarity_matrix(path, "conv", metrics="cka", cka_form="gram", memory_gb=5e-5)
    body = similarity_matrix(path, "conv", metrics="cka", permutations=5, memory_gb=50e3 / 2 ** 30)
    m = body["metrics"]["cka"]
    assert all(v is not None for row in m["matrix"] for v in row)
    assert m["p_values"][0][1] is None and "permutation null skipped" in m["warnings"][0]
    assert body["warnings"] and body["warnings"][0].startswith("cka: ")
    json.dumps(body, allow_nan=False)


def test_gram_stats_of_a_permuted_gram_equal_the_moments_of_the_permuted_matrix():
    from analysis.cka import GramStats, centred_gram, gram_moments

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 7)), rng.normal(size=(30, 5)) + 2.0
    k, l = x @ x.T, centred_gram(y)
    perm = rng.permutation(30)
    lp = l[np.ix_(perm, perm)]
    want = gram_moments(k, lp)
    got = GramStats.of(k).moments_with(GramStats.of(l).permuted(perm), float(np.vdot(k, lp)))
    for f in ("hsic_biased", "hsic_unbiased", "ss_x", "ss_y"):
        assert getattr(got, f) == pytest.approx(getattr(want, f), rel=1e-10, abs=1e-12), f
