"""Checkpoints: plain dicts saved atomically, loaded with ``weights_only=True``.

Every checkpoint ``X.pt`` gets a sidecar ``X.pt.sha256`` (``<hex digest>  X.pt``, the ``sha256sum``
format) written after it; :func:`load_checkpoint` checks the file against it, so a flipped bit on disk
is refused instead of loaded. A checkpoint without a sidecar (written before, or by another tool)
loads as before. The checkpoint is serialised in memory and written with one ``write``, so a full
disk is reported as such (naming the file), not as a torch serialisation error.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from common.errors import UserError
from common.files import atomic_write, jsonable
from common.provenance import sha256_file

SIDECAR_SUFFIX = ".sha256"

CHECKPOINT_KEYS = ("state_dict", "arch", "num_classes", "dataset", "transform", "epoch", "metrics", "config")


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> str:
    """Save a checkpoint dict atomically (``*.tmp`` then ``os.replace``); return its sha256."""
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    assert not missing, f"checkpoint lacks {missing}"
    path = Path(path)
    buf = io.BytesIO()
    torch.save(jsonable_ckpt(ckpt), buf)
    data = buf.getbuffer()
    digest = hashlib.sha256(data).hexdigest()
    side = sidecar_path(path)
    if side.exists():                        # never a new checkpoint beside an old digest
        side.unlink()
    with atomic_write(path, "wb") as f:
        f.write(data)
    with atomic_write(side) as f:
        f.write(f"{digest}  {path.name}\n")
    return digest


def sidecar_path(path: str | os.PathLike) -> Path:
    """``X.pt`` -> ``X.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def check_sidecar(path: str | os.PathLike) -> str | None:
    """Check ``path`` against its sha256 sidecar; return the digest (None when there is no sidecar)."""
    path = Path(path)
    side = sidecar_path(path)
    if not side.is_file():
        return None
    want = side.read_text().split(maxsplit=1)[0].strip().lower() if side.read_text().strip() else ""
    have = sha256_file(path)
    if have != want:
        raise UserError(f"checkpoint {path} does not match its checksum: sha256 {have[:16]}... but {side.name} "
                        f"records {want[:16] or '(empty)'}...; the file changed after it was written (a bit flip "
                        f"on the disk, a partial copy, or an edit). Restore it from a good copy or re-create it; if "
                        f"it was replaced on purpose, delete {side}")
    return have


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


def unpickling_detail(e: Exception) -> str:
    """What ``torch.load(weights_only=True)`` refused, without torch's advice to load with
    ``weights_only=False`` (which runs any code the file holds; the workbench never does)."""
    text = str(e)
    if "Weights only load failed" not in text:
        return f"{type(e).__name__}: {text}"
    detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    detail = " ".join(detail.split()) or "an object other than tensors and plain containers"
    return (f"the safe unpickler refused it: {detail}; only tensors and plain containers are read, so a "
            f"checkpoint of another program must be re-saved as torch.save(model.state_dict(), 'net.pt')")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a plain state dict is wrapped with ``arch=None``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    check_sidecar(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise UserError(f"checkpoint {path} cannot be read ({unpickling_detail(e)}); "
                        f"is it complete and a workbench or plain state-dict file?") from e
    if isinstance(obj, dict) and "state_dict" in obj:
        return obj
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": obj, "arch": None, "num_classes": None}
    raise UserError(f"checkpoint {path} holds neither a workbench checkpoint nor a state dict")
