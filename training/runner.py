"""Train one classifier into a run directory: the API that ``cli.py train`` and every family
builder (KD, Born-Again, Knowledge Evolution) call."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch.nn as nn

from common.device import arithmetic_record, use_device
from common.errors import UserError
from common.files import read_json
from common.rundir import RunDir
from training.config import ModelSpec  # re-exported: its old home
from training.data import build_dataset, maybe_cache, transform_spec
from training.datasets import DataSpec
from training.harness import seed_everything
from training.loop import LossFn, TrainConfig, TrainResult, check_resume_config, train
from training.models import build_model


def model_provenance(model_spec: ModelSpec) -> dict[str, Any]:
    """Checkpoint fields that identify the code and the starting weights of a net: ``arch_kwargs``; for an
    own model its entry point, file and the file's sha256; the weights file and its sha256."""
    from common.provenance import sha256_file
    from training.user_models import entry_provenance, is_user_model

    out: dict[str, Any] = {}
    if model_spec.kwargs:
        out["arch_kwargs"] = dict(model_spec.kwargs)
    if is_user_model(model_spec.arch):
        out.update(entry_provenance(model_spec.arch))
    if model_spec.weights:
        out.update({"weights": str(Path(model_spec.weights).resolve()),
                    "weights_sha256": sha256_file(model_spec.weights)})
    return out


def resolve_data(data: DataSpec, model_spec: ModelSpec) -> DataSpec:
    """For a timm arch, the input size and normalisation the data options leave open come from the model's
    ``pretrained_cfg``; other archs keep the data set's own (unchanged spec)."""
    from training.data import natural_channels
    from training.timm_models import data_defaults, is_timm

    if not is_timm(model_spec.arch):
        return data
    d = data_defaults(model_spec.arch, data.channels or natural_channels(data.name))
    return replace(data, **{k: v for k, v in d.items() if getattr(data, k) is None})


def checkpoint_fields(model_spec: ModelSpec, data: DataSpec, num_classes: int, config: dict[str, Any],
                      **family: Any) -> dict[str, Any]:
    """The design's checkpoint fields (everything but state_dict/epoch/metrics)."""
    t = transform_spec(data)
    return {"arch": model_spec.arch, "num_classes": num_classes, "in_channels": t.channels,
            "input_size": t.image_size, "dataset": asdict(data), "transform": t.to_dict(), "config": config,
            **model_provenance(model_spec), **family}


def build_for_data(model_spec: ModelSpec, data: DataSpec, num_classes: int) -> nn.Module:
    t = transform_spec(data)
    model = build_model(model_spec.arch, num_classes, t.channels, t.image_size, **model_spec.kwargs)
    if model_spec.weights:  # any local checkpoint / state dict / timm / safetensors file (training/weights.py)
        from training.weights import load_weights_file

        load_weights_file(model, model_spec.weights)
    return model


def _data_on(train_set, test_set, data: DataSpec, cfg: TrainConfig, device) -> str:
    """``loader`` or ``device``: where the training images are held (see ``training/device_data.py``)."""
    from training.device_data import choose_data_on, estimated_bytes

    return choose_data_on(cfg.data_on, estimated_bytes(len(train_set) + len(test_set), transform_spec(data)), device)


def _data_for_training(train_set, test_set, data: DataSpec, cfg: TrainConfig, device, where: str):
    """The data as the loop reads it: the CPU DataLoader path (datasets, cached when deterministic), or
    (``where`` = device) loaders of uint8 images held on the device and augmented there."""
    from training.device_data import device_loaders

    tspec = transform_spec(data)
    if where == "loader":
        return maybe_cache(train_set, data, True, cfg.num_workers), maybe_cache(test_set, data, False, cfg.num_workers)
    return device_loaders(train_set, test_set, data, tspec, cfg.batch_size, device, cfg.seed,
                          num_workers=cfg.num_workers)          # one process (cli.py refuses torchrun)


def run_training(data: DataSpec, model_spec: ModelSpec, cfg: TrainConfig, out_dir: str | Path, mode: str = "new",
                 loss_fn: LossFn | None = None, teacher: nn.Module | None = None, model: nn.Module | None = None,
                 family: dict[str, Any] | None = None, extra_config: dict[str, Any] | None = None,
                 desc: str = "train", on_epoch_end: Callable | None = None,
                 on_step_end: Callable | None = None) -> TrainResult:
    """Build data and model, write ``config.json``, train, and return the result.

    ``model`` overrides building from ``model_spec`` (Knowledge Evolution passes its re-initialised net).
    Resuming a run started with other settings is refused (:func:`training.loop.check_resume_config`).
    ``family`` fields (teacher checkpoint + sha256, generation, masks...) go into every checkpoint.
    """
    device = use_device(cfg.device)          # the indexed device, recorded in config.json
    data = resolve_data(data, model_spec)
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
        if run.resuming and run.file("config.json").exists():      # before config.json is rewritten
            check_resume_config(read_json(run.file("config.json")).get("config", {}), config, run.path)
        where = _data_on(train_set, test_set, data, cfg, device)
        run.write_config(config, device=device, n_train=len(train_set), n_test=len(test_set), data_on=where,
                         arithmetic=arithmetic_record(device, cfg.amp))
        fields = checkpoint_fields(model_spec, data, train_set.num_classes, config, **(family or {}))
        train_set, test_set = _data_for_training(train_set, test_set, data, cfg, device, where)
        return train(model, train_set, test_set, cfg, run, fields, loss_fn=loss_fn, teacher=teacher,
                     desc=desc, on_epoch_end=on_epoch_end, on_step_end=on_step_end)
