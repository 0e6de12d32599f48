"""Cross-validated alignment metrics: fit the alignment on one split's rows (``--fit_split``), score it
on another's (``--score_split``), for SVCCA, PWCCA, R²_CCA, Procrustes and the shape metric.

Fitted on the fit split, per net: its column means and SVD (:class:`analysis.cca.CCAView`, rank and
SVCCA's k as in-sample); per pair: the canonical weights (CCA family) or the orthogonal map Q
(Procrustes, shape). Scored on the score split, centred by the fit split's means:

- SVCCA / R²_CCA: the correlations of the fitted canonical variate pairs on the score rows (mean, and
  mean square); PWCCA weights those correlations by Morcos et al.'s ``sum_j |<h_i, x_j>|`` on the
  score rows. Held-out correlations may be negative.
- Procrustes: ``2 - 2 tr(Q^T A^T B)`` with A, B the score rows scaled to unit Frobenius norm (flat
  features); shape: ``arccos(tr(Q^T Zx^T Zy) / (||Zx|| ||Zy||))`` with the fit split's partial
  whitening (``--cca_features`` view). Q is the partial isometry between the fit split's spans
  (components of the score rows outside them are not aligned).

The null shuffles the pairing of the score split's images.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.cca import CCAView, cca_data, rows_per_sample, storage_eps
from analysis.similarity_cca import LABELS, CCAOptions, upfront_refusal
from analysis.similarity_results import MatrixResult, fill_symmetric, permutation_indices
from analysis.similarity_shape import shape_refusal
from analysis.sources import SimilarityError, as_source, check_same_rows
from common.errors import UserError

SPLIT_METRICS = ("svcca", "pwcca", "r2cca", "procrustes", "shape")


@dataclass(frozen=True)
class SplitView:
    """One net: the fit split's SVD and the score split's rows centred by the fit split's means."""

    fit: CCAView
    rows_fit: int
    score: np.ndarray           # (rows_score, d)


def split_view(fit_src: Any, score_src: Any, features: str, rank_tol: float) -> SplitView:
    samples, norm = cca_data(fit_src, features)
    v = CCAView.of(samples, norm, storage_eps(as_source(fit_src).dtype), rank_tol)
    return SplitView(v, len(samples), cca_data(score_src, features)[0] - v.mean)


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of matching columns."""
    a, b = a - a.mean(0), b - b.mean(0)
    den = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    if not np.all(den > 0):
        raise SimilarityError("a fitted canonical variate has zero variance on the score split")
    return (a * b).sum(0) / den


def cca_split_value(metric: str, x: SplitView, y: SplitView, kx: int, ky: int,
                    perm: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """The held-out value and the held-out canonical correlations of one pair."""
    a, _, bt = np.linalg.svd(x.fit.u[:, :kx].T @ y.fit.u[:, :ky], full_matrices=False)
    wx = x.fit.vt[:kx].T / x.fit.s[:kx] @ a                    # (d_x, m): centred x -> canonical variates
    wy = y.fit.vt[:ky].T / y.fit.s[:ky] @ bt.T
    ys = y.score if perm is None else y.score[perm]
    hx, hy = x.score @ wx, ys @ wy
    rho = _corr(hx, hy)
    if metric == "svcca":
        return float(rho.mean()), rho
    if metric == "r2cca":
        return float(np.mean(rho ** 2)), rho
    hc = hx - hx.mean(0)
    hc /= np.linalg.norm(hc, axis=0)
    xc = x.score - x.score.mean(0)
    alpha = np.abs(hc.T @ xc).sum(1)
    return float(alpha @ rho / alpha.sum()), rho


def aligned_cos(x: SplitView, y: SplitView, alpha: float, perm: np.ndarray | None = None) -> float:
    """``tr(Q^T Zx^T Zy) / (||Zx|| ||Zy||)`` on the score rows, Q and the whitening from the fit rows."""
    gx, gy = alpha * x.fit.s + (1 - alpha), alpha * y.fit.s + (1 - alpha)
    p, _, rt = np.linalg.svd((x.fit.u * gx).T @ (y.fit.u * gy), full_matrices=False)

    def coords(v: SplitView, rows: np.ndarray) -> tuple[np.ndarray, float]:
        tv = rows @ v.fit.vt.T                                             # (rows, r)
        h = alpha + (1 - alpha) / v.fit.s
        z = tv * h
        rest = max(float(np.sum(rows ** 2) - np.sum(tv ** 2)), 0.0)       # outside the fit span
        return z, float(np.sqrt(np.sum(z ** 2) + alpha ** 2 * rest))

    zx, nx = coords(x, x.score)
    zy, ny = coords(y, y.score if perm is None else y.score[perm])
    if not (nx > 0 and ny > 0):
        raise SimilarityError("the score rows of one net have zero variance")
    return float(np.sum((zx @ p) * (zy @ rt.T)) / (nx * ny))


def split_matrices(fit_sources: Sequence[Any], score_sources: Sequence[Any], metrics: Sequence[str], *,
                   opts: CCAOptions, alpha: float = 1.0, permutations: int = 0, seed: int = 0,
                   names: Sequence[str] | None = None, fit_split: str = "train",
                   score_split: str = "test") -> dict[str, MatrixResult]:
    """The alignment metrics of ``metrics`` fitted on ``fit_sources`` and scored on ``score_sources``."""
    metrics = [m for m in metrics if m in SPLIT_METRICS]
    fit = [as_source(s) for s in fit_sources]
    score = [as_source(s) for s in score_sources]
    n_fit, n_score, k = check_same_rows(*fit), check_same_rows(*score), len(fit)
    names = list(names) if names else [str(i) for i in range(k)]
    for i in range(k):
        if tuple(fit[i].shape[1:]) != tuple(score[i].shape[1:]):
            raise UserError(f"net {names[i]}: {fit_split} features {tuple(fit[i].shape[1:])} and {score_split} "
                            f"features {tuple(score[i].shape[1:])} differ in shape")
    note = {"fit_split": fit_split, "score_split": score_split, "fit_rows": n_fit, "score_rows": n_score,
            "held_out": ("alignment fitted on the fit split's rows, scored on the score split's rows (centred by the "
                         "fit split's means); the null shuffles the score split's pairing")}
    res: dict[str, MatrixResult] = {}
    views: dict[tuple[str, int], SplitView] = {}
    for m in metrics:
        feats = "flat" if m == "procrustes" else opts.features
        hw = rows_per_sample(score[0], feats)
        rows = n_fit * rows_per_sample(fit[0], feats)
        dims = [cca_data(fit[i][:1], feats)[0].shape[1] for i in range(k)]
        r = MatrixResult(m, "distance" if m in ("procrustes", "shape") else "similarity", np.full((k, k), np.nan),
                         np.full((permutations, k, k), np.nan) if permutations else None, dict(note))
        if m in ("svcca", "pwcca", "r2cca"):
            r.details.update(opts.conventions(m))
        if m == "shape":
            r.details.update({"shape_alpha": alpha, "units": "radians"})
        if m == "pwcca":
            r.details["symmetric"] = False
        for i in range(k):
            for j in range(k):
                if m != "pwcca" and j < i:
                    continue
                why = (upfront_refusal(m, rows, dims[i], dims[j], opts) if m in LABELS else
                       shape_refusal(rows, dims[i], dims[j], alpha) if m == "shape" else None)
                if why:
                    r.refuse(i, j, names, why, "before the SVD")
                    continue
                for t in (i, j):
                    if (feats, t) not in views:
                        views[(feats, t)] = split_view(fit[t], score[t], feats, opts.rank_tol)
                try:
                    _pair(r, m, views[(feats, i)], views[(feats, j)], i, j, opts, alpha, n_score, hw,
                          permutations, seed)
                except SimilarityError as e:
                    r.refuse(i, j, names, str(e), "after the SVD")
        if m != "pwcca":
            fill_symmetric(r.matrix)
            if r.null is not None:
                fill_symmetric(r.null)
        res[m] = r
    return res


def _pair(r: MatrixResult, m: str, x: SplitView, y: SplitView, i: int, j: int, opts: CCAOptions, alpha: float,
          n_score: int, hw: int, permutations: int, seed: int) -> None:
    perms = [None] + [(p[:, None] * hw + np.arange(hw)).ravel() if hw > 1 else p
                      for p in permutation_indices(n_score, permutations, seed)]
    for t, perm in enumerate(perms):
        if m in LABELS:
            kx = x.fit.keep(opts.keep, opts.rule) if m == "svcca" else x.fit.rank
            ky = y.fit.keep(opts.keep, opts.rule) if m == "svcca" else y.fit.rank
            if t == 0 and (kx == 0 or ky == 0):
                raise SimilarityError(f"{LABELS[m]} is undefined: the features of one net have zero variance")
            v, rho = cca_split_value(m, x, y, kx, ky, perm)
            if t == 0:
                r.vectors[(i, j)] = rho
        elif m == "procrustes":
            v = 2.0 - 2.0 * aligned_cos(x, y, 1.0, perm)
        else:
            v = float(np.arccos(np.clip(aligned_cos(x, y, alpha, perm), -1.0, 1.0)))
        if t == 0:
            r.matrix[i, j] = v
        else:
            r.null[t - 1, i, j] = v
