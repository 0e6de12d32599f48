"""Results of the similarity metrics: the permutation null's summary and one metric over every pair
of K nets (:class:`MatrixResult`, the entries of ``similarity.json``).

Permutation null: the pairing of samples is shuffled (rows of the second net permuted; the same
seeded permutations for every pair), the metric recomputed, and the p-value is
``(1 + #{null at least as close as observed}) / (1 + permutations)``; its mean is the chance level.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def permutation_indices(n: int, permutations: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The seeded sequence of row permutations every null of this module uses."""
    rng = np.random.default_rng(seed)
    for _ in range(permutations):
        yield rng.permutation(n)


@dataclass(frozen=True)
class NullSummary:
    observed: float
    null_mean: float
    null_std: float
    p_value: float
    permutations: int
    null: np.ndarray = field(repr=False)


def null_summary(observed: float, null: np.ndarray, direction: str) -> NullSummary:
    """Chance level and permutation p-value ``(1 + #{null at least as close}) / (1 + P)``."""
    null = np.asarray(null, dtype=np.float64)
    if direction not in ("similarity", "distance"):
        raise ValueError(f"direction {direction!r}; valid: similarity, distance")
    as_close = null >= observed if direction == "similarity" else null <= observed
    p = (1.0 + float(as_close.sum())) / (1.0 + len(null))
    return NullSummary(float(observed), float(null.mean()) if len(null) else float("nan"),
                       float(null.std()) if len(null) else float("nan"), p, len(null), null)


@dataclass
class MatrixResult:
    """One metric over every pair of K nets: values, and the permutation null when asked for.
    Undefined entries are NaN here and ``None`` in :meth:`to_json`, always with a warning saying why."""

    metric: str
    direction: str
    matrix: np.ndarray                        # (K, K)
    null: np.ndarray | None = None            # (P, K, K) null values, NaN where not computed
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)     # {"pair", "nets", "reason", "when"}
    vectors: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)   # canonical correlations per pair

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def refuse(self, i: int, j: int, names: list[str], reason: str, when: str) -> None:
        """Leave pair (i, j) blank, with why and when it was decided (e.g. ``before the SVD``)."""
        self.matrix[i, j] = np.nan
        if self.null is not None:
            self.null[:, i, j] = np.nan
        self.refused.append({"pair": [i, j], "nets": [names[i], names[j]], "reason": reason, "when": when})

    def refused_pairs(self) -> set[tuple[int, int]]:
        return {(e["pair"][0], e["pair"][1]) for e in self.refused}

    def refused_mask(self) -> np.ndarray:
        """(K, K) True where a pair was refused (both orders for a symmetric metric)."""
        k = self.matrix.shape[0]
        mask = np.zeros((k, k), dtype=bool)
        for i, j in self.refused_pairs():
            mask[i, j] = True
            if self.details.get("symmetric", True):
                mask[j, i] = True
        return mask

    def summaries(self) -> dict[str, np.ndarray]:
        """null_mean, null_std, p_values (K, K); NaN where there is no value or no null."""
        k = self.matrix.shape[0]
        out = {key: np.full((k, k), np.nan) for key in ("null_mean", "null_std", "p_values")}
        if self.null is None:
            return out
        for i in range(k):
            for j in range(k):
                col = self.null[:, i, j]
                if np.isfinite(self.matrix[i, j]) and len(col) and np.all(np.isfinite(col)):
                    s = null_summary(self.matrix[i, j], col, self.direction)
                    out["null_mean"][i, j], out["null_std"][i, j], out["p_values"][i, j] = \
                        s.null_mean, s.null_std, s.p_value
        return out

    def to_json(self) -> dict[str, Any]:
        def lists(a: np.ndarray) -> list:
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]

        body: dict[str, Any] = {"direction": self.direction, "matrix": lists(self.matrix)}
        if self.null is not None:
            sums = self.summaries()
            body.update({"null_mean": lists(sums["null_mean"]), "null_std": lists(sums["null_std"]),
                         "p_values": lists(sums["p_values"]), "permutations": int(self.null.shape[0])})
            missing_null = np.isfinite(self.matrix) & ~np.isfinite(sums["p_values"])
            if missing_null.any() and not self.warnings:
                self.warn("the permutation null is missing for some pairs")
        if not np.all(np.isfinite(self.matrix) | self.refused_mask()) and not self.warnings:
            self.warn("some values are undefined")
        body.update(self.details)
        if self.refused:
            body["refused"] = list(self.refused)
        body["warnings"] = list(self.warnings)
        return body


def fill_symmetric(a: np.ndarray) -> None:
    """Copy the upper triangle of the last two axes to the lower one."""
    k = a.shape[-1]
    iu = np.triu_indices(k, 1)
    a[..., iu[1], iu[0]] = a[..., iu[0], iu[1]]


def gib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.2f} GiB"

