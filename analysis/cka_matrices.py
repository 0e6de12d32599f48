"""``cka``, ``cka_unbiased`` and ``procrustes`` over every pair of K nets: each net's products are
computed once and shared by every pair, both estimators and every permutation of the null.

Gram form (C·H·W large against N): one centred Gram ``K_i`` per net (symmetric rank-k updates over
channel blocks, float64), held as one (K, N, N) stack. Every pair's ``<K_i, K_j>`` comes from one
matrix product of the stack with itself; row sums and diagonals give the rest of both HSIC
estimators. The null needs ``<K_i, P K_j P^T>`` for every permutation P: the stack is swept in row
blocks, and for each block every permutation gathers its rows and columns of all K nets at once and
multiplies them with the (cached) block of the unpermuted stack, so each Gram is read once per
permutation, not once per pair.

Feature form (N large against C·H·W): one streaming pass per net for the self terms and one per pair,
memory O(p·q) whatever N is; its null loads the pair and recomputes (N·p·q per permutation).

``memory_bytes`` (``--memory_gb``) bounds the arrays this computation holds (Grams, accumulators, read
blocks); the interpreter and its libraries come on top (about 0.4 GiB).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from analysis.cka import (
    BLOCK_BYTES,
    DIRECTIONS,
    GramStats,
    Moments,
    centred_gram,
    choose_form,
    cka_from_moments,
    feature_moments,
    gram_factor,
    procrustes_from_moments,
)
from analysis.similarity_results import MatrixResult, fill_symmetric, gib, permutation_indices
from analysis.sources import SimilarityError, as_source, check_same_rows, load_matrix, row_dim
from common.errors import UserError
from common.progress import progress

CKA_FAMILY = tuple(DIRECTIONS)
NULL_BLOCK_BYTES = 1 << 20        # per-block working set of the null sweep (stays in cache)


def gram_stack_bytes(n: int, k: int, nuclear: bool) -> int:
    """Memory of the Gram form: the (K, N, N) stack, and as much again for Procrustes' factors."""
    return k * n * n * 8 * (2 if nuclear else 1)


def gram_stack(sources: Sequence[Any], *, block_bytes: int = BLOCK_BYTES, load_bytes: int = 0) -> np.ndarray:
    """The centred Gram matrix of every source, as one (K, N, N) float64 array (``load_bytes``: see
    :func:`analysis.cka.centred_gram`)."""
    srcs = [as_source(s) for s in sources]
    n = check_same_rows(*srcs)
    grams = np.empty((len(srcs), n, n), dtype=np.float64)
    for i, s in progress(enumerate(srcs), total=len(srcs), desc="Gram matrices"):
        centred_gram(s, block_bytes=block_bytes, out=grams[i], load_bytes=load_bytes)
    return grams


def gram_inner_products(grams: np.ndarray) -> np.ndarray:
    """``<K_i, K_j>`` for every pair of a (K, N, N) stack, (K, K), in one matrix product."""
    flat = grams.reshape(len(grams), -1)
    return flat @ flat.T


def permuted_inner_products(grams: np.ndarray, perms: np.ndarray, *, block_bytes: int = NULL_BLOCK_BYTES,
                            desc: str = "CKA null") -> np.ndarray:
    """``out[t, i, j] = <K_i, P_t K_j P_t^T>`` for a (K, N, N) stack and permutations (T, N), where
    ``(P K P^T)[a, b] = K[perm[a], perm[b]]``; (T, K, K).

    Rows are swept in blocks of R (the unpermuted block, K·R·N values, stays in cache while every
    permutation gathers its R rows and all N columns of the K Grams), so the stack is read once per
    permutation and each product is one small GEMM."""
    k, n, _ = grams.shape
    perms = np.asarray(perms, dtype=np.intp)
    out = np.zeros((len(perms), k, k))
    rows = max(1, min(n, block_bytes // (8 * k * n)))
    picked = np.empty((k, rows, n))
    gathered = np.empty((k, rows, n))
    for r0 in progress(range(0, n, rows), total=-(-n // rows), desc=desc):
        r1 = min(n, r0 + rows)
        b = r1 - r0
        block = grams[:, r0:r1].reshape(k, b * n)                          # a view: rows are contiguous
        pk, gk = picked[:, :b], gathered[:, :b]
        for t, perm in enumerate(perms):
            np.take(grams, perm[r0:r1], axis=1, out=pk)                     # rows perm[a] of every K_j
            np.take(pk, perm, axis=2, out=gk)                               # columns perm[b]
            out[t] += block @ gk.reshape(k, b * n).T
    return out


def _results(metrics: list[str], k: int, permutations: int, form: str) -> dict[str, MatrixResult]:
    return {m: MatrixResult(m, DIRECTIONS[m], np.full((k, k), np.nan),
                            np.full((permutations, k, k), np.nan) if permutations else None,
                            {"form": form}) for m in metrics}


def _record(res: dict[str, MatrixResult], i: int, j: int, xy: Moments, xx: Moments, yy: Moments,
            t: int | None = None) -> None:
    for m, r in res.items():
        try:
            v = (procrustes_from_moments(xy) if m == "procrustes"
                 else cka_from_moments(xy, xx, yy, unbiased=m == "cka_unbiased"))
        except SimilarityError as e:
            r.warn(f"{e} (pair {i},{j})" if t is None else f"null: {e}")
            continue
        if t is None:
            r.matrix[i, j] = v
        else:
            r.null[t, i, j] = v


def _nuclear(fk: np.ndarray, fl: np.ndarray) -> float:
    """``||Fk^T Fl||_*``: the nuclear norm of ``Xc^T Yc`` from Gram factors."""
    return float(np.linalg.svd(fk.T @ fl, compute_uv=False).sum()) if fk.shape[1] and fl.shape[1] else 0.0


def cka_family_matrices(sources: Sequence[Any], metrics: Sequence[str], *, form: str = "auto",
                        permutations: int = 0, seed: int = 0, memory_bytes: int = 4 << 30,
                        block_bytes: int = BLOCK_BYTES) -> dict[str, MatrixResult]:
    """``cka``, ``cka_unbiased`` and ``procrustes`` (those of ``metrics``) over every pair of sources,
    exact, with the permutation null when ``permutations`` > 0 (the same seeded permutations as
    :func:`analysis.similarity.permutation_test`)."""
    metrics = [m for m in metrics if m in CKA_FAMILY]
    srcs = [as_source(s) for s in sources]
    n, k = check_same_rows(*srcs), len(srcs)
    dims = [row_dim(s) for s in srcs]
    nuclear = "procrustes" in metrics
    chosen = choose_form(n, max(dims), max(dims), form, permutations)
    if form == "auto" and chosen == "gram" and gram_stack_bytes(n, k, nuclear) + block_bytes > memory_bytes:
        chosen = "features"                 # the Gram matrices would not fit: stream the features instead
    res = _results(metrics, k, permutations, chosen)
    if chosen == "gram":
        _gram_form(srcs, res, n, dims, nuclear, permutations, seed, memory_bytes, block_bytes)
    else:
        _feature_form(srcs, res, n, dims, nuclear, permutations, seed, memory_bytes, block_bytes)
    for r in res.values():
        fill_symmetric(r.matrix)
        if r.null is not None:
            fill_symmetric(r.null)
    return res


def _gram_form(srcs: list, res: dict[str, MatrixResult], n: int, dims: list[int], nuclear: bool,
               permutations: int, seed: int, memory_bytes: int, block_bytes: int) -> None:
    k = len(srcs)
    block_bytes = min(block_bytes, max(1 << 12, (memory_bytes - gram_stack_bytes(n, k, nuclear)) // 3))
    need = gram_stack_bytes(n, k, nuclear) + 3 * block_bytes
    if need > memory_bytes:
        raise UserError(
            f"the Gram form of CKA holds one {n} x {n} float64 matrix per net: {gib(need)} for {k} nets, "
            f"more than --memory_gb {memory_bytes / 2 ** 30:g}; raise --memory_gb, compare fewer --nets at "
            f"a time, or use --cka_form features (memory {gib(8 * max(dims) ** 2)}, independent of N)")
    # what the budget leaves beside the stack and the read blocks may hold one net's stored features
    grams = gram_stack(srcs, block_bytes=block_bytes, load_bytes=memory_bytes - need)
    stats = [GramStats.of(g) for g in grams]
    kl = gram_inner_products(grams)
    factors = [gram_factor(g) for g in progress(grams, total=k, desc="Gram factors")] if nuclear else [None] * k
    selfm = [stats[i].moments_with(stats[i], kl[i, i]) for i in range(k)]
    if nuclear:                               # a net with itself: ||Xc^T Xc||_* = ||Xc||_F^2
        selfm = [replace(m, nuclear=m.ss_x) for m in selfm]
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    for i, j in pairs:
        nuc = _nuclear(factors[i], factors[j]) if nuclear and i != j else None
        xy = selfm[i] if i == j else stats[i].moments_with(stats[j], kl[i, j], nuc)
        _record(res, i, j, xy, selfm[i], selfm[j])
    if not permutations:
        return
    perms = np.stack(list(permutation_indices(n, permutations, seed)))
    products = permuted_inner_products(grams, perms)
    if "procrustes" in res:
        res["procrustes"].details["null_note"] = (f"the Procrustes null takes one SVD per pair and permutation "
                                                  f"({len(pairs)} x {permutations})")
    for t, perm in progress(enumerate(perms), total=permutations, desc="null moments"):
        permuted = [s.permuted(perm) for s in stats]
        pf = [f[perm] for f in factors] if nuclear else factors
        for i, j in pairs:
            nuc = _nuclear(factors[i], pf[j]) if nuclear else None
            _record(res, i, j, stats[i].moments_with(permuted[j], products[t, i, j], nuc), selfm[i], selfm[j], t)


def _feature_form(srcs: list, res: dict[str, MatrixResult], n: int, dims: list[int], nuclear: bool,
                  permutations: int, seed: int, memory_bytes: int, block_bytes: int) -> None:
    k, p = len(srcs), max(dims)
    # the p x q accumulator, and per read block: the float64 block, its shifted copy, the stored-dtype read
    block_bytes = min(block_bytes, max(1 << 12, (memory_bytes - 8 * p * p) // 4))
    need = 8 * p * p + 4 * block_bytes
    if need > memory_bytes:
        raise UserError(
            f"the feature form of CKA holds a {p} x {p} float64 matrix ({gib(need)} with its read blocks), more "
            f"than --memory_gb {memory_bytes / 2 ** 30:g}; raise --memory_gb or use --cka_form gram "
            f"(memory {gib(gram_stack_bytes(n, k, nuclear))}, independent of C*H*W)")
    selfm = [feature_moments(s, nuclear=nuclear, block_bytes=block_bytes)
             for s in progress(srcs, total=k, desc="CKA self terms")]
    loaded: dict[int, np.ndarray] = {}
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    for i, j in progress(pairs, total=len(pairs), desc="CKA pairs"):
        xy = selfm[i] if i == j else feature_moments(srcs[i], srcs[j], nuclear=nuclear, block_bytes=block_bytes)
        _record(res, i, j, xy, selfm[i], selfm[j])
        if not permutations:
            continue
        pair_need = 8 * n * (dims[i] + 2 * dims[j]) + 8 * dims[i] * dims[j] + block_bytes
        if pair_need > memory_bytes:
            for r in res.values():
                r.warn(f"permutation null skipped for pairs needing more than --memory_gb "
                       f"{memory_bytes / 2 ** 30:g} in memory (pair {i},{j} needs {gib(pair_need)})")
            continue
        for key in list(loaded):
            if key not in (i, j):
                del loaded[key]
        zx = loaded.setdefault(i, load_matrix(srcs[i], block_bytes))
        zy = loaded.setdefault(j, load_matrix(srcs[j], block_bytes))
        for t, perm in enumerate(permutation_indices(n, permutations, seed)):
            _record(res, i, j, feature_moments(zx, zy[perm], nuclear=nuclear, block_bytes=block_bytes),
                    selfm[i], selfm[j], t)
