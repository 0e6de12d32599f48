"""Every figure of the workbench, in one style; each writes PNG + SVG and returns the written paths.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI backend), so
they work headless, in tests and in notebooks alike. Inputs are plain arrays and row dicts: the
numbers are computed elsewhere (``analysis.consistency``, ``analysis.diagnose``), this module only
draws them.

Conventions shared by all figures:

- fractions of variance, R² and similarities use one sequential colour map with its scale fitted to
  the values shown (so 0.13 to 0.28 is not one flat colour), always with a colour bar and the values
  written in the cells; axes of scatters and accuracies are fitted to the data
  (``analysis/plot_layout.py``);
- signed feature maps (x_B, ŷ, Y_k, residual) use a diverging map with one symmetric scale per
  channel, shared across the columns of that channel;
- order k always has the same colour; the residual (inconsistent part) is grey;
- a value that is missing is drawn as a hatched/grey cell labelled ``n/a``, never as 0.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.lines
import matplotlib.patches
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.plot_layout import accuracy_limits, fitted_limits, place_labels

# --------------------------------------------------------------------------- style

STYLE: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "savefig.dpi": 120,
    "savefig.bbox": "tight",
    "svg.fonttype": "none",          # text stays text in SVG
    "svg.hashsalt": "kc-workbench",  # deterministic SVG ids
}
FRACTION_CMAP = "viridis"            # fractions, R², similarities: scale fitted to the values
DISTANCE_CMAP = "magma_r"            # distances >= 0 (Procrustes): scale from 0 to the maximum
SIGNED_CMAP = "RdBu_r"               # feature maps: symmetric scale per channel
ENERGY_CMAP = "inferno"              # residual energy maps (>= 0)
ORDER_COLOURS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
RESIDUAL_COLOUR = "#9a9a9a"
MISSING_COLOUR = "#e8e8e8"
FRACTION_LIMITS = (0.0, 1.0)
FORMATS = ("png", "svg")


def order_colour(k: int) -> str:
    return ORDER_COLOURS[k % len(ORDER_COLOURS)]


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The workbench style for the figures built inside the block."""
    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, out_base: str | os.PathLike, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write ``out_base.png`` and ``out_base.svg`` (atomically: ``*.tmp`` then rename); return the paths."""
    out_base = Path(out_base)
    out_base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    with style():
        for fmt in formats:
            path = out_base.with_name(out_base.name + "." + fmt)
            tmp = path.with_name(path.name + ".tmp")
            fig.savefig(tmp, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
            os.replace(tmp, path)
            paths.append(path)
    return paths


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


# --------------------------------------------------------------------------- heatmaps

def matrix_heatmap(matrix: Sequence[Sequence[float | None]], labels: Sequence[str], out_base: str | os.PathLike,
                   title: str, value_label: str, kind: str = "fraction", row_title: str = "source (A)",
                   col_title: str = "target (B)", col_labels: Sequence[str] | None = None,
                   marks: Sequence[Sequence[bool]] | None = None) -> list[Path]:
    """A labelled matrix. ``kind``: ``fraction`` (colour scale fitted to the values), ``distance`` (0 to max),
    ``signed`` (symmetric about 0). ``None`` cells are grey and marked n/a (e.g. the diagonal).
    Cells where ``marks`` is true get a dagger (†) after their value: a fit not converged."""
    import seaborn as sns

    if kind not in ("fraction", "distance", "signed"):
        raise ValueError(f"unknown heatmap kind {kind!r}; valid: fraction, distance, signed")
    m = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    col_labels = list(col_labels) if col_labels is not None else list(labels)
    if m.shape != (len(labels), len(col_labels)):
        raise ValueError(f"matrix of shape {m.shape} does not match {len(labels)} row and "
                         f"{len(col_labels)} column labels")
    finite = m[np.isfinite(m)]
    if kind == "fraction":
        vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else FRACTION_LIMITS
        if vmax - vmin < 0.02:                   # one value: a narrow band around it, not a blank scale
            vmin, vmax = vmin - 0.01, vmax + 0.01
        cmap = FRACTION_CMAP
    elif kind == "distance":
        vmin, vmax, cmap = 0.0, float(finite.max()) if finite.size and finite.max() > 0 else 1.0, DISTANCE_CMAP
    else:
        a = float(np.abs(finite).max()) if finite.size else 1.0
        vmin, vmax, cmap = -a, a, SIGNED_CMAP
    n_r, n_c = m.shape
    with style():
        fig = new_figure(max(4.2, 2.2 + 0.62 * n_c), max(3.0, 1.4 + 0.5 * n_r))
        ax = fig.add_subplot()
        ax.set_facecolor(MISSING_COLOUR)
        mk = np.zeros(m.shape, bool) if marks is None else np.array(marks, dtype=bool)
        annot = np.array([["n/a" if not np.isfinite(v) else f"{v:.2f}" + ("†" if f else "") for v, f in zip(row, fr)]
                          for row, fr in zip(m, mk)])
        sns.heatmap(m, ax=ax, vmin=vmin, vmax=vmax, cmap=cmap, annot=annot if n_r * n_c <= 400 else False,
                    fmt="", square=n_r == n_c, linewidths=0.5, linecolor="white",
                    xticklabels=col_labels, yticklabels=list(labels), cbar_kws={"label": value_label},
                    annot_kws={"fontsize": 7})
        for j, i in zip(*np.nonzero(~np.isfinite(m).T)):  # n/a labels on missing cells
            ax.text(j + 0.5, i + 0.5, "n/a", ha="center", va="center", fontsize=7, color="#666666")
        ax.set_xlabel(col_title)
        ax.set_ylabel(row_title)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
        for t in ax.get_xticklabels():
            t.set_ha("right")
        ax.tick_params(axis="y", rotation=0)
        return save_figure(fig, out_base)


# --------------------------------------------------------------------------- order fractions

def order_fraction_bars(rows: Sequence[Mapping[str, Any]], out_base: str | os.PathLike,
                        title: str = "Variance of each target per order (the paper's Var(Y_k))") -> list[Path]:
    """Grouped (side-by-side, not stacked) bars per pair (A→B): Var(Y_k) / Var(x_B) for each order k
    and the residual fraction. The components overlap, so the bars are not parts of a whole; the
    additive view is :func:`additive_share_bars`. ``<key>_ci`` columns, when present, draw as error bars."""
    if not rows:
        raise ValueError("no pairs to plot")
    n_orders = max(_n_orders(r) for r in rows)
    keys = [f"fraction_order{k}" for k in range(n_orders)] + ["fraction_residual"]
    names = [f"order {k}" for k in range(n_orders)] + ["residual (inconsistent)"]
    colours = [order_colour(k) for k in range(n_orders)] + [RESIDUAL_COLOUR]
    x = np.arange(len(rows))
    w = 0.8 / len(keys)
    with style():
        fig = new_figure(max(4.5, 1.4 + 0.22 * len(rows) * len(keys)), 3.4)
        ax = fig.add_subplot()
        for i, (key, name, colour) in enumerate(zip(keys, names, colours)):
            v = np.array([_num(r.get(key)) for r in rows])
            ax.bar(x + (i - (len(keys) - 1) / 2) * w, np.nan_to_num(v), width=w, color=colour, label=name,
                   yerr=_ci_err(rows, key, v), error_kw={"elinewidth": 0.6, "capsize": 1.5})
        ax.axhline(1.0, color="black", lw=0.8, ls=":")
        ax.set_xticks(x, [pair_label(r) for r in rows], rotation=45, ha="right")
        ax.set_ylabel("Var(Y_k) / Var(x_B)")
        ax.set_ylim(0, max(1.05, float(np.nanmax([_num(r.get(k)) for r in rows for k in keys] + [0])) * 1.1))
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        fig.text(0.0, -0.02, "the components overlap: these fractions are not shares and need not add up to 1",
                 fontsize=7, color="#555555")
        return save_figure(fig, out_base)


def additive_share_bars(rows: Sequence[Mapping[str, Any]], out_base: str | os.PathLike,
                        title: str = "Share of each target's variance added by each order") -> list[Path]:
    """Stacked bars per pair (A→B) of the additive shares (``additive_shares``: R² of Y0, then the gain of
    adding Y1, then Y2, ...) topped by the unexplained part 1 − R², so a bar reaches exactly 1. A negative
    gain (an order that makes the partial reconstruction worse) is drawn below 0."""
    rows = [r for r in rows if r.get("additive_shares")]
    if not rows:
        raise ValueError("no pairs with additive shares to plot")
    n = max(len(r["additive_shares"]) for r in rows)
    x = np.arange(len(rows))
    with style():
        fig = new_figure(max(4.0, 1.2 + 0.45 * len(rows)), 3.4)
        ax = fig.add_subplot()
        up, down = np.zeros(len(rows)), np.zeros(len(rows))
        for k in range(n):
            v = np.array([_num(r["additive_shares"][k]) if k < len(r["additive_shares"]) else 0.0 for r in rows])
            v = np.nan_to_num(v)
            base = np.where(v >= 0, up, down)
            ax.bar(x, v, bottom=base, color=order_colour(k), width=0.75,
                   label="order 0 alone (R² of Y0)" if k == 0 else f"added by order {k}")
            up, down = np.where(v >= 0, up + v, up), np.where(v < 0, down + v, down)
        unexplained = np.array([1.0 - float(np.nansum(r["additive_shares"])) for r in rows])
        ax.bar(x, unexplained, bottom=up, color=RESIDUAL_COLOUR, width=0.75, hatch="//", edgecolor="white",
               linewidth=0, label="unexplained (1 − R²)")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xticks(x, [pair_label(r) for r in rows], rotation=45, ha="right")
        ax.set_ylabel("share of Var(x_B)")
        ax.set_ylim(min(0.0, float(down.min())) - 0.05, max(1.05, float((up + unexplained).max()) + 0.05))
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        fig.text(0.0, -0.02, "sequential: each order's gain in R² over the orders below it; the shares add up to R²",
                 fontsize=7, color="#555555")
        return save_figure(fig, out_base)


def _ci_err(rows: Sequence[Mapping[str, Any]], key: str, v: np.ndarray) -> np.ndarray | None:
    """(2, n) error-bar lengths from the rows' ``<key>_ci`` intervals (None when no row has one)."""
    cis = [r.get(f"{key}_ci") for r in rows]
    if not any(cis):
        return None
    lo = np.array([c[0] if c else np.nan for c in cis], dtype=float)
    hi = np.array([c[1] if c else np.nan for c in cis], dtype=float)
    return np.nan_to_num(np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)]))


def pair_label(row: Mapping[str, Any]) -> str:
    """``A→B``, with a dagger when the row's fit is not converged."""
    return f"{row['source']}→{row['target']}" + (" †" if row.get("convergence") == "not converged" else "")


def _n_orders(row: Mapping[str, Any]) -> int:
    return sum(1 for k in range(64) if f"fraction_order{k}" in row and row[f"fraction_order{k}"] is not None)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


# --------------------------------------------------------------------------- curves

def generation_curves(rows: Sequence[Mapping[str, Any]], out_base: str | os.PathLike,
                      title: str = "Generations") -> list[Path]:
    """Accuracy (dense and slim) and residual fractions (to the previous / to the first generation)
    over generations. ``rows``: ``generation`` plus any of ``test_top1``, ``slim_test_top1``,
    ``residual_to_previous``, ``residual_to_first``; missing values leave gaps."""
    if not rows:
        raise ValueError("no generations to plot")
    rows = sorted(rows, key=lambda r: r["generation"])
    g = np.array([r["generation"] for r in rows])
    with style():
        fig = new_figure(7.5, 3.0)
        ax1, ax2 = fig.subplots(1, 2)
        for key, lab, c in (("test_top1", "dense net", ORDER_COLOURS[0]), ("slim_test_top1", "slim net", ORDER_COLOURS[1])):
            v = np.array([_num(r.get(key)) for r in rows])
            if np.isfinite(v).any():
                ax1.plot(g, v, "o-", color=c, label=lab)
        lim = accuracy_limits([_num(r.get(k)) for r in rows for k in ("test_top1", "slim_test_top1")])
        if lim:
            ax1.set_ylim(*lim)
        ax1.set_xlabel("generation")
        ax1.set_ylabel("test top-1 (%)")
        ax1.set_title("accuracy")
        ax1.legend(frameon=False)
        for key, lab, c in (("residual_to_previous", "to previous generation", ORDER_COLOURS[2]),
                            ("residual_to_first", "to first generation", ORDER_COLOURS[3])):
            v = np.array([_num(r.get(key)) for r in rows])
            if np.isfinite(v).any():
                ax2.plot(g, v, "s-", color=c, label=lab)
        res = [_num(r.get(k)) for r in rows for k in ("residual_to_previous", "residual_to_first")]
        ax2.set_ylim(*fitted_limits(res, min_span=0.1, clip=(0.0, np.inf)))
        ax2.set_xlabel("generation")
        ax2.set_ylabel("residual fraction of Var(x_g)")
        ax2.set_title("inconsistent knowledge")
        if ax2.get_legend_handles_labels()[1]:
            ax2.legend(frameon=False)
        else:
            ax2.text(0.5, 0.5, "no Trans-Net between generations", ha="center", va="center",
                     transform=ax2.transAxes, color="0.5")
        for ax in (ax1, ax2):
            ax.set_xticks(g)
        fig.suptitle(title)
        return save_figure(fig, out_base)


def training_curves(histories: Mapping[str, Sequence[Mapping[str, Any]]], out_base: str | os.PathLike,
                    title: str = "Training curves") -> list[Path]:
    """Train loss and test top-1 per epoch for each run (``log.jsonl`` records)."""
    if not histories:
        raise ValueError("no training histories to plot")
    with style():
        fig = new_figure(7.5, 3.0)
        ax1, ax2 = fig.subplots(1, 2)
        for i, (name, hist) in enumerate(histories.items()):
            c = order_colour(i)
            ep = [h["epoch"] for h in hist if h.get("train_loss") is not None]
            ax1.plot(ep, [h["train_loss"] for h in hist if h.get("train_loss") is not None], "-", color=c, label=name)
            ev = [h for h in hist if h.get("test_top1") is not None]
            ax2.plot([h["epoch"] for h in ev], [h["test_top1"] for h in ev], "o-", ms=3, color=c, label=name)
        for ax in (ax1, ax2):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.set_xlabel("epoch")
        ax1.set_ylabel("train loss")
        lim = accuracy_limits([h["test_top1"] for hist in histories.values() for h in hist
                               if h.get("test_top1") is not None])
        if lim:
            ax2.set_ylim(*lim)
        ax2.set_xlabel("epoch")
        ax2.set_ylabel("test top-1 (%)")
        ax2.legend(frameon=False, loc="lower right", fontsize=7)
        fig.suptitle(title)
        return save_figure(fig, out_base)


def agreement_scatter(points: Sequence[Mapping[str, Any]], out_base: str | os.PathLike, x_label: str,
                      y_label: str, title: str) -> list[Path]:
    """One point per net pair: a similarity baseline (x) against Trans-Net consistency (y), with the
    bootstrap intervals (``x_ci``, ``y_ci``) as error bars, axes fitted to the data, and the pair names
    placed where they do not collide. A pair that cannot carry a conclusion (``usable`` false) is hollow."""
    if not points:
        raise ValueError("no points to plot")
    x = np.array([_num(p["x"]) for p in points])
    y = np.array([_num(p["y"]) for p in points])
    xerr, yerr = (_point_err(points, k, v) for k, v in (("x_ci", x), ("y_ci", y)))
    with style():
        fig = new_figure(4.6, 4.0)
        ax = fig.add_subplot()
        ok = np.array([p.get("usable") is not False for p in points])
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="none", ecolor="#9ab", elinewidth=0.7, capsize=1.5, zorder=2)
        ax.scatter(x[ok], y[ok], color=ORDER_COLOURS[0], s=22, zorder=3, label="usable pair")
        if (~ok).any():
            ax.scatter(x[~ok], y[~ok], facecolor="white", edgecolor=ORDER_COLOURS[5], s=22, zorder=3,
                       label="not converged or R² < 0")
            ax.legend(frameon=False, fontsize=7, loc="best")
        lows = lambda v, e: None if e is None else list(v - e[0])   # noqa: E731
        highs = lambda v, e: None if e is None else list(v + e[1])  # noqa: E731
        ax.set_xlim(*fitted_limits(x, lows(x, xerr), highs(x, xerr), clip=(-0.05, 1.05)))
        ax.set_ylim(*fitted_limits(y, lows(y, yerr), highs(y, yerr), clip=(-np.inf, 1.05)))
        lo, hi = max(ax.get_xlim()[0], ax.get_ylim()[0]), min(ax.get_xlim()[1], ax.get_ylim()[1])
        if lo < hi:
            ax.plot([lo, hi], [lo, hi], ":", color="#888888", lw=0.8, zorder=1)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(title)
        place_labels(ax, x, y, [p["label"] for p in points])
        return save_figure(fig, out_base)


def _point_err(points: Sequence[Mapping[str, Any]], key: str, v: np.ndarray) -> np.ndarray | None:
    cis = [p.get(key) for p in points]
    if not any(cis):
        return None
    lo = np.array([c[0] if c else x for c, x in zip(cis, v)], dtype=float)
    hi = np.array([c[1] if c else x for c, x in zip(cis, v)], dtype=float)
    return np.nan_to_num(np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)]))


def pair_value_bars(rows: Sequence[Mapping[str, Any]], key: str, groups: Mapping[str, str],
                    out_base: str | os.PathLike, title: str, value_label: str) -> list[Path]:
    """One bar per directed pair (A→B) of ``key``, grouped by ``groups[label]`` (e.g. the family of the
    pair), with ``<key>_ci`` error bars; for a plan whose net x net matrix would be mostly empty cells."""
    if not rows:
        raise ValueError("no pairs to plot")
    order = sorted(range(len(rows)), key=lambda i: (groups.get(pair_label(rows[i]).rstrip(" †"), ""), i))
    rows = [rows[i] for i in order]
    names = [groups.get(pair_label(r).rstrip(" †"), "") for r in rows]
    v = np.array([_num(r.get(key)) for r in rows])
    uniq = list(dict.fromkeys(names))
    with style():
        fig = new_figure(max(4.0, 1.4 + 0.32 * len(rows)), 3.3)
        ax = fig.add_subplot()
        x = np.arange(len(rows))
        ax.bar(x, np.nan_to_num(v), color=[order_colour(uniq.index(n)) for n in names], width=0.7,
               yerr=_ci_err(rows, key, v), error_kw={"elinewidth": 0.6, "capsize": 1.5})
        for n in uniq:
            idx = [i for i, m in enumerate(names) if m == n]
            ax.bar([], [], color=order_colour(uniq.index(n)), label=n or "other")
            if uniq.index(n) % 2:                 # alternate shading marks the groups
                ax.axvspan(min(idx) - 0.5, max(idx) + 0.5, color="#f4f4f4", zorder=0)
        ax.set_xticks(x, [pair_label(r) for r in rows], rotation=45, ha="right")
        ax.set_ylabel(value_label)
        lo, hi = fitted_limits(v, clip=None)
        ax.set_ylim(min(0.0, lo), max(hi, 0.0))
        ax.set_title(title)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, title="group")
        return save_figure(fig, out_base)


VERDICT_COLOURS = {"converged": "#009E73", "not converged": "#D55E00", "unknown": "#777777"}


def loss_curves(series: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], verdicts: Mapping[str, str],
                out_base: str | os.PathLike, title: str = "Trans-Net loss curves", ncols: int = 4) -> list[Path]:
    """Small multiples, one panel per fit: train loss (and validation loss, when logged) per epoch on a
    log scale, each panel titled with the fit's convergence verdict (coloured: converged green, not
    converged orange-red, unknown grey). ``series``: label -> {"train": [(epoch, loss)], "val": [...]}."""
    if not series:
        raise ValueError("no loss curves to plot")
    n = len(series)
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    with style():
        fig = new_figure(1.9 * ncols + 0.4, 1.55 * nrows + 0.5)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (label, s) in zip(axes, series.items()):
            for key, colour, ls in (("train", ORDER_COLOURS[0], "-"), ("val", ORDER_COLOURS[1], "--")):
                pts = s.get(key) or []
                if pts:
                    e, v = zip(*pts)
                    ax.plot(e, v, ls, color=colour, lw=1.0, label=key)
            vals = [v for pts in s.values() for _, v in pts]
            if vals and min(vals) > 0:
                ax.set_yscale("log")
            verdict = verdicts.get(label, "unknown")
            ax.set_title(f"{label}\n{verdict}", fontsize=7, color=VERDICT_COLOURS.get(verdict, "#777777"))
            ax.tick_params(labelsize=6)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
        for ax in axes[n:]:
            ax.set_axis_off()
        handles, labels = axes[0].get_legend_handles_labels()
        if any("val" in s for s in series.values()) and "val" not in labels:
            handles.append(matplotlib.lines.Line2D([], [], ls="--", color=ORDER_COLOURS[1]))
            labels.append("val")
        fig.legend(handles, ["train loss" if l == "train" else "validation loss" for l in labels],
                   loc="outside lower center", ncols=2, frameon=False, fontsize=7)
        fig.supxlabel("epoch", fontsize=8)
        fig.suptitle(title)
        return save_figure(fig, out_base)


# --------------------------------------------------------------------------- Fig. 1 panel

def decomposition_panel(panel: Mapping[str, Any], out_base: str | os.PathLike, title: str = "") -> list[Path]:
    """The paper's Fig. 1 for chosen images and channels.

    ``panel`` (see ``analysis.diagnose.panel_for_rows``): ``images`` (n, H, W[, 3]) or None,
    ``x_a`` (n, C_a, h, w), ``x_b``/``yhat``/``residual`` (n, C, h, w), ``components`` (K+1, n, C, h, w),
    ``gates`` (K,), ``rows`` (n,) feature-file rows, ``channels`` (list of target channels),
    ``source``/``target`` names. One figure row per (image, channel); columns: image, x_A (RMS over
    channels, own scale), x_B, ŷ, Y0..YK, residual, all target-space maps on one symmetric scale per
    row (its colour bar at the right). The gates p_k (order 1 first) are drawn as bars below.
    """
    x_a, x_b, yhat = np.asarray(panel["x_a"]), np.asarray(panel["x_b"]), np.asarray(panel["yhat"])
    comps, resid = np.asarray(panel["components"]), np.asarray(panel["residual"])
    gates = np.asarray(panel.get("gates", []), dtype=float)
    images = panel.get("images")
    channels = list(panel["channels"])
    n = x_b.shape[0]
    src, tgt = panel.get("source", "A"), panel.get("target", "B")
    cols = (["image", f"{src}: x_A\n(RMS over ch.)", f"{tgt}: x_B", "ŷ = ΣY_k"]
            + [f"Y{k} (order {k})" for k in range(comps.shape[0])] + ["residual\nx_B − ŷ"])
    n_rows = n * len(channels)
    with style():
        # No layout engine: fixed margins keep this many-axes figure fast to draw.
        fig = Figure(figsize=(1.15 * len(cols) + 0.8, 1.2 * n_rows + 1.6))
        grid = fig.add_gridspec(n_rows + 1, len(cols), height_ratios=[1] * n_rows + [0.7], left=0.06,
                                right=0.92, top=1 - 0.5 / fig.get_figheight(), bottom=0.06, wspace=0.08, hspace=0.25)
        for i in range(n):
            a_rms = np.sqrt((x_a[i].astype(np.float64) ** 2).mean(axis=0))
            for j, c in enumerate(channels):
                r = i * len(channels) + j
                maps = [x_b[i, c], yhat[i, c]] + [comps[k, i, c] for k in range(comps.shape[0])] + [resid[i, c]]
                lim = max(float(np.abs(mp).max()) for mp in maps) or 1.0
                for col, name in enumerate(cols):
                    ax = fig.add_subplot(grid[r, col])
                    ax.set_axis_off()
                    if col == 0:
                        _show_image(ax, None if images is None else images[i])
                        ax.text(-0.08, 0.5, f"row {int(panel['rows'][i])}\nch {c}", transform=ax.transAxes,
                                ha="right", va="center", fontsize=7)
                    elif col == 1:
                        ax.imshow(a_rms, cmap=ENERGY_CMAP, vmin=0)
                    else:
                        im = ax.imshow(maps[col - 2], cmap=SIGNED_CMAP, vmin=-lim, vmax=lim)
                    if r == 0:
                        ax.set_title(name, fontsize=7)
                cax = ax.inset_axes([1.06, 0.0, 0.08, 1.0])
                fig.colorbar(im, cax=cax).ax.tick_params(labelsize=6)
        gax = fig.add_subplot(grid[n_rows, 1:4])
        ks = np.arange(len(gates))
        gax.barh(ks, gates, color=[order_colour(k + 1) for k in ks], height=0.6)
        gax.set_xlim(*FRACTION_LIMITS)
        gax.set_yticks(ks, [f"p{k + 1} (order {k + 1})" for k in ks], fontsize=7)
        gax.set_xlabel("gate value", fontsize=7)
        gax.tick_params(axis="x", labelsize=6)
        if title:
            fig.suptitle(title, fontsize=9)
        return save_figure(fig, out_base)


def _show_image(ax: Any, img: np.ndarray | None) -> None:
    if img is None:
        ax.text(0.5, 0.5, "image not\navailable", ha="center", va="center", fontsize=6, transform=ax.transAxes)
        ax.add_patch(matplotlib.patches.Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, lw=0.5))
        return
    img = np.asarray(img, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1)


# --------------------------------------------------------------------------- diagnosis

def residual_energy_figure(diag: Mapping[str, Any], out_base: str | os.PathLike, top: int = 32) -> list[Path]:
    """Blind spots and unreliable features: per-channel relative residual energy of both directions
    (the ``top`` largest, sorted) and the per-position residual energy maps.

    ``diag`` is the dict of ``analysis.diagnose.diagnose_pair``: ``a``, ``b``, and ``blind_spots`` /
    ``unreliable`` each with ``channel_relative`` (C,) and ``position_relative`` (H, W)."""
    parts = [("blind_spots", f"blind spots of {diag['a']}: x_{diag['b']} not rebuilt from x_{diag['a']}"),
             ("unreliable", f"unreliable features of {diag['a']}: x_{diag['a']} not rebuilt from x_{diag['b']}")]
    with style():
        fig = new_figure(8.5, 5.6)
        grid = fig.add_gridspec(2, 2, width_ratios=[2.2, 1])
        for r, (key, label) in enumerate(parts):
            d = diag[key]
            ch = np.asarray(d["channel_relative"], dtype=float)
            order = np.argsort(-ch)[:top]
            ax = fig.add_subplot(grid[r, 0])
            ax.bar(np.arange(len(order)), ch[order], color=RESIDUAL_COLOUR if r else ORDER_COLOURS[5])
            ax.set_xticks(np.arange(len(order)), [str(int(c)) for c in order], rotation=90, fontsize=6)
            ax.set_ylim(0, max(1.0, float(ch.max()) * 1.05))
            ax.axhline(1.0, color="black", lw=0.6, ls=":")
            ax.set_xlabel("channel (largest first)")
            ax.set_ylabel("residual / channel variance")
            ax.set_title(label, fontsize=8)
            pax = fig.add_subplot(grid[r, 1])
            pos = np.asarray(d["position_relative"], dtype=float)
            lo, hi = float(np.nanmin(pos)), float(np.nanmax(pos))
            im = pax.imshow(pos, cmap=ENERGY_CMAP, vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
            pax.set_xticks([])
            pax.set_yticks([])
            pax.set_title("per position", fontsize=8)
            fig.colorbar(im, ax=pax, fraction=0.046, pad=0.04, label="residual / variance")
        return save_figure(fig, out_base)

