"""The stage cache of a study: each stage's key is a content hash of what it reads; ``state.json``
records key, status and times; :func:`stage_mode` decides skip / resume / redo."""
from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.study_layout import STATE_FILE  # noqa: F401  (re-exported: the layout has one owner)
from common.files import read_json, write_json


@dataclass
class Stage:
    name: str
    key: Callable[[], dict[str, Any]]          # what the stage reads; hashed into its cache key
    run: Callable[[str], None]                 # run(mode): mode is new | resume | overwrite
    outputs_ok: Callable[[], bool]             # outputs present and complete
    out_paths: tuple[Path, ...] = ()           # removed before a changed stage is redone
    reads_outputs: bool = False                # the key hashes upstream outputs (member checkpoints)
    independent: bool = False                  # the key reads the study file only (no upstream stage)
    dist_run: Callable[[str], None] | None = None   # under torchrun, run on every rank (else rank 0 runs ``run``)


class StudyState:
    """``state.json``: per stage its key, status (running | done), times."""

    def __init__(self, root: Path):
        self.path = root / STATE_FILE
        self.data: dict[str, Any] = read_json(self.path) if self.path.exists() else {"stages": {}}

    def get(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def set(self, name: str, **values: Any) -> None:
        self.data["stages"][name] = {**self.get(name), **values}
        write_json(self.path, self.data)


def stage_mode(prev: dict[str, Any], key: str, outputs_ok: bool, has_outputs: bool) -> str:
    """What to do with a stage: skip | resume | overwrite | new (pure, tested)."""
    same = prev.get("key") == key
    if same and prev.get("status") == "done" and outputs_ok:
        return "skip"
    if same and has_outputs:
        return "resume"
    return "overwrite" if has_outputs else "new"


def outputs_exist(paths: Sequence[Path]) -> bool:
    return any(p.exists() and (p.is_file() or any(p.iterdir())) for p in paths)


def remove_outputs(paths: Sequence[Path]) -> None:
    from features.shards import shard_files

    for p in paths:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        if p.suffix == ".h5":                   # torchrun shard files beside a feature file
            for shard in shard_files(p):
                shard.unlink()
