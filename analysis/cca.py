"""SVCCA (Raghu et al. 2017) and PWCCA (Morcos et al. 2018) between nets, each net's SVD computed
once and reused for every pair and every permutation of the null.

The metrics see ``pooled`` (spatial mean per channel, N x C), ``flat`` (N x C·H·W) or ``positions``
(N·H·W x C) features; CCA between r_x and r_y dimensions is refused unless N > r_x + r_y (otherwise
perfect correlations appear by construction).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from analysis.similarity_results import MatrixResult, fill_symmetric, gib, permutation_indices
from analysis.sources import (
    BLOCK_BYTES,
    SimilarityError,
    as_source,
    check_same_rows,
    load_matrix,
    n_rows,
    row_blocks,
    row_dim,
)
from common.errors import UserError
from common.progress import progress
from common.registry import unknown_choice_message

CCA_FEATURES = ("pooled", "flat", "positions")
CCA_FAMILY = ("svcca", "pwcca")

def cca_samples(x: Any, mode: str = "flat", block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """Features as a (samples, dims) float64 matrix for CCA: ``flat`` (N, C·H·W); ``pooled`` (N, C),
    the spatial mean per channel; ``positions`` (N·H·W, C), every position of every image a sample."""
    if mode not in CCA_FEATURES:
        raise UserError(unknown_choice_message("CCA feature mode", mode, list(CCA_FEATURES)))
    src = as_source(x)
    if mode == "flat" or len(src.shape) == 2:
        return load_matrix(src, block_bytes)
    n, c = n_rows(src), int(src.shape[1])
    hw = int(np.prod(src.shape[2:], dtype=np.int64))
    out = np.empty((n, c) if mode == "pooled" else (n * hw, c), dtype=np.float64)
    s = 0
    for blk in row_blocks(src, block_bytes):
        b = len(blk)
        blk = blk.reshape(b, c, hw)
        if mode == "pooled":
            out[s:s + b] = blk.mean(2)
        else:
            out[s * hw:(s + b) * hw] = blk.transpose(0, 2, 1).reshape(b * hw, c)
        s += b
    return out


def rows_per_sample(x: Any, mode: str) -> int:
    """How many CCA rows one image gives (H·W for ``positions``, else 1)."""
    src = as_source(x)
    return int(np.prod(src.shape[2:], dtype=np.int64)) if mode == "positions" and len(src.shape) > 2 else 1


def _centre(a: np.ndarray) -> np.ndarray:
    return a - a.mean(0)


def orthonormal_basis(xc: np.ndarray, keep_variance: float | None = None) -> np.ndarray:
    """Orthonormal basis (n, r) of the column space of centred data: numerical rank, or the top
    directions holding ``keep_variance`` of the variance (SVCCA's SVD step)."""
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    if not len(s) or s[0] <= 0:
        return u[:, :0]
    rank = int(np.sum(s > s[0] * max(xc.shape) * np.finfo(np.float64).eps))
    k = rank
    if keep_variance is not None:
        cum = np.cumsum(s[:rank] ** 2) / np.sum(s[:rank] ** 2)
        k = min(rank, int(np.searchsorted(cum, keep_variance - 1e-12)) + 1)
    return u[:, :k]


def check_cca_dims(n: int, rx: int, ry: int, metric: str) -> None:
    """CCA between r_x and r_y dimensions finds perfect correlations by construction once
    r_x + r_y >= n (centred data spans n - 1 dimensions): refuse."""
    if rx == 0 or ry == 0:
        raise SimilarityError(f"{metric} is undefined: the features of one net have zero variance")
    if n <= rx + ry:
        raise SimilarityError(
            f"{metric} is meaningless here: {n} samples for {rx} + {ry} canonical dimensions (CCA needs "
            f"more samples than the dimensions of both sides together, or it finds perfect correlations by "
            f"construction); use fewer dimensions (--cca_features pooled: spatial mean per channel) or more samples")


def canonical_correlations(qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Canonical correlations (descending) between the spans of two orthonormal bases."""
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def svcca_from_bases(ux: np.ndarray, uy: np.ndarray) -> float:
    return float(canonical_correlations(ux, uy).mean())


def pwcca_from_bases(qx: np.ndarray, qy: np.ndarray, xc: np.ndarray | None = None, *,
                     proj: np.ndarray | None = None) -> float:
    """Morcos et al. 2018: canonical correlations weighted by how much of x's (centred) neurons each
    of x's canonical variates accounts for, ``a_i = sum_j |<h_i, x_j>|``. The variates are
    ``h = qx a``, so ``h^T xc = a^T (qx^T xc)``: ``proj = qx^T xc`` (r, C), computed once per net,
    spares the (n, r) variates and an n·r·C product per pair and permutation."""
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    rho = np.clip(rho, 0.0, 1.0)
    if proj is None:
        proj = qx.T @ xc
    alpha = np.abs(a[:, :len(rho)].T @ proj).sum(1)                         # (r,)
    if not alpha.sum() > 0:
        raise SimilarityError("PWCCA is undefined: the features have zero variance")
    return float(alpha @ rho / alpha.sum())


def svcca_similarity(x: Any, y: Any, *, keep_variance: float = 0.99, features: str = "flat") -> float:
    """SVCCA (Raghu et al. 2017): keep the top singular directions of each side holding
    ``keep_variance`` of its variance, then the mean canonical correlation between them."""
    xs, ys = cca_samples(x, features), cca_samples(y, features)
    check_same_rows(xs, ys)
    ux, uy = orthonormal_basis(_centre(xs), keep_variance), orthonormal_basis(_centre(ys), keep_variance)
    check_cca_dims(len(xs), ux.shape[1], uy.shape[1], "SVCCA")
    return svcca_from_bases(ux, uy)


def pwcca_similarity(x: Any, y: Any, *, features: str = "flat") -> float:
    """PWCCA (Morcos et al. 2018), weights from x's side (so not symmetric); CCA on the full-rank
    part of each side (no variance truncation)."""
    xs, ys = cca_samples(x, features), cca_samples(y, features)
    check_same_rows(xs, ys)
    xc, yc = _centre(xs), _centre(ys)
    qx, qy = orthonormal_basis(xc), orthonormal_basis(yc)
    check_cca_dims(len(xs), qx.shape[1], qy.shape[1], "PWCCA")
    return pwcca_from_bases(qx, qy, xc)


# =========================================================================== registry and the null


def cca_matrices(sources: Sequence[Any], metrics: Sequence[str], *, features: str = "pooled",
                 keep_variance: float = 0.99, permutations: int = 0, seed: int = 0,
                 memory_bytes: int = 4 << 30, block_bytes: int = BLOCK_BYTES) -> dict[str, MatrixResult]:
    """``svcca`` (symmetric) and ``pwcca`` (row net gives the weights) over every pair. The features
    are loaded (``cca_samples``); the null shuffles the pairing of images."""
    metrics = [m for m in metrics if m in CCA_FAMILY]
    block_bytes = min(block_bytes, max(1 << 12, memory_bytes // 8))
    srcs = [as_source(s) for s in sources]
    n, k = check_same_rows(*srcs), len(srcs)
    if features not in CCA_FEATURES:
        raise UserError(unknown_choice_message("CCA feature mode", features, list(CCA_FEATURES)))
    per = [rows_per_sample(s, features) for s in srcs]
    if len(set(per)) > 1:
        raise UserError(f"--cca_features positions needs the same spatial size in every net; positions per image: "
                        f"{per}; use --cca_features pooled")
    hw = per[0]
    cdims = [int(s.shape[1]) if features != "flat" else row_dim(s) for s in srcs]
    need = sum(8 * n * hw * d * 3 for d in cdims)
    if need > memory_bytes:
        raise UserError(f"SVCCA/PWCCA load the features: {features} features of {k} nets need about {gib(need)}, "
                        f"more than --memory_gb {memory_bytes / 2 ** 30:g}; use --cca_features pooled or raise "
                        f"--memory_gb")
    views = []
    for s in progress(srcs, total=k, desc="CCA bases"):
        xc = _centre(cca_samples(s, features, block_bytes))
        q = orthonormal_basis(xc) if "pwcca" in metrics else None
        views.append({"svcca": orthonormal_basis(xc, keep_variance) if "svcca" in metrics else None,
                      "pwcca": q, "pwcca_proj": q.T @ xc if q is not None else None})
    rows = n * hw
    res = {}
    for m in metrics:
        label = "SVCCA" if m == "svcca" else "PWCCA"
        ranks = [v[m].shape[1] for v in views]
        if max(ranks) > 0:   # every pair, a net with itself included, must have n > r_i + r_j
            check_cca_dims(rows, max(ranks), max(ranks), label)
        r = MatrixResult(m, "similarity", np.full((k, k), np.nan),
                         np.full((permutations, k, k), np.nan) if permutations else None,
                         {"dims_kept" if m == "svcca" else "rank": ranks, "samples": rows})
        if m == "svcca":
            r.details["keep_variance"] = keep_variance
        else:
            r.details["symmetric"] = False
            r.details["note"] = "row net's neurons give the weights: matrix[i][j] = PWCCA(nets[i], nets[j])"
        if 2 * max(ranks) * 5 > rows:
            r.warn(f"{rows} samples for up to {max(ranks)} + {max(ranks)} canonical dimensions: canonical "
                   f"correlations are inflated at this ratio; compare with null_mean")
        res[m] = r
    for m in metrics:
        r = res[m]
        pairs = [(i, j) for i in range(k) for j in range(k) if m == "pwcca" or j >= i]
        for i, j in progress(pairs, total=len(pairs), desc=m):
            try:
                check_cca_dims(rows, views[i][m].shape[1], views[j][m].shape[1], m.upper())
                r.matrix[i, j] = _cca_value(m, views[i], views[j][m])
                for t, perm in enumerate(permutation_indices(n, permutations, seed)):
                    rowperm = (perm[:, None] * hw + np.arange(hw)).ravel() if hw > 1 else perm   # whole images
                    r.null[t, i, j] = _cca_value(m, views[i], views[j][m][rowperm])
            except SimilarityError as e:
                r.warn(f"{e} (pair {i},{j})")
        if m == "svcca":
            fill_symmetric(r.matrix)
            if r.null is not None:
                fill_symmetric(r.null)
    return res


def _cca_value(metric: str, view_x: dict[str, np.ndarray], qy: np.ndarray) -> float:
    if metric == "svcca":
        return svcca_from_bases(view_x["svcca"], qy)
    return pwcca_from_bases(view_x["pwcca"], qy, proj=view_x["pwcca_proj"])
