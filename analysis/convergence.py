"""Whether a Trans-Net's numbers may carry a conclusion: its convergence verdict and its R².

Every fit writes a ``convergence`` block into ``metrics.json`` (and its ``variance.json``)::

    "convergence": {"verdict": "converged" | "not converged" | "unknown", "reasons": [...],
                    "rule": "...", "val_loss_rel_drop": float | null, "epochs_run": int,
                    "epochs_max": int, "stopped_early": bool}

and one ``log.jsonl`` record per epoch with ``train_loss`` and (when a validation set is held out of
the training split) ``val_loss``. A report written before convergence was judged has no block: its
verdict is ``unknown`` (shown as such, never taken for converged).

A pair is *usable* for a conclusion (an extreme, a ranking, an asymmetry) when its fit is not
judged "not converged" and its held-out R² is not below 0 (a Trans-Net predicting worse than the
target's mean explains nothing); :func:`refusal` says why a pair is not usable.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

VERDICTS = ("converged", "not converged", "unknown")
NO_BLOCK = "the fit recorded no convergence verdict (a run written before convergence was judged)"


def convergence_of(report: Mapping[str, Any] | None) -> dict[str, Any]:
    """The report's ``convergence`` block, normalised: a verdict of :data:`VERDICTS` (``unknown``
    when the block is absent or its verdict is not one of them) and a list of reasons."""
    block = (report or {}).get("convergence")
    if not isinstance(block, Mapping):
        return {"verdict": "unknown", "reasons": [NO_BLOCK]}
    out = dict(block)
    verdict = out.get("verdict")
    if verdict not in VERDICTS:
        out["reasons"] = [f"unrecognised verdict {verdict!r}"] + list(out.get("reasons") or [])
        verdict = "unknown"
    out["verdict"] = verdict
    out["reasons"] = [str(r) for r in out.get("reasons") or []]
    return out


def verdict_of(row: Mapping[str, Any]) -> str:
    """``converged``, ``not converged`` or ``unknown`` of a consistency row (its ``convergence``
    column; ``unknown`` if unset)."""
    v = row.get("convergence")
    return v if v in VERDICTS else "unknown"


def refusal(row: Mapping[str, Any]) -> str | None:
    """Why no conclusion may be drawn from this pair (None when it may): not converged, or R² < 0."""
    why = []
    if verdict_of(row) == "not converged":
        reasons = row.get("convergence_reasons") or []
        why.append("the fit did not converge" + (f" ({'; '.join(reasons)})" if reasons else ""))
    r2 = row.get("r2")
    if r2 is not None and r2 < 0:
        why.append(f"its held-out R² is {r2:.2f} < 0 (it predicts worse than the target's mean)")
    return " and ".join(why) or None


def usable(row: Mapping[str, Any]) -> bool:
    return refusal(row) is None


def read_history(run_dir: str | Path) -> list[dict[str, Any]]:
    """The ``log.jsonl`` records of a run directory (empty when absent); a line cut by an interrupted
    run is skipped."""
    p = Path(run_dir) / "log.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def loss_series(history: list[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(epoch, loss) series of a fit's log: ``train`` (``train_loss``) and, when logged, ``val``
    (``val_loss``); records without a finite value are left out."""
    out: dict[str, list[tuple[int, float]]] = {}
    for key, name in (("train_loss", "train"), ("val_loss", "val")):
        pts = [(int(h["epoch"]), float(h[key])) for h in history
               if isinstance(h.get(key), (int, float)) and h.get("epoch") is not None and h[key] == h[key]]
        if pts:
            out[name] = pts
    return out
