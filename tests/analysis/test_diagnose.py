"""Network diagnosis: residual statistics against numpy references, ranking, and a planted blind spot
(one channel and one image of net d that net a cannot rebuild) found by the ``diagnose`` command."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from analysis.consistency import ConsistencyConfig, run_consistency
from analysis.diagnose import (
    DiagnoseConfig,
    ResidualAccumulator,
    decompose_rows,
    diagnose_pair,
    rank_top,
    run_diagnosis,
    summarise,
)
from common.errors import UserError
from tests.fakedata import FAST_FIT, PLANTED_CHANNEL, PLANTED_ROW, planted_features
from transnet.model import TransNet, TransNetConfig


def test_streamed_residual_statistics_equal_a_numpy_reference():
    rng = np.random.default_rng(0)
    target = rng.normal(loc=rng.normal(size=(1, 3, 1, 1)), size=(20, 3, 5, 4))
    resid = rng.normal(size=target.shape) * np.array([0.1, 1.0, 2.0])[None, :, None, None]
    acc = ResidualAccumulator()
    for s in range(0, 20, 7):                                   # uneven blocks
        acc.update(resid[s:s + 7], target[s:s + 7])
    out = acc.result()
    mu = target.mean(axis=(0, 2, 3), keepdims=True)
    tc2 = (target - mu) ** 2                                    # centred per channel over samples and positions
    r2 = resid ** 2
    np.testing.assert_allclose(out["channel_energy"], r2.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(out["channel_variance"], tc2.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(out["channel_relative"], r2.mean(axis=(0, 2, 3)) / tc2.mean(axis=(0, 2, 3)))
    np.testing.assert_allclose(out["position_relative"], r2.mean(axis=(0, 1)) / tc2.mean(axis=(0, 1)))
    np.testing.assert_allclose(out["image_relative"], r2.mean(axis=(1, 2, 3)) / tc2.mean(axis=(1, 2, 3)))
    np.testing.assert_allclose(out["image_channel_relative"],
                               r2.mean(axis=(2, 3)) / tc2.mean(axis=(0, 2, 3))[None, :])
    assert out["relative"] == pytest.approx(r2.mean() / tc2.mean())
    assert out["n"] == 20


def test_a_constant_target_channel_gives_null_not_nan_and_a_warning():
    target = np.random.default_rng(1).normal(size=(6, 2, 3, 3))
    target[:, 1] = 4.0
    acc = ResidualAccumulator()
    acc.update(np.ones_like(target), target)
    summary = summarise(acc.result(), np.arange(6), np.zeros(6, dtype=int), top=3)
    assert np.isnan(summary["channel_relative"][1])
    assert [c["channel"] for c in summary["top_channels"]] == [0]
    assert "zero variance" in summary["warnings"][0]


def test_rank_top_orders_largest_first_and_skips_nan():
    assert rank_top(np.array([0.2, np.nan, 0.9, 0.5, 0.9]), 3) == [2, 4, 3]
    assert rank_top(np.zeros((0,)), 3) == []


def test_decompose_rows_components_sum_to_the_reconstruction():
    torch.manual_seed(0)
    model = TransNet(TransNetConfig(4, orders=2, kernel=3, input_norm="instance"))
    xa, xb = torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5)
    out = decompose_rows(model, xa, xb)
    assert out["components"].shape == (3, 2, 4, 5, 5)
    np.testing.assert_allclose(out["components"].sum(0), out["yhat"], atol=1e-5)
    np.testing.assert_allclose(out["residual"], xb.numpy() - out["yhat"], atol=1e-6)
    assert out["gates"].shape == (2,)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    feats = planted_features(root / "features.h5")
    cons = root / "cons"
    run_consistency(ConsistencyConfig(str(feats), "conv", "a>d,d>a,a>b,b>a"), FAST_FIT, cons, log=lambda m: None)
    return feats, cons


@pytest.mark.slow
def test_diagnose_finds_the_planted_blind_channel_and_image(fitted, tmp_path, cli):
    feats, cons = fitted
    out = tmp_path / "diag"
    code, stdout, err = cli("diagnose", "--features", feats, "--layer", "conv", "--a", "a", "--b", "d",
                            "--consistency", cons, "--top", "3", "--panels", "1", "--panel_channels", "2",
                            "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    d = json.loads((out / "diagnosis.json").read_text())
    blind, unrel = d["blind_spots"], d["unreliable"]
    # d's channel 2 is noise: a cannot rebuild it (relative energy ~1), every other channel it can (~0).
    assert blind["top_channels"][0]["channel"] == PLANTED_CHANNEL
    assert blind["channel_relative"][PLANTED_CHANNEL] > 0.8
    others = [v for c, v in enumerate(blind["channel_relative"]) if c != PLANTED_CHANNEL]
    assert max(others) < 0.2
    # test row 5 of d is all noise: the image where d holds most that a lacks.
    assert blind["top_images"][0]["row"] == PLANTED_ROW
    assert blind["top_images"][0]["index"] == PLANTED_ROW * 3           # dataset index from /test/index
    # the reverse: a's channel 2 has no counterpart in d (an unreliable feature of a).
    assert unrel["top_channels"][0]["channel"] == PLANTED_CHANNEL
    assert np.asarray(blind["position_relative"]).shape == (4, 4)
    with open(out / "channels.csv") as fh:
        lines = list(csv.DictReader(fh))
    assert len(lines) == 8 and {ln["direction"] for ln in lines} == {"blind_spots", "unreliable"}
    for name in ("residual_energy", "panel_blind_spots_1", "panel_unreliable_1"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000
        assert (out / "figures" / f"{name}.svg").is_file()
    assert "Blind spots of a" in stdout and f"{PLANTED_CHANNEL} (" in stdout


@pytest.mark.slow
def test_consistent_pair_has_no_blind_spots(fitted, tmp_path):
    feats, cons = fitted
    d = run_diagnosis(cons, "a", "b", str(feats), tmp_path / "ab", top=2, panels=0)
    assert d["layer"] == "conv"
    assert d["blind_spots"]["relative"] < 0.05 and d["unreliable"]["relative"] < 0.05
    # without --layer, the consistency folder's layer is used
    same = diagnose_pair(DiagnoseConfig(features=str(feats), a="a", b="b", consistency=str(cons), top=2, panels=0),
                         tmp_path / "no_layer")
    assert same["layer"] == "conv" and same["blind_spots"]["relative"] == d["blind_spots"]["relative"]


@pytest.mark.slow
def test_diagnose_without_both_directions_names_what_is_there(fitted, tmp_path):
    feats, cons = fitted
    with pytest.raises(UserError, match="no Trans-Net run at .*c__a.*holds pairs a__b, a__d, b__a, d__a"):
        diagnose_pair(DiagnoseConfig(features=str(feats), layer="conv", a="a", b="c", consistency=str(cons)),
                      tmp_path / "x")
    with pytest.raises(UserError, match="maps a -> d .* but d -> a"):
        diagnose_pair(DiagnoseConfig(features=str(feats), layer="conv", a="d", b="a",
                                     transnet_ab=str(cons / "pairs" / "a__d"), transnet_ba=str(cons / "pairs" / "a__d")),
                      tmp_path / "y")
    with pytest.raises(UserError, match="both 'a'"):
        diagnose_pair(DiagnoseConfig(features=str(feats), layer="conv", a="a", b="a", consistency=str(cons)),
                      tmp_path / "z")


@pytest.mark.slow
def test_diagnosing_the_training_split_is_labelled_in_sample(fitted, tmp_path):
    feats, cons = fitted
    held = run_diagnosis(cons, "a", "b", str(feats), tmp_path / "test", top=2, panels=0)
    assert held["held_out"] is True and held["warnings"] == []
    d = run_diagnosis(cons, "a", "b", str(feats), tmp_path / "train", top=2, panels=0, split="train")
    assert d["split"] == "train" and d["held_out"] is False
    assert len(d["warnings"]) == 2 and all("in-sample report: split 'train'" in w for w in d["warnings"])
    assert json.loads((tmp_path / "train" / "diagnosis.json").read_text())["held_out"] is False
    from analysis.readings import diagnosis_readings

    assert diagnosis_readings(d)[0].startswith("In-sample: split 'train'")
    assert not diagnosis_readings(held)[0].startswith("In-sample")


@pytest.mark.slow
def test_a_direction_that_carries_no_conclusion_is_named(fitted, tmp_path):
    feats, cons = fitted
    copy = tmp_path / "cons"
    shutil.copytree(cons, copy)
    metrics = copy / "pairs" / "b__a" / "metrics.json"
    report = json.loads(metrics.read_text())
    report["r2"] = -0.4
    report["convergence"] = {"verdict": "not converged", "reasons": ["validation loss still falling"]}
    metrics.write_text(json.dumps(report))
    d = diagnose_pair(DiagnoseConfig(features=str(feats), a="a", b="b", consistency=str(copy), top=2, panels=0),
                      tmp_path / "diag")
    assert list(d["not_conclusive"]) == ["unreliable"]
    why = d["not_conclusive"]["unreliable"]
    assert "b->a" in why and "did not converge (validation loss still falling)" in why and "-0.40 < 0" in why
    assert any(w.startswith("unreliable: no conclusion") for w in d["warnings"])
    from analysis.readings import diagnosis_readings

    assert diagnosis_readings(d)[0].startswith("No conclusion from the unreliable below")
    assert json.loads((tmp_path / "diag" / "diagnosis.json").read_text())["not_conclusive"] == d["not_conclusive"]
