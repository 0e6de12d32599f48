"""Layer outputs that are not (N, C, H, W) maps, made into maps: the one place that converts them.

- **Token sequences** (N, T, C) of ViT/DeiT blocks: the first ``P`` tokens are prefix tokens (class,
  distillation, register tokens; timm's ``num_prefix_tokens``), the other ``H*W`` are the patches in
  row-major order of the patch grid (timm's ``patch_embed.grid_size``: token ``P + h*W + w`` is patch
  (h, w)). They become a (N, C, H, W) grid (``point: "tokens->grid"``); the prefix tokens are dropped, or
  kept as a second dataset ``<layer>.prefix`` of shape (N, C, P, 1) (``point: "tokens->prefix"``).
- **Channels-last maps** (N, H, W, C) inside a model that declares ``output_fmt = "NHWC"`` (timm's Swin):
  permuted to (N, C, H, W) (``point: "nhwc->nchw"``). A conv's output inside such a model stays as it is.
- **Vectors** (N, C) (pooled embeddings): stored as (N, C, 1, 1) (``point: "vector->1x1"``).

Each converted dataset records the conversion in its attributes (``point``, ``prefix_tokens``, ``grid``),
so readers know what the positions mean; Trans-Nets, similarity and figures read the maps unchanged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from common.errors import UserError
from features.layers import LOGITS, FeatureExtractor, LayerPoint

PREFIX_SUFFIX = ".prefix"


@dataclass(frozen=True)
class TokenMap:
    """How one point's per-sample output becomes (C, H, W)."""

    kind: str                              # "tokens->grid" | "nhwc->nchw" | "vector->1x1"
    grid: tuple[int, int] = (1, 1)         # (H, W) of the map
    prefix: int = 0                        # leading tokens that are not patches (tokens->grid only)

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """(N, T, C) | (N, H, W, C) | (N, C) -> (N, C, H, W)."""
        n = t.shape[0]
        if self.kind == "tokens->grid":
            h, w = self.grid
            return t[:, self.prefix:, :].transpose(1, 2).reshape(n, t.shape[2], h, w)   # (N, C, H, W)
        if self.kind == "nhwc->nchw":
            return t.permute(0, 3, 1, 2)                                                # (N, C, H, W)
        return t.reshape(n, t.shape[1], 1, 1)                                           # (N, C, 1, 1)

    def prefix_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """(N, T, C) -> the prefix tokens as (N, C, P, 1)."""
        return t[:, :self.prefix, :].transpose(1, 2).unsqueeze(-1)

    def attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"point": self.kind, "grid": list(self.grid)}
        if self.kind == "tokens->grid":
            out["prefix_tokens"] = self.prefix
        return out


def patch_grid(model: nn.Module) -> tuple[int, int] | None:
    """The patch grid (H, W) a model declares (timm: ``patch_embed.grid_size``), or None."""
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None) if pe is not None else None
    if grid is None:
        return None
    h, w = (int(grid), int(grid)) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
    return h, w


def token_map_for(model: nn.Module, point: LayerPoint, shape: tuple[int, ...]) -> TokenMap | None:
    """The conversion a point's per-sample output ``shape`` needs (None: already (C, H, W), or logits)."""
    if point.point == LOGITS:
        return None
    if len(shape) == 1:
        return TokenMap("vector->1x1")
    if len(shape) == 2:
        return _tokens(model, point, shape)
    if len(shape) == 3:
        if getattr(model, "output_fmt", "NCHW") == "NHWC" and not _is_conv(model, point.node):
            return TokenMap("nhwc->nchw", (int(shape[0]), int(shape[1])))
        return None
    raise UserError(f"layer {point.name!r}: output of shape {shape} per sample is neither a map (C, H, W), a "
                    f"token sequence (T, C) nor a vector (C,); choose another point")


def _is_conv(model: nn.Module, node: str) -> bool:
    mods = dict(model.named_modules())
    return isinstance(mods.get(node), nn.modules.conv._ConvNd)


def _tokens(model: nn.Module, point: LayerPoint, shape: tuple[int, ...]) -> TokenMap:
    t = int(shape[0])
    grid = patch_grid(model)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if grid is None:
        side = math.isqrt(t - prefix) if t > prefix else 0
        if not hasattr(model, "num_prefix_tokens") or side * side != t - prefix:
            raise UserError(f"layer {point.name!r} outputs {t} tokens of {shape[1]} channels, and "
                            f"{type(model).__name__} declares no patch grid: expose patch_embed.grid_size (H, W) "
                            f"and num_prefix_tokens on the model (as timm's ViTs do) so the tokens can become a map")
        grid = (side, side)
    h, w = grid
    if t == prefix + h * w:
        return TokenMap("tokens->grid", (h, w), prefix)
    if t == h * w:                       # a sequence without its prefix tokens (pooled away earlier)
        return TokenMap("tokens->grid", (h, w), 0)
    raise UserError(f"layer {point.name!r} outputs {t} tokens, but the patch grid {h}x{w} plus {prefix} prefix "
                    f"tokens gives {h * w + prefix}: a layer after token merging or pooling? choose a block output")


class MappedExtractor(nn.Module):
    """An extractor whose outputs are (N, C, H, W) maps: token sequences, channels-last maps and vectors
    converted by their :class:`TokenMap`; with ``keep_prefix`` also ``<layer>.prefix`` (N, C, P, 1)."""

    def __init__(self, inner: FeatureExtractor, maps: dict[str, TokenMap], keep_prefix: bool):
        super().__init__()
        self.inner = inner
        self.maps = dict(maps)
        self.keep_prefix = keep_prefix
        self.method = inner.method
        self.points: list[LayerPoint] = []
        self.extra_attrs: dict[str, dict[str, Any]] = {}
        for p in inner.points:
            m = self.maps.get(p.name)
            self.points.append(p)
            if m is not None:
                self.extra_attrs[p.name] = m.attrs()
                if keep_prefix and m.kind == "tokens->grid" and m.prefix > 0:
                    name = p.name + PREFIX_SUFFIX
                    self.points.append(LayerPoint(name, p.node, p.point, p.conv_layer))
                    self.extra_attrs[name] = {"point": "tokens->prefix", "prefix_tokens": m.prefix,
                                              "grid": [m.prefix, 1], "tokens_of": p.name}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raw = self.inner(x)
        out: dict[str, torch.Tensor] = {}
        for name, t in raw.items():
            m = self.maps.get(name)
            out[name] = t if m is None else m.apply(t)
            if m is not None and name + PREFIX_SUFFIX in self.extra_attrs:
                out[name + PREFIX_SUFFIX] = m.prefix_tokens(t)
        return out


@torch.no_grad()
def map_tokens(model: nn.Module, extractor: FeatureExtractor, input_shape: tuple[int, ...],
               keep_prefix: bool = False) -> FeatureExtractor | MappedExtractor:
    """Wrap ``extractor`` so every point comes out as (N, C, H, W) (the extractor itself when nothing needs
    converting and no prefix is kept). One dummy forward of zeros on the CPU finds the raw shapes."""
    dev = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    raw = extractor(torch.zeros((1,) + tuple(input_shape), device=dev))
    maps: dict[str, TokenMap] = {}
    for p in extractor.points:
        v = raw[p.name]
        if not isinstance(v, torch.Tensor):
            raise UserError(f"layer {p.name!r} does not produce a tensor (got {type(v).__name__}); choose another "
                            f"point")
        m = token_map_for(model, p, tuple(v.shape[1:]))
        if m is not None:
            maps[p.name] = m
    if not maps:
        return extractor
    return MappedExtractor(extractor, maps, keep_prefix)
