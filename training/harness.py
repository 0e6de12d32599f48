"""The epoch harness: the one loop of every stage that trains (classifiers, their families and
refinement through ``training/loop.py``; Trans-Nets through ``transnet/fit.py``).

A stage supplies its model, optimiser and schedule, one epoch of training, its evaluation and its
checkpoint contents (:class:`Stage`); the harness owns the rest:

- the ranks and DDP wrapping (``common.device.Workers``);
- resume from ``last.pt`` (the stage's configuration check, then ``log.jsonl`` cut back to the resumed
  epoch);
- the epoch seed (:func:`epoch_seed`, the global RNGs reseeded at every epoch);
- one finite check per epoch: the stage's epoch returns device tensors, brought to the host in one
  transfer at the epoch's end (no host sync per step);
- evaluation and ``last.pt`` "every N epochs or at the last", an optional best checkpoint, an
  optional early stop, rank-0 logging (``log.jsonl`` and TensorBoard), and finishing the run
  (``metrics.json``).

Checkpoints go through :func:`save_state` (``common.checkpoints``: written to ``*.tmp``, then
``os.replace``).
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from common.checkpoints import load_checkpoint, save_checkpoint
from common.device import Workers
from common.rundir import RunDir

History = list[dict[str, Any]]


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """The seed of epoch ``epoch`` (0-based) of a run seeded ``seed``. ``stream`` keeps the random
    streams of different uses apart: 0 for classifier training, :data:`TRANSNET_STREAM` for the batch
    order of a Trans-Net fit (the constants reproduce the results of earlier versions)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(stream)) % (2**62)


TRANSNET_STREAM = 17


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Stage(Protocol):
    """What a training stage supplies to the harness."""

    model: nn.Module                      # the bare model (its state dict goes into checkpoints)
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def train_epoch(self, epoch: int, step_model: nn.Module) -> dict[str, Any]:
        """Train one epoch (0-based) through ``step_model`` (the model or its DDP wrapper). Values may
        be device tensors (brought to the host together at the epoch's end); ``rows`` is the number of
        rows this rank trained on; a key starting with ``_`` is a check that must be 0 and is not logged;
        ``epoch_time_s``, when given, replaces the measured time (a stage trained together with others
        states its share of their common epoch)."""

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """The evaluation fields of the epoch's record."""

    def checkpoint(self, history: History) -> dict[str, Any]:
        """The checkpoint contents after the last epoch of ``history`` (model state, fields, metrics)."""

    def summary(self, history: History) -> dict[str, Any]:
        """The run's ``metrics.json`` body (final files of the stage are written here)."""

    def diverged(self, epoch: int, record: dict[str, Any], last_good: str) -> Exception:
        """The error of a non-finite epoch (1-based); ``last_good`` names the last good checkpoint."""

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        """Refuse to resume ``state`` (read from ``path``) when it was started with other settings."""


@dataclass
class Plan:
    """How the harness runs a stage."""

    epochs: int                           # the epochs (with ``stop``: the most epochs)
    eval_every: int = 1                   # evaluate every N epochs and at the last
    save_every: int = 1                   # write last.pt every N epochs and at the last
    seed: int = 0
    seed_stream: int = 0                  # see epoch_seed
    rate_key: str = "samples_per_s"       # the record's throughput field (rows per second, all ranks)
    every_rank: bool = True               # evaluate and summarise on every rank (else rank 0 only)
    best: tuple[str, str] | None = None   # (record field to maximise, checkpoint file), e.g. best.pt
    stop: Callable[[History], bool] | None = None             # early stop, asked after every epoch
    on_epoch_end: Callable[[nn.Module, int], None] | None = None
    last_name: str = "last.pt"


def save_state(path: str | Path, contents: dict[str, Any]) -> str:
    """Write one checkpoint (atomically); return its sha256. Every checkpoint of a stage run by the
    harness is written here."""
    return save_checkpoint(path, contents)


def due(epoch: int, every: int, last: bool) -> bool:
    """True at every ``every``-th epoch (1-based) and at the last."""
    return epoch % every == 0 or last


@torch.no_grad()
def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Lay every per-parameter state tensor of ``optimizer`` (Adam's moments, momentum buffers) out like
    its parameter. ``Optimizer.load_state_dict`` casts dtype and device but keeps the saved strides, and
    CUDA's fused Adam refuses moments whose layout differs from their parameter's (a fit saved
    contiguous on the CPU and resumed channels_last on a GPU)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    optimizer.state[p][k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def to_host(fields: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Bring the tensors of ``fields`` to the host in one transfer: scalars as floats, others as lists.
    Returns the fields and whether every number is finite and every ``_`` check is 0."""
    tensors = {k: v for k, v in fields.items() if isinstance(v, torch.Tensor)}
    out = {k: v for k, v in fields.items() if k not in tensors}
    if tensors:
        flat = torch.cat([t.detach().double().reshape(-1) for t in tensors.values()]).cpu()
        parts = torch.split(flat, [t.numel() for t in tensors.values()])
        for (k, t), p in zip(tensors.items(), parts):
            out[k] = float(p[0]) if t.dim() == 0 else p.tolist()
    nums = [x for v in out.values() for x in (v if isinstance(v, list) else [v])
            if isinstance(x, (int, float)) and not isinstance(x, bool)]
    ok = bool(np.isfinite(nums).all()) and not any(out[k] for k in out if k.startswith("_"))
    return {k: v for k, v in out.items() if not k.startswith("_")}, ok


@dataclass
class Harness:
    """Runs ``stage`` by ``plan`` on ``workers`` into ``out_dir``; ``run`` is the run directory (rank 0;
    ``None`` on the other ranks)."""

    stage: Stage
    plan: Plan
    workers: Workers
    run: RunDir | None
    out_dir: Path
    history: History = field(default_factory=list)
    start_epoch: int = 0
    saved_epoch: int = 0

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.step_model = self.workers.wrap(self.stage.model)

    @property
    def last_path(self) -> Path:
        return self.out_dir / self.plan.last_name

    # ---- resume
    def resume(self, resuming: bool) -> int:
        """Continue from ``last.pt`` when ``resuming`` and it exists; return the first epoch to run."""
        if not (resuming and self.last_path.exists()):
            if resuming and self.run is not None:   # killed before its first checkpoint: those epochs run again
                self.run.truncate_log(self.start_epoch)
            return self.start_epoch
        state = load_checkpoint(self.last_path, map_location=self.workers.device)
        self.stage.check_resume(state, self.last_path)
        self.stage.model.load_state_dict(state["state_dict"])
        self.stage.optimizer.load_state_dict(state["optimizer"])
        match_param_layout(self.stage.optimizer)
        self.stage.scheduler.load_state_dict(state["scheduler"])
        self.start_epoch = self.saved_epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        if self.run is not None:
            self.run.truncate_log(self.start_epoch)
        return self.start_epoch

    # ---- the epochs
    def run_epochs(self) -> dict[str, Any]:
        """Every remaining epoch, then the summary; returns the metrics (``{}`` on ranks that do not
        summarise)."""
        for epoch in range(self.start_epoch, self.plan.epochs):
            if self.run_epoch(epoch):
                break
        return self.finish()

    def run_epoch(self, epoch: int) -> bool:
        """Train, check, evaluate, log and save one epoch; True when the stage asks to stop."""
        plan, stage, w = self.plan, self.stage, self.workers
        seed_everything(epoch_seed(plan.seed, epoch, plan.seed_stream))
        t0 = time.perf_counter()
        fields, finite = to_host(stage.train_epoch(epoch, self.step_model))   # the epoch's one sync
        dt = time.perf_counter() - t0
        dt = fields.pop("epoch_time_s", dt)     # a stage trained with others states its share of their time
        rows = fields.pop("rows", 0)
        record = {"epoch": epoch + 1, **fields, "lr": stage.optimizer.param_groups[0]["lr"], "epoch_time_s": dt,
                  plan.rate_key: rows * w.world / max(dt, 1e-9)}
        stop = finite and plan.stop is not None and plan.stop([*self.history, record])
        diverged, stop = w.any_rank(not finite, stop)    # the ranks stop, or fail, together (DDP waits else)
        if diverged:
            good = (f"the last good checkpoint is {self.last_path} (epoch {self.saved_epoch})" if self.saved_epoch
                    else "no checkpoint was written before")
            raise stage.diverged(epoch + 1, record, good)
        last = epoch + 1 == plan.epochs or stop
        if due(epoch + 1, plan.eval_every, last) and (plan.every_rank or w.main):
            record.update(stage.evaluate(epoch))
        w.barrier()
        if plan.on_epoch_end is not None:         # before the epoch is logged and saved (tests interrupt here)
            plan.on_epoch_end(stage.model, epoch + 1)
        self.history.append(record)
        if w.main:
            self._log_and_save(record, last)
        return stop

    def _log_and_save(self, record: dict[str, Any], last: bool) -> None:
        plan, epoch = self.plan, record["epoch"]
        self.run.log(record, step=epoch)
        if plan.best is not None:
            key, name = plan.best
            before = [h[key] for h in self.history[:-1] if key in h]
            if key in record and (not before or record[key] > max(before)):
                save_state(self.out_dir / name, self.stage.checkpoint(self.history))
        if due(epoch, plan.save_every, last):
            save_state(self.last_path, {**self.stage.checkpoint(self.history),
                                        "optimizer": self.stage.optimizer.state_dict(),
                                        "scheduler": self.stage.scheduler.state_dict(), "history": self.history})
            self.saved_epoch = epoch

    # ---- the end
    def finish(self) -> dict[str, Any]:
        """The stage's summary into ``metrics.json`` (rank 0); every rank waits for it."""
        metrics: dict[str, Any] = {}
        if self.plan.every_rank or self.workers.main:
            metrics = self.stage.summary(self.history)
        if self.run is not None:
            self.run.finish(metrics)
        self.workers.barrier()
        return metrics
