"""Trustworthy numbers at the edges: 1x1 maps, spatially constant source slices, in-sample
reports, ±inf in JSON files, and the --precision option. Each test fails on the code before the fix.
Tiny tensors on the CPU."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analysis.consistency import ConsistencyConfig, held_out_label, pair_row, read_table, run_consistency
from analysis.readings import consistency_readings, pair_reading
from common.device import autocast, cuda_float32_flags, float32_math, precision_autocast, tf32_mode
from common.errors import UserError
from common.files import NONFINITE_KEY, jsonable, read_json, write_json
from tests.fakedata import FAST_FIT, FAST_FIT_ARGS, planted_features, write_features_by_split
from tests.fakedata import FAST_FIT_KWARGS as FAST
from transnet.fit import FitConfig, fit_transnet, load_transnet, validate
from transnet.model import EPS, TransNet, TransNetConfig, constant_slices, instance_std
from transnet.summary import summary_line
from transnet.variance_file import run_variance

# The paper's preset (instance input norm, 3x3 kernels, 2 orders) with a fast schedule.
FAITHFUL_FAST = {k: v for k, v in FAST.items() if k not in ("input_norm", "kernel")}


# =========================================================================== 1. 1x1 feature maps

def test_instance_std_of_a_1x1_map_is_one():
    x = torch.randn(5, 3, 1, 1, dtype=torch.float64) * 7.0
    s = instance_std(x)
    assert s.shape == (5, 3, 1, 1) and torch.equal(s, torch.ones_like(s))       # before: eps = 1e-5
    assert torch.equal(instance_std(x, correction=1), torch.ones_like(s))       # unbiased std would be NaN
    assert torch.equal(TransNet(TransNetConfig(3, 2, 3, "instance")).double().normalise_input(x), x)


def test_1x1_forward_equals_the_unit_std_formula():
    """On 1x1 maps a k x k conv with same padding reduces to its centre tap and s = 1 at every level:
    ŷ = W2 (x + p1 ReLU(W1 (x + p0 ReLU(W0 x))))."""
    torch.manual_seed(0)
    net = TransNet(TransNetConfig(4, 2, 3, "instance")).double().eval()
    net.set_gates([0.7, 0.4])                                              # order 1 first: p1, p0
    x = torch.randn(6, 4, 1, 1, dtype=torch.float64)
    w = [c.weight[:, :, 1, 1] for c in net.convs]                          # centre taps (C, C)
    p0, p1 = 0.4, 0.7
    v = x[:, :, 0, 0]                                                      # (N, C)
    h0 = v @ w[0].T
    h1 = (v + p0 * F.relu(h0)) @ w[1].T
    y = (v + p1 * F.relu(h1)) @ w[2].T
    with torch.no_grad():
        got = net(x)[:, :, 0, 0]
        comps, yhat = net.decompose(x)
    assert torch.allclose(got, y, atol=1e-12)
    assert torch.allclose(sum(comps), yhat, atol=1e-12)


@pytest.mark.slow
def test_planted_linear_1x1_target_is_fitted_in_the_faithful_preset(tmp_path):
    """B = W A + noise on (N, 8, 1, 1) maps (an avgpool-like layer). Before the fix x̂ = x / eps:
    held-out R² -6.5e24 and max |ŷ| 5.6e13; the original code (s = 1) fits it."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)

    def pair(n, seed):
        a = np.random.default_rng(seed).standard_normal((n, 8, 1, 1)).astype(np.float32)
        return a, np.einsum("oc,nchw->nohw", w, a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32)

    (a, b), (ta, tb) = pair(512, 1), pair(256, 2)
    f = write_features_by_split(tmp_path / "f.h5", {"train": {"A": a, "B": b}, "test": {"A": ta, "B": tb}})
    m = fit_transnet(FitConfig(features=str(f), epochs=60, **FAITHFUL_FAST), tmp_path / "run")
    assert m["r2"] >= 0.95 and m["held_out"]
    net, _ = load_transnet(tmp_path / "run")
    with torch.no_grad():
        assert float(net(torch.from_numpy(ta)).abs().max()) < 10 * float(np.abs(tb).max())


# =========================================================================== 2. constant source slices

def _with_constant_slices(x: np.ndarray, where: list[tuple[int, int, float]]) -> np.ndarray:
    x = x.copy()
    for n, c, v in where:
        x[n, c] = v
    return x


def test_constant_slices_are_found_exactly_in_any_dtype():
    x = torch.randn(4, 3, 5, 5)
    x[1, 2] = 0.5                      # constant, non-zero: found
    x[3, 0] = -2.0                     # found
    x[0, 1] = 0.0                      # constant zero: x / eps = 0, harmless, not counted
    x[2, 2] = 0.25
    x[2, 2, 4, 4] = 0.2500001          # nearly constant: not counted
    want = np.zeros((4, 3), dtype=bool)
    want[1, 2] = want[3, 0] = True
    for dtype in (torch.float32, torch.float16, torch.float64):
        assert np.array_equal(constant_slices(x.to(dtype)).numpy(), want if dtype != torch.float16 else
                              want | (np.arange(12).reshape(4, 3) == 8))       # fp16 rounds 0.2500001 to 0.25
    assert not constant_slices(torch.randn(4, 3, 1, 1)).any()                  # 1x1 maps: s = 1, nothing to warn


def test_std_floor_bounds_a_constant_slice_and_keeps_the_rest_and_the_scale_invariance():
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    x[1, 2] = 0.5
    faithful = TransNet(TransNetConfig(4, 2, 3, "instance")).double().eval()
    floored = TransNet(TransNetConfig(4, 2, 3, "instance", std_floor=0.01)).double().eval()
    floored.load_state_dict(faithful.state_dict())
    assert float(faithful.normalise_input(x)[1, 2].abs().max()) == pytest.approx(0.5 / EPS)   # the paper's preset
    xf = floored.normalise_input(x)
    assert float(xf[1, 2].abs().max()) <= 1 / 0.01
    ok = torch.ones(3, 4, dtype=torch.bool)
    ok[1, 2] = False
    assert torch.equal(xf[ok], faithful.normalise_input(x)[ok])               # std >> 0.01 rms elsewhere
    # The floor scales like the std, so the faithful mode's scale invariance stays (exact with eps = 0).
    no_eps = TransNet(TransNetConfig(4, 2, 3, "instance", std_floor=0.01, eps=0.0)).double().eval()
    no_eps.load_state_dict(faithful.state_dict())
    scale = torch.rand(3, 4, 1, 1, dtype=torch.float64) * 5 + 0.1
    with torch.no_grad():
        assert torch.allclose(no_eps(x * scale), no_eps(x), atol=1e-10, rtol=1e-10)
        comps, yhat = floored.decompose(x)
    assert torch.allclose(sum(comps), yhat, atol=1e-9)
    with pytest.raises(UserError, match="--std_floor must be in"):
        validate(FitConfig(features="f", source="A", target="B", layer="L", std_floor=-0.1))


@pytest.mark.parametrize("data_on", ["ram", "disk"])
def test_fit_counts_constant_source_slices_and_warns_in_metrics_and_the_table(tmp_path, data_on):
    rng = np.random.default_rng(3)
    a = _with_constant_slices(rng.standard_normal((128, 4, 6, 6)).astype(np.float32), [(5, 1, 0.5), (9, 3, -1.0)])
    ta = _with_constant_slices(rng.standard_normal((64, 4, 6, 6)).astype(np.float32), [(7, 2, 0.25)])
    f = write_features_by_split(tmp_path / "f.h5", {"train": {"A": a, "B": a[:, ::-1].copy()},
                                                    "test": {"A": ta, "B": ta[:, ::-1].copy()}})
    base = FitConfig(features=str(f), epochs=2, data_on=data_on, block_rows=32, **FAITHFUL_FAST)
    m = fit_transnet(base, tmp_path / "run")
    assert (m["train_constant_source_slices"], m["train_source_slices"]) == (2, 128 * 4)
    assert (m["constant_source_slices"], m["source_slices"]) == (1, 64 * 4)
    assert any("1 of 256" in w and "'test'" in w and "divided by eps" in w for w in m["warnings"])
    assert any("2 of 512" in w and "'train'" in w for w in m["warnings"])
    assert read_json(tmp_path / "run" / "metrics.json")["warnings"] == m["warnings"]
    row = pair_row(m)
    assert row["constant_source_slices"] == 1 and "spatially constant" in row["warnings"]
    assert "warning: 1 of 256" in summary_line(m)
    # The variance command counts and warns too.
    rep = run_variance(tmp_path / "run", split="test", device="cpu")
    assert rep["constant_source_slices"] == 1 and "spatially constant" in rep["warning"]

    floored = fit_transnet(replace(base, std_floor=0.01), tmp_path / "floored")
    assert floored["std_floor"] == 0.01 and floored["constant_source_slices"] == 1
    assert any("--std_floor 0.01 bounds" in w for w in floored["warnings"])
    net, _ = load_transnet(tmp_path / "floored")
    assert net.cfg.std_floor == 0.01 and float(net.normalise_input(torch.from_numpy(ta)).abs().max()) <= 100
    # Without the instance norm nothing is divided by the slice's zero std: counted, no warning.
    glob = fit_transnet(replace(base, input_norm="global", kernel=1), tmp_path / "global")
    assert glob["constant_source_slices"] == 1 and not glob["warnings"]


# =========================================================================== 3. in-sample reports

@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(4)
    a, ta = rng.standard_normal((128, 4, 6, 6)).astype(np.float32), rng.standard_normal((64, 4, 6, 6)).astype(np.float32)
    return write_features_by_split(tmp_path_factory.mktemp("pair") / "f.h5", {"train": {"A": a, "B": 2 * a},
                                                                               "test": {"A": ta, "B": 2 * ta}})


def test_fit_on_the_training_split_is_labelled_in_sample(pair_file, tmp_path):
    m = fit_transnet(FitConfig(features=str(pair_file), epochs=2, eval_split="train", **FAST), tmp_path / "in")
    assert m["held_out"] is False and m["split"] == "train"                     # before: "held_out": true
    assert m["warnings"][0].startswith("in-sample report: split 'train' is the training split")
    assert "in-sample R²" in summary_line(m) and "warning: in-sample" in summary_line(m)
    assert read_json(tmp_path / "in" / "config.json")["held_out"] is False
    part = fit_transnet(FitConfig(features=str(pair_file), epochs=1, eval_split="train", train_rows=32, **FAST),
                        tmp_path / "part")
    assert "first 32 of 128 rows" in part["warning"]
    none = fit_transnet(FitConfig(features=str(pair_file), epochs=1, eval_split="none", **FAST), tmp_path / "none")
    assert none["held_out"] is False and "in-sample" in none["warning"]
    held = fit_transnet(FitConfig(features=str(pair_file), epochs=1, **FAST), tmp_path / "held")
    assert held["held_out"] is True and not held["warnings"]
    rep = run_variance(tmp_path / "held", split="train", device="cpu")
    assert rep["held_out"] is False and "in-sample" in rep["warning"]


@pytest.mark.slow
def test_consistency_on_the_training_split_labels_and_warns(tmp_path, cli):
    f = planted_features(tmp_path / "planted.h5")
    out = tmp_path / "cons"
    code, stdout, err = cli("consistency", "--features", f, "--layer", "conv", "--pairs", "a>b", "--nets", "a,b",
                            "--split", "train", *FAST_FIT_ARGS, "--out_dir", out)
    assert code == 0, err
    assert "is the fits' --train_split: every report is in-sample" in stdout
    (row,) = read_table(out)
    assert row["held_out"] is False and row["warnings"].startswith("in-sample report")
    assert "held_out" in (out / "table.csv").read_text().splitlines()[0].split(",")
    assert read_json(out / "metrics.json")["in_sample_pairs"] == ["a>b"]
    assert held_out_label([row]) == "In-sample" and held_out_label([row, {**row, "held_out": True}]).startswith("Held")
    assert "in-sample R²" in pair_reading(row)
    readings = consistency_readings([row], "conv")
    assert readings[0].startswith("Warning: 1 of 1 pair(s) (a→b) are scored on their training split")
    held = run_consistency(ConsistencyConfig(str(f), "conv", "a>b", "a,b"), FAST_FIT, tmp_path / "held",
                           log=lambda m: None)
    assert held["rows"][0]["held_out"] is True and "held-out R²" in pair_reading(held["rows"][0])
    assert not consistency_readings(held["rows"], "conv")[0].startswith("Warning")


# =========================================================================== 5. ±inf in JSON

def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_write_json_maps_inf_and_nan_to_null_and_records_why(tmp_path):
    body = {"r2": -math.inf, "mse": math.inf, "var_target": 2.0, "gates": [0.5, float("nan")],
            "nested": {"m": np.array([[1.0, np.inf]]), "t": torch.tensor([-np.inf])}, "n": np.float32(np.nan)}
    write_json(tmp_path / "m.json", body)                       # before: ValueError (Out of range float values)
    text = (tmp_path / "m.json").read_text()
    got = _strict(text)
    assert "Infinity" not in text and "NaN" not in text
    assert got["r2"] is None and got["mse"] is None and got["var_target"] == 2.0 and got["gates"] == [0.5, None]
    assert got["nested"] == {"m": [[1.0, None]], "t": [None]} and got["n"] is None
    assert got[NONFINITE_KEY] == {"r2": "-inf", "mse": "inf", "gates[1]": "nan", "nested.m[0][1]": "inf",
                                  "nested.t[0]": "-inf", "n": "nan"}
    # Re-writing what was read keeps the earlier reasons; a finite body gets no such key.
    write_json(tmp_path / "m2.json", {**got, "extra": -math.inf})
    assert read_json(tmp_path / "m2.json")[NONFINITE_KEY] == {**got[NONFINITE_KEY], "extra": "-inf"}
    write_json(tmp_path / "ok.json", {"r2": 0.5})
    assert NONFINITE_KEY not in read_json(tmp_path / "ok.json")
    write_json(tmp_path / "list.json", [1.0, math.inf])
    assert _strict((tmp_path / "list.json").read_text()) == [1.0, None]
    assert jsonable({"a": -math.inf}) == {"a": None}


def test_a_diverged_pairs_minus_inf_r2_reaches_the_table_as_a_named_undefined_value(tmp_path):
    report = {"split": "test", "n_samples": 8, "source": "a", "target": "b", "layer": "L", "var_target": 1.0,
              "var_orders": [math.inf, 0.1], "var_residual": math.inf, "fraction_orders": [math.inf, 0.1],
              "fraction_residual": math.inf, "r2": -math.inf, "gates": [0.5], "mse": math.inf}
    write_json(tmp_path / "metrics.json", report)
    row = pair_row(read_json(tmp_path / "metrics.json"))
    assert row["r2"] is None and "r2 (-inf)" in row["warnings"] and "var_order0 (inf)" in row["warnings"]
    assert "fraction_order1" not in row["warnings"] and row["fraction_order1"] == 0.1


# =========================================================================== 7. --precision

def test_precision_choices_are_checked(tmp_path, cli):
    with pytest.raises(UserError, match="unknown --precision 'fp16'; valid: fp32, tf32, bf16"):
        validate(FitConfig(features="f", source="A", target="B", layer="L", precision="fp16"))
    assert FitConfig.precision == "fp32"                        # the paper-faithful default
    with pytest.raises(SystemExit) as e:                        # argparse: the choices, no traceback
        cli("fit-transnet", "--features", "f.h5", "--source", "A", "--target", "B", "--layer", "L",
            "--precision", "fp16", "--out_dir", tmp_path / "x")
    assert e.value.code != 0 and not (tmp_path / "x").exists()


def test_every_precision_computes_in_fp32_on_the_cpu_and_is_recorded(pair_file, tmp_path):
    runs = {p: fit_transnet(FitConfig(features=str(pair_file), epochs=2, precision=p, **FAST), tmp_path / p)
            for p in ("fp32", "tf32", "bf16")}
    for p, m in runs.items():
        assert m["precision"] == p and m["precision_effective"] == "fp32"
        assert read_json(tmp_path / p / "config.json")["precision_effective"] == "fp32"
    assert runs["bf16"]["r2"] == runs["fp32"]["r2"] == runs["tf32"]["r2"]       # bitwise: no bf16 on the CPU
    assert runs["bf16"]["train_mse"] == runs["fp32"]["train_mse"]
    x = torch.randn(4, 8)
    with precision_autocast(torch.device("cpu"), "bf16"):
        assert (x @ x.T).dtype == torch.float32
    with autocast(torch.device("cpu"), True):                   # the training/extraction context is unchanged
        assert (x @ x.T).dtype == torch.float32


def test_fp32_switches_tf32_off_for_cuda_convs_and_matmuls_and_restores_the_flags():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = (conv.fp32_precision, matmul.fp32_precision)
    assert (tf32_mode("fp32"), tf32_mode("tf32"), tf32_mode("bf16")) == ("ieee", "tf32", "tf32")
    with cuda_float32_flags(tf32_mode("fp32")):                 # what float32_math does on a CUDA device
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        with cuda_float32_flags(tf32_mode("tf32")):
            assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "tf32")
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before
    with float32_math(torch.device("cpu"), "fp32"):            # off CUDA: nothing to switch
        assert (conv.fp32_precision, matmul.fp32_precision) == before
    with pytest.raises(UserError, match="valid: fp32, tf32, bf16"):
        tf32_mode("fp64")


def test_variance_reports_run_in_ieee_fp32_whatever_the_fit_precision(monkeypatch):
    import transnet.variance as variance

    seen, real = [], variance.float32_math

    def spy(device, precision):
        seen.append((torch.device(device).type, precision))
        return real(device, precision)

    monkeypatch.setattr(variance, "float32_math", spy)
    net = TransNet(TransNetConfig(4, 2, 3, "instance"))
    x = torch.randn(3, 4, 5, 5)
    rep = variance.variance_report(net, [(x, x)], device="cpu", split="test")
    assert seen == [("cpu", "fp32")] and rep["n_samples"] == 3
