"""The one training loop. KD, Born-Again and Knowledge Evolution reuse it unchanged: the loss is
a parameter ``loss_fn(logits, targets, teacher_logits)``; an optional frozen ``teacher`` module
is run on the exact (augmented) batch the student sees.

Determinism on CPU: every epoch reseeds the global RNG (the harness) and the sampler's generator
from ``(seed, epoch)``, so a run resumed from an epoch checkpoint continues bit-identically.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from common.device import Workers, autocast, start_workers
from common.errors import UserError, require_choice
from common.faults import fault_point
from common.files import jsonable
from common.progress import progress
from common.rundir import RunDir
from training.config import (  # DATA_ON, OPTIMIZERS, SCHEDULES: re-exported, their old home
    DATA_ON,
    OPTIMIZERS,
    RESUME_FREE,
    SCHEDULES,
    TrainConfig,
    resume_note,
)
from training.device_data import DeviceLoader
from training.harness import Harness, Plan, epoch_seed, seed_everything  # noqa: F401 (seed_everything: re-exported)

LossFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def validate(cfg: TrainConfig) -> None:
    require_choice("--optimizer", cfg.optimizer, OPTIMIZERS)
    require_choice("--schedule", cfg.schedule, SCHEDULES)
    if cfg.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be > 0, got {cfg.lr}")
    require_choice("--data_on", cfg.data_on, DATA_ON)
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be in [0, 1), got {cfg.label_smoothing}")


# --------------------------------------------------------------------------- pieces

def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, t: float) -> float:
    """Learning-rate multiplier at fractional epoch ``t`` in [0, epochs]."""
    if cfg.warmup_epochs > 0 and t < cfg.warmup_epochs:
        return t / cfg.warmup_epochs
    floor = cfg.final_lr / cfg.lr
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** int(t // cfg.step_size)
    if cfg.schedule == "geometric":  # per epoch, reaching final_lr at the last epoch
        e = int(t)
        return floor ** (e / max(1, cfg.epochs - 1)) if floor > 0 else 1.0
    span = max(1e-8, cfg.epochs - cfg.warmup_epochs)
    p = min(1.0, (t - cfg.warmup_epochs) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step LambdaLR over fractional epochs."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(cfg, step / steps_per_epoch))


def cross_entropy_loss(label_smoothing: float = 0.0) -> LossFn:
    def loss(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None):
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    loss.convention = {"loss": "cross_entropy", "label_smoothing": label_smoothing}  # type: ignore[attr-defined]
    return loss


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices  # (N, k)
    hit = top.eq(targets[:, None])
    return [int(hit[:, :min(k, k_max)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool = True,
             return_logits: bool = False, channels_last: bool = False) -> dict[str, Any]:
    """Top-1/top-5 (percent) and mean cross-entropy over the whole loader (``channels_last``: the
    model is in that layout, so its inputs are put in it too)."""
    model.eval()
    n, loss_sum, c1, c5 = 0, 0.0, 0, 0
    all_logits = []
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        a1, a5 = accuracy_counts(logits, y)
        c1, c5, n = c1 + a1, c5 + a5, n + len(y)
        if return_logits:
            all_logits.append(logits.cpu())
    if n != len(loader.dataset):
        raise RuntimeError(f"evaluated {n} samples but the data set has {len(loader.dataset)}")
    out = {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "loss": loss_sum / max(n, 1), "n": n}
    if return_logits:
        out["logits"] = torch.cat(all_logits)
    return out


def _worker_init(worker_id: int) -> None:
    import random

    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


def make_loader(ds: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0,
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=gen, worker_init_fn=_worker_init, drop_last=drop_last,
                      pin_memory=pin_memory, persistent_workers=False)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# --------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    metrics: dict[str, Any]
    best_path: Path
    last_path: Path
    history: list[dict[str, Any]] = field(default_factory=list)


def train(model: nn.Module, train_set: Dataset, test_set: Dataset, cfg: TrainConfig, run: RunDir,
          ckpt_fields: dict[str, Any], loss_fn: LossFn | None = None, teacher: nn.Module | None = None,
          on_epoch_end: Callable[[nn.Module, int], None] | None = None, desc: str = "train",
          on_step_end: Callable[[nn.Module], None] | None = None) -> TrainResult:
    """Train ``model`` for ``cfg.epochs``; write ``best.pt``/``last.pt``, ``log.jsonl``, TensorBoard and
    ``metrics.json`` into ``run``. ``ckpt_fields`` (arch, num_classes, dataset, transform, config, and
    family fields) go into every checkpoint. If ``run.resuming`` and ``last.pt`` exists, continue from it.
    The epochs run through the harness (``training/harness.py``).
    """
    validate(cfg)
    workers = start_workers(cfg.device, start_group=False)   # joins the process group of a DDP job
    stage = Classifier(model, train_set, test_set, cfg, workers, ckpt_fields,
                       loss_fn or cross_entropy_loss(cfg.label_smoothing), teacher, desc, on_step_end)
    plan = Plan(cfg.epochs, cfg.eval_every, cfg.save_every, cfg.seed, rate_key="train_images_per_s",
                best=("test_top1", "best.pt"), on_epoch_end=on_epoch_end)
    harness = Harness(stage, plan, workers, run if workers.main else None, run.path)
    harness.resume(run.resuming)
    metrics = harness.run_epochs()
    return TrainResult(metrics, run.file("best.pt"), run.file("last.pt"), harness.history)


class Classifier:
    """The classifier stage of the harness: data loaders (a DistributedSampler under DDP), the optimiser
    and the per-step schedule, one epoch of (distilled) training, top-1/top-5 evaluation, checkpoints."""

    def __init__(self, model: nn.Module, train_set: Dataset, test_set: Dataset, cfg: TrainConfig,
                 workers: Workers, ckpt_fields: dict[str, Any], loss_fn: LossFn, teacher: nn.Module | None,
                 desc: str, on_step_end: Callable[[nn.Module], None] | None):
        self.cfg, self.device, self.ckpt_fields = cfg, workers.device, ckpt_fields
        self.loss_fn, self.desc, self.on_step_end = loss_fn, desc, on_step_end
        self.channels_last = self.device.type == "cuda" and cfg.channels_last
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.teacher = teacher
        if teacher is not None:
            self.teacher = teacher.to(self.device).eval()
            if self.channels_last:                      # it reads the student's channels_last batches
                self.teacher = self.teacher.to(memory_format=torch.channels_last)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.optimizer = make_optimizer(self.model.parameters(), cfg)
        self.train_loader, self.sampler, self.test_loader = _loaders(train_set, test_set, cfg, workers)
        self.steps = len(self.train_loader)
        self.scheduler = make_scheduler(self.optimizer, cfg, self.steps)

    def train_epoch(self, epoch: int, step_model: nn.Module) -> dict[str, Any]:
        cfg, device = self.cfg, self.device
        if self.sampler is not None or isinstance(self.train_loader, DeviceLoader):
            (self.sampler or self.train_loader).set_epoch(epoch)
        else:
            self.train_loader.generator.manual_seed(epoch_seed(cfg.seed, epoch))
        step_model.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        seen = 0
        for x, y, _ in progress(self.train_loader, self.steps, self.desc, epoch=(epoch, cfg.epochs)):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad(), autocast(device, cfg.amp):
                    teacher_logits = self.teacher(x).float()
            with autocast(device, cfg.amp):
                logits = step_model(x)
            loss = self.loss_fn(logits.float(), y, teacher_logits)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if self.on_step_end is not None:  # e.g. re-impose pruning masks / shared weights
                self.on_step_end(self.model)
            loss_sum += loss.detach().double() * len(y)
            seen += len(y)
            fault_point("train_step")
        return {"train_loss": loss_sum / max(seen, 1), "rows": seen}

    def evaluate(self, epoch: int) -> dict[str, Any]:
        ev = evaluate(self.model, self.test_loader, self.device, self.cfg.amp, channels_last=self.channels_last)
        return {"test_top1": ev["top1"], "test_top5": ev["top5"], "test_loss": ev["loss"]}

    def checkpoint(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return {**self.ckpt_fields, "state_dict": unwrap(self.model).state_dict(), "epoch": history[-1]["epoch"],
                "metrics": _summary(history)}

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return _summary(history)

    def diverged(self, epoch: int, record: dict[str, Any], last_good: str) -> Exception:
        return FloatingPointError(f"training loss became {record.get('train_loss')} at epoch {epoch}; {last_good}")

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        if state.get("arch") != self.ckpt_fields.get("arch"):
            raise UserError(f"{path} has arch {state.get('arch')!r}, this run builds {self.ckpt_fields.get('arch')!r}")
        check_resume_config(state.get("config") or {}, self.ckpt_fields.get("config") or {}, path)


# --------------------------------------------------------------------------- resume with the same settings

RUN_SECTIONS = ("data", "model", "train", "loss")   # the config.json sections that define what a run trains


def changed_settings(old: dict[str, Any], new: dict[str, Any], free: Collection[str] = ()) -> list[str]:
    """``key: old -> new`` for every key of both ``old`` and ``new`` whose values differ (as JSON), ``free``
    keys aside. A key recorded on one side only (an option added or removed since) is not compared."""
    old, new = jsonable(old), jsonable(new)
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in new if k in old and k not in free and old[k] != new[k]]


def resume_changes(old: dict[str, Any], new: dict[str, Any], sections: Sequence[str] = RUN_SECTIONS,
                   free: dict[str, Collection[str]] = RESUME_FREE) -> list[str]:
    """``section.key: old -> new`` for each setting of ``sections`` that differs between two run configs
    (config.json's ``config``), the ``free`` ones (by section) aside."""
    def dotted(cfg: dict[str, Any]) -> dict[str, Any]:
        return {f"{s}.{k}": v for s in sections if isinstance(cfg.get(s), dict) for k, v in cfg[s].items()}

    return changed_settings(dotted(old), dotted(new), {f"{s}.{k}" for s, keys in free.items() for k in keys})


def check_resume_config(old: dict[str, Any], new: dict[str, Any], path: Path, sections: Sequence[str] = RUN_SECTIONS,
                        free: dict[str, Collection[str]] = RESUME_FREE) -> None:
    """Refuse to resume ``path``, started with config ``old``, with config ``new`` when a setting differs:
    the records would say ``new`` for epochs run with ``old``. ``free`` sections other than those of
    :data:`RESUME_FREE` name the family options that may change (Born-Again's ``generations``)."""
    diffs = resume_changes(old, new, sections, free)
    if diffs:
        more = [k for s, keys in free.items() if s not in RESUME_FREE for k in keys]
        raise UserError(f"cannot resume {path}: it was started with other settings ({'; '.join(diffs)}). Resume "
                        f"with the options it was started with ({resume_note(*more)}), or use --overwrite or "
                        f"another --out_dir")


def _loaders(train_set: Dataset, test_set: Dataset, cfg: TrainConfig, workers: Workers):
    """(train loader, its DistributedSampler or None, test loader). Loaders of images held on the
    device (``training/device_data.py``) are used as they are."""
    if isinstance(train_set, DeviceLoader):
        return train_set, None, test_set
    pin = workers.device.type == "cuda"
    sampler = None
    if workers.world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(train_set, num_replicas=workers.world, rank=workers.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=True)
        train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler,
                                  num_workers=cfg.num_workers, worker_init_fn=_worker_init, pin_memory=pin,
                                  drop_last=True)
    else:
        train_loader = make_loader(train_set, cfg.batch_size, True, cfg.num_workers, cfg.seed,
                                   drop_last=len(train_set) > cfg.batch_size, pin_memory=pin)
    test_loader = make_loader(test_set, max(cfg.batch_size, 256), False, cfg.num_workers, pin_memory=pin)
    return train_loader, sampler, test_loader


def _summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    last = history[-1]
    evals = [h for h in history if "test_top1" in h]
    last_eval = evals[-1] if evals else {}
    best_top1 = max((h["test_top1"] for h in evals), default=-1.0)
    return {"epoch": last["epoch"], "test_top1": last_eval.get("test_top1"), "test_top5": last_eval.get("test_top5"),
            "test_loss": last_eval.get("test_loss"), "train_loss": last["train_loss"], "best_test_top1": best_top1,
            "train_time_s": sum(h["epoch_time_s"] for h in history)}
