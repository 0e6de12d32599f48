"""Compatibility with the original code: the std convention (--std_correction),
and import-transnet of a checkpoint in the original's key layout (``linearLayers_conv.<j>.weight``,
``nonLinearLayers_p_pre``; see transnet/original.py), which variance, consistency, diagnose and the
figures then read. The original's forward pass is re-derived here independently (float64)."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.consistency import ConsistencyConfig, run_consistency
from analysis.diagnose import DiagnoseConfig, diagnose_pair
from analysis.visualize import visualize
from common.errors import UserError
from common.files import read_json
from tests.fakedata import FAST_FIT, write_features_by_split
from tests.fakedata import FAST_FIT_KWARGS as FAST
from tests.fakedata import FIT_LAYER as LAYER
from transnet.fit import FitConfig, fit_transnet, load_transnet
from transnet.model import TransNet, TransNetConfig
from transnet.original import ImportConfig, import_transnet, map_original, transnet_from_original
from transnet.variance_file import run_variance

C, S = 4, 6


# --------------------------------------------------------------------------- an independent reference

def _s(t: torch.Tensor, correction: int, eps: float) -> torch.Tensor:
    """The original's normaliser: spatial std with ``correction`` + eps, 1 on 1x1 maps."""
    if t.shape[2] * t.shape[3] == 1:
        return torch.ones(t.shape[:2] + (1, 1), dtype=t.dtype)
    return t.var(dim=(2, 3), keepdim=True, correction=correction).sqrt() + eps


def original_reference(x, weights, logits, correction=1, eps=1e-5):
    """ŷ and [Y0, Y1, Y2] of the original's 3-conv, 2-gate Trans-Net (methods.md §1 formulas):
    gate entry j gates the ReLU after conv j; conv 2 is the 0-order conv."""
    conv = lambda t, w: F.conv2d(t, w, padding=w.shape[-1] // 2)  # noqa: E731
    p = torch.sigmoid(logits)
    w0, w1, w2 = weights
    xh = x / _s(x, correction, eps)
    h0 = conv(xh, w0)
    s0 = _s(h0, correction, eps)
    h1 = conv(xh + p[0] * F.relu(h0 / s0), w1)
    s1 = _s(h1, correction, eps)
    y = conv(xh + p[1] * F.relu(h1 / s1), w2)
    m0, m1 = (h0 > 0).to(x.dtype), (h1 > 0).to(x.dtype)
    y0 = conv(xh, w2)
    y1 = conv(p[1] * m1 * conv(xh, w1) / s1, w2)
    y2 = conv(p[1] * m1 * conv(p[0] * m0 * conv(xh, w0) / s0, w1) / s1, w2)
    return y, [y0, y1, y2]


def _weights(seed=0, c=C, k=3, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(c, c, k, k, generator=g, dtype=torch.float64) * scale for _ in range(3)]


def _ours(weights, logits, correction, eps=1e-5) -> TransNet:
    arch = TransNetConfig(weights[0].shape[1], 2, weights[0].shape[-1], "instance", std_correction=correction, eps=eps)
    net = TransNet(arch).double().eval()
    with torch.no_grad():
        for conv, w in zip(net.convs, weights):
            conv.weight.copy_(w)
        net.gate_logits.copy_(logits)
    return net


# --------------------------------------------------------------------------- the std convention

@pytest.mark.parametrize("size", [8, 4, 1])
def test_std_correction_1_reproduces_the_original_components(size):
    w, logits = _weights(), torch.tensor([0.3, -0.4], dtype=torch.float64)
    x = torch.randn(6, C, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y_ref, comps_ref = original_reference(x, w, logits, correction=1)
    with torch.no_grad():
        comps, yhat = _ours(w, logits, 1).decompose(x)
    assert torch.allclose(yhat, y_ref, rtol=0, atol=1e-12)
    for got, want in zip(comps, comps_ref):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size, ratio", [(8, 1.00791), (4, 1.03280)])
def test_the_two_conventions_differ_by_sqrt_hw_over_hw_minus_1(size, ratio):
    """Same weights: every component of the population-std net is √(HW/(HW−1)) times the unbiased
    one's (exact with eps = 0): 0.8 % at 8x8, 3.3 % at 4x4."""
    w, logits = _weights(), torch.tensor([0.2, 0.1], dtype=torch.float64)
    x = torch.randn(6, C, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pop, _ = _ours(w, logits, 0, eps=0.0).decompose(x)
        unb, _ = _ours(w, logits, 1, eps=0.0).decompose(x)
    exact = math.sqrt(size * size / (size * size - 1))
    assert exact == pytest.approx(ratio, abs=1e-5)
    for a, b in zip(pop, unb):
        assert torch.allclose(a, exact * b, rtol=1e-12, atol=1e-12)


def test_fits_under_either_convention_agree(tmp_path):
    """The factor passes through every level and is absorbed by the weights: fitted results agree."""
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((C, C)).astype(np.float32)
    a, ta = rng.standard_normal((256, C, 4, 4)).astype(np.float32), rng.standard_normal((128, C, 4, 4)).astype(np.float32)
    f = write_features_by_split(tmp_path / "f.h5", {"train": {"A": a, "B": np.einsum("oc,nchw->nohw", mix, a)},
                                                    "test": {"A": ta, "B": np.einsum("oc,nchw->nohw", mix, ta)}})
    fast = {k: v for k, v in FAST.items() if k != "input_norm"}
    m0 = fit_transnet(FitConfig(features=str(f), epochs=40, std_correction=0, **fast), tmp_path / "c0")
    m1 = fit_transnet(FitConfig(features=str(f), epochs=40, std_correction=1, **fast), tmp_path / "c1")
    assert m0["std_correction"] == 0 and m1["std_correction"] == 1
    assert load_transnet(tmp_path / "c1")[0].cfg.std_correction == 1
    assert abs(m0["r2"] - m1["r2"]) < 0.01
    for f0, f1 in zip(m0["fraction_orders"], m1["fraction_orders"]):
        assert abs(f0 - f1) < 0.02


# --------------------------------------------------------------------------- import-transnet

def original_checkpoint(path: Path, weights, logits, prefix="module.", extra=None) -> Path:
    """A checkpoint as the original training script saves it: {epoch, arch, state_dict, optimizer},
    the Trans-Net's tensors under the original's names (here with DataParallel's prefix)."""
    state = {f"{prefix}linearLayers_conv.{j}.weight": w.float() for j, w in enumerate(weights)}
    state[f"{prefix}nonLinearLayers_p_pre"] = logits.float()
    state.update(extra or {})
    params = [torch.nn.Parameter(v.clone()) for v in state.values()]
    opt = torch.optim.Adam(params, lr=1e-4, weight_decay=1e-4)
    sum(p.sum() for p in params).backward()
    opt.step()
    torch.save({"epoch": 800, "arch": "vgg16_bn", "state_dict": state, "optimizer": opt.state_dict()}, path)
    return path


def _components_variance(comps: list[torch.Tensor]) -> list[float]:
    """Per-channel centred mean square of each component (numpy, float64)."""
    out = []
    for c in comps:
        v = c.numpy()
        out.append(float(((v - v.mean(axis=(0, 2, 3), keepdims=True)) ** 2).mean()))
    return out


@pytest.fixture(scope="module")
def original_pair(tmp_path_factory):
    """Features where B = the original's Trans-Net applied to A, and that Trans-Net's checkpoint."""
    root = tmp_path_factory.mktemp("orig")
    w, logits = _weights(3), torch.tensor([0.5, -0.3], dtype=torch.float64)
    rng = np.random.default_rng(3)
    a, ta = rng.standard_normal((64, C, S, S)), rng.standard_normal((32, C, S, S))
    b = original_reference(torch.from_numpy(a), w, logits)[0].numpy()
    tb = original_reference(torch.from_numpy(ta), w, logits)[0].numpy()
    f = write_features_by_split(root / "f.h5", {"train": {"A": a.astype(np.float32), "B": b.astype(np.float32)},
                                                "test": {"A": ta.astype(np.float32), "B": tb.astype(np.float32)}})
    ck = original_checkpoint(root / "checkpoint_L30_.pth.tar", w, logits)
    return {"features": f, "checkpoint": ck, "weights": w, "logits": logits, "test_a": ta}


@pytest.mark.slow
def test_import_transnet_writes_a_run_directory_that_the_other_commands_read(original_pair, tmp_path, cli):
    f, ck = original_pair["features"], original_pair["checkpoint"]
    out = tmp_path / "imported"
    code, stdout, err = cli("import-transnet", "--checkpoint", ck, "--features", f, "--source", "A", "--target", "B",
                            "--layer", LAYER, "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    assert "4 tensors, prefix 'module.' stripped); keys mapped:" in stdout
    assert "  linearLayers_conv.2.weight -> convs.2.weight" in stdout
    assert "  nonLinearLayers_p_pre -> gate_logits[0:2]" in stdout

    cfg = read_json(out / "config.json")
    assert cfg["kind"] == "import-transnet"
    assert cfg["imported"]["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
    assert cfg["imported"]["mapping"]["linearLayers_conv.0.weight"] == "convs.0.weight"
    assert cfg["imported"]["found_keys"][0] == "module.linearLayers_conv.0.weight"
    assert cfg["imported"]["original_epoch"] == 800 and cfg["model_args"]["std_correction"] == 1
    assert cfg["config"]["checkpoint"] == str(ck) and cfg["imported"]["assumptions"]

    # metrics.json: the variance report of the test split, equal to the independent reference.
    m = read_json(out / "metrics.json")
    assert m["imported"] is True and m["held_out"] is True and m["split"] == "test" and m["n_samples"] == 32
    _, comps = original_reference(torch.from_numpy(original_pair["test_a"]).float().double(),
                                  original_pair["weights"], original_pair["logits"])
    assert m["var_orders"] == pytest.approx(_components_variance(comps), rel=1e-4)
    assert m["r2"] > 0.9999 and m["gates"] == pytest.approx(torch.sigmoid(original_pair["logits"]).flip(0).tolist())

    # variance, the decomposition panel, a consistency folder and diagnose take it like a fitted run.
    rep = run_variance(out, split="test", device="cpu")
    assert rep["var_orders"] == pytest.approx(m["var_orders"], rel=1e-6) and rep["held_out"] is True
    paths = visualize(None, "panel", str(tmp_path / "fig"), transnet=str(out), rows="0,1", channels="0")
    assert any(p.suffix == ".png" for p in paths)
    cons = tmp_path / "cons"
    for src, tgt in (("A", "B"), ("B", "A")):
        assert cli("import-transnet", "--checkpoint", ck, "--features", f, "--source", src, "--target", tgt,
                   "--layer", LAYER, "--device", "cpu", "--out_dir", cons / "pairs" / f"{src}__{tgt}")[0] == 0
    res = run_consistency(ConsistencyConfig(str(f), LAYER, "all", "A,B"), FAST_FIT, cons, "resume", log=lambda s: None)
    assert res["reused"] == 2 and all(r["imported"] for r in res["rows"])
    ab = next(r for r in res["rows"] if r["source"] == "A")
    assert ab["r2"] == pytest.approx(m["r2"]) and ab["held_out"] is True
    diag = diagnose_pair(DiagnoseConfig(str(f), LAYER, "A", "B", consistency=str(cons), panels=0), tmp_path / "diag")
    assert diag["a"] == "A" and (tmp_path / "diag" / "diagnosis.json").is_file()


def test_import_on_the_training_split_is_in_sample_and_gate_probabilities_are_accepted(original_pair, tmp_path):
    f, w, logits = original_pair["features"], original_pair["weights"], original_pair["logits"]
    m = import_transnet(ImportConfig(str(original_pair["checkpoint"]), str(f), "A", "B", LAYER, eval_split="train",
                                     device="cpu"), tmp_path / "in")
    assert m["held_out"] is False and "in-sample" in m["warning"]
    state = {f"linearLayers_conv.{j}.weight": x.float() for j, x in enumerate(w)}
    state["nonLinearLayers_p"] = torch.sigmoid(logits).float()                 # probabilities, no prefix
    net, mapping = transnet_from_original(state)
    assert "logit(p)" in mapping["nonLinearLayers_p"]
    assert torch.allclose(net.gate_logits.double(), logits, atol=1e-6)
    x = torch.from_numpy(original_pair["test_a"]).float()
    with torch.no_grad():
        assert torch.allclose(net(x).double(), original_reference(x.double(), w, logits)[0], atol=1e-4)


def test_a_two_conv_original_uses_the_first_gate_entry():
    w = _weights(5)[:2]
    state = {f"linearLayers_conv.{j}.weight": x.float() for j, x in enumerate(w)}
    state["nonLinearLayers_p_pre"] = torch.tensor([0.7, 9.0])                 # the original always allocates 2
    weights, logits, mapping = map_original(state)
    assert len(weights) == 2 and logits.tolist() == pytest.approx([0.7])
    assert "entries 1..1 unused" in mapping["nonLinearLayers_p_pre"]


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("nonLinearLayers_p_pre"), "no gate vector.*expected linearLayers_conv.0.weight.*found "
                                               "linearLayers_conv.0.weight, linearLayers_conv.1.weight"),
    (lambda s: s.pop("linearLayers_conv.1.weight"), r"conv levels \[0, 2\] are not 0..1"),
    (lambda s: s.update(nonLinearLayers_norm=torch.ones(3, C), running_times=torch.zeros(3)),
     "nonLinearLayers_norm, running_times: it was trained with running"),
    (lambda s: s.update({"linearLayers_bn.weight": torch.ones(C)}), "linearLayers_bn.weight: .*affine input norm"),
    (lambda s: s.update({"linearLayers_conv.0.bias": torch.ones(C)}), "unexpected keys.*linearLayers_conv.0.bias"),
    (lambda s: s["linearLayers_conv.1.weight"].fill_(float("nan")), "non-finite values in linearLayers_conv.1"),
    (lambda s: [s.pop(k) for k in list(s)] and s.update(fc=torch.ones(2)), "no Trans-Net conv weights.*found fc"),
])
def test_checkpoints_outside_the_layout_name_what_was_found_and_expected(edit, needle):
    state = {f"linearLayers_conv.{j}.weight": x.float().clone() for j, x in enumerate(_weights())}
    state["nonLinearLayers_p_pre"] = torch.zeros(2)
    edit(state)
    with pytest.raises(UserError, match=needle):
        transnet_from_original(state)


def test_import_refuses_features_of_another_shape_and_a_missing_checkpoint(original_pair, tmp_path):
    w = _weights(0, c=8)
    ck = original_checkpoint(tmp_path / "c8.pth.tar", w, torch.zeros(2, dtype=torch.float64), prefix="")
    cfg = ImportConfig(str(ck), str(original_pair["features"]), "A", "B", LAYER, device="cpu")
    with pytest.raises(UserError, match="maps 8 -> 8 channels, but .* has 4 -> 4"):
        import_transnet(cfg, tmp_path / "x")
    with pytest.raises(UserError, match="does not exist"):
        import_transnet(ImportConfig(str(tmp_path / "none.pth.tar"), str(original_pair["features"]), "A", "B", LAYER),
                        tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
