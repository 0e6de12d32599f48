"""A common H x W for comparing layers of different spatial size position by position
(``--cca_features positions``): ``--spatial pool`` averages each net down to the smallest H x W of the
compared nets (adaptive average pooling: output cell i covers input rows floor(i·H/h) to
ceil((i+1)·H/h), as torch's ``adaptive_avg_pool2d``); ``--spatial interpolate`` resamples bilinearly
to it (half-pixel centres, no antialiasing, as torch's ``interpolate(mode="bilinear",
align_corners=False)``), with the Trans-Net's resampler (transnet/spatial.py). The result is held in the
net's storage dtype (its rounding stays what the rank tolerance expects).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from analysis.sources import as_source, row_blocks
from common.errors import UserError
from common.registry import unknown_choice_message
from transnet.config import SPATIAL  # re-exported: one owner of the names (transnet/config.py)
from transnet.spatial import resize_maps


def resize(x: Any, size: tuple[int, int], mode: str) -> np.ndarray:
    """(N, C, H, W) features brought to ``size`` (h, w), in their storage dtype, read block by block. The
    resampling is the Trans-Net's (:func:`transnet.spatial.resize_maps`, the one owner of both rules), run
    in float64 on each block."""
    if mode not in SPATIAL:
        raise UserError(unknown_choice_message("--spatial", mode, list(SPATIAL)))
    src = as_source(x)
    n, c, hh, ww = (int(v) for v in src.shape)
    out = np.empty((n, c) + tuple(size), dtype=src.dtype)
    s = 0
    for blk in row_blocks(src):
        b = len(blk)
        out[s:s + b] = resize_maps(torch.from_numpy(blk.reshape(b, c, hh, ww)), size, mode).numpy()
        s += b
    return out


def common_size(sources: Sequence[Any]) -> tuple[int, int]:
    """The smallest H and W over the (N, C, H, W) sources."""
    shapes = [as_source(s).shape for s in sources]
    if any(len(sh) != 4 for sh in shapes):
        raise UserError(f"--spatial needs (N, C, H, W) features; shapes: {[tuple(sh) for sh in shapes]}")
    return min(int(sh[2]) for sh in shapes), min(int(sh[3]) for sh in shapes)


def to_common_size(sources: Sequence[Any], names: Sequence[str], mode: str
                   ) -> tuple[list[Any], dict[str, Any] | None]:
    """The sources at a common H x W (unchanged when they already agree), and the record for
    ``similarity.json`` (None when nothing was resized)."""
    if mode not in SPATIAL:
        raise UserError(unknown_choice_message("--spatial", mode, list(SPATIAL)))
    size = common_size(sources)
    shapes = {name: [int(v) for v in as_source(s).shape[2:]] for name, s in zip(names, sources)}
    if all(tuple(sh) == size for sh in shapes.values()):
        return list(sources), None
    out = [s if tuple(shapes[name]) == size else resize(s, size, mode) for name, s in zip(names, sources)]
    how = ("adaptive average pooling" if mode == "pool" else "bilinear interpolation (half-pixel centres)")
    return out, {"mode": mode, "size": list(size), "from": shapes,
                 "rule": f"every net brought to the smallest H x W of the compared nets by {how}"}
