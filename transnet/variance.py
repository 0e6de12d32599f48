"""Variance of each order component, the residual and the target: one streaming float64 pass.

For each tensor family T (Y_0..Y_K, the residual Δ = x_B − ŷ, the target x_B) the report's number
is the per-channel centred mean square: centre every channel by its mean over samples and
positions, then average the squares over everything (methods.md §1, "Variance.py"). Batches are
merged with Chan et al.'s pairwise update (count, mean, M2 per channel, float64), so the result
equals a two-pass computation over the whole split without holding it.

The components are not orthogonal, so var_orders + var_residual need not equal var_target; every
report says so in its ``note``. The same pass gives an additive view (``additive_shares``): the
share of Var(x_B) that order k adds to the orders below it, taken sequentially,
``(Var(x_B − Σ_{j<k} Y_j) − Var(x_B − Σ_{j≤k} Y_j)) / Var(x_B)`` (so order 0's share is the R² of
Y_0 alone); the shares telescope to the total R² (the last partial residual is the residual).

The same pass counts the source's spatially constant non-zero (sample, channel) slices
(``constant_source_slices`` of ``source_slices``): with the instance input norm their std is 0 and
x̂ = x / eps there, so the report warns (``warnings``) unless ``std_floor`` bounds them.

On CUDA the report's forward passes run in IEEE float32 (TF32 off, ``common.device.float32_math``)
whatever ``--precision`` a fit trained in, so that a reported number does not depend on it.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from common.device import float32_math
from transnet.model import TransNet, constant_slices

NOTE = ("The order components Y_k and the residual are not orthogonal, so their variances (and "
        "fractions) need not add up to the target's variance (to 1). Variances are per-channel "
        "centred mean squares (mean over samples and positions removed per channel).")


class ChannelMoments:
    """Streaming per-channel count, mean and sum of squared deviations (float64).

    ``update(x)`` with x: (N, C, H, W) or (N, C); ``variance()`` -> mean over channels of the
    per-channel centred mean square; ``channel_variance()`` -> (C,); ``std()`` -> (C,) population std.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None   # (C,) float64
        self.m2: Tensor | None = None     # (C,) float64

    def update(self, x: Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected (N, C, H, W) or (N, C), got {tuple(x.shape)}")
        x = x.detach().to(torch.float64)
        dims = (0, 2, 3) if x.dim() == 4 else (0,)
        n_b = x.numel() // x.shape[1]                        # values per channel in this batch
        if n_b == 0:
            return
        mean_b = x.mean(dim=dims)                            # (C,)
        shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
        m2_b = (x - mean_b.view(shape)).pow(2).sum(dim=dims)  # (C,)
        if self.mean is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        if mean_b.shape != self.mean.shape:
            raise ValueError(f"channel count changed from {self.mean.numel()} to {mean_b.numel()}")
        n_a = self.count
        total = n_a + n_b
        delta = mean_b - self.mean.to(mean_b.device)
        self.mean = self.mean.to(mean_b.device) + delta * (n_b / total)
        self.m2 = self.m2.to(mean_b.device) + m2_b + delta.pow(2) * (n_a * n_b / total)
        self.count = total

    def channel_variance(self) -> Tensor:
        if self.m2 is None:
            raise ValueError("no data accumulated")
        return self.m2 / self.count

    def variance(self) -> float:
        return float(self.channel_variance().mean())

    def std(self) -> Tensor:
        return self.channel_variance().sqrt()


@dataclass
class VarianceAccumulator:
    """Accumulates components, residual, target and the squared error over batches."""

    orders: int
    components: list[ChannelMoments] = field(default_factory=list)
    residual: ChannelMoments = field(default_factory=ChannelMoments)
    target: ChannelMoments = field(default_factory=ChannelMoments)
    reconstruction: ChannelMoments = field(default_factory=ChannelMoments)
    partial: list[ChannelMoments] = field(default_factory=list)   # x_B − Σ_{j≤k} Y_j for k < K
    sq_err: float | Tensor = 0.0     # device tensors while batches stream in (no host sync per batch)
    n_values: int = 0
    n_samples: int = 0
    constant_source: int | Tensor = 0   # (sample, channel) slices of x_A that are spatially constant and non-zero
    source_slices: int = 0          # all (sample, channel) slices of x_A seen

    def __post_init__(self) -> None:
        if not self.components:
            self.components = [ChannelMoments() for _ in range(self.orders + 1)]
        if not self.partial:
            self.partial = [ChannelMoments() for _ in range(self.orders)]

    def update(self, components: Sequence[Tensor], yhat: Tensor, target: Tensor) -> None:
        """components: K+1 tensors (N, C, H, W), order 0 first; yhat, target: (N, C, H, W)."""
        if len(components) != self.orders + 1:
            raise ValueError(f"{len(components)} components for {self.orders} orders")
        if yhat.shape != target.shape:
            raise ValueError(f"reconstruction {tuple(yhat.shape)} and target {tuple(target.shape)} differ in shape")
        for acc, c in zip(self.components, components):
            acc.update(c)
        t64 = target.detach().to(torch.float64)
        res = t64 - yhat.detach().to(torch.float64)          # Δ = x_B − ŷ
        rest = t64
        for acc, c in zip(self.partial, components):         # x_B − Y_0, x_B − Y_0 − Y_1, ...
            rest = rest - c.detach().to(torch.float64)
            acc.update(rest)
        self.residual.update(res)
        self.target.update(t64)
        self.reconstruction.update(yhat)
        self.sq_err = self.sq_err + res.pow(2).sum()
        self.n_values += res.numel()
        self.n_samples += int(target.shape[0])

    def count_source(self, source: Tensor) -> None:
        """source: (N, C_A, H, W) x_A of the batch: count its constant non-zero slices."""
        self.constant_source = self.constant_source + constant_slices(source).sum()
        self.source_slices += int(source.shape[0] * source.shape[1])

    def report(self) -> dict[str, Any]:
        """The contract's numbers (design.md): variances, fractions of var_target, R², MSE. The streamed
        sums come to the host here, once."""
        self.sq_err, self.constant_source = float(self.sq_err), int(self.constant_source)
        var_t = self.target.variance()
        var_o = [c.variance() for c in self.components]
        var_r = self.residual.variance()
        frac = (lambda v: v / var_t) if var_t > 0 else (lambda v: float("nan"))
        return {
            "n_samples": self.n_samples,
            "var_target": var_t,
            "var_orders": var_o,
            "var_residual": var_r,
            "var_reconstruction": self.reconstruction.variance(),
            "fraction_orders": [frac(v) for v in var_o],
            "fraction_residual": frac(var_r),
            "r2": 1.0 - frac(var_r),
            "additive_shares": additive_shares(var_t, [p.variance() for p in self.partial] + [var_r]),
            "mse": self.sq_err / max(self.n_values, 1),
            "constant_source_slices": self.constant_source,
            "source_slices": self.source_slices,
            "note": NOTE,
        }


def additive_shares(var_target: float, var_partial: Sequence[float]) -> list[float]:
    """Sequential shares of Var(x_B): ``var_partial[k]`` = Var(x_B − Σ_{j≤k} Y_j) (the last one the
    residual's); share k = (var_partial[k-1] − var_partial[k]) / var_target with var_partial[-1] =
    var_target. They sum to 1 − var_partial[-1] / var_target = R²; NaN when the target has no variance."""
    if not var_target > 0:
        return [float("nan")] * len(var_partial)
    before = [var_target] + list(var_partial[:-1])
    return [(b - a) / var_target for b, a in zip(before, var_partial)]


@torch.no_grad()
def accumulate(model: torch.nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
               device: torch.device | str | None = None) -> VarianceAccumulator:
    """Run ``model.decompose`` over ``(x_A, x_B)`` batches (in the model's dtype) and accumulate in float64."""
    was_training = model.training
    model.eval()
    acc = VarianceAccumulator(model.orders)
    dtype = next(model.parameters()).dtype               # float32 (float64 in exactness checks)
    try:
        for xa, xb in batches:
            if device is not None:
                xa, xb = xa.to(device, non_blocking=True), xb.to(device, non_blocking=True)
            comps, yhat = model.decompose(xa.to(dtype))
            acc.update(comps, yhat, xb)
            acc.count_source(xa)
    finally:
        model.train(was_training)
    return acc


def variance_report(model: TransNet, batches: Iterable[tuple[Tensor, Tensor]], *,
                    device: torch.device | str | None = None, **fields: Any) -> dict[str, Any]:
    """The ``variance.json`` / ``metrics.json`` dict: ``fields`` (split, source, target, layer, ...)
    first, then the variances, fractions, R², gates (order 1 first) and MSE."""
    where = torch.device(device) if device is not None else next(model.parameters()).device
    with float32_math(where, "fp32"):
        acc = accumulate(model, batches, device)
    rep = acc.report()
    gates = [float(g) for g in model.gates().detach().cpu()]
    out = {**fields, **{k: v for k, v in rep.items() if k != "note"}, "gates": gates, "note": rep["note"]}
    warning = constant_warning(acc.constant_source, acc.source_slices, fields.get("split"), fields.get("source"),
                               model.cfg.input_norm, model.cfg.std_floor, model.cfg.eps)
    out["warnings"] = [warning] if warning else []
    if warning:
        out["warning"] = warning
    return out


def constant_warning(n_constant: int, n_slices: int, split: str | None, source: str | None, input_norm: str,
                     std_floor: float, eps: float) -> str | None:
    """The warning for ``n_constant`` spatially constant non-zero source slices (None when there are none,
    or when the input is not instance-normalised and so not divided by their zero std)."""
    if n_constant <= 0 or input_norm != "instance":
        return None
    where = f"{n_constant} of {n_slices} (sample, channel) slices of source {source!r} in split {split!r}"
    if std_floor > 0:
        return (f"{where} are spatially constant and non-zero; --std_floor {std_floor:g} bounds their "
                f"normalised values to ±{1 / std_floor:g}")
    return (f"{where} are spatially constant and non-zero: their instance std is 0, so the input there is "
            f"divided by eps = {eps:g} (scaled up {1 / eps:.0e}x) and can dominate the fit and the "
            f"components; refit with --std_floor (e.g. 0.01) or check the features (float16 rounding?)")
