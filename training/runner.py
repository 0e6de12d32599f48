"""Train one classifier into a run directory: the API that ``cli.py train`` and every family
builder (KD, Born-Again, Knowledge Evolution) call."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from common.checkpoints import load_checkpoint
from common.device import use_device
from common.errors import UserError
from common.rundir import RunDir
from training.data import build_dataset, maybe_cache, transform_spec
from training.datasets import DataSpec
from training.harness import seed_everything
from training.loop import LossFn, TrainConfig, TrainResult, train
from training.models import build_model, load_weights


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "vgg_small"
    weights: str | None = None       # a local state-dict / checkpoint file to start from (never a hub download)


def checkpoint_fields(model_spec: ModelSpec, data: DataSpec, num_classes: int, config: dict[str, Any],
                      **family: Any) -> dict[str, Any]:
    """The design's checkpoint fields (everything but state_dict/epoch/metrics)."""
    t = transform_spec(data)
    return {"arch": model_spec.arch, "num_classes": num_classes, "in_channels": t.channels,
            "input_size": t.image_size, "dataset": asdict(data), "transform": t.to_dict(), "config": config,
            **family}


def build_for_data(model_spec: ModelSpec, data: DataSpec, num_classes: int) -> nn.Module:
    t = transform_spec(data)
    model = build_model(model_spec.arch, num_classes, t.channels, t.image_size)
    if model_spec.weights:
        ck = load_checkpoint(model_spec.weights)
        load_weights(model, ck["state_dict"], f"--weights {model_spec.weights}")
    return model


def run_training(data: DataSpec, model_spec: ModelSpec, cfg: TrainConfig, out_dir: str | Path, mode: str = "new",
                 loss_fn: LossFn | None = None, teacher: nn.Module | None = None, model: nn.Module | None = None,
                 family: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None,
                 desc: str = "train", on_epoch_end: Callable | None = None,
                 on_step_end: Callable | None = None) -> TrainResult:
    """Build data and model, write ``config.json``, train, and return the result.

    ``model`` overrides building from ``model_spec`` (Knowledge Evolution passes its re-initialised net).
    ``family`` fields (teacher checkpoint + sha256, generation, masks...) go into every checkpoint.
    """
    device = use_device(cfg.device)          # the indexed device, recorded in config.json
    train_set = build_dataset(data, "train")
    test_set = build_dataset(data, "test")
    if train_set.num_classes != test_set.num_classes:
        raise UserError(f"train split has {train_set.num_classes} classes, test split {test_set.num_classes}")
    if model is None:
        seed_everything(cfg.seed)  # the initial weights follow --seed (seeds 0 and 5 are different nets)
        model = build_for_data(model_spec, data, train_set.num_classes)
    config = {"data": asdict(data), "model": asdict(model_spec), "train": asdict(cfg), **(extra_config or {})}
    if loss_fn is not None and hasattr(loss_fn, "convention"):
        config["loss"] = loss_fn.convention
    with RunDir(out_dir, mode) as run:
        run.write_config(config, device=device, n_train=len(train_set), n_test=len(test_set))
        fields = checkpoint_fields(model_spec, data, train_set.num_classes, config, **(family or {}))
        train_set = maybe_cache(train_set, data, True, cfg.num_workers)
        test_set = maybe_cache(test_set, data, False, cfg.num_workers)
        return train(model, train_set, test_set, cfg, run, fields, loss_fn=loss_fn, teacher=teacher,
                     desc=desc, on_epoch_end=on_epoch_end, on_step_end=on_step_end)
