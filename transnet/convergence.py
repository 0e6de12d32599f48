"""Convergence of a Trans-Net fit: the held-out validation rows, the verdict written into
``metrics.json`` (``convergence``), and the plateau stop of ``--epochs auto``.

The validation rows are a seeded choice from the **training** split (never the split of the report):
``numpy.random.default_rng(seed).choice`` of ``round(val_fraction * n)`` of its ``n`` rows (at least
one row, and at least one row left to train on), sorted. The fit trains on the other rows and logs
``val_loss`` (the training loss's convention on the validation rows) after every epoch.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

WINDOW_FRACTION = 0.1       # the last 10 % of the epochs (at least one epoch)
MAX_REL_DROP = 0.01         # a validation loss still falling by more than 1 % there: not converged
MAX_VAR_RATIO = 2.0         # reconstruction (or one order) above 2x the target's variance: not converged
PLATEAU_MIN_REL = 1e-3      # --epochs auto: a smaller relative improvement does not count as progress

RULE = (f"converged when the best validation loss of the last {WINDOW_FRACTION:.0%} of the epochs (at least "
        f"one epoch) is at most {MAX_REL_DROP:.0%} below the best before them, R² on the report's split is >= 0, and "
        f"neither the reconstruction nor any order has more than {MAX_VAR_RATIO:g}x the target's variance; "
        f"'not converged' when any of these fails; 'unknown' when no validation loss was logged and "
        f"nothing else fails")

VAL_RULE = ("validation rows: numpy.random.default_rng(seed).choice of round(val_fraction * n) of the n rows "
            "of the training split (at least 1, leaving at least 1), sorted; the fit trains on the others")
SCHEDULES = {"fixed": "paper-fixed", "auto": "auto-plateau"}


def validation_rows(n: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted validation rows of a training split of ``n`` rows (empty for ``fraction`` 0)."""
    if fraction <= 0 or n < 2:
        return np.zeros(0, dtype=np.int64)
    k = min(n - 1, max(1, round(fraction * n)))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False)).astype(np.int64)


def val_loss_rel_drop(curve: Sequence[float | None]) -> float | None:
    """How far the validation loss still fell over the last :data:`WINDOW_FRACTION` of the epochs: the
    best value of those ``k = max(1, ceil(0.1 n))`` epochs against the best before them,
    ``(min L[:n-k] - min L[n-k:]) / |min L[:n-k]|`` (a single noisy epoch moves neither minimum much);
    None without a curve of at least two finite values."""
    vals = [float(v) for v in curve if v is not None]
    if len(vals) < 2 or not all(math.isfinite(v) for v in vals):
        return None
    k = _window(len(vals))
    before, last = min(vals[:-k]), min(vals[-k:])
    return 0.0 if before == 0 else (before - last) / abs(before)


def _window(n: int) -> int:
    return min(n - 1, max(1, math.ceil(WINDOW_FRACTION * n)))


def verdict(val_curve: Sequence[float | None], report: dict[str, Any], epochs_run: int, epochs_max: int
            ) -> dict[str, Any]:
    """The ``convergence`` block of a fit's metrics (see :data:`RULE`) from its validation-loss curve
    (one value per epoch) and its variance report (``r2``, ``var_target``, ``var_reconstruction``,
    ``fraction_orders``)."""
    reasons = []
    drop = val_loss_rel_drop(val_curve)
    if drop is not None and drop > MAX_REL_DROP:
        reasons.append(f"the validation loss still fell by {drop:.1%} over the last {_window(len(val_curve))} of "
                       f"{len(val_curve)} epochs (more than {MAX_REL_DROP:.0%})")
    r2 = report.get("r2")
    if r2 is not None and math.isfinite(r2) and r2 < 0:
        reasons.append(f"R² {r2:.3f} on split {report.get('split')!r} is below 0")
    var_t = report.get("var_target") or 0.0
    if var_t > 0:
        ratio = (report.get("var_reconstruction") or 0.0) / var_t
        if ratio > MAX_VAR_RATIO:
            reasons.append(f"the reconstruction has {ratio:.1f}x the target's variance (more than {MAX_VAR_RATIO:g}x)")
        for k, f in enumerate(report.get("fraction_orders") or []):
            if f is not None and math.isfinite(f) and f > MAX_VAR_RATIO:
                reasons.append(f"order {k} has {f:.1f}x the target's variance (more than {MAX_VAR_RATIO:g}x)")
    state = "not converged" if reasons else "unknown" if drop is None else "converged"
    return {"verdict": state, "reasons": reasons, "rule": RULE, "val_loss_rel_drop": drop,
            "epochs_run": int(epochs_run), "epochs_max": int(epochs_max), "stopped_early": epochs_run < epochs_max}


def plateau_stop(patience: int, key: str = "val_loss") -> Callable[[list[dict[str, Any]]], bool]:
    """The stop rule of ``--epochs auto``: stop once ``patience`` epochs passed since the last epoch
    that lowered ``key`` by more than :data:`PLATEAU_MIN_REL` (relative) below the best value so far.
    A pure function of the history, so a resumed fit stops where an uninterrupted one would."""
    def stop(history: list[dict[str, Any]]) -> bool:
        best, best_at = math.inf, -1
        for i, h in enumerate(history):
            v = h.get(key)
            if v is not None and math.isfinite(v) and (best_at < 0 or v < best - PLATEAU_MIN_REL * abs(best)):
                best, best_at = v, i
        return best_at >= 0 and len(history) - 1 - best_at >= patience
    return stop
