"""The study report: one self-contained ``report.html`` (figures embedded as base64 PNG) and a
``report.md`` (figures as relative links) from a study folder.

    python cli.py report STUDY_DIR [--out_dir DIR]

**The study folder** (written by ``python cli.py study``; every part is optional, the report says
which are missing, but a folder with none of them is refused):

    STUDY/study.json                         what was compared (written by the study runner: name,
                                             description, data, members, extract, transnet, pairs,
                                             baselines, diagnose; any other keys are shown as given)
    STUDY/families/<family>/family.json      kc-family manifests (training/manifest.py); each member's
                                             checkpoint lies in its run directory (config.json,
                                             metrics.json, log.jsonl). Members with role "generation"
                                             and a generation number make the generation curves;
                                             role "slim" members add the slim accuracy of their
                                             generation. Member names are the net names of features.h5.
    STUDY/features.h5                        the kc-features file
    STUDY/consistency/<layer>/               ``python cli.py consistency`` folders: table.json,
                                             table.csv, matrices.json, config.json, pairs/
    STUDY/similarity/<layer>/similarity.json ``python cli.py similarity`` output
    STUDY/diagnosis/<layer>/                 ``python cli.py diagnose`` folders (diagnosis.json, figures/),
                                             one per layer, or several as diagnosis/<layer>/<A>__<B>/
    STUDY/figures/                           figures made by the report / ``visualize`` (PNG + SVG)

The document is built once as a list of blocks (headings, paragraphs, lists, tables, figures) and
rendered twice (Markdown and HTML), so both files say the same. Every sentence with a number in it
is computed from the study's numbers (:func:`consistency_readings` and friends); nothing is claimed
that the files do not hold.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from analysis import plots
from analysis.consistency import asymmetry, generation_rows, natural_key, net_matrix
from common.errors import UserError
from common.files import atomic_write, read_json
from common.provenance import now_utc, provenance
from features.store import attrs_dict, list_layers, list_nets, list_splits, open_features
from training.manifest import read_manifest

STUDY_PARTS = ("study.json", "state.json", "families", "features.h5", "consistency", "similarity", "diagnosis")
SIMILARITY_KIND = {"procrustes": "distance"}          # every other metric is a similarity in [0, 1]
ASYMMETRY_THRESHOLD = 0.05   # residual fractions of the two directions differing less than this: "nearly symmetric"
OVERLAP_TOLERANCE = 1.15     # fractions (orders + residual) adding up to more than this: say they overlap
CONSISTENCY_NOTE = ("Fractions are of the target's variance Var(x_B) on held-out features (per-channel "
                    "centred). The order components are not orthogonal, so the fractions of the orders and "
                    "the residual need not add up to 1. Knowledge consistency is directional: A→B asks how "
                    "much of B's features can be rebuilt from A's.")


# =========================================================================== reading a study

@dataclass
class Study:
    root: Path
    info: dict[str, Any] | None = None
    families: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, Any] | None = None
    consistency: dict[str, dict[str, Any]] = field(default_factory=dict)
    similarity: dict[str, dict[str, Any]] = field(default_factory=dict)
    diagnosis: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        return sorted(set(self.consistency) | set(self.similarity) | set(self.diagnosis), key=natural_key)


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    p = run_dir / "log.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue          # a line cut by an interrupted run
    return out


def read_family(path: Path, study: Study) -> dict[str, Any] | None:
    try:
        body = read_json(path / "family.json")
        members = read_manifest(path)
    except UserError as e:
        study.warnings.append(f"family {path.name}: {e}")
        return None
    rows = []
    for m in members:
        run_dir = Path(m.checkpoint).parent
        metrics = dict(m.metrics or {})
        if (run_dir / "metrics.json").is_file():
            run_metrics = read_json(run_dir / "metrics.json")
            for k in ("test_top1", "test_top5", "test_loss", "train_loss", "epoch"):
                metrics.setdefault(k, run_metrics.get(k))
        rows.append({"name": m.name, "role": m.role, "generation": m.generation, "teacher": m.teacher,
                     "arch": m.arch, "metrics": metrics, "run_dir": str(run_dir),
                     "history": _read_history(run_dir) if m.role != "slim" else []})
    return {"name": path.name, "family": body.get("family", path.name), "dir": str(path), "members": rows,
            "config": body.get("config", {})}


def _read_features(path: Path, study: Study) -> dict[str, Any] | None:
    try:
        with open_features(path) as f:
            out: dict[str, Any] = {"path": str(path), "root": attrs_dict(f), "splits": {}}
            for split in list_splits(f):
                nets = {}
                for net in list_nets(f, split):
                    layers = {}
                    for layer in list_layers(f, split, net):
                        ds = f[split][net][layer]
                        complete = bool(ds.attrs.get("complete", False))
                        layers[layer] = {"shape": list(ds.shape), "dtype": str(ds.dtype), "complete": complete}
                        if not complete:
                            study.warnings.append(f"features.h5: /{split}/{net}/{layer} is incomplete "
                                                  f"({int(ds.attrs.get('rows_done', 0))} of {ds.shape[0]} rows)")
                    nets[net] = layers
                out["splits"][split] = {"n": int(f[split]["index"].shape[0]), "nets": nets}
            return out
    except UserError as e:
        study.warnings.append(str(e))
        return None


def load_study(root: str | os.PathLike) -> Study:
    """Read whatever parts of a study folder exist; missing or broken parts are listed, not fatal."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"study folder {root} does not exist or is not a directory")
    present = [p for p in STUDY_PARTS if (root / p).exists()]
    if not present:
        raise UserError(f"{root} is not a study folder: it holds none of {', '.join(STUDY_PARTS)} (see the "
                        f"layout in analysis/report.py; python cli.py study writes one)")
    st = Study(root)
    if (root / "study.json").is_file():
        try:
            st.info = read_json(root / "study.json")
        except UserError as e:
            st.warnings.append(str(e))
    else:
        st.missing.append("study.json (what was compared): the report lists what the files hold instead")
    fam_root = root / "families"
    fam_dirs = sorted(p for p in fam_root.iterdir() if (p / "family.json").is_file()) if fam_root.is_dir() else []
    for d in fam_dirs:
        fam = read_family(d, st)
        if fam:
            st.families.append(fam)
    if not fam_dirs:
        st.missing.append("families/<family>/family.json: no training results (accuracies, training curves)")
    if (root / "features.h5").is_file():
        st.features = _read_features(root / "features.h5", st)
    else:
        st.missing.append("features.h5: the feature file")
    for part in ("consistency", "similarity", "diagnosis"):
        if not (root / part).is_dir() or not any((root / part).iterdir()):
            st.missing.append(f"{part}/: no {part} results")
    for d in sorted((root / "consistency").glob("*")) if (root / "consistency").is_dir() else []:
        if not d.is_dir():
            continue
        if not (d / "table.json").is_file():
            st.warnings.append(f"consistency/{d.name} has no table.json: the consistency run did not finish "
                               f"(re-run it with --resume)")
            continue
        try:
            body = read_json(d / "table.json")
            mats = read_json(d / "matrices.json") if (d / "matrices.json").is_file() else None
            cfg = read_json(d / "config.json") if (d / "config.json").is_file() else {}
        except UserError as e:
            st.warnings.append(str(e))
            continue
        rows = body.get("rows", [])
        if not rows:
            st.warnings.append(f"consistency/{d.name}/table.json holds no pairs")
            continue
        nets = (mats or {}).get("nets") or sorted({r["source"] for r in rows} | {r["target"] for r in rows},
                                                 key=natural_key)
        st.consistency[rows[0].get("layer") or d.name] = {"dir": str(d), "rows": rows, "matrices": mats,
                                                          "nets": nets, "config": cfg}
    for p in sorted((root / "similarity").glob("*/similarity.json")) if (root / "similarity").is_dir() else []:
        try:
            body = read_json(p)
        except UserError as e:
            st.warnings.append(str(e))
            continue
        st.similarity[body.get("layer") or p.parent.name] = {**body, "dir": str(p.parent)}
    diag_root = root / "diagnosis"
    found = sorted(diag_root.glob("*/diagnosis.json")) + sorted(diag_root.glob("*/*/diagnosis.json"))
    for p in found if diag_root.is_dir() else []:
        try:
            body = read_json(p)
        except UserError as e:
            st.warnings.append(str(e))
            continue
        layer = body.get("layer") or (p.parent.name if p.parent.parent == diag_root else p.parent.parent.name)
        st.diagnosis.setdefault(layer, []).append({**body, "dir": str(p.parent)})
    for d in sorted(diag_root.glob("*")) if diag_root.is_dir() else []:
        if d.is_dir() and not (d / "diagnosis.json").is_file() and not any(d.glob("*/diagnosis.json")):
            st.warnings.append(f"{d.relative_to(root)} has no diagnosis.json: the diagnose run did not finish")
    return st


# =========================================================================== readings (pure)

def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def pair_reading(row: Mapping[str, Any]) -> str:
    """'ban_g2 explains 81% of ban_g3's variance at order 0, 3% at order 1; 21% is inconsistent (R² 0.79).'

    When the order components overlap (a fraction above 1, or fractions adding up to well over 1) the
    sentence says so instead of calling the overshoot 'explained'."""
    a, b = row["source"], row["target"]
    k_max = int(row.get("orders", 0))
    fr = [row.get(f"fraction_order{k}") for k in range(k_max + 1)]
    total = sum(v for v in fr if v is not None) + (row.get("fraction_residual") or 0.0)
    if all(v is not None and v <= 1.0 for v in fr) and total <= OVERLAP_TOLERANCE:
        parts = [f"{pct(fr[0])} of {b}'s variance at order 0"] + [f"{pct(v)} at order {k}" for k, v in enumerate(fr) if k]
        text = f"{a} explains {', '.join(parts)}; {pct(row.get('fraction_residual'))} is inconsistent"
    else:
        parts = [f"{pct(v)} (order {k})" for k, v in enumerate(fr)]
        text = (f"{a}→{b}: the order components carry {', '.join(parts)} of {b}'s variance, together more than the "
                f"target's own ({total:.1f}x with the residual), so they overlap and partly cancel; "
                f"{pct(row.get('fraction_residual'))} is inconsistent")
    if row.get("r2") is not None:
        text += f" (held-out R² {row['r2']:.2f})"
    if row.get("warnings"):
        text += f" [warning: {row['warnings']}]"
    return text + "."


def consistency_readings(rows: Sequence[Mapping[str, Any]], layer: str) -> list[str]:
    """Plain-language statements computed from a consistency table (no claim beyond the numbers)."""
    out = []
    ok = [r for r in rows if r.get("fraction_residual") is not None]
    if ok:
        best = min(ok, key=lambda r: r["fraction_residual"])
        worst = max(ok, key=lambda r: r["fraction_residual"])
        res = np.array([r["fraction_residual"] for r in ok])
        out.append(f"At layer {layer}, over {len(ok)} directed pair(s), the inconsistent part of the target's "
                   f"variance ranges from {pct(res.min())} ({best['source']}→{best['target']}) to "
                   f"{pct(res.max())} ({worst['source']}→{worst['target']}); median {pct(float(np.median(res)))}.")
        f0 = [r.get("fraction_order0") for r in ok if r.get("fraction_order0") is not None]
        hi = [sum(r.get(f"fraction_order{k}") or 0.0 for k in range(1, int(r.get("orders", 0)) + 1)) for r in ok]
        if f0 and any(int(r.get("orders", 0)) > 0 for r in ok):
            where = "the linear (order-0) component" if np.median(f0) >= np.median(hi) else "the nonlinear components"
            note = (" (fractions above 100% mean that the components overlap and partly cancel)"
                    if max(np.median(f0), np.median(hi)) > 1 else "")
            out.append(f"The larger share lies in {where}: median fraction {pct(float(np.median(f0)))} at order 0 "
                       f"against {pct(float(np.median(hi)))} summed over orders ≥ 1{note}.")
    asym = asymmetry(rows)
    if asym:
        d = asym[0]
        if abs(d["difference"]) >= ASYMMETRY_THRESHOLD:
            hard, easy = (d["b"], d["a"]) if d["difference"] > 0 else (d["a"], d["b"])
            r_hard = max(d["a_to_b"], d["b_to_a"])
            r_easy = min(d["a_to_b"], d["b_to_a"])
            out.append(f"Largest asymmetry: {pct(r_hard)} of {hard}'s variance is not rebuilt from {easy}, but only "
                       f"{pct(r_easy)} of {easy}'s from {hard}: {hard} holds more knowledge that {easy} lacks than "
                       f"the reverse.")
        else:
            out.append(f"The pairs are nearly symmetric: the two directions' residual fractions differ by at most "
                       f"{pct(abs(d['difference']))} ({d['a']}, {d['b']}).")
    out += [pair_reading(r) for r in rows]
    return out


def generation_readings(gens: Sequence[Mapping[str, Any]]) -> list[str]:
    out = []
    acc = [(g["generation"], g["test_top1"]) for g in gens if g.get("test_top1") is not None]
    if len(acc) >= 2:
        out.append(f"Test top-1 goes from {acc[0][1]:.1f}% (generation {acc[0][0]}) to {acc[-1][1]:.1f}% "
                   f"(generation {acc[-1][0]}).")
    slim = [(g["generation"], g["slim_test_top1"]) for g in gens if g.get("slim_test_top1") is not None]
    if len(slim) >= 2:
        out.append(f"The slim net goes from {slim[0][1]:.1f}% to {slim[-1][1]:.1f}% top-1.")
    prev = [(g["generation"], g["residual_to_previous"]) for g in gens if g.get("residual_to_previous") is not None]
    if prev:
        out.append("Residual fraction to the previous generation: " +
                   ", ".join(f"g{g} {pct(v)}" for g, v in prev) + ".")
    first = [(g["generation"], g["residual_to_first"]) for g in gens if g.get("residual_to_first") is not None]
    if len(first) >= 2:
        out.append("Residual fraction to the first generation: " +
                   ", ".join(f"g{g} {pct(v)}" for g, v in first) + ".")
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 points or a constant side."""
    from scipy.stats import spearmanr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(spearmanr(x, y).statistic)


def agreement_points(rows: Sequence[Mapping[str, Any]], sim: Mapping[str, Any], metric: str) -> list[dict[str, Any]]:
    """One point per unordered pair present in both: x = the similarity metric, y = the mean of the two
    directions' R² (or the one direction fitted). Pairs without a finite value are left out."""
    nets = sim["nets"]
    m = sim["metrics"][metric]["matrix"]
    idx = {n: i for i, n in enumerate(nets)}
    r2: dict[frozenset, list[float]] = {}
    for r in rows:
        if r["source"] in idx and r["target"] in idx and r.get("r2") is not None:
            r2.setdefault(frozenset((r["source"], r["target"])), []).append(r["r2"])
    pts = []
    for key, vals in r2.items():
        a, b = sorted(key, key=natural_key)
        v = m[idx[a]][idx[b]]
        if v is None or not math.isfinite(v):
            continue
        pts.append({"label": f"{a}–{b}", "x": float(v), "y": float(np.mean(vals)), "a": a, "b": b})
    return sorted(pts, key=lambda p: natural_key(p["label"]))


def agreement_readings(points: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    if len(points) < 3:
        return [f"Only {len(points)} pair(s) have both {metric} and a Trans-Net R²: too few to compare rankings."]
    rho = spearman([p["x"] for p in points], [p["y"] for p in points])
    if rho is None:
        return [f"{metric} or the Trans-Net R² is the same for every pair: their rankings cannot be compared."]
    word = "agree" if rho >= 0.7 else "partly agree" if rho >= 0.3 else "disagree"
    rx = _ranks([p["x"] for p in points])
    ry = _ranks([p["y"] for p in points])
    worst = int(np.argmax(np.abs(rx - ry)))
    weak = f" (only {len(points)} pairs: weak evidence)" if len(points) < 6 else ""
    text = [f"{metric} and the Trans-Net R² {word} on the ranking of the {len(points)} pairs (Spearman ρ = {rho:.2f})"
            f"{weak}."]
    if abs(rx[worst] - ry[worst]) >= 1:
        p = points[worst]
        text.append(f"They differ most on {p['label']}: rank {int(rx[worst])} of {len(points)} by {metric} "
                    f"({p['x']:.2f}) but {int(ry[worst])} by R² ({p['y']:.2f}) (rank 1 = most alike).")
    return text


def _ranks(v: Sequence[float]) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(-np.asarray(v, dtype=float), method="average")


def diagnosis_readings(d: Mapping[str, Any]) -> list[str]:
    a, b = d["a"], d["b"]
    out = []
    bs, ur = d["blind_spots"], d["unreliable"]
    out.append(f"Blind spots of {a}: {pct(bs.get('relative'))} of {b}'s variance at {d['layer']} is not rebuilt from "
               f"{a} (what {b} knows and {a} lacks); unreliable features of {a}: {pct(ur.get('relative'))} of "
               f"{a}'s variance is not rebuilt from {b} (what {a} knows and {b} lacks).")
    for key, owner, other in (("blind_spots", b, a), ("unreliable", a, b)):
        tc = d[key].get("top_channels") or []
        if tc:
            out.append(f"Channels of {owner} that {other} rebuilds worst: " +
                       ", ".join(f"{c['channel']} ({pct(c['relative'])})" for c in tc[:5]) + ".")
        ti = d[key].get("top_images") or []
        if ti:
            out.append(f"Images where {owner} holds most that {other} lacks (feature-file row, dataset index): " +
                       ", ".join(f"row {i['row']} / index {i['index']} ({pct(i['relative'])})" for i in ti[:5]) + ".")
    return out


# =========================================================================== figures

def family_generations(fam: Mapping[str, Any]) -> tuple[list[str], list[int], dict[str, dict[str, Any]]] | None:
    """(net names in generation order, generation numbers, accuracies by name) of a family with two or
    more role-'generation' members; slim members add ``slim_test_top1`` to their generation's net."""
    gens = sorted((m for m in fam["members"] if m["role"] == "generation" and m["generation"] is not None),
                  key=lambda m: m["generation"])
    if len(gens) < 2:
        return None
    acc = {m["name"]: {"test_top1": m["metrics"].get("test_top1")} for m in gens}
    by_gen = {m["generation"]: m["name"] for m in gens}
    for m in fam["members"]:
        if m["role"] == "slim" and m["generation"] in by_gen:
            acc[by_gen[m["generation"]]]["slim_test_top1"] = m["metrics"].get("test_top1")
    return [m["name"] for m in gens], [int(m["generation"]) for m in gens], acc


def study_generations(st: Study) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """family -> layer -> generation rows (accuracies and residual fractions)."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for fam in st.families:
        g = family_generations(fam)
        if g is None:
            continue
        order, numbers, acc = g
        layers = {layer: generation_rows(order, c["rows"], acc, numbers) for layer, c in st.consistency.items()}
        out[fam["name"]] = layers or {"": generation_rows(order, [], acc, numbers)}
    return out


def study_figures(st: Study, out_dir: str | os.PathLike | None = None) -> dict[str, list[Path]]:
    """Draw every figure the study's numbers support into ``out_dir`` (default STUDY/figures);
    returns figure key -> written paths (PNG first)."""
    out = Path(out_dir) if out_dir else st.root / "figures"
    figs: dict[str, list[Path]] = {}
    for layer, c in st.consistency.items():
        tag = _slug(layer)
        figs[f"consistency_residual_{tag}"] = plots.matrix_heatmap(
            net_matrix(c["rows"], c["nets"], "fraction_residual"), c["nets"], out / f"consistency_residual_{tag}",
            f"Residual fraction at {layer}", "residual fraction of Var(x_B)")
        figs[f"order_fractions_{tag}"] = plots.order_fraction_bars(
            c["rows"], out / f"order_fractions_{tag}", f"Variance of each target explained per order at {layer}")
    for layer, s in st.similarity.items():
        tag = _slug(layer)
        for metric, body in s.get("metrics", {}).items():
            kind = SIMILARITY_KIND.get(metric, "fraction")
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


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s).strip("_") or "x"


# =========================================================================== the document

Block = tuple  # ("h", level, text) | ("p", text) | ("ul", [text]) | ("table", header, rows) | ("fig", path, caption)


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
              + ["frac. residual", "R²"] + [f"gate {k}" for k in range(1, k_max + 1)] + ["MSE", "warnings"])
    body = []
    for r in rows:
        body.append([r["source"], r["target"], _fmt(r.get("n_samples"))]
                    + [_fmt(r.get(f"fraction_order{k}")) for k in range(k_max + 1)]
                    + [_fmt(r.get("fraction_residual")), _fmt(r.get("r2"))]
                    + [_fmt(r.get(f"gate{k}")) for k in range(1, k_max + 1)]
                    + [_fmt(r.get("mse")), r.get("warnings") or ""])
    return header, body


def matrix_table(matrix: Sequence[Sequence[Any]], nets: Sequence[str], corner: str) -> tuple[list[str], list[list[str]]]:
    return [corner] + list(nets), [[n] + [_fmt(v) for v in row] for n, row in zip(nets, matrix)]


def glance_readings(st: Study) -> list[str]:
    """The few statements that answer the study's question, computed from its numbers."""
    out = []
    for layer, c in st.consistency.items():
        out += consistency_readings(c["rows"], layer)[:3]
    for fam, layers in study_generations(st).items():
        for layer, rows in layers.items():
            out += [f"{fam}: {t}" for t in generation_readings(rows)[:2]]
    for layer, s in st.similarity.items():
        if layer in st.consistency and "cka" in s.get("metrics", {}):
            out += agreement_readings(agreement_points(st.consistency[layer]["rows"], s, "cka"), "cka")[:1]
    return out


def summary_lines(study_dir: str | os.PathLike) -> list[str]:
    """The report's 'At a glance' statements of a study folder (for the study runner's summary)."""
    return glance_readings(load_study(study_dir))


def build_document(st: Study, figs: Mapping[str, list[Path]]) -> list[Block]:
    """The report as blocks, most important first: the answer, then the evidence, then provenance."""
    doc: list[Block] = []
    name = (st.info or {}).get("title") or (st.info or {}).get("name")
    title = f"Knowledge consistency study: {name or st.root.name}"
    doc.append(("h", 1, title))
    doc.append(("p", f"Generated {now_utc()} from {st.root.resolve()}."))

    # ---- the answer first
    glance = glance_readings(st)
    doc.append(("h", 2, "At a glance"))
    doc.append(("ul", glance or ["No consistency results in this study yet (see 'Missing parts' below)."]))
    first_heat = next((k for k in figs if k.startswith("consistency_residual_")), None)
    if first_heat:
        doc.append(("fig", figs[first_heat][0], "Residual fraction per directed pair (row = source A, column = "
                                                 "target B): the share of B's features that A's cannot rebuild. "
                                                 "Colour scale fixed to [0, 1]."))

    # ---- what was compared
    doc.append(("h", 2, "What was compared"))
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

    # ---- networks
    if st.families:
        doc.append(("h", 2, "Networks"))
        for fam in st.families:
            header = ["member", "role", "generation", "teacher", "arch", "test top-1 (%)", "epochs"]
            body = [[m["name"], m["role"], _fmt(m["generation"]), m["teacher"] or "—", m["arch"] or "—",
                     _fmt(m["metrics"].get("test_top1")), _fmt(m["metrics"].get("epoch"))] for m in fam["members"]]
            doc.append(("h", 3, f"Family {fam['name']} ({fam['family']})"))
            doc.append(("table", header, body))

    # ---- consistency
    for layer, c in st.consistency.items():
        tag = _slug(layer)
        doc.append(("h", 2, f"Knowledge consistency at {layer}"))
        doc.append(("p", CONSISTENCY_NOTE))
        doc.append(("ul", consistency_readings(c["rows"], layer)))
        doc.append(("table", *consistency_table(c["rows"])))
        for key, cap in ((f"consistency_residual_{tag}", "Residual fraction matrix (row = source, column = target)."),
                         (f"order_fractions_{tag}", "Fraction of each target's variance per order and in the "
                                                    "residual (stacked; need not sum to 1).")):
            if key in figs and key != first_heat:
                doc.append(("fig", figs[key][0], cap))
            elif key == first_heat:
                doc.append(("p", "The residual fraction matrix is shown under 'At a glance'."))
        if c.get("matrices"):
            m = c["matrices"]["matrices"]
            doc.append(("h", 3, "R² matrix (row = source A, column = target B)"))
            doc.append(("table", *matrix_table(m["r2"], c["matrices"]["nets"], "A \\ B")))

    # ---- generations
    gens = study_generations(st)
    if gens:
        doc.append(("h", 2, "Generations"))
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

    # ---- similarity baselines
    for layer, s in st.similarity.items():
        tag = _slug(layer)
        doc.append(("h", 2, f"Similarity baselines at {layer}"))
        doc.append(("p", f"Split {s.get('split')}; rows and columns in the order {', '.join(s['nets'])}. "
                         "Similarities lie in [0, 1] (1 = alike); distances are ≥ 0 (0 = alike). These measures are "
                         "symmetric; Trans-Net consistency is directional."))
        for metric, body in s.get("metrics", {}).items():
            doc.append(("h", 3, metric))
            doc.append(("table", *matrix_table(body["matrix"], s["nets"], metric)))
            if body.get("null_mean") is not None:
                doc.append(("p", f"Permutation null (shuffled pairing of samples): mean {_fmt_null(body['null_mean'])}."))
            for w in body.get("warnings", []) or []:
                doc.append(("p", f"Warning: {w}"))
            if f"similarity_{metric}_{tag}" in figs:
                doc.append(("fig", figs[f"similarity_{metric}_{tag}"][0], f"{metric} matrix."))
        if layer in st.consistency and "cka" in s.get("metrics", {}):
            pts = agreement_points(st.consistency[layer]["rows"], s, "cka")
            doc.append(("ul", agreement_readings(pts, "cka")))
            if f"agreement_cka_{tag}" in figs:
                doc.append(("fig", figs[f"agreement_cka_{tag}"][0], "One point per pair of nets: CKA against the "
                                                                      "mean held-out R² of the two Trans-Nets."))

    # ---- diagnosis
    for layer, diags in st.diagnosis.items():
        doc.append(("h", 2, f"Network diagnosis at {layer}"))
        for d in diags:
            doc.append(("h", 3, f"{d['a']} against {d['b']}"))
            doc.append(("ul", diagnosis_readings(d)))
            for rel in d.get("figures", []):
                p = Path(d["dir"]) / rel
                if p.suffix == ".png" and p.is_file():
                    doc.append(("fig", p, _diag_caption(p.name, d)))

    # ---- training curves
    train_figs = [k for k in figs if k.startswith("training_")]
    if train_figs:
        doc.append(("h", 2, "Training curves"))
        for k in train_figs:
            doc.append(("fig", figs[k][0], k.replace("training_", "Family ")))

    # ---- missing, warnings, provenance
    doc.append(("h", 2, "Missing parts and warnings"))
    doc.append(("ul", [f"missing: {m}" for m in st.missing] + [f"warning: {w}" for w in st.warnings]
                or ["Nothing missing; no warnings."]))
    doc.append(("h", 2, "Provenance"))
    doc.append(("ul", provenance_items(st)))
    return doc


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


def provenance_items(st: Study) -> list[str]:
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
    for fam in st.families:
        items.append(f"family {fam['name']}: {fam['family']}, {len(fam['members'])} member(s), manifest "
                     f"{Path(fam['dir']).relative_to(st.root) / 'family.json'}")
    return items


# =========================================================================== renderers

def _md_escape(s: str) -> str:
    return str(s).replace("|", "\\|")


def render_markdown(doc: Sequence[Block], base: Path) -> str:
    out = []
    for b in doc:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "ul":
            out.append("\n".join(f"- {t}" for t in b[1]))
        elif b[0] == "table":
            header, rows = b[1], b[2]
            lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |",
                     "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
            out.append("\n".join(lines))
        elif b[0] == "fig":
            rel = os.path.relpath(b[1], base)
            alt = b[2].replace("[", "\\[").replace("]", "\\]")
            out.append(f"![{alt}]({rel})\n\n*{alt}*")
    return "\n\n".join(out) + "\n"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #0072B2;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ddd}
h3{font-size:1.05em;margin-top:1.2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f3f6f9}
td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}
figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
li{margin:.2em 0}
"""


def render_html(doc: Sequence[Block]) -> str:
    """A self-contained page: inline CSS, PNGs as base64 data URIs, no external resources."""
    title = next((b[2] for b in doc if b[0] == "h" and b[1] == 1), "Report")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title>", f"<style>{CSS}</style></head><body>"]
    for b in doc:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{html.escape(b[1])}</p>")
        elif b[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(t)}</li>" for t in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b[0] == "fig":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write ``report.html`` and ``report.md`` (see :func:`make_report`); return their paths."""
    res = make_report(study_dir, out_dir)
    return [res["html"], res["markdown"]]


def make_report(study_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read the study, draw its figures (into ``out_dir``/figures, default STUDY/figures), and write
    ``report.html`` and ``report.md`` into ``out_dir`` (default: the study folder). Returns the paths
    (``html``, ``markdown``), ``figures`` (key -> paths), and the study's ``missing`` and ``warnings``."""
    st = load_study(study_dir)
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
