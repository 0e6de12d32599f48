"""Bootstrap intervals for a report (the I/O edge of ``analysis/bootstrap.py``): per-row moments of a
fitted Trans-Net's decomposition on its held-out split, and Gram matrices of the nets' features for
linear CKA. Every interval of one split uses the same resamples (same rows, same seed), so the
intervals of different pairs and measures are paired.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.bootstrap import (
    LEVEL,
    REPLICATES,
    UNIT,
    RowMoments,
    cka_intervals,
    gram,
    percentile_interval,
    resample_counts,
    variance_ratio_replicates,
)
from common.errors import UserError
from features.store import get_features, open_features
from transnet.data import choose_placement, make_source, open_pair
from transnet.fit import load_transnet

MAX_GRAM_VALUES = 50_000_000      # N x D feature values read per net for the CKA intervals (400 MB float64)


def _row_moments(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """x: (n, C, H, W) -> per-row, per-channel sums (n, C) and per-row sums of squares (n,), float64."""
    x = x.detach().to(torch.float64)
    return x.sum(dim=(2, 3)).cpu().numpy(), x.pow(2).sum(dim=(1, 2, 3)).cpu().numpy()


@torch.no_grad()
def transnet_row_moments(transnet_dir: str | os.PathLike, split: str = "test",
                         batch_size: int = 256) -> dict[str, Any]:
    """Per-row moments on ``split`` of the target, the residual, each order's component Y_k and the
    partial residuals x_B − Σ_{j≤k} Y_j (k < K), computed on the CPU in the model's float32 forward."""
    model, info = load_transnet(transnet_dir)
    tfeats = info["target_features"] if info.get("target_features") not in (None, info["features"]) else None
    pair = open_pair(info["features"], info["source"], info["target"], info["layer"], split, tfeats,
                     target_layer=info.get("target_layer") or "", spatial=info.get("spatial") or "")
    cpu = torch.device("cpu")
    src = make_source(pair, cpu, choose_placement(pair.nbytes, cpu, "auto"))
    model.eval()
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"target": [], "residual": []}
    for xa, xb in src.sequential(batch_size):
        comps, yhat = model.decompose(xa)
        t = xb.to(torch.float64)
        parts["target"].append(_row_moments(t))
        parts["residual"].append(_row_moments(t - yhat.to(torch.float64)))
        rest = t
        for k, c in enumerate(comps):
            parts.setdefault(f"order{k}", []).append(_row_moments(c))
            if k < len(comps) - 1:
                rest = rest - c.to(torch.float64)
                parts.setdefault(f"partial{k}", []).append(_row_moments(rest))
    positions = int(pair.shape_b[1] * pair.shape_b[2])
    out = {k: RowMoments(np.concatenate([s for s, _ in v]), np.concatenate([q for _, q in v]), positions)
           for k, v in parts.items()}
    return {"moments": out, "orders": model.orders, "n": pair.n}


def pair_replicates(transnet_dir: str | os.PathLike, split: str = "test", replicates: int = REPLICATES,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Bootstrap replicates of R², the fractions and the additive shares of one fitted pair."""
    m = transnet_row_moments(transnet_dir, split)
    mom = m["moments"]
    counts = resample_counts(m["n"], replicates, seed)
    return variance_ratio_replicates(mom["target"], mom["residual"],
                                     [mom[f"order{k}"] for k in range(m["orders"] + 1)],
                                     [mom[f"partial{k}"] for k in range(m["orders"])], counts)


def row_intervals(reps: Mapping[str, np.ndarray], level: float = LEVEL) -> dict[str, Any]:
    """Consistency-row columns ``<key>_ci`` ([lo, hi]) from a pair's replicates."""
    out: dict[str, Any] = {"r2_ci": percentile_interval(reps["r2"], level),
                           "fraction_residual_ci": percentile_interval(reps["fraction_residual"], level),
                           "additive_shares_ci": percentile_interval(reps["additive_shares"], level)}
    for k, ci in enumerate(percentile_interval(reps["fraction_orders"], level)):
        out[f"fraction_order{k}_ci"] = ci
    return out


def add_pair_intervals(folder: str | os.PathLike, rows: Sequence[dict[str, Any]], replicates: int = REPLICATES,
                       seed: int = 0, warnings: list[str] | None = None) -> None:
    """Add ``<key>_ci`` columns and the R² replicates (``r2_replicates``) to the rows of a consistency folder."""
    for r in rows:
        pair_dir = Path(folder) / (r.get("transnet_dir") or "")
        try:
            reps = pair_replicates(pair_dir, r.get("split") or "test", replicates, seed)
        except (UserError, FileNotFoundError, OSError, KeyError) as e:
            if warnings is not None:
                warnings.append(f"no bootstrap interval for {r['source']}→{r['target']}: {e}")
            continue
        r.update(row_intervals(reps))
        r["r2_replicates"] = reps["r2"]


def similarity_cka_intervals(features: str | os.PathLike, split: str, layer: str, nets: Sequence[str],
                             replicates: int = REPLICATES, seed: int = 0) -> list[list[list[float] | None]]:
    """Net x net percentile intervals of linear CKA on ``split`` (diagonal None), from the nets' features."""
    grams = {}
    with open_features(features) as f:
        for n in nets:
            ds = get_features(f, split, n, layer)
            if int(np.prod(ds.shape)) > MAX_GRAM_VALUES:
                raise UserError(f"/{split}/{n}/{layer} holds {int(np.prod(ds.shape))} values, more than the "
                                f"{MAX_GRAM_VALUES} read for CKA intervals")
            grams[n] = gram(ds[...])
    pairs = [(a, b) for i, a in enumerate(nets) for b in nets[i + 1:]]
    cis = cka_intervals(grams, pairs, replicates, seed)
    out: list[list[list[float] | None]] = [[None] * len(nets) for _ in nets]
    for (a, b), ci in cis.items():
        i, j = nets.index(a), nets.index(b)
        out[i][j] = out[j][i] = ci
    return out


def add_study_intervals(st: Any, replicates: int = REPLICATES, seed: int = 0) -> None:
    """Bootstrap intervals for a read study folder (``analysis.study_folder.StudyFolder``), in place: the
    consistency rows' ``<key>_ci`` columns and each similarity layer's ``cka`` ``ci`` matrix (from the
    study's feature file). What cannot be computed is named in the study's warnings."""
    if replicates <= 0:
        return
    st.bootstrap = {"replicates": replicates, "seed": seed, "level": LEVEL, "unit": UNIT}
    for c in st.consistency.values():
        add_pair_intervals(c["dir"], c["rows"], replicates, seed, st.warnings)
    for layer, s in st.similarity.items():
        body = s.get("metrics", {}).get("cka")
        if body is None:
            continue
        if not st.features:
            st.warnings.append(f"no CKA intervals at {layer}: the study holds no feature file")
            continue
        try:
            body["ci"] = similarity_cka_intervals(st.features["path"], s.get("split") or "test", layer, s["nets"],
                                                  replicates, seed)
        except (UserError, KeyError, OSError) as e:
            st.warnings.append(f"no CKA intervals at {layer}: {e}")
