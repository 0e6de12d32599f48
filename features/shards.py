"""Row shards of a torchrun extraction and their join.

Rank r of K extracts rows ``[lo_r, hi_r)`` of every split (:func:`shard_rows`, cut on the batch grid so
every batch holds the same images as in a single-process run) into ``<stem>.rank<r>of<K>.h5`` beside
the output (:func:`shard_path`). Rank 0 then writes the output file with the real ``index``/``label``
datasets and each feature dataset as an h5py *virtual dataset* over the shards (:func:`join_shards`).
The shard files hold the data and must stay beside the output file (moving the folder as a whole is
fine); a missing shard is detected by the reader. The join's ``nonfinite`` count is the sum of the
shards' counts, its ``max_abs`` their maximum.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from features import store
from features.nets import FeatureData
from features.nonfinite import joined_counts
from features.targets import Target, prepare_root


def shard_rows(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``: contiguous, tiling ``[0, n)`` without overlap or padding, cut
    on the batch grid (so each batch holds the same images as in a one-process run)."""
    nb = math.ceil(n / batch_size)
    lo = min(n, batch_size * (nb * rank // world))
    hi = min(n, batch_size * (nb * (rank + 1) // world))
    return lo, hi


def shard_path(out: str | os.PathLike, rank: int, world: int) -> Path:
    """The shard file of rank ``rank`` of ``world`` beside ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{rank}of{world}{out.suffix or '.h5'}")


def shard_files(out: str | os.PathLike) -> list[Path]:
    """The shard files of ``out`` that exist (any world size)."""
    out = Path(out)
    pat = re.compile(re.escape(out.stem) + r"\.rank\d+of\d+" + re.escape(out.suffix or ".h5") + "$")
    return sorted(p for p in out.parent.glob(f"{out.stem}.rank*of*") if pat.match(p.name)) if out.parent.is_dir() else []


def join_shards(out: Path, data: FeatureData, splits, n_rows: dict[str, int], targets: Sequence[Target],
                todo: set[str], batch_size: int, world: int, command: str) -> list[Path]:
    """Rank 0: write ``out`` with real index/label datasets and virtual feature datasets over the shards."""
    shards = [shard_path(out, r, world) for r in range(world)]
    bounds = {s: [shard_rows(n_rows[s], batch_size, r, world) for r in range(world)] for s in splits}
    opened = [store.open_features(p, "r") for p in shards]
    try:
        with store.open_features(out, "a") as f:
            prepare_root(f, data, command)
            for s in splits:
                idx = np.concatenate([store.read_index(g, s) for g in opened])
                lab = np.concatenate([store.read_labels(g, s) for g in opened])
                store.init_split(f, s, idx, lab)
            for t in targets:
                if t.path not in todo:
                    continue
                attrs = store.attrs_dict(opened[0][t.path])
                complete = all(store.dataset_progress(g[t.path]).complete for g in opened)
                attrs["shards"] = [p.name for p in shards]
                counts = joined_counts([g[t.path] for g in opened])       # summed over the shards
                for key in ("nonfinite", "max_abs"):
                    attrs.pop(key, None)
                if counts is not None:
                    attrs.update({"nonfinite": counts.nonfinite, "max_abs": counts.max_abs})
                sources = [(p.name, lo, hi) for p, (lo, hi) in zip(shards, bounds[t.split])]
                ds = store.create_virtual_features(f, t.split, t.net, t.layer, sources, t.shape, t.dtype, attrs)
                if complete:                  # every shard complete: so is the join (rows_done = N)
                    store.mark_complete(ds)
    finally:
        for g in opened:
            g.close()
    return shards
