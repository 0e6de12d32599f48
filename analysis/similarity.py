"""The similarity baselines between two nets' features at one layer, by name: linear CKA (biased,
unbiased and minibatch HSIC), SVCCA, PWCCA, R²_CCA and the orthogonal Procrustes distance, each with its
direction (``similarity``: larger = more alike; ``distance``: smaller = more alike) and a
permutation test. Everything is float64.

Where each lives: :mod:`analysis.sources` (reading, non-finite checks), :mod:`analysis.cka` (CKA and
Procrustes of one pair), :mod:`analysis.cka_matrices` (every pair of K nets, Grams shared, the null),
:mod:`analysis.minibatch_cka`, :mod:`analysis.cca` (SVCCA, PWCCA, R²_CCA of one pair),
:mod:`analysis.similarity_cca` (their matrices) and
:mod:`analysis.similarity_results` (null summaries, the per-metric matrices).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from analysis.cca import pwcca_similarity, r2cca_similarity, svcca_similarity
from analysis.cka import linear_cka_similarity, procrustes_distance, unbiased_cka_similarity
from analysis.cka_rbf import rbf_cka_similarity, rbf_unbiased_cka_similarity
from analysis.minibatch_cka import minibatch_cka_similarity
from analysis.similarity_results import NullSummary, null_summary, permutation_indices
from analysis.similarity_shape import shape_distance
from analysis.sources import as_source, check_same_rows
from common.errors import UserError
from common.registry import Registry


@dataclass(frozen=True)
class Metric:
    name: str
    direction: str                      # "similarity" (larger = closer) | "distance" (smaller = closer)
    fn: Callable[..., float]
    description: str

    def __call__(self, x: Any, y: Any, **kw: Any) -> float:
        return self.fn(x, y, **kw)


METRICS: Registry = Registry("similarity metric")
for _m in (
    Metric("cka", "similarity", linear_cka_similarity,
           "linear CKA, plug-in (biased) HSIC, flattened C*H*W features, all samples, exact"),
    Metric("cka_unbiased", "similarity", unbiased_cka_similarity,
           "linear CKA with the unbiased HSIC of Song et al. 2012 (may be slightly negative for unrelated nets)"),
    Metric("cka_minibatch", "similarity", minibatch_cka_similarity,
           "minibatch linear CKA of Nguyen et al. 2021: unbiased HSIC averaged over random minibatches"),
    Metric("svcca", "similarity", svcca_similarity,
           "SVCCA: SVD keeping the leading directions (--svcca_keep, --svcca_rule), then the mean canonical "
           "correlation"),
    Metric("pwcca", "similarity", pwcca_similarity,
           "PWCCA: canonical correlations weighted by the row net's neurons (not symmetric; --pwcca_variant)"),
    Metric("r2cca", "similarity", r2cca_similarity,
           "R2_CCA: the mean squared canonical correlation of the full-rank features"),
    Metric("procrustes", "distance", procrustes_distance,
           "orthogonal Procrustes distance of centred, Frobenius-normalised features, in [0, 2]"),
    Metric("cka_rbf", "similarity", rbf_cka_similarity,
           "RBF-kernel CKA, plug-in (biased) HSIC, bandwidth --rbf_sigma x the median distance (Kornblith et al. 2019)"),
    Metric("cka_rbf_unbiased", "similarity", rbf_unbiased_cka_similarity,
           "RBF-kernel CKA with the unbiased HSIC of Song et al. 2012, bandwidth as cka_rbf"),
    Metric("shape", "distance", shape_distance,
           "generalized shape metric (Williams et al. 2021), angular form in radians, partial whitening "
           "--shape_alpha (1: angular Procrustes, 0: CCA-like)"),
):
    METRICS.add(_m.name, _m)


def get_metric(name: str) -> Metric:
    try:
        return METRICS.get(name)
    except KeyError as e:
        raise UserError(str(e)) from None


def permutation_test(metric: str, x: Any, y: Any, *, permutations: int = 100, seed: int = 0,
                     **kwargs: Any) -> NullSummary:
    """Observed metric and its permutation null: recompute with the rows (images) of y shuffled. x and
    y are loaded into memory; ``kwargs`` go to the metric (e.g. ``features="pooled"``)."""
    m = get_metric(metric)
    xs, ys = as_source(x), as_source(y)
    xs = xs[...] if isinstance(xs, h5py.Dataset) else xs
    ys = ys[...] if isinstance(ys, h5py.Dataset) else ys
    check_same_rows(xs, ys)
    observed = m(xs, ys, **kwargs)
    null = [m(xs, ys[perm], **kwargs) for perm in permutation_indices(len(ys), permutations, seed)]
    return null_summary(observed, np.asarray(null), m.direction)
