"""Data-set building blocks: :class:`DataSpec` (how to build one, recorded in configs), the
``DATASETS`` registry, the indexed base classes every builder returns, and layout checks.

Every data set yields ``(image, label, index)``: ``index`` is the sample's position in the split.
"""
from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from common.errors import UserError
from common.registry import Registry
from training.config import DataSpec  # re-exported: its old home


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

    def source_fingerprint(self) -> str | None:
        """A short hash of what the images are read from (None: unknown). A decoded-pixel cache built
        from other sources than these is stale (``training/device_data.cached_images``)."""
        return None

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

    def source_fingerprint(self) -> str:
        """The pixels themselves (about 10 ms a 10,000-image 28 px set)."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256(repr((self.images.shape, str(self.images.dtype))).encode())
            h.update(np.ascontiguousarray(self.images).data)
            self._fingerprint = h.hexdigest()[:20]
        return self._fingerprint


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

    def source_fingerprint(self) -> str:
        """Each file's path, size and modification time, and the boxes: an image edited in place
        changes it (a stat a file: about 50 ms for 12,000 files)."""
        h = hashlib.sha256()
        for f in self.files:
            try:
                st = f.stat()
                h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{f}\0missing\n".encode())
        h.update(repr(None if self.boxes is None else [tuple(map(float, b)) for b in self.boxes]).encode())
        return h.hexdigest()[:20]


DATASETS: Registry[Callable[..., IndexedDataset]] = Registry("data set")


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
