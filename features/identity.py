"""Is this the net we think it is? Nets are matched by the sha256 of their checkpoint, not by name.

A feature dataset records the ``checkpoint_sha256`` of the net it came from; a family manifest records
each member's checkpoint sha256; a Trans-Net records the provenance of the features it was fitted on
(``feature_provenance``: file, root attributes such as ``created_utc``, and each side's checkpoint sha256).
These helpers compare two such records and say what differs; a record without a sha256 (features
from another tool) falls back to comparing names. ``refine``, ``variance``, ``diagnose``,
``visualize`` and ``consistency --family`` refuse a mismatch unless ``--allow_other_checkpoints``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from common.errors import UserError
from features.store import get_features, open_features, provenance_of

ALLOW_FLAG = "--allow_other_checkpoints"


def _short(sha: Any) -> str:
    return f"sha256 {str(sha)[:12]}..."


def mismatch(what: str, want: Mapping[str, Any], have: Mapping[str, Any], want_name: str, have_name: str) -> str | None:
    """Why ``have`` (a net's provenance) is not the net ``want`` records, or None when it is. Both carry
    ``checkpoint_sha256`` (and ``checkpoint``) when known."""
    ws, hs = want.get("checkpoint_sha256"), have.get("checkpoint_sha256")
    if ws and hs:
        if str(ws) == str(hs):
            return None
        return (f"{what}: {have_name!r} comes from {have.get('checkpoint') or '?'} ({_short(hs)}), not from "
                f"{want.get('checkpoint') or '?'} ({_short(ws)}) as recorded for {want_name!r}")
    if want_name != have_name:
        return f"{what}: {have_name!r} is not {want_name!r} and no checkpoint sha256 is recorded to tell them apart"
    return None


def refuse_mismatches(problems: Sequence[str], allow: bool, fix: str) -> None:
    """Raise one UserError listing ``problems`` (unless ``allow``)."""
    if problems and not allow:
        raise UserError("; ".join(problems) + f". {fix}, or pass {ALLOW_FLAG} to go on anyway")


def dataset_provenance(features: str | os.PathLike, split: str, net: str, layer: str) -> dict[str, Any]:
    """The provenance of ``/<split>/<net>/<layer>`` (attributes and the file's root attributes)."""
    with open_features(features) as f:
        return provenance_of(get_features(f, split, net, layer))


# --------------------------------------------------------------------------- Trans-Nets

def fitted_nets(info: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"source": provenance, "target": provenance}`` of the features a Trans-Net was fitted on (its
    training split; an imported Trans-Net records the split it was checked on)."""
    fp = info.get("feature_provenance") or {}
    for key in ("train", *sorted(fp)):
        if isinstance(fp.get(key), dict) and fp[key]:
            return {k: dict(v or {}) for k, v in fp[key].items()}
    return {}


def check_transnet_features(info: Mapping[str, Any], features: str | os.PathLike, split: str, *,
                            source: str | None = None, target: str | None = None,
                            target_features: str | os.PathLike | None = None, allow: bool = False,
                            what: str = "") -> None:
    """Refuse to apply a Trans-Net to features of other nets than it was fitted on: the source and
    target datasets at its layer must come from the recorded checkpoints (by sha256)."""
    rec = fitted_nets(info)
    src, tgt = source or info["source"], target or info["target"]
    problems = []
    layers = {"source": info["layer"], "target": info.get("target_layer") or info["layer"]}   # cross-layer fits
    for which, name, path in (("source", src, features), ("target", tgt, target_features or features)):
        have = dataset_provenance(path, split, name, layers[which])
        why = mismatch(f"the {which} features in {path}", rec.get(which, {}), have, info[which], name)
        if why:
            problems.append(why)
    refuse_mismatches([f"{what or 'Trans-Net ' + str(info.get('path'))} maps {info['source']} -> {info['target']}; "
                       + problems[0], *problems[1:]] if problems else [], allow,
                      "Give the features of the nets it was fitted on")


# --------------------------------------------------------------------------- families

def check_family_features(members: Sequence[Any], features: str | os.PathLike, split: str, layer: str,
                          allow: bool = False, family: str = "") -> None:
    """Each family member (``name``, ``sha256``, ``checkpoint``) must be the net of that name in the
    feature file (same checkpoint sha256), not merely a net with the same name."""
    from common.provenance import sha256_file

    problems = []
    for m in members:
        want = {"checkpoint": m.checkpoint,
                "checkpoint_sha256": m.sha256 or (sha256_file(m.checkpoint) if os.path.isfile(m.checkpoint) else None)}
        have = dataset_provenance(features, split, m.name, layer)
        why = mismatch(f"family {family} member", want, have, m.name, m.name)
        if why:
            problems.append(f"{why} (in {features})")
    refuse_mismatches(problems, allow, f"Extract the family's own checkpoints (python cli.py extract --family {family})")
