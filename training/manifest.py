"""The family manifest ``family.json``: the members of a network family, so ``extract`` and the
analysis can take a whole family at once.

    {"schema": "kc-family", "schema_version": 1, "family": "born-again", "created_utc": "...",
     "config": {...}, "members": [
        {"name": "ban_g0", "checkpoint": "g0/best.pt", "sha256": "...", "role": "generation",
         "generation": 0, "teacher": null, "arch": "vgg_small", "metrics": {"test_top1": 81.2}}, ...]}

Checkpoint paths are stored relative to the manifest's folder (so a study folder can move) and
resolved to absolute paths by :func:`read_manifest`.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import read_json, write_json
from common.provenance import now_utc, sha256_file
from common.ranges import name_problem

SCHEMA = "kc-family"
SCHEMA_VERSION = 1
ROLES = ("seed", "teacher", "student", "generation", "slim", "original", "compressed")


@dataclass(frozen=True)
class Member:
    name: str
    checkpoint: str
    role: str
    generation: int | None = None
    teacher: str | None = None          # name of the teacher member, if any
    arch: str | None = None
    sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def write_manifest(out_dir: str | os.PathLike, family: str, members: list[Member],
                   config: dict[str, Any] | None = None) -> Path:
    out = Path(out_dir)
    names = [m.name for m in members]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate member names {dup}")
    rows = []
    for m in members:
        why = name_problem(m.name)
        if why:
            raise UserError(f"member name {m.name!r} {why}")
        if m.role not in ROLES:
            raise ValueError(f"unknown role {m.role!r}; valid: {ROLES}")
        ck = Path(m.checkpoint)
        sha = m.sha256 or (sha256_file(ck) if ck.is_file() else None)
        rel = os.path.relpath(ck.resolve(), out.resolve()) if ck.is_absolute() or ck.exists() else str(ck)
        rows.append({**asdict(m), "checkpoint": rel, "sha256": sha})
    path = out / "family.json"
    write_json(path, {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "family": family,
                      "created_utc": now_utc(), "config": config or {}, "members": rows})
    return path


def read_manifest(path: str | os.PathLike) -> list[Member]:
    """Members with absolute checkpoint paths. Accepts the file or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "family.json"
    body = read_json(path)
    if not isinstance(body, dict) or body.get("schema") != SCHEMA or str(body.get("schema_version")) != str(SCHEMA_VERSION):
        raise UserError(f"{path} is not a {SCHEMA} v{SCHEMA_VERSION} manifest (its 'schema' and 'schema_version' "
                        f"must be {SCHEMA!r} and {SCHEMA_VERSION})")
    rows = body.get("members")
    if not isinstance(rows, list):
        raise UserError(f"{path}: 'members' must be a list of members, got {type(rows).__name__}")
    known = {f.name for f in fields(Member)}
    out = []
    for i, row in enumerate(rows):
        where = f"{path}: members[{i}]"
        if not isinstance(row, dict):
            raise UserError(f"{where} must be a mapping, got {row!r}")
        missing = [k for k in ("name", "checkpoint", "role") if not isinstance(row.get(k), str) or not row.get(k)]
        if missing:
            raise UserError(f"{where} lacks {', '.join(repr(k) for k in missing)} (a non-empty string each)")
        unknown = sorted(set(row) - known)
        if unknown:
            raise UserError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; valid: {', '.join(sorted(known))}")
        why = name_problem(row["name"])
        if why:
            raise UserError(f"{where}: name {row['name']!r} {why}")
        ck = Path(row["checkpoint"])
        if not ck.is_absolute():
            ck = (path.parent / ck).resolve()
        out.append(Member(**{**row, "checkpoint": str(ck)}))
    return out
