"""RBF-kernel CKA (Kornblith et al. 2019), biased (plug-in HSIC) and unbiased (Song et al. 2012 HSIC).

Convention (as Kornblith et al.'s code): on flattened C·H·W features, ``K_ij = exp(-d_ij^2 / (2 s^2))``
with ``s = rbf_sigma · sqrt(median of d^2)``, the median taken over all n^2 entries of the squared
distance matrix (the zero diagonal included), per net. ``rbf_sigma`` (``--rbf_sigma``, default 0.8)
is the fraction of the median distance; Kornblith et al. report 0.2, 0.4 and 0.8. The squared
distances come from the centred linear Gram (``d^2 = K_ii + K_jj - 2 K_ij``), so features are read in
channel blocks, never whole. The bandwidth is fixed per net from the observed data; the null permutes
the column net's Gram (the pairing of images), keeping its bandwidth.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.cka import centred_gram, hsic_biased, hsic_unbiased
from analysis.similarity_results import MatrixResult, fill_symmetric, gib, permutation_indices
from analysis.sources import BLOCK_BYTES, SimilarityError, as_source, check_same_rows
from common.errors import UserError
from common.progress import progress

RBF_FAMILY = ("cka_rbf", "cka_rbf_unbiased")


def check_sigma(sigma: float) -> None:
    if not sigma > 0:
        raise UserError(f"--rbf_sigma {sigma:g}: the bandwidth is a positive fraction of the median distance "
                        f"(Kornblith et al. 2019 use 0.2, 0.4, 0.8)")


def rbf_gram(x: Any, sigma: float = 0.8, block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, float]:
    """The RBF Gram matrix (n, n) of the flattened features and its bandwidth s (see the module)."""
    check_sigma(sigma)
    k = centred_gram(x, block_bytes=block_bytes)
    d = np.diagonal(k).copy()
    sq = np.maximum(d[:, None] + d[None, :] - 2.0 * k, 0.0)
    np.fill_diagonal(sq, 0.0)
    med = float(np.median(sq))
    if not med > 0:
        raise SimilarityError("RBF CKA is undefined: the median squared distance between samples is 0 (at least "
                              "half of the pairs of images give identical features)")
    s2 = sigma ** 2 * med
    np.multiply(sq, -1.0 / (2.0 * s2), out=sq)
    return np.exp(sq, out=sq), math.sqrt(s2)


def _cka(k: np.ndarray, l: np.ndarray, kk: float, ll: float, unbiased: bool) -> float:
    hsic = hsic_unbiased if unbiased else hsic_biased
    if unbiased and len(k) < 4:
        raise SimilarityError(f"the unbiased HSIC needs at least 4 samples, got {len(k)}")
    if not (kk > 0 and ll > 0):
        raise SimilarityError("RBF CKA is undefined: the HSIC of a net with itself is not positive")
    return float(hsic(k, l) / math.sqrt(kk * ll))


def rbf_cka_similarity(x: Any, y: Any, *, sigma: float = 0.8, unbiased: bool = False) -> float:
    """RBF CKA of one pair (see the module for the bandwidth)."""
    check_same_rows(as_source(x), as_source(y))
    k, _ = rbf_gram(x, sigma)
    l, _ = rbf_gram(y, sigma)
    if unbiased and len(k) < 4:
        raise SimilarityError(f"the unbiased HSIC needs at least 4 samples, got {len(k)}")
    hsic = hsic_unbiased if unbiased else hsic_biased
    return _cka(k, l, hsic(k, k), hsic(l, l), unbiased)


def rbf_unbiased_cka_similarity(x: Any, y: Any, *, sigma: float = 0.8) -> float:
    return rbf_cka_similarity(x, y, sigma=sigma, unbiased=True)


def rbf_cka_matrices(sources: Sequence[Any], metrics: Sequence[str], *, sigma: float = 0.8, permutations: int = 0,
                     seed: int = 0, memory_bytes: int = 4 << 30, names: Sequence[str] | None = None
                     ) -> dict[str, MatrixResult]:
    """``cka_rbf`` / ``cka_rbf_unbiased`` over every pair, one RBF Gram per net, with the null."""
    metrics = [m for m in metrics if m in RBF_FAMILY]
    check_sigma(sigma)
    srcs = [as_source(s) for s in sources]
    n, k = check_same_rows(*srcs), len(srcs)
    names = list(names) if names else [str(i) for i in range(k)]
    need = 8 * n * n * (k + 2)
    if need > memory_bytes:
        raise UserError(f"RBF CKA holds one {n} x {n} Gram matrix per net: {gib(need)} for {k} nets, more than "
                        f"--memory_gb {memory_bytes / 2 ** 30:g}; raise --memory_gb or compare fewer --nets")
    grams, bandwidths = [], {}
    for name, s in progress(zip(names, srcs), total=k, desc="RBF Gram matrices"):
        g, bw = rbf_gram(s, sigma, min(BLOCK_BYTES, max(1 << 12, memory_bytes // 8)))
        grams.append(g)
        bandwidths[name] = bw
    res = {}
    for m in metrics:
        unbiased = m == "cka_rbf_unbiased"
        r = MatrixResult(m, "similarity", np.full((k, k), np.nan),
                         np.full((permutations, k, k), np.nan) if permutations else None,
                         {"rbf_sigma": sigma, "bandwidth": bandwidths,
                          "bandwidth_rule": "s = rbf_sigma * sqrt(median of squared distances over all n^2 pairs, "
                                            "diagonal included), per net (Kornblith et al. 2019)",
                          "estimator": "unbiased HSIC (Song et al. 2012)" if unbiased else "plug-in (biased) HSIC"})
        hsic = hsic_unbiased if unbiased else hsic_biased
        selfh = [hsic(g, g) if n >= 4 or not unbiased else 0.0 for g in grams]
        for i in range(k):
            for j in range(i, k):
                try:
                    r.matrix[i, j] = _cka(grams[i], grams[j], selfh[i], selfh[j], unbiased)
                    for t, perm in enumerate(permutation_indices(n, permutations, seed)):
                        r.null[t, i, j] = _cka(grams[i], grams[j][np.ix_(perm, perm)], selfh[i], selfh[j], unbiased)
                except SimilarityError as e:
                    r.warn(f"{e} (pair {names[i]},{names[j]})")
        fill_symmetric(r.matrix)
        if r.null is not None:
            fill_symmetric(r.null)
        res[m] = r
    return res
