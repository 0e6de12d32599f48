"""Data sets (a registry) and named transform presets.

Every data set yields ``(image, label, index)``: ``index`` is the sample's position in the
split, so later stages (feature files, diagnosis panels) keep sample identity.

Splits are ``train`` and ``test`` (``val`` where the layout has one). Data sets that live on
disk read from ``--data_root``; nothing is ever downloaded.
"""
from __future__ import annotations

import abc
import gzip
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from training.registry import Registry, UnknownNameError, unknown_choice_message
from training.runs import UserError

SPLITS = ("train", "val", "test")

# --------------------------------------------------------------------------- transforms

# Normalisation statistics. ImageNet's for RGB photographs; Animal-MNIST's own for the
# grayscale silhouettes (measured over all 10,000 images: mean 0.2243, std 0.3870 on [0, 1]).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
ANIMAL_MEAN, ANIMAL_STD = 0.2243, 0.3870


@dataclass(frozen=True)
class TransformSpec:
    """A named preset, resolved to concrete sizes; recorded in configs, checkpoints and feature files."""

    preset: str
    image_size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "image_size": self.image_size, "channels": self.channels,
                "mean": list(self.mean), "std": list(self.std)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "TransformSpec":
        return TransformSpec(d["preset"], int(d["image_size"]), int(d.get("channels", 3)),
                             tuple(d.get("mean", IMAGENET_MEAN)), tuple(d.get("std", IMAGENET_STD)))


def _norm(spec: TransformSpec) -> list[Callable]:
    return [T.ToTensor(), T.Normalize(spec.mean, spec.std)]


def _to_channels(spec: TransformSpec) -> list[Callable]:
    return [T.Grayscale(num_output_channels=spec.channels)] if spec.channels == 1 else [_ToRGB()]


class _ToRGB:
    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB") if img.mode != "RGB" else img

    def __repr__(self) -> str:
        return "ToRGB()"


def _paper(spec: TransformSpec, train: bool) -> Callable:
    # The knowledge-consistency paper: squash (no aspect-preserving crop) to size, no augmentation.
    return T.Compose(_to_channels(spec) + [T.Resize((spec.image_size, spec.image_size))] + _norm(spec))


def _ke(spec: TransformSpec, train: bool) -> Callable:
    # Knowledge Evolution: RandomResizedCrop + flip for training; Resize(256/224 * s) + CenterCrop(s).
    if train:
        geo = [T.RandomResizedCrop(spec.image_size), T.RandomHorizontalFlip()]
    else:
        geo = [T.Resize(int(round(spec.image_size * 256 / 224))), T.CenterCrop(spec.image_size)]
    return T.Compose(_to_channels(spec) + geo + _norm(spec))


def _small(spec: TransformSpec, train: bool) -> Callable:
    # Small images (CIFAR-size): resize to size; training adds pad-4 random crop + flip.
    geo = [T.Resize((spec.image_size, spec.image_size))]
    if train:
        geo += [T.RandomCrop(spec.image_size, padding=max(1, spec.image_size // 8)), T.RandomHorizontalFlip()]
    return T.Compose(_to_channels(spec) + geo + _norm(spec))


def _plain(spec: TransformSpec, train: bool) -> Callable:
    # Resize only, no augmentation in either split (the demo and feature extraction of small data).
    return T.Compose(_to_channels(spec) + [T.Resize((spec.image_size, spec.image_size))] + _norm(spec))


TRANSFORMS: Registry[Callable[[TransformSpec, bool], Callable]] = Registry("transform")
TRANSFORMS.add("paper", _paper)
TRANSFORMS.add("ke", _ke)
TRANSFORMS.add("small", _small)
TRANSFORMS.add("plain", _plain)

DEFAULT_SIZE = {"paper": 224, "ke": 224, "small": 32, "plain": 32}


def build_transform(spec: TransformSpec, train: bool) -> Callable:
    """The torchvision transform of a preset. ``train=False`` never augments."""
    return TRANSFORMS.get(spec.preset)(spec, train)


# --------------------------------------------------------------------------- data set base

class IndexedDataset(Dataset):
    """A list of samples read lazily; ``__getitem__`` returns ``(image, label, index)``."""

    def __init__(self, name: str, split: str, num_classes: int, labels: Sequence[int],
                 transform: Callable | None = None, class_names: Sequence[str] | None = None):
        self.name, self.split, self.num_classes = name, split, num_classes
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def load_image(self, i: int) -> Image.Image:
        """The ``i``-th image, untransformed; subclasses read their own storage."""

    def __getitem__(self, i: int):
        img = self.load_image(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i]), i


class ArrayDataset(IndexedDataset):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, 3)."""

    def __init__(self, name: str, split: str, images: np.ndarray, labels: Sequence[int], num_classes: int,
                 transform: Callable | None = None, class_names: Sequence[str] | None = None):
        super().__init__(name, split, num_classes, labels, transform, class_names)
        self.images = images

    def load_image(self, i: int) -> Image.Image:
        a = self.images[i]
        return Image.fromarray(a, mode="L" if a.ndim == 2 else "RGB")


class FileListDataset(IndexedDataset):
    """Images read from files; an optional box (x0, y0, x1, y1) crops each image first."""

    def __init__(self, name: str, split: str, files: Sequence[Path], labels: Sequence[int], num_classes: int,
                 transform: Callable | None = None, boxes: Sequence[tuple[float, float, float, float]] | None = None,
                 class_names: Sequence[str] | None = None):
        super().__init__(name, split, num_classes, labels, transform, class_names)
        self.files = [Path(f) for f in files]
        self.boxes = boxes
        if len(self.files) != len(self.labels):
            raise ValueError(f"{len(self.files)} files but {len(self.labels)} labels")

    def load_image(self, i: int) -> Image.Image:
        try:
            with Image.open(self.files[i]) as im:
                img = im.convert("RGB")
        except OSError as e:
            raise UserError(f"cannot read image {self.files[i]} ({e})") from e
        if self.boxes is not None:
            img = img.crop(tuple(int(round(v)) for v in self.boxes[i]))
        return img


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


def maybe_cache(ds: IndexedDataset, spec: "DataSpec", train: bool, num_workers: int,
                max_bytes: int = 2 << 30) -> Dataset:
    """Wrap ``ds`` in :class:`CachedDataset` when its transform is deterministic and it fits ``max_bytes``."""
    if num_workers > 0 or (train and spec.transform in AUGMENTING_PRESETS) or len(ds) == 0:
        return ds
    x = ds[0][0]
    if not isinstance(x, torch.Tensor) or x.element_size() * x.numel() * len(ds) > max_bytes:
        return ds
    return CachedDataset(ds)


# --------------------------------------------------------------------------- registry

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
    options: dict[str, Any] = field(default_factory=dict)


DATASETS: Registry[Callable[..., IndexedDataset]] = Registry("data set")


def dataset_names() -> list[str]:
    return [n for n in DATASETS.names() if n != "imagefolder"] + ["imagefolder:DIR"]


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
    return TransformSpec(spec.transform, int(size), channels, tuple(mean), tuple(std))


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
    return ds


def need_root(spec: DataSpec, layout: str) -> Path:
    if not spec.data_root:
        raise UserError(f"data set {spec.name!r} reads from disk: pass --data_root DIR holding {layout}")
    root = Path(spec.data_root).expanduser()
    if not root.is_dir():
        raise UserError(f"--data_root {root} is not a directory; data set {spec.name!r} expects {layout}")
    return root


def need_file(path: Path, layout: str) -> Path:
    if not path.exists():
        raise UserError(f"missing {path}; the expected layout is {layout}")
    return path


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
    with gzip.open(need_file(folder / "animal_data_version_3.gz", "the animal-mnist 0.4 package"), "rb") as f:
        images = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(need_file(folder / "animal_label_version_3.gz", "the animal-mnist 0.4 package"), "rb") as f:
        labels = np.asarray(pickle.load(f), dtype=np.int64)
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


# On-disk layouts register themselves.
import training.datasets_disk  # noqa: E402,F401
