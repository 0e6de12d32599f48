"""Fit a Trans-Net from a ``kc-features`` file: the loop, held-out evaluation, checkpoints, resume.

    python cli.py fit-transnet --features F --source seed0 --target seed5 --layer features.30 --out_dir D
    torchrun --nproc_per_node=4 cli.py fit-transnet ...        # DDP, the same command

Loss (methods.md §1): MSE(ŷ, x_B) over all elements, on raw target features, plus Σ_k α_k p_k²
(α per order, order 1 first). ``--loss_scale target_var`` divides the MSE by the per-channel
centred variance of the training targets: a scale-free variant and a **deviation from the paper**.
Defaults are the paper's preset: Adam, lr 1e-4 decayed geometrically per epoch to 1e-6 at the last
epoch, weight decay 1e-4 (gate logits included), batch 64, 1000 epochs, fitted on the ``train``
split. Held-out metrics (the variance report of design.md) come from ``--eval_split`` every
``--eval_every`` epochs and at the end. A report is **held-out** only when its split differs from
the training split: ``--eval_split`` equal to ``--train_split`` (or ``none``) gives an in-sample
report, written with ``"held_out": false`` and a warning.

Numerical edges (see ``transnet/model.py``): 1×1 maps use s = 1; ``--std_correction 0|1`` picks the
population (default) or the unbiased (the original code's) spatial std; spatially constant non-zero
source slices are counted on the training and the evaluation split (``train_constant_source_slices``,
``constant_source_slices``) and warned about, and ``--std_floor F`` (off in the paper's preset)
bounds s below by F times the slice's rms.

``--precision fp32|tf32|bf16`` (``common/device.py``): the arithmetic on CUDA. ``fp32`` (default) is
the paper-faithful choice, with TF32 off; ``tf32`` and ``bf16`` (autocast) are faster. On the CPU
every choice computes in float32; ``metrics.json`` records ``precision`` and
``precision_effective``.

Cross-layer fits (``transnet/spatial.py``): ``--target_layer L2`` reads the target at another layer
than ``--layer`` (the source's); maps of different sizes need ``--spatial pool|interpolate``, which
resizes the source to the target's H x W. Reports then carry ``source_layer``, ``target_layer`` and
the convention; same-layer fits write what they always wrote.

Validation rows and convergence (``transnet/convergence.py``): ``--val_fraction`` of the training
rows (seeded) are held out of the fit; ``val_loss`` is logged every epoch and ``metrics.json`` gets a
``convergence`` verdict. ``--epochs auto`` stops on a plateau of ``val_loss`` (``--patience``, at most
``--max_epochs``; the lr schedule spans the cap). The epochs run through ``training/harness.py``.

The run directory holds ``config.json``, ``log.jsonl``, TensorBoard events, ``last.pt`` (resume state:
model, optimiser, schedule, history; written every ``--save_every`` epochs and only after a finite
epoch, so it is always the last good state), ``transnet.pt`` (the final model) and ``metrics.json``.
Both checkpoints carry the model arguments, source/target/layer, the feature files and their
per-dataset provenance, and the normalisation statistics.

Features are held where ``--data_on`` says (``auto``: GPU memory when they fit in half of the free
memory, else pinned RAM, else contiguous HDF5 blocks read in a shuffled block order; see
``transnet/data.py``); batches are gathered on the device.

Small or synthetic problems converge very slowly at the paper's lr 1e-4 (identity: R² 0.57 after 400
epochs); ``--lr 1e-2`` for ~200 epochs converges (methods.md §5).

``batch_size`` is the global batch: under DDP every rank takes ``batch_size / world`` rows of each
global batch, so a DDP fit follows the single-process one (up to float summation order).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.checkpoints import load_checkpoint
from common.device import (
    PRECISIONS,
    Workers,
    cudnn_autotune,
    effective_precision,
    float32_math,
    precision_autocast,
    start_workers,
)
from common.distributed import local_world_size
from common.errors import UserError, require_choice
from common.faults import fault_point
from common.options import parse_csv
from common.progress import progress
from common.rundir import RunDir
from training.harness import TRANSNET_STREAM, Harness, Plan, save_state
from training.loop import TrainConfig, make_scheduler
from transnet.config import (  # re-exported: their old home
    COMPILE_MODES,
    FIT_SCHEDULES,
    LOSS_SCALES,
    FitConfig,
)
from transnet.convergence import SCHEDULES, VAL_RULE, plateau_stop, validation_rows, verdict
from transnet.data import (
    DATA_ON,
    BlockPairs,
    PairInfo,
    choose_placement,
    count_constant_source,
    find_nonfinite,
    make_source,
    make_sources,
    nonfinite_message,
    open_pair,
    source_channel_std,
    target_variance,
)
from transnet.model import INPUT_NORMS, STD_CORRECTIONS, TransNet, TransNetConfig, n_parameters
from transnet.spatial import check_spatial_name
from transnet.variance import constant_warning, variance_report

NO_EVAL = "none"
FINAL_CKPT = "transnet.pt"
LAST_CKPT = "last.pt"


# Options that may differ when a run is resumed (they change speed or paths, not the result).
RESUME_FREE = ("features", "target_features", "device", "data_on", "block_rows", "eval_every", "save_every",
               "channels_last", "compile", "allow_changed_checkpoints")


class DivergenceError(UserError):
    """The loss or the model became non-finite."""


# --------------------------------------------------------------------------- validation

def parse_alpha(alpha: str | float | list, orders: int) -> list[float]:
    """``"0.1"`` or ``"0.1,0.2"`` -> one α per order (order 1 first)."""
    if isinstance(alpha, (int, float)):
        vals = [float(alpha)]
    elif isinstance(alpha, (list, tuple)):
        vals = [float(a) for a in alpha]
    else:
        try:
            vals = parse_csv(str(alpha).strip("[]"), float)
        except ValueError:
            raise UserError(f"--alpha must be numbers separated by commas, got {alpha!r}") from None
    if orders == 0:
        return []
    if len(vals) == 1:
        vals = vals * orders
    if len(vals) != orders:
        raise UserError(f"--alpha has {len(vals)} values but --orders {orders} needs 1 or {orders} "
                        f"(one per order, order 1 first)")
    if not all(math.isfinite(v) and v >= 0 for v in vals):     # NaN passes `v < 0`
        raise UserError(f"--alpha values must be finite and >= 0, got {vals}")
    return vals


def validate(cfg: FitConfig) -> list[float]:
    for name in ("features", "source", "target", "layer"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    checks = [("input_norm", INPUT_NORMS), ("schedule", FIT_SCHEDULES), ("loss_scale", LOSS_SCALES),
              ("data_on", DATA_ON), ("precision", PRECISIONS), ("compile", COMPILE_MODES)]
    for name, valid in checks:
        require_choice(f"--{name}", getattr(cfg, name), valid)
    check_spatial_name(cfg.spatial)
    if cfg.orders < 0:
        raise UserError(f"--orders must be >= 0, got {cfg.orders}")
    if cfg.kernel < 1 or cfg.kernel % 2 == 0:
        raise UserError(f"--kernel must be a positive odd number (same padding), got {cfg.kernel}")
    for name in ("epoch_cap", "batch_size", "eval_every", "save_every", "block_rows", "patience"):
        if getattr(cfg, name) < 1:
            flag = ("max_epochs" if cfg.auto else "epochs") if name == "epoch_cap" else name
            raise UserError(f"--{flag} must be >= 1, got {getattr(cfg, name)}")
    if cfg.train_rows < 0:
        raise UserError(f"--train_rows must be >= 0 (0: every row), got {cfg.train_rows}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise UserError(f"--val_fraction must be in [0, 1) (0: no validation rows), got {cfg.val_fraction}")
    if cfg.auto and cfg.val_fraction == 0:
        raise UserError("--epochs auto stops on a plateau of the validation loss; it needs --val_fraction > 0")
    if cfg.lr <= 0 or cfg.final_lr < 0:
        raise UserError(f"--lr must be > 0 and --final_lr >= 0, got {cfg.lr} and {cfg.final_lr}")
    if cfg.schedule == "geometric" and cfg.final_lr <= 0:
        raise UserError("--schedule geometric needs --final_lr > 0")
    if not 0.0 <= cfg.gate_init <= 1.0:
        raise UserError(f"--gate_init must be in [0, 1], got {cfg.gate_init}")
    if cfg.gate_init in (0.0, 1.0) and not cfg.freeze_gates and cfg.orders > 0:
        raise UserError("--gate_init 0 or 1 is an infinite logit; use it with --freeze_gates")
    if cfg.weight_decay < 0:
        raise UserError(f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.std_correction not in STD_CORRECTIONS:
        raise UserError(f"--std_correction must be 0 (population std) or 1 (unbiased, the original code), "
                        f"got {cfg.std_correction!r}")
    if not 0.0 <= cfg.std_floor <= 1.0:
        raise UserError(f"--std_floor must be in [0, 1] (a fraction of the slice's rms; 0 = off), got {cfg.std_floor}")
    return parse_alpha(cfg.alpha, cfg.orders)


def lr_config(cfg: FitConfig) -> TrainConfig:
    """The training loop's schedule settings for this fit (its ``lr_factor`` is shared)."""
    return TrainConfig(epochs=cfg.epoch_cap, lr=cfg.lr, final_lr=cfg.final_lr, schedule=cfg.schedule,
                       optimizer="adam", weight_decay=cfg.weight_decay, batch_size=cfg.batch_size)


# --------------------------------------------------------------------------- building blocks

def build_transnet(cfg: FitConfig, info: PairInfo) -> TransNet:
    """The Trans-Net of ``cfg`` (its fields shared with TransNetConfig) mapping the pair's channels, seeded."""
    torch.manual_seed(cfg.seed)
    shared = {f.name: getattr(cfg, f.name) for f in fields(TransNetConfig) if hasattr(cfg, f.name)}
    arch = TransNetConfig(**{**shared, "channels": info.shape_a[0], "out_channels": info.shape_b[0]})
    return TransNet(arch, gate_init=cfg.gate_init)


def model_args(model: TransNet) -> dict[str, Any]:
    """The checkpoint's ``model_args``: the model's TransNetConfig as a dict."""
    return asdict(model.cfg)


def compiled(module: nn.Module, mode: str) -> nn.Module:
    """``module`` under ``torch.compile`` in ``mode`` (``--compile``), or itself for ``off``; ``cudagraphs``
    is torch's backend of that name (the forward and backward captured as CUDA graphs and replayed, no
    kernel generation: no inductor compile time, for small launch-bound fits). Its parameters stay the
    module's, so the optimiser, checkpoints and the eager evaluation see one model."""
    if mode == "off":
        return module
    if mode == "cudagraphs":
        return torch.compile(module, backend="cudagraphs")
    return torch.compile(module, mode=mode)


def check_compile(mode: str, device: torch.device) -> None:
    """``--compile cudagraphs`` needs a CUDA device (elsewhere it would quietly run eager)."""
    if mode == "cudagraphs" and device.type != "cuda":
        raise UserError(f"--compile cudagraphs captures CUDA graphs and needs a CUDA device, not {device}; "
                        f"on the CPU use --compile off or default (valid: {', '.join(COMPILE_MODES)})")


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.Optimizer:
    """Adam with L2 weight decay on every parameter (gate logits included, as the paper); the fused
    kernel when the model lives on a GPU."""
    params = list(model.parameters())
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def train_epoch(model: TransNet, step_model: nn.Module, opt: torch.optim.Optimizer, sched, batches,
                alphas: list[float], mse_scale: float, device: torch.device, precision: str = "fp32",
                channels_last: bool = False, total: int | None = None, desc: str = "fit",
                epoch: tuple[int, int] | None = None) -> dict[str, Any]:
    """One pass over ``batches`` of ``(x_A, x_B)`` on ``device``. ``step_model`` is ``model`` or its DDP
    wrapper. Returns device tensors (no sync inside the loop): sums of MSE and loss, and the count."""
    step_model.train()
    mse_sum = torch.zeros((), device=device, dtype=torch.float64)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    steps = rows = 0
    inv_scale = 1.0 / mse_scale
    alpha_t = torch.tensor(alphas, dtype=torch.float32, device=device)   # (K,) once, not per step
    for xa, xb in progress(batches, total, desc, epoch=epoch):
        if channels_last:
            xa = xa.contiguous(memory_format=torch.channels_last)
        with precision_autocast(device, precision):
            yhat = step_model(xa)                                  # (b, C_B, H, W)
        mse = F.mse_loss(yhat.float(), xb)
        loss = mse * inv_scale + model.alpha_penalty(alpha_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        mse_sum += mse.detach().double()
        loss_sum += loss.detach().double()
        steps += 1
        rows += xa.shape[0]
        fault_point("transnet_step")                     # reliability tests kill the process here
    return {"mse_sum": mse_sum, "loss_sum": loss_sum, "steps": steps, "rows": rows}


def in_sample_warning(split: str, train_split: str, train_rows: int = 0, n_split: int = 0) -> str:
    """The warning of a report computed on the training split (not held-out)."""
    part = (f" (fitted on its first {train_rows} of {n_split} rows, so partly)"
            if 0 < train_rows < n_split else "")
    return (f"in-sample report: split {split!r} is the training split {train_split!r}{part}; the Trans-Net "
            f"saw these rows and can memorise them, so R² and the fractions are not held-out figures")


def add_warning(rep: dict[str, Any], warning: str | None, first: bool = False) -> dict[str, Any]:
    """Add ``warning`` to the report's ``warnings`` list (at the front when ``first``); ``warning``
    holds them all, joined."""
    warns = list(rep.get("warnings") or [])
    if warning and warning not in warns:
        warns.insert(0 if first else len(warns), warning)
    rep["warnings"] = warns
    if warns:
        rep["warning"] = "; ".join(warns)
    return rep


def _report(model: TransNet, src, info: PairInfo, batch_size: int, device: torch.device, held_out: bool,
            warning: str | None) -> dict[str, Any]:
    rep = variance_report(model, src.sequential(batch_size), device=device, split=info.split,
                          source=info.source, target=info.target, layer=info.layer)
    rep.update(info.layer_record())
    rep["held_out"] = held_out
    return add_warning(rep, warning, first=True)


def _checkpoint(model: TransNet, cfg: FitConfig, alphas: list[float], infos: dict[str, PairInfo],
                norm_stats: dict[str, Any], epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
    train = infos["train"]
    root = train.provenance_a.get("root", {})
    return {
        "state_dict": model.state_dict(), "arch": "transnet", "kind": "transnet", "num_classes": None,
        "dataset": root.get("dataset"), "transform": root.get("transform"), "epoch": epoch, "metrics": metrics,
        "config": asdict(cfg), "model_args": model_args(model), "alphas": alphas,
        "source": train.source, "target": train.target, "layer": train.layer,
        **({"target_layer": train.target_layer, "spatial": train.spatial} if train.target_layer or train.spatial
           else {}),
        "features": str(Path(train.features).resolve()),
        "target_features": str(Path(train.target_features).resolve()),
        "feature_provenance": {split: {"source": i.provenance_a, "target": i.provenance_b}
                               for split, i in infos.items()},
        "norm_stats": norm_stats,
    }


def _diagnose(model: TransNet, src, info: PairInfo, epoch: int, last_good: str) -> str:
    """Name the offending tensor of a non-finite epoch: the features, else the parameters."""
    if isinstance(src, BlockPairs) and bool(src.nonfinite):
        hit = find_nonfinite(info)
        if hit is not None:
            return f"epoch {epoch}: " + nonfinite_message(info, *hit) + f"; {last_good}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    what = f"non-finite parameters: {', '.join(bad)}" if bad else "the loss is non-finite"
    return (f"training diverged at epoch {epoch} ({what}); lower --lr, or use --loss_scale target_var for "
            f"features of large magnitude; {last_good}")


# --------------------------------------------------------------------------- the fit

def fit_transnet(cfg: FitConfig, out_dir: str | os.PathLike, mode: str = "new",
                 on_epoch_end: Callable[[TransNet, int], None] | None = None) -> dict[str, Any]:
    """Fit, evaluate and save a Trans-Net into ``out_dir``; return the metrics (held-out variance report
    plus train MSE, epochs and time). ``mode``: new | resume | overwrite."""
    alphas = validate(cfg)
    workers = start_workers(cfg.device)
    try:
        check_compile(cfg.compile, workers.device)
        if cfg.batch_size % workers.world:
            raise UserError(f"--batch_size {cfg.batch_size} must be divisible by the {workers.world} DDP processes")
        # fp32: TF32 off; tf32/bf16: TF32 on; fixed shapes, so cuDNN keeps its fastest kernels (CUDA only)
        with float32_math(workers.device, cfg.precision), cudnn_autotune(workers.device):
            return _fit_body(cfg, alphas, Path(out_dir), mode, workers, on_epoch_end)
    finally:
        workers.close()


def _fit_body(cfg: FitConfig, alphas: list[float], out_dir: Path, mode: str, workers: Workers,
              on_epoch_end) -> dict[str, Any]:
    """Open the splits, build the stage and run it through the epoch harness."""
    run = RunDir(out_dir, mode) if workers.main else None
    try:
        return start_fit(cfg, alphas, out_dir, mode, workers, run, on_epoch_end).run_epochs()
    finally:
        if run is not None:
            run.close()


def start_fit(cfg: FitConfig, alphas: list[float], out_dir: Path, mode: str, workers: Workers,
              run: RunDir | None, on_epoch_end=None, **config_extra: Any) -> Harness:
    """The harness of one fit, resumed from ``last.pt`` when ``mode`` is resume, its ``config.json``
    written (with ``config_extra``); ``run_epochs()`` then fits."""
    stage = FitStage(cfg, alphas, open_splits(cfg), workers, out_dir)
    plan = Plan(cfg.epoch_cap, cfg.eval_every, cfg.save_every, cfg.seed, TRANSNET_STREAM, "samples_per_s",
                every_rank=False, stop=plateau_stop(cfg.patience) if cfg.auto else None,
                on_epoch_end=on_epoch_end, last_name=LAST_CKPT)
    harness = Harness(stage, plan, workers, run, out_dir)
    harness.resume(mode == "resume")
    if run is not None:
        run.write_config(cfg, **stage.config_fields(), **config_extra)
    return harness


def open_splits(cfg: FitConfig) -> dict[str, PairInfo]:
    """The checked training split (its first ``train_rows`` rows when given) and, unless ``eval_split``
    is ``none``, the split of the report, as ``{"train": ..., "eval": ...}``."""
    train_info = open_pair(cfg.features, cfg.source, cfg.target, cfg.layer, cfg.train_split, cfg.target_features,
                           cfg.allow_changed_checkpoints, cfg.target_layer, cfg.spatial)
    if 0 < cfg.train_rows < train_info.n:     # the first rows: a fixed, reproducible subset
        train_info = replace(train_info, n=cfg.train_rows)
    infos = {"train": train_info}
    if cfg.eval_split != NO_EVAL:
        eval_info = open_pair(cfg.features, cfg.source, cfg.target, cfg.layer, cfg.eval_split, cfg.target_features,
                              cfg.allow_changed_checkpoints, cfg.target_layer, cfg.spatial)
        if (eval_info.shape_a, eval_info.shape_b) != (train_info.shape_a, train_info.shape_b):
            raise UserError(f"split {cfg.eval_split!r} has feature shapes {eval_info.shape_a} -> {eval_info.shape_b} "
                            f"but split {cfg.train_split!r} has {train_info.shape_a} -> {train_info.shape_b}")
        infos["eval"] = eval_info
    return infos


class FitStage:
    """The Trans-Net stage of the epoch harness (``training/harness.py``): data, model, normalisation
    statistics and optimiser; one epoch; the held-out report; checkpoints; the final model."""

    def __init__(self, cfg: FitConfig, alphas: list[float], infos: dict[str, PairInfo], workers: Workers,
                 out_dir: Path):
        self.cfg, self.alphas, self.infos, self.workers, self.out_dir = cfg, alphas, infos, workers, out_dir
        self.device, self.train_info = workers.device, infos["train"]
        self.evaluates = "eval" in infos                     # a split of its own to report on
        self.held_out = self.evaluates and cfg.eval_split != cfg.train_split
        self.eval_info = infos.get("eval", self.train_info)
        self._data()
        self._model()
        self.optimizer = make_optimizer(self.model, cfg)
        self.steps = self.train_src.steps(cfg.batch_size, workers.world)
        self.scheduler = make_scheduler(self.optimizer, lr_config(cfg), self.steps)
        self._warnings()
        self.last_rep: dict[str, Any] | None = None
        self.group = None       # a transnet.group_fit.FitGroup when this pair trains with others
        self.step: nn.Module | None = None

    # ---- data
    def _data(self) -> None:
        cfg, device = self.cfg, self.device
        copies = local_world_size() if self.workers.world > 1 else 1
        self.placement = choose_placement(self.train_info.nbytes, device, cfg.data_on, copies=copies)
        self.eval_place = self.placement
        if self.evaluates:                # chosen before anything is placed: free memory counts both once
            self.eval_place = choose_placement(self.eval_info.nbytes, device, cfg.data_on, copies=copies,
                                               reserved=self.train_info.nbytes if self.placement != "disk" else 0)
        # rank 0's choice for every rank: ranks placed differently would take different steps per epoch
        self.placement, self.eval_place = self.workers.from_main((self.placement, self.eval_place))
        self.val_rows = validation_rows(self.train_info.n, cfg.val_fraction, cfg.seed)
        self.val_src = None
        if len(self.val_rows):                                # held out of the training split
            fit_rows = np.setdiff1d(np.arange(self.train_info.n), self.val_rows)
            self.train_src, self.val_src = make_sources(self.train_info, device, self.placement,
                                                        [fit_rows, self.val_rows], cfg.block_rows)
        else:
            self.train_src = make_source(self.train_info, device, self.placement, cfg.block_rows)
        self.eval_src = self.train_src
        if self.evaluates:
            self.eval_src = make_source(self.eval_info, device, self.eval_place, cfg.block_rows)
        self.eval_batch = max(cfg.batch_size, 128)

    # ---- model, normalisation statistics
    def _model(self) -> None:
        cfg = self.cfg
        model = build_transnet(cfg, self.train_info)
        self.norm_stats: dict[str, Any] = {"input_norm": cfg.input_norm, "input_std": None, "target_var": None}
        if cfg.input_norm == "global":
            std = source_channel_std(self.train_src, cfg.block_rows)
            model.set_input_scale(std)
            self.norm_stats["input_std"] = std
        self.mse_scale = 1.0
        if cfg.loss_scale == "target_var":
            tv = target_variance(self.train_src, cfg.block_rows)
            if not tv > 0:
                raise UserError(f"--loss_scale target_var: the target features {self.train_info.dataset_path('b')} "
                                f"have zero variance")
            self.norm_stats["target_var"] = self.mse_scale = tv
        self.model = model.to(self.device)
        self.channels_last = self.device.type == "cuda" and cfg.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

    # ---- what the reports must say: in-sample, constant source slices of the training split
    def _warnings(self) -> None:
        cfg = self.cfg
        self.sample_warning = None
        if not self.held_out:
            self.sample_warning = ("no held-out split (--eval_split none): the report is in-sample"
                                   if not self.evaluates else
                                   in_sample_warning(cfg.eval_split, cfg.train_split, cfg.train_rows, self.eval_info.n))
        # every rank counts (rank 0 alone would leave the others waiting in DDP's start-up collectives)
        self.train_constant = count_constant_source(self.train_src, cfg.block_rows)

    def config_fields(self) -> dict[str, Any]:
        """What ``config.json`` records besides the options."""
        mse_note = " / Var(x_B) (deviation from the paper)" if self.mse_scale != 1.0 else ""
        return dict(device=self.device, alphas=self.alphas, world_size=self.workers.world, placement=self.placement,
                    eval_placement=self.eval_place, n_train=self.train_src.n, n_val=len(self.val_rows),
                    val_rows=self.val_rows.tolist(), val_rule=VAL_RULE,
                    n_eval=self.eval_info.n if self.evaluates else None, n_parameters=n_parameters(self.model),
                    held_out=self.held_out, precision_effective=effective_precision(self.device, self.cfg.precision),
                    model_args=model_args(self.model), norm_stats=self.norm_stats,
                    feature_provenance={k: {"source": i.provenance_a, "target": i.provenance_b}
                                        for k, i in self.infos.items()},
                    loss_convention=f"MSE mean over all elements on raw targets{mse_note} + sum_k alpha_k p_k^2")

    # ---- one epoch
    def train_epoch(self, epoch: int, step_model: nn.Module) -> dict[str, Any]:
        cfg, w = self.cfg, self.workers
        if self.group is not None:                 # trained together with other pairs (transnet/group_fit.py)
            return self.epoch_fields(self.group.pair_stats(self))
        if self.step is None:                      # the training forward, compiled once (--compile)
            self.step = compiled(step_model, cfg.compile)
        batches = self.train_src.batches(cfg.batch_size, cfg.seed, epoch, w.rank, w.world)
        st = train_epoch(self.model, self.step, self.optimizer, self.scheduler, batches, self.alphas,
                         self.mse_scale, self.device, cfg.precision, self.channels_last, self.steps,
                         "fit", epoch=(epoch, cfg.epoch_cap))
        return self.epoch_fields(st)

    def epoch_fields(self, st: dict[str, Any]) -> dict[str, Any]:
        """The epoch's record fields from its training sums ``st`` (``train_epoch``'s dict): train MSE
        and loss, gates, the non-finite check of disk reads, the validation loss."""
        gates = self.model.gates().detach()
        steps = max(st["steps"], 1)
        out: dict[str, Any] = {"train_mse": st["mse_sum"] / steps, "train_loss": st["loss_sum"] / steps,
                               "rows": st["rows"], "gates": gates,
                               **{f"gate_{k + 1}": g for k, g in enumerate(gates)}}
        if isinstance(self.train_src, BlockPairs):
            out["_nonfinite_features"] = self.train_src.nonfinite
        if self.val_src is not None:
            out["val_loss"], out["val_mse"] = self._validation_loss()
        if "epoch_time_s" in st:                   # a pair's share of its group's epoch
            out["epoch_time_s"] = st["epoch_time_s"]
        return out

    @torch.no_grad()
    def _validation_loss(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, MSE) on the validation rows, device tensors: the training loss's convention (MSE over
        all elements, scaled as in training, plus the α penalty)."""
        self.model.eval()
        sq = torch.zeros((), device=self.device, dtype=torch.float64)
        count = 0
        for xa, xb in self.val_src.sequential(self.eval_batch):
            if self.channels_last:
                xa = xa.contiguous(memory_format=torch.channels_last)
            with precision_autocast(self.device, self.cfg.precision):
                yhat = self.model(xa)
            sq += F.mse_loss(yhat.float(), xb, reduction="sum").double()
            count += xb.numel()
        mse = sq / max(count, 1)
        alpha_t = torch.tensor(self.alphas, dtype=torch.float32, device=self.device)
        return mse / self.mse_scale + self.model.alpha_penalty(alpha_t).double(), mse

    def evaluate(self, epoch: int) -> dict[str, Any]:
        rep = self.last_rep = _report(self.model, self.eval_src, self.eval_info, self.eval_batch, self.device,
                                      self.held_out, self.sample_warning)
        return {"eval_r2": rep["r2"], "eval_mse": rep["mse"],
                **{f"eval_fraction_order{k}": v for k, v in enumerate(rep["fraction_orders"])}}

    def diverged(self, epoch: int, record: dict[str, Any], last_good: str) -> Exception:
        return DivergenceError(_diagnose(self.model, self.train_src, self.train_info, epoch, last_good))

    def check_resume(self, state: dict[str, Any], path: Path) -> None:
        _check_resume(state, self.cfg, path)

    # ---- checkpoints, the final report and model
    def checkpoint(self, history: list[dict[str, Any]], metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        return _checkpoint(self.model, self.cfg, self.alphas, self.infos, self.norm_stats, len(history),
                           history[-1] if metrics is None else metrics)

    def summary(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.cfg
        final = self.last_rep or _report(self.model, self.eval_src, self.eval_info, self.eval_batch, self.device,
                                         self.held_out, self.sample_warning)
        last = history[-1] if history else {}
        metrics = {**final, "train_split": cfg.train_split, "n_train": self.train_src.n,
                   "n_val": len(self.val_rows), "val_fraction": cfg.val_fraction,
                   "train_mse": last.get("train_mse"), "train_loss": last.get("train_loss"),
                   "val_loss": last.get("val_loss"), "schedule": SCHEDULES["auto" if cfg.auto else "fixed"],
                   "epochs": len(history), "train_time_s": sum(h["epoch_time_s"] for h in history),
                   "features": str(Path(cfg.features).resolve()), "placement": self.placement,
                   "precision": cfg.precision, "precision_effective": effective_precision(self.device, cfg.precision),
                   "input_norm": cfg.input_norm, "std_correction": cfg.std_correction,
                   "std_floor": cfg.std_floor, "train_constant_source_slices": self.train_constant[0],
                   "train_source_slices": self.train_constant[1]}
        add_warning(metrics, constant_warning(self.train_constant[0], self.train_constant[1], cfg.train_split,
                                              self.train_info.source, cfg.input_norm, cfg.std_floor, self.model.eps))
        metrics["convergence"] = verdict([h.get("val_loss") for h in history], final, len(history), cfg.epoch_cap)
        save_state(self.out_dir / FINAL_CKPT, self.checkpoint(history, metrics))
        return metrics


def _check_resume(state: dict[str, Any], cfg: FitConfig, path: Path) -> None:
    old = state.get("config") or {}
    diffs = [f"{f.name}: {old.get(f.name)!r} -> {getattr(cfg, f.name)!r}" for f in fields(cfg)
             if f.name not in RESUME_FREE and f.name in old and old.get(f.name) != getattr(cfg, f.name)]
    if diffs:
        raise UserError(f"cannot resume {path}: the run was started with other settings ({'; '.join(diffs)}); "
                        f"use the original options or --overwrite")


# --------------------------------------------------------------------------- loading

def checkpoint_path(run_dir_or_ckpt: str | os.PathLike) -> Path:
    p = Path(run_dir_or_ckpt)
    if p.is_dir():
        for name in (FINAL_CKPT, LAST_CKPT):
            if (p / name).is_file():
                return p / name
        raise UserError(f"{p} holds no Trans-Net checkpoint ({FINAL_CKPT} or {LAST_CKPT}); is it a fit-transnet "
                        f"run directory?")
    if not p.is_file():
        raise UserError(f"Trans-Net {p} does not exist (give a fit-transnet run directory or its {FINAL_CKPT})")
    return p


def load_transnet(run_dir_or_ckpt: str | os.PathLike, map_location: str | torch.device = "cpu"
                  ) -> tuple[TransNet, dict[str, Any]]:
    """A fitted Trans-Net (eval mode, CPU unless ``map_location``) and its info: source, target, layer,
    target_layer and spatial (None unless a cross-layer or resized fit), features, target_features,
    config, epoch, metrics, norm_stats, feature_provenance, alphas, path."""
    path = checkpoint_path(run_dir_or_ckpt)
    ck = load_checkpoint(path, map_location=map_location)
    if ck.get("kind") != "transnet" or "model_args" not in ck:
        raise UserError(f"{path} is not a Trans-Net checkpoint (kind {ck.get('kind', ck.get('arch'))!r})")
    try:
        model = TransNet(TransNetConfig.from_dict(ck["model_args"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: {e}") from None
    model.load_state_dict(ck["state_dict"])
    model.to(map_location).eval()
    info = {k: ck.get(k) for k in ("source", "target", "layer", "target_layer", "spatial", "features",
                                   "target_features", "config", "epoch",
                                   "metrics", "norm_stats", "feature_provenance", "alphas", "dataset", "transform",
                                   "imported")}
    info["path"] = str(path)
    return model, info
