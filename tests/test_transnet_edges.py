"""The Trans-Net's numerical and labelling edges (issue 11): 1x1 maps, spatially constant slices and
the std floor, in-sample reports, non-finite JSON values, the two std conventions and checkpoints of
the original code, and the fit's precision. Tiny planted problems on the CPU."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.consistency import pair_row
from analysis.report import pair_reading
from common.device import PRECISIONS, effective_precision, float32_math, precision_autocast
from common.errors import UserError
from common.files import read_json, write_json
from test_transnet_fit import LAYER, write_features
from transnet.fit import FitConfig, fit_transnet, load_transnet
from transnet.model import TransNet, constant_slices, instance_std
from transnet.original import map_original, original_state

FAST = dict(source="A", target="B", layer=LAYER, lr=2e-2, final_lr=1e-4, schedule="cosine", weight_decay=0.0,
            eval_every=1000, save_every=1000, device="cpu")


def _normal(n: int, seed: int, c: int = 4, s: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, c, s, s)).astype(np.float32)


# --------------------------------------------------------------------------- 1. 1x1 maps

def test_one_by_one_maps_use_unit_std_in_every_level():
    x = torch.randn(5, 3, 1, 1, dtype=torch.double) * 7
    assert torch.equal(instance_std(x), torch.ones(5, 3, 1, 1, dtype=torch.double))
    assert torch.equal(instance_std(x, correction=1, floor=0.5), torch.ones(5, 3, 1, 1, dtype=torch.double))
    torch.manual_seed(0)
    m = TransNet(3, 2, 3, "instance").double().eval()
    w = [c.weight[:, :, 1, 1] for c in m.convs]            # a 3x3 kernel on a 1x1 map: only the centre tap
    q = torch.sigmoid(m.gate_logits)
    v = x[:, :, 0, 0]                                       # s = 1: x̂ = x, inner maps divided by 1
    h0 = v @ w[0].T
    h1 = (v + q[0] * h0.clamp(min=0)) @ w[1].T
    want = (v + q[1] * h1.clamp(min=0)) @ w[2].T
    torch.testing.assert_close(m(x)[:, :, 0, 0], want, rtol=0, atol=1e-12)
    comps, yhat = m.decompose(x)
    torch.testing.assert_close(sum(comps), yhat, rtol=0, atol=1e-12)


def test_planted_one_by_one_linear_target_is_recovered(tmp_path):
    """Before: x̂ and the hidden maps were divided by eps, max|ŷ| 5.6e13 and held-out R² -6.5e24."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)

    def make(n, seed):
        a = _normal(n, seed, c=8, s=1)
        return a, np.einsum("oc,nchw->nohw", w, a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32)

    (a, b), (ta, tb) = make(512, 1), make(256, 2)
    f = write_features(tmp_path / "f.h5", {"train": {"A": a, "B": b}, "test": {"A": ta, "B": tb}})
    m = fit_transnet(FitConfig(features=str(f), epochs=60, **FAST), tmp_path / "run")   # paper's instance norm
    assert m["held_out"] and m["r2"] >= 0.95
    model, _ = load_transnet(tmp_path / "run")
    with torch.no_grad():
        assert float(model(torch.from_numpy(ta)).abs().max()) < 10 * float(np.abs(tb).max())


# --------------------------------------------------------------------------- 2. constant slices, std floor

def test_constant_slices_are_exactly_the_equal_non_zero_ones():
    x = torch.randn(3, 4, 5, 5)
    x[0, 1] = 0.5                       # constant, non-zero: flagged
    x[1, 2] = 0.0                       # constant zero: x / eps = 0, harmless
    x[2, 3] = 2.0
    x[2, 3, 4, 4] = 2.001               # nearly constant: not exactly
    want = torch.zeros(3, 4, dtype=torch.bool)
    want[0, 1] = True
    assert torch.equal(constant_slices(x), want)
    assert torch.equal(constant_slices(x.half()), want)
    assert not constant_slices(torch.randn(2, 3, 1, 1)).any()     # 1x1 maps use s = 1


def test_std_floor_bounds_a_constant_slice_and_keeps_the_scale_invariance():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6, dtype=torch.double)
    x[1, 2] = -0.5
    plain = TransNet(3, 2, 3, "instance").double().eval()
    floored = TransNet(3, 2, 3, "instance", std_floor=0.01).double().eval()
    floored.load_state_dict(plain.state_dict())
    assert float(plain.normalise_input(x)[1, 2].abs().max()) == pytest.approx(0.5 / 1e-5)     # the blow-up
    assert float(floored.normalise_input(x)[1, 2].abs().max()) == pytest.approx(100.0, rel=1e-3)  # 1 / F
    # the floor does not bind on ordinary slices, and ŷ stays invariant to positive per-slice scales
    torch.testing.assert_close(floored.normalise_input(x)[0], plain.normalise_input(x)[0], rtol=0, atol=0)
    scale = torch.rand(4, 3, 1, 1, dtype=torch.double) * 5 + 0.1
    torch.testing.assert_close(floored(x * scale), floored(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="std_floor"):
        TransNet(3, std_floor=-1)


def test_constant_source_slices_are_counted_and_warned_in_metrics_and_table(tmp_path):
    a, ta = _normal(256, 3), _normal(128, 4)
    a[5, 1], ta[7, 2], ta[9, 0] = 0.5, 0.25, -3.0
    f = write_features(tmp_path / "f.h5", {"train": {"A": a, "B": a[:, ::-1].copy()},
                                           "test": {"A": ta, "B": ta[:, ::-1].copy()}})
    m = fit_transnet(FitConfig(features=str(f), epochs=2, kernel=1, **FAST), tmp_path / "r")
    assert (m["constant_source_slices"], m["source_slices"]) == (2, 128 * 4)
    assert (m["train_constant_source_slices"], m["train_source_slices"]) == (1, 256 * 4)
    assert len(m["warnings"]) == 2 and all("spatially constant" in w and "--std_floor" in w for w in m["warnings"])
    assert "2 of 512" in m["warning"] and "split 'test'" in m["warning"]
    row = pair_row(read_json(tmp_path / "r" / "metrics.json"), "r")
    assert row["constant_source_slices"] == 2 and "spatially constant" in row["warnings"]
    # with the floor the numbers are bounded and the warning says so
    m = fit_transnet(FitConfig(features=str(f), epochs=2, kernel=1, std_floor=0.01, **FAST), tmp_path / "fl")
    assert "bounds their normalised values to ±100" in m["warning"]
    # global input norm divides by a per-channel std: counted, no warning
    m = fit_transnet(FitConfig(features=str(f), epochs=2, kernel=1, input_norm="global", **FAST), tmp_path / "g")
    assert m["constant_source_slices"] == 2 and not m["warnings"]


@pytest.mark.parametrize("option, value, needle", [("--std_floor", "2", "--std_floor must be in [0, 1]"),
                                                   ("--std_correction", "2", "invalid choice"),
                                                   ("--precision", "fp16", "invalid choice")])
def test_bad_edge_options_are_refused(tmp_path, cli, option, value, needle):
    f = write_features(tmp_path / "f.h5", {"train": {"A": _normal(8, 0), "B": _normal(8, 1)}})
    code, _, err = cli("fit-transnet", "--features", f, "--source", "A", "--target", "B", "--layer", LAYER,
                       "--eval_split", "none", "--device", "cpu", option, value, "--out_dir", tmp_path / "o")
    assert code != 0 and needle in err


# --------------------------------------------------------------------------- 3. in-sample labels

def test_eval_on_the_training_split_is_labelled_in_sample(tmp_path, cli):
    """Before: ``--eval_split train`` wrote ``held_out: true`` with no warning."""
    f = write_features(tmp_path / "f.h5", {"train": {"A": _normal(64, 0), "B": _normal(64, 1)},
                                           "test": {"A": _normal(32, 2), "B": _normal(32, 3)}})
    code, text, err = cli("fit-transnet", "--features", f, "--source", "A", "--target", "B", "--layer", LAYER,
                          "--eval_split", "train", "--epochs", 1, "--device", "cpu", "--out_dir", tmp_path / "r")
    assert code == 0, err
    m = read_json(tmp_path / "r" / "metrics.json")
    assert m["held_out"] is False and "in-sample" in m["warnings"][0] and "in-sample R²" in text
    assert read_json(tmp_path / "r" / "config.json")["held_out"] is False
    m = fit_transnet(FitConfig(features=str(f), epochs=1, train_rows=32, eval_split="train", **FAST), tmp_path / "p")
    assert m["held_out"] is False and "first 32 of 64 rows" in m["warning"]
    assert fit_transnet(FitConfig(features=str(f), epochs=1, **FAST), tmp_path / "t")["held_out"] is True


def test_consistency_on_the_training_split_is_labelled_in_the_table_and_report(tmp_path, cli):
    a = _normal(64, 0)
    nets = {"A": a, "B": a[:, [1, 0, 3, 2]].copy()}
    f = write_features(tmp_path / "f.h5", {"train": nets, "test": {k: v[:32] for k, v in nets.items()}})
    code, text, err = cli("consistency", "--features", f, "--layer", LAYER, "--split", "train", "--epochs", 1,
                          "--device", "cpu", "--no_figures", "--out_dir", tmp_path / "c")
    assert code == 0, err
    assert "every report is in-sample" in text
    rows = read_json(tmp_path / "c" / "table.json")["rows"]
    assert len(rows) == 2 and all(r["held_out"] is False and "in-sample" in r["warnings"] for r in rows)
    assert "held_out" in (tmp_path / "c" / "table.csv").read_text().splitlines()[0]
    assert read_json(tmp_path / "c" / "metrics.json")["in_sample_pairs"] == ["A>B", "B>A"]
    assert "in-sample R²" in pair_reading(rows[0]) and "held-out" not in pair_reading(rows[0])


# --------------------------------------------------------------------------- 5. non-finite JSON

def test_write_json_maps_every_non_finite_value_to_null_and_records_why(tmp_path):
    """Before: ``write_json`` raised ValueError on ±inf (a diverged pair's r2 = -inf)."""
    p = tmp_path / "m.json"
    write_json(p, {"r2": -math.inf, "mse": math.inf, "frac": [0.5, float("nan")], "g": np.float32("inf"),
                   "t": torch.tensor([1.0, -math.inf]), "nested": {"x": np.float64("-inf")}, "ok": 1.5})
    text = p.read_text()
    body = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))
    assert body["r2"] is None and body["mse"] is None and body["frac"] == [0.5, None] and body["g"] is None
    assert body["t"] == [1.0, None] and body["nested"] == {"x": None} and body["ok"] == 1.5
    assert body["nonfinite_values"] == {"r2": "-inf", "mse": "inf", "frac[1]": "nan", "g": "inf", "t[1]": "-inf",
                                        "nested.x": "-inf"}
    write_json(p, {**body, "r2b": -math.inf})             # a rewrite keeps the earlier record
    assert read_json(p)["nonfinite_values"]["r2"] == "-inf" and read_json(p)["nonfinite_values"]["r2b"] == "-inf"
    write_json(p, [math.inf])                              # a list has no room for the record: values only
    assert read_json(p) == [None]


# --------------------------------------------------------------------------- 6. std conventions

def _reference_forward(x, weights, probs, correction, eps=1e-5):
    """An independent forward pass of the original's Trans-Net: s = std (given correction) + eps, 1 on 1x1."""
    def s(t):
        if t.shape[2] * t.shape[3] == 1:
            return torch.ones_like(t[:, :, :1, :1])
        return t.std(dim=(2, 3), keepdim=True, correction=correction) + eps
    pad = weights[0].shape[-1] // 2
    xh = x / s(x)
    out = F.conv2d(xh, weights[0], padding=pad)
    for j in range(1, len(weights)):
        out = F.conv2d(xh + probs[j - 1] * F.relu(out / s(out)), weights[j], padding=pad)
    return out


@pytest.mark.parametrize("size", [8, 4])
def test_the_two_std_conventions_differ_by_the_bessel_factor(size):
    """Before: only the population std existed; the original's components were sqrt(HW/(HW-1)) smaller."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, size, size, dtype=torch.double)
    pop = TransNet(4, 2, 3, "instance", eps=0.0).double().eval()
    unb = TransNet(4, 2, 3, "instance", eps=0.0, std_correction=1).double().eval()
    unb.load_state_dict(pop.state_dict())
    c = math.sqrt(size * size / (size * size - 1))      # 1.0079 at 8x8, 1.0328 at 4x4
    probs = torch.sigmoid(pop.gate_logits)
    torch.testing.assert_close(unb(x), _reference_forward(x, [m.weight for m in pop.convs], probs, 1, 0.0),
                               rtol=1e-10, atol=1e-10)
    for yp, yu in zip(pop.decompose(x)[0], unb.decompose(x)[0]):
        torch.testing.assert_close(yp, yu * c, rtol=1e-10, atol=1e-10)    # every component, the same factor


# --------------------------------------------------------------------------- 6. the original's checkpoints

def _original_checkpoint(path: Path, weights, logits, prefix="module.", extra=None) -> Path:
    """A checkpoint in the original code's layout (its training script's torch.save dict)."""
    state = {f"{prefix}linearLayers_conv.{j}.weight": w.float() for j, w in enumerate(weights)}
    state[f"{prefix}nonLinearLayers_p_pre"] = logits.float()
    state.update(extra or {})
    torch.save({"epoch": 800, "arch": "vgg16_bn", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": torch.tensor(1e-6), "params": [0, 1, 2, 3]}]}},
               path)
    return path


def _teacher(c=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(c, c, k, k, generator=g, dtype=torch.double) * 0.3 for _ in range(3)]
    return weights, torch.tensor([1.5, -0.8], dtype=torch.double)      # forward order: q_0 after conv 0


def test_import_transnet_reproduces_the_original_forward_and_feeds_the_analysis(tmp_path, cli):
    weights, logits = _teacher()
    probs = torch.sigmoid(logits)
    a, ta = _normal(64, 0, s=5), _normal(32, 1, s=5)
    with torch.no_grad():
        b, tb = (_reference_forward(torch.from_numpy(v).double(), weights, probs, 1).float().numpy() for v in (a, ta))
        swapped = _reference_forward(torch.from_numpy(ta).double(), weights, probs.flip(0), 1)
    assert float((swapped - torch.from_numpy(tb).double()).abs().max()) > 1e-2     # the gate order matters here
    f = write_features(tmp_path / "f.h5", {"train": {"A": a, "B": b}, "test": {"A": ta, "B": tb}})
    ck = _original_checkpoint(tmp_path / "checkpoint_L30_.pth.tar", weights, logits)
    run = tmp_path / "cons" / "pairs" / "A__B"
    code, text, err = cli("import-transnet", "--checkpoint", ck, "--features", f, "--source", "A", "--target", "B",
                          "--layer", LAYER, "--device", "cpu", "--out_dir", run)
    assert code == 0, err
    assert "held-out R² 1.0000" in text
    m = read_json(run / "metrics.json")
    assert m["imported"] and m["held_out"] and m["r2"] > 0.99999 and m["std_correction"] == 1
    cfg = read_json(run / "config.json")
    assert cfg["kind"] == "import-transnet"
    assert cfg["imported"]["sha256"] == hashlib.sha256(ck.read_bytes()).hexdigest()
    assert cfg["imported"]["mapping"] == {"linearLayers_conv.0.weight": "convs.0.weight",
                                          "linearLayers_conv.1.weight": "convs.1.weight",
                                          "linearLayers_conv.2.weight": "convs.2.weight",
                                          "nonLinearLayers_p_pre": "gate_logits[0:2]"}
    assert cfg["imported"]["original_epoch"] == 800 and cfg["imported"]["assumptions"]
    model, info = load_transnet(run)
    assert (model.std_correction, info["source"], info["layer"]) == (1, "A", LAYER)
    with torch.no_grad():
        torch.testing.assert_close(model(torch.from_numpy(ta)).double(), torch.from_numpy(tb).double(),
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.gates(), probs.flip(0).float())   # gates() lists order 1 (nearest output) first

    code, _, err = cli("variance", "--transnet", run, "--split", "train", "--device", "cpu")
    assert code == 0, err
    var = read_json(run / "variance_train.json")
    assert var["held_out"] is False and var["r2"] > 0.99999
    code, text, err = cli("consistency", "--features", f, "--layer", LAYER, "--pairs", "A>B", "--device", "cpu",
                          "--no_figures", "--resume", "--out_dir", tmp_path / "cons")
    assert code == 0, err
    assert "(1 reused)" in text
    row = read_json(tmp_path / "cons" / "table.json")["rows"][0]
    assert row["imported"] is True and row["r2"] == pytest.approx(m["r2"])
    code, _, err = cli("visualize", "--what", "panel", "--transnet", run, "--rows", "0,1", "--channels", "0",
                       "--out_dir", tmp_path / "fig")
    assert code == 0, err
    assert any(p.suffix == ".png" for p in (tmp_path / "fig").iterdir())


def test_the_importer_names_missing_and_unsupported_keys(tmp_path):
    weights, logits = _teacher()
    state = original_state(torch.load(_original_checkpoint(tmp_path / "c.pt", weights, logits), weights_only=True))
    assert sorted(state)[0] == "linearLayers_conv.0.weight"                 # the DataParallel prefix is gone
    with pytest.raises(UserError, match=r"expected linearLayers_conv\.0\.weight .* found conv1\.weight"):
        map_original({"conv1.weight": weights[0]})
    with pytest.raises(UserError, match="no gate vector .* found linearLayers_conv.0.weight"):
        map_original({k: v for k, v in state.items() if "conv" in k})
    with pytest.raises(UserError, match="running_times"):
        map_original({**state, "running_times": torch.zeros(3)})
    probs = {**{k: v for k, v in state.items() if "conv" in k}, "nonLinearLayers_p": torch.sigmoid(logits)}
    _, got, mapping = map_original(probs)
    torch.testing.assert_close(got, logits, rtol=1e-6, atol=1e-6)
    assert "via logit(p)" in mapping["nonLinearLayers_p"]
    # the original allocates 2 gates even for a 2-conv net: the first K are used, the rest named as unused
    two = {"linearLayers_conv.0.weight": weights[0], "linearLayers_conv.1.weight": weights[1],
           "nonLinearLayers_p_pre": logits}
    _, got, mapping = map_original(two)
    assert got.tolist() == [1.5] and "unused" in mapping["nonLinearLayers_p_pre"]


def test_import_refuses_a_checkpoint_that_does_not_fit_the_features(tmp_path, cli):
    weights, logits = _teacher(c=3)
    ck = _original_checkpoint(tmp_path / "c.pt", weights, logits)
    f = write_features(tmp_path / "f.h5", {"test": {"A": _normal(8, 0), "B": _normal(8, 1)}})
    code, _, err = cli("import-transnet", "--checkpoint", ck, "--features", f, "--source", "A", "--target", "B",
                       "--layer", LAYER, "--device", "cpu", "--out_dir", tmp_path / "o")
    assert code != 0 and "maps 3 -> 3 channels" in err and "4 -> 4" in err


# --------------------------------------------------------------------------- 7. precision

def test_every_precision_computes_fp32_on_the_cpu_and_is_recorded(tmp_path):
    f = write_features(tmp_path / "f.h5", {"train": {"A": _normal(64, 0), "B": _normal(64, 1)},
                                           "test": {"A": _normal(32, 2), "B": _normal(32, 3)}})
    runs = {p: fit_transnet(FitConfig(features=str(f), epochs=2, precision=p, **FAST), tmp_path / p) for p in PRECISIONS}
    assert [(m["precision"], m["precision_effective"]) for m in runs.values()] == [
        ("fp32", "fp32"), ("tf32", "fp32"), ("bf16", "fp32")]
    assert read_json(tmp_path / "bf16" / "config.json")["precision_effective"] == "fp32"
    ref = load_transnet(tmp_path / "fp32")[0].state_dict()
    for p in ("tf32", "bf16"):
        assert runs[p]["r2"] == runs["fp32"]["r2"]
        assert all(torch.equal(v, ref[k]) for k, v in load_transnet(tmp_path / p)[0].state_dict().items())
    with pytest.raises(UserError, match="unknown --precision 'fp16'; valid: fp32, tf32, bf16"):
        fit_transnet(FitConfig(features=str(f), precision="fp16", **FAST), tmp_path / "bad")


def test_precision_contexts_set_tf32_only_on_cuda_and_restore_it():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with float32_math(cpu, "tf32"):
        assert (conv.fp32_precision, matmul.fp32_precision) == before          # CPU: nothing touched
    with precision_autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    for name, mode in (("fp32", "ieee"), ("tf32", "tf32"), ("bf16", "tf32")):     # the CUDA path's flags
        with float32_math(cuda, name):
            assert (conv.fp32_precision, matmul.fp32_precision) == (mode, mode)
        assert (conv.fp32_precision, matmul.fp32_precision) == before
    assert effective_precision(cpu, "bf16") == "fp32" and effective_precision(cuda, "bf16") == "bf16"


def test_variance_reports_run_in_ieee_fp32_whatever_the_fit_precision(monkeypatch):
    import transnet.variance as variance

    seen, real = [], variance.float32_math

    def spy(device, precision):
        seen.append((torch.device(device).type, precision))
        return real(device, precision)

    monkeypatch.setattr(variance, "float32_math", spy)
    net = TransNet(4, 2, 3, "instance")
    x = torch.randn(3, 4, 5, 5)
    rep = variance.variance_report(net, [(x, x)], device="cpu", split="test")
    assert seen == [("cpu", "fp32")] and rep["n_samples"] == 3
