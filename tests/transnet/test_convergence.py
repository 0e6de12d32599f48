"""Convergence of Trans-Net fits: validation rows, the verdict rule on hand-made curves, the plateau
stop, and fits that are (not) converged on planted features."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from common.errors import UserError
from common.files import read_json
from tests.fakedata import FIT_LAYER, write_features_by_split
from transnet.convergence import MAX_REL_DROP, RULE, plateau_stop, val_loss_rel_drop, validation_rows, verdict
from transnet.fit import FitConfig, fit_transnet, validate
from transnet.variance_file import run_variance

KEYS = {"verdict", "reasons", "rule", "val_loss_rel_drop", "epochs_run", "epochs_max", "stopped_early"}
GOOD = {"split": "test", "r2": 0.8, "var_target": 1.0, "var_reconstruction": 0.8, "fraction_orders": [0.7, 0.1]}


# --------------------------------------------------------------------------- the rule, by hand

def test_validation_rows_are_a_seeded_sorted_subset_of_the_training_rows():
    rows = validation_rows(200, 0.1, seed=3)
    assert len(rows) == 20 and np.all(np.diff(rows) > 0) and rows.min() >= 0 and rows.max() < 200
    assert np.array_equal(rows, validation_rows(200, 0.1, seed=3))
    assert not np.array_equal(rows, validation_rows(200, 0.1, seed=4))
    assert len(validation_rows(200, 0.0, 0)) == 0 and len(validation_rows(5, 0.01, 0)) == 1
    assert len(validation_rows(3, 0.9, 0)) == 2                      # at least one row left to train on


def test_relative_drop_is_taken_over_the_last_tenth_of_the_epochs():
    curve = [1.0 / (t + 1) for t in range(40)]                        # still falling as 1/t
    k = math.ceil(0.1 * 40)
    assert val_loss_rel_drop(curve) == pytest.approx((curve[-1 - k] - curve[-1]) / curve[-1 - k])
    assert val_loss_rel_drop([2.0, 1.0]) == pytest.approx(0.5)
    spiky = [1.0] * 18 + [3.0, 0.999]                                 # a spike at the window's start
    assert val_loss_rel_drop(spiky) == pytest.approx(0.001)           # best against best: 0.1 %, not 67 %
    assert val_loss_rel_drop([1.0]) is None and val_loss_rel_drop([None, None]) is None
    assert val_loss_rel_drop([1.0, float("nan")]) is None


def test_a_falling_curve_is_not_converged_and_a_plateau_is():
    falling = [1.0 / (t + 1) for t in range(40)]
    v = verdict(falling, GOOD, 40, 40)
    assert v["verdict"] == "not converged" and set(v) == KEYS and v["rule"] == RULE
    assert "still fell by" in v["reasons"][0] and v["val_loss_rel_drop"] > MAX_REL_DROP
    plateau = [0.2 + 0.8 * math.exp(-t / 3) for t in range(60)]       # flat to 1e-6 over the last 6 epochs
    v = verdict(plateau, GOOD, 60, 1000)
    assert v["verdict"] == "converged" and v["reasons"] == [] and v["stopped_early"] is True
    assert (v["epochs_run"], v["epochs_max"]) == (60, 1000)
    rising = [1.0, 0.5, 0.6]                                          # over-fitting: not "still dropping"
    assert verdict(rising, GOOD, 3, 3)["verdict"] == "converged"


def test_negative_r2_or_inflated_variance_is_not_converged_whatever_the_curve():
    flat = [1.0] * 20
    bad_r2 = verdict(flat, {**GOOD, "r2": -2.99}, 20, 20)
    assert bad_r2["verdict"] == "not converged" and "R² -2.990" in bad_r2["reasons"][0]
    inflated = verdict(flat, {**GOOD, "var_reconstruction": 2.5, "fraction_orders": [7.1, 0.1]}, 20, 20)
    assert inflated["verdict"] == "not converged" and len(inflated["reasons"]) == 2
    assert "2.5x" in inflated["reasons"][0] and "order 0 has 7.1x" in inflated["reasons"][1]
    assert verdict([], GOOD, 5, 5)["verdict"] == "unknown"           # no validation curve
    assert verdict([], {**GOOD, "r2": -0.1}, 5, 5)["verdict"] == "not converged"


def test_plateau_stop_waits_patience_epochs_after_the_last_real_improvement():
    stop = plateau_stop(patience=3)
    losses = [1.0, 0.5, 0.4, 0.3999, 0.39995, 0.4, 0.41]              # 0.3999 improves by < 0.1 %: no progress
    asked = [stop([{"val_loss": v} for v in losses[:i + 1]]) for i in range(len(losses))]
    assert asked == [False, False, False, False, False, True, True]   # best at epoch 3; 3 epochs later: stop
    assert not stop([{"train_loss": 1.0}] * 10)                       # no validation loss: never stops


# --------------------------------------------------------------------------- fits on planted features

def _planted(path, n_train=160, n_test=64, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(3, 3)).astype(np.float32)

    def pair(n):
        a = rng.normal(size=(n, 3, 3, 3)).astype(np.float32)
        b = np.einsum("oc,nchw->nohw", mix, a) + 0.3 * rng.normal(size=(n, 3, 3, 3)).astype(np.float32)
        return {"A": a, "B": b.astype(np.float32)}

    return write_features_by_split(path, {"train": pair(n_train), "test": pair(n_test)})


BASE = dict(source="A", target="B", layer=FIT_LAYER, orders=1, kernel=1, input_norm="global", alpha="0",
            lr=3e-2, final_lr=1e-4, schedule="cosine", weight_decay=0.0, batch_size=32, eval_every=1000,
            save_every=1000, device="cpu")


def test_a_fit_with_too_few_epochs_is_not_converged_and_says_so_everywhere(tmp_path):
    f = _planted(tmp_path / "f.h5")
    m = fit_transnet(FitConfig(features=str(f), epochs=3, **{**BASE, "lr": 2e-3}), tmp_path / "run")
    conv = m["convergence"]
    assert set(conv) == KEYS and conv["verdict"] == "not converged" and conv["epochs_run"] == 3
    assert m["schedule"] == "paper-fixed" and (m["n_train"], m["n_val"]) == (144, 16)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and all("train_loss" in r and "val_loss" in r for r in log)
    cfg = read_json(tmp_path / "run" / "config.json")
    assert cfg["val_rows"] == validation_rows(160, 0.1, 0).tolist() and cfg["n_val"] == 16
    assert run_variance(tmp_path / "run", split="test", device="cpu")["convergence"] == conv
    assert read_json(tmp_path / "run" / "variance.json")["convergence"] == conv


@pytest.mark.slow
def test_epochs_auto_stops_on_a_plateau_within_001_of_a_long_fit(tmp_path, cli):
    f = _planted(tmp_path / "f.h5")
    long = fit_transnet(FitConfig(features=str(f), epochs=100, **BASE), tmp_path / "long")
    args = [f"--{k}={v}" for k, v in BASE.items() if k not in ("source", "target", "layer")]
    code, out, err = cli("fit-transnet", "--features", f, "--source", "A", "--target", "B", "--layer", FIT_LAYER,
                         *args, "--epochs", "auto", "--max_epochs", "100", "--patience", "8",
                         "--out_dir", tmp_path / "auto")
    assert code == 0, err
    auto = read_json(tmp_path / "auto" / "metrics.json")
    assert auto["schedule"] == "auto-plateau" and auto["convergence"]["stopped_early"]
    assert auto["epochs"] < 100 and auto["convergence"]["verdict"] == "converged"
    assert abs(auto["r2"] - long["r2"]) < 0.01 and long["convergence"]["verdict"] == "converged"
    assert "convergence: converged after" in out


def test_bad_epoch_and_validation_options_are_named():
    with pytest.raises(UserError, match="whole number or 'auto', got 'many'"):
        FitConfig(features="f", source="a", target="b", layer="l", epochs="many")
    auto = FitConfig(features="f", source="a", target="b", layer="l", epochs="auto")
    assert auto.auto and auto.epoch_cap == 1000 and FitConfig(epochs="25").epochs == 25
    with pytest.raises(UserError, match="needs --val_fraction > 0"):
        validate(replace(auto, val_fraction=0.0))
    with pytest.raises(UserError, match=r"--val_fraction must be in \[0, 1\)"):
        validate(replace(auto, val_fraction=1.0))


@pytest.mark.parametrize("given, want", [({}, "auto"), ({"epochs": "auto"}, "auto"), ({"epochs": 25}, 25)])
def test_a_study_fits_its_trans_nets_until_a_plateau_unless_it_fixes_the_epochs(tmp_path, given, want):
    import yaml

    from studies.spec import fit_config, load_study

    study = {"name": "s", "data": {"dataset": "animal-mnist"}, "members": {"seeds": {"arch": "vgg_tiny",
                                                                                     "seeds": [0, 1]}},
             "extract": {"layers": ["features.8"]}, "transnet": {"lr": 0.01, **given},
             "pairs": [{"family": "seeds", "plan": "all"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    assert fit_config(load_study(tmp_path / "s.yaml")).epochs == want
    study["transnet"]["epochs"] = "lots"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    with pytest.raises(UserError, match="'auto', got 'lots'"):
        load_study(tmp_path / "s.yaml")
