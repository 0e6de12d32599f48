"""Named transform presets: a :class:`TransformSpec` (recorded in configs, checkpoints and feature
files) resolved to a torchvision transform. ``train=False`` never augments."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image
from torchvision import transforms as T

from common.registry import Registry

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
    def from_dict(d: dict[str, Any]) -> TransformSpec:
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
