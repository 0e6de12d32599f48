"""Consistency across a family: fit (or reuse) Trans-Nets for many pairs of nets at one layer and
collect their held-out variance reports into one tidy table and matrices.

    python cli.py consistency --features F --layer L --pairs all|chain|star:NAME|A>B,C>D [--nets a,b,c]
                              --out_dir D [--resume] [fit-transnet options: --epochs, --lr, --orders, ...]

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
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from common.device import use_device
from common.distributed import dist_from_env
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
from transnet.variance_file import variance_filename

PAIR_PLANS = ("all", "chain", "star:NAME", "A>B,C>D")
PAIR_SEP = "__"
# Fit options the consistency folder owns per pair (the rest come from the user's fit options).
PER_PAIR = ("features", "source", "target", "layer", "eval_split")
BASE_COLUMNS = ("source", "target", "layer", "split", "held_out", "n_samples", "var_target")
TAIL_COLUMNS = ("var_residual", "fraction_residual", "r2", "mse")


@dataclass(frozen=True)
class ConsistencyConfig:
    """What to compare: the feature file, one layer, the nets and the pair plan."""

    features: str = ""          # kc-features file
    layer: str = ""             # module path, e.g. features.30
    pairs: str = "all"          # all | chain | star:NAME | A>B,C>D (explicit ordered pairs)
    nets: str = ""              # comma list in family order (chain order); empty: every net of the file
    family: str = ""            # a family.json (or its folder): its members are the nets, in generation order
    split: str = "test"         # held-out split of the variance report (fits use --train_split)
    allow_other_checkpoints: bool = False   # --family: accept feature-file nets whose checkpoint is not the member's
    grouped: str = "auto"       # auto | on | off: fit pairs of one build together (transnet/group_fit.py)


# --------------------------------------------------------------------------- pair plans (pure)

def natural_key(name: str) -> list[Any]:
    """``ban_g2`` < ``ban_g10``: digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plan_pairs(nets: Sequence[str], plan: str) -> list[tuple[str, str]]:
    """Ordered (source, target) pairs of a plan over ``nets`` (kept in the given order).

    ``all``: every ordered pair; ``chain``: consecutive nets, both directions (g0→g1, g1→g0, g1→g2, ...);
    ``star:NAME``: NAME→every other and every other→NAME (teacher→student and student→teacher);
    ``A>B,C>D``: exactly these ordered pairs."""
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
            if a == b:
                raise UserError(f"--pairs item {item!r} maps a net onto itself")
            if (a, b) in pairs:
                raise UserError(f"--pairs lists {a}>{b} twice")
            pairs.append((a, b))
        return pairs
    if len(nets) < 2:
        raise UserError(f"a consistency study needs at least two nets, got {nets or 'none'}")
    if plan == "all":
        return [(a, b) for a in nets for b in nets if a != b]
    if plan == "chain":
        return [p for a, b in zip(nets, nets[1:]) for p in ((a, b), (b, a))]
    if plan.startswith("star:"):
        centre = plan.split(":", 1)[1].strip()
        if centre not in nets:
            raise UserError(f"--pairs {plan}: " + unknown_choice_message("net", centre, nets))
        return [p for n in nets if n != centre for p in ((centre, n), (n, centre))]
    raise UserError(unknown_choice_message("pair plan", plan, list(PAIR_PLANS)))


def pair_dirname(source: str, target: str) -> str:
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


def build_matrices(rows: Sequence[Mapping[str, Any]], nets: Sequence[str], layer: str, split: str) -> dict[str, Any]:
    """The ``matrices.json`` body."""
    return {"layer": layer, "split": split, "nets": list(nets), "rows": "source (A)", "columns": "target (B)",
            "note": "entry [i][j] describes nets[i] -> nets[j]; null: diagonal or pair not fitted",
            "matrices": {k: net_matrix(rows, nets, k) for k in matrix_keys(rows)},
            "pair_fractions": pair_fraction_matrix(rows)}


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

def resolve_nets(features: str, layer: str, split: str, train_split: str, nets: Sequence[str]) -> list[str]:
    """The nets to compare (given order, else every net of the file holding the layer, natural order),
    checked: the layer exists and is complete in both splits, and all maps share one spatial size."""
    with open_features(features) as f:
        splits = list_splits(f)
        for s in (split, train_split):
            if s not in splits:
                raise UserError(f"{features}: " + unknown_choice_message("split", s, splits))
        available = list_nets(f, split)
        if not nets:
            nets = sorted((n for n in available if layer in f[split][n]), key=natural_key)
            if not nets:
                layers = sorted({l for n in available for l in list_layers(f, split, n)}, key=natural_key)
                raise UserError(f"{features}: {unknown_choice_message('layer', layer, layers)} (split {split!r})")
            if len(nets) < 2:
                raise UserError(f"{features} holds layer {layer!r} for {len(nets)} net(s) in split {split!r} "
                                f"(nets: {', '.join(available) or 'none'}); a consistency study needs two or more")
        sizes = {}
        for n in nets:
            for s in dict.fromkeys((split, train_split)):
                ds = get_features(f, s, n, layer)
                if ds.ndim != 4:
                    raise UserError(f"/{s}/{n}/{layer} has shape {ds.shape}; Trans-Nets need (N, C, H, W) maps")
                sizes[n] = tuple(ds.shape[2:])
        if len(set(sizes.values())) > 1:
            raise UserError(f"the nets' maps at layer {layer!r} differ in spatial size "
                            f"({', '.join(f'{n}: {h}x{w}' for n, (h, w) in sizes.items())}); a Trans-Net keeps the "
                            f"spatial size, so compare nets with maps of one size")
    return list(nets)


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
    for group in plan_groups(jobs, choice, device, dist_from_env().world):
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
    nets = resolve_nets(cfg.features, cfg.layer, cfg.split, fit.train_split, config_nets(cfg))
    if cfg.family:                              # the file's nets must be the members (by checkpoint sha256)
        check_family_features(read_manifest(cfg.family), cfg.features, cfg.split, cfg.layer,
                              cfg.allow_other_checkpoints, cfg.family)
    pairs = plan_pairs(nets, cfg.pairs)
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
        fits = [(replace(fit, features=cfg.features, source=a, target=b, layer=cfg.layer, eval_split=cfg.split),
                 out / "pairs" / pair_dirname(a, b)) for a, b in pairs]
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
        matrices = build_matrices(rows, nets, cfg.layer, cfg.split)
        write_tables(out, rows, matrices)
        res = [r["fraction_residual"] for r in rows if r["fraction_residual"] is not None]
        run.finish({"layer": cfg.layer, "split": cfg.split, "nets": nets, "n_pairs": len(pairs), "reused": reused,
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

