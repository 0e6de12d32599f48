"""The extraction engine: activations of several nets at several layers, same images, same order, in
one pass over the data, streamed into a ``kc-features`` v1 file (see ``features/store.py``).

    python cli.py extract --nets seed0=runs/s0/best.pt seed5=runs/s5/best.pt --conv_layer 30 \\
        --split train,test --out features.h5
    torchrun --nproc_per_node=4 cli.py extract ...          # each rank a contiguous shard, joined by rank 0

How it works
- Every net is rewritten by torch.fx into an extractor that returns the requested points and stops
  after the last one (``features/layers.py``). Each batch of the eval-transformed data set (no
  shuffle, no augmentation) goes through every net once; the outputs are cast to the storage dtype,
  copied to (pinned) host memory and handed through a bounded queue to a writer thread, so compute and
  HDF5 writes overlap and memory does not grow with the number of images.
- Datasets are pre-sized and pre-allocated (one sample per chunk, no compression by default).
  ``rows_done`` is raised only after the rows it covers were flushed, at most every ``flush_s``
  seconds, and ``complete`` is set when the last row lands. A killed process therefore leaves a
  readable file marked incomplete.

Output file policy (``mode``)
- ``auto`` (no flag): a new file is created; an existing one is accepted only if the request adds
  datasets it does not hold yet (new nets, layers or splits; appended, nothing re-extracted). A request
  naming a dataset the file already holds is refused (use ``resume`` or ``overwrite``).
- ``resume``: requested datasets that are complete are skipped, incomplete ones continue at
  ``rows_done``, absent ones are added. A dataset made by another extraction is refused with the
  differing field named (its identity: checkpoint sha256, arch, layer, node, point, dtype, autocast,
  transform, data set spec; batch size, device and the command line may differ).
- ``overwrite``: the file (and its shard files) are replaced.

Sharding (``torchrun``): rank r extracts rows ``[lo_r, hi_r)``, cut on the batch grid so every batch
holds the same images as in a single-process run, into ``<stem>.rank<r>of<K>.h5`` beside the output;
rank 0 then writes the output file with the real ``index``/``label`` datasets and each feature dataset
as an h5py *virtual dataset* over the shards. The shard files hold the data and must stay beside the
output file (moving the folder as a whole is fine); a missing shard is detected by the reader.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import h5py
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from common.checkpoints import load_checkpoint
from common.device import autocast, resolve_device
from common.distributed import ControlGroup, DistInfo, dist_from_env
from common.errors import UserError
from common.faults import fault_point
from common.files import jsonable
from common.progress import progress
from common.provenance import code_version, now_utc, sha256_file
from common.registry import unknown_choice_message
from features import store
from features.layers import (
    LOGITS,
    FeatureExtractor,
    LayerPoint,
    build_extractor,
    check_against_hooks,
    output_shapes,
    resolve_layer,
)
from training.data import build_dataset, transform_spec
from training.datasets import DataSpec
from training.loop import make_loader
from training.models import model_from_checkpoint

RESERVED_NAMES = ("index", "label")
KILL_EXIT_CODE = 75            # exit status of the simulated kill (--max_batches)


@dataclass(frozen=True)
class ExtractConfig:
    """Options of one extraction (the CLI's defaults)."""

    split: str = "train,test"        # comma-separated splits
    dtype: str = "float16"           # float16 | float32 storage of the layer features (logits: float32)
    batch_size: int = 64
    device: str = "auto"             # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
    num_workers: int = 0             # data-loader worker processes
    amp: bool = False                # bf16 autocast on CUDA (recorded; changes the values slightly)
    channels_last: bool = False      # channels_last memory format on CUDA
    logits: bool = False             # also store /<split>/<net>/logits
    limit: int = 0                   # extract only the first N rows of every split (0: all)
    compression: str = "none"        # none | lzf | gzip (none: lzf is 16x slower and saves nothing here)
    queue_batches: int = 4           # batches in flight between the compute and the writer thread
    flush_s: float = 1.0             # raise rows_done (after a flush) at most every this many seconds


DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "lzf", "gzip")


# --------------------------------------------------------------------------- nets and data

@dataclass
class Net:
    """One net to extract from: a built model plus what identifies it."""

    name: str
    model: nn.Module
    arch: str
    num_classes: int | None = None
    checkpoint: str = ""              # path; "" for an in-memory model (benchmarks)
    sha256: str = ""
    dataset: dict[str, Any] | None = None     # the checkpoint's DataSpec dict
    transform: dict[str, Any] | None = None
    input_size: int | None = None
    in_channels: int | None = None


def check_net_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or name in RESERVED_NAMES or name.strip() != name:
        raise UserError(f"net name {name!r} is not usable as an HDF5 group: no '/', not empty, not "
                        f"{' or '.join(RESERVED_NAMES)}, no surrounding spaces")


def load_net(name: str, checkpoint: str | os.PathLike, expect_sha256: str | None = None) -> Net:
    """Build a net from a workbench checkpoint (weights_only load); ``expect_sha256`` from a manifest."""
    check_net_name(name)
    path = Path(checkpoint)
    ckpt = load_checkpoint(path)
    sha = sha256_file(path)
    if expect_sha256 and expect_sha256 != sha:
        raise UserError(f"net {name!r}: {path} has sha256 {sha[:12]}..., the family manifest recorded "
                        f"{expect_sha256[:12]}...; the checkpoint changed since the manifest was written")
    model = model_from_checkpoint(ckpt, source=f"net {name!r} ({path})")
    tf = ckpt.get("transform") or None
    return Net(name=name, model=model.eval(), arch=str(ckpt.get("arch")), num_classes=ckpt.get("num_classes"),
               checkpoint=str(path.resolve()), sha256=sha, dataset=ckpt.get("dataset") or None, transform=tf,
               input_size=ckpt.get("input_size") or (tf or {}).get("image_size"),
               in_channels=ckpt.get("in_channels") or (tf or {}).get("channels"))


@dataclass
class FeatureData:
    """The images every net sees: one eval-transformed data set per split."""

    name: str                               # root attribute ``dataset``
    spec: dict[str, Any]                    # the DataSpec (root attribute ``dataset_spec``)
    transform: dict[str, Any]
    image_size: int
    channels: int
    num_classes: int
    splits: dict[str, Dataset]
    labels: dict[str, np.ndarray]           # per split, (N,) int64, N after --limit


DATA_FIELDS = [f.name for f in fields(DataSpec)]


def data_spec_for(nets: Sequence[Net], overrides: dict[str, Any]) -> DataSpec:
    """The data set all nets were trained on (from their checkpoints), with explicit overrides applied.
    Nets that disagree on a field nobody overrode are refused, the field and both values named."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(DATA_FIELDS))
    if unknown:
        raise ValueError(f"unknown data fields {unknown}")
    base: dict[str, Any] | None = None
    base_net = ""
    for n in nets:
        if n.dataset is None:
            if "name" not in overrides:
                raise UserError(f"net {n.name!r}: its checkpoint records no data set; pass --dataset (and "
                                f"--data_root, --transform, --image_size as needed)")
            continue
        d = {k: v for k, v in n.dataset.items() if k in DATA_FIELDS}
        if base is None:
            base, base_net = d, n.name
            continue
        for k in DATA_FIELDS:
            if k in overrides:
                continue
            if jsonable(d.get(k)) != jsonable(base.get(k)):
                raise UserError(f"nets disagree on the data set: {base_net!r} was trained with {k}={base.get(k)!r}, "
                                f"{n.name!r} with {k}={d.get(k)!r}; all nets of one feature file see the same "
                                f"images: extract them into separate files, or override --{_flag(k)} explicitly")
    merged = {**(base or {}), **overrides}
    return DataSpec(**{k: v for k, v in merged.items() if k in DATA_FIELDS})


def _flag(field_name: str) -> str:
    return "dataset" if field_name == "name" else field_name


def build_feature_data(spec: DataSpec, splits: Sequence[str], limit: int = 0) -> FeatureData:
    """Eval-transformed (never augmented) data sets of ``splits``; ``limit`` keeps the first rows."""
    t = transform_spec(spec)
    dss, labels = {}, {}
    num_classes = None
    for split in splits:
        ds = build_dataset(spec, split, train_transform=False)
        lab = getattr(ds, "labels", None)
        if lab is None:
            raise UserError(f"data set {spec.name!r} split {split!r} exposes no labels array")
        lab = np.asarray(lab, dtype=np.int64)
        if limit and limit > 0:
            lab = lab[:limit]
        if len(lab) == 0:
            raise UserError(f"data set {spec.name!r} split {split!r} is empty")
        dss[split], labels[split] = ds, lab
        num_classes = num_classes or int(ds.num_classes)
    return FeatureData(name=spec.name, spec=jsonable(asdict(spec)), transform=t.to_dict(), image_size=t.image_size,
                       channels=t.channels, num_classes=int(num_classes or 0), splits=dss, labels=labels)


def check_nets_fit_data(nets: Sequence[Net], data: FeatureData) -> None:
    """Nets trained on another class count, input size or channel count than the data set are refused."""
    for n in nets:
        if n.num_classes is not None and data.num_classes and int(n.num_classes) != data.num_classes:
            raise UserError(f"net {n.name!r} was trained on {n.num_classes} classes, but data set {data.name!r} "
                            f"(as given) has {data.num_classes}; extract it with the data set it was trained on "
                            f"(its checkpoint records {(n.dataset or {}).get('name')!r}, subset "
                            f"{(n.dataset or {}).get('subset')!r}) or check --dataset/--subset")
        if n.input_size is not None and int(n.input_size) != data.image_size:
            raise UserError(f"net {n.name!r} was trained on {n.input_size} px inputs, but the transform gives "
                            f"{data.image_size} px (--image_size / --transform); extract at the size it was trained on")
        if n.in_channels is not None and int(n.in_channels) != data.channels:
            raise UserError(f"net {n.name!r} takes {n.in_channels}-channel images, the data set gives "
                            f"{data.channels} (--channels)")


# --------------------------------------------------------------------------- sharding

def shard_rows(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank``: contiguous, tiling ``[0, n)`` without overlap or padding, cut
    on the batch grid (so each batch holds the same images as in a one-process run)."""
    nb = math.ceil(n / batch_size)
    lo = min(n, batch_size * (nb * rank // world))
    hi = min(n, batch_size * (nb * (rank + 1) // world))
    return lo, hi


def shard_path(out: str | os.PathLike, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.rank{rank}of{world}{out.suffix or '.h5'}")


def shard_files(out: str | os.PathLike) -> list[Path]:
    out = Path(out)
    import re

    pat = re.compile(re.escape(out.stem) + r"\.rank\d+of\d+" + re.escape(out.suffix or ".h5") + "$")
    return sorted(p for p in out.parent.glob(f"{out.stem}.rank*of*") if pat.match(p.name)) if out.parent.is_dir() else []


# --------------------------------------------------------------------------- targets and plans

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


def identity_diff(have: dict[str, Any], want: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Identity fields that differ between a dataset's attributes and a new request."""
    return [(k, have.get(k), v) for k, v in want.items() if _canon(have.get(k)) != _canon(v)]


def _describe_diff(path: str, fname: str, diff: list[tuple[str, Any, Any]]) -> str:
    parts = []
    for k, old, new in diff[:3]:
        o, n = (str(old), str(new))
        if len(o) > 60 or len(n) > 60:
            o, n = o[:60] + "...", n[:60] + "..."
        parts.append(f"{k}: file has {o!r}, this request {n!r}")
    return (f"{fname} holds /{path} from another extraction ({'; '.join(parts)}); pass --overwrite to replace the "
            f"file, or write to another --out")


def _root_check(f: h5py.File, data: FeatureData) -> None:
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


def _init_root(f: h5py.File, data: FeatureData, command: str) -> None:
    if store.SCHEMA_ATTR in f.attrs:
        _root_check(f, data)
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
                raise UserError(_describe_diff(t.path, f.filename, diff))
            complete = bool(have.get("complete", False))
            if mode == "auto":
                state = "complete" if complete else f"incomplete, {have.get('rows_done', 0)} of {ds.shape[0]} rows"
                conflicts.append(f"/{t.path} ({state})")
                continue
            if complete:
                starts[t.path] = ds.shape[0]
            elif ds.is_virtual:
                raise UserError(f"{f.filename}: /{t.path} is an incomplete join of shard files; resume it with "
                                f"torchrun and the same number of processes that wrote it")
            else:
                starts[t.path] = int(have.get("rows_done", 0))
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
                                       compression=t.compression, preallocate=True)
            if t.shape[0] == 0:        # an empty shard: nothing to write
                store.mark_complete(ds)


# --------------------------------------------------------------------------- the writer thread

class SimulatedKill(RuntimeError):
    """Raised by ``stop_after`` (tests): the extraction stops as if the process had been interrupted."""


@dataclass
class _Batch:
    split: str
    start: int                                   # first row in the target file
    stop: int
    arrays: dict[str, torch.Tensor]              # dataset path -> (stop - start, ...) host tensor
    event: Any = None                            # CUDA event to wait for before reading the host tensors


class _Writer:
    """Writes batches from a bounded queue in a thread; raises ``rows_done`` only after a flush."""

    def __init__(self, f: h5py.File, starts: dict[str, int], max_batches: int, flush_s: float,
                 on_landed: Callable[[int], None] | None = None):
        self.f = f
        self.q: queue.Queue = queue.Queue(maxsize=max(1, max_batches))
        self.flush_s = flush_s
        self.done = dict(starts)                 # rows written (in order) per dataset path
        self.marked = dict(starts)               # rows_done on disk
        self.n = {p: f[p].shape[0] for p in starts}
        self.error: BaseException | None = None
        self.batches = 0
        self.bytes = 0
        self.on_landed = on_landed
        self._last_flush = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="kc-h5-writer", daemon=True)
        self.thread.start()

    def put(self, item: _Batch) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.q.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Write what is queued, flush, and mark progress; re-raise a writer error."""
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()
        try:                                     # mark what landed, also after a failure
            self._checkpoint()
        except BaseException as e:  # noqa: BLE001 - reported below
            self.error = self.error or e
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure
            try:
                self._write(item)
                if time.monotonic() - self._last_flush >= self.flush_s:
                    self._checkpoint()
                self.batches += 1
                if self.on_landed is not None:
                    self.on_landed(self.batches)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e

    def _write(self, b: _Batch) -> None:
        if b.event is not None:
            b.event.synchronize()
        for path, t in b.arrays.items():
            lo = max(b.start, self.done[path])
            if lo >= b.stop:
                continue
            if lo != self.done[path]:
                raise RuntimeError(f"rows of /{path} arrived out of order ({lo} after {self.done[path]})")
            arr = t[lo - b.start:].numpy()
            arr = np.ascontiguousarray(arr)
            self.f[path].write_direct(arr, dest_sel=np.s_[lo:b.stop])
            self.done[path] = b.stop
            self.bytes += arr.nbytes

    def _checkpoint(self) -> None:
        """Flush the data, then raise rows_done/complete, then flush those attributes."""
        changed = [p for p in self.done if self.done[p] != self.marked[p]]
        if not changed:
            return
        self.f.flush()
        for p in changed:
            ds = self.f[p]
            if self.done[p] >= self.n[p]:
                store.mark_complete(ds)
            else:
                store.mark_rows_done(ds, self.done[p])
            self.marked[p] = self.done[p]
        self.f.flush()
        self._last_flush = time.monotonic()


# --------------------------------------------------------------------------- the pass

@dataclass
class ExtractResult:
    out: Path
    rows: dict[str, int]                       # rows computed per split (this process)
    datasets: list[str]                        # dataset paths of the request
    skipped: list[str]                         # already complete, not recomputed
    seconds: float
    images_per_s: float
    bytes_written: int
    shards: list[Path] = field(default_factory=list)
    images: int = 0                            # images computed by all ranks


def _to_host(t: torch.Tensor, dtype: torch.dtype, cuda: bool) -> torch.Tensor:
    t = t.detach().to(dtype)
    if not cuda:
        return t.contiguous()
    host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def extract_features(nets: Sequence[Net], data: FeatureData, layers: Sequence[tuple[str, int | None]],
                     out: str | os.PathLike, cfg: ExtractConfig = ExtractConfig(), mode: str = "auto",
                     command: str = "", stop_after: int | None = None, hard_kill: bool = False,
                     on_landed: Callable[[int], None] | None = None) -> ExtractResult:
    """Extract ``layers`` (``(name, conv_layer)`` requests; ``conv_layer`` wins when set) of every net into ``out``.

    ``mode``: auto | resume | overwrite (module doc). ``stop_after`` (tests, ``--max_batches``): stop once that
    many batches were handed to the writer, raising :class:`SimulatedKill`, or with ``hard_kill`` ending the
    process at once (``os._exit``) without closing the file, as a kill would. Under torchrun each rank writes
    its shard and rank 0 joins them into ``out``.
    """
    _validate(nets, layers, cfg, mode)
    info = dist_from_env()
    device = _device(cfg.device, info)
    splits = list(dict.fromkeys(s.strip() for s in cfg.split.split(",") if s.strip()))
    missing = [s for s in splits if s not in data.splits]
    if missing:
        raise UserError(unknown_choice_message("split", missing[0], sorted(data.splits)))
    check_nets_fit_data(nets, data)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'features.h5'}")
    out.parent.mkdir(parents=True, exist_ok=True)

    # Nets -> extractors (built and checked on the CPU, then moved).
    extractors: dict[str, FeatureExtractor] = {}
    points: dict[str, list[LayerPoint]] = {}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    in_shape = (data.channels, data.image_size, data.image_size)
    for n in nets:
        pts = [resolve_layer(n.model, name, conv, n.name, n.arch) for name, conv in layers]
        if cfg.logits:
            pts.append(resolve_layer(n.model, LOGITS))
        ex = build_extractor(n.model.cpu().eval(), pts)
        check_against_hooks(n.model, ex, in_shape)
        shapes[n.name] = output_shapes(ex, in_shape)
        if cfg.logits and n.num_classes is not None and shapes[n.name][LOGITS] != (int(n.num_classes),):
            raise UserError(f"net {n.name!r}: its output has shape {shapes[n.name][LOGITS]}, not ({n.num_classes},)")
        ex = ex.to(device)
        if device.type == "cuda" and cfg.channels_last:
            ex = ex.to(memory_format=torch.channels_last)
        extractors[n.name], points[n.name] = ex, pts

    group = ControlGroup(info)
    try:
        return _run(nets, data, splits, out, cfg, mode, command, extractors, points, shapes, device, info, group,
                    stop_after, hard_kill, on_landed)
    finally:
        group.close()


def _validate(nets: Sequence[Net], layers: Sequence[tuple[str, int | None]], cfg: ExtractConfig, mode: str) -> None:
    if not nets:
        raise UserError("no nets to extract: pass --nets NAME=CKPT ... or --family DIR/family.json")
    names = [n.name for n in nets]
    for n in names:
        check_net_name(n)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"net name(s) {dup} given twice; every net needs its own name")
    if not layers and not cfg.logits:
        raise UserError("no layers requested: pass --layer PATH and/or --conv_layer N (or --logits)")
    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {cfg.dtype!r}; valid: {', '.join(DTYPES)}")
    if cfg.compression not in COMPRESSIONS:
        raise UserError(f"unknown --compression {cfg.compression!r}; valid: {', '.join(COMPRESSIONS)}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.limit < 0:
        raise UserError(f"--limit must be >= 0, got {cfg.limit}")
    if mode not in ("auto", "resume", "overwrite"):
        raise ValueError(f"mode {mode!r}; valid: auto, resume, overwrite")


def _device(name: str, info: DistInfo) -> torch.device:
    dev = resolve_device(name)
    if dev.type == "cuda" and info.active and dev.index is None:
        dev = torch.device("cuda", info.local_rank)
    if dev.type == "cuda":
        if dev.index is not None:
            torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True
    return dev


def _targets(nets: Sequence[Net], data: FeatureData, splits: Sequence[str], cfg: ExtractConfig,
             points: dict[str, list[LayerPoint]], shapes: dict[str, dict[str, tuple[int, ...]]],
             device: torch.device, command: str, rows: dict[str, int]) -> list[Target]:
    autocast_tag = "bfloat16" if (cfg.amp and device.type == "cuda") else "none"
    code = code_version()
    out = []
    for split in splits:
        for n in nets:
            for p in points[n.name]:
                dtype = "float32" if p.point == "logits" else cfg.dtype
                identity = {"checkpoint_sha256": n.sha256, "arch": n.arch, "layer": p.name, "node": p.node,
                            "point": p.point, "dtype": dtype, "autocast": autocast_tag,
                            "transform": data.transform, "dataset_spec": data.spec}
                prov = {"checkpoint": n.checkpoint, "net": n.name, "num_classes": n.num_classes,
                        "command": command, "code_version": code, "created_utc": now_utc(),
                        "torch_version": str(torch.__version__), "device": str(device),
                        "compression": cfg.compression}
                comp = None if cfg.compression == "none" else cfg.compression
                if p.conv_layer is not None:
                    prov["conv_layer"] = p.conv_layer
                out.append(Target(split, n.name, p.name, (rows[split],) + tuple(shapes[n.name][p.name]), dtype,
                                  identity, prov, comp))
    return out


def _run(nets, data, splits, out, cfg, mode, command, extractors, points, shapes, device, info, group,
         stop_after, hard_kill, on_landed) -> ExtractResult:
    n_rows = {s: len(data.labels[s]) for s in splits}
    full_targets = _targets(nets, data, splits, cfg, points, shapes, device, command, n_rows)
    bounds = {s: shard_rows(n_rows[s], cfg.batch_size, info.rank, info.world) for s in splits}
    target_file = shard_path(out, info.rank, info.world) if info.active else out

    # 1. overwrite: remove the output and its shard files (rank 0); everyone waits.
    if mode == "overwrite" and info.rank == 0:
        for p in [out] + shard_files(out):
            if p.exists():
                p.unlink()
    group.barrier()

    # 2. plan (every rank; a failure anywhere stops every rank instead of leaving them waiting).
    error: BaseException | None = None
    todo = {t.path for t in full_targets}
    skipped: list[str] = []
    f = None
    starts: dict[str, int] = {}
    local_targets: list[Target] = []
    try:
        if info.active:
            todo, skipped = _plan_joined(out, full_targets, mode)
        f = _open_target(target_file, data, command)
        for t in full_targets:
            if t.path in todo:
                lo, hi = bounds[t.split]
                local_targets.append(Target(t.split, t.net, t.layer, (hi - lo,) + t.shape[1:], t.dtype, t.identity,
                                            t.provenance, t.compression))
        starts = plan_file(f, local_targets, mode, create=False)   # refuses before the file is changed
        for s in splits:
            lo, hi = bounds[s]
            store.init_split(f, s, np.arange(lo, hi, dtype=np.int64), data.labels[s][lo:hi])
        create_targets(f, local_targets)
        if not info.active:
            skipped = [p for p, s0 in starts.items() if s0 >= f[p].shape[0]]
        f.flush()
    except BaseException as e:  # noqa: BLE001 - agreed on below
        error = e
    if group.any_failed(error is not None):
        if f is not None:
            f.close()
        if error is not None:
            raise error
        raise UserError("extraction stopped: another rank failed while checking the output (see its message)")

    # 3. the pass
    t0 = time.perf_counter()
    writer = _Writer(f, starts, cfg.queue_batches, cfg.flush_s, on_landed)
    try:
        rows_done = _pass(data, splits, bounds, local_targets, starts, extractors, cfg, device, writer,
                          stop_after, hard_kill, info)
        writer.close()
    except BaseException as e:
        with contextlib.suppress(Exception):
            writer.close()          # land what was computed, flush, mark progress
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(Exception):
            group.any_failed(True)
        if isinstance(e, OSError) or isinstance(writer.error, OSError):
            raise UserError(f"writing {target_file} failed ({writer.error or e}); the file stays readable and "
                            f"marked incomplete: free space / fix the cause and re-run the same command with "
                            f"--resume") from e
        raise
    f.close()
    seconds = time.perf_counter() - t0
    n_img = sum(rows_done.values())
    if group.any_failed(False):
        raise UserError("extraction stopped: another rank failed (see its message); re-run with --resume")
    n_img = group.total(n_img)                 # all ranks (they ran in parallel)

    # 4. rank 0 joins the shards into the output file
    shards: list[Path] = []
    if info.active:
        if info.rank == 0:
            shards = _join(out, data, splits, n_rows, full_targets, todo, cfg.batch_size, info.world, command)
        group.barrier()
    return ExtractResult(out, rows_done, [t.path for t in full_targets], skipped, seconds,
                         n_img / max(seconds, 1e-9), writer.bytes, shards, n_img)


def _open_target(path: Path, data: FeatureData, command: str) -> h5py.File:
    f = store.open_features(path, "a")
    try:
        _init_root(f, data, command)
    except BaseException:
        f.close()
        raise
    return f


def _plan_joined(out: Path, targets: Sequence[Target], mode: str) -> tuple[set[str], list[str]]:
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
                raise UserError(_describe_diff(t.path, f.filename, diff))
            if mode == "auto":
                conflicts.append(f"/{t.path}")
            elif bool(ds.attrs.get("complete", False)):
                todo.discard(t.path)
                skipped.append(t.path)
        if conflicts:
            raise UserError(f"{out} already holds {', '.join(conflicts[:3])}; pass --resume to continue or "
                            f"--overwrite to replace it")
    return todo, skipped


def _pass(data: FeatureData, splits, bounds, targets: Sequence[Target], starts: dict[str, int],
          extractors: dict[str, FeatureExtractor], cfg: ExtractConfig, device: torch.device, writer: _Writer,
          stop_after: int | None, hard_kill: bool, info: DistInfo) -> dict[str, int]:
    cuda = device.type == "cuda"
    torch_dtype = {"float16": torch.float16, "float32": torch.float32}
    rows_done = {}
    handed = 0
    for split in splits:
        lo, hi = bounds[split]
        pending = [t for t in targets if t.split == split and starts[t.path] < t.shape[0]]
        if not pending or hi <= lo:
            rows_done[split] = 0
            continue
        first = min(starts[t.path] for t in pending)
        first -= first % cfg.batch_size            # stay on the batch grid (rows_done always is, but be safe)
        nets_needed = list(dict.fromkeys(t.net for t in pending))
        labels = data.labels[split]
        ds = Subset(data.splits[split], range(lo + first, hi))
        loader = make_loader(ds, cfg.batch_size, shuffle=False, num_workers=cfg.num_workers, pin_memory=cuda)
        row = first                                 # local row of the next batch
        desc = f"extract {split}" + (f" [rank {info.rank}]" if info.active else "")
        for x, y, idx in progress(loader, len(loader), desc):
            b = len(idx)
            want = np.arange(lo + row, lo + row + b)
            if not np.array_equal(idx.numpy(), want) or not np.array_equal(y.numpy(), labels[want]):
                raise RuntimeError(f"the loader returned rows {idx[:3].tolist()}... where {want[:3].tolist()}... were "
                                   f"expected; extraction needs the data set in order")
            x = x.to(device, non_blocking=True)
            if cuda and cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            arrays: dict[str, torch.Tensor] = {}
            with torch.no_grad(), autocast(device, cfg.amp):
                for net in nets_needed:
                    outs = extractors[net](x)
                    for t in pending:
                        if t.net == net and starts[t.path] < row + b:
                            arrays[t.path] = _to_host(outs[t.layer], torch_dtype[t.dtype], cuda)
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
            writer.put(_Batch(split, row, row + b, arrays, event))
            row += b
            handed += 1
            fault_point("extract_batch")                 # reliability tests kill the process here
            if stop_after is not None and handed >= stop_after:
                if hard_kill:
                    sys.stderr.write(f"simulated kill after {handed} batches (--max_batches)\n")
                    sys.stderr.flush()
                    os._exit(KILL_EXIT_CODE)
                raise SimulatedKill(f"stopped after {handed} batches (simulated kill)")
        rows_done[split] = row - first
    return rows_done


def _join(out: Path, data: FeatureData, splits, n_rows: dict[str, int], targets: Sequence[Target],
          todo: set[str], batch_size: int, world: int, command: str) -> list[Path]:
    """Rank 0: write ``out`` with real index/label datasets and virtual feature datasets over the shards."""
    shards = [shard_path(out, r, world) for r in range(world)]
    bounds = {s: [shard_rows(n_rows[s], batch_size, r, world) for r in range(world)] for s in splits}
    opened = [store.open_features(p, "r") for p in shards]
    try:
        with store.open_features(out, "a") as f:
            _init_root(f, data, command)
            for s in splits:
                idx = np.concatenate([store.read_index(g, s) for g in opened])
                lab = np.concatenate([store.read_labels(g, s) for g in opened])
                store.init_split(f, s, idx, lab)
            for t in targets:
                if t.path not in todo:
                    continue
                attrs = store.attrs_dict(opened[0][t.path])
                done = [int(g[t.path].attrs.get("rows_done", 0)) for g in opened]
                complete = all(bool(g[t.path].attrs.get("complete", False)) for g in opened)
                attrs.update({"complete": complete, "rows_done": int(sum(done)) if complete else 0,
                              "shards": [p.name for p in shards]})
                sources = [(p.name, lo, hi) for p, (lo, hi) in zip(shards, bounds[t.split])]
                store.create_virtual_features(f, t.split, t.net, t.layer, sources, t.shape, t.dtype, attrs)
    finally:
        for g in opened:
            g.close()
    return shards


# --------------------------------------------------------------------------- describe and verify

def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """What a feature file holds: root provenance, and per split/net/layer shape, dtype, completeness,
    progress and provenance attributes (JSON-able)."""
    with store.open_features(path, "r") as f:
        desc: dict[str, Any] = {"file": str(path), "root": store.attrs_dict(f), "splits": {}}
        for split in store.list_splits(f):
            g = f[split]
            sd: dict[str, Any] = {"rows": int(g["index"].shape[0]) if "index" in g else None, "nets": {}}
            for net in store.list_nets(f, split):
                nd = {}
                for layer in sorted(g[net].keys()):
                    ds = g[net][layer]
                    a = store.attrs_dict(ds)
                    entry = {"shape": list(ds.shape), "dtype": str(ds.dtype), "complete": bool(a.pop("complete", False)),
                             "rows_done": int(a.pop("rows_done", 0)), "virtual": bool(ds.is_virtual),
                             "chunks": list(ds.chunks) if ds.chunks else None, "compression": ds.compression,
                             "attrs": a}
                    if ds.is_virtual:
                        try:
                            store.check_virtual_sources(ds)
                            entry["sources_ok"] = True
                        except store.FeatureFileError as e:
                            entry["sources_ok"] = False
                            entry["problem"] = str(e)
                    nd[layer] = entry
                sd["nets"][net] = nd
            desc["splits"][split] = sd
    return jsonable(desc)


VERIFY_TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}   # max |diff| / max |stored|


@dataclass
class VerifyRow:
    split: str
    net: str
    layer: str
    status: str                  # ok | mismatch | skipped | failed
    rows: list[int] = field(default_factory=list)
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    tolerance: float | None = None
    reason: str = ""


@torch.no_grad()
def verify_file(path: str | os.PathLike, rows: int = 4, seed: int = 0, device: str = "cpu") -> list[VerifyRow]:
    """Re-compute ``rows`` random stored rows of every dataset from its checkpoint and compare.

    The data set comes from the file's ``dataset_spec`` (eval transform); each net is rebuilt from the
    ``checkpoint`` attribute (its sha256 must match ``checkpoint_sha256``) and the layer re-resolved.
    A row passes when ``max|recomputed - stored| <= tol * max|stored|`` (tol per storage dtype and autocast,
    :data:`VERIFY_TOL`; batch composition changes the last bits of a float32 result)."""
    dev = resolve_device(device)
    rng = np.random.default_rng(seed)
    results: list[VerifyRow] = []
    nets: dict[str, Net | str] = {}
    with store.open_features(path, "r") as f:
        root = store.attrs_dict(f)
        spec = root.get("dataset_spec")
        for split in store.list_splits(f):
            index, labels = store.read_index(f, split), store.read_labels(f, split)
            try:
                if not isinstance(spec, dict):
                    raise UserError("the file records no dataset_spec (written by another tool?)")
                dset = build_dataset(DataSpec(**{k: v for k, v in spec.items() if k in DATA_FIELDS}), split,
                                     train_transform=False)
            except UserError as e:
                for net in store.list_nets(f, split):
                    for layer in sorted(f[split][net].keys()):
                        results.append(VerifyRow(split, net, layer, "skipped", reason=f"data set unavailable: {e}"))
                continue
            for net in store.list_nets(f, split):
                results += _verify_net(f, split, net, dset, index, labels, nets, rng, rows, dev)
    return results


def _verify_net(f: h5py.File, split: str, net: str, dset: Dataset, index: np.ndarray, labels: np.ndarray,
                cache: dict[str, Any], rng: np.random.Generator, rows: int, dev: torch.device) -> list[VerifyRow]:
    g = f[split][net]
    layers = sorted(g.keys())
    attrs = {layer: store.attrs_dict(g[layer]) for layer in layers}
    out: list[VerifyRow] = []
    by_ckpt: dict[tuple[str, str], list[str]] = {}
    for layer in layers:
        a = attrs[layer]
        by_ckpt.setdefault((str(a.get("checkpoint") or ""), str(a.get("checkpoint_sha256") or "")), []).append(layer)
    for (ckpt, sha), lays in by_ckpt.items():
        if not ckpt:
            out += [VerifyRow(split, net, l, "skipped", reason="no checkpoint recorded") for l in lays]
            continue
        key = f"{ckpt}|{sha}"
        if key not in cache:
            try:
                cache[key] = load_net(net, ckpt, expect_sha256=sha or None)
            except UserError as e:
                cache[key] = str(e)
        loaded = cache[key]
        if isinstance(loaded, str):
            out += [VerifyRow(split, net, l, "failed", reason=loaded) for l in lays]
            continue
        model = loaded.model.to(dev).eval()
        n_ok = min(int(attrs[l].get("rows_done", 0)) if not attrs[l].get("complete") else g[l].shape[0] for l in lays)
        if n_ok == 0:
            out += [VerifyRow(split, net, l, "skipped", reason="no rows written yet") for l in lays]
            continue
        pick = np.sort(rng.choice(n_ok, size=min(rows, n_ok), replace=False))
        items = [dset[int(index[i])] for i in pick]
        x = torch.stack([it[0] for it in items]).to(dev)
        y = np.array([it[1] for it in items])
        if not np.array_equal(y, labels[pick]):
            out += [VerifyRow(split, net, l, "mismatch", pick.tolist(), reason="labels differ from the data set")
                    for l in lays]
            continue
        try:
            pts = [resolve_layer(model, str(attrs[l].get("layer") or l)) for l in lays]
        except UserError as e:
            out += [VerifyRow(split, net, l, "failed", reason=str(e)) for l in lays]
            continue
        ex = build_extractor(model, pts).to(dev)
        bf16 = any(attrs[l].get("autocast") == "bfloat16" for l in lays)
        with autocast(dev, bf16):
            rec = ex(x)
        for l, p in zip(lays, pts):
            if attrs[l].get("node") not in (None, p.node):
                out.append(VerifyRow(split, net, l, "failed", reason=f"layer {p.name!r} now resolves to {p.node!r}, "
                                     f"the file recorded {attrs[l].get('node')!r}"))
                continue
            stored = torch.from_numpy(np.asarray(g[l][pick.tolist()])).float()
            got = rec[p.name].to(torch.float16 if g[l].dtype == np.float16 else torch.float32).float().cpu()
            if got.shape != stored.shape:
                out.append(VerifyRow(split, net, l, "mismatch", pick.tolist(),
                                     reason=f"shape {tuple(got.shape)} recomputed, {tuple(stored.shape)} stored"))
                continue
            diff = float((got - stored).abs().max())
            scale = float(stored.abs().max())
            tol = VERIFY_TOL["bfloat16" if bf16 else str(g[l].dtype)]
            rel = diff / max(scale, 1e-12)
            ok = bool(torch.isfinite(stored).all()) and rel <= tol
            out.append(VerifyRow(split, net, l, "ok" if ok else "mismatch", pick.tolist(), diff, rel, tol))
    return out
