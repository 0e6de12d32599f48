"""The epoch harness on a toy stage: what is evaluated and saved when, early stops, divergence,
resume, and the one host transfer per epoch."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common.device import Workers
from common.rundir import RunDir
from training.harness import TRANSNET_STREAM, Harness, Plan, epoch_seed, to_host


class Toy:
    """A stage whose epoch 'loss' is ``losses[epoch]`` (a device tensor); it counts its calls."""

    def __init__(self, losses: list[float]):
        self.model = nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0)
        self.losses, self.evaluated, self.summaries = losses, [], 0

    def train_epoch(self, epoch: int, step_model: nn.Module) -> dict:
        self.optimizer.step()
        self.scheduler.step()
        return {"train_loss": torch.tensor(self.losses[epoch]), "rows": 4, "_bad": torch.tensor(0.0)}

    def evaluate(self, epoch: int) -> dict:
        self.evaluated.append(epoch + 1)
        return {"score": float(epoch)}

    def checkpoint(self, history):
        return {"state_dict": self.model.state_dict(), "arch": "toy", "num_classes": None, "dataset": None,
                "transform": None, "epoch": history[-1]["epoch"], "metrics": {}, "config": {}}

    def summary(self, history):
        self.summaries += 1
        return {"epochs": len(history)}

    def diverged(self, epoch, record, last_good):
        return FloatingPointError(f"epoch {epoch}: {last_good}")

    def check_resume(self, state, path):
        pass


def _run(tmp_path: Path, losses, mode="new", **plan) -> tuple[Toy, Harness, dict]:
    stage = Toy(losses)
    with RunDir(tmp_path / "run", mode) as run:
        h = Harness(stage, Plan(epochs=len(losses), **plan), Workers(torch.device("cpu")), run, tmp_path / "run")
        h.resume(run.resuming)
        return stage, h, h.run_epochs()


def _log(tmp_path: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]


def test_evaluates_and_saves_every_n_epochs_and_at_the_last(tmp_path):
    stage, h, metrics = _run(tmp_path, [1.0] * 7, eval_every=3, save_every=2, best=("score", "best.pt"))
    assert stage.evaluated == [3, 6, 7] and metrics == {"epochs": 7} and stage.summaries == 1
    assert _log(tmp_path) == list(range(1, 8)) and h.saved_epoch == 7
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == 7
    rec = h.history[-1]
    assert rec["train_loss"] == 1.0 and "_bad" not in rec and rec["samples_per_s"] > 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"epochs": 7}


def test_a_stop_rule_ends_the_run_with_an_evaluated_and_saved_epoch(tmp_path):
    stage, h, _ = _run(tmp_path, [1.0] * 10, eval_every=100, save_every=100, stop=lambda hist: len(hist) == 4)
    assert len(h.history) == 4 and stage.evaluated == [4] and h.saved_epoch == 4


def test_a_non_finite_epoch_names_the_last_good_checkpoint_and_a_resume_continues(tmp_path):
    with pytest.raises(FloatingPointError, match=r"epoch 3: the last good checkpoint is .*last\.pt \(epoch 2\)"):
        _run(tmp_path, [1.0, 1.0, math.nan, 1.0], save_every=1)
    assert _log(tmp_path) == [1, 2]
    stage, h, _ = _run(tmp_path, [1.0, 1.0, 0.5, 0.5], mode="resume", save_every=1)
    assert h.start_epoch == 2 and _log(tmp_path) == [1, 2, 3, 4] and len(h.history) == 4


def test_a_resume_before_the_first_checkpoint_starts_the_log_afresh(tmp_path):
    """Epochs logged before any last.pt run again on resume: their old lines go, none is doubled."""
    with pytest.raises(FloatingPointError):
        _run(tmp_path, [1.0, 1.0, math.nan], save_every=100)        # killed before its first save
    assert _log(tmp_path) == [1, 2] and not (tmp_path / "run" / "last.pt").exists()
    stage, h, _ = _run(tmp_path, [1.0, 1.0, 1.0], mode="resume", save_every=100)
    assert h.start_epoch == 0 and _log(tmp_path) == [1, 2, 3]


def test_epoch_fields_come_to_the_host_in_one_transfer():
    fields, ok = to_host({"a": torch.tensor(2.0), "v": torch.tensor([1.0, 3.0]), "n": 5,
                          "e": torch.zeros(0), "_check": torch.tensor(0.0)})
    assert ok and fields == {"a": 2.0, "v": [1.0, 3.0], "n": 5, "e": []}
    assert not to_host({"a": torch.tensor(float("inf"))})[1]
    assert not to_host({"a": torch.tensor(1.0), "_check": torch.tensor(True)})[1]


def test_one_epoch_seed_with_a_stream_per_use():
    """The classifier stream and the Trans-Net stream reproduce the seeds earlier versions used."""
    assert epoch_seed(3, 7) == (3 * 1_000_003 + 7 * 7919) % 2**62
    assert epoch_seed(3, 7, TRANSNET_STREAM) == (3 * 1_000_003 + 7 * 7919 + 17) % 2**62


def test_resumed_optimizer_state_takes_its_parameters_layout():
    """Adam's moments saved from a contiguous model and loaded into a channels_last one keep their saved
    strides (``load_state_dict`` casts only dtype and device); match_param_layout lays them out like
    their parameters, values unchanged, as CUDA's fused Adam requires."""
    from training.harness import match_param_layout

    torch.manual_seed(0)
    saved = torch.nn.Conv2d(3, 4, 3)
    opt = torch.optim.Adam(saved.parameters(), lr=0.1)
    saved(torch.randn(2, 3, 5, 5)).square().sum().backward()
    opt.step()
    resumed = torch.nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    resumed.load_state_dict(saved.state_dict())
    opt2 = torch.optim.Adam(resumed.parameters(), lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    w = resumed.weight
    assert opt2.state[w]["exp_avg"].stride() != w.stride()             # what load_state_dict leaves
    match_param_layout(opt2)
    for k in ("exp_avg", "exp_avg_sq"):
        got, want = opt2.state[w][k], opt.state[saved.weight][k]
        assert got.stride() == w.stride() and torch.equal(got, want)
    assert opt2.state[w]["step"].shape == ()
