"""What the family builders share: seeded members, teachers checked against the data, test logits.

The families (``training/distill.py``, ``born_again.py``, ``evolution.py``, ``compress.py``) are built
on the one training loop (:func:`training.runner.run_training`); a family differs only in its loss,
its teacher and what happens between runs. Each family writes ``family.json`` (:mod:`training.manifest`)
listing its members so ``extract`` and the analysis can take it whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from common.checkpoints import load_checkpoint
from common.device import use_device
from common.errors import UserError, require_choice
from common.provenance import sha256_file
from training.data import build_dataset, transform_spec
from training.datasets import DataSpec
from training.family_config import MEMBER_CHECKPOINTS  # re-exported: its old home
from training.harness import seed_everything
from training.loop import TrainConfig, evaluate, make_loader
from training.models import model_from_checkpoint
from training.runner import ModelSpec, build_for_data


def check_member_checkpoint(which: str) -> None:
    require_choice("--member_checkpoint", which, MEMBER_CHECKPOINTS)


def member_path(run_dir: Path, which: str) -> Path:
    return Path(run_dir) / f"{which}.pt"


def non_empty(path: Path) -> bool:
    return path.is_dir() and any(p.name != ".lock" for p in path.iterdir())


def recipe_hash(arch: str, data: DataSpec, cfg: TrainConfig, loss: str = "cross_entropy",
                teacher_sha256: str | None = None) -> str:
    """Content hash of a training recipe: architecture, data, every training option (the seed
    included), loss and teacher. Two runs with one recipe train the same net (same initialisation, data
    order and updates), so the second may reuse the first's run (:func:`adopt_run`)."""
    from dataclasses import asdict

    from common.provenance import sha256_json

    return sha256_json({"arch": arch, "data": asdict(data), "train": asdict(cfg), "loss": loss,
                        "teacher_sha256": teacher_sha256})


def adopt_run(source: str | Path, dest: str | Path) -> None:
    """Make ``dest`` a finished copy of the finished run directory ``source`` (files hard-linked where
    the file system allows, copied otherwise; the checkpoints are rewritten by the caller when it adds
    family fields). Refused unless ``source`` is finished and ``dest`` is empty."""
    import os
    import shutil

    from common.rundir import is_finished

    src, dst = Path(source), Path(dest)
    if not is_finished(src):
        raise UserError(f"cannot reuse {src}: it is not a finished run directory")
    if non_empty(dst):
        raise UserError(f"cannot reuse {src} as {dst}: {dst} is not empty")
    for f in sorted(src.rglob("*")):
        if f.name == ".lock" or f.is_dir():
            continue
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, out)
        except OSError:
            shutil.copy2(f, out)


def data_num_classes(data: DataSpec) -> int:
    return build_dataset(data, "train").num_classes


def seeded_model(model_spec: ModelSpec, data: DataSpec, num_classes: int, seed: int) -> nn.Module:
    """A fresh model whose initialisation depends on ``seed`` only (not on earlier RNG use)."""
    seed_everything(seed)
    return build_for_data(model_spec, data, num_classes)


def load_teacher(path: str | Path, data: DataSpec, num_classes: int, what: str = "teacher"
                 ) -> tuple[nn.Module, dict[str, Any], str]:
    """Rebuild a teacher checkpoint and check it fits the data: class count, input channels and size.
    Returns (model, checkpoint dict, sha256 of the file)."""
    path = Path(path)
    ck = load_checkpoint(path)
    if not ck.get("arch"):
        raise UserError(f"{what} {path} is a bare state dict; a teacher must be a workbench checkpoint "
                        f"(it records its arch and class count)")
    if int(ck["num_classes"]) != num_classes:
        raise UserError(f"{what} {path} predicts {ck['num_classes']} classes but data set {data.name!r} has "
                        f"{num_classes} classes; distil from a teacher trained on the same classes")
    t = transform_spec(data)
    if ck.get("in_channels") is not None and int(ck["in_channels"]) != t.channels:
        raise UserError(f"{what} {path} takes {ck['in_channels']}-channel images but the data transform gives "
                        f"{t.channels} channels; pass --channels {ck['in_channels']}")
    if ck.get("input_size") is not None and int(ck["input_size"]) != t.image_size:
        raise UserError(f"{what} {path} was trained on {ck['input_size']} px inputs but the data transform gives "
                        f"{t.image_size} px; pass --image_size {ck['input_size']}")
    model = model_from_checkpoint(ck, f"{what} {path}")
    return model, ck, sha256_file(path)


def test_logits(model: nn.Module, data: DataSpec, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits (N, C) and labels (N,) of the test split in data-set order, plus top-1/loss."""
    device = use_device(cfg.device)
    test_set = build_dataset(data, "test")
    loader = make_loader(test_set, max(cfg.batch_size, 256), False, cfg.num_workers)
    ev = evaluate(model.to(device), loader, device, cfg.amp, return_logits=True)
    return ev.pop("logits"), torch.as_tensor(test_set.labels), ev


def metric_subset(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("test_top1", "best_test_top1", "test_top5", "test_loss", "epoch")
    return {k: m[k] for k in keys if m.get(k) is not None}
