"""Which study a study folder holds, and the outputs of stages its study file no longer has.

A study folder holds one study, known by its ``name`` (the study file's name without ``.yaml`` when it
has none); ``state.json`` records it with the study file and its sha256. Another study is refused
before anything is written (:func:`check_same_study`). A stage recorded in ``state.json`` that the
study file no longer has (a family, a layer, a layer matrix dropped) has its outputs moved to
``STUDY/removed/<path>``, kept but out of the report's way (:func:`retire_dropped_stages`).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from analysis.study_layout import (
    ALIASES_FILE,
    FEATURES,
    FIGURES,
    REPORT_HTML,
    REPORT_MD,
    STUDY_FILE,
    family_dir,
    layer_matrix_features,
)
from common.errors import UserError
from common.files import read_json, write_json
from common.provenance import now_utc, sha256_file
from studies.cache import STATE_FILE, Stage, StudyState, folder_study, retire_outputs
from studies.layer_matrix import EXTRACT_STAGE
from studies.spec import Study
from training.manifest import read_manifest


def study_identity(study: Study, study_file: str | os.PathLike) -> dict[str, Any]:
    """Which study this is, as ``state.json`` records it: its name, its file and the file's sha256."""
    return {"name": study.name, "study_file": str(Path(study_file).resolve()),
            "spec_sha256": sha256_file(study_file)}


def record_study(root: Path, study: Study, study_file: str | os.PathLike, log: Callable[[str], None]) -> None:
    """Record in ``state.json`` that ``root`` holds this study (saying so when its file moved)."""
    held = folder_study(root)
    if held and held.get("study_file") and held["study_file"] != str(Path(study_file).resolve()):
        log(f"  {root} holds the study {study.name!r} run from {held['study_file']}: resuming it from {study_file}")
    StudyState(root).record_study(study_identity(study, study_file))


def check_same_study(root: Path, study: Study, study_file: str | os.PathLike) -> None:
    """Refuse ``root`` unless it is missing, empty or holds this study (same ``name``; a folder too old
    to say is taken as this study): running another study there would replace part of it and mix the
    two in the report."""
    if not root.is_dir() or not any(root.iterdir()):
        return
    if not ((root / STATE_FILE).exists() or (root / STUDY_FILE).exists()):
        raise UserError(f"{root} exists, is not empty and holds no study ({STATE_FILE} missing); choose another "
                        f"--out_dir or pass --overwrite to replace its contents")
    held = folder_study(root)
    if held and held["name"] != study.name:
        raise UserError(f"{root} holds the study {held['name']!r} (study file {held.get('study_file') or 'unknown'}), "
                        f"not {study.name!r} ({study_file}); running {study.name!r} there would replace part of "
                        f"{held['name']!r} and mix the two in the report. Choose another --out_dir, or pass "
                        f"--overwrite to delete {held['name']!r} and start over. (A study is known by its name: "
                        f"the study file's `name`, else its file name without .yaml.)")


def dropped_stages(state: StudyState, stages: Sequence[Stage]) -> list[str]:
    """Stages recorded in ``state.json`` that the study file no longer has."""
    names = {s.name for s in stages}
    return [n for n in state.data["stages"] if n not in names]


def recorded_outputs(root: Path, name: str, entry: dict[str, Any]) -> list[Path]:
    """The outputs of stage ``name`` as its ``state.json`` entry records them, else (an entry written
    before outputs were recorded) where the study folder's layout places that stage's outputs."""
    if "outputs" in entry:
        return [root / p for p in entry["outputs"]]
    if name.startswith("train/"):
        return [family_dir(root, name.partition("/")[2])]
    by_name = {"extract": [root / FEATURES], EXTRACT_STAGE: [layer_matrix_features(root)],
               "report": [root / FIGURES, root / REPORT_HTML, root / REPORT_MD]}
    return by_name.get(name, [root / name])    # consistency|similarity|diagnosis/<layer>, layer_matrix/<A>__<B>


def retire_dropped_stages(root: Path, stages: Sequence[Stage], log: Callable[[str], None]) -> None:
    """Move the outputs of the stages the study file no longer has to ``STUDY/removed/`` (so that
    neither the report nor the summary shows them) and forget those stages; a dropped family's
    members leave ``aliases.json`` too."""
    state = StudyState(root)
    kept = {p for s in stages for p in s.out_paths}        # never move what a stage of the study writes
    for name in dropped_stages(state, stages):
        if name.startswith("train/"):
            _drop_aliases(root, name.partition("/")[2])
        paths = [p for p in recorded_outputs(root, name, state.get(name)) if p not in kept]
        moved = retire_outputs(root, paths)
        state.drop(name, removed_utc=now_utc(), moved_to=[str(p.relative_to(root)) for p in moved])
        where = ", ".join(str(p.relative_to(root)) for p in moved) or "nothing to move"
        log(f"  {name}: no longer in the study file; outputs moved to {where}")


def _drop_aliases(root: Path, kind: str) -> None:
    path = root / ALIASES_FILE
    if not path.exists():
        return
    try:
        names = {m.name for m in read_manifest(family_dir(root, kind) / "family.json")}
    except UserError:
        return
    body = read_json(path)
    body["aliases"] = {k: v for k, v in body.get("aliases", {}).items() if k not in names}
    write_json(path, body)


def write_study_json(root: Path, study: Study, study_file: str | os.PathLike) -> None:
    """``study.json``: the study as it was last run into ``root`` (what ``report`` reads of it)."""
    write_json(root / STUDY_FILE, {"name": study.name, "description": study.description,
                                   "study_file": str(Path(study_file).resolve()),
                                   "data": asdict(study.data), "train": asdict(study.train),
                                   "members": study.members, "extract": asdict(study.extract),
                                   "transnet": study.transnet, "pairs": [asdict(p) for p in study.pairs],
                                   "pair_layers": list(study.pair_layers), "baselines": list(study.baselines),
                                   **({"layer_matrix": asdict(study.layer_matrix)} if study.layer_matrix else {}),
                                   "diagnose": list(study.diagnose or []), "updated_utc": now_utc()})
