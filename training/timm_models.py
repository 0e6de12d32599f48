"""timm models by name: ``--arch timm:NAME`` (any model ``timm.list_models()`` knows), built with
``pretrained=False`` always, so nothing is ever downloaded; weights come from a local file
(``--weights FILE``, read by :mod:`training.weights`).

The workbench fills the kwargs a small input needs: ``num_classes``, ``in_chans`` (1 for grayscale
Animal-MNIST) and, for models whose ``pretrained_cfg`` declares a fixed input size (ViT, DeiT, Swin),
``img_size``. Everything else a model takes (``patch_size``, ``depth``, ``window_size``, ``embed_dim``,
...) comes from ``--model_kwargs JSON`` and is recorded in the checkpoint (``arch_kwargs``).

The model's ``pretrained_cfg`` gives the defaults of the input size and of the normalisation (mean and
std) when the data options do not give them (:func:`data_defaults`). timm is imported on first use
(it adds seconds to start-up), never at import time of this module.
"""
from __future__ import annotations

import difflib
from typing import Any

import torch.nn as nn

from common.errors import UserError
from training.names import TIMM_PREFIX  # re-exported: its old home

HUB_PREFIXES = ("hf-hub:", "hf_hub:", "http://", "https://", "timm/")
# kwargs of timm.create_model that fetch or read weights themselves: the workbench owns weight loading.
WEIGHT_KWARGS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")


def is_timm(arch: str) -> bool:
    return str(arch).startswith(TIMM_PREFIX)


def _timm():
    try:
        import timm
    except ImportError as e:  # a requirement; a clear message when an environment lacks it
        raise UserError("--arch timm:NAME needs the timm package: pip install timm==1.0.31") from e
    return timm


def timm_name(arch: str) -> str:
    """The timm model name of ``timm:NAME``; hub names and unknown names are refused with choices."""
    name = str(arch)[len(TIMM_PREFIX):] if is_timm(arch) else str(arch)
    if name.startswith(HUB_PREFIXES):
        raise UserError(f"--arch {arch!r} asks for a download from a model hub; the workbench never downloads: "
                        f"fetch the weights yourself and pass --arch timm:<model name> --weights FILE")
    timm = _timm()
    if not timm.is_model(name):
        names = timm.list_models()
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.6) or timm.list_models(f"*{name}*")[:5]
        raise UserError(f"unknown timm model {name!r}" + (f"; nearest: {', '.join(close)}" if close else "")
                        + f". timm {timm.__version__} knows {len(names)} models (python -c \"import timm; "
                        f"print(timm.list_models('*vit*'))\" lists some)")
    return name


def pretrained_cfg(arch: str) -> dict[str, Any]:
    """The default ``pretrained_cfg`` of a timm model as a dict ({} when timm records none)."""
    cfg = _timm().models.get_pretrained_cfg(timm_name(arch))
    return cfg.to_dict() if cfg is not None else {}


def default_input_size(arch: str) -> int:
    """The side of the model's ``pretrained_cfg`` input size (224 when timm records none)."""
    size = pretrained_cfg(arch).get("input_size") or (3, 224, 224)
    return int(size[-1])


def default_normalization(arch: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``pretrained_cfg`` mean and std for ``channels`` inputs. One channel: the mean of the RGB values
    (a grey image is fed as R = G = B, timm's convention when it folds an RGB stem to ``in_chans=1``)."""
    cfg = pretrained_cfg(arch)
    mean, std = tuple(cfg.get("mean") or (0.5,) * 3), tuple(cfg.get("std") or (0.5,) * 3)
    if channels == len(mean):
        return tuple(map(float, mean)), tuple(map(float, std))
    return (float(sum(mean) / len(mean)),) * channels, (float(sum(std) / len(std)),) * channels


def data_defaults(arch: str, channels: int) -> dict[str, Any]:
    """Input size and normalisation (comma-separated, as the data options take them) from ``pretrained_cfg``."""
    mean, std = default_normalization(arch, channels)
    return {"image_size": default_input_size(arch), "mean": ",".join(f"{v:g}" for v in mean),
            "std": ",".join(f"{v:g}" for v in std)}


def build_timm(arch: str, num_classes: int | None, in_channels: int = 3, input_size: int | None = None,
               **kwargs: Any) -> nn.Module:
    """A freshly initialised timm model (``pretrained=False``); ``kwargs`` go to ``timm.create_model``."""
    name = timm_name(arch)
    asked = [k for k in WEIGHT_KWARGS if k in kwargs]
    if asked:
        raise UserError(f"--model_kwargs sets {', '.join(asked)}: timm would download or read weights itself; the "
                        f"workbench builds timm models with pretrained=False and loads --weights FILE (a local "
                        f".pth/.pt/.bin/.safetensors/.npz file) instead")
    kw: dict[str, Any] = {"in_chans": int(in_channels)}
    if num_classes is not None:
        kw["num_classes"] = int(num_classes)
    if input_size and pretrained_cfg(arch).get("fixed_input_size") and "img_size" not in kwargs:
        kw["img_size"] = int(input_size)
    kw.update(kwargs)
    try:
        return _timm().create_model(name, pretrained=False, **kw)
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise UserError(f"timm could not build {name!r} with {kw} ({type(e).__name__}: {e}); adjust "
                        f"--model_kwargs (e.g. patch_size, window_size, depth) or --image_size") from e
