"""JSON and config files: plain-type conversion, atomic writes, readers with clear errors.

Files that must never look complete when half-written go through :func:`atomic_write` (write
``*.tmp`` then ``os.replace``). JSON is strict (no NaN/Infinity tokens): non-finite numbers are
written as ``null`` and :func:`write_json` records which ones they were (``nonfinite_values``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import UserError
from common.faults import fault_point

NONFINITE_KEY = "nonfinite_values"


def _nonfinite_name(v: float) -> str:
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def jsonable(obj: Any, nonfinite: dict[str, str] | None = None, path: str = "") -> Any:
    """Dataclasses, paths, tensors and numpy scalars to plain JSON types. NaN, inf and -inf (which
    strict JSON cannot hold) become ``None``; when ``nonfinite`` is a dict, each one's location
    (``r2``, ``var_orders[1]``, ``metrics.cka.matrix[0][2]``) is recorded there as ``"nan"``,
    ``"inf"`` or ``"-inf"``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj), nonfinite, path)
    if isinstance(obj, dict):
        if nonfinite is None:
            return {str(k): jsonable(v) for k, v in obj.items()}
        return {str(k): jsonable(v, nonfinite, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        if nonfinite is None:
            return [jsonable(v) for v in obj]
        return [jsonable(v, nonfinite, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.ndarray) or _is_tensor(obj):
        return jsonable(obj.tolist(), nonfinite, path)
    if isinstance(obj, np.generic):
        return jsonable(obj.item(), nonfinite, path)
    if isinstance(obj, float) and not math.isfinite(obj):
        if nonfinite is not None:
            nonfinite[path or "."] = _nonfinite_name(obj)
        return None
    return obj


# --------------------------------------------------------------------------- write failures

DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EIO: "input/output error (EIO)", errno.EROFS: "read-only file system",
               errno.EFBIG: "file too large for this file system"}


class WriteFailed(UserError):
    """Writing a file failed for a reason of the machine (disk full, I/O error, read-only file system)."""


def is_disk_error(e: BaseException) -> bool:
    """An ``OSError`` of the disk (:data:`DISK_ERRNOS`), not of the program."""
    return isinstance(e, OSError) and e.errno in DISK_ERRNOS


def write_failed(e: OSError, path: str | os.PathLike, context: str = "", advice: str = "") -> WriteFailed:
    """``"no space left on device while writing PATH (context); advice"`` for a disk's ``OSError``."""
    what = DISK_ERRNOS.get(e.errno or 0) or f"{type(e).__name__}: {e.strerror or e}"
    where = f" ({context})" if context else ""
    return WriteFailed(f"{what} while writing {path}{where}" + (f"; {advice}" if advice else ""))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open ``path.tmp`` for writing and move it over ``path`` only when the block succeeds (data
    flushed and fsync'ed first). A full disk (or another disk error, :data:`DISK_ERRNOS`) raises
    :class:`WriteFailed` naming ``path``; the previous ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            fault_point("atomic_write", tmp)             # the reliability tests fill the disk here
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if not is_disk_error(e):
            raise
        kept = "it keeps its previous content" if path.exists() else "nothing was written"
        raise write_failed(e, path, advice=f"{kept}; free space (or fix the disk) and re-run") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as strict JSON, atomically. NaN and ±inf are written as ``null``; in a mapping the
    reason is kept under ``"nonfinite_values"``: location -> ``"nan"`` | ``"inf"`` | ``"-inf"`` (e.g. a
    diverged pair's ``{"r2": null, ..., "nonfinite_values": {"r2": "-inf"}}``), merged with what an
    earlier write recorded there. A top-level list has no place for it: its values become null only."""
    bad: dict[str, str] = {}
    body = jsonable(obj, bad)
    if bad and isinstance(body, dict):
        body[NONFINITE_KEY] = {**(body.get(NONFINITE_KEY) or {}), **bad}
    with atomic_write(path) as f:
        json.dump(body, f, indent=2, allow_nan=False)
        f.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e}); was it written by an interrupted run?") from e


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A ``--config`` file: YAML or JSON mapping of option name -> value."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"config file {path} cannot be parsed: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _is_tensor(obj: Any) -> bool:
    """A torch tensor (torch is not imported for it: no tensor exists unless torch was imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)
