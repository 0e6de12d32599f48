"""Trans-Nets fitted together (transnet/group_fit.py) equal their separate fits: the same weights,
per-epoch losses, early stops, reports and resume state, on planted features; an interrupted group
resumes pair by pair to the same result; what groups and what does not."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from common.checkpoints import load_checkpoint
from common.errors import UserError
from tests.fakedata import FAST_FIT, planted_features
from tests.processes import exit_status, in_child
from transnet.fit import fit_transnet
from transnet.group_fit import FitGroup, FitJob, fit_group, pays, plan_groups

PAIRS = [("a", "b"), ("a", "c"), ("b", "a"), ("d", "a")]
# the paper's build (2 orders, 3x3, instance norm), validation rows held out, a stop on a plateau
GROUP_FIT = replace(FAST_FIT, orders=2, kernel=3, input_norm="instance", epochs="auto", max_epochs=12, patience=2,
                    lr=0.05, val_fraction=0.25, eval_every=4, save_every=2)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return planted_features(tmp_path_factory.mktemp("group") / "planted.h5")


def _jobs(planted, root, fit=GROUP_FIT, mode="new", pairs=PAIRS):
    return [FitJob(replace(fit, features=str(planted), source=a, target=b, layer="conv"), root / f"{a}__{b}", mode)
            for a, b in pairs]


def _group_sizes(monkeypatch) -> list[int]:
    """The pairs of every grouped model built from now on."""
    sizes: list[int] = []
    build = FitGroup.__init__
    monkeypatch.setattr(FitGroup, "__init__", lambda self, hs: (sizes.append(len(hs)), build(self, hs))[1])
    return sizes


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _assert_same_fit(sep, grp, optimiser=False):
    a, b = load_checkpoint(sep / "transnet.pt"), load_checkpoint(grp / "transnet.pt")
    for k, v in a["state_dict"].items():
        assert torch.allclose(v, b["state_dict"][k], rtol=1e-4, atol=1e-5), (k, (v - b["state_dict"][k]).abs().max())
    la, lb = _log(sep), _log(grp)
    assert [r["epoch"] for r in la] == [r["epoch"] for r in lb]          # the same stop
    for ra, rb in zip(la, lb):
        for key in ("train_mse", "train_loss", "val_loss", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), (key, ra["epoch"])
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (sep, grp))
    for key in ("r2", "mse", "epochs", "n_train", "n_val"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-4, abs=1e-6), key
    for key in ("verdict", "epochs_run", "stopped_early"):
        assert mb["convergence"][key] == ma["convergence"][key], key
    if optimiser:
        oa, ob = (load_checkpoint(d / "last.pt")["optimizer"]["state"] for d in (sep, grp))
        for i in oa:
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.allclose(oa[i][k], ob[i][k], rtol=1e-3, atol=1e-7), (i, k)


def test_pairs_fitted_together_equal_their_separate_fits(planted, tmp_path, monkeypatch):
    jobs = _jobs(planted, tmp_path / "grouped")
    for j in jobs:
        fit_transnet(j.cfg, tmp_path / "separate" / j.out_dir.name)
    sizes = _group_sizes(monkeypatch)
    metrics = fit_group(jobs)
    assert sizes == [4]                      # one of four stopped early: not worth a rebuild
    assert [m["source"] + m["target"] for m in metrics] == [a + b for a, b in PAIRS]
    for j in jobs:
        _assert_same_fit(tmp_path / "separate" / j.out_dir.name, j.out_dir, optimiser=True)
        cfg = json.loads((j.out_dir / "config.json").read_text())
        assert cfg["fit_group"] == {"size": 4, "pairs": [f"{a}>{b}" for a, b in PAIRS]}
    # the pairs really are different fits: b is a's permutation (rebuilt), c is independent of a
    r2 = {m["source"] + m["target"]: m["r2"] for m in metrics}
    assert r2["ab"] > 0.9 and r2["ac"] < 0.2
    assert len({m["epochs"] for m in metrics}) > 1            # each pair stopped on its own plateau


def test_a_group_drops_its_stopped_pairs_and_still_equals_the_separate_fits(planted, tmp_path, monkeypatch):
    falling = replace(GROUP_FIT, schedule="geometric", final_lr=1e-2)       # the regrouped pair's lr goes on falling
    jobs = _jobs(planted, tmp_path / "grouped", falling, pairs=PAIRS[:2])
    sizes = _group_sizes(monkeypatch)
    metrics = fit_group(jobs)
    assert sizes == [2, 1] and [m["epochs"] for m in metrics] == [12, 11]   # a>c stopped: a>b trains alone
    for j in jobs:
        fit_transnet(j.cfg, tmp_path / "separate" / j.out_dir.name)
        _assert_same_fit(tmp_path / "separate" / j.out_dir.name, j.out_dir, optimiser=True)


def _fit_group_fixed(planted, root):
    fit_group(_jobs(planted, root, replace(GROUP_FIT, epochs=8)))


def test_an_interrupted_group_resumes_to_the_separate_fits(planted, tmp_path):
    fixed = replace(GROUP_FIT, epochs=8)
    # 48 fitted rows / batch 16 = 3 steps per epoch: killed in epoch 6, after last.pt of epoch 4
    proc = in_child(_fit_group_fixed, planted, tmp_path / "grouped", env={"KC_FAULT": "transnet_step:17"})
    assert exit_status(proc) == 137
    jobs = _jobs(planted, tmp_path / "grouped", fixed, mode="resume")
    assert all(load_checkpoint(j.out_dir / "last.pt")["epoch"] == 4 for j in jobs)
    fit_group(jobs)
    for j in jobs:
        fit_transnet(j.cfg, tmp_path / "separate" / j.out_dir.name)
        _assert_same_fit(tmp_path / "separate" / j.out_dir.name, j.out_dir)


def test_what_groups(planted, tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    jobs = _jobs(planted, tmp_path)
    assert [len(g) for g in plan_groups(jobs, "on", cpu)] == [4]
    assert [len(g) for g in plan_groups(jobs, "off", cpu)] == [1, 1, 1, 1]
    assert [len(g) for g in plan_groups(jobs, "auto", cpu)] == [4]               # 4x4x4 maps: small on the CPU too
    assert [len(g) for g in plan_groups(jobs, "on", cpu, world=2)] == [1, 1, 1, 1]
    assert pays("auto", cuda, 64 * 4 * 4, 1) and not pays("auto", cuda, 512 * 28 * 28, 1)
    assert pays("auto", cpu, 64 * 8 * 8, 1) and not pays("auto", cpu, 64 * 16 * 16, 1)
    # other options, other groups: the fits keep their own settings
    mixed = jobs[:2] + [replace(j, cfg=replace(j.cfg, lr=0.01)) for j in jobs[2:]]
    assert [[j.cfg.source + j.cfg.target for j in g] for g in plan_groups(mixed, "on", cpu)] == [["ab", "ac"],
                                                                                                   ["ba", "da"]]
    with pytest.raises(UserError, match="unknown --grouped 'yes'; valid: auto, on, off"):
        plan_groups(jobs, "yes", cpu)
