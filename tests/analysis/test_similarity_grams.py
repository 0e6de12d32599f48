"""The Gram engine of the CKA matrices against brute force: one stack of centred Grams, every pair's
inner product from one product, and the permuted inner products of the null swept in row blocks."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.cka import centred_gram
from analysis.cka_matrices import cka_family_matrices, gram_inner_products, gram_stack, permuted_inner_products
from analysis.similarity import permutation_test
from analysis.similarity_results import permutation_indices


def _centred(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    return x - x.mean(0)


@pytest.fixture
def nets():
    rng = np.random.default_rng(7)
    base = rng.normal(size=(37, 4, 3, 3))
    return [base + s * rng.normal(size=base.shape) + 5.0 for s in (0.2, 0.5, 1.0, 3.0)]


def test_gram_stack_and_inner_products_equal_numpy(nets):
    grams = gram_stack(nets, block_bytes=37 * 9 * 8)          # one channel per column block
    for g, x in zip(grams, nets):
        xc = _centred(x)
        np.testing.assert_allclose(g, xc @ xc.T, rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(centred_gram(x), g, rtol=1e-13, atol=1e-10)
    kl = gram_inner_products(grams)
    want = np.array([[np.vdot(a, b) for b in grams] for a in grams])
    np.testing.assert_allclose(kl, want, rtol=1e-12)


@pytest.mark.parametrize("block_bytes", [1, 8 * 4 * 37 * 5, 1 << 20])   # one row, a ragged last block, all rows
def test_permuted_inner_products_equal_brute_force(nets, block_bytes):
    grams = gram_stack(nets)
    perms = np.stack(list(permutation_indices(37, 6, seed=3)))
    got = permuted_inner_products(grams, perms, block_bytes=block_bytes)
    for t, p in enumerate(perms):
        for i in range(4):
            for j in range(4):
                want = np.vdot(grams[i], grams[j][np.ix_(p, p)])
                assert got[t, i, j] == pytest.approx(want, rel=1e-11)


@pytest.mark.parametrize("metric", ["cka", "cka_unbiased", "procrustes"])
def test_matrix_null_equals_the_one_pair_permutation_test(nets, metric):
    """The stacked null gives, pair by pair, the null of the independent one-pair path (which
    recomputes the metric on permuted rows)."""
    res = cka_family_matrices(nets, [metric], form="gram", permutations=9, seed=5)[metric]
    assert res.details["form"] == "gram"
    for i, j in ((0, 1), (1, 3), (2, 2)):
        ref = permutation_test(metric, nets[i], nets[j], permutations=9, seed=5)
        assert res.matrix[i, j] == pytest.approx(ref.observed, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(res.null[:, i, j], ref.null, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(res.null[:, j, i], ref.null, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("metric", ["svcca", "pwcca"])
def test_cca_matrix_null_equals_the_one_pair_permutation_test(nets, metric):
    """Each net's basis (and PWCCA's projection of its neurons) computed once gives, pair by pair and
    permutation by permutation, what recomputing the metric on permuted rows gives."""
    from analysis.similarity_cca import cca_matrices

    res = cca_matrices(nets, [metric], features="pooled", permutations=6, seed=2)[metric]
    # PWCCA is computed for every ordered pair; SVCCA for i <= j, mirrored (its null permutes the
    # column net of the upper triangle)
    for i, j in ((0, 1), (1, 3), (2, 2)) + (((3, 1),) if metric == "pwcca" else ()):
        ref = permutation_test(metric, nets[i], nets[j], permutations=6, seed=2, features="pooled")
        assert res.matrix[i, j] == pytest.approx(ref.observed, rel=1e-9)
        np.testing.assert_allclose(res.null[:, i, j], ref.null, rtol=1e-9)
