"""Cross-layer Trans-Nets whose source and target maps differ in spatial size.

A Trans-Net keeps the spatial size (same-padded convs), so a pair of maps of different H x W needs a
convention. The **source** x_A is always the map resized, to the target's H x W: the Trans-Net rebuilds
x_B, and leaving x_B as it is keeps Var(x_B), the fractions and R² those of the target's real
features (comparable with same-layer rows of the same target). The conventions (``--spatial``):

- ``pool``: adaptive average pooling (torch's ``adaptive_avg_pool2d``: output cell i covers input rows
  floor(i·H/h) to ceil((i+1)·H/h)); it only shrinks, so it needs H_A >= H_B and W_A >= W_B.
- ``interpolate``: bilinear resampling, half-pixel centres, no antialiasing (torch's
  ``interpolate(mode="bilinear", align_corners=False)``); either direction.

Without a convention (``""``) a mismatch is refused, naming both sizes and the choices. Unlike the
``similarity`` command's ``--spatial`` (every net to the smallest H x W of the compared nets), only the
source moves here. Resizing runs in float32 (float64 stays float64) and returns the input's dtype.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from common.errors import UserError
from common.registry import unknown_choice_message
from transnet.config import SPATIAL  # re-exported: its old home

RULES = {"pool": "adaptive average pooling of the source to the target's H x W",
         "interpolate": "bilinear interpolation (half-pixel centres, align_corners=False) of the source to the "
                        "target's H x W"}


def check_spatial_name(mode: str) -> str:
    """``mode`` if it is ``""`` (no convention) or one of SPATIAL; else a UserError naming the choices."""
    if mode and mode not in SPATIAL:
        raise UserError(unknown_choice_message("--spatial", mode, list(SPATIAL)))
    return mode


def spatial_plan(size_a: Sequence[int], size_b: Sequence[int], mode: str, what: str = "") -> dict[str, Any] | None:
    """The record of how the source (H_A, W_A) meets the target (H_B, W_B): None when they agree (nothing
    is resized, whatever ``mode``), else ``{"spatial", "source_size", "target_size", "spatial_rule"}``.
    A mismatch without ``mode``, or ``pool`` asked to enlarge, is a UserError (``what`` names the pair)."""
    check_spatial_name(mode)
    a, b = [int(v) for v in size_a], [int(v) for v in size_b]
    if a == b:
        return None
    where = f"{what}: " if what else ""
    sizes = f"source maps {a[0]}x{a[1]}, target maps {b[0]}x{b[1]}"
    if not mode:
        raise UserError(f"{where}{sizes}; a Trans-Net keeps the spatial size, so give --spatial "
                        f"{'|'.join(SPATIAL)} to resize the source to the target's size")
    if mode == "pool" and (a[0] < b[0] or a[1] < b[1]):
        raise UserError(f"{where}{sizes}; --spatial pool only shrinks the source (adaptive average pooling), "
                        f"use --spatial interpolate to enlarge it")
    return {"spatial": mode, "source_size": a, "target_size": b, "spatial_rule": RULES[mode]}


def resize_maps(x: Tensor, size: Sequence[int], mode: str) -> Tensor:
    """x: (N, C, H, W) -> (N, C, h, w) by ``mode`` (pool | interpolate), in x's dtype and device (computed
    in float32, or float64 for float64 input)."""
    h, w = int(size[0]), int(size[1])
    if tuple(x.shape[2:]) == (h, w):
        return x
    xf = x if x.dtype == torch.float64 else x.float()
    if mode == "pool":
        y = F.adaptive_avg_pool2d(xf, (h, w))
    elif mode == "interpolate":
        y = F.interpolate(xf, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    else:
        raise UserError(unknown_choice_message("--spatial", mode, list(SPATIAL)))
    return y.to(x.dtype)                                    # (N, C, h, w)


def require_same_layer(info: dict[str, Any], what: str) -> None:
    """Refuse a cross-layer Trans-Net (``load_transnet`` info) in a command that reads one layer."""
    if info.get("target_layer"):
        raise UserError(f"{what} reads source and target at one layer, but the Trans-Net {info.get('path')} maps "
                        f"{info.get('source')} at {info.get('layer')} to {info.get('target')} at "
                        f"{info['target_layer']} (a cross-layer fit); use python cli.py variance on it")
