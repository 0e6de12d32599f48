"""The Trans-Net's math (methods.md §5, checks 1-3 and 6): exact decomposition, closed gates, the
instance-norm invariance, and the streaming variance bookkeeping. Pure tensors, float64, CPU. Also
the architecture config and its checkpoint form (``model_args``), old forms included."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.checkpoints import save_checkpoint
from common.errors import UserError
from transnet.fit import load_transnet, model_args
from transnet.model import INPUT_NORMS, TransNet, TransNetConfig, instance_std
from transnet.variance import ChannelMoments, VarianceAccumulator, variance_report


def _random_net(channels=4, orders=2, kernel=3, norm="instance", seed=0, out_channels=None) -> TransNet:
    torch.manual_seed(seed)
    m = TransNet(TransNetConfig(channels, orders, kernel, norm, out_channels=out_channels)).double().eval()
    with torch.no_grad():
        m.gate_logits.copy_(torch.randn(orders, dtype=torch.double))
        m.set_input_scale(torch.rand(channels, dtype=torch.double) + 0.5)
    return m


def _x(n=5, c=4, s=7, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, s, s, generator=g, dtype=torch.double) * 2 + 0.3


@pytest.mark.parametrize("norm", INPUT_NORMS)
@pytest.mark.parametrize("orders", [0, 1, 2, 3])
def test_components_sum_to_reconstruction(norm, orders):
    m = _random_net(orders=orders, norm=norm, out_channels=6 if orders == 2 else None)
    x = _x()
    comps, yhat = m.decompose(x)
    assert len(comps) == orders + 1
    assert all(c.shape == (5, m.out_channels, 7, 7) for c in comps)
    torch.testing.assert_close(sum(comps), yhat, rtol=0, atol=1e-12)
    torch.testing.assert_close(m(x), yhat, rtol=0, atol=1e-12)


def test_decomposition_equals_the_written_formula():
    """Y0 = W2 x̂, Y1 = W2 p1 M1 (W1 x̂)/s1, Y2 = W2 p1 M1 (W1 p0 M0 (W0 x̂)/s0)/s1 (methods.md §1)."""
    m = _random_net(orders=2, kernel=3, norm="instance")
    x = _x()
    w0, w1, w2 = (c.weight for c in m.convs)
    conv = lambda w, t: F.conv2d(t, w, padding=1)  # noqa: E731
    xh = x / (x.std(dim=(2, 3), keepdim=True, correction=0) + 1e-5)
    q = torch.sigmoid(m.gate_logits)             # q[0] = p0 (order 2), q[1] = p1 (order 1)
    h0 = conv(w0, xh)
    s0 = h0.std(dim=(2, 3), keepdim=True, correction=0) + 1e-5
    h1 = conv(w1, xh + q[0] * F.relu(h0 / s0))
    s1 = h1.std(dim=(2, 3), keepdim=True, correction=0) + 1e-5
    m0, m1 = (h0 > 0).double(), (h1 > 0).double()
    y0 = conv(w2, xh)
    y1 = conv(w2, q[1] * m1 * conv(w1, xh) / s1)
    y2 = conv(w2, q[1] * m1 * conv(w1, q[0] * m0 * conv(w0, xh) / s0) / s1)
    comps, yhat = m.decompose(x)
    for got, want in zip(comps, (y0, y1, y2)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(yhat, conv(w2, xh + q[1] * F.relu(h1 / s1)), rtol=0, atol=1e-12)
    # gates() lists order 1 first: the gate nearest the output
    assert torch.allclose(m.gates(), torch.stack([q[1], q[0]]))


@pytest.mark.parametrize("norm", INPUT_NORMS)
def test_closed_gates_leave_only_the_linear_order(norm):
    m = _random_net(orders=2, norm=norm)
    m.set_gates([0.0, 0.0])
    x = _x()
    comps, yhat = m.decompose(x)
    assert comps[1].abs().max() == 0 and comps[2].abs().max() == 0
    torch.testing.assert_close(yhat, m.linear_output(x), rtol=0, atol=1e-12)
    # ŷ is then linear in x (norm "none" / "global"): ŷ(2x - 3x') = 2ŷ(x) - 3ŷ(x')
    if norm != "instance":
        x2 = _x(seed=9)
        torch.testing.assert_close(m(2 * x - 3 * x2), 2 * m(x) - 3 * m(x2), rtol=0, atol=1e-10)


def test_zero_inner_conv_leaves_only_the_linear_order():
    m = _random_net(orders=2, norm="global")
    with torch.no_grad():
        m.convs[1].weight.zero_()                 # W1 = 0 -> h1 = 0 -> no gated contribution
    comps, yhat = m.decompose(_x())
    assert comps[1].abs().max() == 0 and comps[2].abs().max() == 0
    torch.testing.assert_close(yhat, comps[0], rtol=0, atol=0)


def test_instance_norm_makes_the_output_scale_invariant():
    m = _random_net(orders=2, norm="instance")
    x = _x()
    s = torch.rand(5, 4, 1, 1, dtype=torch.double, generator=torch.Generator().manual_seed(3)) * 3 + 0.2
    torch.testing.assert_close(m(x * s), m(x), rtol=1e-4, atol=1e-4)
    g = _random_net(orders=2, norm="global")    # the other modes are not invariant: the check discriminates
    assert (g(x * s) - g(x)).abs().max() > 0.1


def test_state_lives_in_parameters_and_buffers():
    m = _random_net(orders=2, norm="global")
    sd = m.state_dict()
    assert set(sd) == {"convs.0.weight", "convs.1.weight", "convs.2.weight", "gate_logits", "input_scale"}
    m2 = TransNet(TransNetConfig(4, 2, 3, "global")).double()
    m2.load_state_dict(sd)
    x = _x()
    torch.testing.assert_close(m2(x), m(x), rtol=0, atol=0)
    f32 = m2.float()                              # .to() moves every piece of state
    assert f32.input_scale.dtype == torch.float32 and f32(x.float()).dtype == torch.float32


def test_kaiming_fan_out_init_and_gate_init():
    torch.manual_seed(0)
    m = TransNet(TransNetConfig(64, 2, 3))
    w = m.convs[0].weight
    want = (2.0 / (64 * 9)) ** 0.5                 # ReLU gain, fan_out = C_out * k * k
    assert abs(float(w.detach().std()) - want) / want < 0.05
    assert torch.allclose(m.gates(), torch.full((2,), 0.5))
    frozen = TransNet(TransNetConfig(4, 2, 1, freeze_gates=True))
    assert not frozen.gate_logits.requires_grad


def test_alpha_penalty_is_sum_of_alpha_times_squared_gates():
    m = TransNet(TransNetConfig(4, 2, 1))
    m.set_gates([0.2, 0.7])                       # p1 = 0.2 (order 1), p2 = 0.7 (order 2)
    assert torch.allclose(m.gates(), torch.tensor([0.2, 0.7]))
    assert abs(float(m.alpha_penalty([1.0, 10.0]).detach()) - (0.04 + 4.9)) < 1e-5


def test_bad_arguments_are_refused():
    for kw in ({"input_norm": "batch"}, {"kernel": 2}, {"orders": -1}, {"out_channels": 0}, {"std_correction": 2},
               {"std_floor": -0.1}):
        with pytest.raises(ValueError):
            TransNet(TransNetConfig(4, **kw))
    with pytest.raises(ValueError, match=r"expects \(N, 4, H, W\)"):
        TransNet(TransNetConfig(4))(torch.zeros(2, 3, 5, 5))


def test_instance_std_is_detached_and_population():
    x = _x().requires_grad_()
    s = instance_std(x)
    assert not s.requires_grad
    want = x.detach().numpy().std(axis=(2, 3), keepdims=True) + 1e-5
    np.testing.assert_allclose(s.numpy(), want, rtol=1e-12)


# --------------------------------------------------------------------------- variance bookkeeping

def test_streaming_channel_moments_equal_two_pass_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 3, 4, 5)) * np.array([1.0, 5.0, 0.1])[None, :, None, None] + 1e3
    acc = ChannelMoments()
    for s, e in ((0, 1), (1, 9), (9, 30), (30, 37)):   # uneven batches, a large offset
        acc.update(torch.from_numpy(x[s:e]))
    mean = x.mean(axis=(0, 2, 3))
    var = ((x - mean[None, :, None, None]) ** 2).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(acc.channel_variance().numpy(), var, rtol=1e-10)
    assert abs(acc.variance() - var.mean()) < 1e-10 * var.mean()


def _numpy_report(comps, yhat, target):
    def v(a):
        a = np.asarray(a, dtype=np.float64)
        return float(((a - a.mean(axis=(0, 2, 3), keepdims=True)) ** 2).mean())
    vt = v(target)
    vo = [v(c) for c in comps]
    vr = v(target - yhat)
    return {"var_target": vt, "var_orders": vo, "var_residual": vr, "fraction_orders": [o / vt for o in vo],
            "fraction_residual": vr / vt, "r2": 1 - vr / vt, "mse": float(((target - yhat) ** 2).mean())}


def test_variance_report_equals_numpy_reference():
    m = _random_net(orders=2, norm="global")
    x, t = _x(n=23, seed=4), _x(n=23, seed=5) * 0.5
    batches = [(x[s:s + 6], t[s:s + 6]) for s in range(0, 23, 6)]
    rep = variance_report(m, batches, split="test", source="a", target="b", layer="l")
    with torch.no_grad():
        comps, yhat = m.decompose(x)
    want = _numpy_report([c.numpy() for c in comps], yhat.numpy(), t.numpy())
    for k, v in want.items():
        np.testing.assert_allclose(rep[k], v, rtol=1e-6)
    assert rep["n_samples"] == 23 and rep["split"] == "test" and "orthogonal" in rep["note"]
    assert rep["gates"] == pytest.approx(m.gates().tolist())


def test_permuting_target_channels_leaves_every_fraction_unchanged():
    m = _random_net(orders=2, norm="instance")
    x, t = _x(n=11, seed=6), _x(n=11, seed=7)
    perm = torch.tensor([2, 0, 3, 1])
    mp = _random_net(orders=2, norm="instance")
    mp.load_state_dict(m.state_dict())
    with torch.no_grad():
        mp.convs[-1].weight.copy_(m.convs[-1].weight[perm])   # the same net with B's channels permuted
    a = VarianceAccumulator(2)
    b = VarianceAccumulator(2)
    with torch.no_grad():
        a.update(*m.decompose(x), t)
        b.update(*mp.decompose(x), t[:, perm])
    ra, rb = a.report(), b.report()
    for key in ("fraction_orders", "fraction_residual", "r2", "var_target", "mse"):
        np.testing.assert_allclose(ra[key], rb[key], rtol=1e-12)
    assert ra["fraction_orders"][1] > 0                       # a non-trivial report


# --------------------------------------------------------------------------- config and checkpoints

def _transnet_checkpoint(path, model: TransNet, args: dict) -> None:
    save_checkpoint(path, {"state_dict": model.state_dict(), "arch": "transnet", "kind": "transnet",
                           "num_classes": None, "dataset": None, "transform": None, "epoch": 3, "metrics": {},
                           "config": {}, "model_args": args})


def test_config_is_saved_as_model_args_and_read_back():
    cfg = TransNetConfig(6, 1, 3, "global", True, out_channels=None, std_floor=0.01)
    assert cfg.out_channels == 6 and cfg == TransNetConfig(6, 1, 3, "global", True, out_channels=6, std_floor=0.01)
    net = TransNet(cfg)
    assert model_args(net) == {"channels": 6, "orders": 1, "kernel": 3, "input_norm": "global", "freeze_gates": True,
                               "out_channels": 6, "eps": 1e-5, "std_correction": 0, "std_floor": 0.01}
    assert TransNetConfig.from_dict(model_args(net)) == cfg
    assert not net.gate_logits.requires_grad and "std_floor=0.01" in repr(net)
    assert type(TransNetConfig(np.int64(4)).channels) is int     # shape entries become plain ints (JSON)


def test_checkpoint_with_old_model_args_still_loads(tmp_path):
    """Checkpoints written before std_correction and std_floor existed hold seven fields; they load
    with the defaults those fits used, and compute what the saved weights compute."""
    torch.manual_seed(0)
    net = TransNet(TransNetConfig(4, 2, 3, "instance", out_channels=5)).eval()
    old = {"channels": 4, "out_channels": 5, "orders": 2, "kernel": 3, "input_norm": "instance",
           "freeze_gates": False, "eps": 1e-5}
    _transnet_checkpoint(tmp_path / "old.pt", net, old)
    loaded, info = load_transnet(tmp_path / "old.pt")
    assert loaded.cfg == TransNetConfig(4, 2, 3, "instance", False, 5, 1e-5, 0, 0.0) and info["epoch"] == 3
    x = _x().float()
    assert torch.equal(loaded(x), net(x))


def test_checkpoint_with_unknown_or_missing_model_args_is_refused(tmp_path):
    net = TransNet(TransNetConfig(4))
    _transnet_checkpoint(tmp_path / "new.pt", net, {**model_args(net), "heads": 8})
    with pytest.raises(UserError, match=r"unknown \['heads'\]"):
        load_transnet(tmp_path / "new.pt")
    args = model_args(net)
    del args["kernel"]
    _transnet_checkpoint(tmp_path / "lack.pt", net, args)
    with pytest.raises(UserError, match=r"lack \['kernel'\]"):
        load_transnet(tmp_path / "lack.pt")
