"""Run directories: the output folder of one command.

A run directory holds ``config.json`` (resolved options + provenance), ``metrics.json``,
``log.jsonl`` (one JSON object per epoch), TensorBoard events and checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import UserError
from common.files import DISK_ERRNOS, atomic_write, jsonable, read_json, write_json
from common.provenance import now_utc, provenance

if TYPE_CHECKING:
    import torch


class PathLock:
    """An exclusive lock on ``lock_path`` (``flock``, released by the kernel when the process dies) that
    records ``pid N on HOST`` of its holder, so a refused second process can name the one it waits for.

    Whoever changes an output (a run directory, a feature file) takes its lock first, before anything
    is deleted or written: ``--overwrite`` beside a running job is refused, not half-done.
    """

    def __init__(self, lock_path: str | os.PathLike, what: str, advice: str = "wait for it to finish"):
        import fcntl

        self.path = Path(lock_path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:                    # a read-only file system, no permission, a full disk
            reason = DISK_ERRNOS.get(e.errno or 0) or e.strerror or str(e)
            raise UserError(f"cannot write {what}: {reason} (creating its lock file {self.path} failed)") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(self.path) or "another process"
            raise UserError(f"{what} is in use by {holder}; {advice}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def lock_holder(lock_path: str | os.PathLike) -> str | None:
    """``"pid N on HOST"`` when a live process holds the lock at ``lock_path``, else None."""
    import fcntl

    lock_path = Path(lock_path)
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        with contextlib.suppress(OSError):
            return os.read(fd, 200).decode(errors="replace").strip() or "another process"
        return "another process"
    finally:
        os.close(fd)
    return None


class RunDir:
    """An output directory of one command.

    ``mode``: ``new`` refuses a non-empty directory, ``resume`` requires or accepts one,
    ``overwrite`` empties the run's own files first. A lock file refuses a second process
    writing into the same directory at the same time; it is taken before anything is looked at or
    deleted, so ``overwrite`` beside a running job is refused with the job's pid.
    """

    OWN_FILES = ("config.json", "metrics.json", "log.jsonl")

    def __init__(self, path: str | os.PathLike, mode: str = "new", lock: bool = True):
        self.path = Path(path)
        if mode not in ("new", "resume", "overwrite"):
            raise ValueError(f"mode {mode!r}; valid: new, resume, overwrite")
        self.mode = mode
        self._lock: PathLock | None = None
        self._tb = None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            reason = DISK_ERRNOS.get(e.errno or 0) or e.strerror or str(e)
            raise UserError(f"cannot create the output directory {self.path}: {reason}") from e
        if lock:
            self._lock = PathLock(self.path / ".lock", str(self.path),
                                  "wait for it to finish or use another --out_dir")
        try:
            self._prepare(mode)
        except BaseException:
            self.close()
            raise

    def _prepare(self, mode: str) -> None:
        existing = any(p.name != ".lock" for p in self.path.iterdir())
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

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> RunDir:
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
        """Append one JSON line to ``log.jsonl`` and mirror numbers to TensorBoard. A torn last line (a
        kill during the previous append) is dropped first, with a warning, so lines never run together."""
        drop_torn_line(self.file("log.jsonl"))
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
        kept = [r for r in read_log(p) if r.get("epoch", 0) <= keep_epochs_upto]
        with atomic_write(p) as f:
            f.write("".join(json.dumps(r) + "\n" for r in kept))

    def tensorboard(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.path / "tb"))
        return self._tb


# --------------------------------------------------------------------------- log.jsonl

class TornLogLineWarning(UserWarning):
    """The last line of a ``log.jsonl`` was cut off (a kill during the append) and is dropped."""


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` (one JSON object per line). A torn last line (cut off by a kill
    during its append: no newline at its end, or not valid JSON) is dropped with a
    :class:`TornLogLineWarning`; a damaged line before the last one is a :class:`UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    records: list[dict] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = all(not rest.strip() for rest in lines[i + 1:])
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if not last:
                raise UserError(f"{path}: line {i + 1} is not a JSON object ({e}): the log is damaged; repair or "
                                f"delete that line") from e
            warnings.warn(f"{path}: its last line is torn (cut off while it was written, e.g. by a kill) and is "
                          f"dropped: {line[:80]!r}", TornLogLineWarning, stacklevel=2)
            continue
        records.append(rec)
    return records


def drop_torn_line(path: str | os.PathLike) -> None:
    """Cut a ``log.jsonl`` after its last complete line when the last append was torn (the file does not
    end with a newline), with a :class:`TornLogLineWarning`."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return
            data = (f.seek(0), f.read())[1]
    except FileNotFoundError:
        return
    keep = data.rfind(b"\n") + 1
    warnings.warn(f"{path}: its last line is torn (cut off while it was written, e.g. by a kill) and is dropped: "
                  f"{data[keep:keep + 80]!r}", TornLogLineWarning, stacklevel=2)
    with open(path, "r+b") as f:
        f.truncate(keep)


def run_mode(resume: bool, overwrite: bool) -> str:
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other; choose one")
    return "resume" if resume else "overwrite" if overwrite else "new"


def is_finished(out_dir: str | Path) -> bool:
    """A run is finished when ``metrics.json`` exists and ``config.json`` has an end time."""
    out = Path(out_dir)
    if not (out / "metrics.json").exists() or not (out / "config.json").exists():
        return False
    return read_json(out / "config.json").get("end_utc") is not None
