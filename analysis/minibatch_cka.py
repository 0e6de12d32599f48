"""Minibatch linear CKA (Nguyen et al. 2021): the unbiased HSIC of every pair averaged over seeded
random minibatches, in one pass over the rows, memory O(batch_size^2 · K). Its null shuffles the
pairing within each (random) batch, keeping the one pass.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.linalg import blas

from analysis.cka import hsic_unbiased, symmetrise_upper
from analysis.similarity_results import MatrixResult
from analysis.sources import BLOCK_BYTES, SimilarityError, Source, as_source, check_same_rows, rows_at
from common.errors import UserError
from common.progress import progress


def minibatch_indices(n: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded random batches of rows (each sorted for reading): ``n // batch_size`` full batches; the
    ``n % batch_size`` left-over rows are not used. One batch of all rows when n <= batch_size."""
    if batch_size < 4:
        raise UserError(f"--batch_size {batch_size}: the minibatch CKA needs batches of at least 4 samples")
    if n < 4:
        raise SimilarityError(f"minibatch CKA needs at least 4 samples, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    if n <= batch_size:
        return [np.sort(perm)]
    return [np.sort(perm[i * batch_size:(i + 1) * batch_size]) for i in range(n // batch_size)]


def batch_gram(src: Source, idx: np.ndarray, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """Gram (b, b) of the rows ``idx`` (column-centred within the batch), accumulated over column
    chunks so a batch of wide features never needs a full float64 copy."""
    rows = rows_at(src, idx).reshape(len(idx), -1)                          # (b, d) source dtype
    b, d = rows.shape
    k = np.zeros((b, b), dtype=np.float64, order="F")
    per = max(1, int(block_bytes) // (8 * b))
    for c0 in range(0, d, per):
        chunk = np.array(rows[:, c0:c0 + per], dtype=np.float64, order="C")
        chunk -= chunk.mean(0)
        k = blas.dsyrk(1.0, chunk.T, beta=1.0, c=k, trans=1, lower=0, overwrite_c=1)
    return symmetrise_upper(k).T


@dataclass
class MinibatchHSIC:
    """Mean unbiased HSIC over minibatches for every pair of sources, and its within-batch null."""

    hsic: np.ndarray          # (K, K)
    null: np.ndarray          # (P, K, K): pairing shuffled within each batch
    batches: int
    samples_used: int


def minibatch_hsic(sources: Sequence[Any], *, batch_size: int = 256, seed: int = 0, permutations: int = 0,
                   block_bytes: int = BLOCK_BYTES, desc: str = "minibatch CKA") -> MinibatchHSIC:
    """Nguyen et al. 2021: average the unbiased HSIC of each pair over random minibatches (one pass,
    memory O(batch_size^2 · K)). The null shuffles the pairing within each batch (each batch is a
    random subset, so this is a shuffle of the pairing of samples)."""
    srcs = [as_source(s) for s in sources]
    n, kk = check_same_rows(*srcs), len(srcs)
    batches = minibatch_indices(n, batch_size, seed)
    rng = np.random.default_rng([seed, 1])
    acc = np.zeros((kk, kk))
    null = np.zeros((permutations, kk, kk))
    for idx in progress(batches, total=len(batches), desc=desc):
        grams = [batch_gram(s, idx, block_bytes) for s in srcs]
        for i in range(kk):
            for j in range(i, kk):
                acc[i, j] += hsic_unbiased(grams[i], grams[j])
        for t in range(permutations):
            sigma = rng.permutation(len(idx))
            permuted = [g[np.ix_(sigma, sigma)] for g in grams]
            for i in range(kk):
                for j in range(i, kk):
                    null[t, i, j] += hsic_unbiased(grams[i], permuted[j])
    nb = len(batches)
    acc, null = acc / nb, null / nb
    iu = np.triu_indices(kk, 1)
    acc[(iu[1], iu[0])] = acc[iu]
    null[:, iu[1], iu[0]] = null[:, iu[0], iu[1]]
    return MinibatchHSIC(acc, null, nb, nb * len(batches[0]))


def cka_from_hsic(hsic_xy: np.ndarray | float, hsic_xx: float, hsic_yy: float) -> np.ndarray | float:
    if not (hsic_xx > 0 and hsic_yy > 0):
        raise SimilarityError("minibatch CKA is undefined: the mean unbiased HSIC of a net with itself is not "
                              "positive (zero-variance features, or batches too small)")
    return hsic_xy / math.sqrt(hsic_xx * hsic_yy)


def minibatch_cka_similarity(x: Any, y: Any, *, batch_size: int = 256, seed: int = 0,
                             block_bytes: int = BLOCK_BYTES) -> float:
    """Minibatch linear CKA (Nguyen et al. 2021): ``mean HSIC_u(x, y) / sqrt(mean HSIC_u(x, x) mean
    HSIC_u(y, y))`` over seeded random batches of ``batch_size`` rows."""
    r = minibatch_hsic([x, y], batch_size=batch_size, seed=seed, block_bytes=block_bytes)
    return float(cka_from_hsic(r.hsic[0, 1], r.hsic[0, 0], r.hsic[1, 1]))


# =========================================================================== SVCCA / PWCCA

def minibatch_cka_matrix(sources: Sequence[Any], *, batch_size: int = 256, seed: int = 0, permutations: int = 0,
                         block_bytes: int = BLOCK_BYTES) -> MatrixResult:
    """``cka_minibatch`` over every pair of sources in one pass (Nguyen et al. 2021)."""
    r = minibatch_hsic(sources, batch_size=batch_size, seed=seed, permutations=permutations, block_bytes=block_bytes)
    k = r.hsic.shape[0]
    out = MatrixResult("cka_minibatch", "similarity", np.full((k, k), np.nan),
                       np.full((permutations, k, k), np.nan) if permutations else None,
                       {"batch_size": batch_size, "batches": r.batches, "samples_used": r.samples_used,
                        "null": "pairing shuffled within each random minibatch"})
    for i in range(k):
        for j in range(k):
            try:
                out.matrix[i, j] = cka_from_hsic(r.hsic[i, j], r.hsic[i, i], r.hsic[j, j])
                if permutations:
                    out.null[:, i, j] = cka_from_hsic(r.null[:, i, j], r.hsic[i, i], r.hsic[j, j])
            except SimilarityError as e:
                out.warn(f"{e} (pair {i},{j})")
    return out

