"""The ``similarity`` computation as a library: :class:`SimilarityConfig`, :func:`similarity_matrix`
(the body of ``similarity.json`` as a dictionary; notebooks and the report call it) and
:func:`write_similarity` (the same, written into a run directory with its config and provenance).

``similarity.json``: ``{"split", "layer", "nets", "n_samples", "dims", "metrics": {name: {"matrix",
"null_mean", "p_values", "convention", "refused", ...}}, "warnings"}`` (plus ``fit_split`` for held-out
scores), rows and columns in ``nets`` order. Each metric entry names its conventions (``convention``
in one line, and field by field); refused pairs are ``None`` cells listed under ``refused`` with their
reason. Canonical correlations of every computed pair go to ``cca_correlations.npz`` beside it.
Layer x layer runs (``--layers``) write a ``layers`` key instead (:mod:`analysis.similarity_layers`).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from analysis.cca import CCA_FAMILY
from analysis.cka import FORMS
from analysis.cka_matrices import CKA_FAMILY, cka_family_matrices
from analysis.cka_rbf import RBF_FAMILY, check_sigma, rbf_cka_matrices
from analysis.config import SimilarityConfig  # re-exported: its old home
from analysis.minibatch_cka import minibatch_cka_matrix
from analysis.similarity import METRICS, get_metric
from analysis.similarity_cca import CCAOptions, cca_matrices
from analysis.similarity_results import MatrixResult
from analysis.similarity_shape import check_alpha, shape_matrix
from analysis.similarity_spatial import SPATIAL, to_common_size
from analysis.similarity_split import SPLIT_METRICS, split_matrices
from analysis.sources import SimilarityError
from common.errors import UserError
from common.files import write_json
from common.options import parse_csv
from common.rundir import RunDir
from features.store import (
    FeatureFileError,
    check_checkpoint_unchanged,
    get_features,
    list_layers,
    list_nets,
    open_features,
    provenance_of,
    read_index,
)

CORRELATIONS_FILE = "cca_correlations.npz"     # beside similarity.json: canonical correlations per pair
FLATTENING = {
    "cka": "flat: per-sample C*H*W features, centred over all samples",
    "cka_unbiased": "flat: per-sample C*H*W features",
    "cka_minibatch": "flat: per-sample C*H*W features",
    "procrustes": "flat: per-sample C*H*W features, centred, scaled to unit Frobenius norm",
    "cka_rbf": "flat: per-sample C*H*W features, Euclidean distances between samples",
    "cka_rbf_unbiased": "flat: per-sample C*H*W features, Euclidean distances between samples",
}
POSITION_METRICS = CCA_FAMILY + ("shape",)     # the metrics --cca_features positions applies to
CCA_FLATTENING = {
    "pooled": "pooled: spatial mean per channel (N x C)",
    "flat": "flat: per-sample C*H*W features (N x C*H*W)",
    "positions": "positions: every position of every image a sample (N*H*W x C); the null shuffles images",
}


def parse_metrics(metric: str | Sequence[str]) -> list[str]:
    names = parse_csv(metric) if isinstance(metric, str) else [str(m) for m in metric]
    if not names:
        raise UserError(f"--metric is empty; valid metric names: {', '.join(METRICS.names())}")
    out: list[str] = []
    for name in names:
        get_metric(name)                       # raises with the valid names listed
        if name not in out:
            out.append(name)
    return out


def check_options(cfg: SimilarityConfig) -> None:
    if not cfg.layer and not cfg.layers:
        raise UserError("--layer is required (the module path stored in the feature file, e.g. features.30), or "
                        "--layers L1,L2,... with --nets A[,B] for layer x layer matrices")
    if cfg.permutations < 0:
        raise UserError(f"--permutations {cfg.permutations}: must be >= 0")
    cca_options(cfg).check()
    check_sigma(cfg.rbf_sigma)
    check_alpha(cfg.shape_alpha)
    if cfg.spatial and cfg.spatial not in SPATIAL:
        raise UserError(f"--spatial {cfg.spatial!r}; valid: {', '.join(SPATIAL)} (or empty: sizes must agree)")
    if cfg.score_split and not cfg.fit_split:
        raise UserError(f"--score_split {cfg.score_split} needs --fit_split (the split the alignment is fitted on); "
                        f"without it every metric is in-sample on --split")
    if cfg.fit_split and cfg.fit_split == score_split(cfg):
        raise UserError(f"--fit_split {cfg.fit_split} equals the score split: held-out scores need another split "
                        f"(e.g. --fit_split train --score_split test)")
    if cfg.memory_gb <= 0:
        raise UserError(f"--memory_gb {cfg.memory_gb}: must be > 0")
    if cfg.cka_form not in FORMS:
        raise UserError(f"--cka_form {cfg.cka_form!r}; valid: {', '.join(FORMS)}")


def open_layer(f: h5py.File, split: str, nets: Sequence[str] | None,
               layer: str, allow_changed_checkpoints: bool = False) -> tuple[list[str], list[h5py.Dataset]]:
    """The nets (all of the split when None) and their complete datasets at ``layer``; a net without
    the layer fails with what it has and which nets have the layer."""
    all_nets = list_nets(f, split)
    nets = list(nets) if nets else all_nets
    if len(set(nets)) != len(nets):
        raise UserError(f"--nets names a net twice: {', '.join(nets)}")
    unknown = [n for n in nets if n not in all_nets]
    if unknown:
        get_features(f, split, unknown[0], layer)          # raises: unknown net, valid ones listed
    lacking = [n for n in nets if layer not in list_layers(f, split, n)]
    if lacking:
        having = [n for n in all_nets if layer in list_layers(f, split, n)]
        what = "; ".join(f"{n} has {', '.join(list_layers(f, split, n)) or 'no layers'}" for n in lacking)
        raise FeatureFileError(
            f"layer {layer!r} is missing for net(s) {', '.join(lacking)} in split {split!r} of {f.filename} ({what}). "
            f"Nets with {layer!r}: {', '.join(having) or 'none'}; pass --nets to choose among them, or "
            f"python cli.py inspect {f.filename} to list the file")
    datasets = [get_features(f, split, n, layer) for n in nets]
    for ds in datasets:
        check_checkpoint_unchanged(ds, allow_changed_checkpoints)
    n_index = len(read_index(f, split))
    for name, ds in zip(nets, datasets):
        if ds.ndim < 2 or ds.shape[0] != n_index:
            raise FeatureFileError(f"{f.filename}: /{split}/{name}/{layer} has shape {ds.shape}; expected "
                                   f"({n_index}, ...) rows matching /{split}/index")
    return nets, datasets


def cca_options(cfg: SimilarityConfig) -> CCAOptions:
    return CCAOptions(cfg.cca_features, cfg.svcca_keep, cfg.svcca_rule, cfg.pwcca_variant, cfg.rank_tol)


def similarity_matrix(features_path: str | Path, layer: str, split: str = "test", nets: Sequence[str] | None = None,
                      metrics: str | Sequence[str] = ("cka",), **options: Any) -> dict[str, Any]:
    """Every requested metric over every pair of ``nets`` at ``layer``: the body of ``similarity.json``.
    ``options`` are :class:`SimilarityConfig` fields (``permutations``, ``cca_features``, ...)."""
    cfg = SimilarityConfig(layer=layer, split=split, nets=",".join(nets or []),
                           metric=",".join(parse_metrics(metrics)), **options)
    return compute(features_path, cfg)[0]


def metric_results(sources: Sequence[Any], names: Sequence[str], cfg: SimilarityConfig,
                   fit_sources: Sequence[Any] | None = None) -> dict[str, MatrixResult]:
    """Every metric of ``cfg`` over every pair of ``sources`` (named ``names``), refusals per pair.
    With ``fit_sources`` the alignment metrics are fitted on them and scored on ``sources``."""
    metrics = parse_metrics(cfg.metric)
    memory = int(cfg.memory_gb * 2 ** 30)
    results: dict[str, MatrixResult] = {}
    cca_sources, spatial = sources, None
    if cfg.spatial and cfg.cca_features == "positions" and any(m in POSITION_METRICS for m in metrics):
        cca_sources, spatial = to_common_size(sources, names, cfg.spatial)
        if fit_sources is not None:
            fit_sources = to_common_size(fit_sources, names, cfg.spatial)[0]
    if fit_sources is not None:
        held = [m for m in metrics if m in SPLIT_METRICS]
        results.update(split_matrices(fit_sources, cca_sources, held, opts=cca_options(cfg), alpha=cfg.shape_alpha,
                                      permutations=cfg.permutations, seed=cfg.seed, names=names,
                                      fit_split=cfg.fit_split, score_split=score_split(cfg)))
        metrics = [m for m in metrics if m not in held]
    if any(m in CKA_FAMILY for m in metrics):
        results.update(cka_family_matrices(sources, metrics, form=cfg.cka_form, permutations=cfg.permutations,
                                           seed=cfg.seed, memory_bytes=memory))
    if "cka_minibatch" in metrics:
        results["cka_minibatch"] = minibatch_cka_matrix(sources, batch_size=cfg.batch_size, seed=cfg.seed,
                                                        permutations=cfg.permutations)
    if any(m in CCA_FAMILY for m in metrics):
        o = cca_options(cfg)
        results.update(cca_matrices(cca_sources, metrics, features=o.features, keep_variance=o.keep, rule=o.rule,
                                    pwcca_variant=o.pwcca_variant, rank_tol=o.rank_tol,
                                    permutations=cfg.permutations, seed=cfg.seed, memory_bytes=memory, names=names))
    if any(m in RBF_FAMILY for m in metrics):
        results.update(rbf_cka_matrices(sources, metrics, sigma=cfg.rbf_sigma, permutations=cfg.permutations,
                                        seed=cfg.seed, memory_bytes=memory, names=names))
    if "shape" in metrics:
        results["shape"] = shape_matrix(cca_sources, alpha=cfg.shape_alpha, features=cfg.cca_features,
                                        rank_tol=cfg.rank_tol, permutations=cfg.permutations, seed=cfg.seed,
                                        names=names)
    if spatial:
        for m, r in results.items():
            if m in POSITION_METRICS:
                r.details["spatial"] = spatial
    check_something_computed(results, len(sources))
    return results


def score_split(cfg: SimilarityConfig) -> str:
    return cfg.score_split or cfg.split


def check_something_computed(results: dict[str, MatrixResult], k: int) -> None:
    """Refused pairs leave the rest running, but a run where every pair of every metric was refused
    fails with the reasons."""
    if results and all(r.refused and len(r.refused_pairs()) >= (k * k if not r.details.get("symmetric", True)
                                                                 else k * (k + 1) // 2) for r in results.values()):
        reasons = sorted({e["reason"] for r in results.values() for e in r.refused})
        raise SimilarityError("every pair was refused: " + "; ".join(reasons))


def convention_line(m: str, entry: dict[str, Any]) -> str:
    """One line naming every convention the values of ``entry`` depend on (for tables and reports)."""
    parts = [entry["features"].split(":")[0] + " features"]
    nets = entry.get("nets") if isinstance(entry.get("nets"), dict) else {}
    if m == "svcca":
        parts.append(entry["svcca_rule"])
        parts.append("k " + ", ".join(f"{n} {d['k']}" for n, d in nets.items()))
    if m == "pwcca":
        parts.append(f"variant {entry['pwcca_variant']}, weights from the row net")
    if nets:
        parts.append("rank " + ", ".join(f"{n} {d['rank']} (tol {d['rank_tol']:.2g})" for n, d in nets.items()))
    if "rbf_sigma" in entry:
        parts.append(f"bandwidth {entry['rbf_sigma']:g} x median distance")
    if "shape_alpha" in entry:
        parts.append(f"alpha {entry['shape_alpha']:g}, radians")
    if "form" in entry and m in ("cka", "cka_unbiased", "procrustes"):
        parts.append(f"{entry['form']} form (exact)")
    if "fit_split" in entry:
        parts.append(f"fitted on {entry['fit_split']}, scored on {entry['score_split']}")
    if "spatial" in entry:
        parts.append(f"{entry['spatial']['mode']} to {entry['spatial']['size'][0]}x{entry['spatial']['size'][1]}")
    if entry.get("refused"):
        parts.append(f"{len(entry['refused'])} pair(s) refused")
    return f"{m}: " + "; ".join(parts)


def metric_entries(results: dict[str, MatrixResult], cfg: SimilarityConfig) -> tuple[dict[str, Any], list[str]]:
    """``similarity.json``'s ``metrics`` (each with its description, features and null) and the warnings."""
    body_metrics = {}
    warnings = []
    for m in parse_metrics(cfg.metric):
        entry = results[m].to_json()
        entry["description"] = get_metric(m).description
        entry["features"] = FLATTENING.get(m) or CCA_FLATTENING[cfg.cca_features]
        if cfg.permutations and "null" not in entry:
            entry["null"] = (f"pairing of samples shuffled (rows of the column net permuted), the same "
                             f"{cfg.permutations} permutations for every pair, seed {cfg.seed}")
        if cfg.fit_split and m not in SPLIT_METRICS:
            entry["in_sample"] = f"not an alignment metric: computed in-sample on the {score_split(cfg)} rows"
        if results[m].refused:
            entry["refused_note"] = "blank cells: pairs refused (see refused); the other pairs were computed"
        entry["convention"] = convention_line(m, entry)
        body_metrics[m] = entry
        warnings += [f"{m}: {w}" for w in entry["warnings"]]
    return body_metrics, warnings


def compute(features_path: str | Path, cfg: SimilarityConfig) -> tuple[dict[str, Any], dict[str, MatrixResult]]:
    """The body of ``similarity.json`` and the per-metric results behind it."""
    check_options(cfg)
    with open_features(features_path) as f:
        nets, dss = open_layer(f, score_split(cfg), parse_csv(cfg.nets), cfg.layer, cfg.allow_changed_checkpoints)
        fit = (open_layer(f, cfg.fit_split, nets, cfg.layer, cfg.allow_changed_checkpoints)[1]
               if cfg.fit_split else None)
        n = int(dss[0].shape[0])
        results = metric_results(dss, nets, cfg, fit)
        dims = {name: list(ds.shape[1:]) for name, ds in zip(nets, dss)}
    body_metrics, warnings = metric_entries(results, cfg)
    body = {"split": score_split(cfg), "layer": cfg.layer, "nets": nets, "n_samples": n,
            "features": str(features_path), "dims": dims, "metrics": body_metrics, "warnings": warnings}
    if cfg.fit_split:
        body["fit_split"] = cfg.fit_split
    return body, results


def write_vectors(path: Path, results: dict[str, MatrixResult], names: Sequence[str]) -> bool:
    """The canonical correlations of every computed pair, ``METRIC/ROW/COLUMN`` arrays in one .npz."""
    arrays = {f"{m}/{names[i]}/{names[j]}": v for m, r in results.items() for (i, j), v in r.vectors.items()}
    if not arrays:
        return False
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return True


def write_similarity(features: str | Path, cfg: SimilarityConfig, out_dir: str | Path, mode: str = "new") -> dict[str, Any]:
    """Compute ``cfg`` over ``features`` and write ``out_dir/similarity.json`` (and config/metrics) in a run dir."""
    check_options(cfg)
    parse_metrics(cfg.metric)
    with open_features(features) as f:
        nets, dss = open_layer(f, score_split(cfg), parse_csv(cfg.nets), cfg.layer, cfg.allow_changed_checkpoints)
        inputs = {name: provenance_of(ds) for name, ds in zip(nets, dss)}
        if cfg.fit_split:
            fit = open_layer(f, cfg.fit_split, nets, cfg.layer, cfg.allow_changed_checkpoints)[1]
            inputs.update({f"{name}@{cfg.fit_split}": provenance_of(ds) for name, ds in zip(nets, fit)})
    with RunDir(out_dir, mode) as run:
        run.write_config(cfg, features=str(features), inputs=inputs)
        body, results = compute(features, cfg)
        if write_vectors(run.file(CORRELATIONS_FILE), results, body["nets"]):
            for m, r in results.items():
                if r.vectors:
                    body["metrics"][m]["correlations_file"] = CORRELATIONS_FILE
        write_json(run.file("similarity.json"), body)
        summary = {}
        for m, entry in body["metrics"].items():
            k = len(body["nets"])
            off = [entry["matrix"][i][j] for i in range(k) for j in range(k) if i != j]
            off = [v for v in off if v is not None]
            summary[m] = {"direction": entry["direction"], "mean_off_diagonal": sum(off) / len(off) if off else None}
        run.finish(summary)
    return body
