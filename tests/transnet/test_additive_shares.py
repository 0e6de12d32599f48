"""The additive view of a Trans-Net's variance report: the share each order adds to the orders below
it, taken sequentially, matches a numpy recomputation and sums to the report's R²."""
from __future__ import annotations

import numpy as np
import torch

from transnet.model import TransNet, TransNetConfig
from transnet.variance import accumulate, additive_shares


def _np_var(x: np.ndarray) -> float:
    """Per-channel centred mean square, averaged over channels: x (N, C, H, W)."""
    return float(((x - x.mean(axis=(0, 2, 3), keepdims=True)) ** 2).mean(axis=(0, 2, 3)).mean())


def test_additive_shares_are_sequential_r2_gains_that_sum_to_r2():
    torch.manual_seed(0)
    model = TransNet(TransNetConfig(3, 2, 3, "instance", out_channels=4))
    with torch.no_grad():                          # gates away from 0 so every order contributes
        model.gate_logits.fill_(0.5)
    xa = torch.randn(24, 3, 5, 5)
    xb = torch.randn(24, 4, 5, 5) + model(xa).detach()
    acc = accumulate(model, [(xa[:10], xb[:10]), (xa[10:], xb[10:])])      # two batches: the streaming merge
    rep = acc.report()
    comps, _ = model.decompose(xa)
    y = [c.detach().double().numpy() for c in comps]
    t = xb.double().numpy()
    var_t = _np_var(t)
    r2_of = [1 - _np_var(t - sum(y[: k + 1])) / var_t for k in range(3)]   # R² of Y0, Y0+Y1, Y0+Y1+Y2
    expected = [r2_of[0], r2_of[1] - r2_of[0], r2_of[2] - r2_of[1]]
    np.testing.assert_allclose(rep["additive_shares"], expected, atol=1e-6)
    assert abs(sum(rep["additive_shares"]) - rep["r2"]) < 1e-6
    assert abs(rep["r2"] - r2_of[2]) < 1e-6
    assert sum(rep["fraction_orders"]) + rep["fraction_residual"] != 1.0     # the paper's fractions overlap


def test_additive_shares_of_a_constant_target_are_undefined():
    assert all(np.isnan(additive_shares(0.0, [0.0, 0.0])))
    assert additive_shares(2.0, [1.0, 0.5]) == [0.5, 0.25]


def test_the_summary_line_states_the_convergence_verdict():
    from transnet.summary import summary_line

    m = {"source": "a", "target": "b", "layer": "l", "r2": 0.3, "split": "test", "n_samples": 4,
         "fraction_orders": [0.2], "fraction_residual": 0.7}
    assert "convergence" not in summary_line(m)
    m["convergence"] = {"verdict": "not converged", "reasons": ["validation loss still falling"]}
    assert summary_line(m).endswith("\nconvergence: not converged (validation loss still falling)")
