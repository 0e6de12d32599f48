"""Command-line pieces of the training stage shared by several command modules: the data, model and
training options (defaults from :class:`DataSpec`, :class:`ModelSpec` and :class:`TrainConfig`), and the
``train`` command's options and run, which ``search`` reuses at every grid point.

Building the options imports no torch (training/config.py, training/names.py); the functions that run
a command import the training code when they are called."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from common.options import add_dataclass_args, add_run_args, dataclass_from_args
from common.rundir import run_mode
from training.config import DATA_ON, OPTIMIZERS, SCHEDULES, DataSpec, ModelSpec, TrainConfig
from training.names import MODEL_PREFIX, TRANSFORMS, arch_names, dataset_names

if TYPE_CHECKING:
    from training.loop import TrainResult

DATA_HELP = {
    "name": "data set: " + ", ".join(dataset_names()),
    "data_root": "folder of an on-disk data set (its official layout); not needed for animal-mnist",
    "transform": "transform preset: paper (squash to 224, no aug), ke (RandomResizedCrop+flip / "
                 "Resize+CenterCrop), small (32 px, crop+flip), plain (resize only)",
    "image_size": "input size in px (default: the preset's)",
    "channels": "1 or 3 input channels (default: the data set's own)",
    "subset": "A or B: one of the paper's two halves of the data",
    "subset_kind": "class (disjoint class halves) or sample (disjoint sample halves)",
    "split_seed": "seed of the train/test split of data sets that have no official one",
    "bbox_crop": "crop CUB-200 / Dogs images to their bounding box (as the KC paper does)",
    "train_images": "train on a random subset of this many training images (seeded by --split_seed; 0: all)",
    "mean": "normalisation mean, one value or one per channel, comma-separated (default: the data set's own; "
            "for a timm arch the model's pretrained_cfg)",
    "std": "normalisation std, like --mean",
}

TRAIN_HELP = {
    "epochs": "training epochs", "batch_size": "images per step", "optimizer": "optimizer",
    "lr": "peak learning rate", "momentum": "SGD momentum", "weight_decay": "weight decay (L2)",
    "nesterov": "Nesterov momentum", "schedule": "learning-rate schedule",
    "warmup_epochs": "linear warm-up epochs", "step_size": "step schedule: epochs between decays",
    "gamma": "step schedule: decay factor", "final_lr": "cosine floor / geometric end learning rate",
    "label_smoothing": "label smoothing of the cross-entropy", "amp": "bf16 autocast on CUDA",
    "channels_last": "channels_last memory format on CUDA", "seed": "random seed (init, order, augmentation)",
    "num_workers": "data-loader worker processes", "eval_every": "evaluate every N epochs",
    "device": "auto, cpu, cuda or cuda:N", "grad_clip": "clip gradient norm (0: off)",
    "save_every": "write the resumable last.pt every N epochs",
    "data_on": "where the training images live: loader (a CPU DataLoader decoding every epoch), device (each "
               "image decoded once to uint8, cached on disk, held on the device and augmented there per batch) "
               "or auto (device on CUDA when the images take at most a quarter of the free memory)",
}


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=DataSpec.name, help=DATA_HELP["name"])
    add_dataclass_args(g, DataSpec, skip=("name", "options"), help=DATA_HELP,
                       choices={"transform": list(TRANSFORMS), "subset": ["A", "B"],
                                "subset_kind": ["class", "sample"]})


def data_from_args(args: argparse.Namespace) -> DataSpec:
    return dataclass_from_args(DataSpec, args, name=args.dataset)


def add_train_args(p: argparse.ArgumentParser, **defaults) -> None:
    g = p.add_argument_group("training")
    add_dataclass_args(g, TrainConfig, help=TRAIN_HELP,
                       choices={"optimizer": list(OPTIMIZERS), "schedule": list(SCHEDULES), "data_on": list(DATA_ON)})
    if defaults:
        p.set_defaults(**defaults)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--arch", default=ModelSpec.arch, help="architecture: " + ", ".join(arch_names()) +
                       " (a timm NAME is checked when the command runs)")
    which.add_argument("--model", default=None, metavar="PACKAGE.MODULE:CALLABLE",
                       help="your own model: the nn.Module this callable returns (instead of --arch)")
    g.add_argument("--model_kwargs", default=None, metavar="JSON",
                   help='kwargs of the model builder as a JSON object, e.g. \'{"patch_size": 4, "depth": 4}\' for '
                        'timm:vit_tiny_patch16_224 at 32 px (num_classes, in_chans and a fixed-size model\'s '
                        'img_size are filled in)')
    g.add_argument("--weights", default=None,
                   help="local file to start from: workbench checkpoint, state dict, timm checkpoint or "
                        ".safetensors (never a hub download)")


def model_spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """``--arch`` / ``--model``, ``--model_kwargs`` and ``--weights`` as a :class:`ModelSpec`."""
    from training.models import parse_model_kwargs

    arch = f"{MODEL_PREFIX}{args.model}" if getattr(args, "model", None) else args.arch
    return ModelSpec(arch, args.weights, parse_model_kwargs(getattr(args, "model_kwargs", None)))


def add_train_command_args(p: argparse.ArgumentParser) -> None:
    """Every option of ``train``: data, model, training and the run directory."""
    add_data_args(p)
    add_model_args(p)
    add_train_args(p)
    add_run_args(p)


def train_from_args(args: argparse.Namespace) -> TrainResult:
    """Run ``train`` with parsed options (those of :func:`add_train_command_args`)."""
    from training.runner import run_training

    cfg = dataclass_from_args(TrainConfig, args)
    return run_training(data_from_args(args), model_spec_from_args(args), cfg, args.out_dir,
                        run_mode(args.resume, args.overwrite))


def training_summary(res: TrainResult) -> str:
    """What ``train`` prints: test accuracy and time, then where the checkpoints went."""
    m = res.metrics
    return (f"test top-1 {m['test_top1']:.2f}% (best {m['best_test_top1']:.2f}%), top-5 {m['test_top5']:.2f}%, "
            f"{m['train_time_s']:.1f}s of training\n"
            f"checkpoints: {res.best_path} (best), {res.last_path} (last)")
