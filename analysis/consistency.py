"""Consistency across a family: fit (or reuse) Trans-Nets for many pairs of nets at one layer (or from
one layer to another) and collect their held-out variance reports into one tidy table and matrices.

    python cli.py consistency --features F --layer L --pairs all|chain|star:NAME|A>B,C>D [--nets a,b,c]
                              [--target_layer L2 [--spatial pool|interpolate]]
                              --out_dir D [--resume] [fit-transnet options: --epochs, --lr, --orders, ...]

Cross-layer pairs (``--target_layer L2``): A at L (``--layer``) -> B at L2, A = B allowed (the plan
``all`` then includes every net to itself, and ``A>A`` is a valid explicit pair). Maps of different
sizes need ``--spatial`` (``transnet/spatial.py``: the source is pooled or interpolated to the
target's H x W); without it they are refused before anything is fitted. Pair folders are named
``<A>@<L>__<B>@<L2>`` (never a same-layer folder's name), rows and ``metrics.json`` add
``source_layer``, ``target_layer`` and ``spatial`` (null where the sizes agreed).

The consistency folder ``D`` (one layer):

    D/config.json              options + provenance
    D/pairs/<source>__<target>/ one fit-transnet run directory per ordered pair (metrics.json holds the
                               held-out variance report; a variance.json of the same split, written
                               there later by ``python cli.py variance``, wins)
    D/table.csv, table.json    one row per pair: source, target, layer, split, held_out, n_samples,
                               var_target, var_order<k>, var_residual, fraction_order<k>,
                               fraction_residual, r2, gate<k> (p_k, order 1 first), mse (held-out),
                               constant_source_slices, imported, warnings, transnet_dir
    D/matrices.json            net x net matrices (row = source A, column = target B; diagonal and
                               pairs not fitted are null) of fraction_residual, fraction_order<k>, r2,
                               plus the pairs x fractions matrix
    D/metrics.json             summary (pairs fitted, reused, mean residual fraction)

A report is held-out only when its split differs from the fits' ``--train_split``; ``--split`` equal
to it gives in-sample rows (``held_out`` false, a warning, a line in the log). Rows also carry the
fit's warnings (e.g. spatially constant source slices, ``transnet/variance.py``). A pair folder may
hold a Trans-Net imported from the original code (``python cli.py import-transnet --out_dir
D/pairs/A__B``): it is reused as it is (its options are the original's, not the fit options given
here) and its row says ``imported``.

Knowledge consistency is asymmetric: A→B asks how much of x_B can be rebuilt from x_A, B→A the
reverse, so every plan lists ordered pairs and ``all``/``chain``/``star`` include both directions.
The pure table-building functions (``plan_pairs``, ``pair_row``, ``build_matrices``, ...) do no I/O;
``run_consistency`` is the I/O edge.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from analysis.config import PAIR_PLANS, PER_PAIR, ConsistencyConfig  # noqa: F401 (re-exported)
from common.device import use_device
from common.distributed import job_ranks
from common.errors import UserError
from common.files import atomic_write, read_json, write_json
from common.options import parse_csv
from common.registry import unknown_choice_message
from common.rundir import RunDir, is_finished
from features.identity import check_family_features
from features.store import get_features, list_layers, list_nets, list_splits, open_features
from training.manifest import read_manifest
from transnet.fit import RESUME_FREE, FitConfig, fit_transnet
from transnet.group_fit import FitJob, check_grouped, fit_group, plan_groups
from transnet.original import IMPORT_KIND
from transnet.spatial import SPATIAL, check_spatial_name, spatial_plan
from transnet.variance_file import variance_filename

PAIR_SEP = "__"
BASE_COLUMNS = ("source", "target", "layer", "split", "held_out", "n_samples", "var_target")
TAIL_COLUMNS = ("var_residual", "fraction_residual", "r2", "mse")
CROSS_COLUMNS = ("source_layer", "target_layer", "spatial")   # after "layer", in tables with a cross-layer row


# --------------------------------------------------------------------------- pair plans (pure)

def natural_key(name: str) -> list[Any]:
    """``ban_g2`` < ``ban_g10``: digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plan_pairs(nets: Sequence[str], plan: str, cross: bool = False) -> list[tuple[str, str]]:
    """Ordered (source, target) pairs of a plan over ``nets`` (kept in the given order).

    ``all``: every ordered pair; ``chain``: consecutive nets, both directions (g0→g1, g1→g0, g1→g2, ...);
    ``star:NAME``: NAME→every other and every other→NAME (teacher→student and student→teacher);
    ``A>B,C>D``: exactly these ordered pairs. ``cross`` (source and target at different layers): a net
    may map onto itself, ``all`` includes each net to itself (first among its pairs) and one net suffices."""
    nets = list(nets)
    if len(set(nets)) != len(nets):
        raise UserError(f"--nets lists a net twice: {', '.join(nets)}")
    plan = plan.strip()
    if ">" in plan:
        pairs = []
        for item in parse_csv(plan):
            a, sep, b = item.partition(">")
            a, b = a.strip(), b.strip()
            if not sep or not a or not b or ">" in b:
                raise UserError(f"--pairs item {item!r} is not SOURCE>TARGET")
            for n in (a, b):
                if n not in nets:
                    raise UserError(unknown_choice_message("net", n, nets))
            if a == b and not cross:
                raise UserError(f"--pairs item {item!r} maps a net onto itself (allowed only with a --target_layer "
                                f"other than --layer)")
            if (a, b) in pairs:
                raise UserError(f"--pairs lists {a}>{b} twice")
            pairs.append((a, b))
        return pairs
    if len(nets) < (1 if cross and plan == "all" else 2):
        raise UserError(f"a consistency study needs at least two nets, got {nets or 'none'}")
    if plan == "all":
        return [(a, b) for a in nets for b in ([a] if cross else []) + [n for n in nets if n != a]]
    if plan == "chain":
        return [p for a, b in zip(nets, nets[1:]) for p in ((a, b), (b, a))]
    if plan.startswith("star:"):
        centre = plan.split(":", 1)[1].strip()
        if centre not in nets:
            raise UserError(f"--pairs {plan}: " + unknown_choice_message("net", centre, nets))
        return [p for n in nets if n != centre for p in ((centre, n), (n, centre))]
    raise UserError(unknown_choice_message("pair plan", plan, list(PAIR_PLANS)))


def pair_dirname(source: str, target: str, source_layer: str = "", target_layer: str = "") -> str:
    """``A__B`` (same layer), or ``A@L1__B@L2`` for a cross-layer pair (``target_layer`` given and
    other than ``source_layer``), so the two kinds of fits never share a folder."""
    if target_layer and target_layer != source_layer:
        return f"{source}@{source_layer}{PAIR_SEP}{target}@{target_layer}"
    return f"{source}{PAIR_SEP}{target}"


# --------------------------------------------------------------------------- rows and matrices (pure)

def _finite_or_none(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _report_key(column: str) -> str:
    """The variance report's location of a row column: ``var_order1`` -> ``var_orders[1]``, ``gate2`` ->
    ``gates[1]``, ``r2`` -> ``r2`` (as ``common.files.write_json`` names non-finite values)."""
    for prefix, key, start in (("var_order", "var_orders", 0), ("fraction_order", "fraction_orders", 0),
                               ("gate", "gates", 1)):
        if column.startswith(prefix) and column[len(prefix):].isdigit():
            return f"{key}[{int(column[len(prefix):]) - start}]"
    return column


def held_out_label(rows: Sequence[Mapping[str, Any]]) -> str:
    """``Held-out``, ``In-sample`` or ``Held-out and in-sample``: what the rows' R² and fractions are."""
    kinds = {r.get("held_out") is not False for r in rows}
    return "In-sample" if kinds == {False} else ("Held-out and in-sample" if len(kinds) == 2 else "Held-out")


def pair_row(report: Mapping[str, Any], transnet_dir: str | None = None) -> dict[str, Any]:
    """One tidy table row from a variance report (``metrics.json``/``variance.json`` of a Trans-Net run).

    Values that are missing or not finite become ``None`` and are named in ``warnings`` (never a
    silent NaN): e.g. a target with zero variance has undefined fractions."""
    for key in ("source", "target", "var_orders", "fraction_orders"):
        if key not in report:
            raise UserError(f"variance report of {transnet_dir or 'a pair'} lacks {key!r}; is it a fit-transnet "
                            f"metrics.json or variance.json?")
    row: dict[str, Any] = {k: report.get(k) for k in ("source", "target", "layer", "split", "n_samples")}
    row["held_out"] = report.get("held_out") is not False
    warnings: list[str] = []
    numbers: dict[str, Any] = {"var_target": report.get("var_target")}
    numbers.update({f"var_order{k}": v for k, v in enumerate(report["var_orders"])})
    numbers["var_residual"] = report.get("var_residual")
    numbers.update({f"fraction_order{k}": v for k, v in enumerate(report["fraction_orders"])})
    numbers["fraction_residual"] = report.get("fraction_residual")
    numbers["r2"] = report.get("r2")
    numbers.update({f"gate{k}": v for k, v in enumerate(report.get("gates") or [], start=1)})
    numbers["mse"] = report.get("mse")
    bad = []
    for k, v in numbers.items():
        clean = _finite_or_none(v)
        if clean is None:
            bad.append(k)
        row[k] = clean
    if bad:
        reason = " (the target has zero variance)" if not (_finite_or_none(report.get("var_target")) or 0) > 0 else ""
        why = report.get("nonfinite_values") or {}         # what write_json stored as null (common/files.py)
        named = [f"{k} ({why[_report_key(k)]})" if _report_key(k) in why else k for k in bad]
        warnings.append(f"undefined: {', '.join(named)}{reason}")
    fit_warnings = list(report.get("warnings") or ([report["warning"]] if report.get("warning") else []))
    if report.get("held_out") is False and not any("in-sample" in w for w in fit_warnings):
        fit_warnings.insert(0, "in-sample report (no held-out split)")
    warnings += fit_warnings
    if report.get("target_layer"):                      # a cross-layer (or resized) fit
        row.update({k: report.get(k) for k in CROSS_COLUMNS + ("source_size", "target_size")})
    row["constant_source_slices"] = report.get("constant_source_slices")
    row["imported"] = bool(report.get("imported"))
    row["orders"] = len(report["var_orders"]) - 1
    row["warnings"] = "; ".join(warnings)
    row["transnet_dir"] = transnet_dir
    return row


def table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Column order of the tidy table: identifiers, variances, fractions, R², gates, MSE, notes."""
    k_max = max((r.get("orders", 0) for r in rows), default=0)
    cols = list(BASE_COLUMNS)
    if any(r.get("target_layer") for r in rows):
        at = cols.index("layer") + 1
        cols[at:at] = CROSS_COLUMNS
    cols += [f"var_order{k}" for k in range(k_max + 1)] + ["var_residual"]
    cols += [f"fraction_order{k}" for k in range(k_max + 1)] + ["fraction_residual", "r2"]
    cols += [f"gate{k}" for k in range(1, k_max + 1)] + ["mse", "constant_source_slices", "orders", "imported",
                                                        "warnings", "transnet_dir"]
    return cols


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The table as CSV text (missing values are empty cells; the ``warnings`` column says why)."""
    cols = table_columns(rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return buf.getvalue()


def matrix_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    k_max = max((r.get("orders", 0) for r in rows), default=0)
    return ["fraction_residual", "r2"] + [f"fraction_order{k}" for k in range(k_max + 1)]


def net_matrix(rows: Sequence[Mapping[str, Any]], nets: Sequence[str], key: str) -> list[list[float | None]]:
    """(n_nets, n_nets): entry [i][j] = ``key`` of pair nets[i]→nets[j]; None on the diagonal and for
    pairs not in ``rows``."""
    idx = {n: i for i, n in enumerate(nets)}
    m: list[list[float | None]] = [[None] * len(nets) for _ in nets]
    for r in rows:
        if r["source"] in idx and r["target"] in idx:
            m[idx[r["source"]]][idx[r["target"]]] = r.get(key)
    return m


def pair_fraction_matrix(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Pairs x (fraction_order0..K, fraction_residual): the matrix behind the stacked bars."""
    k_max = max((r.get("orders", 0) for r in rows), default=0)
    cols = [f"fraction_order{k}" for k in range(k_max + 1)] + ["fraction_residual"]
    return {"pairs": [f"{r['source']}>{r['target']}" for r in rows], "columns": cols,
            "values": [[r.get(c) for c in cols] for r in rows]}


def build_matrices(rows: Sequence[Mapping[str, Any]], nets: Sequence[str], layer: str, split: str,
                   target_layer: str = "") -> dict[str, Any]:
    """The ``matrices.json`` body (``target_layer``: the columns' layer of a cross-layer study)."""
    cross = bool(target_layer) and target_layer != layer
    body = {"layer": layer, "split": split, "nets": list(nets), "rows": "source (A)", "columns": "target (B)",
            "note": "entry [i][j] describes nets[i] -> nets[j]; null: diagonal or pair not fitted",
            "matrices": {k: net_matrix(rows, nets, k) for k in matrix_keys(rows)},
            "pair_fractions": pair_fraction_matrix(rows)}
    if cross:
        body.update({"rows": f"source (A) at {layer}", "columns": f"target (B) at {target_layer}",
                     "target_layer": target_layer,
                     "note": f"entry [i][j] describes nets[i] at {layer} -> nets[j] at {target_layer}; the diagonal "
                             f"is a net to itself; null: pair not fitted"})
    return body


def asymmetry(rows: Sequence[Mapping[str, Any]], key: str = "fraction_residual") -> list[dict[str, Any]]:
    """For each unordered pair fitted in both directions: the two values and their difference
    (A→B minus B→A); sorted by the absolute difference, largest first."""
    by = {(r["source"], r["target"]): r.get(key) for r in rows}
    out, seen = [], set()
    for (a, b), v in by.items():
        if (b, a) in by and frozenset((a, b)) not in seen and v is not None and by[(b, a)] is not None:
            seen.add(frozenset((a, b)))
            out.append({"a": a, "b": b, "a_to_b": v, "b_to_a": by[(b, a)], "difference": v - by[(b, a)]})
    return sorted(out, key=lambda d: -abs(d["difference"]))


def generation_rows(order: Sequence[str], rows: Sequence[Mapping[str, Any]],
                    accuracy: Mapping[str, Mapping[str, Any]] | None = None,
                    generations: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Rows of the generation curves: for nets ``order`` (generation order), the residual fraction of
    generation g's features not rebuilt from generation g-1 (``residual_to_previous``) and from the
    first generation (``residual_to_first``), plus accuracies from ``accuracy[name]``
    (``test_top1``, ``slim_test_top1``). None where a pair was not fitted."""
    by = {(r["source"], r["target"]): r for r in rows}
    accuracy = accuracy or {}
    gens = list(generations) if generations is not None else list(range(len(order)))
    out = []
    for i, (g, name) in enumerate(zip(gens, order)):
        prev = by.get((order[i - 1], name)) if i > 0 else None
        first = by.get((order[0], name)) if i > 0 else None
        acc = accuracy.get(name, {})
        out.append({"generation": g, "net": name, "test_top1": acc.get("test_top1"),
                    "slim_test_top1": acc.get("slim_test_top1"),
                    "residual_to_previous": prev.get("fraction_residual") if prev else None,
                    "residual_to_first": first.get("fraction_residual") if first else None})
    return out


# --------------------------------------------------------------------------- I/O edge

Sizes = dict[str, tuple[int, int]]


def resolve_nets(features: str, layer: str, split: str, train_split: str, nets: Sequence[str],
                 target_layer: str = "", spatial: str = "") -> list[str]:
    """The nets to compare (given order, else every net of the file holding the layer(s), natural order),
    checked: the layers exist and are complete in both splits, and (without ``spatial``) all maps share
    one spatial size."""
    return _resolve(features, layer, split, train_split, nets, target_layer, spatial)[0]


def _resolve(features: str, layer: str, split: str, train_split: str, nets: Sequence[str],
             target_layer: str = "", spatial: str = "") -> tuple[list[str], Sizes, Sizes]:
    """``resolve_nets`` plus each net's (H, W) at the sources' layer and at the targets' layer."""
    layer_b = target_layer or layer
    wanted = list(dict.fromkeys((layer, layer_b)))
    with open_features(features) as f:
        splits = list_splits(f)
        for s in (split, train_split):
            if s not in splits:
                raise UserError(f"{features}: " + unknown_choice_message("split", s, splits))
        available = list_nets(f, split)
        if not nets:
            nets = sorted((n for n in available if all(lay in f[split][n] for lay in wanted)), key=natural_key)
            if not nets:
                layers = sorted({lay for n in available for lay in list_layers(f, split, n)}, key=natural_key)
                missing = next((lay for lay in wanted if lay not in layers), None)
                if missing is not None:
                    raise UserError(f"{features}: {unknown_choice_message('layer', missing, layers)} (split {split!r})")
                raise UserError(f"{features}: no net holds both layers {layer!r} and {layer_b!r} in split {split!r}")
            if len(nets) < 2 and layer_b == layer:
                raise UserError(f"{features} holds layer {layer!r} for {len(nets)} net(s) in split {split!r} "
                                f"(nets: {', '.join(available) or 'none'}); a consistency study needs two or more")
        sizes: dict[str, Sizes] = {lay: {} for lay in wanted}
        for n in nets:
            for s in dict.fromkeys((split, train_split)):
                for lay in wanted:
                    ds = get_features(f, s, n, lay)
                    if ds.ndim != 4:
                        raise UserError(f"/{s}/{n}/{lay} has shape {ds.shape}; Trans-Nets need (N, C, H, W) maps")
                    sizes[lay][n] = tuple(ds.shape[2:])
    all_sizes = {size for by_net in sizes.values() for size in by_net.values()}
    if len(all_sizes) > 1 and not spatial:
        listed = "; ".join(f"at {lay}: " + ", ".join(f"{n}: {h}x{w}" for n, (h, w) in by.items())
                           for lay, by in sizes.items())
        where = f"layer {layer!r}" if layer_b == layer else f"layers {layer!r} and {layer_b!r}"
        raise UserError(f"the nets' maps at {where} differ in spatial size ({listed}); a Trans-Net keeps the "
                        f"spatial size, so compare nets with maps of one size, or give --spatial "
                        f"{'|'.join(SPATIAL)} to resize each source to its target's size")
    return list(nets), sizes[layer], sizes[layer_b]


def pair_spatial(pairs: Sequence[tuple[str, str]], size_a: Sizes, size_b: Sizes, spatial: str) -> dict[tuple[str, str], str]:
    """Per pair, the convention its fit gets: ``spatial`` where the source's (H, W) is not the target's,
    "" where they agree (so those fits, and their folders' options, are those of an unresized pair).
    Refuses, before anything is fitted, a mismatch without ``spatial`` and ``pool`` asked to enlarge."""
    return {(a, b): spatial if spatial_plan(size_a[a], size_b[b], spatial, f"pair {a}>{b}") else ""
            for a, b in pairs}


def family_nets(path: str | os.PathLike) -> list[str]:
    """Member names of a family manifest in generation order (members without a generation keep
    their manifest order, before the generations)."""
    members = read_manifest(path)
    return [m.name for m in sorted(members, key=lambda m: (m.generation is not None, m.generation or 0))]


def config_nets(cfg: ConsistencyConfig) -> list[str]:
    if cfg.nets and cfg.family:
        raise UserError("give --nets or --family, not both")
    return family_nets(cfg.family) if cfg.family else parse_csv(cfg.nets)


def _fit_diff(saved: Mapping[str, Any], want: FitConfig) -> list[str]:
    return [f"{f.name}: {saved.get(f.name)!r} (fitted) vs {getattr(want, f.name)!r} (asked)"
            for f in fields(want)
            if f.name not in RESUME_FREE and f.name in saved and saved.get(f.name) != getattr(want, f.name)]


def pair_report(pair_dir: Path, split: str) -> dict[str, Any]:
    """The held-out variance report of a finished pair: the ``variance`` command's file of ``split``
    (``variance.json`` / ``variance_<split>.json``) if present, else the fit's ``metrics.json`` (which
    holds the report of its eval split)."""
    for name in (variance_filename(split), "metrics.json"):
        p = pair_dir / name
        if p.is_file():
            rep = read_json(p)
            if rep.get("split") == split:
                return rep
    raise UserError(f"{pair_dir} holds no variance report of split {split!r} (metrics.json or variance.json); "
                    f"refit it with --overwrite or run python cli.py variance --transnet {pair_dir} --split {split}")


def _check_imported(report: Mapping[str, Any], fit: FitConfig, pair_dir: Path) -> None:
    got = (report.get("source"), report.get("target"), report.get("layer"))
    if got != (fit.source, fit.target, fit.layer):
        raise UserError(f"{pair_dir} holds an imported Trans-Net of {got[0]} -> {got[1]} at {got[2]}, but this "
                        f"folder is the pair {fit.source} -> {fit.target} at {fit.layer}")


def fit_or_reuse(fit: FitConfig, pair_dir: Path, split: str) -> tuple[dict[str, Any], bool]:
    """Fit one pair into ``pair_dir`` or reuse a finished fit with the same options; returns
    (report, reused). A finished fit with other options is an error (it is never silently mixed in).
    A finished ``import-transnet`` run is reused as it is (its options are the original code's)."""
    if is_finished(pair_dir):
        body = read_json(pair_dir / "config.json")
        if body.get("kind") == IMPORT_KIND:
            report = pair_report(pair_dir, split)
            _check_imported(report, fit, pair_dir)
            return report, True
        saved = body.get("config", {})
        diffs = _fit_diff(saved, fit)
        if diffs:
            raise UserError(f"{pair_dir} was fitted with other options ({'; '.join(diffs)}); use the same options, "
                            f"another --out_dir, or --overwrite to refit every pair")
        return pair_report(pair_dir, split), True
    fit_transnet(fit, pair_dir, fit_mode(pair_dir))
    return pair_report(pair_dir, split), False


def fit_mode(pair_dir: Path) -> str:
    """How an unfinished pair folder is fitted: resumed when something is in it, else new."""
    return "resume" if pair_dir.is_dir() and any(pair_dir.iterdir()) else "new"


def fit_together(jobs: Sequence[FitJob], choice: str, device: Any, log: Any = print) -> set[Path]:
    """Fit the unfinished pairs that train well together as groups (``transnet/group_fit.py``, ``--grouped``);
    return their folders. The others are left to :func:`fit_or_reuse`, one by one."""
    done: set[Path] = set()
    for group in plan_groups(jobs, choice, device, job_ranks().world):
        if len(group) > 1:
            log(f"fitting {len(group)} Trans-Nets together (--grouped {choice}): "
                f"{', '.join(f'{j.cfg.source}>{j.cfg.target}' for j in group)}")
            fit_group(group)
            done.update(j.out_dir for j in group)
    return done


def run_consistency(cfg: ConsistencyConfig, fit: FitConfig, out_dir: str | os.PathLike, mode: str = "new",
                    log: Any = print) -> dict[str, Any]:
    """Fit or reuse every pair of the plan, then write table.csv, table.json, matrices.json and
    metrics.json into ``out_dir``; return ``{"rows", "matrices", "nets", "pairs", "reused"}``.

    ``fit`` carries the Trans-Net options; its features/source/target/layer/eval_split are set per pair."""
    if not cfg.features or not cfg.layer:
        raise UserError("--features and --layer are required")
    check_grouped(cfg.grouped)
    check_spatial_name(cfg.spatial)
    nets, size_a, size_b = _resolve(cfg.features, cfg.layer, cfg.split, fit.train_split, config_nets(cfg),
                                    cfg.layer_b, cfg.spatial)
    if cfg.family:                              # the file's nets must be the members (by checkpoint sha256)
        for lay in dict.fromkeys((cfg.layer, cfg.layer_b)):
            check_family_features(read_manifest(cfg.family), cfg.features, cfg.split, lay,
                                  cfg.allow_other_checkpoints, cfg.family)
    pairs = plan_pairs(nets, cfg.pairs, cfg.cross)
    spatial = pair_spatial(pairs, size_a, size_b, cfg.spatial)
    device = use_device(fit.device)
    if cfg.split == fit.train_split:
        log(f"warning: --split {cfg.split} is the fits' --train_split: every report is in-sample, not held-out "
            f"(the rows say held_out false)")
    out = Path(out_dir)
    rows: list[dict[str, Any]] = []
    reused = 0
    with RunDir(out, mode) as run:
        run.write_config({"consistency": asdict(cfg), "fit": asdict(fit)}, device=device, nets=nets,
                         pairs=[list(p) for p in pairs])
        fits = [(replace(fit, features=cfg.features, source=a, target=b, layer=cfg.layer,
                         target_layer=cfg.layer_b if cfg.cross else "", spatial=spatial[(a, b)], eval_split=cfg.split),
                 out / "pairs" / pair_dirname(a, b, cfg.layer, cfg.layer_b)) for a, b in pairs]
        together = fit_together([FitJob(f, d, fit_mode(d)) for f, d in fits if not is_finished(d)], cfg.grouped,
                                device, log)
        for i, ((a, b), (pair_fit, pair_dir)) in enumerate(zip(pairs, fits), 1):
            report, was_reused = fit_or_reuse(pair_fit, pair_dir, cfg.split)
            was_reused = was_reused and pair_dir not in together
            reused += was_reused
            row = pair_row(report, os.path.relpath(pair_dir, out))
            rows.append(row)
            log(f"[{i}/{len(pairs)}] {a} -> {b}: R2 {_fmt(row['r2'])}, residual {_fmt(row['fraction_residual'])}"
                f"{' (reused)' if was_reused else ''}")
        matrices = build_matrices(rows, nets, cfg.layer, cfg.split, cfg.layer_b)
        write_tables(out, rows, matrices)
        res = [r["fraction_residual"] for r in rows if r["fraction_residual"] is not None]
        cross = ({"source_layer": cfg.layer, "target_layer": cfg.layer_b, "spatial": cfg.spatial or None,
                  "resized_pairs": [f"{a}>{b}" for (a, b), m in spatial.items() if m]}
                 if cfg.cross or any(spatial.values()) else {})
        run.finish({"layer": cfg.layer, **cross, "split": cfg.split, "nets": nets, "n_pairs": len(pairs), "reused": reused,
                    "fitted": len(pairs) - reused,
                    "mean_fraction_residual": sum(res) / len(res) if res else None,
                    "pairs_with_warnings": [f"{r['source']}>{r['target']}" for r in rows if r["warnings"]],
                    "in_sample_pairs": [f"{r['source']}>{r['target']}" for r in rows if not r["held_out"]]})
    return {"rows": rows, "matrices": matrices, "nets": nets, "pairs": pairs, "reused": reused}


def write_tables(out: Path, rows: Sequence[Mapping[str, Any]], matrices: Mapping[str, Any]) -> list[Path]:
    with atomic_write(out / "table.csv") as f:
        f.write(table_csv(rows))
    write_json(out / "table.json", {"columns": table_columns(rows), "rows": list(rows),
                                    "note": "fractions are of Var(x_B) on held-out features (rows with held_out "
                                            "false: on the training split, in-sample); the components are not "
                                            "orthogonal, so they need not sum to 1"})
    write_json(out / "matrices.json", matrices)
    return [out / "table.csv", out / "table.json", out / "matrices.json"]


def read_table(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a consistency folder's ``table.json``."""
    body = read_json(Path(folder) / "table.json")
    if not isinstance(body, dict) or "rows" not in body:
        raise UserError(f"{Path(folder) / 'table.json'} is not a consistency table (no 'rows')")
    return body["rows"]


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"

