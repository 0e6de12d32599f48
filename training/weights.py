"""Weights from a local file (``--weights FILE``): workbench checkpoints, plain state dicts, timm's
checkpoint formats (``state_dict`` / ``model`` / ``state_dict_ema`` entries, ``module.`` prefixes),
``.safetensors`` files and, for timm models that define ``load_pretrained``, the original JAX
``.npz`` files. Reading goes through timm's own helper (``timm.models.load_state_dict``), loading is
strict (:func:`training.models.load_weights` names every mismatch). Nothing is ever downloaded: a hub
name or URL is refused.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from common.checkpoints import unpickling_detail
from common.errors import UserError

HUB_PREFIXES = ("hf-hub:", "hf_hub:", "http://", "https://", "s3://", "gs://")


def check_local(path: str) -> Path:
    """The weights file as a local path; hub names, URLs and missing files are refused."""
    s = str(path)
    if s.startswith(HUB_PREFIXES):
        raise UserError(f"--weights {s!r} asks for a download; the workbench never downloads. Fetch the file "
                        f"yourself (e.g. the model's .safetensors from its hub page) and pass --weights FILE")
    p = Path(s).expanduser()
    if not p.is_file():
        raise UserError(f"--weights {p} does not exist (a local .pt/.pth/.bin/.safetensors file is expected)")
    return p


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict a weights file holds (EMA weights preferred when a timm checkpoint has them)."""
    p = check_local(path)
    from timm.models import load_state_dict

    try:
        sd = load_state_dict(str(p), use_ema=True, device="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, not a state dict, ...
        raise UserError(f"--weights {p} cannot be read as a checkpoint or state dict ({unpickling_detail(e)})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"--weights {p} holds no state dict of tensors")
    return sd


def load_weights_file(model: nn.Module, path: str, source: str = "") -> None:
    """Load ``path`` into ``model`` strictly; ``.npz``/``.npy`` go to the model's own ``load_pretrained``."""
    from training.models import load_weights

    p = check_local(path)
    source = source or f"--weights {p}"
    if p.suffix.lower() in (".npz", ".npy"):
        if not hasattr(model, "load_pretrained"):
            raise UserError(f"{source}: a NumPy weights file needs a model with load_pretrained (timm's ViTs); "
                            f"{type(model).__name__} has none")
        try:
            model.load_pretrained(str(p))
        except Exception as e:
            raise UserError(f"{source} cannot be loaded into {type(model).__name__} ({type(e).__name__}: {e})") from e
        return
    load_weights(model, read_state_dict(str(p)), source)
