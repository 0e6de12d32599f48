"""What a feature command records of how it was called: the resolved command line (every option as
finally used, config-file values included), and the data options that override a checkpoint's."""
from __future__ import annotations

import argparse

# Data options of `train`, but here each one only overrides what the checkpoints record.
DATA_DESTS = {"dataset": "name", "data_root": "data_root", "transform": "transform", "image_size": "image_size",
              "channels": "channels", "subset": "subset", "subset_kind": "subset_kind", "split_seed": "split_seed",
              "bbox_crop": "bbox_crop", "train_images": "train_images", "mean": "mean", "std": "std"}


def command_line(args: argparse.Namespace, name: str) -> str:
    """The resolved command (every option as finally used, config-file values included) for provenance."""
    import shlex

    parts = ["cli.py", name]
    for k, v in sorted(vars(args).items()):
        if k.startswith("_") or k in ("config", "debug", "max_batches") or v is None:
            continue
        if v is True:
            parts.append(f"--{k}")
        elif v is False:
            if k in DATA_DESTS:                  # an explicit override of the checkpoints' value
                parts.append(f"--no-{k}")
        elif isinstance(v, list):
            parts += [f"--{k}", *map(str, v)] if k == "nets" else [x for item in v for x in (f"--{k}", str(item))]
        else:
            parts += [f"--{k}", str(v)]
    return shlex.join(parts)
