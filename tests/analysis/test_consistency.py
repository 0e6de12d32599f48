"""Family consistency: pair plans, tidy rows and matrices, and the fit-or-reuse loop on planted features.

The planted feature file (``tests.fakedata.planted_features``, also used by test_diagnose.py,
test_report.py and transnet/test_transnet_edges.py) holds four nets at one
layer: ``b`` is a scaled channel permutation of ``a`` (fully consistent, linear), ``c`` is independent
of ``a`` (fully inconsistent), ``d`` equals 2·a except channel 2, which is independent noise, and
test row 5 of ``d``, which is all noise (a planted blind spot in one channel and one image).
"""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from analysis.consistency import (
    ConsistencyConfig,
    asymmetry,
    build_matrices,
    generation_rows,
    net_matrix,
    pair_row,
    plan_pairs,
    read_table,
    run_consistency,
    table_columns,
    table_csv,
)
from common.errors import UserError
from features import store
from tests.fakedata import FAST_FIT, FAST_FIT_ARGS, planted_features
from tests.fakedata import PLANTED_C as C
from tests.fakedata import PLANTED_HW as HW
from tests.fakedata import PLANTED_N_TEST as N_TEST


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    return planted_features(tmp_path_factory.mktemp("planted") / "features.h5")


# --------------------------------------------------------------------------- pair plans

def test_plan_all_lists_every_ordered_pair_once():
    pairs = plan_pairs(["x", "y", "z"], "all")
    assert len(pairs) == 6 and len(set(pairs)) == 6
    assert ("x", "y") in pairs and ("y", "x") in pairs
    assert all(a != b for a, b in pairs)


def test_plan_chain_links_consecutive_nets_in_both_directions():
    assert plan_pairs(["g0", "g1", "g2"], "chain") == [("g0", "g1"), ("g1", "g0"), ("g1", "g2"), ("g2", "g1")]


def test_plan_star_pairs_the_centre_with_every_other_net_both_ways():
    assert plan_pairs(["t", "s1", "s2"], "star:t") == [("t", "s1"), ("s1", "t"), ("t", "s2"), ("s2", "t")]


def test_plan_explicit_pairs_keep_their_direction():
    assert plan_pairs(["a", "b", "c"], "a>b, c>a") == [("a", "b"), ("c", "a")]


@pytest.mark.parametrize("plan, needle", [
    ("ring", "Valid pair plan names: all, chain, star:NAME, A>B,C>D"),
    ("star:q", "unknown net 'q'"),
    ("a>q", "Valid net names: a, b, c"),
    ("a>a", "onto itself"),
    ("a>b,a>b", "twice"),
])
def test_bad_pair_plans_name_the_value_and_the_choices(plan, needle):
    with pytest.raises(UserError, match=needle):
        plan_pairs(["a", "b", "c"], plan)


def test_a_single_net_is_refused():
    with pytest.raises(UserError, match="at least two nets"):
        plan_pairs(["a"], "all")


# --------------------------------------------------------------------------- rows and matrices

def _report(src, tgt, res, orders=(0.6, 0.1), gates=(0.4,), **kw):
    body = {"split": "test", "n_samples": 10, "source": src, "target": tgt, "layer": "L", "var_target": 2.0,
            "var_orders": [2.0 * f for f in orders], "var_residual": 2.0 * res, "fraction_orders": list(orders),
            "fraction_residual": res, "r2": 1.0 - res, "gates": list(gates), "mse": 0.5}
    body.update(kw)
    return body


def test_pair_row_flattens_orders_and_gates_into_named_columns():
    row = pair_row(_report("a", "b", 0.25, orders=(0.5, 0.2, 0.05), gates=(0.3, 0.1)), "pairs/a__b")
    assert row["fraction_order0"] == 0.5 and row["fraction_order2"] == 0.05
    assert row["var_order1"] == pytest.approx(0.4)
    assert (row["gate1"], row["gate2"]) == (0.3, 0.1)
    assert row["orders"] == 2 and row["warnings"] == "" and row["transnet_dir"] == "pairs/a__b"


def test_undefined_values_become_none_with_a_warning_never_nan():
    rep = _report("a", "b", float("nan"), orders=(float("nan"), float("nan")), var_target=0.0, r2=float("nan"))
    row = pair_row(rep)
    assert row["fraction_residual"] is None and row["r2"] is None and row["fraction_order0"] is None
    assert "undefined" in row["warnings"] and "zero variance" in row["warnings"]
    text = table_csv([row])
    assert "nan" not in text.lower()
    parsed = next(csv.DictReader(text.splitlines()))
    assert parsed["fraction_residual"] == "" and "zero variance" in parsed["warnings"]


def test_in_sample_reports_are_flagged():
    row = pair_row(_report("a", "b", 0.1, held_out=False, warning="no held-out split"))
    assert "no held-out split" in row["warnings"]


def test_table_columns_are_the_union_over_pairs_of_different_orders():
    rows = [pair_row(_report("a", "b", 0.2, orders=(0.7,), gates=())),
            pair_row(_report("b", "a", 0.3, orders=(0.5, 0.1, 0.05), gates=(0.2, 0.1)))]
    cols = table_columns(rows)
    assert cols.index("fraction_order2") < cols.index("fraction_residual") < cols.index("r2") < cols.index("gate2")
    parsed = list(csv.DictReader(table_csv(rows).splitlines()))
    assert parsed[0]["fraction_order2"] == "" and float(parsed[1]["fraction_order2"]) == 0.05


def test_net_matrix_puts_source_in_rows_and_leaves_diagonal_and_unfitted_pairs_empty():
    rows = [pair_row(_report("a", "b", 0.2)), pair_row(_report("b", "a", 0.4)), pair_row(_report("a", "c", 0.9))]
    m = net_matrix(rows, ["a", "b", "c"], "fraction_residual")
    assert m == [[None, 0.2, 0.9], [0.4, None, None], [None, None, None]]
    body = build_matrices(rows, ["a", "b", "c"], "L", "test")
    assert set(body["matrices"]) == {"fraction_residual", "r2", "fraction_order0", "fraction_order1"}
    assert body["pair_fractions"]["pairs"] == ["a>b", "b>a", "a>c"]
    assert body["pair_fractions"]["values"][1] == [0.6, 0.1, 0.4]


def test_asymmetry_pairs_both_directions_and_sorts_by_size():
    rows = [pair_row(_report(s, t, r)) for s, t, r in
            (("a", "b", 0.2), ("b", "a", 0.5), ("a", "c", 0.3), ("c", "a", 0.35), ("b", "c", 0.1))]
    out = asymmetry(rows)
    assert [(d["a"], d["b"]) for d in out] == [("a", "b"), ("a", "c")]
    assert out[0]["difference"] == pytest.approx(-0.3)


def test_generation_rows_take_residuals_to_previous_and_first_generation():
    rows = [pair_row(_report(s, t, r)) for s, t, r in
            (("g0", "g1", 0.3), ("g1", "g2", 0.2), ("g0", "g2", 0.4), ("g2", "g1", 0.9))]
    gens = generation_rows(["g0", "g1", "g2"], rows, {"g1": {"test_top1": 70.0, "slim_test_top1": 60.0}})
    assert [g["residual_to_previous"] for g in gens] == [None, 0.3, 0.2]
    assert [g["residual_to_first"] for g in gens] == [None, 0.3, 0.4]
    assert gens[1]["test_top1"] == 70.0 and gens[1]["slim_test_top1"] == 60.0 and gens[0]["test_top1"] is None


# --------------------------------------------------------------------------- the fit-or-reuse loop

@pytest.mark.slow
def test_consistency_command_recovers_planted_structure_and_reuses_fits(planted, tmp_path, cli):
    out = tmp_path / "cons"
    code, stdout, err = cli("consistency", "--features", planted, "--layer", "conv", "--pairs", "star:a",
                            "--nets", "a,b,c", *FAST_FIT_ARGS, "--out_dir", out)
    assert code == 0, err
    rows = {(r["source"], r["target"]): r for r in read_table(out)}
    assert set(rows) == {("a", "b"), ("b", "a"), ("a", "c"), ("c", "a")}
    # b = 2 * a[:, perm]: rebuilt almost exactly in both directions, and linearly (order 0).
    for pair in (("a", "b"), ("b", "a")):
        assert rows[pair]["r2"] > 0.98 and rows[pair]["fraction_residual"] < 0.02
        assert rows[pair]["fraction_order0"] > 0.9
    # c is independent of a: nothing of it can be rebuilt on held-out rows.
    for pair in (("a", "c"), ("c", "a")):
        assert rows[pair]["fraction_residual"] > 0.9 and rows[pair]["r2"] < 0.1
    assert all(r["split"] == "test" and r["n_samples"] == N_TEST for r in rows.values())

    mats = json.loads((out / "matrices.json").read_text())
    assert mats["nets"] == ["a", "b", "c"]
    res = mats["matrices"]["fraction_residual"]
    assert res[0][0] is None and res[1][2] is None                     # diagonal; b>c was not fitted
    assert res[0][1] == pytest.approx(rows[("a", "b")]["fraction_residual"])
    with open(out / "table.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["fit"]["epochs"] == 60 and cfg["provenance"]["code_version"]
    assert (out / "figures" / "residual_fraction.png").is_file() and (out / "figures" / "order_fractions.svg").is_file()

    # Resume: every finished pair is reused, nothing is refitted.
    before = (out / "pairs" / "a__b" / "transnet.pt").stat().st_mtime_ns
    res2 = run_consistency(ConsistencyConfig(str(planted), "conv", "star:a", "a,b,c"), FAST_FIT, out, "resume",
                           log=lambda m: None)
    assert res2["reused"] == 4
    assert (out / "pairs" / "a__b" / "transnet.pt").stat().st_mtime_ns == before

    # A finished pair fitted with other options is never silently mixed in.
    with pytest.raises(UserError, match="fitted with other options.*epochs"):
        run_consistency(ConsistencyConfig(str(planted), "conv", "a>b", "a,b"),
                        replace(FAST_FIT, epochs=61), out, "resume", log=lambda m: None)


def test_consistency_fits_pairs_together_with_their_separate_results(planted, tmp_path):
    cfg = ConsistencyConfig(str(planted), "conv", "star:a", "a,b,c", grouped="on")
    logs: list[str] = []
    together = run_consistency(cfg, FAST_FIT, tmp_path / "on", log=logs.append)
    alone = run_consistency(replace(cfg, grouped="off"), FAST_FIT, tmp_path / "off", log=lambda m: None)
    assert any(m.startswith("fitting 4 Trans-Nets together (--grouped on): a>b, b>a, a>c, c>a") for m in logs)
    assert together["reused"] == 0
    for r_on, r_off in zip(together["rows"], alone["rows"]):
        assert (r_on["source"], r_on["target"]) == (r_off["source"], r_off["target"])
        for key in ("r2", "fraction_residual", "fraction_order0"):
            assert r_on[key] == pytest.approx(r_off[key], rel=1e-4, abs=1e-6), key
    config = json.loads((tmp_path / "on" / "pairs" / "a__b" / "config.json").read_text())
    assert config["fit_group"]["size"] == 4
    again = run_consistency(cfg, FAST_FIT, tmp_path / "on", "resume", log=lambda m: None)
    assert again["reused"] == 4
    with pytest.raises(UserError, match="unknown --grouped 'yes'; valid: auto, on, off"):
        run_consistency(replace(cfg, grouped="yes"), FAST_FIT, tmp_path / "x")


def test_missing_layer_and_mismatched_maps_are_clear_errors(planted, tmp_path):
    with pytest.raises(UserError, match="unknown layer 'conv9'.*Valid layer names: conv"):
        run_consistency(ConsistencyConfig(str(planted), "conv9", "all"), FAST_FIT, tmp_path / "x")
    other = tmp_path / "mixed.h5"
    with h5py.File(other, "w") as f:
        store.init_root(f, "planted", {}, HW, "test")
        for split in ("train", "test"):
            store.init_split(f, split, np.arange(4), np.zeros(4))
            for name, hw in (("p", 4), ("q", 2)):
                ds = store.create_features(f, split, name, "conv", (4, C, hw, hw), "float32", {})
                ds[...] = 1.0
                store.mark_complete(ds)
    with pytest.raises(UserError, match="differ in spatial size.*p: 4x4.*q: 2x2"):
        run_consistency(ConsistencyConfig(str(other), "conv", "all"), FAST_FIT, tmp_path / "y")
    with pytest.raises(UserError, match="unknown split 'val'"):
        run_consistency(ConsistencyConfig(str(planted), "conv", "all", split="val"), FAST_FIT, tmp_path / "z")
    assert not (tmp_path / "x").exists()          # refused before anything was written


def test_family_manifest_gives_the_nets_in_generation_order(tmp_path):
    from analysis.consistency import config_nets
    from training.manifest import Member, write_manifest

    write_manifest(tmp_path, "born-again", [Member("ban_g10", "g10/last.pt", "generation", 10),
                                            Member("ban_g2", "g2/last.pt", "generation", 2),
                                            Member("teacher", "t/last.pt", "teacher")])
    assert config_nets(ConsistencyConfig(family=str(tmp_path))) == ["teacher", "ban_g2", "ban_g10"]
    assert plan_pairs(config_nets(ConsistencyConfig(family=str(tmp_path / "family.json"))), "chain")[2:] == [
        ("ban_g2", "ban_g10"), ("ban_g10", "ban_g2")]
    with pytest.raises(UserError, match="not both"):
        config_nets(ConsistencyConfig(nets="a,b", family=str(tmp_path)))
