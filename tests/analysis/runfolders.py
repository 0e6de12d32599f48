"""Hand-written result folders for report tests: consistency folders whose pairs are fit-transnet
run directories (metrics.json with a convergence block, log.jsonl epoch records), written without
fitting anything."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analysis.consistency import build_matrices, pair_dirname, pair_row, write_tables
from common.files import write_json


def variance_report(source: str, target: str, fractions: Sequence[float], residual: float, *, layer: str = "conv",
                    verdict: str | None = "converged", reasons: Sequence[str] = (), epochs: int = 6,
                    additive: Sequence[float] | None = None, n: int = 40) -> dict[str, Any]:
    """A metrics.json of a fit: variances for a unit target variance, a convergence block (none when
    ``verdict`` is None), and additive shares when given."""
    rep: dict[str, Any] = {"split": "test", "held_out": True, "n_samples": n, "source": source, "target": target,
                           "layer": layer, "var_target": 1.0, "var_orders": list(fractions), "var_residual": residual,
                           "fraction_orders": list(fractions), "fraction_residual": residual, "r2": 1.0 - residual,
                           "gates": [0.3] * (len(fractions) - 1), "mse": residual, "warnings": []}
    if verdict is not None:
        rep["convergence"] = {"verdict": verdict, "reasons": list(reasons), "rule": "relative drop of the "
                              "validation loss over the last 10% of epochs below 1%", "val_loss_rel_drop": 0.2
                              if verdict == "not converged" else 0.001, "epochs_run": epochs, "epochs_max": epochs,
                              "stopped_early": False}
    if additive is not None:
        rep["additive_shares"] = list(additive)
    return rep


def write_consistency(folder: Path, reports: Sequence[dict[str, Any]], nets: Sequence[str],
                      val: bool = True) -> Path:
    """A consistency folder: pairs/<A>__<B>/{metrics.json, log.jsonl, config.json}, table.json/csv and
    matrices.json, as ``python cli.py consistency`` writes them."""
    rows = []
    for rep in reports:
        pair = folder / "pairs" / pair_dirname(rep["source"], rep["target"])
        pair.mkdir(parents=True, exist_ok=True)
        write_json(pair / "metrics.json", rep)
        write_json(pair / "config.json", {"kind": "fit-transnet", "config": {}})
        epochs = rep.get("convergence", {}).get("epochs_run", 6)
        slow = rep.get("convergence", {}).get("verdict") == "not converged"
        lines = []
        for e in range(1, epochs + 1):
            rec = {"epoch": e, "train_loss": 1.0 / e if slow else 0.2 + 0.8 / e ** 3}
            if val:
                rec["val_loss"] = rec["train_loss"] * 1.1
            lines.append(rec)
        (pair / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        rows.append(pair_row(rep, f"pairs/{pair.name}"))
    write_tables(folder, rows, build_matrices(rows, nets, reports[0]["layer"], "test"))
    return folder
