"""Plain-language readings of a study's numbers: every sentence with a number in it is computed
from the tables (consistency rows, similarity matrices, generation curves, a diagnosis); nothing is
claimed that the files do not hold. Pure functions of their inputs."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from analysis.bootstrap import percentile_interval
from analysis.consistency import asymmetry, generation_rows, natural_key
from analysis.convergence import refusal, usable, verdict_of
from analysis.study_folder import StudyFolder, read_study_folder

ASYMMETRY_THRESHOLD = 0.05   # residual fractions of the two directions differing less than this: "nearly symmetric"
OVERLAP_TOLERANCE = 1.15     # fractions (orders + residual) adding up to more than this: say they overlap


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
        text += f" ({'in-sample' if row.get('held_out') is False else 'held-out'} R² {row['r2']:.2f})"
    if row.get("warnings"):
        text += f" [warning: {row['warnings']}]"
    return text + "."


def consistency_readings(rows: Sequence[Mapping[str, Any]], layer: str) -> list[str]:
    """Plain-language statements computed from a consistency table (no claim beyond the numbers).

    No conclusion (extreme, share, asymmetry) is drawn from a pair that is not converged or whose R²
    is below 0 (``analysis.convergence.refusal``); the readings say which pairs and why. Two values are
    compared only when their bootstrap intervals (``<key>_ci`` columns, when present) separate."""
    out = in_sample_readings(rows)
    refused = [(r, refusal(r)) for r in rows if refusal(r)]
    if refused:
        out.append(f"No conclusion is drawn from {len(refused)} of {len(rows)} pair(s): " + "; ".join(
            f"{r['source']}→{r['target']}: {why}" for r, why in refused) + ".")
    ok = [r for r in rows if usable(r) and r.get("fraction_residual") is not None]
    if ok:
        best = min(ok, key=lambda r: r["fraction_residual"])
        worst = max(ok, key=lambda r: r["fraction_residual"])
        res = np.array([r["fraction_residual"] for r in ok])
        if separated(best.get("fraction_residual_ci"), worst.get("fraction_residual_ci")):
            out.append(f"At layer {layer}, over {len(ok)} directed pair(s), the inconsistent part of the target's "
                       f"variance ranges from {pct(res.min())} ({best['source']}→{best['target']}) to "
                       f"{pct(res.max())} ({worst['source']}→{worst['target']}); median {pct(float(np.median(res)))}.")
        else:
            out.append(f"At layer {layer}, over {len(ok)} directed pair(s), the inconsistent part of the target's "
                       f"variance lies between {pct(res.min())} and {pct(res.max())} (median "
                       f"{pct(float(np.median(res)))}); the extremes' bootstrap intervals overlap, so no pair is "
                       f"named the most or least consistent.")
        out += share_readings(ok)
    out += asymmetry_readings(rows)
    unknown = [f"{r['source']}→{r['target']}" for r in rows if verdict_of(r) == "unknown" and usable(r)]
    if unknown:
        out.append(f"Convergence was not judged for {len(unknown)} pair(s) ({', '.join(unknown)}): their numbers "
                   f"are read as they are, without a convergence check.")
    return out


def in_sample_readings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    inside = [f"{r['source']}→{r['target']}" for r in rows if r.get("held_out") is False]
    if not inside:
        return []
    return [f"Warning: {len(inside)} of {len(rows)} pair(s) ({', '.join(inside)}) are scored on their training "
            f"split (in-sample, not held-out): a Trans-Net can memorise its training rows, so their R² and "
            f"fractions overstate the consistency."]


def share_readings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where the explained variance lies, from the additive shares (sequential R² gains: they add up
    to R²); the paper's per-order fractions overlap, so they are stated once as overlapping, not as shares."""
    out = []
    add = [r["additive_shares"] for r in rows if r.get("additive_shares") and len(r["additive_shares"]) > 1]
    if add:
        first = float(np.median([a[0] for a in add]))
        rest = float(np.median([sum(a[1:]) for a in add]))
        where = "the linear (order-0) component" if first >= rest else "the nonlinear components"
        out.append(f"The larger share lies in {where}: order 0 alone reaches a median R² of {first:.2f}, and the "
                   f"orders ≥ 1 add a median {rest:+.2f} (additive shares over {len(add)} pair(s)).")
    over = [r for r in rows if overlap_total(r) is not None and overlap_total(r) > OVERLAP_TOLERANCE]
    if over:
        tot = [overlap_total(r) for r in over]
        out.append(f"In {len(over)} of {len(rows)} pair(s) the paper's per-order variances and the residual add up "
                   f"to {min(tot):.1f}x–{max(tot):.1f}x the target's variance: the order components overlap and "
                   f"partly cancel, so their fractions are not shares of the target"
                   + (" (the additive shares are)." if add else "."))
    return out


def overlap_total(row: Mapping[str, Any]) -> float | None:
    """Sum of the per-order fractions and the residual fraction of a row (None if any is missing)."""
    vals = [row.get(f"fraction_order{k}") for k in range(int(row.get("orders", 0)) + 1)] + [row.get("fraction_residual")]
    return None if any(v is None for v in vals) else float(sum(vals))


def separated(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    """True when two intervals [lo, hi] do not overlap, or when either is unknown (then the point
    values are compared as they are)."""
    if not a or not b:
        return True
    return a[1] < b[0] or b[1] < a[0]


def asymmetry_readings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The largest asymmetry between the two directions of a pair, read only from usable pairs and
    only when the two residual fractions (and their intervals) differ."""
    out = []
    by = {(r["source"], r["target"]): r for r in rows}
    for d in asymmetry(rows):
        bad = [f"{x}→{y}" for x, y in ((d["a"], d["b"]), (d["b"], d["a"])) if not usable(by[(x, y)])]
        if bad:
            out.append(f"The asymmetry between {d['a']} and {d['b']} is not read: {', '.join(bad)} cannot carry a "
                       f"conclusion (see above).")
    asym = asymmetry([r for r in rows if usable(r)])
    if not asym:
        return out
    d = asym[0]
    ci_ab = by[(d["a"], d["b"])].get("fraction_residual_ci")
    ci_ba = by[(d["b"], d["a"])].get("fraction_residual_ci")
    if abs(d["difference"]) < ASYMMETRY_THRESHOLD or not separated(ci_ab, ci_ba):
        why = ("their bootstrap intervals overlap" if not separated(ci_ab, ci_ba)
               else f"they differ by at most {pct(abs(d['difference']))}")
        out.append(f"The pairs are nearly symmetric: the two directions' residual fractions of {d['a']} and {d['b']} "
                   f"(the largest difference) cannot be told apart: {why}.")
        return out
    hard, easy = (d["b"], d["a"]) if d["difference"] > 0 else (d["a"], d["b"])
    r_hard, r_easy = max(d["a_to_b"], d["b_to_a"]), min(d["a_to_b"], d["b_to_a"])
    out.append(f"Largest asymmetry: {pct(r_hard)} of {hard}'s variance is not rebuilt from {easy}, but only "
               f"{pct(r_easy)} of {easy}'s from {hard}: {hard} holds more knowledge that {easy} lacks than "
               f"the reverse.")
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
    directions' R² (or the one direction fitted). Pairs without a finite value are left out. Points
    carry ``x_ci`` (the metric's interval, when the similarity holds a ``ci`` matrix), ``y_ci`` (from the
    rows' paired R² replicates, when present), and ``usable`` (no direction refused a conclusion)."""
    nets = sim["nets"]
    body = sim["metrics"][metric]
    m, ci = body["matrix"], body.get("ci")
    idx = {n: i for i, n in enumerate(nets)}
    by: dict[frozenset, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["source"] in idx and r["target"] in idx and r.get("r2") is not None:
            by.setdefault(frozenset((r["source"], r["target"])), []).append(r)
    pts = []
    for key, rs in by.items():
        a, b = sorted(key, key=natural_key)
        v = m[idx[a]][idx[b]]
        if v is None or not math.isfinite(v):
            continue
        reps = [r["r2_replicates"] for r in rs if r.get("r2_replicates") is not None]
        y_ci = percentile_interval(np.mean(reps, axis=0)) if len(reps) == len(rs) else None
        pts.append({"label": f"{a}–{b}", "x": float(v), "y": float(np.mean([r["r2"] for r in rs])), "a": a, "b": b,
                    "x_ci": ci[idx[a]][idx[b]] if ci else None, "y_ci": y_ci, "usable": all(usable(r) for r in rs)})
    return sorted(pts, key=lambda p: natural_key(p["label"]))


def separable_share(values: Sequence[float], cis: Sequence[Sequence[float] | None]) -> float:
    """Share of the pairs of points whose intervals separate (1.0 when no interval is known)."""
    if not any(cis):
        return 1.0
    n = len(values)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return sum(separated(cis[i], cis[j]) for i, j in pairs) / max(len(pairs), 1)


def agreement_readings(points: Sequence[Mapping[str, Any]], metric: str) -> list[str]:
    """Whether the metric and the Trans-Net R² rank the pairs alike, read only from usable pairs and only
    when most of their intervals separate (otherwise the rankings are noise and the reading says so)."""
    refused = [p["label"] for p in points if p.get("usable") is False]
    points = [p for p in points if p.get("usable") is not False]
    out = [f"Left out of the ranking: {', '.join(refused)} (a Trans-Net that cannot carry a conclusion)."] \
        if refused else []
    if len(points) < 3:
        return out + [f"Only {len(points)} pair(s) have both {metric} and a usable Trans-Net R²: too few to "
                      f"compare rankings."]
    for axis, name in (("x", metric), ("y", "the Trans-Net R²")):
        share = separable_share([p[axis] for p in points], [p.get(f"{axis}_ci") for p in points])
        if share < 0.5:
            vals = [p[axis] for p in points]
            return out + [f"The {len(points)} pairs cannot be ranked by {name}: their values ({min(vals):.3f} to "
                          f"{max(vals):.3f}) lie within each other's bootstrap intervals ({100 * share:.0f}% of the "
                          f"pairs of pairs separate), so no ranking is compared."]
    rho = spearman([p["x"] for p in points], [p["y"] for p in points])
    if rho is None:
        return out + [f"{metric} or the Trans-Net R² is the same for every pair: their rankings cannot be compared."]
    word = "agree" if rho >= 0.7 else "partly agree" if rho >= 0.3 else "disagree"
    rx = _ranks([p["x"] for p in points])
    ry = _ranks([p["y"] for p in points])
    worst = int(np.argmax(np.abs(rx - ry)))
    weak = f" (only {len(points)} pairs: weak evidence)" if len(points) < 6 else ""
    out.append(f"{metric} and the Trans-Net R² {word} on the ranking of the {len(points)} pairs (Spearman ρ = "
               f"{rho:.2f}){weak}.")
    if abs(rx[worst] - ry[worst]) >= 1:
        p = points[worst]
        out.append(f"They differ most on {p['label']}: rank {int(rx[worst])} of {len(points)} by {metric} "
                   f"({p['x']:.2f}) but {int(ry[worst])} by R² ({p['y']:.2f}) (rank 1 = most alike).")
    return out


def _ranks(v: Sequence[float]) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(-np.asarray(v, dtype=float), method="average")


def diagnosis_readings(d: Mapping[str, Any]) -> list[str]:
    a, b = d["a"], d["b"]
    out = []
    bs, ur = d["blind_spots"], d["unreliable"]
    if d.get("held_out") is False:
        out.append(f"In-sample: split {d.get('split')!r} is the split the Trans-Nets were fitted on, so these "
                   f"residuals are smaller than on held-out images (warnings in diagnosis.json).")
    for key, why in (d.get("not_conclusive") or {}).items():
        out.append(f"No conclusion from the {key.replace('_', ' ')} below: {why}. Fit longer (--epochs, or "
                   f"--epochs auto) before reading them.")
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


def study_generations(st: StudyFolder) -> dict[str, dict[str, list[dict[str, Any]]]]:
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


def glance_readings(st: StudyFolder) -> list[str]:
    """The few statements that answer the study's question, computed from its numbers."""
    out = []
    for layer, c in st.consistency.items():
        out += consistency_readings(c["rows"], layer)[:3]
    for fam, layers in study_generations(st).items():
        for rows in layers.values():
            out += [f"{fam}: {t}" for t in generation_readings(rows)[:2]]
    for layer, s in st.similarity.items():
        if layer in st.consistency and "cka" in s.get("metrics", {}):
            out += agreement_readings(agreement_points(st.consistency[layer]["rows"], s, "cka"), "cka")[:1]
    return out


def summary_lines(study_dir: str | os.PathLike) -> list[str]:
    """The report's 'At a glance' statements of a study folder (for the study runner's summary)."""
    return glance_readings(read_study_folder(study_dir))
