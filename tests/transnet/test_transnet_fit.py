"""Fitting Trans-Nets from kc-features files (methods.md §5, checks 4-6; bad inputs;
the batch sources; resume; DDP). Planted structure on tiny tensors (N=256, C=4, 6x6)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.errors import UserError
from tests.fakedata import FAST_FIT_KWARGS as FAST
from tests.fakedata import FIT_LAYER as LAYER
from tests.fakedata import write_features_by_split
from transnet.data import BlockPairs, MemoryPairs, load_arrays, open_pair
from transnet.fit import DivergenceError, FitConfig, fit_transnet, load_transnet
from transnet.model import TransNet, TransNetConfig

ROOT = Path(__file__).resolve().parents[2]
CONTRACT_KEYS = {"split", "n_samples", "source", "target", "layer", "var_target", "var_orders", "var_residual",
                 "fraction_orders", "fraction_residual", "r2", "gates", "mse", "note"}


def _source(n: int, seed: int, scale: float = 1.0, channel_std=(1.0, 2.0, 0.5, 3.0)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    std = np.array(channel_std, dtype=np.float32)[None, :, None, None]
    return (rng.standard_normal((n, 4, 6, 6)).astype(np.float32) * std * scale).astype(np.float32)


def _pair_file(path: Path, make_b, n_train=256, n_test=128, **source) -> Path:
    a, ta = _source(n_train, 0, **source), _source(n_test, 1, **source)
    return write_features_by_split(path, {"train": {"A": a, "B": make_b(a)}, "test": {"A": ta, "B": make_b(ta)}})


# --------------------------------------------------------------------------- planted structure

@pytest.mark.parametrize("mix", [np.eye(4, dtype=np.float32),                         # B = A
                                 np.array([[0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0.5, 0], [0, 0, 1, 0]],
                                          dtype=np.float32)],                         # permutation + mixing
                         ids=["identity", "mixing"])
def test_planted_linear_target_is_recovered_in_order_0(tmp_path, mix):
    f = _pair_file(tmp_path / "f.h5", lambda a: np.einsum("oc,nchw->nohw", mix, a))
    m = fit_transnet(FitConfig(features=str(f), epochs=60, alpha="1", **{**FAST, "lr": 5e-2}), tmp_path / "run")
    assert m["r2"] >= 0.99 and m["split"] == "test" and m["held_out"]
    fo = m["fraction_orders"]
    assert fo[0] > 0.9 and max(fo[1:]) < 0.01                 # nearly all variance in Y0
    assert CONTRACT_KEYS <= set(m)


def test_planted_nonlinear_target_needs_the_higher_orders(tmp_path):
    """B = a random Trans-Net with open gates applied to A. With input_norm none and small-amplitude
    features the gated (normalised) branches dominate B, and the student can express B exactly."""
    torch.manual_seed(0)
    teacher = TransNet(TransNetConfig(4, 2, 1, "none")).double().eval()
    teacher.set_gates([0.8, 0.8])

    def make_b(a):
        with torch.no_grad():
            return teacher(torch.from_numpy(a).double()).float().numpy()

    f = _pair_file(tmp_path / "f.h5", make_b, scale=0.1, channel_std=(1, 1, 1, 1))
    base = FitConfig(features=str(f), epochs=100, alpha="0", **{**FAST, "input_norm": "none", "lr": 3e-2})
    full = fit_transnet(base, tmp_path / "full")
    linear = fit_transnet(replace(base, orders=0), tmp_path / "linear")
    assert len(full["var_orders"]) == 3 and len(linear["var_orders"]) == 1 and linear["gates"] == []
    assert full["r2"] > 0.95 and full["r2"] > linear["r2"] + 0.2
    assert sum(full["fraction_orders"][1:]) > 0.5


def test_independent_target_has_no_held_out_r2(tmp_path):
    f = write_features_by_split(tmp_path / "f.h5", {"train": {"A": _source(256, 0), "B": _source(256, 2)},
                                                    "test": {"A": _source(128, 1), "B": _source(128, 3)}})
    m = fit_transnet(FitConfig(features=str(f), epochs=40, kernel=3, **{k: v for k, v in FAST.items() if k != "kernel"}),
                     tmp_path / "run")
    assert -0.1 < m["r2"] < 0.03


def test_linear_transnet_converges_to_least_squares(tmp_path):
    """Gates frozen at 0, 1x1 kernel, no normalisation: ŷ = W x, so Adam must reach the LS solution."""
    rng = np.random.default_rng(5)
    w_true = rng.standard_normal((4, 4)).astype(np.float32)
    noise = lambda a: 0.3 * rng.standard_normal(a.shape).astype(np.float32)  # noqa: E731
    f = _pair_file(tmp_path / "f.h5", lambda a: np.einsum("oc,nchw->nohw", w_true, a) + noise(a),
                   channel_std=(1.0, 1.5, 0.7, 1.2))
    cfg = FitConfig(features=str(f), epochs=100, orders=2, freeze_gates=True, gate_init=0.0, alpha="0",
                    **{**FAST, "input_norm": "none", "lr": 5e-2, "final_lr": 1e-5})
    fit_transnet(cfg, tmp_path / "run")
    model, _ = load_transnet(tmp_path / "run")
    with h5py.File(f) as h:
        x = h["train/A/" + LAYER][...].astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, 4)
        y = h["train/B/" + LAYER][...].astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, 4)
    w_ls = np.linalg.lstsq(x, y, rcond=None)[0].T                          # (C_out, C_in)
    w = model.convs[-1].weight.detach().double().numpy()[:, :, 0, 0]
    np.testing.assert_allclose(w, w_ls, atol=1e-3)
    assert model.gates().tolist() == [0.0, 0.0]


# --------------------------------------------------------------------------- outputs, resume, CLI

def test_fit_writes_contract_outputs_and_variance_matches(tmp_path, cli):
    f = _pair_file(tmp_path / "f.h5", lambda a: a[:, [1, 0, 3, 2]] * 2)
    out = tmp_path / "run"
    code, text, err = cli("fit-transnet", "--features", f, "--source", "A", "--target", "B", "--layer", LAYER,
                          "--epochs", 3, "--input_norm", "global", "--alpha", "0.1,0.2", "--eval_every", 2,
                          "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    assert "R²" in text and "transnet.pt" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(metrics) and metrics["epochs"] == 3 and metrics["source"] == "A"
    vt = metrics["var_target"]
    assert metrics["fraction_orders"] == pytest.approx([v / vt for v in metrics["var_orders"]])
    assert metrics["r2"] == pytest.approx(1 - metrics["var_residual"] / vt)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and "eval_r2" in log[1] and "eval_r2" not in log[0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["alphas"] == [0.1, 0.2] and cfg["end_utc"] and cfg["feature_provenance"]["train"]["source"]["dataset"]
    assert any((out / "tb").iterdir())

    model, info = load_transnet(out)
    assert (info["source"], info["target"], info["layer"]) == ("A", "B", LAYER)
    assert info["features"] == str(f.resolve()) and info["norm_stats"]["input_std"].shape == (4,)
    assert info["feature_provenance"]["eval"]["target"]["checkpoint"] == "B.pt"
    torch.testing.assert_close(model.input_scale, info["norm_stats"]["input_std"])

    code, text, err = cli("variance", "--transnet", out, "--device", "cpu")
    assert code == 0, err
    var = json.loads((out / "variance.json").read_text())
    for key in ("r2", "var_target", "var_residual", "mse"):
        assert var[key] == pytest.approx(metrics[key], rel=1e-9)
    assert var["provenance"]["code_version"] and var["note"]
    code, _, err = cli("variance", "--transnet", out, "--split", "train", "--out_dir", tmp_path / "v", "--device", "cpu")
    assert code == 0, err
    assert json.loads((tmp_path / "v" / "variance_train.json").read_text())["held_out"] is False


def test_resume_after_interruption_equals_an_uninterrupted_fit(tmp_path):
    f = _pair_file(tmp_path / "f.h5", lambda a: np.tanh(a[:, [1, 0, 3, 2]]))
    cfg = FitConfig(features=str(f), epochs=4, **{**FAST, "kernel": 3, "save_every": 1})
    whole = fit_transnet(cfg, tmp_path / "whole")

    def stop(model, epoch):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_transnet(cfg, tmp_path / "part", on_epoch_end=stop)
    with pytest.raises(UserError, match="exists and is not empty"):
        fit_transnet(cfg, tmp_path / "part")
    with pytest.raises(UserError, match="epochs: 4 -> 5"):
        fit_transnet(replace(cfg, epochs=5), tmp_path / "part", "resume")
    resumed = fit_transnet(cfg, tmp_path / "part", "resume")
    a, _ = load_transnet(tmp_path / "whole")
    b, _ = load_transnet(tmp_path / "part")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert resumed["r2"] == whole["r2"]
    assert [json.loads(x)["epoch"] for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_fit_from_hdf5_blocks_recovers_a_permutation(tmp_path):
    f = _pair_file(tmp_path / "f.h5", lambda a: a[:, [3, 2, 1, 0]])
    cfg = FitConfig(features=str(f), epochs=40, block_rows=32, data_on="disk", alpha="1", **{**FAST, "lr": 5e-2})
    m = fit_transnet(cfg, tmp_path / "disk")
    assert m["placement"] == "disk" and m["r2"] > 0.98


def test_both_placements_are_chosen_before_any_features_are_placed(tmp_path, monkeypatch):
    """Free memory is measured once for the training and the evaluation split (the evaluation split's
    choice reserves the training bytes): measuring after the training features were placed would count
    them twice and push the evaluation split off the GPU."""
    import transnet.fit as fit

    events: list[str] = []
    real_choose, real_sources, real_source = fit.choose_placement, fit.make_sources, fit.make_source
    monkeypatch.setattr(fit, "choose_placement", lambda *a, **kw: events.append("choose") or real_choose(*a, **kw))
    monkeypatch.setattr(fit, "make_sources", lambda *a, **kw: events.append("place") or real_sources(*a, **kw))
    monkeypatch.setattr(fit, "make_source", lambda *a, **kw: events.append("place") or real_source(*a, **kw))
    f = _pair_file(tmp_path / "f.h5", lambda a: a, n_train=64, n_test=32)
    fit_transnet(FitConfig(features=str(f), epochs=1, **FAST), tmp_path / "run")
    assert events[:2] == ["choose", "choose"] and events.count("place") == 2, events


# --------------------------------------------------------------------------- batch sources

def _row_id_file(tmp_path: Path, n: int = 100) -> Path:
    ids = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 2, 3, 3)).copy()
    return write_features_by_split(tmp_path / "ids.h5", {"train": {"A": ids, "B": -ids}})


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_batch_sources_cover_rows_once_and_split_ranks(tmp_path, kind):
    info = open_pair(_row_id_file(tmp_path), "A", "B", LAYER, "train")
    dev = torch.device("cpu")
    src = MemoryPairs(*load_arrays(info), dev) if kind == "memory" else BlockPairs(info, dev, block_rows=8, window_blocks=2)
    seen = []
    for a, b in src.batches(16, seed=0, epoch=0):
        assert a.shape == (16, 2, 3, 3) and a.dtype == torch.float32
        torch.testing.assert_close(b, -a)                       # source and target rows stay paired
        seen += a[:, 0, 0, 0].long().tolist()
    assert len(seen) == 96 and len(set(seen)) == 96             # 6 full batches, no row twice
    assert seen != sorted(seen)                                  # shuffled
    again = [int(a[0, 0, 0, 0]) for a, _ in src.batches(16, seed=0, epoch=0)]
    other = [int(a[0, 0, 0, 0]) for a, _ in src.batches(16, seed=0, epoch=1)]
    assert again == seen[::16] and other != again                # reproducible per (seed, epoch)
    ranks = [[int(v) for a, _ in src.batches(16, 0, 0, rank=r, world=2) for v in a[:, 0, 0, 0]] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and not set(ranks[0]) & set(ranks[1])
    order = torch.cat([a for a, _ in src.sequential(30)])[:, 0, 0, 0]
    assert order.tolist() == list(range(100))


def test_ranks_take_equal_steps_from_disk_blocks_in_every_epoch(tmp_path):
    """With validation rows held out, disk blocks serve different numbers of rows; whatever order an
    epoch shuffles them into, every DDP rank must take the same number of steps (a rank with fewer
    batches left the other waiting in its gradient all-reduce)."""
    info = open_pair(_row_id_file(tmp_path), "A", "B", LAYER, "train")
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(100, size=70, replace=False))          # uneven rows per 8-row block
    src = BlockPairs(info, torch.device("cpu"), block_rows=8, window_blocks=2, rows=rows)
    for world in (2, 3):
        steps = src.steps(8, world)
        assert steps >= 1
        for epoch in range(12):
            counts = [sum(1 for _ in src.batches(8, 0, epoch, rank=r, world=world)) for r in range(world)]
            assert counts == [steps] * world, (world, epoch, counts)


# --------------------------------------------------------------------------- bad input

def test_bad_inputs_give_clear_errors(tmp_path):
    good = _pair_file(tmp_path / "f.h5", lambda a: a)
    base = FitConfig(features=str(good), epochs=1, **FAST)
    with pytest.raises(UserError, match=r"unknown net 'C'.*Valid net names: A, B"):
        fit_transnet(replace(base, target="C"), tmp_path / "r1")
    with pytest.raises(UserError, match="unknown layer"):
        fit_transnet(replace(base, layer="features.9"), tmp_path / "r2")
    with pytest.raises(UserError, match="alpha has 3 values"):
        fit_transnet(replace(base, alpha="1,2,3"), tmp_path / "r3")
    for bad in ("nan", "inf", "1e400", "-1"):                   # refused before the run folder is made
        with pytest.raises(UserError, match="finite and >= 0"):
            fit_transnet(replace(base, alpha=bad), tmp_path / f"alpha_{bad}")
        assert not (tmp_path / f"alpha_{bad}").exists()
    incomplete = _pair_file(tmp_path / "inc.h5", lambda a: a)
    with h5py.File(incomplete, "a") as h:
        h["train/B/" + LAYER].attrs["complete"] = False
    with pytest.raises(UserError, match=r"incomplete .*--resume"):
        fit_transnet(replace(base, features=str(incomplete)), tmp_path / "r4")
    other = write_features_by_split(tmp_path / "other.h5",
                                    {"train": {"B": _source(256, 9)}, "test": {"B": _source(128, 8)}},
                                    index_offset=1)
    with pytest.raises(UserError, match="index arrays differ"):
        fit_transnet(replace(base, target_features=str(other)), tmp_path / "r5")


def test_nonfinite_features_are_named(tmp_path):
    f = _pair_file(tmp_path / "f.h5", lambda a: a)
    with h5py.File(f, "a") as h:
        h["train/B/" + LAYER][37, 1, 2, 2] = np.nan
    base = FitConfig(features=str(f), epochs=2, **FAST)
    with pytest.raises(UserError, match=r"target features /train/B/features.4 .*first at row 37"):
        fit_transnet(base, tmp_path / "mem")
    with pytest.raises(UserError, match=r"epoch 1: the target features /train/B/features.4 .* row 37"):
        fit_transnet(replace(base, data_on="disk", block_rows=16), tmp_path / "disk")


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    f = _pair_file(tmp_path / "f.h5", lambda a: a)
    # lr grows geometrically from 1e-3 (epoch 1) via 1e25 (epoch 2) to 1e53 (epoch 3): epoch 2 blows up
    cfg = FitConfig(features=str(f), epochs=3, schedule="geometric", lr=1e-3, final_lr=1e53, save_every=1,
                    **{k: v for k, v in FAST.items() if k not in ("lr", "final_lr", "schedule", "save_every")})
    with pytest.raises(DivergenceError, match=r"diverged at epoch 2 .*last\.pt \(epoch 1\)"):
        fit_transnet(cfg, tmp_path / "run")
    model, info = load_transnet(tmp_path / "run")
    assert info["epoch"] == 1 and all(torch.isfinite(p).all() for p in model.parameters())


# --------------------------------------------------------------------------- DDP (gloo, two processes)

@pytest.mark.xdist_group("subprocess")
@pytest.mark.slow
def test_two_process_ddp_follows_the_single_process_fit(tmp_path):
    f = _pair_file(tmp_path / "f.h5", lambda a: np.tanh(a[:, [1, 0, 3, 2]]), n_train=128, n_test=32)
    args = ["fit-transnet", "--features", str(f), "--source", "A", "--target", "B", "--layer", LAYER, "--epochs", "2",
            "--kernel", "3", "--lr", "1e-2", "--batch_size", "32", "--device", "cpu", "--eval_every", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "cli.py"), *args, "--out_dir", str(tmp_path / "ddp")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert cfg["world_size"] == 2
    single = FitConfig(features=str(f), source="A", target="B", layer=LAYER, epochs=2, kernel=3, lr=1e-2,
                       batch_size=32, device="cpu", eval_every=5)
    fit_transnet(single, tmp_path / "single")
    a, _ = load_transnet(tmp_path / "ddp")
    b, _ = load_transnet(tmp_path / "single")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=1e-4, atol=1e-5)
