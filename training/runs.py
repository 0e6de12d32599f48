"""Run directories, provenance, checkpoints and config files: the I/O every stage shares.

A run directory holds ``config.json`` (resolved options + provenance), ``metrics.json``,
``log.jsonl`` (one JSON object per epoch), TensorBoard events and checkpoints. Files that
must never look complete when half-written go through :func:`atomic_write` (write ``*.tmp``
then ``os.replace``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

PACKAGE_VERSION = "0.1.0"
_REPO_ROOT = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """Bad input from the user: printed as one paragraph by ``cli.py``, no traceback."""


# --------------------------------------------------------------------------- fault injection

_FAULT_COUNTS: dict[str, int] = {}


def fault_point(tag: str) -> None:
    """A place where the reliability tests kill the process: with ``KC_FAULT=tag:N`` in the
    environment the N-th call with this tag ends the process at once (``os._exit(137)``, like
    SIGKILL: no cleanup, no ``finally``). Costs one dict lookup when unset."""
    spec = os.environ.get("KC_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != tag:
        return
    _FAULT_COUNTS[tag] = _FAULT_COUNTS.get(tag, 0) + 1
    if _FAULT_COUNTS[tag] >= int(n or 1):
        sys.stderr.write(f"KC_FAULT: killing the process at {tag} #{_FAULT_COUNTS[tag]}\n")
        sys.stderr.flush()
        os._exit(137)


# --------------------------------------------------------------------------- provenance

def code_version() -> str:
    """Git commit of the workbench (``+dirty`` when the tree has changes), else the package version."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO_ROOT, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        if commit:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=_REPO_ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
            return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return f"kc-workbench {PACKAGE_VERSION}"


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(device: str | torch.device | None = None) -> dict[str, Any]:
    """What produced an output: command line, code and library versions, host and device."""
    dev = str(device) if device is not None else "cpu"
    info = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv else "",
        "code_version": code_version(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "device": dev,
    }
    if dev.startswith("cuda") and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(torch.device(dev))
    return info


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- files

def jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tensors and numpy scalars to plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None if np.isnan(obj) else obj
    return obj


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open ``path.tmp`` for writing and move it over ``path`` only when the block succeeds."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(jsonable(obj), f, indent=2, allow_nan=False)
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


# --------------------------------------------------------------------------- run directories

class RunDir:
    """An output directory of one command.

    ``mode``: ``new`` refuses a non-empty directory, ``resume`` requires or accepts one,
    ``overwrite`` empties the run's own files first. A lock file refuses a second process
    writing into the same directory at the same time.
    """

    OWN_FILES = ("config.json", "metrics.json", "log.jsonl")

    def __init__(self, path: str | os.PathLike, mode: str = "new", lock: bool = True):
        self.path = Path(path)
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode {mode!r}; valid: new, resume, overwrite")
        self.mode = mode
        existing = self.path.is_dir() and any(p.name != ".lock" for p in self.path.iterdir())
        if existing and mode == "new":
            raise UserError(
                f"output directory {self.path} exists and is not empty; pass --resume to continue the run "
                f"in it or --overwrite to replace it")
        self.resuming = existing and mode == "resume"
        if existing and mode == "overwrite":
            import shutil

            for p in self.path.iterdir():
                if p.name == ".lock":
                    continue
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        if lock:
            self._acquire_lock()
        self._tb = None

    # -- lock
    def _acquire_lock(self) -> None:
        import fcntl

        lock_path = self.path / ".lock"
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_path.read_text().strip() or "another process"
            raise UserError(f"{self.path} is in use by {holder}; wait for it to finish or use another --out_dir")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._lock_fd is not None:
            import fcntl

            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
            with contextlib.suppress(FileNotFoundError):
                (self.path / ".lock").unlink()

    def __enter__(self) -> "RunDir":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- files
    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: Any, device: str | torch.device | None = None, **extra: Any) -> dict:
        """Write ``config.json``: resolved options + provenance. On resume keep the first start time."""
        prev = read_json(self.file("config.json")) if self.file("config.json").exists() else {}
        body = {"config": jsonable(config), **jsonable(extra), "provenance": provenance(device),
                "start_utc": prev.get("start_utc", now_utc()), "end_utc": None}
        if prev:
            body["resumed_utc"] = prev.get("resumed_utc", []) + [now_utc()]
        write_json(self.file("config.json"), body)
        return body

    def finish(self, metrics: dict[str, Any]) -> None:
        """Write ``metrics.json`` and stamp the end time into ``config.json``."""
        write_json(self.file("metrics.json"), metrics)
        cfg = read_json(self.file("config.json")) if self.file("config.json").exists() else {}
        cfg["end_utc"] = now_utc()
        write_json(self.file("config.json"), cfg)

    def log(self, record: dict[str, Any], step: int | None = None) -> None:
        """Append one JSON line to ``log.jsonl`` and mirror numbers to TensorBoard."""
        with open(self.file("log.jsonl"), "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
        if step is not None:
            tb = self.tensorboard()
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    tb.add_scalar(k, v, step)
            tb.flush()

    def truncate_log(self, keep_epochs_upto: int) -> None:
        """On resume drop log lines of epochs after the checkpoint so the log has no duplicates."""
        p = self.file("log.jsonl")
        if not p.exists():
            return
        lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) <= keep_epochs_upto]
        with atomic_write(p) as f:
            f.write("".join(ln + "\n" for ln in kept))

    def tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path / "tb"))
        return self._tb


def run_mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other; choose one")
    return "resume" if resume else "overwrite" if overwrite else "new"


# --------------------------------------------------------------------------- checkpoints

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
