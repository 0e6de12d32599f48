"""Subcommands ``consistency``, ``visualize``, ``diagnose`` and ``report``: thin wrappers that parse,
call the ``analysis`` package and print where the results went. The parsers need only torch-free
modules (analysis/config.py, transnet/config.py) and each run imports what it calls
(docs/internals.md, "Arguments before torch")."""
from __future__ import annotations

import argparse
from pathlib import Path

from analysis.bootstrap import REPLICATES
from analysis.config import PAIR_PLANS, PER_PAIR, VISUALS, ConsistencyConfig, DiagnoseConfig
from common.finished import require_finished
from common.options import Command, add_dataclass_args, add_run_args, dataclass_from_args
from common.ranges import nonneg_int
from common.rundir import run_mode
from transnet.config import GROUPED, SPATIAL, FitConfig
from transnet.options import FIT_CHOICES, FIT_HELP, FIT_TYPES

CONSISTENCY_HELP = {
    "features": "kc-features file holding every net at --layer (train and test splits)",
    "layer": "layer (module path) to compare at, e.g. features.30: the sources' layer, and the targets' unless "
             "--target_layer",
    "pairs": "pair plan: all (every ordered pair), chain (consecutive nets of --nets, both directions), "
             "star:NAME (NAME to every other net and back), or explicit ordered pairs A>B,C>D",
    "nets": "comma list of nets in family order (chain order, matrix order); default: every net in the file",
    "family": "a family.json (or its folder): compare its members (feature-file net names = member names), "
              "in generation order",
    "split": "held-out split the variances are reported on (a split other than --train_split; --split equal to "
             "--train_split gives in-sample reports, labelled held_out false with a warning in the table)",
    "allow_other_checkpoints": "with --family: use feature-file nets whose checkpoint sha256 is not the member's",
    "grouped": "fit pairs of one build (channels, options, training rows) together as one grouped model, each "
               "pair equal to its separate fit: auto (in one process, for small layers: a source row of at most "
               "65,536 values on CUDA, where separate fits are launch-bound, 4,096 on the CPU), on (wherever "
               "pairs allow it), off",
    "target_layer": "cross-layer pairs: the targets' layer (module path), another than --layer, e.g. --layer "
                    "features.20 --target_layer features.30 fits A at features.20 -> B at features.30; a net may "
                    "then map onto itself (A>A; the plan all includes it); pair folders are pairs/<A>@<L>__<B>@<L2>. "
                    "Empty: --layer",
    "spatial": "pairs whose source and target maps differ in H x W: pool = adaptive average pooling of the source "
               "down to the target's size (needs a source at least as large), interpolate = bilinear resampling "
               "(align_corners=False) of the source to the target's size; the target is never resized, and rows "
               "record the convention. Empty (default): such pairs are refused before anything is fitted",
}


# --------------------------------------------------------------------------- consistency

def _add_consistency(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, ConsistencyConfig, help=CONSISTENCY_HELP,
                       choices={"grouped": list(GROUPED), "spatial": list(SPATIAL)})
    g = p.add_argument_group("Trans-Net fitting (as fit-transnet; applied to every pair)")
    add_dataclass_args(g, FitConfig, skip=PER_PAIR, help=FIT_HELP, choices=FIT_CHOICES, types=FIT_TYPES)
    p.add_argument("--no_figures", action="store_true", help="skip the heatmap and stacked-bar figures")
    add_run_args(p)


def _run_consistency(args: argparse.Namespace) -> None:
    from analysis.consistency import run_consistency
    from analysis.visualize import consistency_figures

    cfg = dataclass_from_args(ConsistencyConfig, args)
    fit = dataclass_from_args(FitConfig, args, features=cfg.features, layer=cfg.layer, eval_split=cfg.split,
                              target_layer="", spatial="")          # set per pair by run_consistency
    res = run_consistency(cfg, fit, args.out_dir, run_mode(args.resume, args.overwrite))
    out = Path(args.out_dir)
    print(f"{len(res['pairs'])} pair(s) ({res['reused']} reused); table: {out / 'table.csv'}, "
          f"matrices: {out / 'matrices.json'}")
    if not args.no_figures:
        paths = consistency_figures(out, res["rows"], res["nets"], cfg.label)
        print(f"figures: {', '.join(str(p) for p in paths if p.suffix == '.png')}")


# --------------------------------------------------------------------------- visualize

def _add_visualize(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", nargs="?", default=None,
                   help="a study folder, a consistency folder (table.json), a similarity.json (or its folder), or "
                        "a family folder (family.json); not needed for --what panel")
    p.add_argument("--what", default="auto", choices=VISUALS, help="which figures (auto: from what PATH holds)")
    p.add_argument("--out_dir", default=None, help="where figures go (default: PATH/figures or next to the file)")
    p.add_argument("--allow_unfinished", action="store_true",
                   help="draw the results of a job that did not finish (read as they are)")
    g = p.add_argument_group("--what panel: the Fig. 1 decomposition of chosen images and channels")
    g.add_argument("--transnet", default=None, help="fit-transnet run directory")
    g.add_argument("--features", default=None, help="kc-features file (default: the one the Trans-Net was fitted on)")
    g.add_argument("--split", default="test", help="split the rows are taken from")
    g.add_argument("--rows", default="0", help="comma list of feature-file rows (images)")
    g.add_argument("--channels", default="0", help="comma list of target channels")
    g.add_argument("--allow_other_checkpoints", action="store_true",
                   help="apply the Trans-Net to features of other checkpoints than it was fitted on")


def _run_visualize(args: argparse.Namespace) -> None:
    from analysis.visualize import visualize

    paths = visualize(args.path, args.what, args.out_dir, args.allow_unfinished, transnet=args.transnet,
                      features=args.features,
                      split=args.split, rows=args.rows, channels=args.channels,
                      allow_other_checkpoints=args.allow_other_checkpoints)
    print(f"wrote {len(paths)} file(s):")
    for p in paths:
        print(f"  {p}")


# --------------------------------------------------------------------------- diagnose

DIAGNOSE_HELP = {
    "features": "kc-features file",
    "layer": "layer (module path); with --consistency, the consistency folder's layer by default",
    "a": "net A: the net diagnosed (its blind spots and unreliable features)",
    "b": "net B: the net A is compared with",
    "consistency": "consistency folder holding pairs/A__B and pairs/B__A",
    "transnet_ab": "Trans-Net run A -> B (instead of --consistency)",
    "transnet_ba": "Trans-Net run B -> A (instead of --consistency)",
    "split": "held-out split to diagnose", "top": "ranked images / channels / (image, channel) pairs listed",
    "panels": "Fig. 1 panels per direction", "panel_channels": "channels shown per panel image",
    "block_rows": "rows per contiguous HDF5 read", "device": "auto, cpu, cuda or cuda:N",
    "allow_other_checkpoints": "apply the Trans-Nets to features of other checkpoints than they were fitted on",
    "allow_unfinished": "read Trans-Nets whose fit did not finish (their last.pt)",
}


def _add_diagnose(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, DiagnoseConfig, help=DIAGNOSE_HELP)
    add_run_args(p)


def _run_diagnose(args: argparse.Namespace) -> None:
    from analysis.diagnose import diagnose_pair
    from analysis.readings import diagnosis_readings

    cfg = dataclass_from_args(DiagnoseConfig, args)
    d = diagnose_pair(cfg, args.out_dir, run_mode(args.resume, args.overwrite))
    for line in diagnosis_readings(d):
        print(line)
    print(f"wrote {Path(args.out_dir) / 'diagnosis.json'}, {Path(args.out_dir) / 'channels.csv'} and "
          f"{len(d['figures'])} figure file(s) in {Path(args.out_dir) / 'figures'}")


# --------------------------------------------------------------------------- report

def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", help="a study folder (layout: analysis/study_layout.py) or any folder of results the "
                                     "commands wrote (consistency folders, fit-transnet runs, similarity.json, "
                                     "diagnose folders, family manifests), searched recursively")
    p.add_argument("--out_dir", default=None, help="where report.html, report.md and figures/ go (default: STUDY_DIR)")
    p.add_argument("--allow_unfinished", action="store_true",
                   help="report on a study whose run did not finish (its stages read as they are)")
    p.add_argument("--bootstrap", type=nonneg_int(), default=REPLICATES, metavar="B",
                   help="resamples of the test rows for the percentile intervals of R², the fractions and CKA "
                        "(0: no intervals)")
    p.add_argument("--seed", type=nonneg_int(), default=0, help="seed of the bootstrap resamples")


def _run_report(args: argparse.Namespace) -> None:
    from analysis.report import make_report

    if Path(args.study_dir, "config.json").exists():      # a study folder written by `study`
        require_finished(args.study_dir, "report", args.allow_unfinished)
    res = make_report(args.study_dir, args.out_dir, args.bootstrap, args.seed)
    print(f"wrote {res['html']} (self-contained) and {res['markdown']}")
    for m in res["missing"]:
        print(f"missing: {m}")
    for w in res["warnings"]:
        print(f"warning: {w}")


COMMANDS = [
    Command("consistency", "fit Trans-Nets for many pairs of nets and tabulate their consistency",
            _add_consistency, _run_consistency,
            "Fit (or reuse) one Trans-Net per ordered pair of the plan at one layer and write table.csv/table.json "
            "(source, target, every variance and fraction, R², gates, held-out MSE), matrices.json (net x net and "
            "pairs x fractions) and figures into --out_dir; pairs/<A>__<B> are fit-transnet run directories. "
            "With --target_layer the pairs go from --layer to that layer (cross-layer; --spatial for maps of "
            "different sizes). "
            f"Pair plans: {', '.join(PAIR_PLANS)}."),
    Command("visualize", "draw the figures of a study, consistency folder, similarity.json, family or Trans-Net",
            _add_visualize, _run_visualize,
            "PNG + SVG figures in one style: heatmaps (fractions on a fixed [0, 1] scale), stacked order fractions, "
            "generation and training curves, and the paper's Fig. 1 decomposition panel (--what panel)."),
    Command("diagnose", "blind spots and unreliable features of net A against net B", _add_diagnose, _run_diagnose,
            "From the residuals of the A->B and B->A Trans-Nets: residual energy per channel, position and image "
            "(relative to the target's variance), ranked images and channels, and Fig. 1 panels of the top images."),
    Command("report", "write report.html (self-contained) and report.md of a study or results folder", _add_report,
            _run_report,
            "Collect what a study folder (or any folder of results) holds (families, features, consistency, "
            "similarity, diagnosis) into one "
            "self-contained HTML page with embedded figures and a Markdown twin, with plain-language readings "
            "computed from the numbers and a provenance section."),
]
