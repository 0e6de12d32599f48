"""Figures of one result, whatever it is: a study folder, a consistency folder, a similarity.json,
a family folder, or the Fig. 1 panel of one Trans-Net (``python cli.py visualize``).

``visualize`` detects what a path holds (:func:`detect_visual`) and draws its figures with
``analysis.plots``; it returns the written paths (PNG and SVG).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis import plots
from analysis.config import VISUALS  # re-exported: its old home
from analysis.consistency import generation_rows, held_out_label, natural_key, net_matrix, read_table
from analysis.convergence import loss_series, verdict_of
from analysis.diagnose import panel_for_rows
from analysis.readings import family_generations
from analysis.report import similarity_kind, study_figures
from analysis.study_folder import StudyFolder, fit_details, read_family, read_study_folder
from common.errors import UserError
from common.files import read_json
from common.finished import require_finished_result
from common.options import parse_csv
from common.registry import unknown_choice_message
from features.identity import check_transnet_features
from transnet.fit import load_transnet
from transnet.spatial import require_same_layer


def consistency_figures(folder: Path, rows: list[dict[str, Any]], nets: list[str], layer: str,
                        out: Path | None = None) -> list[Path]:
    """The figures of a consistency folder: residual and R² heatmaps, the per-order variances (grouped),
    the additive shares (stacked) and the loss curves of its fits."""
    out = out or folder / "figures"
    histories = fit_details(Path(folder), rows, [])
    marks = [[v == "not converged" for v in row] for row in net_matrix(rows, nets, "convergence")]
    if len(rows) < 0.5 * len(nets) * (len(nets) - 1):     # mostly empty matrices: bars per pair instead
        groups = {f"{r['source']}→{r['target']}": "–".join(sorted((r["source"], r["target"]), key=natural_key))
                  for r in rows}
        paths = plots.pair_value_bars(rows, "fraction_residual", groups, out / "residual_fraction",
                                      f"Residual fraction per pair at {layer}", "residual fraction of Var(x_B)")
        paths += plots.pair_value_bars(rows, "r2", groups, out / "r2", f"{held_out_label(rows)} R² per pair at {layer}",
                                       "R²")
    else:
        paths = plots.matrix_heatmap(net_matrix(rows, nets, "fraction_residual"), nets, out / "residual_fraction",
                                     f"Residual fraction at {layer}", "residual fraction of Var(x_B)", marks=marks)
        paths += plots.matrix_heatmap(net_matrix(rows, nets, "r2"), nets, out / "r2",
                                      f"{held_out_label(rows)} R² at {layer}", "R²", marks=marks)
    paths += plots.order_fraction_bars(rows, out / "order_fractions", f"Variance of each target per order at {layer}")
    if any(r.get("additive_shares") for r in rows):
        paths += plots.additive_share_bars(rows, out / "additive_shares", f"Share added by each order at {layer}")
    series = {k: v for k, v in ((k, loss_series(h)) for k, h in histories.items()) if v}
    if series:
        paths += plots.loss_curves(series, {f"{r['source']}→{r['target']}": verdict_of(r) for r in rows},
                                   out / "loss_curves", f"Trans-Net loss per epoch at {layer}")
    return paths


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
            kind = similarity_kind(metric, m)
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
    require_same_layer(info, "--what panel")
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


