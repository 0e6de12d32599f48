"""Bootstrap intervals over test rows: resample statistics equal the statistic of the explicitly
resampled rows, and the 95% interval of R² covers the population value at about the nominal rate."""
from __future__ import annotations

import numpy as np

from analysis.bootstrap import (
    RowMoments,
    cka_intervals,
    cka_replicates,
    gram,
    percentile_interval,
    resample_counts,
    variance_ratio_intervals,
)


def _moments(x: np.ndarray) -> RowMoments:
    """x: (N, C, P) -> its per-row moments."""
    return RowMoments(x.sum(axis=2), (x ** 2).sum(axis=(1, 2)), x.shape[2])


def _report_variance(x: np.ndarray) -> float:
    return float(((x - x.mean(axis=(0, 2), keepdims=True)) ** 2).mean(axis=(0, 2)).mean())


def _linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(0)
    y = y.reshape(len(y), -1) - y.reshape(len(y), -1).mean(0)
    return float(np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def test_resample_statistics_equal_those_of_the_resampled_rows():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 3, 4)), rng.normal(size=(30, 5)) + 0.0
    y[:, :3] += x.sum(axis=2)
    counts = resample_counts(30, 5, seed=3)
    assert counts.shape == (5, 30) and (counts.sum(axis=1) == 30).all()
    idx = [np.repeat(np.arange(30), c) for c in counts]
    np.testing.assert_allclose(_moments(x).variance(counts), [_report_variance(x[i]) for i in idx], rtol=1e-10)
    np.testing.assert_allclose(cka_replicates(gram(x), gram(y), counts), [_linear_cka(x[i], y[i]) for i in idx],
                               rtol=1e-9)
    assert (resample_counts(30, 5, seed=3) == counts).all()                      # seeded


def test_the_r2_interval_covers_the_population_value_at_about_95_percent():
    # target t ~ N(0, 1) per value, prediction 0.8 t + e with e ~ N(0, 0.3²): residual 0.2 t − e,
    # population R² = 1 − (0.04 + 0.09) / 1 = 0.87
    rng = np.random.default_rng(0)
    covered = 0
    trials = 100
    for _ in range(trials):
        t = rng.normal(size=(60, 2, 3))
        yhat = 0.8 * t + rng.normal(scale=0.3, size=t.shape)
        ci = variance_ratio_intervals(_moments(t), _moments(t - yhat), [_moments(yhat)], [], replicates=200,
                                      seed=int(rng.integers(1 << 30)))["r2"]
        covered += ci[0] <= 0.87 <= ci[1]
    # Binomial(100, 0.95): mean 95, sd 2.2; percentile intervals of a ratio at n = 60 run slightly narrow
    assert 87 <= covered <= 100, covered


def test_cka_intervals_bracket_the_full_sample_value_and_percentiles_skip_nan():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(40, 6))
    grams = {"a": gram(a), "b": gram(a + 0.5 * rng.normal(size=a.shape)), "c": gram(rng.normal(size=(40, 6)))}
    ci = cka_intervals(grams, [("a", "b"), ("a", "c")], replicates=100, seed=0)
    full = cka_replicates(grams["a"], grams["b"], np.ones((1, 40)))[0]
    assert ci[("a", "b")][0] < full < ci[("a", "b")][1] and ci[("a", "c")][1] < ci[("a", "b")][0]
    assert percentile_interval(np.array([1.0, np.nan, 3.0]), 1.0) == [1.0, 3.0]
    assert percentile_interval(np.array([[1.0, 2.0], [3.0, 4.0]]), 1.0) == [[1.0, 3.0], [2.0, 4.0]]
