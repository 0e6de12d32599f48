"""Building data sets: a :class:`DataSpec` to one split of a registered data set, with its transform,
the paper's two halves (``--subset``), a cache for deterministic transforms, and the embedded
Animal-MNIST.

Every data set yields ``(image, label, index)``: ``index`` is the sample's position in the
split, so later stages (feature files, diagnosis panels) keep sample identity.

Splits are ``train`` and ``test`` (``val`` where the layout has one). Data sets that live on
disk read from ``--data_root``; nothing is ever downloaded.
"""
from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

import training.datasets_disk  # noqa: F401  (the on-disk layouts register themselves in DATASETS)
from common.errors import UserError
from common.registry import UnknownNameError, unknown_choice_message
from common.safe_pickle import load_data_pickle
from training.config import SPLITS  # re-exported: its old home
from training.datasets import DATASETS, ArrayDataset, DataSpec, IndexedDataset, need_file
from training.names import dataset_names
from training.transforms import (
    ANIMAL_MEAN,
    ANIMAL_STD,
    DEFAULT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TRANSFORMS,
    TransformSpec,
    build_transform,
)

# --------------------------------------------------------------------------- cache

class CachedDataset(Dataset):
    """Keeps each transformed sample after its first read: for deterministic transforms only
    (``plain``/``paper`` presets, or any eval transform), where later epochs would redo identical
    decoding and resizing. Single-process loading only (worker copies would not share the cache)."""

    def __init__(self, base: IndexedDataset):
        self.base = base
        self._items: list[Any] = [None] * len(base)
        for attr in ("name", "split", "num_classes", "labels", "class_names"):
            setattr(self, attr, getattr(base, attr))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self._items[i]
        if item is None:
            item = self._items[i] = self.base[i]
        return item


AUGMENTING_PRESETS = ("ke", "small")


def maybe_cache(ds: IndexedDataset, spec: DataSpec, train: bool, num_workers: int,
                max_bytes: int = 2 << 30) -> Dataset:
    """Wrap ``ds`` in :class:`CachedDataset` when its transform is deterministic and it fits ``max_bytes``."""
    if num_workers > 0 or (train and spec.transform in AUGMENTING_PRESETS) or len(ds) == 0:
        return ds
    x = ds[0][0]
    if not isinstance(x, torch.Tensor) or x.element_size() * x.numel() * len(ds) > max_bytes:
        return ds
    return CachedDataset(ds)


# --------------------------------------------------------------------------- names and specs

def _resolve_name(name: str) -> tuple[str, str | None]:
    if name.startswith("imagefolder:"):
        return "imagefolder", name.split(":", 1)[1]
    return name, None


def natural_channels(name: str) -> int:
    return 1 if _resolve_name(name)[0] == "animal-mnist" else 3


def transform_spec(spec: DataSpec) -> TransformSpec:
    if spec.transform not in TRANSFORMS:
        raise UserError(unknown_choice_message("transform", spec.transform, TRANSFORMS.names()))
    size = spec.image_size or DEFAULT_SIZE.get(spec.transform, 224)
    channels = spec.channels or natural_channels(spec.name)
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    base, _ = _resolve_name(spec.name)
    if base == "animal-mnist":
        mean, std = (ANIMAL_MEAN,) * channels, (ANIMAL_STD,) * channels
    else:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
    mean = _per_channel("mean", spec.mean, channels) or mean
    std = _per_channel("std", spec.std, channels) or std
    if min(std) <= 0:
        raise UserError(f"--std must be > 0 per channel, got {spec.std}")
    return TransformSpec(spec.transform, int(size), channels, tuple(mean), tuple(std))


def _per_channel(what: str, value: str | None, channels: int) -> tuple[float, ...] | None:
    """``"0.5"`` or ``"0.5,0.4,0.3"`` -> one float per channel (one value is repeated); None stays None."""
    if value is None or str(value).strip() == "":
        return None
    try:
        vals = tuple(float(v) for v in str(value).split(","))
    except ValueError:
        raise UserError(f"--{what} {value!r} is not a comma-separated list of numbers") from None
    if len(vals) == 1:
        return vals * channels
    if len(vals) != channels:
        raise UserError(f"--{what} {value!r} gives {len(vals)} values for {channels}-channel images; give 1 or "
                        f"{channels}")
    return vals


def build_dataset(spec: DataSpec, split: str, train_transform: bool | None = None) -> IndexedDataset:
    """Build one split. ``train_transform`` (default: split == 'train') chooses augmentation."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    base, arg = _resolve_name(spec.name)
    try:
        builder = DATASETS.get(base)
    except UnknownNameError:
        raise UserError(unknown_choice_message("data set", spec.name, dataset_names())) from None
    tspec = transform_spec(spec)
    tf = build_transform(tspec, split == "train" if train_transform is None else train_transform)
    ds = builder(spec=spec, split=split, transform=tf, arg=arg)
    if spec.subset is not None:
        ds = take_subset(ds, spec.subset, spec.subset_kind, spec.split_seed)
    if split == "train" and spec.train_images:
        ds = take_train_images(ds, spec.train_images, spec.split_seed)
    return ds


# --------------------------------------------------------------------------- subsets (two halves)

class SubsetDataset(IndexedDataset):
    """Rows ``rows`` of a base data set, re-indexed 0..n-1; labels optionally remapped to 0..k-1."""

    def __init__(self, base: IndexedDataset, rows: np.ndarray, label_map: dict[int, int] | None, tag: str):
        labels = base.labels[rows]
        num_classes = base.num_classes
        names = base.class_names
        if label_map is not None:
            labels = np.array([label_map[int(l)] for l in labels], dtype=np.int64)
            num_classes = len(label_map)
            inv = sorted(label_map, key=label_map.get)
            names = [base.class_names[c] for c in inv]
        super().__init__(f"{base.name}[{tag}]", base.split, num_classes, labels, base.transform, names)
        self.base, self.rows = base, rows
        self.base.transform = None  # the subset applies the transform once

    def load_image(self, i: int) -> Image.Image:
        return self.base.load_image(int(self.rows[i]))

    def source_fingerprint(self) -> str | None:
        base = self.base.source_fingerprint()
        if base is None:
            return None
        return hashlib.sha256(f"{base}:{np.asarray(self.rows).tobytes().hex()}".encode()).hexdigest()[:20]


def take_subset(ds: IndexedDataset, half: str, kind: str, seed: int) -> IndexedDataset:
    """The paper's two halves: ``class`` = disjoint class sets (labels remapped), ``sample`` = disjoint
    halves of every class's training samples (test split kept whole, so both halves share it)."""
    if half not in ("A", "B"):
        raise UserError(f"unknown --subset {half!r}; valid: A, B")
    if kind not in ("class", "sample"):
        raise UserError(f"unknown --subset_kind {kind!r}; valid: class, sample")
    if kind == "class":
        classes = np.arange(ds.num_classes)
        mine = classes[: ds.num_classes // 2] if half == "A" else classes[ds.num_classes // 2:]
        rows = np.flatnonzero(np.isin(ds.labels, mine))
        return SubsetDataset(ds, rows, {int(c): j for j, c in enumerate(mine)}, f"classes {half}")
    if ds.split != "train":
        return ds
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(ds.num_classes):
        idx = np.flatnonzero(ds.labels == c)
        idx = idx[rng.permutation(len(idx))]
        cut = len(idx) // 2
        rows.append(idx[:cut] if half == "A" else idx[cut:])
    return SubsetDataset(ds, np.sort(np.concatenate(rows)), None, f"samples {half}")


def take_train_images(ds: IndexedDataset, n: int, seed: int) -> IndexedDataset:
    """A seeded random subset of ``n`` training images (rows kept in data-set order, labels unchanged):
    a smaller, quicker family (the notebooks' demo study) on the same test split."""
    if n < 0 or n > len(ds):
        raise UserError(f"train_images {n} is out of range: the training split of {ds.name} has {len(ds)} images "
                        f"(0 trains on all of them)")
    if n == len(ds):
        return ds
    rows = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return SubsetDataset(ds, rows, None, f"{n} training images")


# --------------------------------------------------------------------------- animal-mnist (embedded)

ANIMAL_CLASSES = ("class0", "class1", "class2", "class3", "class4", "class5", "class6", "class7",
                  "class8", "class9")
ANIMAL_TEST_FRACTION = 0.2


def animal_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 images (uint8, 28x28) and labels of the ``animal-mnist`` package, read from its pickles."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("animal_mnist")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded data set needs the animal-mnist package: "
                        "pip install --no-deps animal-mnist==0.4")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "Animal_MNIST"
    data, label = folder / "animal_data_version_3.gz", folder / "animal_label_version_3.gz"
    with gzip.open(need_file(data, "the animal-mnist 0.4 package"), "rb") as f:
        images = np.asarray(load_data_pickle(f, data), dtype=np.uint8)       # plain data only: no code runs
    with gzip.open(need_file(label, "the animal-mnist 0.4 package"), "rb") as f:
        labels = np.asarray(load_data_pickle(f, label), dtype=np.int64)
    return images, labels


def animal_mnist_split(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """A fixed stratified split (seeded): 80% train, 20% test per class, rows in ascending order."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * ANIMAL_TEST_FRACTION))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return {"train": np.sort(np.concatenate(train)), "test": np.sort(np.concatenate(test))}


_ANIMAL_CACHE: dict[str, Any] = {}


@DATASETS.register("animal-mnist")
def animal_mnist(spec: DataSpec, split: str, transform: Callable, arg: str | None = None) -> IndexedDataset:
    if split == "val":
        raise UserError("animal-mnist has splits train and test only")
    if "arrays" not in _ANIMAL_CACHE:
        _ANIMAL_CACHE["arrays"] = animal_mnist_arrays()
    images, labels = _ANIMAL_CACHE["arrays"]
    rows = animal_mnist_split(labels, spec.split_seed)[split]
    return ArrayDataset("animal-mnist", split, images[rows], labels[rows], 10, transform, ANIMAL_CLASSES)

