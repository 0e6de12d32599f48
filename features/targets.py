"""The file plan: which datasets ``/<split>/<net>/<layer>`` an extraction writes (:class:`Target`, with
the identity that decides whether a stored dataset is "the same extraction"), and what to do with the
ones the output file already holds.

Output file policy (``mode``)
- ``auto`` (no flag): a new file is created; an existing one is accepted only if the request adds
  datasets it does not hold yet (new nets, layers or splits; appended, nothing re-extracted). A request
  naming a dataset the file already holds is refused (use ``resume`` or ``overwrite``).
- ``resume``: requested datasets that are complete are skipped, incomplete ones continue at
  ``rows_done``, absent ones are added. A dataset made by another extraction is refused with the
  differing field named (its identity: checkpoint sha256, arch, layer, node, point, dtype, autocast,
  effective precision, transform, data set spec; batch size, device, the asked precision and the
  command line may differ). A file written before precisions were recorded has the effective
  precision of its arithmetic then: bf16 under autocast, tf32 on CUDA (cuDNN's default), else fp32.
- ``overwrite``: the file (and its shard files) are replaced (by the caller, before planning).

A file holds one set of images: its root attributes (transform, data set spec) must match the request.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import torch

from common.device import effective_precision
from common.errors import UserError
from common.files import jsonable
from common.provenance import code_version, now_utc
from features import store
from features.layers import LayerPoint
from features.nets import FeatureData, Net
from features.nonfinite import ValueCounts, write_counts


@dataclass
class Target:
    """One dataset ``/<split>/<net>/<layer>`` of the output file."""

    split: str
    net: str
    layer: str
    shape: tuple[int, ...]          # full split: (N, ...)
    dtype: str
    identity: dict[str, Any]
    provenance: dict[str, Any]
    compression: str | None = None
    checksum: bool = True           # HDF5's fletcher32 filter on every chunk (row)

    @property
    def path(self) -> str:
        return f"{self.split}/{self.net}/{self.layer}"


def _canon(v: Any) -> str:
    if isinstance(v, str) and v[:1] in "{[":
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            pass
    return json.dumps(jsonable(v), sort_keys=True)


def stored_precision(attrs: dict[str, Any]) -> str:
    """The effective precision of a stored dataset: its ``precision_effective`` attribute or, in a file
    written before it was recorded, what the extraction computed in then (bf16 autocast, cuDNN's
    default TF32 on CUDA, else float32)."""
    if attrs.get("precision_effective"):
        return str(attrs["precision_effective"])
    if attrs.get("autocast") == "bfloat16":
        return "bf16"
    return "tf32" if str(attrs.get("device", "")).startswith("cuda") else "fp32"


def identity_diff(have: dict[str, Any], want: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Identity fields that differ between a dataset's attributes and a new request."""
    have = {**have, "precision_effective": stored_precision(have)} if "precision_effective" in want else have
    return [(k, have.get(k), v) for k, v in want.items() if _canon(have.get(k)) != _canon(v)]


def describe_conflict(path: str, fname: str, diff: list[tuple[str, Any, Any]]) -> str:
    """The refusal of a stored dataset that another extraction made (up to three differing fields)."""
    parts = []
    for k, old, new in diff[:3]:
        o, n = (str(old), str(new))
        if len(o) > 60 or len(n) > 60:
            o, n = o[:60] + "...", n[:60] + "..."
        parts.append(f"{k}: file has {o!r}, this request {n!r}")
    return (f"{fname} holds /{path} from another extraction ({'; '.join(parts)}); pass --overwrite to replace the "
            f"file, or write to another --out")


def check_root(f: h5py.File, data: FeatureData) -> None:
    """Refuse a file that holds features of another data set or transform."""
    have = store.attrs_dict(f)
    checks = {"transform": data.transform}
    if "dataset_spec" in have:
        checks["dataset_spec"] = data.spec
    else:
        checks["dataset"] = data.name
    diff = identity_diff(have, checks)
    if diff:
        k, old, new = diff[0]
        raise UserError(f"{f.filename} holds features of another data set or transform ({k}: file has {old!r}, this "
                        f"request {new!r}); one feature file holds one set of images: write to another --out")


def prepare_root(f: h5py.File, data: FeatureData, command: str) -> None:
    """Write the root attributes of a new file; check those of an existing one."""
    if store.SCHEMA_ATTR in f.attrs:
        check_root(f, data)
        return
    store.init_root(f, data.name, data.transform, data.image_size, command)
    f.attrs["dataset_spec"] = json.dumps(data.spec, sort_keys=True)


def plan_file(f: h5py.File, targets: Sequence[Target], mode: str, create: bool = True) -> dict[str, int]:
    """Decide, per target, the first row still to write (its ``shape[0]`` when complete, so nothing to do).
    Conflicts are refused as described in the module doc before anything is changed; then, with
    ``create``, absent targets are created (pre-allocated) by :func:`create_targets`."""
    starts: dict[str, int] = {}
    conflicts = []
    for t in targets:
        if t.path in f:
            ds = f[t.path]
            if not isinstance(ds, h5py.Dataset):
                raise UserError(f"{f.filename}: /{t.path} is not a dataset")
            have = store.attrs_dict(ds)
            diff = identity_diff(have, t.identity)
            if tuple(ds.shape) != tuple(t.shape):
                diff.append(("shape", tuple(ds.shape), tuple(t.shape)))
            if diff:
                raise UserError(describe_conflict(t.path, f.filename, diff))
            progress = store.dataset_progress(ds)
            if mode == "auto":
                conflicts.append(f"/{t.path} ({progress})")
                continue
            if progress.complete:
                starts[t.path] = progress.rows
            elif ds.is_virtual:
                raise UserError(f"{f.filename}: /{t.path} is an incomplete join of shard files; resume it with "
                                f"torchrun and the same number of processes that wrote it")
            else:
                starts[t.path] = progress.rows_done
        else:
            starts[t.path] = 0
    if conflicts:
        more = f" and {len(conflicts) - 3} more" if len(conflicts) > 3 else ""
        raise UserError(f"{f.filename} already holds {', '.join(conflicts[:3])}{more}; pass --resume to continue "
                        f"(complete datasets are skipped) or --overwrite to replace the file. A request that only "
                        f"adds nets, layers or splits is appended without a flag")
    if create:
        create_targets(f, targets)
    return starts


def create_targets(f: h5py.File, targets: Sequence[Target]) -> None:
    """Create the targets the file does not hold yet: pre-sized, pre-allocated, marked incomplete."""
    for t in targets:
        if t.path not in f:
            ds = store.create_features(f, t.split, t.net, t.layer, t.shape, t.dtype, {**t.identity, **t.provenance},
                                       compression=t.compression, preallocate=True, checksum=t.checksum)
            write_counts(ds, ValueCounts())      # no rows yet: nothing non-finite
            if t.shape[0] == 0:        # an empty shard: nothing to write
                store.mark_complete(ds)



def build_targets(nets: Sequence[Net], data: FeatureData, splits: Sequence[str],
                  points: dict[str, list[LayerPoint]], shapes: dict[str, dict[str, tuple[int, ...]]],
                  rows: dict[str, int], dtype: str, compression: str, precision: str, device: torch.device,
                  command: str, extra: dict[str, dict[str, dict[str, Any]]] | None = None) -> list[Target]:
    """Every ``/<split>/<net>/<point>`` of a request over the full splits (``rows`` per split): layer
    features in ``dtype``, logits in float32, computed in ``precision`` (asked; ``precision_effective``
    is what ``device`` makes of it, and ``autocast`` "bfloat16" or "none" as before). ``extra[net][point]``:
    attributes of a converted layer output (``point: "tokens->grid"``, ``grid``, ``prefix_tokens``), part of
    its identity."""
    code = code_version()
    effective = effective_precision(device, precision)
    autocast_tag = "bfloat16" if effective == "bf16" else "none"
    out = []
    for split in splits:
        for n in nets:
            for p in points[n.name]:
                dt = "float32" if p.point == "logits" else dtype
                identity = {"checkpoint_sha256": n.sha256, "arch": n.arch, "layer": p.name, "node": p.node,
                            "point": p.point, "dtype": dt, "autocast": autocast_tag, "precision_effective": effective,
                            "transform": data.transform, "dataset_spec": data.spec,
                            **((extra or {}).get(n.name, {}).get(p.name, {}))}
                prov = {"checkpoint": n.checkpoint, "net": n.name, "num_classes": n.num_classes,
                        "command": command, "code_version": code, "created_utc": now_utc(),
                        "torch_version": str(torch.__version__), "device": str(device),
                        "compression": compression, "precision": precision, **n.provenance}
                comp = None if compression == "none" else compression
                if p.conv_layer is not None:
                    prov["conv_layer"] = p.conv_layer
                out.append(Target(split, n.name, p.name, (rows[split],) + tuple(shapes[n.name][p.name]), dt,
                                  identity, prov, comp))
    return out


def open_output(path: Path, data: FeatureData, command: str) -> h5py.File:
    """Open (or create) the file this process writes, its root attributes set or checked."""
    f = store.open_features(path, "a")
    try:
        prepare_root(f, data, command)
    except BaseException:
        f.close()
        raise
    return f


def plan_joined(out: Path, targets: Sequence[Target], mode: str) -> tuple[set[str], list[str]]:
    """Under torchrun: which requested datasets the joined output still needs (checked, read-only)."""
    todo = {t.path for t in targets}
    skipped: list[str] = []
    if not out.exists():
        return todo, skipped
    with store.open_features(out, "r") as f:
        conflicts = []
        for t in targets:
            if t.path not in f:
                continue
            ds = f[t.path]
            diff = identity_diff(store.attrs_dict(ds), t.identity)
            if diff:
                raise UserError(describe_conflict(t.path, f.filename, diff))
            if mode == "auto":
                conflicts.append(f"/{t.path}")
            elif store.dataset_progress(ds).complete:
                todo.discard(t.path)
                skipped.append(t.path)
        if conflicts:
            raise UserError(f"{out} already holds {', '.join(conflicts[:3])}; pass --resume to continue or "
                            f"--overwrite to replace it")
    return todo, skipped
