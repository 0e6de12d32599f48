"""The extraction pass: activations of several nets at several layers, same images, same order, in
one pass over the data, streamed into a ``kc-features`` v1 file (see ``features/store.py``).

    python cli.py extract --nets seed0=runs/s0/best.pt seed5=runs/s5/best.pt --conv_layer 30 \\
        --split train,test --out features.h5
    torchrun --nproc_per_node=4 cli.py extract ...          # each rank a contiguous shard, joined by rank 0

How it works
- Every net is rewritten by torch.fx into an extractor that returns the requested points and stops
  after the last one (``features/layers.py``). Each batch of the eval-transformed data set (no
  shuffle, no augmentation; ``features/nets.py``) goes through every net once; the outputs are cast to
  the storage dtype, copied to (pinned) host memory and handed to the writer thread
  (``features/writer.py``), so compute and HDF5 writes overlap and memory does not grow with the
  number of images.
- Datasets are pre-sized and pre-allocated (one sample per chunk, no compression by default) after
  the file plan (``features/targets.py``: what an existing output may hold under ``auto``, ``resume``
  and ``overwrite``) accepted the request. A killed process leaves a readable file marked incomplete.
- Every batch of every dataset is checked for non-finite values on the device, before the host copy
  (``features/nonfinite.py``): float16 overflow is refused, NaN/inf computed by the net are counted
  per dataset (attribute ``nonfinite``) and reported as a warning.
- Under torchrun each rank writes its row shard and rank 0 joins them as virtual datasets
  (``features/shards.py``).
- ``precision`` (``common/device.py``, the same choices as ``fit-transnet --precision``): the arithmetic
  of the forward pass on CUDA. ``fp32`` (default) switches TF32 off, so a float32 file agrees with a
  float32 CPU forward pass to about 1e-6 of its largest value (not bitwise: other kernels, other
  summation order); ``tf32`` and ``bf16`` are faster and differ in the 3rd significant digit. Each
  dataset records ``precision`` (asked) and ``precision_effective`` (``fp32`` off CUDA).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from common.device import PRECISIONS, cudnn_autotune, float32_math, precision_autocast, use_device
from common.distributed import RANK_WAIT, ControlGroup, DistInfo, job_ranks
from common.errors import UserError, require_choice
from common.faults import fault_point
from common.files import is_disk_error, write_failed
from common.progress import progress
from common.registry import unknown_choice_message
from features import store
from features.config import COMPRESSIONS, DATA_ON, DTYPES, ExtractConfig  # re-exported: their old home
from features.layers import (
    FeatureExtractor,
    LayerPoint,
    build_extractor,
    check_against_hooks,
    output_shapes,
    resolve_layer,
)
from features.nets import FeatureData, Net, check_net_name, check_nets_fit_data
from features.nonfinite import NonFiniteFeaturesWarning, stored_counts, value_range, warning_text
from features.shards import join_shards, shard_files, shard_path, shard_rows
from features.targets import Target, build_targets, create_targets, open_output, plan_file, plan_joined
from features.tokens import map_tokens
from features.writer import FeatureWriter, HostBuffers, WriteBatch
from training.data import transform_spec
from training.datasets import DataSpec, IndexedDataset
from training.device_data import cached_images, choose_data_on, estimated_bytes, normalise
from training.loop import make_loader

KILL_EXIT_CODE = 75            # exit status of the simulated kill (--max_batches)


class SimulatedKill(RuntimeError):
    """Raised by ``stop_after`` (tests): the extraction stops as if the process had been interrupted."""


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
    nonfinite: dict[str, int] = field(default_factory=dict)   # NaN/inf values stored per dataset path (rank 0)
    data_on: str = "loader"                    # where the input images were read from (--data_on, resolved)


def _to_host(t: torch.Tensor, buffers: HostBuffers | None) -> torch.Tensor:
    """A host copy of ``t``: on CUDA an asynchronous copy into a reused pinned buffer (the writer waits
    for the batch's event before reading it and gives the buffer back after writing it)."""
    if buffers is None:
        return t.contiguous()
    host = buffers.take(tuple(t.shape), t.dtype)
    host.copy_(t, non_blocking=True)
    return host


def extract_features(nets: Sequence[Net], data: FeatureData, layers: Sequence[tuple[str, int | None]],
                     out: str | os.PathLike, cfg: ExtractConfig = ExtractConfig(), mode: str = "auto",
                     command: str = "", stop_after: int | None = None, hard_kill: bool = False,
                     on_landed: Callable[[int], None] | None = None) -> ExtractResult:
    """Extract ``layers`` (``(name, conv_layer)`` requests; ``conv_layer`` wins when set) of every net into ``out``.

    ``mode``: auto | resume | overwrite (``features/targets.py``). ``stop_after`` (tests, ``--max_batches``): stop once that
    many batches were handed to the writer, raising :class:`SimulatedKill`, or with ``hard_kill`` ending the
    process at once (``os._exit``) without closing the file, as a kill would. Under torchrun each rank writes
    its shard and rank 0 joins them into ``out``.

    Non-finite values (``features/nonfinite.py``): a float16 layer with a value beyond the float16 range
    (or a NaN/inf) is refused with a :class:`UserError` asking for ``--dtype float32``; float32 layers keep
    NaN/inf as computed, count them in the ``nonfinite`` attribute (``ExtractResult.nonfinite``) and raise a
    :class:`NonFiniteFeaturesWarning`.
    """
    _validate(nets, layers, cfg, mode)
    info = job_ranks()                       # one process inside a study's local_only stage
    device = _device(cfg.device)
    splits = list(dict.fromkeys(s.strip() for s in cfg.split.split(",") if s.strip()))
    missing = [s for s in splits if s not in data.splits]
    if missing:
        raise UserError(unknown_choice_message("split", missing[0], sorted(data.splits)))
    check_nets_fit_data(nets, data)
    where = inputs_on(cfg, data, splits, device, info)
    out = Path(out)
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a directory; give a file name such as {out / 'features.h5'}")
    out.parent.mkdir(parents=True, exist_ok=True)

    # Nets -> extractors (built and checked on the CPU, then moved).
    extractors: dict[str, FeatureExtractor] = {}
    points: dict[str, list[LayerPoint]] = {}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    extra: dict[str, dict[str, dict]] = {}       # per net and point: the token-map attributes (features/tokens.py)
    in_shape = (data.channels, data.image_size, data.image_size)
    for n in nets:
        pts = [resolve_layer(n.model, name, conv, n.name, n.arch) for name, conv in layers]
        if cfg.logits:
            pts.append(resolve_layer(n.model, store.LOGITS))
        ex = build_extractor(n.model.cpu().eval(), pts)
        check_against_hooks(n.model, ex, in_shape)
        ex = map_tokens(n.model, ex, in_shape, cfg.keep_prefix)   # (N, T, C), (N, H, W, C), (N, C) -> (N, C, H, W)
        pts, extra[n.name] = list(ex.points), dict(getattr(ex, "extra_attrs", {}))
        shapes[n.name] = output_shapes(ex, in_shape)
        if cfg.logits and n.num_classes is not None and shapes[n.name][store.LOGITS] != (int(n.num_classes),):
            raise UserError(f"net {n.name!r}: its output has shape {shapes[n.name][store.LOGITS]}, not ({n.num_classes},)")
        ex = ex.to(device)
        if device.type == "cuda" and cfg.channels_last:
            ex = ex.to(memory_format=torch.channels_last)
        extractors[n.name], points[n.name] = ex, pts

    group = ControlGroup(info, timeout=RANK_WAIT)      # ranks wait for the slowest shard at the end
    lock = None
    try:
        lock = _lock_output(out, info, group)         # before anything is deleted or opened
        res = _run(nets, data, splits, out, cfg, mode, command, extractors, points, shapes, device, info, group,
                   stop_after, hard_kill, on_landed, extra, where)
    finally:
        if lock is not None:
            lock.release()
        group.close()
    if any(n > 0 for n in res.nonfinite.values()):
        warnings.warn(warning_text(res.nonfinite, str(out)), NonFiniteFeaturesWarning, stacklevel=2)
    return res


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
    require_choice("--dtype", cfg.dtype, DTYPES)
    require_choice("--compression", cfg.compression, COMPRESSIONS)
    require_choice("--precision", cfg.precision, PRECISIONS)
    require_choice("--data_on", cfg.data_on, DATA_ON)
    if cfg.batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.limit < 0:
        raise UserError(f"--limit must be >= 0, got {cfg.limit}")
    if mode not in ("auto", "resume", "overwrite"):
        raise ValueError(f"mode {mode!r}; valid: auto, resume, overwrite")


def _lock_output(out: Path, info: DistInfo, group: ControlGroup):
    """Rank 0 takes the output's lock (``features/store.py``: refused with the holder's pid when another
    extraction writes it); every rank stops when it fails."""
    lock, error = None, None
    if info.rank == 0:
        try:
            lock = store.lock_features(out)
        except UserError as e:
            error = e
    if group.any_failed(error is not None):
        if error is not None:
            raise error
        raise UserError(f"extraction stopped: rank 0 could not lock {out} (see its message)")
    return lock


def _device(name: str) -> torch.device:
    return use_device(name)                 # under torchrun: cuda:LOCAL_RANK


def _run(nets, data, splits, out, cfg, mode, command, extractors, points, shapes, device, info, group,
         stop_after, hard_kill, on_landed, extra=None, where="loader") -> ExtractResult:
    n_rows = {s: len(data.labels[s]) for s in splits}
    full_targets = build_targets(nets, data, splits, points, shapes, n_rows, cfg.dtype, cfg.compression,
                                 cfg.precision, device, command, extra=extra)
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
            todo, skipped = plan_joined(out, full_targets, mode)
        f = open_output(target_file, data, command)
        for t in full_targets:
            if t.path in todo:
                lo, hi = bounds[t.split]
                local_targets.append(Target(t.split, t.net, t.layer, (hi - lo,) + t.shape[1:], t.dtype, t.identity,
                                            t.provenance, t.compression, cfg.checksum))
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
            with contextlib.suppress(OSError):      # a full disk fails the close too: the first error is the one
                f.close()
        if error is not None:
            if is_disk_error(error):
                raise write_failed(error, target_file, "creating the datasets",
                                   "nothing was extracted; free space (or fix the disk) and re-run") from error
            raise error
        raise UserError("extraction stopped: another rank failed while checking the output (see its message)")

    # 3. the pass
    t0 = time.perf_counter()
    counts = {p: stored_counts(f[p], s0) for p, s0 in starts.items() if 0 < s0 < f[p].shape[0]}   # resume
    buffers = HostBuffers(pin=True) if device.type == "cuda" else None
    writer = FeatureWriter(f, starts, cfg.queue_batches, cfg.flush_s, on_landed, counts, buffers)
    try:
        with float32_math(device, cfg.precision), cudnn_autotune(device):   # fp32: TF32 off (CUDA only)
            rows_done = _pass(data, splits, bounds, local_targets, starts, extractors, cfg, device, writer,
                              stop_after, hard_kill, info, where)
        writer.close()
    except BaseException as e:
        with contextlib.suppress(Exception):
            writer.close()          # land what was computed, flush, mark progress
        with contextlib.suppress(Exception):
            f.close()
        with contextlib.suppress(Exception):
            group.any_failed(True)
        if isinstance(writer.error, UserError) and writer.error is not e:
            raise writer.error from None         # the writer's own failure (a full disk, ...) is the cause
        if isinstance(e, OSError):
            raise UserError(f"writing {target_file} failed ({e}); the file stays readable and marked incomplete: "
                            f"fix the cause and re-run the same command with --resume") from e
        raise
    f.close()
    seconds = time.perf_counter() - t0
    n_img = sum(rows_done.values())
    if group.any_failed(False):
        raise UserError("extraction stopped: another rank failed (see its message); re-run with --resume")
    n_img = group.total(n_img)                 # all ranks (they ran in parallel)

    # 4. rank 0 joins the shards into the output file
    shards: list[Path] = []
    if info.active:                            # a failed join fails every rank (none left waiting)
        shards = group.together("joining the shards", lambda: join_shards(
            out, data, splits, n_rows, full_targets, todo, cfg.batch_size, info.world, command)
            if info.rank == 0 else [])
    paths = [t.path for t in full_targets]
    nonfinite = _nonfinite_counts(out, paths) if info.rank == 0 else {}
    return ExtractResult(out, rows_done, paths, skipped, seconds, n_img / max(seconds, 1e-9), writer.bytes, shards,
                         n_img, nonfinite, where)


def _nonfinite_counts(out: Path, paths: Sequence[str]) -> dict[str, int]:
    """The ``nonfinite`` attribute of each requested dataset of the finished output (where recorded)."""
    with store.open_features(out, "r") as f:
        return {p: int(f[p].attrs["nonfinite"]) for p in paths if p in f and "nonfinite" in f[p].attrs}


def inputs_on(cfg: ExtractConfig, data: FeatureData, splits: Sequence[str], device: torch.device,
              info: DistInfo) -> str:
    """``loader`` or ``device`` (``--data_on``): where the input images are read from.

    ``device`` holds each split's images decoded once to uint8 at the input size (the cache of
    ``training/device_data.py``, shared with ``train --data_on device`` where the deterministic steps
    agree) on ``device`` and normalises whole batches there: the same pixels as the loader path, bit for
    bit. ``auto`` picks it on CUDA, in one process, without ``--limit``, when every split is a data set of
    images and they take at most a quarter of the free device memory; else ``loader``."""
    choice = cfg.data_on
    images = all(isinstance(data.splits[s], IndexedDataset) for s in splits)
    if choice == "device" and not images:
        raise UserError("--data_on device needs data sets of images (IndexedDataset); this data gives "
                        f"{type(next(iter(data.splits.values()))).__name__}: use --data_on loader")
    if choice != "auto":
        return choice
    if not images or device.type != "cuda" or info.active or cfg.limit:
        return "loader"
    tspec = transform_spec(DataSpec(**data.spec))
    return choose_data_on("auto", estimated_bytes(sum(len(data.splits[s]) for s in splits), tspec), device)


class _HeldImages:
    """In-order batches ``(x, y, index)`` of rows [start, stop) of a split from its uint8 images held on
    the device, normalised there (the ``DataLoader`` role of the loader path)."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, start: int, tspec, batch_size: int):
        self.images, self.labels, self.start, self.tspec, self.batch_size = images, labels, start, tspec, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self):
        for b in range(len(self)):
            lo = b * self.batch_size
            x = self.images[lo:lo + self.batch_size]
            idx = torch.arange(self.start + lo, self.start + lo + len(x))
            yield normalise(x, self.tspec.mean, self.tspec.std), torch.from_numpy(self.labels[idx.numpy()]), idx


def _inputs(data: FeatureData, split: str, start: int, stop: int, cfg: ExtractConfig, device: torch.device,
            where: str):
    """Batches ``(x, y, index)`` of rows [start, stop) of ``split``, in order: a DataLoader, or (``device``)
    the split's cached uint8 images, the rows up to ``stop`` moved to ``device`` once."""
    ds = data.splits[split]
    if where == "loader":
        return make_loader(Subset(ds, range(start, stop)), cfg.batch_size, shuffle=False,
                           num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    spec = DataSpec(**data.spec)
    tspec = transform_spec(spec)
    rows = None if len(data.labels[split]) == len(ds) else len(data.labels[split])     # --limit: the first rows
    images, _ = cached_images(ds, spec, tspec, False, num_workers=cfg.num_workers, rows=rows)
    return _HeldImages(images[start:stop].to(device), np.asarray(ds.labels), start, tspec, cfg.batch_size)


def _pass(data: FeatureData, splits, bounds, targets: Sequence[Target], starts: dict[str, int],
          extractors: dict[str, FeatureExtractor], cfg: ExtractConfig, device: torch.device, writer: FeatureWriter,
          stop_after: int | None, hard_kill: bool, info: DistInfo, where: str = "loader") -> dict[str, int]:
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
        loader = _inputs(data, split, lo + first, hi, cfg, device, where)
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
            ranges: list[torch.Tensor] = []
            with torch.no_grad(), precision_autocast(device, cfg.precision):
                for net in nets_needed:
                    outs = extractors[net](x)
                    for t in pending:
                        if t.net == net and starts[t.path] < row + b:
                            raw = outs[t.layer].detach()                    # (b, C, H, W) on the device
                            # [min, max] of the rows still to write (a resume may start inside a batch)
                            ranges.append(value_range(raw[max(0, starts[t.path] - row):]))
                            arrays[t.path] = _to_host(raw.to(torch_dtype[t.dtype]), writer.buffers)
            ranges_host = _to_host(torch.stack(ranges), None if not cuda else HostBuffers(pin=True))  # (n, 2)
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
            writer.put(WriteBatch(split, row, row + b, arrays, ranges_host, event))
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
