"""Checkpoints: plain dicts saved atomically, loaded with ``weights_only=True``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.files import atomic_write, jsonable
from common.provenance import sha256_file

CHECKPOINT_KEYS = ("state_dict", "arch", "num_classes", "dataset", "transform", "epoch", "metrics", "config")


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> str:
    """Save a checkpoint dict atomically (``*.tmp`` then ``os.replace``); return its sha256."""
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    assert not missing, f"checkpoint lacks {missing}"
    path = Path(path)
    with atomic_write(path, "wb") as f:
        torch.save(jsonable_ckpt(ckpt), f)
    return sha256_file(path)


def jsonable_ckpt(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Tensors stay tensors; everything else becomes plain types so ``weights_only=True`` loads it."""
    out: dict[str, Any] = {}
    for k, v in ckpt.items():
        if isinstance(v, torch.Tensor) or k in ("state_dict", "optimizer", "scheduler", "rng", "masks"):
            out[k] = v
        elif isinstance(v, dict):
            out[k] = jsonable_ckpt(v) if any(isinstance(x, torch.Tensor) for x in v.values()) else jsonable(v)
        else:
            out[k] = jsonable(v)
    return out


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a plain state dict is wrapped with ``arch=None``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); "
                        f"is it complete and a workbench or plain state-dict file?") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj, "arch": None, "num_classes": None}
    raise UserError(f"checkpoint {path} holds neither a workbench checkpoint nor a state dict")
