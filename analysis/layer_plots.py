"""The layer x layer heatmap (Kornblith et al. 2019, Fig. 2 style): one metric between every layer of
the row net and every layer of the column net, the first layer at the bottom left.

The colour scale is fitted to the computed cells (a colour bar says what it spans); refused pairs
are blank with a footnote, undefined values grey and marked n/a, never drawn as a value.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analysis.plots import DISTANCE_CMAP, FRACTION_CMAP, MISSING_COLOUR, new_figure, save_figure, style


def layer_heatmap(matrix: Sequence[Sequence[float | None]], layers: Sequence[str], out_base: str | os.PathLike, *,
                  metric: str, direction: str = "similarity", row_net: str = "A", column_net: str = "B",
                  refused: Sequence[dict] = (), column_layers: Sequence[str] | None = None) -> list[Path]:
    """Draw ``matrix`` (rows: ``row_net``'s layers, columns: ``column_net``'s) and write PNG + SVG."""
    cols = list(column_layers or layers)
    m = np.array([[np.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    if m.shape != (len(layers), len(cols)):
        raise ValueError(f"matrix of shape {m.shape} does not match {len(layers)} x {len(cols)} layers")
    blank = {tuple(e["pair"]) for e in refused}
    finite = m[np.isfinite(m)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5e-3, hi + 0.5e-3
    cmap = FRACTION_CMAP if direction == "similarity" else DISTANCE_CMAP
    n_r, n_c = m.shape
    with style():
        fig = new_figure(max(3.6, 1.9 + 0.55 * n_c), max(3.0, 1.5 + 0.5 * n_r))
        ax = fig.add_subplot()
        ax.set_facecolor(MISSING_COLOUR)
        im = ax.imshow(np.ma.masked_invalid(m), origin="lower", cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        fig.colorbar(im, ax=ax, label=f"{metric} ({direction}; scale fitted to the data)")
        if n_r * n_c <= 144:
            for i in range(n_r):
                for j in range(n_c):
                    text = ("" if (i, j) in blank else "n/a" if not np.isfinite(m[i, j]) else f"{m[i, j]:.2f}")
                    dark = np.isfinite(m[i, j]) and (m[i, j] - lo) / (hi - lo) < 0.5
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if dark and direction == "similarity" else "black")
        ax.set_xticks(range(n_c), cols, rotation=45, ha="right")
        ax.set_yticks(range(n_r), list(layers))
        ax.set_xlabel(f"{column_net}: layer")
        ax.set_ylabel(f"{row_net}: layer")
        ax.set_title(f"{metric}, layer x layer" + ("" if row_net == column_net else f": {row_net} vs {column_net}"))
        if blank:
            reasons = sorted({e["reason"] for e in refused})
            fig.text(0.01, -0.02, "blank: refused, " + "; ".join(r[:120] for r in reasons), fontsize=6, va="top",
                     wrap=True)
        return save_figure(fig, out_base)
