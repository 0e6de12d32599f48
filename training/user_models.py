"""Your own model: ``--model package.module:callable`` builds whatever ``nn.Module`` the callable returns.

The callable receives ``--model_kwargs`` (a JSON object) plus ``num_classes`` / ``in_channels`` /
``in_chans`` when its signature names them and the kwargs do not set them. The module is imported
with the current directory on ``sys.path`` (as ``python -m`` does), so a file ``mynets.py`` beside
you is ``--model mynets:build``. In a checkpoint the net is the arch ``model:package.module:callable``
with ``arch_kwargs``; its provenance (:func:`entry_provenance`) records the entry point, the file that
defines it and that file's sha256.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.nn as nn

from common.errors import UserError
from common.provenance import sha256_file
from training.names import MODEL_PREFIX  # re-exported: its old home


def is_user_model(arch: str) -> bool:
    return str(arch).startswith(MODEL_PREFIX)


def entry_of(arch: str) -> str:
    """``model:pkg.mod:fn`` -> ``pkg.mod:fn`` (an entry point passes through)."""
    return str(arch)[len(MODEL_PREFIX):] if is_user_model(arch) else str(arch)


def _split(entry: str) -> tuple[str, str]:
    mod, sep, attr = entry.partition(":")
    if not sep or not mod or not attr or ":" in attr or "/" in mod:
        raise UserError(f"--model {entry!r} is not an entry point; give package.module:callable, e.g. "
                        f"mynets:build_net for a function build_net in mynets.py")
    return mod, attr


def load_entry(entry: str) -> Callable[..., Any]:
    """Import ``package.module`` and return its ``callable`` (attribute path with dots allowed)."""
    mod_name, attr = _split(entry_of(entry))
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        raise UserError(f"--model {entry!r}: cannot import module {mod_name!r} ({e}); run from the folder that "
                        f"holds it or add that folder to PYTHONPATH") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            choices = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise UserError(f"--model {entry!r}: module {mod_name!r} ({module.__file__}) has no {attr!r}; its "
                            f"callables: {', '.join(choices) or 'none'}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--model {entry!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    return obj


def entry_file(entry: str) -> Path:
    """The source file that defines the entry point's callable (its module's file as a fallback)."""
    fn = load_entry(entry)
    try:
        src = inspect.getsourcefile(fn)
    except TypeError:
        src = None
    src = src or getattr(sys.modules.get(_split(entry_of(entry))[0]), "__file__", None)
    if not src:
        raise UserError(f"--model {entry!r}: no source file found for it (built-in or generated code?)")
    return Path(src).resolve()


def entry_provenance(entry: str) -> dict[str, Any]:
    """What identifies the code of an own model: the entry point, its file and that file's sha256."""
    path = entry_file(entry)
    return {"model_entry": entry_of(entry), "model_file": str(path), "model_file_sha256": sha256_file(path)}


def build_user_model(arch: str, num_classes: int | None, in_channels: int = 3, input_size: int | None = None,
                     **kwargs: Any) -> nn.Module:
    """Call the entry point with ``kwargs`` (+ the class and channel counts its signature asks for)."""
    fn = load_entry(arch)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    filled = {"num_classes": num_classes, "in_channels": int(in_channels), "in_chans": int(in_channels)}
    kw = {k: v for k, v in filled.items() if k in params and k not in kwargs and v is not None}
    kw.update(kwargs)
    try:
        model = fn(**kw)
    except TypeError as e:
        raise UserError(f"--model {entry_of(arch)!r} could not be called with {kw} ({e}); set its arguments with "
                        f"--model_kwargs JSON") from e
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {entry_of(arch)!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model
