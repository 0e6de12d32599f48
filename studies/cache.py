"""The stage cache of a study: each stage's key is a content hash of what it reads; ``state.json``
records key, status, times and outputs of each stage, and which study the folder holds;
:func:`stage_mode` decides skip / resume / redo; :func:`retire_outputs` moves the outputs of a stage
that the study file no longer has out of the report's way (into ``STUDY/removed/``)."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.study_layout import (  # REMOVED, STATE_FILE re-exported: the layout has one owner
    REMOVED,
    STATE_FILE,
    STUDY_FILE,
)
from common.errors import UserError
from common.files import read_json, write_json
from common.provenance import sha256_json


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
    reads_data: bool = False                   # reads the data set's images: redone when they change (data_source)


class StudyState:
    """``state.json``: per stage its key, status (running | done), times and outputs (paths relative to
    the study folder); ``study``: which study the folder holds (:func:`folder_study`); ``removed``: the
    stages dropped from the study file, with where their outputs went."""

    def __init__(self, root: Path):
        self.path = root / STATE_FILE
        self.data: dict[str, Any] = read_json(self.path) if self.path.exists() else {"stages": {}}

    def record_study(self, identity: dict[str, Any]) -> None:
        self.data["study"] = identity
        write_json(self.path, self.data)

    def drop(self, name: str, **values: Any) -> None:
        """Forget stage ``name`` (it left the study file); keep its last entry under ``removed``."""
        entry = self.data["stages"].pop(name, {})
        self.data.setdefault("removed", {})[name] = {**entry, **values}
        write_json(self.path, self.data)

    def get(self, name: str) -> dict[str, Any]:
        return self.data["stages"].get(name, {})

    def set(self, name: str, **values: Any) -> None:
        self.data["stages"][name] = {**self.get(name), **values}
        self.data.get("removed", {}).pop(name, None)       # a stage added back to the study file
        write_json(self.path, self.data)


def stage_mode(prev: dict[str, Any], key: str, outputs_ok: bool, has_outputs: bool) -> str:
    """What to do with a stage: skip | resume | overwrite | new (pure, tested)."""
    same = prev.get("key") == key
    if same and prev.get("status") == "done" and outputs_ok:
        return "skip"
    if same and has_outputs:
        return "resume"
    return "overwrite" if has_outputs else "new"


def data_source(data: Any, splits: Sequence[str]) -> str | None:
    """A hash of what the study's data set is read from (``IndexedDataset.source_fingerprint``: files'
    sizes and modification times, or an in-memory set's pixels) over ``splits`` (those that exist);
    None when it cannot be read here or does not say. Recorded beside each data-reading stage's key,
    not in it, so that folders from before it was recorded keep their cache."""
    from training.data import build_dataset

    found = {}
    for split in splits:
        try:
            found[split] = build_dataset(data, split).source_fingerprint()
        except UserError:
            if split == "train":
                return None
    return None if not found or None in found.values() else sha256_json(found)


def seen_before(prev: dict[str, Any], stage: Stage, source: str | None) -> dict[str, Any]:
    """``prev`` (a stage's ``state.json`` entry) as :func:`stage_mode` should see it: a stage that reads
    the images, recorded with other images than ``source``, counts as one whose key changed."""
    if stage.reads_data and source is not None and prev.get("data_source") not in (None, source):
        return {**prev, "key": None}
    return prev


def folder_study(root: Path) -> dict[str, Any] | None:
    """Which study ``root`` holds: ``{"name", "study_file", ...}`` as ``state.json`` records it, else (a
    folder from before the state recorded it) the name and file in ``study.json``; None when neither
    says (no study there, or one too old to tell: taken as the study being run)."""
    for path, get in ((root / STATE_FILE, lambda b: b.get("study")),
                      (root / STUDY_FILE, lambda b: b if b.get("name") else None)):
        if path.is_file():
            try:
                found = get(read_json(path))
            except (UserError, AttributeError):
                continue
            if found:
                return {"name": str(found["name"]), "study_file": found.get("study_file")}
    return None


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


def retire_outputs(root: Path, paths: Sequence[Path]) -> list[Path]:
    """Move ``paths`` (inside ``root``, with their torchrun shard files) to ``root/removed/<same path>``,
    replacing what an earlier removal left there; returns where they went."""
    from features.shards import shard_files

    moved = []
    for p in paths:
        for src in [p, *(shard_files(p) if p.suffix == ".h5" else [])]:
            if not src.exists():
                continue
            dest = root / REMOVED / src.relative_to(root)
            remove_outputs([dest])
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            moved.append(dest)
    return moved
