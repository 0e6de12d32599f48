"""Data sets held on the device: every image decoded and resized once to uint8, cached on disk as one
tensor file keyed by the data spec, and augmented a whole batch at a time with tensor ops.

Each transform preset splits into a deterministic PIL part, applied once when the cache is built,
and a random part, applied per batch on the device:

- ``paper``, ``plain`` and every evaluation transform: the cache holds the exact uint8 pixels the
  CPU path feeds to ``ToTensor``; batches equal the CPU path's bit for bit.
- ``small`` (training): the pad-and-random-crop and the flip run on the device; given the same crop
  offsets and flips the result equals the CPU path bit for bit, and the offsets and flips are drawn
  from the same distributions (uniform offsets in [0, 2·pad], flip with probability 1/2).
- ``ke`` (training): the cache holds each image squashed to round(size·256/224) squared, and the
  random-resized crop (scale 0.08–1, aspect 3/4–4/3, ten tries then the centre crop, as
  torchvision draws it) is taken from that image and resampled with an averaging bilinear filter
  (``roi_align``). For images that are square before caching, the crop boxes follow torchvision's
  distribution as fractions of the image; for other images the squash changes the aspect ratio
  first: a stated approximation of the CPU preset.

The CPU DataLoader path stays for data that does not fit the device and for CPU runs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T

from common.errors import UserError, require_choice
from common.progress import progress
from training.config import DATA_ON, DataSpec
from training.datasets import IndexedDataset
from training.transforms import TransformSpec

CACHE_VERSION = 2            # 2: keyed by the deterministic steps, not the train flag
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


@dataclass(frozen=True)
class DeviceAugment:
    """The random part of a preset, run per batch on the device; ``kind`` is ``none``, ``crop_flip``
    (pad ``pad`` then a random ``size`` crop, and a flip) or ``rrc_flip`` (random-resized crop to
    ``size``, and a flip)."""

    kind: str
    size: int
    pad: int = 0


def split_preset(tspec: TransformSpec, train: bool) -> tuple[list, DeviceAugment]:
    """The deterministic PIL steps cached once, and the random part applied per batch."""
    s = tspec.image_size
    chan = [T.Grayscale(num_output_channels=tspec.channels)] if tspec.channels == 1 else [_ToRGB()]
    if tspec.preset in ("paper", "plain") or (tspec.preset == "small" and not train):
        return chan + [T.Resize((s, s))], DeviceAugment("none", s)
    if tspec.preset == "small":
        return chan + [T.Resize((s, s))], DeviceAugment("crop_flip", s, max(1, s // 8))
    if tspec.preset == "ke" and not train:
        return chan + [T.Resize(int(round(s * 256 / 224))), T.CenterCrop(s)], DeviceAugment("none", s)
    if tspec.preset == "ke":
        big = int(round(s * 256 / 224))
        return chan + [T.Resize((big, big))], DeviceAugment("rrc_flip", s)
    raise UserError(f"transform preset {tspec.preset!r} has no device path; valid: ke, paper, plain, small")


class _ToRGB:
    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB") if img.mode != "RGB" else img

    def __repr__(self) -> str:                  # part of the cache key: no object address
        return "ToRGB()"


# --------------------------------------------------------------------------- the on-disk cache

def cache_key(spec: DataSpec, split: str, steps: list) -> str:
    """A content key of everything that decides the cached pixels: the data spec, the split and the
    deterministic steps themselves (so training and extraction share one file where their steps agree:
    every preset but ``ke``, whose training cache is squashed before the random crop)."""
    blob = json.dumps({"v": CACHE_VERSION, "spec": asdict(spec), "split": split, "steps": [repr(t) for t in steps]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def default_cache_dir() -> Path:
    return Path(os.environ.get("KC_DATA_CACHE", Path.home() / ".cache" / "kc-workbench" / "images"))


class _Pixels(Dataset):
    """Image ``i`` of ``ds`` after the deterministic ``steps``, as a (C, H, W) uint8 tensor."""

    def __init__(self, ds: IndexedDataset, steps: list):
        self.ds, self.pipe = ds, T.Compose(steps)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> torch.Tensor:
        a = np.asarray(self.pipe(self.ds.load_image(i)), dtype=np.uint8)
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)             # (C, H, W)
        return torch.from_numpy(a.copy(order="C"))                        # a writable copy of the PIL buffer


def decode_all(ds: IndexedDataset, steps: list, num_workers: int = 0, rows: int | None = None,
               batch_size: int = 256) -> torch.Tensor:
    """The first ``rows`` (default: all) images of ``ds`` through the deterministic ``steps``:
    (N, C, H, W) uint8, decoded by ``num_workers`` loader processes (0: in this one)."""
    n = len(ds) if rows is None else min(rows, len(ds))
    if n == 0:
        raise UserError(f"data set {ds.name!r} split {ds.split!r} is empty")
    pixels = Subset(_Pixels(ds, steps), range(n))
    loader = DataLoader(pixels, batch_size=batch_size, num_workers=num_workers, collate_fn=torch.stack)
    out, row = None, 0
    for b in progress(loader, len(loader), f"decode {ds.name} {ds.split}"):
        if out is None:
            out = torch.empty((n, *b.shape[1:]), dtype=torch.uint8)
        out[row:row + len(b)] = b
        row += len(b)
    return out


def cached_images(ds: IndexedDataset, spec: DataSpec, tspec: TransformSpec, train: bool,
                  cache_dir: Path | None = None, num_workers: int = 0,
                  rows: int | None = None) -> tuple[torch.Tensor, DeviceAugment]:
    """The uint8 images of ``ds`` after the deterministic steps, read from the cache file keyed by the
    data spec (and checked against the labels and ``ds.source_fingerprint()``: files' sizes and
    modification times, or the pixels of an in-memory set) or decoded once (by ``num_workers``
    processes) and written there (tmp file, then rename: never half-written). ``rows``: only the first
    rows are wanted; they are sliced from the cache file when it exists, else decoded alone and not
    cached (the file always holds the whole split)."""
    steps, aug = split_preset(tspec, train)
    path = cache_path(ds, spec, steps, cache_dir)
    want = len(ds) if rows is None else min(rows, len(ds))
    source = ds.source_fingerprint()
    if path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)   # rows read as sliced
        if (blob["images"].shape[0] == len(ds) and torch.equal(blob["labels"], torch.as_tensor(ds.labels))
                and blob.get("source") == source):                  # images edited in place: decoded anew
            return blob["images"][:want], aug
    images = decode_all(ds, steps, num_workers, want)
    if want < len(ds):
        return images, aug
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"images": images, "labels": torch.as_tensor(ds.labels), "source": source}, tmp)
    os.replace(tmp, path)
    return images, aug


def cache_path(ds: IndexedDataset, spec: DataSpec, steps: list, cache_dir: Path | None = None) -> Path:
    """Where the cache of ``ds`` under ``steps`` lives (``cache_dir``, default ``$KC_DATA_CACHE`` or
    ``~/.cache/kc-workbench/images``)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{ds.name.replace('/', '_')}-{ds.split}-{cache_key(spec, ds.split, steps)}.pt"


# --------------------------------------------------------------------------- batched augmentation

def crop_flip_params(n: int, pad: int, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Top and left offsets in [0, 2·pad] into the padded image, and flips with probability 1/2."""
    top = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=device)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=device)
    flip = torch.rand(n, generator=gen, device=device) < 0.5
    return top, left, flip


def crop_flip(x: torch.Tensor, pad: int, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """x: (B, C, S, S) uint8 -> (B, C, S, S): zero-pad by ``pad``, crop at (top, left), flip where asked."""
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = top[:, None] + torch.arange(h, device=x.device)                    # (B, H)
    cols = left[:, None] + torch.arange(w, device=x.device)                   # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def rrc_params(n: int, height: int, width: int, gen: torch.Generator, device: torch.device,
               tries: int = 10) -> torch.Tensor:
    """Crop boxes (top, left, h, w) as torchvision's RandomResizedCrop draws them: area uniform in
    ``RRC_SCALE`` of the image, log-aspect uniform in ``RRC_RATIO``, the first of ``tries`` that fits,
    else the centre crop of the clamped aspect ratio. (n, 4) int64."""
    area = height * width
    target = area * torch.empty(n, tries, device=device).uniform_(*RRC_SCALE, generator=gen)
    log_r = torch.empty(n, tries, device=device).uniform_(math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1]),
                                                          generator=gen)
    ratio = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * ratio)).long()
    h = torch.round(torch.sqrt(target / ratio)).long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=device))
    pick = first.clamp(min=0)[:, None]
    hh, ww = h.gather(1, pick)[:, 0], w.gather(1, pick)[:, 0]
    u_top = torch.rand(n, generator=gen, device=device)
    u_left = torch.rand(n, generator=gen, device=device)
    top = torch.floor(u_top * (height - hh + 1).clamp(min=1)).long()
    left = torch.floor(u_left * (width - ww + 1).clamp(min=1)).long()
    fh, fw, ft, fl = _centre_fallback(height, width)
    miss = first < 0
    box = torch.stack([top, left, hh, ww], 1)
    box[miss] = torch.tensor([ft, fl, fh, fw], device=device)
    return box


def _centre_fallback(height: int, width: int) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < RRC_RATIO[0]:
        w, h = width, int(round(width / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        h, w = height, int(round(height * RRC_RATIO[1]))
    else:
        w, h = width, height
    return h, w, (height - h) // 2, (width - w) // 2


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """x: (B, C, H, W) float; boxes (B, 4) = (top, left, h, w) -> (B, C, size, size): each box resampled
    with an averaging bilinear filter (``roi_align``, adaptive samples per output pixel), one kernel."""
    from torchvision.ops import roi_align

    top, left, h, w = boxes.to(x.dtype).unbind(1)
    rois = torch.stack([torch.arange(len(x), device=x.device, dtype=x.dtype), left, top, left + w, top + h], 1)
    return roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32, as ToTensor then Normalize compute it."""
    x = x.float().div(255) if x.dtype == torch.uint8 else x.div(255)
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device)[None, :, None, None]
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device)[None, :, None, None]
    return x.sub(m).div(s)


# --------------------------------------------------------------------------- the loader

class DeviceLoader:
    """Batches ``(x, y, index)`` from images held on ``device``; the same role as a DataLoader over an
    :class:`IndexedDataset`. ``shuffle`` draws a permutation per epoch from ``seed`` and the epoch;
    under DDP each rank takes an equal, disjoint share (``rank``, ``world``)."""

    def __init__(self, images: torch.Tensor, labels, aug: DeviceAugment, tspec: TransformSpec,
                 batch_size: int, device: torch.device, shuffle: bool = False, drop_last: bool = False,
                 seed: int = 0, rank: int = 0, world: int = 1):
        self.images = images.to(device)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.int64, device=device)
        self.aug, self.tspec, self.batch_size, self.device = aug, tspec, batch_size, device
        self.shuffle, self.drop_last, self.seed, self.rank, self.world = shuffle, drop_last, seed, rank, world
        self.epoch = 0
        self.dataset = self.labels            # what a DataLoader calls its dataset: len() = the rows of the split

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.labels)
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        per_rank = n // self.world
        return order[self.rank * per_rank:(self.rank + 1) * per_rank] if self.world > 1 else order

    def __len__(self) -> int:
        n = len(self.labels) // self.world
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed * 7_919 + self.epoch * 104_729 + self.rank)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.augment(self.images[idx], gen), self.labels[idx], idx

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        a = self.aug
        if a.kind == "crop_flip":
            x = crop_flip(x, a.pad, *crop_flip_params(len(x), a.pad, gen, x.device))
        elif a.kind == "rrc_flip":
            boxes = rrc_params(len(x), x.shape[2], x.shape[3], gen, x.device)
            x = resized_crop(x.float(), boxes, a.size)
            flip = torch.rand(len(x), generator=gen, device=x.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return normalise(x, self.tspec.mean, self.tspec.std)


def choose_data_on(choice: str, images_bytes: int, device: torch.device) -> str:
    """``loader`` (the CPU DataLoader path) or ``device`` (the cached images held on ``device``, augmented
    there). ``auto``: ``device`` on CUDA when the uint8 images take at most a quarter of the free memory."""
    require_choice("--data_on", choice, DATA_ON)
    if choice == "auto":
        return "device" if fits_on_device(images_bytes, device) else "loader"
    return choice


def estimated_bytes(n_images: int, tspec: TransformSpec) -> int:
    """The uint8 cache's size before decoding: the largest stored side is round(size·256/224) (``ke``)."""
    side = int(round(tspec.image_size * 256 / 224)) if tspec.preset == "ke" else tspec.image_size
    return n_images * tspec.channels * side * side


def device_loaders(train_set: IndexedDataset, test_set: IndexedDataset, spec: DataSpec, tspec: TransformSpec,
                   batch_size: int, device: torch.device, seed: int, rank: int = 0, world: int = 1,
                   cache_dir: Path | None = None, num_workers: int = 0) -> tuple[DeviceLoader, DeviceLoader]:
    """The training loader (shuffled, augmented, a rank's share under DDP) and the test loader, both
    from the cached uint8 images held on ``device`` (decoded by ``num_workers`` processes when not cached)."""
    tr, tr_aug = cached_images(train_set, spec, tspec, True, cache_dir, num_workers)
    te, te_aug = cached_images(test_set, spec, tspec, False, cache_dir, num_workers)
    per_rank = len(train_set) // world
    train = DeviceLoader(tr, train_set.labels, tr_aug, tspec, batch_size, device, shuffle=True,
                         drop_last=per_rank > batch_size, seed=seed, rank=rank, world=world)
    test = DeviceLoader(te, test_set.labels, te_aug, tspec, max(batch_size, 256), device)
    return train, test


def fits_on_device(images_bytes: int, device: torch.device, fraction: float = 0.25) -> bool:
    """Whether a uint8 cache of ``images_bytes`` takes at most ``fraction`` of the device's free memory."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return images_bytes <= fraction * free
