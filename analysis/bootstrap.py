"""Bootstrap confidence intervals over test rows (pure numpy; no I/O).

The resampling unit is one test row (one image: all its channels and positions move together), drawn
n times with replacement from the n rows of the split; ``replicates`` resamples, seeded. An interval
is the percentile interval of the replicates at ``level`` (default 95 %: the 2.5th and 97.5th
percentiles). Both estimators are evaluated on resample *counts* (how often each row is drawn), so
no resampled copy of the data is built:

- variance ratios of a Trans-Net (R², the per-order fractions, the residual fraction, the additive
  shares) from per-row moments: ``s[i, c]`` = Σ over positions of row i, channel c, and ``q[i]`` =
  Σ over channels and positions of the squares. The report's variance (per-channel centred mean
  square, averaged over channels) of a resample with counts w is
  ``mean_c(Σ_i w_i q_i / (C·W·P) − (Σ_i w_i s[i, c] / (W·P))²)`` with W = Σ w_i, P positions;
- linear CKA (plug-in HSIC on centred features) from the two Gram matrices K = X Xᵀ, L = Y Yᵀ: with
  counts w (Σ w = n), a = K w / n, b = L w / n, κ = wᵀ K w / n², λ = wᵀ L w / n², the resample's
  HSIC is ``wᵀ (K∘L) w − 2n Σ_i w_i a_i b_i + n² κ λ`` (up to a factor that cancels in CKA).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
REPLICATES = 200
UNIT = "test row (image), resampled with replacement"


def resample_counts(n: int, replicates: int = REPLICATES, seed: int = 0) -> np.ndarray:
    """(replicates, n) int: how often each of n rows is drawn in each resample of n rows (seeded)."""
    if n < 2 or replicates < 1:
        raise ValueError(f"a bootstrap needs n >= 2 rows and replicates >= 1, got n={n}, replicates={replicates}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates)


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> list[list[float]] | list[float]:
    """Percentile interval over axis 0 of the replicates: [lo, hi] for a (B,) array, a list of them for
    (B, k). Replicates that are not finite are left out; an interval of none is [nan, nan]."""
    samples = np.asarray(samples, dtype=float)
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    flat = samples.reshape(samples.shape[0], -1)
    out = []
    for col in flat.T:
        col = col[np.isfinite(col)]
        out.append([float(v) for v in np.percentile(col, q)] if col.size else [float("nan")] * 2)
    return out[0] if samples.ndim == 1 else out


# --------------------------------------------------------------------------- variance ratios

@dataclass
class RowMoments:
    """Per-row moments of one tensor family (N rows, C channels, P positions per channel)."""

    s: np.ndarray          # (N, C) float64: per-row, per-channel sums over positions
    q: np.ndarray          # (N,) float64: per-row sums of squares over channels and positions
    positions: int         # P = H * W

    def variance(self, counts: np.ndarray) -> np.ndarray:
        """(B,) report variance (per-channel centred mean square, mean over channels) per resample."""
        counts = np.atleast_2d(counts).astype(float)          # (B, N)
        total = counts.sum(axis=1) * self.positions           # values per channel in each resample
        mean = counts @ self.s / total[:, None]               # (B, C)
        mean_sq = counts @ self.q / (total * self.s.shape[1])  # (B,)
        return mean_sq - (mean ** 2).mean(axis=1)


def variance_ratio_replicates(target: RowMoments, residual: RowMoments, orders: Sequence[RowMoments],
                              partial: Sequence[RowMoments], counts: np.ndarray) -> dict[str, np.ndarray]:
    """Replicates of R², the per-order fractions (B, K+1), the residual fraction and the additive shares
    (B, K+1). ``partial[k]`` are the moments of x_B − Σ_{j≤k} Y_j for k < K (the residual closes them)."""
    var_t = target.variance(counts)
    var_r = residual.variance(counts)
    var_p = np.stack([p.variance(counts) for p in partial] + [var_r], axis=1)          # (B, K+1)
    before = np.concatenate([var_t[:, None], var_p[:, :-1]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"r2": 1 - var_r / var_t, "fraction_residual": var_r / var_t,
                "fraction_orders": np.stack([o.variance(counts) for o in orders], axis=1) / var_t[:, None],
                "additive_shares": (before - var_p) / var_t[:, None]}


def variance_ratio_intervals(target: RowMoments, residual: RowMoments, orders: Sequence[RowMoments],
                             partial: Sequence[RowMoments], replicates: int = REPLICATES, seed: int = 0,
                             level: float = LEVEL) -> dict[str, object]:
    """Percentile intervals of R², the fractions and the additive shares over resampled test rows."""
    counts = resample_counts(target.s.shape[0], replicates, seed)
    reps = variance_ratio_replicates(target, residual, orders, partial, counts)
    return {key: percentile_interval(v, level) for key, v in reps.items()}


# --------------------------------------------------------------------------- linear CKA

def gram(x: np.ndarray) -> np.ndarray:
    """(N, N) float64 Gram matrix of per-row flattened features."""
    x = np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)
    return x @ x.T


def weighted_hsic(k: np.ndarray, l: np.ndarray, counts: np.ndarray, kl: np.ndarray | None = None) -> np.ndarray:
    """(B,) plug-in HSIC (times n²·const) of the rows drawn ``counts`` times, from the Gram matrices."""
    w = np.atleast_2d(counts).astype(np.float64)
    n = w.sum(axis=1)
    kl = k * l if kl is None else kl
    a, b = w @ k / n[:, None], w @ l / n[:, None]
    kappa, lam = (w * a).sum(axis=1) / n, (w * b).sum(axis=1) / n
    return ((w @ kl) * w).sum(axis=1) - 2 * n * (w * a * b).sum(axis=1) + n ** 2 * kappa * lam


def cka_replicates(k: np.ndarray, l: np.ndarray, counts: np.ndarray,
                   self_hsic: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """(B,) linear CKA of each resample; ``self_hsic`` may carry precomputed ``k``/``l`` self-HSIC replicates."""
    hk = (self_hsic or {}).get("k")
    hl = (self_hsic or {}).get("l")
    hk = weighted_hsic(k, k, counts) if hk is None else hk
    hl = weighted_hsic(l, l, counts) if hl is None else hl
    with np.errstate(divide="ignore", invalid="ignore"):
        return weighted_hsic(k, l, counts) / np.sqrt(hk * hl)


def cka_intervals(grams: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]], replicates: int = REPLICATES,
                  seed: int = 0, level: float = LEVEL) -> dict[tuple[str, str], list[float]]:
    """Percentile intervals of linear CKA for each (net, net) pair, every pair on the same resamples."""
    n = next(iter(grams.values())).shape[0]
    counts = resample_counts(n, replicates, seed)
    needed = {name for pair in pairs for name in pair}
    selfs = {name: weighted_hsic(grams[name], grams[name], counts) for name in needed}
    return {(a, b): percentile_interval(cka_replicates(grams[a], grams[b], counts,
                                                       {"k": selfs[a], "l": selfs[b]}), level)
            for a, b in pairs}
