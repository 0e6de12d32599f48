"""What a feature command is asked to do, without importing torch or h5py: the configs of an
extraction (:class:`ExtractConfig`) and of an import (:class:`ImportConfig`) and the names their
options choose from. Parsers build their options from here; the writers import torch when they run."""
from __future__ import annotations

from dataclasses import dataclass

from training.config import DATA_ON  # noqa: F401 - the choices of ExtractConfig.data_on (auto | loader | device)

DTYPES = ("float16", "float32")          # storage dtypes of the layer features (logits: always float32)
COMPRESSIONS = ("none", "lzf", "gzip")   # HDF5 compression of an extraction
TOKEN_MODES = ("none", "grid", "grid+prefix", "sequence")   # what an import makes of (N, T, C) arrays


@dataclass(frozen=True)
class ExtractConfig:
    """Options of one extraction (the CLI's defaults)."""

    split: str = "train,test"        # comma-separated splits
    dtype: str = "float16"           # float16 | float32 storage of the layer features (logits: float32)
    batch_size: int = 64
    device: str = "auto"             # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    num_workers: int = 0             # data-loader worker processes (and decoding processes of --data_on device)
    data_on: str = "auto"            # loader (a DataLoader decodes every batch) | device (the decoded-once uint8 cache
                                     # held on the device, training/device_data.py) | auto
    precision: str = "fp32"          # CUDA arithmetic: fp32 (TF32 off, faithful) | tf32 | bf16; CPU: always fp32
    channels_last: bool = False      # channels_last memory format on CUDA
    logits: bool = False             # also store /<split>/<net>/logits
    limit: int = 0                   # extract only the first N rows of every split (0: all)
    compression: str = "none"        # none | lzf | gzip (none: lzf is 16x slower and saves nothing here)
    queue_batches: int = 4           # batches in flight between the compute and the writer thread
    flush_s: float = 1.0             # raise rows_done (after a flush) at most every this many seconds
    keep_prefix: bool = False        # token layers: also store the class/distillation/register tokens as <layer>.prefix
    checksum: bool = True            # HDF5's fletcher32 checksum on every row (a flipped bit fails the read)


@dataclass(frozen=True)
class ImportConfig:
    """Options of one import (the CLI's defaults)."""

    split: str = "test"
    dtype: str = "float32"           # float32 | float16 storage of the layers (logits: float32)
    tokens: str = "none"             # (N, T, C) arrays: none (refused) | grid | grid+prefix | sequence
    prefix_tokens: int = 0           # leading class/distillation/register tokens of a token sequence
    grid: str = ""                   # "HxW" of the patch grid (default: a square of T - prefix_tokens)
    ids_key: str = "index"           # key of the sample ids in a dict file
    labels_key: str = "label"        # key of the labels in a dict file
    dataset: str = "imported"        # root attribute: the data set the features were computed on
    image_size: int = 0              # root attribute: the input size (0: unknown)
    block_rows: int = 256            # rows per write
