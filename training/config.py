"""What a training run is asked to do, without importing torch: the configs of one run
(:class:`TrainConfig`, :class:`DataSpec`, :class:`ModelSpec`) and the names their options choose from.
Parsers build their options from here; the code that trains imports torch when it runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant", "geometric")
DATA_ON = ("auto", "loader", "device")      # where the training images live (training/device_data.py)

# The options that may differ when a run is resumed, by config.json section: where and how fast it
# runs, how often it is evaluated and saved, where its data lives; not what it trains (not --epochs:
# the learning-rate schedule spans them).
RESUME_FREE: dict[str, tuple[str, ...]] = {
    "train": ("device", "num_workers", "amp", "channels_last", "eval_every", "save_every", "data_on"),
    "data": ("data_root",),
}


def resume_note(*more: str) -> str:
    """What ``--resume`` lets change, for errors and help: ``more`` are further free options."""
    names = [f"--{k}" for k in (*more, *(k for keys in RESUME_FREE.values() for k in keys))]
    return (f"only {', '.join(names[:-1])} and {names[-1]} may change; not --epochs: the learning-rate "
            f"schedule spans them")


@dataclass(frozen=True)
class TrainConfig:
    """Options of one training run (units in comments)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"              # sgd | adam | adamw
    lr: float = 0.05                    # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "cosine"            # cosine | step | constant | geometric
    warmup_epochs: float = 0.0          # linear warm-up from 0 (fractional epochs allowed)
    step_size: int = 30                 # step schedule: epochs between decays
    gamma: float = 0.1                  # step schedule: decay factor
    final_lr: float = 0.0               # cosine floor; geometric schedule: lr at the last epoch
    label_smoothing: float = 0.0
    amp: bool = True                    # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True          # on CUDA only
    seed: int = 0
    num_workers: int = 0
    eval_every: int = 1                 # evaluate on the test split every N epochs (and at the end)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    grad_clip: float = 0.0              # 0: off
    save_every: int = 1                 # write last.pt every N epochs (resume granularity)
    data_on: str = "auto"               # loader (CPU DataLoader) | device (cached uint8 images on the device) | auto


@dataclass(frozen=True)
class DataSpec:
    """How to build one data set; recorded in configs."""

    name: str = "animal-mnist"
    data_root: str | None = None
    transform: str = "plain"
    image_size: int | None = None          # None: the preset's default
    channels: int | None = None            # None: the data set's natural count (1 for animal-mnist)
    subset: str | None = None              # None | "A" | "B": the paper's two halves
    subset_kind: str = "class"             # "class": disjoint classes, "sample": disjoint samples
    split_seed: int = 0                    # seed of data sets without an official split
    bbox_crop: bool = True                 # CUB-200 / Dogs: crop to the bounding box (paper)
    train_images: int = 0                  # > 0: train on a seeded random subset of this many training images
    mean: str | None = None                # normalisation mean per channel, "0.5,0.5,0.5" (None: the data set's own;
    std: str | None = None                 # for a timm arch its pretrained_cfg's)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    arch: str = "vgg_small"          # a registry name, timm:NAME or model:package.module:callable
    weights: str | None = None       # a local state-dict / checkpoint file to start from (never a hub download)
    kwargs: dict[str, Any] = field(default_factory=dict)   # --model_kwargs: builder kwargs (checkpoint arch_kwargs)
