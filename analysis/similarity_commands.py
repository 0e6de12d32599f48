"""``similarity``: CKA / SVCCA / PWCCA / Procrustes / shape matrices over the nets of a feature file.

    python cli.py similarity --features F --layer features.30 [--split test] [--nets a,b,c] \\
        --metric cka,svcca,pwcca,procrustes [--permutations 100] --out_dir D
    python cli.py similarity --features F --layers features.4,features.8 --nets a,b --metric cka --out_dir D

writes ``D/similarity.json`` and ``D/config.json`` (and ``layers_<metric>.png`` for ``--layers``); the
computation lives in :mod:`analysis.similarity_run` (:func:`~analysis.similarity_run.similarity_matrix`
for notebooks) and :mod:`analysis.similarity_layers`, imported when the command runs (the parser needs
only the torch- and h5py-free :mod:`analysis.config`).
"""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from analysis.config import CCA_FEATURES, FORMS, METRICS, PWCCA_VARIANTS, SVCCA_RULES, SimilarityConfig
from common.options import Command, add_dataclass_args, add_run_args, dataclass_from_args
from common.rundir import run_mode


def format_matrix(nets: Sequence[str], matrix: Sequence[Sequence[float | None]], width: int = 9,
                  refused: Sequence[dict] = (), symmetric: bool = True, columns: Sequence[str] | None = None) -> str:
    """The matrix as text; refused pairs are blank cells with a footnote giving the reasons, other
    undefined values ``n/a``."""
    columns = list(columns or nets)
    width = max(width, min(24, max(len(n) for n in list(nets) + columns) + 2))
    blank = {tuple(e["pair"]) for e in refused} | ({tuple(e["pair"][::-1]) for e in refused} if symmetric else set())
    head = " " * width + "".join(f"{n[:width - 1]:>{width}}" for n in columns)
    rows = [f"{a[:width - 1]:<{width}}" + "".join(
        f"{'' if (i, j) in blank else 'n/a' if v is None else f'{v:.3f}':>{width}}" for j, v in enumerate(row))
        for i, (a, row) in enumerate(zip(nets, matrix))]
    notes = sorted({e["reason"] for e in refused})
    foot = [f"  blank: refused ({'; '.join(notes)})"] if notes else []
    return "\n".join([head] + rows + foot)


# --------------------------------------------------------------------------- command

HELP = {
    "layer": "layer (module path) to compare, e.g. features.30",
    "layers": "comma list of layers: every layer of --nets A against every layer of B (or of A with itself), "
              "written as the layers matrix of similarity.json and drawn as layers_<metric>.png",
    "split": "split of the feature file (test, train, val)",
    "nets": "comma list of nets; empty: every net of the split",
    "metric": "comma list of metrics: " + ", ".join(METRICS),
    "permutations": "shuffles of the sample pairing for the chance level and p-values (0: none)",
    "seed": "seed of the permutations and of the minibatches",
    "cka_form": "auto, features (memory independent of N) or gram (memory independent of C*H*W); both exact",
    "cca_features": "what SVCCA/PWCCA see: pooled (spatial mean per channel), flat (C*H*W) or positions "
                    "(each position a sample)",
    "svcca_keep": "SVCCA's SVD step: a fraction 0 < f <= 1 (of the variance or of the summed singular values, "
                  "see --svcca_rule) or an integer count of directions (google's tutorial keeps 20 or 50)",
    "svcca_rule": "what --svcca_keep's fraction counts: variance (sum of s^2, the default) or singular (sum of s, "
                  "as google/svcca's tutorial)",
    "pwcca_variant": "paper (Morcos et al. 2018, whitened variates of centred data) or svcca-code (reproduces "
                     "google/svcca compute_pwcca: no whitening, means added back, uncentred weights)",
    "rank_tol": "CCA numerical rank: 0 = tolerance from the storage dtype's rounding (float16/float32); else "
                "singular values <= rank_tol * s_max are dropped",
    "rbf_sigma": "cka_rbf: bandwidth as a fraction of the median distance between samples (Kornblith et al. "
                 "2019 report 0.2, 0.4, 0.8)",
    "shape_alpha": "shape: partial whitening in [0, 1]; 1 = none (angular Procrustes), 0 = full (CCA-like)",
    "fit_split": "fit the alignment-based metrics (svcca, pwcca, r2cca, procrustes, shape) on this split's rows "
                 "and score them on --score_split's (default: in-sample on --split); the others run on the score split",
    "score_split": "split the held-out alignment metrics are scored on (default: --split)",
    "spatial": "--cca_features positions with nets of different H x W: pool (adaptive average) or interpolate "
               "(bilinear) every net to the smallest H x W; recorded in similarity.json",
    "batch_size": "cka_minibatch: samples per minibatch",
    "memory_gb": "GiB the arrays of the computation may hold at once (Gram matrices or accumulators and read "
                 "blocks; the interpreter and libraries add about 0.4 GiB); auto picks the form that fits",
    "allow_changed_checkpoints": "use stored features even when their checkpoint changed since extraction",
}


def _add_similarity(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", required=True, help="kc-features HDF5 file")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--layer", default="", help=HELP["layer"])
    where.add_argument("--layers", default="", help=HELP["layers"])
    add_dataclass_args(p, SimilarityConfig, skip=("layer", "layers"), help=HELP,
                       choices={"cka_form": list(FORMS), "cca_features": list(CCA_FEATURES),
                                "svcca_rule": list(SVCCA_RULES), "pwcca_variant": list(PWCCA_VARIANTS)})
    add_run_args(p)


def _print_layers(body: dict) -> None:
    lay = body["layers"]
    for m, entry in lay["metrics"].items():
        print(f"{m} ({entry['direction']}), {lay['row_net']} (rows) x {lay['column_net']} (columns), "
              f"{body['split']} split, n={body['n_samples']}:")
        print(f"  {entry['convention']}")
        print(format_matrix(lay["names"], entry["matrix"], refused=entry.get("refused", []), symmetric=False))
    for w in body["warnings"]:
        print(f"warning: {w}")


def _run_similarity(args: argparse.Namespace) -> None:
    from analysis.similarity_layers import write_layer_similarity
    from analysis.similarity_run import write_similarity

    cfg = dataclass_from_args(SimilarityConfig, args)
    if cfg.layers:
        _print_layers(write_layer_similarity(args.features, cfg, args.out_dir, run_mode(args.resume, args.overwrite)))
        print(f"wrote {Path(args.out_dir) / 'similarity.json'}")
        return
    body = write_similarity(args.features, cfg, args.out_dir, run_mode(args.resume, args.overwrite))
    for m, entry in body["metrics"].items():
        print(f"{m} ({entry['direction']}), {body['layer']}, {body['split']} split, n={body['n_samples']}:")
        print(f"  {entry['convention']}")
        refused, sym = entry.get("refused", []), entry.get("symmetric", True)
        print(format_matrix(body["nets"], entry["matrix"], refused=refused, symmetric=sym))
        if "p_values" in entry:
            print(f"  permutation p-values ({entry['permutations']} shuffles):")
            print(format_matrix(body["nets"], entry["p_values"], refused=refused, symmetric=sym))
    for w in body["warnings"]:
        print(f"warning: {w}")
    print(f"wrote {Path(args.out_dir) / 'similarity.json'}")


COMMANDS = [
    Command("similarity", "CKA / SVCCA / PWCCA / Procrustes matrices between nets at one layer, or layer x layer",
            _add_similarity, _run_similarity,
            "Compare every pair of nets of a feature file at one layer (--layer), or every layer of one or two "
            "nets with every other (--layers), with the similarity baselines (linear and RBF CKA biased/unbiased, "
            "minibatch CKA, SVCCA, PWCCA, R2_CCA, orthogonal Procrustes, the shape metric), every convention "
            "named and selectable, and a permutation null (shuffled sample pairing: chance level and p-values); "
            "--fit_split/--score_split score the alignment metrics held out. Writes similarity.json "
            "and config.json into --out_dir."),
]
