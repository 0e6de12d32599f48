"""SVCCA, PWCCA and R²_CCA over every pair of K nets: each net's SVD (:class:`analysis.cca.CCAView`)
computed once and reused for every pair and every permutation of the null.

Refusals are per metric and per pair. Before any SVD, a pair is refused when the dimensions CCA would
see at full rank (``min(rows - 1, dims)``, or SVCCA's integer count) leave no more rows than
dimensions, and (``svcca-code``) when the row net is wider than the column net; a net is decomposed
only if some pair needs it (``nets`` in each metric's entry lists the nets it decomposed). SVCCA with a
fraction learns its k from the SVD, so its pairs are checked after it. Refused pairs are blank (NaN)
with their reason in ``refused``; the other pairs still run.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.cca import (
    CCA_FAMILY,
    CCA_FEATURES,
    CCAView,
    canonical_correlations,
    cca_data,
    check_cca_dims,
    check_keep,
    matched_sources,
    pwcca_value,
    storage_eps,
)
from analysis.similarity_results import MatrixResult, fill_symmetric, gib, permutation_indices
from analysis.sources import BLOCK_BYTES, SimilarityError
from common.errors import UserError
from common.progress import progress
from common.registry import unknown_choice_message

LABELS = {"svcca": "SVCCA", "pwcca": "PWCCA", "r2cca": "R2_CCA"}


@dataclass(frozen=True)
class CCAOptions:
    """The conventions of the CCA family (see :mod:`analysis.cca`)."""

    features: str = "pooled"
    keep: float = 0.99                  # SVCCA: fraction (0, 1] or integer count
    rule: str = "variance"              # SVCCA: variance (sum s^2) | singular (sum s)
    pwcca_variant: str = "paper"        # paper | svcca-code
    rank_tol: float = 0.0               # 0: from the storage dtype; else relative to s_max

    def conventions(self, metric: str) -> dict[str, Any]:
        """What a value of ``metric`` depends on, for ``similarity.json``."""
        rank = ("numerical rank: singular values > max(eps_storage/2 * ||X||_F, s_max * max(rows, dims) * "
                "eps_float64)" if self.rank_tol <= 0 else f"numerical rank: singular values > {self.rank_tol:g} * s_max")
        out: dict[str, Any] = {"cca_features": self.features, "rank_rule": rank}
        if metric == "svcca":
            out["svcca_keep"] = self.keep
            out["svcca_rule"] = (f"keep {int(self.keep)} directions (at most the rank)" if self.keep > 1 else
                                 f"{self.rule}: fewest leading directions whose "
                                 f"{'sum of s^2' if self.rule == 'variance' else 'sum of s'} reaches "
                                 f"{self.keep:g} of the total")
        if metric == "pwcca":
            out["pwcca_variant"] = self.pwcca_variant
            out["weights"] = ("row net (x): matrix[i][j] = PWCCA(nets[i], nets[j]), weights from nets[i]'s neurons" +
                              ("; google/svcca compute_pwcca convention (no whitening, neuron means added, "
                               "uncentred activations), for comparison with the literature"
                               if self.pwcca_variant == "svcca-code" else "; Morcos et al. 2018 formula"))
        return out

    def check(self) -> None:
        if self.features not in CCA_FEATURES:
            raise UserError(unknown_choice_message("--cca_features", self.features, list(CCA_FEATURES)))
        check_keep(self.keep)
        if self.rule not in ("variance", "singular"):
            raise UserError(unknown_choice_message("--svcca_rule", self.rule, ["variance", "singular"]))
        if self.pwcca_variant not in ("paper", "svcca-code"):
            raise UserError(unknown_choice_message("--pwcca_variant", self.pwcca_variant, ["paper", "svcca-code"]))
        if self.rank_tol < 0 or self.rank_tol >= 1:
            raise UserError(f"--rank_tol {self.rank_tol:g}: give 0 (from the storage dtype) or a relative "
                            f"tolerance 0 < t < 1")


def upfront_refusal(metric: str, rows: int, dx: int, dy: int, opts: CCAOptions) -> str | None:
    """Why ``metric`` of a pair with ``dx``/``dy`` dimensions over ``rows`` rows is refused before any
    SVD, or None. Full rank is assumed (ranks cannot exceed ``rows - 1``)."""
    bx, by = min(rows - 1, dx), min(rows - 1, dy)
    if metric == "svcca":
        if opts.keep <= 1:
            return None                             # k comes from the SVD
        bx, by = min(bx, int(opts.keep)), min(by, int(opts.keep))
    if metric == "pwcca" and opts.pwcca_variant == "svcca-code" and dx > dy:
        return (f"PWCCA (svcca-code) needs the row net to have no more dimensions than the column net ({dx} > {dy}), "
                f"as google/svcca's compute_pwcca does")
    if rows <= bx + by:
        return (f"{LABELS[metric]} is meaningless here: {rows} rows for up to {bx} + {by} canonical dimensions (CCA "
                f"needs more rows than both sides' dimensions together, or finds perfect correlations by "
                f"construction); use --cca_features pooled or more samples")
    return None


def _pairs(metric: str, k: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(k) for j in range(k) if metric == "pwcca" or j >= i]


def cca_matrices(sources: Sequence[Any], metrics: Sequence[str], *, features: str = "pooled",
                 keep_variance: float = 0.99, rule: str = "variance", pwcca_variant: str = "paper",
                 rank_tol: float = 0.0, permutations: int = 0, seed: int = 0, memory_bytes: int = 4 << 30,
                 block_bytes: int = BLOCK_BYTES, names: Sequence[str] | None = None) -> dict[str, MatrixResult]:
    """``svcca``, ``r2cca`` (symmetric) and ``pwcca`` (row net gives the weights) over every pair, with
    per-pair refusals, the canonical correlations of every computed pair (``vectors``) and the null
    (shuffled pairing of images)."""
    opts = CCAOptions(features, keep_variance, rule, pwcca_variant, rank_tol)
    opts.check()
    metrics = [m for m in metrics if m in CCA_FAMILY]
    block_bytes = min(block_bytes, max(1 << 12, memory_bytes // 8))
    srcs, n, names, hw, cdims = matched_sources(sources, features, names)
    k, rows = len(srcs), n * hw
    res: dict[str, MatrixResult] = {}
    needed_by: dict[str, set[int]] = {}
    for m in metrics:
        needed = needed_by.setdefault(m, set())
        r = MatrixResult(m, "similarity", np.full((k, k), np.nan),
                         np.full((permutations, k, k), np.nan) if permutations else None,
                         {"samples": rows, **opts.conventions(m)})
        if m == "pwcca":
            r.details["symmetric"] = False
            r.details["note"] = "row net's neurons give the weights: matrix[i][j] = PWCCA(nets[i], nets[j])"
        for i, j in _pairs(m, k):
            why = upfront_refusal(m, rows, cdims[i], cdims[j], opts)
            if why:
                r.refuse(i, j, names, why, "before the SVD")
            else:
                needed.update((i, j))
        res[m] = r
    needed = set().union(*needed_by.values()) if needed_by else set()
    need = sum(8 * rows * cdims[i] * 3 for i in needed)
    if need > memory_bytes:
        raise UserError(f"SVCCA/PWCCA load the features: {features} features of {len(needed)} nets need about "
                        f"{gib(need)}, more than --memory_gb {memory_bytes / 2 ** 30:g}; use --cca_features pooled "
                        f"or raise --memory_gb")
    views: dict[int, CCAView] = {}
    for i in progress(sorted(needed), total=len(needed), desc="CCA bases"):
        samples, norm = cca_data(srcs[i], features, block_bytes)
        views[i] = CCAView.of(samples, norm, storage_eps(srcs[i].dtype), rank_tol)
        del samples
    per_net = {names[i]: {"rank": v.rank, "rank_tol": v.tol, "storage_eps": v.eps, "dims": cdims[i]}
               for i, v in views.items()}
    for m in metrics:
        r = res[m]
        r.details["nets"] = {names[i]: dict(per_net[names[i]]) for i in sorted(needed_by[m])}
        if m == "svcca":
            for i in needed_by[m]:
                r.details["nets"][names[i]]["k"] = views[i].keep(keep_variance, rule)
        _fill(r, m, views, rows, n, hw, opts, permutations, seed, names)
    return res


def _basis(m: str, v: CCAView, opts: CCAOptions) -> np.ndarray:
    return v.u[:, :v.keep(opts.keep, opts.rule)] if m == "svcca" else v.u


def _fill(r: MatrixResult, m: str, views: dict[int, CCAView], rows: int, n: int, hw: int, opts: CCAOptions,
          permutations: int, seed: int, names: list[str]) -> None:
    pairs = [p for p in _pairs(m, r.matrix.shape[0]) if p not in r.refused_pairs()]
    dims_warned = False
    for i, j in progress(pairs, total=len(pairs), desc=m):
        qx, qy = _basis(m, views[i], opts), _basis(m, views[j], opts)
        try:
            check_cca_dims(rows, qx.shape[1], qy.shape[1], LABELS[m])
        except SimilarityError as e:
            r.refuse(i, j, names, str(e), "after the SVD")
            continue
        if not dims_warned and 2 * max(qx.shape[1], qy.shape[1]) * 5 > rows:
            r.warn(f"{rows} rows for up to {max(qx.shape[1], qy.shape[1])} canonical dimensions per side: canonical "
                   f"correlations are inflated at this ratio; compare with null_mean")
            dims_warned = True
        try:
            r.matrix[i, j] = _value(m, views[i], qx, qy, views[j].vt, opts)
            r.vectors[(i, j)] = canonical_correlations(qx, qy)
            for t, perm in enumerate(permutation_indices(n, permutations, seed)):
                rowperm = (perm[:, None] * hw + np.arange(hw)).ravel() if hw > 1 else perm   # whole images
                r.null[t, i, j] = _value(m, views[i], qx, qy[rowperm], views[j].vt, opts)
        except SimilarityError as e:
            r.refuse(i, j, names, str(e), "after the SVD")
    if m != "pwcca":
        fill_symmetric(r.matrix)
        if r.null is not None:
            fill_symmetric(r.null)


def _value(m: str, vx: CCAView, qx: np.ndarray, qy: np.ndarray, vty: np.ndarray, opts: CCAOptions) -> float:
    if m == "pwcca":
        return pwcca_value(vx, qy, opts.pwcca_variant, vty)
    rho = canonical_correlations(qx, qy)
    return float(rho.mean() if m == "svcca" else np.mean(rho ** 2))
