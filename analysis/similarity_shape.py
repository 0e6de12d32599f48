"""The generalized shape metric of Williams et al. 2021 (netrep's ``LinearMetric``) with partial
whitening, in its angular form, over every pair of K nets.

Each net's centred samples ``Xc`` (the ``--cca_features`` view, rows x d) are partially whitened,
``Z = Xc (alpha I + (1 - alpha) S^-1/2)`` with ``S = Xc^T Xc``, not divided by the number of rows (as
netrep's ``whiten``; pseudo-inverse on the numerical rank): ``alpha = 1`` leaves them alone (the
angular Procrustes distance), ``alpha = 0`` whitens fully (the angle of mean canonical correlation
when both sides have the same rank). For 0 < alpha < 1 the value depends on the features' scale, as
in netrep (its variance-preserving rescaling is one factor per net, which the angle ignores). The distance is the
angle ``arccos(||Zx^T Zy||_* / (||Zx||_F ||Zy||_F))`` in radians, in [0, pi/2]: the smallest angle
between the two normalised configurations over orthogonal maps, a metric (triangle inequality).
From the SVD ``Xc = U diag(s) V^T``: ``Z = U diag(g) V^T`` with ``g = alpha s + (1 - alpha)``,
so each pair needs only ``diag(g_x) U_x^T U_y diag(g_y)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.cca import CCAView, cca_data, matched_sources, storage_eps
from analysis.similarity_results import MatrixResult, fill_symmetric, permutation_indices
from analysis.sources import SimilarityError, as_source, check_same_rows
from common.errors import UserError
from common.progress import progress


def check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"--shape_alpha {alpha:g}: the partial whitening weight must be in [0, 1] (1: none, the "
                        f"angular Procrustes distance; 0: full whitening, CCA-like)")


def whitened_gains(v: CCAView, alpha: float) -> np.ndarray:
    """``g`` of ``Z = U diag(g) V^T``: the singular values of the partially whitened features."""
    return alpha * v.s + (1.0 - alpha)


def shape_angle(ux: np.ndarray, gx: np.ndarray, uy: np.ndarray, gy: np.ndarray) -> float:
    """``arccos(||Zx^T Zy||_* / (||Zx|| ||Zy||))`` from ``Z = U diag(g) V^T`` of each side."""
    nx, ny = float(np.linalg.norm(gx)), float(np.linalg.norm(gy))
    if not (nx > 0 and ny > 0):
        raise SimilarityError("the shape metric is undefined: the features of one net have zero variance")
    nuc = float(np.linalg.svd((ux * gx).T @ (uy * gy), compute_uv=False).sum())
    return float(np.arccos(np.clip(nuc / (nx * ny), -1.0, 1.0)))


def shape_refusal(rows: int, dx: int, dy: int, alpha: float) -> str | None:
    """Whitening (alpha < 1) over no more rows than both sides' dimensions aligns anything perfectly."""
    bx, by = min(rows - 1, dx), min(rows - 1, dy)
    if alpha < 1 and rows <= bx + by:
        return (f"the shape metric with alpha {alpha:g} < 1 is meaningless here: {rows} rows for up to {bx} + {by} "
                f"whitened dimensions (whitening then aligns any two nets); use --cca_features pooled, "
                f"--shape_alpha 1 or more samples")
    return None


def shape_distance(x: Any, y: Any, *, alpha: float = 1.0, features: str = "flat", rank_tol: float = 0.0) -> float:
    """The angular shape distance of one pair (radians; see the module)."""
    check_alpha(alpha)
    (xs, nx), (ys, ny) = cca_data(x, features), cca_data(y, features)
    rows = check_same_rows(xs, ys)
    why = shape_refusal(rows, xs.shape[1], ys.shape[1], alpha)
    if why:
        raise SimilarityError(why)
    vx = CCAView.of(xs, nx, storage_eps(as_source(x).dtype), rank_tol)
    vy = CCAView.of(ys, ny, storage_eps(as_source(y).dtype), rank_tol)
    return shape_angle(vx.u, whitened_gains(vx, alpha), vy.u, whitened_gains(vy, alpha))


def shape_matrix(sources: Sequence[Any], *, alpha: float = 1.0, features: str = "pooled", rank_tol: float = 0.0,
                 permutations: int = 0, seed: int = 0, names: Sequence[str] | None = None) -> MatrixResult:
    """``shape`` over every pair (symmetric), refused pairs decided before any SVD, with the null."""
    check_alpha(alpha)
    srcs, n, names, hw, dims = matched_sources(sources, features, names)
    k, rows = len(srcs), n * hw
    r = MatrixResult("shape", "distance", np.full((k, k), np.nan),
                     np.full((permutations, k, k), np.nan) if permutations else None,
                     {"shape_alpha": alpha, "cca_features": features, "units": "radians, in [0, pi/2]",
                      "form": "angular: arccos(||Zx^T Zy||_* / (||Zx||_F ||Zy||_F)), Z = Xc (alpha I + (1 - alpha) "
                              "S^-1/2), S = Xc^T Xc (Williams et al. 2021; netrep's whitening)"})
    pairs, needed = [], set()
    for i in range(k):
        for j in range(i, k):
            why = shape_refusal(rows, dims[i], dims[j], alpha)
            if why:
                r.refuse(i, j, names, why, "before the SVD")
            else:
                pairs.append((i, j))
                needed.update((i, j))
    views = {}
    for i in progress(sorted(needed), total=len(needed), desc="shape bases"):
        samples, norm = cca_data(srcs[i], features)
        v = CCAView.of(samples, norm, storage_eps(srcs[i].dtype), rank_tol)
        views[i] = (v.u, whitened_gains(v, alpha))
    for i, j in pairs:
        (ux, gx), (uy, gy) = views[i], views[j]
        try:
            r.matrix[i, j] = shape_angle(ux, gx, uy, gy)
            for t, perm in enumerate(permutation_indices(n, permutations, seed)):
                rowperm = (perm[:, None] * hw + np.arange(hw)).ravel() if hw > 1 else perm
                r.null[t, i, j] = shape_angle(ux, gx, uy[rowperm], gy)
        except SimilarityError as e:
            r.refuse(i, j, names, str(e), "after the SVD")
    fill_symmetric(r.matrix)
    if r.null is not None:
        fill_symmetric(r.null)
    return r
