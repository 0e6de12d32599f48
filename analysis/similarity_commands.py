"""``similarity``: CKA / SVCCA / PWCCA / Procrustes matrices over the nets of a feature file.

    python cli.py similarity --features F --layer features.30 [--split test] [--nets a,b,c] \\
        --metric cka,svcca,pwcca,procrustes [--permutations 100] --out_dir D

writes ``D/similarity.json`` (``{"split", "layer", "nets", "metrics": {name: {"matrix", "null_mean",
"p_values", ...}}}``, rows and columns in ``nets`` order) and ``D/config.json``. Notebooks and the
report call :func:`similarity_matrix`, which returns the same dictionary.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import h5py

from analysis.cca import CCA_FAMILY, CCA_FEATURES, cca_matrices
from analysis.cka import FORMS
from analysis.cka_matrices import CKA_FAMILY, cka_family_matrices
from analysis.minibatch_cka import minibatch_cka_matrix
from analysis.similarity import METRICS, get_metric
from analysis.similarity_results import MatrixResult
from common.errors import UserError
from common.files import write_json
from common.options import Command, add_dataclass_args, add_run_args, dataclass_from_args, parse_csv
from common.rundir import RunDir, run_mode
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

FLATTENING = {
    "cka": "flat: per-sample C*H*W features, centred over all samples",
    "cka_unbiased": "flat: per-sample C*H*W features",
    "cka_minibatch": "flat: per-sample C*H*W features",
    "procrustes": "flat: per-sample C*H*W features, centred, scaled to unit Frobenius norm",
}
CCA_FLATTENING = {
    "pooled": "pooled: spatial mean per channel (N x C)",
    "flat": "flat: per-sample C*H*W features (N x C*H*W)",
    "positions": "positions: every position of every image a sample (N*H*W x C); the null shuffles images",
}


@dataclass(frozen=True)
class SimilarityConfig:
    """Options of one ``similarity`` run."""

    layer: str = ""                  # module path of the layer, as in the feature file
    split: str = "test"
    nets: str = ""                   # comma list; empty: every net of the split
    metric: str = "cka"              # comma list of metric names
    permutations: int = 100          # shuffles of the sample pairing for the null (0: no null)
    seed: int = 0                    # seed of the permutations and of the minibatches
    cka_form: str = "auto"           # auto | features (memory independent of N) | gram (independent of C*H*W)
    cca_features: str = "pooled"     # pooled | flat | positions: samples x dims given to SVCCA/PWCCA
    svcca_keep: float = 0.99         # fraction of variance SVCCA's SVD step keeps
    batch_size: int = 256            # cka_minibatch: samples per minibatch
    memory_gb: float = 4.0           # what the computation may hold in memory at once
    allow_changed_checkpoints: bool = False   # use features whose checkpoint changed since extraction


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


def _check_options(cfg: SimilarityConfig) -> None:
    if not cfg.layer:
        raise UserError("--layer is required (the module path stored in the feature file, e.g. features.30)")
    if cfg.permutations < 0:
        raise UserError(f"--permutations {cfg.permutations}: must be >= 0")
    if not 0.0 < cfg.svcca_keep <= 1.0:
        raise UserError(f"--svcca_keep {cfg.svcca_keep}: must be in (0, 1]")
    if cfg.memory_gb <= 0:
        raise UserError(f"--memory_gb {cfg.memory_gb}: must be > 0")
    if cfg.cka_form not in FORMS:
        raise UserError(f"--cka_form {cfg.cka_form!r}; valid: {', '.join(FORMS)}")
    if cfg.cca_features not in CCA_FEATURES:
        raise UserError(f"--cca_features {cfg.cca_features!r}; valid: {', '.join(CCA_FEATURES)}")


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


def similarity_matrix(features_path: str | Path, layer: str, split: str = "test", nets: Sequence[str] | None = None,
                      metrics: str | Sequence[str] = ("cka",), *, permutations: int = 100, seed: int = 0,
                      cka_form: str = "auto", cca_features: str = "pooled", svcca_keep: float = 0.99,
                      batch_size: int = 256, memory_gb: float = 4.0) -> dict[str, Any]:
    """Every requested metric over every pair of ``nets`` at ``layer``: the body of ``similarity.json``."""
    cfg = SimilarityConfig(layer, split, ",".join(nets or []), ",".join(parse_metrics(metrics)), permutations,
                           seed, cka_form, cca_features, svcca_keep, batch_size, memory_gb)
    return _compute(features_path, cfg)


def _compute(features_path: str | Path, cfg: SimilarityConfig) -> dict[str, Any]:
    _check_options(cfg)
    metrics = parse_metrics(cfg.metric)
    memory = int(cfg.memory_gb * 2 ** 30)
    with open_features(features_path) as f:
        nets, dss = open_layer(f, cfg.split, parse_csv(cfg.nets), cfg.layer, cfg.allow_changed_checkpoints)
        n = int(dss[0].shape[0])
        results: dict[str, MatrixResult] = {}
        if any(m in CKA_FAMILY for m in metrics):
            results.update(cka_family_matrices(dss, metrics, form=cfg.cka_form, permutations=cfg.permutations,
                                               seed=cfg.seed, memory_bytes=memory))
        if "cka_minibatch" in metrics:
            results["cka_minibatch"] = minibatch_cka_matrix(dss, batch_size=cfg.batch_size, seed=cfg.seed,
                                                            permutations=cfg.permutations)
        if any(m in CCA_FAMILY for m in metrics):
            results.update(cca_matrices(dss, metrics, features=cfg.cca_features, keep_variance=cfg.svcca_keep,
                                        permutations=cfg.permutations, seed=cfg.seed, memory_bytes=memory))
        dims = {name: list(ds.shape[1:]) for name, ds in zip(nets, dss)}
    body_metrics = {}
    warnings = []
    for m in metrics:
        entry = results[m].to_json()
        entry["description"] = get_metric(m).description
        entry["features"] = FLATTENING.get(m) or CCA_FLATTENING[cfg.cca_features]
        if cfg.permutations and "null" not in entry:
            entry["null"] = (f"pairing of samples shuffled (rows of the column net permuted), the same "
                             f"{cfg.permutations} permutations for every pair, seed {cfg.seed}")
        body_metrics[m] = entry
        warnings += [f"{m}: {w}" for w in entry["warnings"]]
    return {"split": cfg.split, "layer": cfg.layer, "nets": nets, "n_samples": n, "features": str(features_path),
            "dims": dims, "metrics": body_metrics, "warnings": warnings}


def format_matrix(nets: Sequence[str], matrix: Sequence[Sequence[float | None]], width: int = 9) -> str:
    head = " " * width + "".join(f"{n[:width - 1]:>{width}}" for n in nets)
    rows = [f"{a[:width - 1]:<{width}}" + "".join(f"{'n/a' if v is None else f'{v:.3f}':>{width}}" for v in row)
            for a, row in zip(nets, matrix)]
    return "\n".join([head] + rows)


# --------------------------------------------------------------------------- command

HELP = {
    "layer": "layer (module path) to compare, e.g. features.30",
    "split": "split of the feature file (test, train, val)",
    "nets": "comma list of nets; empty: every net of the split",
    "metric": "comma list of metrics: " + ", ".join(METRICS.names()),
    "permutations": "shuffles of the sample pairing for the chance level and p-values (0: none)",
    "seed": "seed of the permutations and of the minibatches",
    "cka_form": "auto, features (memory independent of N) or gram (memory independent of C*H*W); both exact",
    "cca_features": "what SVCCA/PWCCA see: pooled (spatial mean per channel), flat (C*H*W) or positions "
                    "(each position a sample)",
    "svcca_keep": "fraction of variance kept by SVCCA's SVD step",
    "batch_size": "cka_minibatch: samples per minibatch",
    "memory_gb": "GiB the arrays of the computation may hold at once (Gram matrices or accumulators and read "
                 "blocks; the interpreter and libraries add about 0.4 GiB); auto picks the form that fits",
    "allow_changed_checkpoints": "use stored features even when their checkpoint changed since extraction",
}


def _add_similarity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, help="kc-features HDF5 file")
    p.add_argument("--layer", required=True, help=HELP["layer"])
    add_dataclass_args(p, SimilarityConfig, skip=("layer",), help=HELP,
                       choices={"cka_form": list(FORMS), "cca_features": list(CCA_FEATURES)})
    add_run_args(p)


def write_similarity(features: str | Path, cfg: SimilarityConfig, out_dir: str | Path, mode: str = "new") -> dict[str, Any]:
    """Compute ``cfg`` over ``features`` and write ``out_dir/similarity.json`` (and config/metrics) in a run dir."""
    _check_options(cfg)
    parse_metrics(cfg.metric)
    with open_features(features) as f:
        nets, dss = open_layer(f, cfg.split, parse_csv(cfg.nets), cfg.layer, cfg.allow_changed_checkpoints)
        inputs = {name: provenance_of(ds) for name, ds in zip(nets, dss)}
    with RunDir(out_dir, mode) as run:
        run.write_config(cfg, features=str(features), inputs=inputs)
        body = _compute(features, cfg)
        write_json(run.file("similarity.json"), body)
        summary = {}
        for m, entry in body["metrics"].items():
            k = len(body["nets"])
            off = [entry["matrix"][i][j] for i in range(k) for j in range(k) if i != j]
            off = [v for v in off if v is not None]
            summary[m] = {"direction": entry["direction"], "mean_off_diagonal": sum(off) / len(off) if off else None}
        run.finish(summary)
    return body


def _run_similarity(args: argparse.Namespace) -> None:
    cfg = dataclass_from_args(SimilarityConfig, args)
    body = write_similarity(args.features, cfg, args.out_dir, run_mode(args.resume, args.overwrite))
    for m, entry in body["metrics"].items():
        print(f"{m} ({entry['direction']}), {body['layer']}, {body['split']} split, n={body['n_samples']}:")
        print(format_matrix(body["nets"], entry["matrix"]))
        if "p_values" in entry:
            print(f"  permutation p-values ({entry['permutations']} shuffles):")
            print(format_matrix(body["nets"], entry["p_values"]))
    for w in body["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {Path(args.out_dir) / 'similarity.json'}")


COMMANDS = [
    Command("similarity", "CKA / SVCCA / PWCCA / Procrustes matrices between nets at one layer",
            _add_similarity, _run_similarity,
            "Compare every pair of nets of a feature file at one layer with the similarity baselines "
            "(linear CKA biased/unbiased/minibatch, SVCCA, PWCCA, orthogonal Procrustes distance) and a "
            "permutation null (shuffled sample pairing: chance level and p-values). Writes similarity.json "
            "and config.json into --out_dir."),
]
