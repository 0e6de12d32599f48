"""Unfinished results must not read as finished.

A run directory is finished when its job stamped ``end_utc`` into ``config.json`` and wrote
``metrics.json`` (:func:`common.rundir.is_finished`). A job that died leaves its checkpoints
(``last.pt``) and a log behind; readers (``variance``, ``diagnose``, ``visualize``, ``report``) call
:func:`require_finished`, which refuses such a folder with how far the job got and how to resume it,
unless ``--allow_unfinished``.
"""
from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.rundir import is_finished

ALLOW_FLAG = "--allow_unfinished"


def _last_epoch(run: Path) -> int | None:
    """The last epoch ``log.jsonl`` records (a torn last line, from a kill during the append, is skipped)."""
    try:
        lines = (run / "log.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("epoch"), int):
            return rec["epoch"]
    return None


def _checkpoint_epoch(run: Path, name: str = "last.pt") -> int | None:
    """The epoch the resumable checkpoint holds (None: no readable one); read memory-mapped."""
    import torch  # not at import: `--help` of the commands that use this stays torch-free

    try:
        ck = torch.load(run / name, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # absent, torn by a kill, a foreign file: no resume point to name
        return None
    epoch = ck.get("epoch") if isinstance(ck, dict) else None
    return epoch if isinstance(epoch, int) else None


def _config(run: Path) -> dict[str, Any]:
    try:
        body = json.loads((run / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _resume_command(cfg: dict[str, Any]) -> str | None:
    command = str((cfg.get("provenance") or {}).get("command") or "")
    if not command:
        return None
    parts = shlex.split(command)
    parts = [p for p in parts if p not in ("--overwrite", "--resume")]
    return shlex.join(["python", *parts, "--resume"]) if parts and parts[0].endswith(".py") else None


def unfinished_reason(run_dir: str | os.PathLike) -> str | None:
    """Why ``run_dir`` holds no finished result (how far its job got), or None when it finished."""
    run = Path(run_dir)
    if is_finished(run):
        return None
    cfg = _config(run)
    if not cfg:
        return f"{run} holds no finished run (no config.json with an end time)"
    conf = cfg.get("config") if isinstance(cfg.get("config"), dict) else {}
    epochs = conf.get("epochs", (conf.get("train") or {}).get("epochs") if isinstance(conf.get("train"), dict) else None)
    epoch = _last_epoch(run)
    if epoch is not None and isinstance(epochs, int):
        got = f"stopped at epoch {epoch} of {epochs}"
    elif epoch is not None:
        got = f"stopped after epoch {epoch}"
    else:
        got = "stopped before its first epoch ended"
    if epoch is not None:                   # the log runs ahead of the checkpoint a resume starts from
        saved = _checkpoint_epoch(run)
        if saved is None:
            got += " before its first checkpoint (a resume starts again at epoch 1)"
        elif saved != epoch:
            got += f"; its last checkpoint holds epoch {saved}, where a resume continues"
    resume = _resume_command(cfg)
    return (f"the job in {run} did not finish: it {got} (started {cfg.get('start_utc', '?')}); resume it with "
            + (resume or "the command that made it plus --resume"))


def require_finished(run_dir: str | os.PathLike, what: str, allow: bool = False) -> None:
    """Refuse to read ``run_dir`` as a result while its job has not finished (unless ``allow``)."""
    why = unfinished_reason(run_dir)
    if why and not allow:
        raise UserError(f"{what}: {why}, or pass {ALLOW_FLAG} to read it as it is")


def require_finished_result(path: str | os.PathLike, what: str, allow: bool = False, partial: str = "last.pt") -> None:
    """:func:`require_finished` for a result given as a run directory or as a file in one. A file alone
    (no ``config.json`` beside it) passes, unless it is the ``partial`` checkpoint of an unfinished job; so
    does a folder that is no run directory (no ``config.json``)."""
    p = Path(path)
    run = p if p.is_dir() else p.parent
    if p.is_file() and not (run / "config.json").exists():
        if p.name == partial and not allow:
            raise UserError(f"{what}: {p} is the resumable {partial} of a job, not its final result; give the "
                            f"finished run's result, or pass {ALLOW_FLAG} to read it as it is")
        return
    if (run / "config.json").exists():
        require_finished(run, what, allow)
