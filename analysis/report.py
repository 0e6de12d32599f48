"""The study report: one self-contained ``report.html`` (figures embedded as base64 PNG) and a
``report.md`` (figures as relative links) from a study folder.

    python cli.py report STUDY_DIR [--out_dir DIR] [--bootstrap B] [--seed S]

The study folder's layout is in ``analysis/study_layout.py`` (any folder of results is read too:
``analysis/study_folder.py``), the sentences come from ``analysis/readings.py``, the bootstrap
intervals from ``analysis/uncertainty.py`` and the two renderers from ``analysis/document.py``.

The document is built once as a list of blocks (headings, paragraphs, lists, tables, figures) and
rendered twice (Markdown and HTML), so both files say the same. Every sentence with a number in it
is computed from the study's numbers (:func:`consistency_readings` and friends); nothing is claimed
that the files do not hold.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis import plots
from analysis.bootstrap import REPLICATES
from analysis.consistency import natural_key, net_matrix
from analysis.convergence import loss_series, verdict_of
from analysis.document import Block, render_html, render_markdown
from analysis.layer_plots import layer_heatmap
from analysis.readings import (
    agreement_points,
    agreement_readings,
    consistency_readings,
    diagnosis_readings,
    generation_readings,
    glance_readings,
    study_generations,
)
from analysis.study_folder import StudyFolder, read_study_folder
from analysis.uncertainty import add_study_intervals
from common.files import atomic_write
from common.provenance import now_utc, provenance

SIMILARITY_KIND = {"procrustes": "distance", "shape": "distance"}   # files without a direction: the rest are similarities


def similarity_kind(metric: str, body: Mapping[str, Any]) -> str:
    """``distance`` or ``fraction`` (a similarity in [0, 1]): the entry's own ``direction`` when it records
    one, else the metric's known direction."""
    if body.get("direction") in ("distance", "similarity"):
        return "distance" if body["direction"] == "distance" else "fraction"
    return SIMILARITY_KIND.get(metric, "fraction")
CONSISTENCY_NOTE = ("Fractions are of the target's variance Var(x_B) on held-out features (per-channel "
                    "centred). The paper's per-order variances Var(Y_k) overlap (the components are not "
                    "orthogonal), so they and the residual need not add up to 1; the additive shares do: order "
                    "0's share is the R² of Y0 alone, order k's the R² it adds to the orders below it, and "
                    "they sum to R². Knowledge consistency is directional: A→B asks how much of B's features "
                    "can be rebuilt from A's.")


# =========================================================================== figures

def study_figures(st: StudyFolder, out_dir: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """Draw every figure the study's numbers support into ``out_dir`` (default STUDY/figures);
    returns figure key -> written paths (PNG first)."""
    out = Path(out_dir) if out_dir else st.root / "figures"
    figs: dict[str, list[Path]] = {}
    for layer, c in st.consistency.items():
        tag = _slug(layer)
        if mostly_empty(c["rows"], c["nets"]):
            figs[f"consistency_residual_{tag}"] = plots.pair_value_bars(
                c["rows"], "fraction_residual", pair_groups(st, c["rows"]), out / f"consistency_residual_{tag}",
                f"Residual fraction per pair at {layer}", "residual fraction of Var(x_B)")
        else:
            figs[f"consistency_residual_{tag}"] = plots.matrix_heatmap(
                net_matrix(c["rows"], c["nets"], "fraction_residual"), c["nets"], out / f"consistency_residual_{tag}",
                f"Residual fraction at {layer}", "residual fraction of Var(x_B)", marks=not_converged_marks(c))
        figs[f"order_fractions_{tag}"] = plots.order_fraction_bars(
            c["rows"], out / f"order_fractions_{tag}", f"Variance of each target per order at {layer} (Var(Y_k))")
        if any(r.get("additive_shares") for r in c["rows"]):
            figs[f"additive_shares_{tag}"] = plots.additive_share_bars(
                c["rows"], out / f"additive_shares_{tag}", f"Share of each target's variance added per order at {layer}")
        series = {label: loss_series(h) for label, h in c.get("histories", {}).items()}
        series = {k: v for k, v in series.items() if v}
        if series:
            verdicts = {f"{r['source']}→{r['target']}": verdict_of(r) for r in c["rows"]}
            figs[f"loss_curves_{tag}"] = plots.loss_curves(series, verdicts, out / f"loss_curves_{tag}",
                                                           f"Trans-Net loss per epoch at {layer}")
    for layer, s in st.similarity.items():
        tag = _slug(layer)
        for metric, body in s.get("metrics", {}).items():
            kind = similarity_kind(metric, body)
            figs[f"similarity_{metric}_{tag}"] = plots.matrix_heatmap(
                body["matrix"], s["nets"], out / f"similarity_{metric}_{tag}", f"{metric} at {layer}",
                metric + (" distance (0 = alike)" if kind == "distance" else " similarity (1 = alike)"), kind=kind,
                row_title="net", col_title="net")
        if layer in st.consistency and "cka" in s.get("metrics", {}):
            pts = agreement_points(st.consistency[layer]["rows"], s, "cka")
            if pts:
                figs[f"agreement_cka_{tag}"] = plots.agreement_scatter(
                    pts, out / f"agreement_cka_{tag}", "linear CKA", "Trans-Net R² (mean of both directions)",
                    f"CKA vs knowledge consistency at {layer}")
    for lm in st.layer_matrices:
        lay = lm["layers"]
        for metric, body in lay.get("metrics", {}).items():
            key = layer_figure_key(metric, lay)
            direction = "distance" if similarity_kind(metric, body) == "distance" else "similarity"
            figs[key] = layer_heatmap(body["matrix"], lay["names"], out / key, metric=metric, direction=direction,
                                      row_net=lay["row_net"], column_net=lay["column_net"],
                                      refused=body.get("refused") or [])
    for fam, layers in study_generations(st).items():
        for layer, rows in layers.items():
            tag = _slug(f"{fam}_{layer}" if layer else fam)
            figs[f"generations_{tag}"] = plots.generation_curves(
                rows, out / f"generations_{tag}", f"{fam}: generations" + (f" (consistency at {layer})" if layer else ""))
    for fam in st.families:
        hist = {m["name"]: m["history"] for m in fam["members"] if m["history"]}
        if hist:
            figs[f"training_{_slug(fam['name'])}"] = plots.training_curves(hist, out / f"training_{_slug(fam['name'])}",
                                                                            f"Training curves: {fam['name']}")
    return figs


def layer_figure_key(metric: str, lay: Mapping[str, Any]) -> str:
    """The figure key (and file stem) of one metric's layer x layer heatmap: ``layers_<metric>_<A>__<B>``."""
    return f"layers_{_slug(metric)}_{_slug(lay['row_net'])}__{_slug(lay['column_net'])}"


def mostly_empty(rows: Sequence[Mapping[str, Any]], nets: Sequence[str]) -> bool:
    """True when fewer than half of the net x net matrix's off-diagonal cells were computed."""
    return len(rows) < 0.5 * len(nets) * (len(nets) - 1)


def pair_groups(st: StudyFolder, rows: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Pair label ``A→B`` -> the family of both nets (``seeds``), or ``fam_A / fam_B`` across families."""
    fam = {m["name"]: f["name"] for f in st.families for m in f["members"]}
    out = {}
    for r in rows:
        fa, fb = fam.get(r["source"], "?"), fam.get(r["target"], "?")
        out[f"{r['source']}→{r['target']}"] = fa if fa == fb else f"{fa} / {fb}"
    return out


def not_converged_marks(c: Mapping[str, Any]) -> list[list[bool]]:
    """Net x net: True where the pair's fit is judged not converged."""
    return [[v == "not converged" for v in row] for row in net_matrix(c["rows"], c["nets"], "convergence")]


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s).strip("_") or "x"


# =========================================================================== the document



def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.4g}"
    return str(v)


def consistency_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    k_max = max((int(r.get("orders", 0)) for r in rows), default=0)
    header = (["source (A)", "target (B)", "n"] + [f"frac. order {k}" for k in range(k_max + 1)]
              + [f"add. share {k}" for k in range(k_max + 1)]
              + ["frac. residual", "R²", "convergence"] + [f"gate {k}" for k in range(1, k_max + 1)]
              + ["MSE", "warnings"])
    body = []
    for r in rows:
        body.append([r["source"], r["target"], _fmt(r.get("n_samples"))]
                    + [_fmt(r.get(f"fraction_order{k}")) for k in range(k_max + 1)]
                    + [_fmt_ci(_at(r.get("additive_shares"), k), _at(r.get("additive_shares_ci"), k))
                       for k in range(k_max + 1)]
                    + [_fmt_ci(r.get("fraction_residual"), r.get("fraction_residual_ci")),
                       _fmt_ci(r.get("r2"), r.get("r2_ci")), verdict_of(r)]
                    + [_fmt(r.get(f"gate{k}")) for k in range(1, k_max + 1)]
                    + [_fmt(r.get("mse")), r.get("warnings") or ""])
    return header, body


def _at(values: Sequence[Any] | None, k: int) -> Any:
    return values[k] if values and k < len(values) else None


def matrix_table(matrix: Sequence[Sequence[Any]], nets: Sequence[str], corner: str,
                 ci: Sequence[Sequence[Any]] | None = None) -> tuple[list[str], list[list[str]]]:
    """A net x net table; with ``ci`` (a matrix of [lo, hi] or None) each cell shows its interval."""
    ci = ci or [[None] * len(nets) for _ in nets]
    return [corner] + list(nets), [[n] + [_fmt_ci(v, c) for v, c in zip(row, crow)]
                                   for n, row, crow in zip(nets, matrix, ci)]


def _fmt_ci(v: Any, ci: Sequence[float] | None) -> str:
    """``0.812 [0.790, 0.830]``: a value and its bootstrap interval (the value alone when there is none)."""
    if v is None or not ci or any(x is None or x != x for x in ci):
        return _fmt(v)
    return f"{_fmt(v)} [{_fmt(float(ci[0]))}, {_fmt(float(ci[1]))}]"


def interval_note(st: StudyFolder) -> str:
    """The one sentence that states how every interval of the report was computed."""
    b = st.bootstrap
    if not b:
        return "No bootstrap intervals were computed (report --bootstrap 0): values are read without uncertainty."
    return (f"Intervals in brackets are {100 * b['level']:.0f}% percentile bootstrap intervals over test rows: the "
            f"resampling unit is one {b['unit']}; {b['replicates']} resamples, seed {b['seed']}, the same resamples "
            f"for every pair and measure. Two values are compared or ranked only when their intervals separate.")


def build_document(st: StudyFolder, figs: Mapping[str, list[Path]]) -> list[Block]:
    """The report as blocks, most important first: the answer, then the evidence, then provenance."""
    name = (st.info or {}).get("title") or (st.info or {}).get("name")
    doc: list[Block] = [("h", 1, f"Knowledge consistency study: {name or st.root.name}"),
                        ("p", f"Generated {now_utc()} from {st.root.resolve()}.")]
    first_heat = next((k for k in figs if k.startswith("consistency_residual_")), None)
    doc += glance_section(st, figs, first_heat)
    doc += compared_section(st)
    doc += networks_section(st)
    for layer, c in st.consistency.items():
        doc += consistency_section(layer, c, figs, first_heat, interval_note(st))
    doc += generations_section(st, figs)
    for layer, s in st.similarity.items():
        doc += similarity_section(st, layer, s, figs)
    doc += layer_matrix_section(st, figs)
    for layer, diags in st.diagnosis.items():
        doc += diagnosis_section(layer, diags)
    doc += training_section(figs)
    doc += closing_section(st)
    return doc


# ---- one function per section, in the order the report shows them

def glance_section(st: StudyFolder, figs: Mapping[str, list[Path]], first_heat: str | None) -> list[Block]:
    """The answer first: the few readings that answer the study's question, and the first heatmap."""
    doc: list[Block] = [("h", 2, "At a glance"),
                        ("ul", glance_readings(st) or ["No consistency results in this study yet (see 'Missing "
                                                       "parts' below)."])]
    if first_heat:
        doc.append(("fig", figs[first_heat][0], "Residual fraction per directed pair (a matrix: row = source A, "
                                                "column = target B; or bars per pair grouped by family when most "
                                                "cells of the matrix were not computed): the share of B's "
                                                "features that A's cannot rebuild. † marks a fit not converged."))
    return doc


def compared_section(st: StudyFolder) -> list[Block]:
    """What was compared: the study's description and options, the feature file's splits, nets and layers."""
    doc: list[Block] = [("h", 2, "What was compared")]
    if st.info and st.info.get("description"):
        doc.append(("p", str(st.info["description"]).strip()))
    items = [f"{k}: {describe_value(v)}" for k, v in (st.info or {}).items() if k not in INFO_SKIP]
    if st.features:
        root = st.features["root"]
        items.append(f"feature file: {st.features['path']} (data set {root.get('dataset')}, image size "
                     f"{root.get('image_size')})")
        for split, s in st.features["splits"].items():
            layers = sorted({l for ls in s["nets"].values() for l in ls}, key=natural_key)
            items.append(f"split {split}: {s['n']} images; nets {', '.join(sorted(s['nets'], key=natural_key))}; "
                         f"layers {', '.join(layers)}")
    doc.append(("ul", items or ["(no study.json and no feature file: see the sections below)"]))
    return doc


def networks_section(st: StudyFolder) -> list[Block]:
    """One table per family: member, role, generation, teacher, arch, accuracy, epochs."""
    if not st.families:
        return []
    doc: list[Block] = [("h", 2, "Networks")]
    if st.aliases:
        doc.append(("p", "Trained once, reused: " + ", ".join(f"{a} = {b}" for a, b in sorted(st.aliases.items()))
                    + ". Each pair has the same training recipe (architecture, data, every training option and "
                      "seed, loss, no teacher), so the second is the same net: its run directory is the first's, "
                      "and its similarity to it (CKA 1) is no finding."))
    for fam in st.families:
        header = ["member", "role", "generation", "teacher", "arch", "test top-1 (%)", "epochs"]
        body = [[m["name"] + (f" (= {st.aliases[m['name']]})" if m["name"] in st.aliases else ""), m["role"],
                 _fmt(m["generation"]), m["teacher"] or "—", m["arch"] or "—",
                 _fmt(m["metrics"].get("test_top1")), _fmt(m["metrics"].get("epoch"))] for m in fam["members"]]
        doc += [("h", 3, f"Family {fam['name']} ({fam['family']})"), ("table", header, body)]
    return doc


def consistency_section(layer: str, c: Mapping[str, Any], figs: Mapping[str, list[Path]],
                        first_heat: str | None, note: str = "") -> list[Block]:
    """Readings, the pair table, the heatmap and order bars, and the R² matrix of one layer."""
    tag = _slug(layer)
    doc: list[Block] = [("h", 2, f"Knowledge consistency at {layer}"), ("p", CONSISTENCY_NOTE), ("p", note),
                        ("ul", consistency_readings(c["rows"], layer)), ("table", *consistency_table(c["rows"]))]
    for key, cap in ((f"consistency_residual_{tag}", "Residual fraction per directed pair."),
                     (f"additive_shares_{tag}", "Additive view: the share of each target's variance that order 0 "
                                                "explains alone, then the R² each further order adds (stacked: "
                                                "they sum to R²), topped by the unexplained 1 − R²."),
                     (f"order_fractions_{tag}", "The paper's view: Var(Y_k) / Var(x_B) per order and the residual "
                                                "fraction, side by side (they overlap, so they are not stacked).")):
        cap += " † marks a fit that did not converge." if any(verdict_of(r) == "not converged" for r in c["rows"]) else ""
        if key in figs and key != first_heat:
            doc.append(("fig", figs[key][0], cap))
        elif key == first_heat:
            doc.append(("p", "The residual fraction matrix is shown under 'At a glance'."))
    if f"loss_curves_{tag}" in figs:
        doc.append(("fig", figs[f"loss_curves_{tag}"][0], "Loss per epoch of every Trans-Net (train loss solid, "
                                                           "validation loss dashed when the fit held rows out of its "
                                                           "training split), titled with the fit's convergence "
                                                           "verdict."))
    if c.get("matrices"):
        m = c["matrices"]["matrices"]
        doc.append(("h", 3, "R² matrix (row = source A, column = target B)"))
        doc.append(("table", *matrix_table(m["r2"], c["matrices"]["nets"], "A \\ B")))
    return doc


def generations_section(st: StudyFolder, figs: Mapping[str, list[Path]]) -> list[Block]:
    """Per generation family and layer: readings, the accuracy/residual table and the curves."""
    gens = study_generations(st)
    if not gens:
        return []
    doc: list[Block] = [("h", 2, "Generations")]
    for fam, layers in gens.items():
        for layer, rows in layers.items():
            tag = _slug(f"{fam}_{layer}" if layer else fam)
            doc.append(("h", 3, f"{fam}" + (f" at {layer}" if layer else "")))
            doc.append(("ul", generation_readings(rows) or ["(no accuracies or residuals recorded)"]))
            doc.append(("table", ["generation", "net", "test top-1 (%)", "slim top-1 (%)",
                                  "residual to previous", "residual to first"],
                        [[_fmt(r["generation"]), r["net"], _fmt(r["test_top1"]), _fmt(r["slim_test_top1"]),
                          _fmt(r["residual_to_previous"]), _fmt(r["residual_to_first"])] for r in rows]))
            if f"generations_{tag}" in figs:
                doc.append(("fig", figs[f"generations_{tag}"][0], "Accuracy and residual fractions over generations."))
    return doc


def similarity_section(st: StudyFolder, layer: str, s: Mapping[str, Any], figs: Mapping[str, list[Path]]) -> list[Block]:
    """The similarity baselines of one layer: one matrix per metric, and their agreement with R²."""
    tag = _slug(layer)
    doc: list[Block] = [("h", 2, f"Similarity baselines at {layer}"),
                        ("p", f"Split {s.get('split')}; rows and columns in the order {', '.join(s['nets'])}. "
                              "Similarities lie in [0, 1] (1 = alike); distances are ≥ 0 (0 = alike). These measures "
                              "are symmetric; Trans-Net consistency is directional.")]
    for metric, body in s.get("metrics", {}).items():
        doc.append(("h", 3, metric))
        if body.get("convention"):
            doc.append(("p", f"Convention: {body['convention']}."))
        doc.append(("table", *matrix_table(body["matrix"], s["nets"], metric, body.get("ci"))))
        refused = body.get("refused") or []
        if refused:
            doc.append(("p", "Blank cells were refused before computing: " + "; ".join(
                f"{' / '.join(map(str, r.get('nets') or r.get('pair') or ['?']))}: {r.get('reason', '')}"
                if isinstance(r, Mapping) else str(r) for r in refused[:12])
                + (f"; and {len(refused) - 12} more" if len(refused) > 12 else "") + "."))
        if body.get("null_mean") is not None:
            doc.append(("p", f"Permutation null (shuffled pairing of samples): mean {_fmt_null(body['null_mean'])}."))
        doc += [("p", f"Warning: {w}") for w in body.get("warnings", []) or []]
        if f"similarity_{metric}_{tag}" in figs:
            doc.append(("fig", figs[f"similarity_{metric}_{tag}"][0], f"{metric} matrix."))
    if layer in st.consistency and "cka" in s.get("metrics", {}):
        pts = agreement_points(st.consistency[layer]["rows"], s, "cka")
        doc.append(("ul", agreement_readings(pts, "cka")))
        if f"agreement_cka_{tag}" in figs:
            doc.append(("fig", figs[f"agreement_cka_{tag}"][0], "One point per pair of nets: CKA against the "
                                                                  "mean held-out R² of the two Trans-Nets."))
    return doc


def layer_matrix_section(st: StudyFolder, figs: Mapping[str, list[Path]]) -> list[Block]:
    """Every layer x layer run (``similarity --layers``): per metric its heatmap, captioned with the metric,
    split, nets and convention, and its values as a table."""
    if not st.layer_matrices:
        return []
    doc: list[Block] = [("h", 2, "Layer x layer similarity"),
                        ("p", "Each matrix compares every listed layer of the row net with every listed layer of the "
                              "column net (or of the same net) on the same images: rows are the row net's layers, "
                              "columns the column net's; in the heatmaps the first layer is at the bottom left and the "
                              "colour scale spans the computed cells (its bar gives the range).")]
    for lm in st.layer_matrices:
        lay = lm["layers"]
        a, b = lay["row_net"], lay["column_net"]
        doc.append(("h", 3, f"{a} against itself" if a == b else f"{a} (rows) against {b} (columns)"))
        for metric, body in lay.get("metrics", {}).items():
            kind = "distance (0 = alike)" if similarity_kind(metric, body) == "distance" else "similarity (1 = alike)"
            cap = (f"{metric}, layer x layer: {a}'s layers (rows) against {b}'s (columns) on the {lm.get('split')} "
                   f"split ({lm.get('n_samples')} images); a {kind}"
                   + (f"; convention: {body['convention']}" if body.get("convention") else "") + ".")
            if body.get("null_mean") is not None:
                cap += f" Permutation null (shuffled pairing of samples): mean {_fmt_null(body['null_mean'])}."
            key = layer_figure_key(metric, lay)
            if key in figs:
                doc.append(("fig", figs[key][0], cap))
            else:
                doc.append(("p", cap))
            doc.append(("table", *matrix_table(body["matrix"], lay["names"], f"{a} \\ {b}")))
            if body.get("refused"):
                doc.append(("p", "Blank cells were refused before computing: " + "; ".join(
                    sorted({str(r.get("reason", "")) for r in body["refused"] if isinstance(r, Mapping)})) + "."))
    return doc


def diagnosis_section(layer: str, diags: Sequence[Mapping[str, Any]]) -> list[Block]:
    """Blind spots and unreliable features of each diagnosed pair, with their figures."""
    doc: list[Block] = [("h", 2, f"Network diagnosis at {layer}")]
    for d in diags:
        doc += [("h", 3, f"{d['a']} against {d['b']}"), ("ul", diagnosis_readings(d))]
        for rel in d.get("figures", []):
            p = Path(d["dir"]) / rel
            if p.suffix == ".png" and p.is_file():
                doc.append(("fig", p, _diag_caption(p.name, d)))
    return doc


def training_section(figs: Mapping[str, list[Path]]) -> list[Block]:
    keys = [k for k in figs if k.startswith("training_")]
    if not keys:
        return []
    return [("h", 2, "Training curves")] + [("fig", figs[k][0], k.replace("training_", "Family ")) for k in keys]


def closing_section(st: StudyFolder) -> list[Block]:
    """What is missing, the warnings, and the provenance."""
    return [("h", 2, "Missing parts and warnings"),
            ("ul", [f"missing: {m}" for m in st.missing] + [f"warning: {w}" for w in st.warnings]
             or ["Nothing missing; no warnings."]),
            ("h", 2, "Provenance"), ("ul", provenance_items(st))]


INFO_SKIP = ("title", "name", "description", "updated_utc", "created_utc")


def describe_value(v: Any) -> str:
    """A study.json value in one line: mappings as ``key=value`` (nested in parentheses), lists comma-joined."""
    if isinstance(v, Mapping):
        return "; ".join(f"{k}=({describe_value(x)})" if isinstance(x, (Mapping, list, tuple)) else f"{k}={x}"
                         for k, x in v.items() if not _empty(x))
    if isinstance(v, (list, tuple)):
        return ", ".join(describe_value(x) if isinstance(x, (Mapping, list, tuple)) else str(x) for x in v)
    return str(v)


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, (str, list, tuple, Mapping)) and len(v) == 0)


def _fmt_null(v: Any) -> str:
    if isinstance(v, list):
        flat = [x for row in v for x in (row if isinstance(row, list) else [row]) if x is not None]
        return f"{np.mean(flat):.3f} averaged over pairs" if flat else "—"
    return _fmt(v)


def _diag_caption(name: str, d: Mapping[str, Any]) -> str:
    if name.startswith("residual_energy"):
        return (f"Relative residual energy per channel and per position: blind spots of {d['a']} (top) and its "
                f"unreliable features (bottom).")
    return (f"Decomposition of a top-ranked image ({name.removesuffix('.png')}): image, source maps, target, "
            f"reconstruction, order components, residual and gates; one symmetric colour scale per channel.")


def provenance_items(st: StudyFolder) -> list[str]:
    items = [f"report written by code {provenance()['code_version']}"]
    if st.features:
        r = st.features["root"]
        items.append(f"features.h5: schema {r.get('schema')} v{r.get('schema_version')}, created {r.get('created_utc')}, "
                     f"code {r.get('code_version')}, command: {r.get('command')}")
    for layer, c in st.consistency.items():
        prov = (c.get("config") or {}).get("provenance", {})
        fit = ((c.get("config") or {}).get("config") or {}).get("fit", {})
        opts = ", ".join(f"{k}={fit[k]}" for k in ("orders", "kernel", "alpha", "input_norm", "epochs", "lr",
                                                    "schedule", "batch_size", "train_split") if k in fit)
        items.append(f"consistency/{_slug(layer)}: code {prov.get('code_version')}, command: {prov.get('command')}"
                     + (f"; Trans-Net options: {opts}" if opts else ""))
    for layer, s in st.similarity.items():
        items.append(f"similarity at {layer}: {Path(s['dir']).relative_to(st.root) if s.get('dir') else ''} "
                     f"(split {s.get('split')})")
    for lm in st.layer_matrices:
        where = Path(lm["dir"])
        where = where.relative_to(st.root) if where.is_relative_to(st.root) else where
        items.append(f"layer x layer {lm['layers']['row_net']} / {lm['layers']['column_net']}: {where} "
                     f"(split {lm.get('split')})")
    for fam in st.families:
        items.append(f"family {fam['name']}: {fam['family']}, {len(fam['members'])} member(s), manifest "
                     f"{Path(fam['dir']).relative_to(st.root) / 'family.json'}")
    return items


def write_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 bootstrap: int = REPLICATES) -> list[Path]:
    """Write ``report.html`` and ``report.md`` (see :func:`make_report`); return their paths."""
    res = make_report(study_dir, out_dir, bootstrap)
    return [res["html"], res["markdown"]]


def make_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                bootstrap: int = REPLICATES, seed: int = 0) -> dict[str, Any]:
    """Read the study, add bootstrap intervals (``bootstrap`` resamples of the test rows, seeded; 0: none),
    draw its figures (into ``out_dir``/figures, default STUDY/figures), and write ``report.html`` and
    ``report.md`` into ``out_dir`` (default: the study folder). Returns the paths (``html``,
    ``markdown``), ``figures`` (key -> paths), and the study's ``missing`` and ``warnings``."""
    st = read_study_folder(study_dir)
    add_study_intervals(st, bootstrap, seed)
    out = Path(out_dir) if out_dir else st.root
    out.mkdir(parents=True, exist_ok=True)
    figs = study_figures(st, out / "figures")
    doc = build_document(st, figs)
    with atomic_write(out / "report.md") as f:
        f.write(render_markdown(doc, out))
    with atomic_write(out / "report.html") as f:
        f.write(render_html(doc))
    return {"html": out / "report.html", "markdown": out / "report.md", "figures": figs,
            "missing": st.missing, "warnings": st.warnings}
