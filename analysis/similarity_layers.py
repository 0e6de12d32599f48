"""Layer x layer similarity: every requested metric between every layer of net A and every layer of
net B (``--nets A,B``), or between the layers of one net (``--nets A``), the standard CKA heatmap of
Kornblith et al. 2019.

Every (net, layer) pair is one source of :func:`analysis.similarity_run.metric_results` (so each
metric keeps its conventions, refusals and null); the layers block is cut out of that matrix.
``similarity.json`` then holds a ``layers`` key instead of ``layer``/``metrics``::

    {"split", "nets", "n_samples", "features", "dims": {"A/L": [...]}, "warnings",
     "layers": {"row_net": A, "column_net": B, "names": [L1, ...],
                "metrics": {name: {"matrix" (rows: A's layers, columns: B's), "null_mean", "p_values",
                                   "refused", "direction", "description", ...}}}}

and ``layers_<metric>.png/.svg`` beside it draw each matrix (:mod:`analysis.layer_plots`);
``cca_correlations.npz`` holds the canonical correlations (keys ``METRIC/NET/LAYER/NET/LAYER``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.layer_plots import layer_heatmap
from analysis.similarity_results import MatrixResult
from analysis.similarity_run import (
    CORRELATIONS_FILE,
    SimilarityConfig,
    check_options,
    metric_entries,
    metric_results,
    open_layer,
    score_split,
    write_vectors,
)
from common.errors import UserError
from common.files import write_json
from common.options import parse_csv
from common.rundir import RunDir
from features.store import open_features, provenance_of


def check_layer_options(cfg: SimilarityConfig) -> tuple[list[str], list[str]]:
    """The layers and the one or two nets of a layer x layer run."""
    layers = parse_csv(cfg.layers)
    nets = parse_csv(cfg.nets)
    if cfg.layer:
        raise UserError("give --layer (one layer, every pair of nets) or --layers (every pair of layers of one or "
                        "two nets), not both")
    if len(layers) < 1 or len(set(layers)) != len(layers):
        raise UserError(f"--layers {cfg.layers!r}: give a comma list of distinct layers, e.g. features.4,features.8")
    if not 1 <= len(nets) <= 2:
        raise UserError(f"--layers compares the layers of one net (--nets A) or of two (--nets A,B); got --nets "
                        f"{cfg.nets!r}")
    return layers, nets


def _block(r: MatrixResult, rows: list[int], cols: list[int]) -> dict[str, Any]:
    """The metric's entry restricted to rows x cols (indices into the sources)."""
    entry = r.to_json()
    sub = {}
    for key in ("matrix", "null_mean", "null_std", "p_values"):
        if key in entry:
            sub[key] = [[entry[key][i][j] for j in cols] for i in rows]
    refused = []
    for e in r.refused:
        i, j = e["pair"]
        pairs = [(i, j)] + ([(j, i)] if r.details.get("symmetric", True) else [])
        for a, b in pairs:
            if a in rows and b in cols:
                refused.append({**e, "pair": [rows.index(a), cols.index(b)]})
    out = {k: v for k, v in entry.items() if k not in ("matrix", "null_mean", "null_std", "p_values", "refused")}
    out.update(sub)
    if refused:
        out["refused"] = refused
    return out


def layer_matrix(features_path: str | Path, cfg: SimilarityConfig) -> dict[str, Any]:
    """The body of a layer x layer ``similarity.json`` (see the module)."""
    return layer_results(features_path, cfg)[0]


def layer_results(features_path: str | Path, cfg: SimilarityConfig
                  ) -> tuple[dict[str, Any], dict[str, MatrixResult], list[str]]:
    """The body, the per-metric results over every (net, layer) source, and the sources' names."""
    check_options(cfg)
    layers, nets = check_layer_options(cfg)
    names, sources, dims = [], [], {}
    with open_features(features_path) as f:
        for net in nets:
            for layer in layers:
                _, (ds,) = open_layer(f, score_split(cfg), [net], layer, cfg.allow_changed_checkpoints)
                names.append(f"{net}/{layer}")
                sources.append(ds)
                dims[names[-1]] = list(ds.shape[1:])
        fit = None
        if cfg.fit_split:
            fit = [open_layer(f, cfg.fit_split, [net], layer, cfg.allow_changed_checkpoints)[1][0]
                   for net in nets for layer in layers]
        n = int(sources[0].shape[0])
        results = metric_results(sources, names, cfg, fit)
    entries, warnings = metric_entries(results, cfg)
    k = len(layers)
    rows = list(range(k))
    cols = list(range(k, 2 * k)) if len(nets) == 2 else rows
    metrics = {}
    for m, r in results.items():
        block = _block(r, rows, cols)
        block["description"] = entries[m]["description"]
        block["features"] = entries[m]["features"]
        block["convention"] = entries[m]["convention"]
        if "null" in entries[m]:
            block["null"] = entries[m]["null"]
        metrics[m] = block
    metrics = {m: metrics[m] for m in entries}                 # in the requested order
    body = {"split": score_split(cfg), "nets": nets, "n_samples": n, "features": str(features_path),
            "dims": dims, "warnings": warnings,
            "layers": {"row_net": nets[0], "column_net": nets[-1], "names": layers, "metrics": metrics}}
    if cfg.fit_split:
        body["fit_split"] = cfg.fit_split
    return body, results, names


def write_layer_similarity(features: str | Path, cfg: SimilarityConfig, out_dir: str | Path,
                           mode: str = "new") -> dict[str, Any]:
    """Compute the layer x layer matrices of ``cfg`` and write ``similarity.json`` and one heatmap per
    metric (``layers_<metric>.png/.svg``) into a run directory."""
    check_options(cfg)
    layers, nets = check_layer_options(cfg)
    with open_features(features) as f:
        inputs = {f"{net}/{layer}": provenance_of(open_layer(f, score_split(cfg), [net], layer,
                                                             cfg.allow_changed_checkpoints)[1][0])
                  for net in nets for layer in layers}
    with RunDir(out_dir, mode) as run:
        run.write_config(cfg, features=str(features), inputs=inputs)
        body, results, names = layer_results(features, cfg)
        lay = body["layers"]
        if write_vectors(run.file(CORRELATIONS_FILE), results, names):
            for m, r in results.items():
                if r.vectors:
                    lay["metrics"][m]["correlations_file"] = CORRELATIONS_FILE
        for m, e in lay["metrics"].items():
            paths = layer_heatmap(e["matrix"], lay["names"], run.file(f"layers_{m}"), metric=m,
                                  direction=e["direction"], row_net=lay["row_net"], column_net=lay["column_net"],
                                  refused=e.get("refused", []))
            e["figure"] = [p.name for p in paths]
        write_json(run.file("similarity.json"), body)
        summary = {m: {"direction": e["direction"],
                       "diagonal": [row[i] for i, row in enumerate(e["matrix"])]}
                   for m, e in lay["metrics"].items()}
        run.finish(summary)
    return body

