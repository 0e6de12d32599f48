"""The Trans-Net and its exact order decomposition (pure tensor math; no I/O, no device choice).

A Trans-Net g reconstructs net B's feature map from net A's at one layer, x_B ≈ g(x_A), with K+1
bias-free k x k convolutions nested so that the normalised input x̂ is re-injected at every level
(methods.md §1; ``convs[j]`` is applied j-th):

    x̂ = n(x_A),   h_0 = W_0 x̂,   h_j = W_j ( x̂ + q_{j-1} · ReLU( h_{j-1} / s(h_{j-1}) ) ),   ŷ = h_K

Orders are numbered as in the paper, reversed: ``gates()`` and the loss weights α are listed order 1
(the gate nearest the output) first, ``decompose()`` returns ``[Y_0, ..., Y_K]``. The std conventions
and edge rules, the derivation of the decomposition, the input normalisations and a measured property
of the method are described in ``docs/internals.md`` (section "The Trans-Net").
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transnet.config import INPUT_NORMS, STD_CORRECTIONS  # re-exported: their old home

EPS = 1e-5


def instance_std(x: Tensor, eps: float = EPS, correction: int = 0, floor: float = 0.0) -> Tensor:
    """x: (N, C, H, W) -> (N, C, 1, 1) normaliser s per sample and channel, detached (no gradient
    through it), computed in at least float32 (also under bf16 autocast):

        s = max(std(x), floor · rms(x)) + eps      over the H·W positions (std with ``correction``)
        s = 1                                      when H·W = 1 (no spatial spread; the original's rule)

    ``correction`` 0: population std (default), 1: unbiased std (the original). ``floor`` 0: off."""
    x = x.detach()
    n, c, h, w = x.shape
    if h * w == 1:
        return torch.ones((n, c, 1, 1), dtype=x.dtype, device=x.device)
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    s = xf.std(dim=(2, 3), keepdim=True, correction=correction)
    if floor > 0:
        s = torch.maximum(s, xf.pow(2).mean(dim=(2, 3), keepdim=True).sqrt_().mul_(floor))
    return s.add_(eps).to(x.dtype)


def constant_slices(x: Tensor) -> Tensor:
    """x: (N, C, H, W) -> (N, C) bool: the slices whose H·W > 1 values are all equal and non-zero,
    where the instance std is 0 and x / (std + eps) = x / eps. Exact (max = min), any dtype."""
    x = x.detach()
    if x.shape[2] * x.shape[3] == 1:
        return torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    hi, lo = x.amax(dim=(2, 3)), x.amin(dim=(2, 3))
    return (hi == lo) & (hi != 0)


def _logit(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"gate value must be in [0, 1], got {p}")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


_CASTS = {"int": int, "int | None": int, "float": float, "bool": bool}   # by annotation
# Fields absent from checkpoints written before they existed; their defaults are what those fits used.
LATER_FIELDS = ("std_correction", "std_floor")


@dataclass(frozen=True)
class TransNetConfig:
    """The architecture of a Trans-Net: everything its constructor needs, saved in every checkpoint as
    ``model_args`` (``asdict``) and read back with :meth:`from_dict`. Invalid values raise ValueError."""
    channels: int                       # C_A: channels of net A's features (the input)
    orders: int = 2                     # K gates and K+1 convs; 0 = one linear conv
    kernel: int = 3                     # conv kernel size, odd (same padding keeps H, W)
    input_norm: str = "instance"        # see INPUT_NORMS
    freeze_gates: bool = False          # the gates stay at their initial value
    out_channels: int | None = None     # C_B (None: channels); only the last, 0-order conv maps C_A -> C_B
    eps: float = EPS                    # added to every instance std
    std_correction: int = 0             # spatial std: 0 population (divide by H·W), 1 unbiased (the original)
    std_floor: float = 0.0              # F: s = max(std, F·rms) + eps per slice; 0 = off (the paper)

    def __post_init__(self) -> None:
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {self.input_norm!r}; valid: {', '.join(INPUT_NORMS)}")
        if self.std_correction not in STD_CORRECTIONS:
            raise ValueError(f"std_correction must be 0 or 1, got {self.std_correction!r}")
        if not self.std_floor >= 0:
            raise ValueError(f"std_floor must be >= 0, got {self.std_floor}")
        if self.orders < 0:
            raise ValueError(f"orders must be >= 0, got {self.orders}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number (same padding), got {self.kernel}")
        if self.channels < 1 or (self.out_channels is not None and self.out_channels < 1):
            raise ValueError(f"channels and out_channels must be >= 1, got {self.channels} and {self.out_channels}")
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.channels)
        for f in fields(self):  # plain Python numbers (a shape entry may be a numpy integer), so asdict() is JSON
            cast = _CASTS.get(str(f.type))
            if cast is not None:
                object.__setattr__(self, f.name, cast(getattr(self, f.name)))

    @classmethod
    def from_dict(cls, args: Mapping[str, Any]) -> TransNetConfig:
        """The config saved as a checkpoint's ``model_args``, in its current or an older form (without
        LATER_FIELDS); a missing or an unknown field raises ValueError naming it."""
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in args and n not in LATER_FIELDS]
        unknown = sorted(set(args) - set(names))
        if missing or unknown:
            raise ValueError(f"Trans-Net model_args lack {missing} / have unknown {unknown}; fields: {', '.join(names)}")
        return cls(**args)


class TransNet(nn.Module):
    """Nested Trans-Net with ``cfg.orders`` = K ReLU gates and K+1 convs (``orders=0``: one linear conv).

    ``cfg`` (:class:`TransNetConfig`) is the architecture: C of x_A (``channels``) and of x_B
    (``out_channels``; only the last, 0-order conv maps C_A -> C_B, every inner level re-injects x̂ and
    so keeps C_A); spatial size is kept (same padding, odd ``kernel``); ``freeze_gates`` keeps the
    gates fixed (``gate_init=0`` with frozen gates is the linear-only net with the inner convs still
    present); ``std_correction`` and ``std_floor`` shape every instance std (see ``instance_std``).
    ``gate_init`` is the initial p of every gate (0.5 = logit 0, the original); the gate logits carry
    it afterwards. State lives in parameters and buffers, so ``.to(device)`` moves everything.
    """

    def __init__(self, cfg: TransNetConfig, gate_init: float = 0.5):
        super().__init__()
        if not isinstance(cfg, TransNetConfig):
            raise TypeError(f"TransNet takes a TransNetConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        c_in, c_out, orders = cfg.channels, cfg.out_channels, cfg.orders
        # convs[j] is applied j-th; convs[K] is the 0-order conv.
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out if j == orders else c_in, cfg.kernel, padding=cfg.kernel // 2, bias=False)
            for j in range(orders + 1))
        # gate_logits[j] is q_j (forward index, after conv j): it belongs to order K - j.
        self.gate_logits = nn.Parameter(torch.full((orders,), _logit(gate_init)), requires_grad=not cfg.freeze_gates)
        self.register_buffer("input_scale", torch.ones(c_in))  # (C,) per-channel std for input_norm="global"
        self.reset_parameters()

    # Read by the fit, the variance report and the refinement (shapes, orders, the std's eps).
    @property
    def channels(self) -> int:
        return self.cfg.channels

    @property
    def out_channels(self) -> int:
        return self.cfg.out_channels

    @property
    def orders(self) -> int:
        return self.cfg.orders

    @property
    def eps(self) -> float:
        return self.cfg.eps

    # ------------------------------------------------------------------ set-up
    def reset_parameters(self) -> None:
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def set_input_scale(self, std: Tensor) -> None:
        """Store the per-channel std (C,) of the training source features (``global`` mode)."""
        std = torch.as_tensor(std, dtype=self.input_scale.dtype)
        if std.shape != self.input_scale.shape:
            raise ValueError(f"input scale has shape {tuple(std.shape)}, expected ({self.channels},)")
        if not torch.isfinite(std).all() or (std < 0).any():
            raise ValueError("input scale must be finite and non-negative")
        self.input_scale.copy_(std)

    def set_gates(self, values: Sequence[float]) -> None:
        """Set p per order (order 1 first), e.g. ``[0.0, 0.0]`` closes every gate."""
        if len(values) != self.orders:
            raise ValueError(f"{len(values)} gate values for {self.orders} orders")
        with torch.no_grad():
            for k, p in enumerate(values, start=1):
                self.gate_logits[self.orders - k] = _logit(float(p))

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in asdict(self.cfg).items())

    # ------------------------------------------------------------------ pieces
    def forward_gates(self) -> Tensor:
        """(K,) gate values q_j by forward index j (q_0 belongs to order K)."""
        return torch.sigmoid(self.gate_logits)

    def gates(self) -> Tensor:
        """(K,) p_k per order, **order 1 first** (the gate nearest the output first)."""
        return self.forward_gates().flip(0)

    def std(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> (N, C, 1, 1): this net's instance std s(x) (its correction, floor, eps)."""
        return instance_std(x, self.cfg.eps, self.cfg.std_correction, self.cfg.std_floor)

    def normalise_input(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) -> x̂ of the same shape."""
        if self.cfg.input_norm == "instance":
            return x / self.std(x)
        if self.cfg.input_norm == "global":
            return x / (self.input_scale.to(x.dtype) + self.cfg.eps)[None, :, None, None]
        return x

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Trans-Net expects (N, {self.channels}, H, W) features, got {tuple(x.shape)}")

    # ------------------------------------------------------------------ forward and decomposition
    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C_A, H, W) -> ŷ: (N, C_B, H, W)."""
        self._check(x)
        xh = self.normalise_input(x)
        q = self.forward_gates().to(x.dtype)
        h = self.convs[0](xh)
        for j in range(1, self.orders + 1):
            h = self.convs[j](xh + q[j - 1] * F.relu(h / self.std(h)))
        return h

    def decompose(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """x: (N, C_A, H, W) -> ([Y_0, ..., Y_K], ŷ), each (N, C_B, H, W), with Σ_k Y_k = ŷ.

        One pass: the masks and normalisers come from the real forward pass; the K+1 components
        ride along, all pieces of one level going through its conv as one batched call."""
        self._check(x)
        n = x.shape[0]
        xh = self.normalise_input(x)
        q = self.forward_gates().to(x.dtype)
        h = self.convs[0](xh)                          # the real h_0
        parts = [h]                                    # [c_0^(0)]
        for j in range(1, self.orders + 1):
            s = self.std(h)                            # (N, C, 1, 1) normaliser of h_{j-1}
            mask = (h / s > 0).to(x.dtype)             # M_{j-1}
            gated = [q[j - 1] * mask * c / s for c in parts]      # orders 1..j of level j's input
            inp = torch.cat([xh] + gated, dim=0)                  # ((j+1) N, C, H, W)
            parts = list(self.convs[j](inp).split(n, dim=0))      # [c_j^(0), ..., c_j^(j)]
            h = self.convs[j](xh + q[j - 1] * F.relu(h / s))      # the real h_j
        return parts, h

    def alpha_penalty(self, alphas: Sequence[float] | Tensor) -> Tensor:
        """Σ_k α_k p_k² with α per order (order 1 first)."""
        if self.orders == 0:
            return self.gate_logits.sum() * 0.0
        a = torch.as_tensor(alphas, dtype=torch.float32, device=self.gate_logits.device)
        if a.shape != (self.orders,):
            raise ValueError(f"{a.numel()} alpha values for {self.orders} orders")
        return (a * self.gates().float().pow(2)).sum()

    def linear_output(self, x: Tensor) -> Tensor:
        """W_K x̂: the output when every gate is closed (the 0-order path)."""
        return self.convs[-1](self.normalise_input(x))


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
