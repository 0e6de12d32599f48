"""Conclusions the report may draw: only from converged fits with R² ≥ 0, and with their loss curves
and verdicts shown; built from hand-written run folders (no fitting)."""
from __future__ import annotations

import json

import pytest

from analysis.convergence import convergence_of, loss_series, refusal
from analysis.readings import consistency_readings
from analysis.report import make_report
from analysis.study_folder import read_study_folder
from tests.analysis.runfolders import variance_report, write_consistency

ASYM = "holds more knowledge that"


def _asymmetric(verdict_ab="converged", verdict_ba="converged", r2_shift=0.0):
    # a->b leaves 10% of b unexplained, b->a leaves 45% of a: a clear asymmetry when both fits are trusted
    return [variance_report("a", "b", [0.8, 0.1], 0.10 + r2_shift, verdict=verdict_ab, additive=[0.8, 0.1]),
            variance_report("b", "a", [0.5, 0.1], 0.45, verdict=verdict_ba, additive=[0.5, 0.05],
                            reasons=["validation loss still fell 20% over the last 10% of epochs"])]


def test_a_trusted_pair_gets_its_asymmetry_sentence(tmp_path):
    st = read_study_folder(write_consistency(tmp_path / "s" / "consistency" / "conv", _asymmetric(), ["a", "b"]).parents[1])
    rows = st.consistency["conv"]["rows"]
    assert [r["convergence"] for r in rows] == ["converged", "converged"]
    assert any(ASYM in line for line in consistency_readings(rows, "conv"))


@pytest.mark.slow
def test_a_not_converged_pair_gets_no_asymmetry_sentence_and_says_why(tmp_path):
    folder = write_consistency(tmp_path / "s" / "consistency" / "conv",
                               _asymmetric(verdict_ba="not converged"), ["a", "b"])
    res = make_report(folder.parents[1])
    text = res["markdown"].read_text()
    assert ASYM not in text
    assert "No conclusion is drawn from 1 of 2 pair(s): b→a: the fit did not converge (validation loss still fell " \
           "20% over the last 10% of epochs)" in text
    assert "The asymmetry between a and b is not read: b→a cannot carry a conclusion" in text
    assert "| not converged |" in text and "| converged |" in text          # the verdict column of the table
    assert (folder.parents[1] / "figures" / "loss_curves_conv.png").is_file()
    assert "Loss per epoch of every Trans-Net" in text
    assert (folder.parents[1] / "figures" / "additive_shares_conv.png").is_file()
    assert "order 0 alone reaches a median R² of 0.80, and the orders ≥ 1 add a median +0.10" in text


def test_a_negative_r2_is_refused_like_a_non_converged_fit(tmp_path):
    rows = read_study_folder(write_consistency(tmp_path / "s" / "consistency" / "conv",
                                               _asymmetric(r2_shift=1.2), ["a", "b"]).parents[1]).consistency["conv"]["rows"]
    lines = consistency_readings(rows, "conv")
    assert not any(ASYM in line for line in lines)
    assert "a→b: its held-out R² is -0.30 < 0" in " ".join(lines)


def test_runs_without_a_convergence_block_are_unknown_not_converged(tmp_path):
    folder = write_consistency(tmp_path / "s" / "consistency" / "conv",
                               _asymmetric(verdict_ab=None, verdict_ba=None), ["a", "b"], val=False)
    rows = read_study_folder(folder.parents[1]).consistency["conv"]["rows"]
    assert {r["convergence"] for r in rows} == {"unknown"} and all(refusal(r) is None for r in rows)
    assert "Convergence was not judged for 2 pair(s)" in " ".join(consistency_readings(rows, "conv"))
    assert convergence_of({"convergence": {"verdict": "maybe"}})["verdict"] == "unknown"


def test_loss_series_take_train_and_validation_loss_per_epoch():
    hist = [{"epoch": 1, "train_loss": 2.0, "val_loss": 2.5}, {"epoch": 2, "train_loss": 1.0},
            {"epoch": 3, "train_loss": None, "val_loss": 1.5}]
    assert loss_series(hist) == {"train": [(1, 2.0), (2, 1.0)], "val": [(1, 2.5), (3, 1.5)]}
    assert loss_series([{"epoch": 1, "train_loss": 1.0}]) == {"train": [(1, 1.0)]}


def test_any_folder_of_results_is_read_not_only_a_study_folder(tmp_path):
    res = tmp_path / "results"
    for rep in _asymmetric(verdict_ba="not converged"):                  # two loose fit-transnet runs
        run = res / "fits" / f"{rep['source']}_to_{rep['target']}"
        run.mkdir(parents=True)
        (run / "transnet.pt").write_bytes(b"")
        (run / "metrics.json").write_text(json.dumps(rep))
    (res / "sim").mkdir()
    (res / "sim" / "similarity.json").write_text(json.dumps(
        {"split": "test", "layer": "conv", "nets": ["a", "b"], "metrics": {"cka": {"matrix": [[1, 0.9], [0.9, 1]]}}}))
    st = read_study_folder(res)
    rows = st.consistency["conv"]["rows"]
    assert sorted((r["source"], r["target"], r["convergence"]) for r in rows) == [
        ("a", "b", "converged"), ("b", "a", "not converged")]
    assert st.similarity["conv"]["nets"] == ["a", "b"] and "study.json" in st.missing[0]
