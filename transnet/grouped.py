"""K Trans-Nets of one layer fitted as one model: every conv becomes a grouped conv (``groups=K``), each
pair keeps its own gates, and the loss is the sum of the pairs' own losses, so each pair's gradient,
and with a per-element optimiser (Adam, its weight decay included) each pair's update, is the one its
separate fit would take. A consistency matrix over a small layer is then one launch-efficient fit
instead of K launch-bound ones.

Layout: the K sources are concatenated along channels, (N, K·C_A, H, W) -> (N, K·C_B, H, W); group g
holds pair g's channels. Instance stds are per sample and channel, so they never mix pairs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from transnet.model import TransNet, instance_std


def _same_build(nets: Sequence[TransNet]) -> None:
    builds = {n.cfg for n in nets}
    if len(builds) != 1:
        raise ValueError(f"a grouped fit needs Trans-Nets of one build; got {len(builds)} different builds: "
                         f"{sorted(map(repr, builds))}")


class GroupedTransNet(nn.Module):
    """``len(nets)`` Trans-Nets of one build as one module, starting from their weights (so each pair
    starts where its separate fit would); ``split()`` gives them back as separate Trans-Nets."""

    def __init__(self, nets: Sequence[TransNet]):
        super().__init__()
        if not nets:
            raise ValueError("a grouped fit needs at least one Trans-Net")
        _same_build(nets)
        ref = nets[0]
        self.k, self.cfg = len(nets), ref.cfg          # the build (not the module: its weights are not ours)
        self.channels, self.out_channels, self.orders = ref.channels, ref.out_channels, ref.orders
        k, pad = self.cfg.kernel, self.cfg.kernel // 2
        self.convs = nn.ModuleList()
        for j, conv in enumerate(ref.convs):
            c_out = conv.out_channels
            g = nn.Conv2d(self.k * self.channels, self.k * c_out, k, padding=pad, bias=False, groups=self.k)
            with torch.no_grad():
                g.weight.copy_(torch.cat([n.convs[j].weight for n in nets], 0))    # (K·C_out, C_in, k, k)
            self.convs.append(g)
        frozen = not ref.gate_logits.requires_grad
        self.gate_logits = nn.Parameter(torch.stack([n.gate_logits.detach() for n in nets]).clone(),
                                        requires_grad=not frozen)                  # (K, orders)
        self.register_buffer("input_scale", torch.cat([n.input_scale for n in nets]).clone())

    def _std(self, x: Tensor) -> Tensor:
        return instance_std(x, self.cfg.eps, self.cfg.std_correction, self.cfg.std_floor)

    def _normalise(self, x: Tensor) -> Tensor:
        if self.cfg.input_norm == "instance":
            return x / self._std(x)
        if self.cfg.input_norm == "global":
            return x / (self.input_scale.to(x.dtype) + self.cfg.eps)[None, :, None, None]
        return x

    def _gate(self, j: int, x: Tensor) -> Tensor:
        """(1, K·C, 1, 1): gate q_j of each pair, repeated over that pair's channels."""
        q = torch.sigmoid(self.gate_logits[:, j]).to(x.dtype)
        return q.repeat_interleave(self.channels)[None, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, K·C_A, H, W) -> (N, K·C_B, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.k * self.channels:
            raise ValueError(f"grouped Trans-Net expects (N, {self.k * self.channels}, H, W), got {tuple(x.shape)}")
        xh = self._normalise(x)
        h = self.convs[0](xh)
        for j in range(1, self.orders + 1):
            h = self.convs[j](xh + self._gate(j - 1, h) * F.relu(h / self._std(h)))
        return h

    def pair_penalties(self, alphas: Sequence[float] | Tensor) -> Tensor:
        """(K,): Σ_k α_k p_k² of each pair (α per order, order 1 first)."""
        if self.orders == 0:
            return self.gate_logits.sum(1) * 0.0
        a = torch.as_tensor(alphas, dtype=torch.float32, device=self.gate_logits.device)
        p = torch.sigmoid(self.gate_logits).flip(1).float()                       # (K, orders), order 1 first
        return (a[None, :] * p.pow(2)).sum(1)

    def alpha_penalty(self, alphas: Sequence[float] | Tensor) -> Tensor:
        """Σ over pairs of Σ_k α_k p_k²."""
        return self.pair_penalties(alphas).sum()

    def pair_mse(self, yhat: Tensor, y: Tensor) -> Tensor:
        """(K,): each pair's MSE, the mean over its own elements (``F.mse_loss`` of its separate fit)."""
        n, _, h, w = y.shape
        return (yhat.float() - y.float()).pow(2).reshape(n, self.k, -1).mean((0, 2))   # any memory format

    def loss(self, x: Tensor, y: Tensor, alphas: Sequence[float] | Tensor) -> Tensor:
        """Σ_g [MSE(ŷ_g, y_g) + Σ_k α_k p_{g,k}²]: every pair's own loss, summed, so each pair's gradient
        is its separate fit's."""
        return (self.pair_mse(self(x), y) + self.pair_penalties(alphas)).sum()

    def split(self) -> list[TransNet]:
        """The K Trans-Nets, each with its pair's current weights, gates and input scale."""
        out = []
        for g in range(self.k):
            net = TransNet(self.cfg)
            with torch.no_grad():
                for j, conv in enumerate(self.convs):
                    c_out = net.convs[j].out_channels
                    net.convs[j].weight.copy_(conv.weight[g * c_out:(g + 1) * c_out])
                net.gate_logits.copy_(self.gate_logits[g])
                net.input_scale.copy_(self.input_scale[g * self.channels:(g + 1) * self.channels])
            out.append(net.to(self.gate_logits.device))
        return out


def stack_pairs(xs: Sequence[Tensor]) -> Tensor:
    """[(N, C, H, W)] * K -> (N, K·C, H, W): pair g's block is channels g·C .. (g+1)·C."""
    return torch.cat(list(xs), dim=1)
