"""A grouped fit of K Trans-Nets equals K separate fits: same start, same batches, same optimiser, so
after training each pair's weights, gates and outputs agree with its separate fit to float tolerance."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from transnet.grouped import GroupedTransNet, stack_pairs
from transnet.model import TransNet, TransNetConfig


def _planted(k: int, n: int = 48, c: int = 4, hw: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, c, hw, hw, generator=g) for _ in range(k)]
    ws = [torch.randn(c, c, 3, 3, generator=g) * 0.3 for _ in range(k)]
    ys = [F.conv2d(x, w, padding=1) + 0.5 * F.relu(F.conv2d(x, w.flip(0), padding=1)) for x, w in zip(xs, ws)]
    return xs, ys


def _batches(n: int, bs: int, epochs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        yield from perm.split(bs)


def _train(model, step_loss, steps, lr=1e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    for idx in steps:
        opt.zero_grad()
        step_loss(idx).backward()
        opt.step()


@pytest.mark.parametrize("input_norm,orders", [("instance", 2), ("global", 1)])
def test_grouped_fit_equals_separate_fits(input_norm, orders):
    k, alphas = 3, [0.1] * orders
    xs, ys = _planted(k)
    nets = []
    for g in range(k):
        torch.manual_seed(7)                                   # the same seed each separate fit uses
        net = TransNet(TransNetConfig(4, orders, 3, input_norm))
        if input_norm == "global":
            net.set_input_scale(xs[g].std(dim=(0, 2, 3)))
        nets.append(net)
    grouped = GroupedTransNet([copy.deepcopy(n) for n in nets])
    x, y = stack_pairs(xs), stack_pairs(ys)
    assert torch.allclose(grouped(x), stack_pairs([n(xi) for n, xi in zip(nets, xs)]), atol=1e-5)

    steps = list(_batches(48, 16, 8, seed=3))
    for net, xi, yi in zip(nets, xs, ys):
        _train(net, lambda i, net=net, xi=xi, yi=yi: F.mse_loss(net(xi[i]), yi[i]) + net.alpha_penalty(alphas), steps)
    _train(grouped, lambda i: grouped.loss(x[i], y[i], alphas), steps)

    for sep, fitted, xi in zip(nets, grouped.split(), xs):
        for a, b in zip(sep.parameters(), fitted.parameters()):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()
        assert torch.allclose(sep(xi), fitted(xi), rtol=1e-4, atol=1e-4)
        parts, yhat = fitted.decompose(xi)
        assert torch.allclose(sum(parts), yhat, atol=1e-4)
    # the pairs really differ: the grouping did not tie them together
    w = [n.convs[-1].weight for n in nets]
    assert not torch.allclose(w[0], w[1])


def test_grouped_fit_refuses_mixed_builds():
    with pytest.raises(ValueError, match="one build"):
        GroupedTransNet([TransNet(TransNetConfig(4, 2)), TransNet(TransNetConfig(4, 1))])


def test_each_pairs_mse_holds_in_the_channels_last_layout():
    """On CUDA the grouped model and its input are channels_last, and so is its output: each pair's MSE
    must still be its own separate ``F.mse_loss`` (a ``view`` of that layout fails)."""
    k = 3
    xs, ys = _planted(k, n=8)
    grouped = GroupedTransNet([TransNet(TransNetConfig(4, 2, 3, "instance")) for _ in range(k)])
    grouped = grouped.to(memory_format=torch.channels_last)
    x = stack_pairs(xs).contiguous(memory_format=torch.channels_last)
    yhat = grouped(x)
    assert yhat.is_contiguous(memory_format=torch.channels_last) and not yhat.is_contiguous()
    mse = grouped.pair_mse(yhat, stack_pairs(ys))
    want = torch.stack([F.mse_loss(p, yi) for p, yi in zip(yhat.split(4, dim=1), ys)])
    assert torch.allclose(mse, want, rtol=1e-6)
    grouped.loss(x, stack_pairs(ys), [0.1, 0.1]).backward()
