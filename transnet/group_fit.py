"""Trans-Nets fitted together: pairs that share every fit option, one build (channels, orders, kernel)
and the same number of training rows train as one grouped model (``transnet/grouped.py``): one step
for all of them, so a consistency matrix over a small layer is one launch-efficient fit instead of K
launch-bound ones.

Every pair keeps what is its own: its run directory, written as its separate fit writes it
(``config.json`` records ``fit_group``), its log, its validation loss, its ``--epochs auto`` stop and
its ``last.pt`` (its own slice of the optimiser state and the schedule). A pair's result is its
separate fit with the same seed, to float tolerance:

- the same start: each pair's Trans-Net is built seeded, as its separate fit builds it;
- the same batches: each pair reads its own source, whose batch order depends on the seed, the epoch
  and the row count only;
- gradients that do not mix: the loss is the sum of the pairs' own losses, the convolutions are
  grouped per pair and the instance stds are per sample and channel;
- an elementwise optimiser (Adam, its weight decay included) on one schedule.

A pair that stops early (``--epochs auto``) keeps its weights of that epoch; the group trains on
until its last pair stops (the other pairs' steps do not touch it), and drops its stopped pairs once
at most half of them still train. Interrupted, every pair resumes
from its own ``last.pt``; pairs resumed at the same epoch train together again.

``--grouped auto`` groups, in one process, when a source row is small: at most :data:`SMALL_ROW`
values on CUDA (where separate steps are launch-bound), at most :data:`CPU_SMALL_ROW` on the CPU
(measured with ``bench/group_fit.py`` on 2 cores: x1.20 for the demo's 12 fits of 64x4x4, x1.41 for 4
of them, x1.11 for 64x8x8); ``on`` groups wherever pairs allow it; ``off`` fits every pair by itself.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from common.device import cudnn_autotune, float32_math, precision_autocast, start_workers
from common.errors import UserError, require_choice
from common.faults import fault_point
from common.progress import progress
from common.rundir import RunDir
from training.harness import TRANSNET_STREAM, Harness, epoch_seed, match_param_layout, seed_everything
from training.loop import make_scheduler
from transnet.config import GROUPED  # re-exported: its old home
from transnet.fit import (
    FitConfig,
    FitStage,
    check_compile,
    compiled,
    lr_config,
    make_optimizer,
    open_splits,
    start_fit,
    validate,
)
from transnet.grouped import GroupedTransNet

SMALL_ROW = 65_536          # source elements per row (C·H·W) up to which a GPU step is launch-bound
CPU_SMALL_ROW = 4_096       # ... up to which grouping still paid on the CPU (bench/group_fit.py)


@dataclass(frozen=True)
class FitJob:
    """One pair to fit: its options, its run directory and how to open it (new | resume)."""

    cfg: FitConfig
    out_dir: Path
    mode: str = "new"


def check_grouped(choice: str) -> str:
    require_choice("--grouped", choice, GROUPED)
    return choice


def group_key(job: FitJob) -> tuple[Any, ...]:
    """What fits must share to train together: every option but the pair's nets, the shapes of both
    nets' maps and the training rows (from the feature files' metadata)."""
    info = open_splits(job.cfg)["train"]
    return replace(job.cfg, source="", target=""), info.shape_a, info.shape_b, info.n


def pays(choice: str, device: torch.device, row_elems: int, world: int) -> bool:
    """Whether a group of fits should train together (``choice``: auto | on | off)."""
    if check_grouped(choice) == "off" or world > 1:
        return False
    return choice == "on" or row_elems <= (SMALL_ROW if device.type == "cuda" else CPU_SMALL_ROW)


def plan_groups(jobs: Sequence[FitJob], choice: str, device: torch.device, world: int = 1) -> list[list[FitJob]]:
    """``jobs`` partitioned, in their order of first appearance, into groups that train together
    (two or more fits) and single fits."""
    if check_grouped(choice) == "off" or len(jobs) < 2:
        return [[j] for j in jobs]
    by_key: dict[Any, list[FitJob]] = {}
    for j in jobs:
        by_key.setdefault(group_key(j), []).append(j)
    out: list[list[FitJob]] = []
    for (_, shape_a, _, _), members in by_key.items():
        row = int(torch.Size(shape_a).numel())
        out.extend([members] if len(members) > 1 and pays(choice, device, row, world) else [[j] for j in members])
    return out


def fit_group(jobs: Sequence[FitJob]) -> list[dict[str, Any]]:
    """Fit ``jobs`` (fits of one group key) together; return each one's metrics, in order."""
    cfg = jobs[0].cfg
    alphas = validate(cfg)
    workers = start_workers(cfg.device)
    try:
        if workers.world > 1:
            raise UserError("grouped Trans-Net fits run in one process; under torchrun use --grouped off")
        check_compile(cfg.compile, workers.device)
        with contextlib.ExitStack() as stack, float32_math(workers.device, cfg.precision), \
                cudnn_autotune(workers.device):
            names = [f"{j.cfg.source}>{j.cfg.target}" for j in jobs]
            harnesses = []
            for j in jobs:
                run = stack.enter_context(RunDir(j.out_dir, j.mode))
                harnesses.append(start_fit(j.cfg, alphas, Path(j.out_dir), j.mode, workers, run,
                                           fit_group={"size": len(jobs), "pairs": names}))
            metrics: dict[int, dict[str, Any]] = {}
            by_start: dict[int, list[int]] = {}
            for i, h in enumerate(harnesses):
                by_start.setdefault(h.start_epoch, []).append(i)
            for start, idx in sorted(by_start.items()):
                metrics.update(zip(idx, FitGroup([harnesses[i] for i in idx]).run(start)))
            return [metrics[i] for i in range(len(jobs))]
    finally:
        workers.close()


class FitGroup:
    """The grouped model, optimiser and schedule of K harnessed fits that start at one epoch; trains
    an epoch for all of them and hands each pair its weights, optimiser state, schedule and sums."""

    def __init__(self, harnesses: Sequence[Harness]):
        self.harnesses = list(harnesses)
        self.stages: list[FitStage] = [h.stage for h in harnesses]
        s0 = self.stages[0]
        self.cfg, self.device, self.channels_last = s0.cfg, s0.device, s0.channels_last
        if len({s.steps for s in self.stages}) != 1:
            raise UserError(f"fits with different steps per epoch cannot train together: "
                            f"{[s.steps for s in self.stages]}")
        self.model = GroupedTransNet([s.model for s in self.stages]).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step = compiled(self.model, self.cfg.compile)          # the training forward (--compile)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.scheduler = make_scheduler(self.optimizer, lr_config(self.cfg), s0.steps)
        self.inv_scale = torch.tensor([1.0 / s.mse_scale for s in self.stages], device=self.device)
        self.alphas = torch.tensor(s0.alphas, dtype=torch.float32, device=self.device)
        self._gather_state()
        self.stats: dict[str, Any] = {}
        self.index = {id(s): g for g, s in enumerate(self.stages)}
        for s in self.stages:
            s.group = self

    # ---- the pairs' slices of the grouped parameters
    def _slices(self, g: int) -> list[tuple[torch.nn.Parameter, slice | int, torch.nn.Parameter]]:
        """(grouped parameter, pair g's index into it, pair g's own parameter)."""
        net = self.stages[g].model
        out = []
        for conv, own in zip(self.model.convs, net.convs):
            c = own.out_channels
            out.append((conv.weight, slice(g * c, (g + 1) * c), own.weight))
        out.append((self.model.gate_logits, g, net.gate_logits))
        return out

    def _gather_state(self) -> None:
        """Resumed pairs: their optimiser states and schedule become the group's."""
        first = self.stages[0]
        if not first.optimizer.state:
            return
        per_pair = [self._slices(g) for g in range(len(self.stages))]
        for j, (gp, _, _) in enumerate(per_pair[0]):
            states = [self.stages[g].optimizer.state.get(per_pair[g][j][2]) for g in range(len(self.stages))]
            if not all(states):                  # a parameter without state (frozen gates)
                continue
            joined = {k: (torch.stack if gp is self.model.gate_logits else torch.cat)([s[k] for s in states])
                      for k in states[0] if k != "step"}
            self.optimizer.state[gp] = {"step": states[0]["step"].clone(), **joined}
        match_param_layout(self.optimizer)                  # cat is contiguous; channels_last params are not
        self.scheduler.load_state_dict(first.scheduler.state_dict())
        self.optimizer.param_groups[0]["lr"] = first.optimizer.param_groups[0]["lr"]

    @torch.no_grad()
    def _hand_out(self, g: int) -> None:
        """Pair g's weights, optimiser state, lr and schedule, copied into its own stage."""
        stage = self.stages[g]
        for gp, idx, own in self._slices(g):
            own.copy_(gp[idx])
            st = self.optimizer.state.get(gp)
            if st:
                stage.optimizer.state[own] = {k: (v.clone() if k == "step" else torch.empty_like(own).copy_(v[idx]))
                                              for k, v in st.items()}
        stage.optimizer.param_groups[0]["lr"] = self.optimizer.param_groups[0]["lr"]
        stage.scheduler.load_state_dict(self.scheduler.state_dict())

    # ---- one epoch of every pair
    def train_epoch(self, epoch: int) -> None:
        cfg, k = self.cfg, len(self.stages)
        seed_everything(epoch_seed(cfg.seed, epoch, TRANSNET_STREAM))
        t0 = time.perf_counter()
        sources = [s.train_src.batches(cfg.batch_size, cfg.seed, epoch) for s in self.stages]
        mse_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        loss_sum = torch.zeros(k, device=self.device, dtype=torch.float64)
        steps = rows = 0
        self.model.train()
        for pairs in progress(zip(*sources), self.stages[0].steps, f"fit x{k}", epoch=(epoch, cfg.epoch_cap)):
            xa = torch.cat([p[0] for p in pairs], 1)
            xb = torch.cat([p[1] for p in pairs], 1)
            if self.channels_last:
                xa = xa.contiguous(memory_format=torch.channels_last)
            with precision_autocast(self.device, cfg.precision):
                yhat = self.step(xa)
            mse = self.model.pair_mse(yhat, xb)                                   # (K,)
            loss = mse * self.inv_scale + self.model.pair_penalties(self.alphas)  # (K,) each pair's own loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.sum().backward()
            self.optimizer.step()
            self.scheduler.step()
            mse_sum += mse.detach().double()
            loss_sum += loss.detach().double()
            steps += 1
            rows += xa.shape[0]
            fault_point("transnet_step")
        mse_host, loss_host = torch.stack([mse_sum, loss_sum]).cpu().tolist()   # the epoch's one sync
        self.stats = {"mse": mse_host, "loss": loss_host, "steps": steps, "rows": rows,
                      "time": time.perf_counter() - t0}

    def pair_stats(self, stage: FitStage) -> dict[str, Any]:
        """Stage's sums of the epoch just trained (``train_epoch``'s dict, as host floats: they join the
        stage's device tensors in one transfer) and its share of the time."""
        g, st = self.index[id(stage)], self.stats
        return {"mse_sum": st["mse"][g], "loss_sum": st["loss"][g], "steps": st["steps"], "rows": st["rows"],
                "epoch_time_s": st["time"] / len(self.stages)}

    def run(self, start: int) -> list[dict[str, Any]]:
        """Every epoch from ``start`` until each pair stopped or reached the cap; each pair's metrics.
        Once at most half of a group's pairs still train, the rest are regrouped without the stopped
        ones (their weights, optimiser state and schedule as just handed out), so stopped pairs cost no
        work: at most log2(K) rebuilds (and recompilations under ``--compile``)."""
        group, active = self, list(range(len(self.stages)))
        metrics: dict[int, dict[str, Any]] = {}
        for epoch in range(start, self.cfg.epoch_cap):
            if not active:
                break
            group.train_epoch(epoch)
            for g in list(active):
                group._hand_out(group.index[id(self.stages[g])])
                if self.harnesses[g].run_epoch(epoch) or epoch + 1 == self.cfg.epoch_cap:
                    metrics[g] = self.harnesses[g].finish()
                    active.remove(g)
            if active and len(active) <= len(group.stages) // 2:
                group = FitGroup([self.harnesses[g] for g in active])
        for g in active:                      # resumed at the cap: nothing left to train
            metrics[g] = self.harnesses[g].finish()
        return [metrics[g] for g in range(len(self.stages))]
