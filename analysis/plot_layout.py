"""Axis limits fitted to the data and point labels that do not collide (used by ``analysis/plots.py``).

- :func:`fitted_limits`: the data's range (error bars included) plus a margin, never narrower than a
  minimum span, optionally clipped to a hard range (e.g. [0, 1] for a similarity);
- :func:`accuracy_limits`: an accuracy axis spanning at least ``min_span`` percentage points, so that
  half a point does not look like a crash;
- :func:`place_labels`: a greedy repel: each label tries offsets on growing rings around its point
  and takes the first whose box overlaps no point and no label already placed (a thin leader line
  joins a label moved away from its point).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.transforms import Bbox

MARGIN = 0.08                     # of the data's span, on each side
RINGS_PT = (3, 8, 14, 21, 30, 40)  # offsets tried, in points
DIRECTIONS = ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))


def fitted_limits(values: Sequence[float], lows: Sequence[float] | None = None, highs: Sequence[float] | None = None,
                  min_span: float = 0.02, clip: tuple[float, float] | None = None) -> tuple[float, float]:
    """(lo, hi) covering every finite value (and interval end), with a margin of ``MARGIN`` of the span,
    at least ``min_span`` wide, within ``clip`` when given."""
    v = np.asarray([x for x in list(values) + list(lows or []) + list(highs or []) if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    lo, hi = min(lo, mid - span / 2) - MARGIN * span, max(hi, mid + span / 2) + MARGIN * span
    if clip:
        lo, hi = max(lo, clip[0]), min(hi, clip[1])
    return lo, hi


def accuracy_limits(values: Sequence[float], min_span: float = 5.0) -> tuple[float, float] | None:
    """Limits of an accuracy axis in percent: the data's range, widened to at least ``min_span``
    points about its middle and kept within [0, 100]; None without finite values."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return None
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < min_span:
        mid = (lo + hi) / 2
        lo, hi = mid - min_span / 2, mid + min_span / 2
    pad = 0.1 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if lo < 0:
        lo, hi = 0.0, hi - lo
    if hi > 100:
        lo, hi = max(0.0, lo - (hi - 100)), 100.0
    return lo, hi


def place_labels(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str],
                 fontsize: float = 6) -> list[Any]:
    """Annotate each point with its label where the label's box overlaps no point and no other label
    (tried on rings of offsets); returns the annotations."""
    fig = ax.figure
    if fig.canvas is None or not hasattr(fig.canvas, "get_renderer"):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.draw_without_rendering()                   # settle the layout before measuring boxes
    renderer = fig.canvas.get_renderer()
    pts = ax.transData.transform(np.column_stack([xs, ys]))
    r = 3.0 * fig.dpi / 72
    taken = [Bbox.from_extents(px - r, py - r, px + r, py + r) for px, py in pts]
    frame = ax.get_window_extent(renderer)
    out = []
    for (x, y), label in zip(zip(xs, ys), labels):
        t = ax.annotate(label, (x, y), xytext=(3, 2), textcoords="offset points", fontsize=fontsize)
        best = None
        for ring in RINGS_PT:
            for dx, dy in DIRECTIONS:
                t.set_position((dx * ring, dy * ring))
                t.set_ha("left" if dx > 0 else "right" if dx < 0 else "center")
                t.set_va("bottom" if dy > 0 else "top" if dy < 0 else "center")
                box = t.get_window_extent(renderer)
                inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
                if inside and not any(box.overlaps(b) for b in taken):
                    best = (ring, box)
                    break
            if best:
                break
        if best is None:                           # nowhere free: keep the nearest offset
            t.set_position((3, 2))
            t.set_ha("left")
            t.set_va("bottom")
            best = (3, t.get_window_extent(renderer))
        elif best[0] > RINGS_PT[1]:                # moved away: a leader line back to the point
            ax.annotate("", (x, y), xytext=t.get_position(), textcoords="offset points",
                        arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "#999999", "shrinkA": 0, "shrinkB": 2})
        taken.append(best[1])
        out.append(t)
    return out
