"""Subcommands ``consistency``, ``visualize``, ``diagnose`` and ``report``: thin wrappers that parse,
call the ``analysis`` package and print where the results went."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from analysis import plots
from analysis.consistency import (
    PAIR_PLANS,
    ConsistencyConfig,
    generation_rows,
    held_out_label,
    net_matrix,
    read_table,
    run_consistency,
)
from analysis.diagnose import DiagnoseConfig, diagnose_pair, panel_for_rows
from analysis.readings import diagnosis_readings, family_generations
from analysis.report import SIMILARITY_KIND, make_report, study_figures
from analysis.study_folder import StudyFolder, read_family, read_study_folder
from common.errors import UserError
from common.files import read_json
from common.finished import require_finished, require_finished_result
from common.options import Command, add_dataclass_args, add_run_args, dataclass_from_args, parse_csv
from common.registry import unknown_choice_message
from common.rundir import run_mode
from features.identity import check_transnet_features
from transnet.fit import FitConfig, load_transnet
from transnet.options import FIT_CHOICES, FIT_HELP, FIT_TYPES

CONSISTENCY_HELP = {
    "features": "kc-features file holding every net at --layer (train and test splits)",
    "layer": "layer (module path) to compare at, e.g. features.30",
    "pairs": "pair plan: all (every ordered pair), chain (consecutive nets of --nets, both directions), "
             "star:NAME (NAME to every other net and back), or explicit ordered pairs A>B,C>D",
    "nets": "comma list of nets in family order (chain order, matrix order); default: every net in the file",
    "family": "a family.json (or its folder): compare its members (feature-file net names = member names), "
              "in generation order",
    "split": "held-out split the variances are reported on (a split other than --train_split; --split equal to "
             "--train_split gives in-sample reports, labelled held_out false with a warning in the table)",
    "allow_other_checkpoints": "with --family: use feature-file nets whose checkpoint sha256 is not the member's",
}


# --------------------------------------------------------------------------- consistency

def _add_consistency(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, ConsistencyConfig, help=CONSISTENCY_HELP)
    g = p.add_argument_group("Trans-Net fitting (as fit-transnet; applied to every pair)")
    add_dataclass_args(g, FitConfig, skip=("features", "source", "target", "layer", "eval_split"), help=FIT_HELP,
                       choices=FIT_CHOICES, types=FIT_TYPES)
    p.add_argument("--no_figures", action="store_true", help="skip the heatmap and stacked-bar figures")
    add_run_args(p)


def _run_consistency(args: argparse.Namespace) -> None:
    cfg = dataclass_from_args(ConsistencyConfig, args)
    fit = dataclass_from_args(FitConfig, args, features=cfg.features, layer=cfg.layer, eval_split=cfg.split)
    res = run_consistency(cfg, fit, args.out_dir, run_mode(args.resume, args.overwrite))
    out = Path(args.out_dir)
    print(f"{len(res['pairs'])} pair(s) ({res['reused']} reused); table: {out / 'table.csv'}, "
          f"matrices: {out / 'matrices.json'}")
    if not args.no_figures:
        paths = consistency_figures(out, res["rows"], res["nets"], cfg.layer)
        print(f"figures: {', '.join(str(p) for p in paths if p.suffix == '.png')}")


def consistency_figures(folder: Path, rows: list[dict[str, Any]], nets: list[str], layer: str,
                        out: Path | None = None) -> list[Path]:
    out = out or folder / "figures"
    paths = plots.matrix_heatmap(net_matrix(rows, nets, "fraction_residual"), nets, out / "residual_fraction",
                                 f"Residual fraction at {layer}", "residual fraction of Var(x_B)")
    paths += plots.matrix_heatmap(net_matrix(rows, nets, "r2"), nets, out / "r2",
                                  f"{held_out_label(rows)} R² at {layer}", "R²")
    paths += plots.order_fraction_bars(rows, out / "order_fractions", f"Variance explained per order at {layer}")
    return paths


# --------------------------------------------------------------------------- visualize

VISUALS = ("auto", "study", "consistency", "similarity", "family", "panel")


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


def detect_visual(path: Path) -> str:
    if path.is_file() and path.name == "similarity.json":
        return "similarity"
    if not path.is_dir():
        raise UserError(f"{path} is neither a folder nor a similarity.json")
    if (path / "table.json").is_file():
        return "consistency"
    if (path / "similarity.json").is_file():
        return "similarity"
    if (path / "family.json").is_file():
        return "family"
    return "study"


def visualize(path: str | None, what: str = "auto", out_dir: str | None = None, allow_unfinished: bool = False,
              **panel: Any) -> list[Path]:
    """Draw the figures of one result (see ``--what``); return the written paths. A result whose job
    did not finish is refused unless ``allow_unfinished``."""
    if what not in VISUALS:
        raise UserError(unknown_choice_message("figure kind", what, list(VISUALS)))
    if what == "panel":
        if panel.get("transnet"):
            require_finished_result(panel["transnet"], "visualize", allow_unfinished)
        return _panel(out_dir, **panel)
    if not path:
        raise UserError("give the PATH of a study, consistency folder, similarity.json or family folder")
    src = Path(path)
    if not src.exists():
        raise UserError(f"{src} does not exist")
    what = detect_visual(src) if what == "auto" else what
    require_finished_result(src, "visualize", allow_unfinished)
    base = src.parent if src.is_file() else src
    out = Path(out_dir) if out_dir else base / "figures"
    if what == "study":
        figs = study_figures(read_study_folder(src), out)
        return [p for ps in figs.values() for p in ps]
    if what == "consistency":
        rows = read_table(src)
        mats = read_json(src / "matrices.json") if (src / "matrices.json").is_file() else {}
        nets = mats.get("nets") or sorted({r["source"] for r in rows} | {r["target"] for r in rows})
        return consistency_figures(src, rows, nets, rows[0].get("layer") or "", out)
    if what == "similarity":
        body = read_json(src if src.is_file() else src / "similarity.json")
        if "metrics" not in body or "nets" not in body:
            raise UserError(f"{src} is not a similarity.json (needs 'nets' and 'metrics')")
        paths: list[Path] = []
        for metric, m in body["metrics"].items():
            kind = SIMILARITY_KIND.get(metric, "fraction")
            paths += plots.matrix_heatmap(m["matrix"], body["nets"], out / f"similarity_{metric}",
                                          f"{metric} at {body.get('layer')}", metric, kind=kind,
                                          row_title="net", col_title="net")
        return paths
    # family
    st = StudyFolder(src)
    fam = read_family(src, st)
    if fam is None:
        raise UserError("; ".join(st.warnings) or f"{src} holds no readable family.json")
    paths = []
    hist = {m["name"]: m["history"] for m in fam["members"] if m["history"]}
    if hist:
        paths += plots.training_curves(hist, out / "training_curves", f"Training curves: {fam['name']}")
    gens = family_generations(fam)
    if gens:
        order, numbers, acc = gens
        paths += plots.generation_curves(generation_rows(order, [], acc, numbers), out / "generations",
                                         f"{fam['name']}: generations")
    if not paths:
        raise UserError(f"{src}: no training logs and no generations to plot")
    return paths


def _panel(out_dir: str | None, transnet: str | None = None, features: str | None = None, split: str = "test",
           rows: str = "0", channels: str = "0", allow_other_checkpoints: bool = False) -> list[Path]:
    if not transnet:
        raise UserError("--what panel needs --transnet DIR (a fit-transnet run directory)")
    model, info = load_transnet(transnet)
    feats = features or info["features"]
    check_transnet_features(info, feats, split, allow=allow_other_checkpoints)
    try:
        row_list, ch_list = parse_csv(rows, int), parse_csv(channels, int)
    except ValueError:
        raise UserError(f"--rows and --channels take comma lists of integers, got {rows!r} and {channels!r}") from None
    if not row_list or not ch_list:
        raise UserError("--rows and --channels need at least one value each")
    panel = panel_for_rows(model, feats, split, info["source"], info["target"], info["layer"], row_list, ch_list)
    out = Path(out_dir) if out_dir else Path(transnet) / "figures"
    name = f"panel_{split}_rows{'-'.join(map(str, row_list))}_ch{'-'.join(map(str, ch_list))}"
    return plots.decomposition_panel(panel, out / name, f"{info['source']} → {info['target']} at {info['layer']}")


def _run_visualize(args: argparse.Namespace) -> None:
    paths = visualize(args.path, args.what, args.out_dir, args.allow_unfinished, transnet=args.transnet,
                      features=args.features,
                      split=args.split, rows=args.rows, channels=args.channels,
                      allow_other_checkpoints=args.allow_other_checkpoints)
    print(f"wrote {len(paths)} file(s):")
    for p in paths:
        print(f"  {p}")


# --------------------------------------------------------------------------- diagnose

DIAGNOSE_HELP = {
    "features": "kc-features file", "layer": "layer (module path)",
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
    cfg = dataclass_from_args(DiagnoseConfig, args)
    d = diagnose_pair(cfg, args.out_dir, run_mode(args.resume, args.overwrite))
    for line in diagnosis_readings(d):
        print(line)
    print(f"wrote {Path(args.out_dir) / 'diagnosis.json'}, {Path(args.out_dir) / 'channels.csv'} and "
          f"{len(d['figures'])} figure file(s) in {Path(args.out_dir) / 'figures'}")


# --------------------------------------------------------------------------- report

def _add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", help="the study folder (layout: see analysis/report.py)")
    p.add_argument("--out_dir", default=None, help="where report.html, report.md and figures/ go (default: STUDY_DIR)")
    p.add_argument("--allow_unfinished", action="store_true",
                   help="report on a study whose run did not finish (its stages read as they are)")


def _run_report(args: argparse.Namespace) -> None:
    if Path(args.study_dir, "config.json").exists():      # a study folder written by `study`
        require_finished(args.study_dir, "report", args.allow_unfinished)
    res = make_report(args.study_dir, args.out_dir)
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
            f"Pair plans: {', '.join(PAIR_PLANS)}."),
    Command("visualize", "draw the figures of a study, consistency folder, similarity.json, family or Trans-Net",
            _add_visualize, _run_visualize,
            "PNG + SVG figures in one style: heatmaps (fractions on a fixed [0, 1] scale), stacked order fractions, "
            "generation and training curves, and the paper's Fig. 1 decomposition panel (--what panel)."),
    Command("diagnose", "blind spots and unreliable features of net A against net B", _add_diagnose, _run_diagnose,
            "From the residuals of the A->B and B->A Trans-Nets: residual energy per channel, position and image "
            "(relative to the target's variance), ranked images and channels, and Fig. 1 panels of the top images."),
    Command("report", "write report.html (self-contained) and report.md of a study folder", _add_report, _run_report,
            "Collect what a study folder holds (families, features, consistency, similarity, diagnosis) into one "
            "self-contained HTML page with embedded figures and a Markdown twin, with plain-language readings "
            "computed from the numbers and a provenance section."),
]
