"""Feature pairs for Trans-Net fitting: checked opening, and fast batch sources.

``open_pair`` checks a (source, target, layer, split) request against one or two ``kc-features``
files through ``features.store``: the datasets exist and are complete (else the error says how to
resume the extraction), both have the same rows (index arrays equal) and the same spatial size. A
cross-layer request (``target_layer``: the target's layer, another than the source's) may pair maps
of different sizes under a ``spatial`` convention (``transnet/spatial.py``): every source block is
then resized to the target's H x W as it is read, so every source below serves resized x_A.

Batch sources yield ``(x_A, x_B)`` float32 batches on the compute device:

- ``MemoryPairs`` holds both arrays in their stored dtype either **on the device** (batches are
  gathered there: no host traffic at all) or **in RAM** (pinned when the device is a GPU; a batch
  is gathered into a pinned buffer and copied asynchronously, so the gather of batch s+1 overlaps
  the GPU's work on batch s).
- ``BlockPairs`` reads **contiguous blocks** of rows from HDF5 (never per-sample fancy indexing) in
  a shuffled block order, in a reader thread; rows are shuffled within a window of a few blocks and
  batches are cut across block boundaries (the remainder carries over to the next window).

``place`` chooses among them (``--data_on auto|device|ram|disk``). Every source shuffles from a
generator seeded by (seed, epoch), so an epoch is reproducible and a resumed fit continues
identically. Under DDP each rank takes its own part of every epoch and all ranks do the same
number of steps.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from common.errors import require_choice
from features.store import (
    FeatureFileError,
    NonFiniteFeatures,
    check_checkpoint_unchanged,
    get_features,
    open_features,
    provenance_of,
    read_index,
)
from training.harness import TRANSNET_STREAM, epoch_seed
from transnet.config import DATA_ON  # re-exported: its old home
from transnet.model import constant_slices
from transnet.spatial import resize_maps, spatial_plan
from transnet.variance import ChannelMoments

MEMORY_FRACTION = 0.5          # use at most this share of free GPU memory / available RAM for features

_TORCH_DTYPES = {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32,
                 np.dtype("float64"): torch.float64}



# --------------------------------------------------------------------------- checked opening

@dataclass(frozen=True)
class PairInfo:
    """One checked (source -> target) request at one layer of one split."""

    features: str                   # file holding the source net
    target_features: str            # file holding the target net (the same file unless given)
    split: str
    source: str
    target: str
    layer: str
    n: int
    shape_a: tuple[int, int, int]   # (C_A, H, W)
    shape_b: tuple[int, int, int]   # (C_B, H, W)
    dtype_a: str
    dtype_b: str
    provenance_a: dict[str, Any] = field(default_factory=dict, compare=False)
    provenance_b: dict[str, Any] = field(default_factory=dict, compare=False)
    target_layer: str = ""          # the target's layer when it is not ``layer`` (a cross-layer pair)
    spatial: str = ""               # pool | interpolate: how the source is resized; "" when the sizes agree

    @property
    def layer_b(self) -> str:
        return self.target_layer or self.layer

    @property
    def held_shape_a(self) -> tuple[int, int, int]:
        """(C_A, H, W) of the source as the Trans-Net sees it (at the target's H x W once resized)."""
        return (self.shape_a[0],) + tuple(self.shape_b[1:]) if self.spatial else self.shape_a

    @property
    def nbytes(self) -> int:
        item_a, item_b = np.dtype(self.dtype_a).itemsize, np.dtype(self.dtype_b).itemsize
        return self.n * (int(np.prod(self.held_shape_a)) * item_a + int(np.prod(self.shape_b)) * item_b)

    def dataset_path(self, which: str) -> str:
        net, layer = (self.source, self.layer) if which == "a" else (self.target, self.layer_b)
        return f"/{self.split}/{net}/{layer}"

    def resize_a(self, x: Tensor) -> Tensor:
        """A block of stored source rows (b, C_A, H_A, W_A) as the Trans-Net sees it."""
        return resize_maps(x, self.shape_b[1:], self.spatial) if self.spatial else x

    def layer_record(self) -> dict[str, Any]:
        """What a report records of a cross-layer or resized pair: ``source_layer``, ``target_layer`` and,
        when the source was resized, ``spatial``, ``source_size``, ``target_size``, ``spatial_rule``;
        empty for a same-layer pair of one size (its reports stay as they were)."""
        if not self.target_layer and not self.spatial:
            return {}
        plan = spatial_plan(self.shape_a[1:], self.shape_b[1:], self.spatial) if self.spatial else None
        return {"source_layer": self.layer, "target_layer": self.layer_b, **(plan or {})}


def open_pair(features: str | Path, source: str, target: str, layer: str, split: str,
              target_features: str | Path | None = None, allow_changed_checkpoints: bool = False,
              target_layer: str = "", spatial: str = "") -> PairInfo:
    """Check the request and return its shapes, dtypes and provenance (files are closed again). Features
    whose checkpoint changed since extraction are refused unless ``allow_changed_checkpoints``. The
    target is read at ``target_layer`` when given (else at ``layer``); maps of different sizes need a
    ``spatial`` convention (pool | interpolate, ``transnet/spatial.py``)."""
    fa = str(features)
    fb = str(target_features) if target_features else fa
    layer_b = target_layer if target_layer and target_layer != layer else ""

    def side(f: h5py.File, net: str, at: str) -> tuple[tuple[int, ...], np.dtype, dict[str, Any], np.ndarray]:
        ds = get_features(f, split, net, at)
        check_checkpoint_unchanged(ds, allow_changed_checkpoints)
        idx = read_index(f, split)
        _check_rows(ds, idx)
        return ds.shape, ds.dtype, provenance_of(ds), idx

    with open_features(fa) as f:
        shape_a, dtype_a, prov_a, idx_a = side(f, source, layer)
        if fb == fa:
            shape_b, dtype_b, prov_b, idx_b = side(f, target, layer_b or layer)
    if fb != fa:
        with open_features(fb) as f:
            shape_b, dtype_b, prov_b, idx_b = side(f, target, layer_b or layer)
        if len(idx_a) != len(idx_b) or not np.array_equal(idx_a, idx_b):
            where = ("different row counts" if len(idx_a) != len(idx_b) else
                     f"first difference at row {int(np.flatnonzero(idx_a != idx_b)[0])}")
            raise FeatureFileError(
                f"source {source!r} ({fa}) and target {target!r} ({fb}) hold different samples or sample "
                f"orders in split {split!r} (their index arrays differ: {len(idx_a)} vs {len(idx_b)} rows, "
                f"{where}); extract both nets from the same data set and split, ideally into one file")
    for name, shape, net, at in (("source", shape_a, source, layer), ("target", shape_b, target, layer_b or layer)):
        if len(shape) != 4:
            raise FeatureFileError(f"{name} features /{split}/{net}/{at} have shape {tuple(shape)}; a Trans-Net "
                                   f"needs (N, C, H, W) conv features")
    if tuple(shape_a[2:]) != tuple(shape_b[2:]) and not spatial:
        where = f"layer {layer!r}" if not layer_b else f"layers {layer!r} -> {layer_b!r}"
        hint = "; give --spatial pool|interpolate to resize the source" if layer_b else ", so both must match"
        raise FeatureFileError(f"source {source!r} maps are {shape_a[2]}x{shape_a[3]} but target {target!r} maps "
                               f"are {shape_b[2]}x{shape_b[3]} at {where}; a Trans-Net keeps the spatial "
                               f"size{hint}")
    plan = spatial_plan(shape_a[2:], shape_b[2:], spatial, f"{source} at {layer} -> {target} at {layer_b or layer}")
    return PairInfo(fa, fb, split, source, target, layer, int(shape_a[0]), tuple(int(v) for v in shape_a[1:]),
                    tuple(int(v) for v in shape_b[1:]), str(np.dtype(dtype_a)), str(np.dtype(dtype_b)),
                    prov_a, prov_b, layer_b, spatial if plan else "")


def _check_rows(ds: h5py.Dataset, index: np.ndarray) -> None:
    if ds.shape[0] != len(index):
        raise FeatureFileError(f"{ds.file.filename}: {ds.name} has {ds.shape[0]} rows but its split's index has "
                               f"{len(index)}; the file is malformed")


# --------------------------------------------------------------------------- reading

def _open_both(info: PairInfo) -> tuple[list[h5py.File], h5py.Dataset, h5py.Dataset]:
    fa = open_features(info.features)
    fb = fa if info.target_features == info.features else open_features(info.target_features)
    ds_a = get_features(fa, info.split, info.source, info.layer)
    ds_b = get_features(fb, info.split, info.target, info.layer_b)
    files = [fa] if fb is fa else [fa, fb]
    return files, ds_a, ds_b


def _read_into(ds: h5py.Dataset, out: Tensor, start: int, stop: int, dest: int = 0) -> None:
    """Rows ``start:stop`` of ``ds`` into ``out[dest:dest + stop - start]`` with one contiguous read."""
    view = out.numpy()
    ds.read_direct(view, np.s_[start:stop], np.s_[dest:dest + stop - start])


def _first_nonfinite_row(x: Tensor, chunk: int = 256) -> int | None:
    for s in range(0, x.shape[0], chunk):
        bad = ~torch.isfinite(x[s:s + chunk].reshape(min(chunk, x.shape[0] - s), -1)).all(dim=1)
        if bad.any():
            return s + int(torch.nonzero(bad)[0])
    return None


def nonfinite_message(info: PairInfo, which: str, row: int) -> str:
    path = info.features if which == "a" else info.target_features
    return (f"the {'source' if which == 'a' else 'target'} features {info.dataset_path(which)} in {path} hold "
            f"NaN/inf values (first at row {row}); re-extract them (python cli.py extract ... --overwrite) "
            f"or check the network that produced them")


def find_nonfinite(info: PairInfo, block_rows: int = 256) -> tuple[str, int] | None:
    """Scan both datasets on disk; ``(which, row)`` of the first non-finite value, or None."""
    files, ds_a, ds_b = _open_both(info)
    try:
        for which, ds in (("a", ds_a), ("b", ds_b)):
            for s in range(0, info.n, block_rows):
                e = min(info.n, s + block_rows)
                block = np.empty((e - s,) + ds.shape[1:], dtype=ds.dtype)
                ds.read_direct(block, np.s_[s:e])
                bad = ~np.isfinite(block.reshape(e - s, -1)).all(axis=1)
                if bad.any():
                    return which, s + int(np.flatnonzero(bad)[0])
    finally:
        for f in files:
            f.close()
    return None


def load_arrays(info: PairInfo, device: torch.device | None = None, pin: bool = False,
                block_rows: int = 256) -> tuple[Tensor, Tensor]:
    """Both datasets whole, in their stored dtype, read in contiguous blocks; on ``device`` when given
    (one block at a time goes through host memory), else in (optionally pinned) RAM. Refuses NaN/inf,
    naming the dataset and the first bad row."""
    files, ds_a, ds_b = _open_both(info)
    try:
        out = []
        for which, ds in (("a", ds_a), ("b", ds_b)):
            dt = _TORCH_DTYPES[np.dtype(ds.dtype)]
            on_dev = device is not None and device.type != "cpu"
            if which == "a" and info.spatial:            # resized block by block to the target's H x W
                dst = torch.empty((info.n,) + info.held_shape_a, dtype=dt, device=device if on_dev else None,
                                  pin_memory=pin and not on_dev)
                for s in range(0, info.n, block_rows):
                    e = min(info.n, s + block_rows)
                    blk = torch.empty((e - s,) + ds.shape[1:], dtype=dt)
                    _read_into(ds, blk, s, e)
                    dst[s:e].copy_(info.resize_a(blk))
            elif on_dev:
                dst = torch.empty((info.n,) + ds.shape[1:], dtype=dt, device=device)
                stage = torch.empty((min(block_rows, info.n),) + ds.shape[1:], dtype=dt, pin_memory=True)
                for s in range(0, info.n, block_rows):
                    e = min(info.n, s + block_rows)
                    torch.cuda.current_stream(device).synchronize()   # the stage buffer is free again
                    _read_into(ds, stage, s, e)
                    dst[s:e].copy_(stage[: e - s], non_blocking=True)
                torch.cuda.current_stream(device).synchronize()
            else:
                dst = torch.empty((info.n,) + ds.shape[1:], dtype=dt, pin_memory=pin)
                for s in range(0, info.n, block_rows):
                    e = min(info.n, s + block_rows)
                    _read_into(ds, dst, s, e, s)
            row = _first_nonfinite_row(dst)
            if row is not None:
                raise NonFiniteFeatures(nonfinite_message(info, which, row))
            out.append(dst)
        return out[0], out[1]
    finally:
        for f in files:
            f.close()


# --------------------------------------------------------------------------- batch plans

def batch_plan(n: int, batch_size: int, world: int = 1) -> tuple[int, int]:
    """(steps, rows per rank per step) of an epoch: full global batches only (the last partial one is
    dropped when n > batch_size; with n <= batch_size one batch of all rows)."""
    global_b = min(batch_size, n)
    steps = max(1, n // global_b) if n >= 1 else 0
    return steps, global_b // world


class MemoryPairs:
    """Both arrays held whole, on the compute device or in (pinned) RAM."""

    def __init__(self, xa: Tensor, xb: Tensor, device: torch.device, rows: np.ndarray | None = None):
        """``rows``: the (sorted) rows of the arrays this source serves; all of them when None."""
        assert xa.shape[0] == xb.shape[0]
        self.xa, self.xb, self.device = xa, xb, torch.device(device)
        self.rows = None if rows is None else torch.as_tensor(np.asarray(rows, dtype=np.int64)).to(xa.device)
        self.n = int(xa.shape[0]) if rows is None else len(rows)
        self.on_device = xa.device.type == self.device.type and self.device.type != "cpu"

    def _gather(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """idx: (b,) rows, on the arrays' device -> float32 batches on the compute device."""
        if self.on_device or self.device.type == "cpu":
            return self.xa.index_select(0, idx).float(), self.xb.index_select(0, idx).float()
        out = []
        for x in (self.xa, self.xb):
            buf = torch.empty((len(idx),) + tuple(x.shape[1:]), dtype=x.dtype, pin_memory=x.is_pinned())
            torch.index_select(x, 0, idx, out=buf)
            out.append(buf.to(self.device, non_blocking=True).float())
        return out[0], out[1]

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled epoch: rank ``rank`` gets its slice of every global batch."""
        steps, b = batch_plan(self.n, batch_size, world)
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch, TRANSNET_STREAM))
        perm = torch.randperm(self.n, generator=g).to(self.xa.device)   # one host->device copy per epoch
        if self.rows is not None:
            perm = self.rows[perm]
        global_b = min(batch_size, self.n)
        for s in range(steps):
            rows = perm[s * global_b + rank * b: s * global_b + (rank + 1) * b]
            yield self._gather(rows)

    def steps(self, batch_size: int, world: int = 1) -> int:
        return batch_plan(self.n, batch_size, world)[0]

    def sequential(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """All rows in order (evaluation)."""
        for s in range(0, self.n, batch_size):
            e = min(self.n, s + batch_size)
            if self.rows is not None:
                yield self._gather(self.rows[s:e])
                continue
            a, b = self.xa[s:e], self.xb[s:e]
            yield a.to(self.device, non_blocking=True).float(), b.to(self.device, non_blocking=True).float()

    def source_blocks(self, rows: int = 256) -> Iterator[Tensor]:
        for s in range(0, self.n, rows):
            yield self.xa[s:s + rows] if self.rows is None else self.xa.index_select(0, self.rows[s:s + rows])


class BlockPairs:
    """Contiguous-block reads from HDF5 in a shuffled block order, in a reader thread.

    ``block_rows`` rows per read; rows are shuffled within a window of ``window_blocks`` blocks and
    batches are cut across block boundaries. Under DDP block i of the epoch's order goes to rank
    i % world (each rank reads only its own blocks) and all ranks do the same number of steps.
    """

    def __init__(self, info: PairInfo, device: torch.device, block_rows: int = 256, window_blocks: int = 4,
                 prefetch: int = 4, rows: np.ndarray | None = None):
        """``rows``: the rows of the split this source serves (read in blocks, the others dropped); all
        of them when None."""
        self.info, self.device = info, torch.device(device)
        self.keep = None
        if rows is not None:
            self.keep = np.zeros(info.n, dtype=bool)
            self.keep[np.asarray(rows, dtype=np.int64)] = True
        self.n = info.n if rows is None else len(rows)
        self.block_rows, self.window_blocks, self.prefetch = int(block_rows), int(window_blocks), int(prefetch)
        self.pin = self.device.type == "cuda"
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)   # set on device, read per epoch

    # -- the plan of one epoch (the same on every rank)
    def _blocks(self, seed: int, epoch: int, shuffle: bool) -> tuple[list[tuple[int, int]], torch.Generator]:
        """Block order. Full blocks are shuffled; a short last block stays last, so the rows each rank
        gets (blocks ``rank::world``) do not change between epochs."""
        blocks = [(s, min(self.info.n, s + self.block_rows)) for s in range(0, self.info.n, self.block_rows)]
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch, TRANSNET_STREAM))
        if shuffle:
            full = [blk for blk in blocks if blk[1] - blk[0] == self.block_rows]
            short = [blk for blk in blocks if blk[1] - blk[0] != self.block_rows]
            blocks = [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + short
        return blocks, g

    def _windows(self, blocks: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        w = self.window_blocks
        return [blocks[i:i + w] for i in range(0, len(blocks), w)]

    def steps(self, batch_size: int, world: int = 1) -> int:
        """Steps per epoch: the same in every epoch and on every rank, so DDP ranks never wait on each
        other. A rank reads the full blocks at its positions (``rank::world``) of a shuffled order, and
        with validation rows held out blocks serve different numbers of rows; so each rank is counted at
        its fewest: its number of full blocks taken from the ones serving the fewest rows (plus the short
        last block, which stays at its position)."""
        blocks, _ = self._blocks(0, 0, False)
        n_full = sum(1 for s, e in blocks if e - s == self.block_rows)
        fewest_first = sorted(self._count(s, e) for s, e in blocks[:n_full])
        _, b = batch_plan(self.n, batch_size, world)
        per_rank = []
        for r in range(world):
            rows = sum(fewest_first[:len(range(r, n_full, world))])
            rows += sum(self._count(s, e) for i, (s, e) in enumerate(blocks[n_full:], n_full) if i % world == r)
            per_rank.append(rows // b)
        return min(per_rank)

    def _count(self, s: int, e: int) -> int:
        """Rows of block [s, e) this source serves."""
        return e - s if self.keep is None else int(self.keep[s:e].sum())

    def _read(self, ds: h5py.Dataset, s: int, e: int) -> Tensor:
        """Block [s, e) of ``ds``, the rows this source serves."""
        t = torch.empty((e - s,) + ds.shape[1:], dtype=_TORCH_DTYPES[np.dtype(ds.dtype)])
        _read_into(ds, t, s, e)
        return t if self.keep is None else t[torch.from_numpy(self.keep[s:e])]

    def _reader(self, windows: list[list[tuple[int, int]]], g: torch.Generator | None, b: int, steps: int,
                out: queue.Queue, stop: threading.Event) -> None:
        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            files, ds_a, ds_b = _open_both(self.info)
            try:
                buf_a = buf_b = None                        # rows read but not yet batched
                done = 0
                for win in windows:
                    rows = sum(self._count(s, e) for s, e in win)
                    if self.keep is None:
                        ta = torch.empty((rows,) + ds_a.shape[1:], dtype=_TORCH_DTYPES[np.dtype(ds_a.dtype)])
                        tb = torch.empty((rows,) + ds_b.shape[1:], dtype=_TORCH_DTYPES[np.dtype(ds_b.dtype)])
                        pos = 0
                        for s, e in win:                    # contiguous block reads
                            _read_into(ds_a, ta, s, e, pos)
                            _read_into(ds_b, tb, s, e, pos)
                            pos += e - s
                    else:                                   # the same reads, the rows of other sources dropped
                        ta = torch.cat([self._read(ds_a, s, e) for s, e in win])
                        tb = torch.cat([self._read(ds_b, s, e) for s, e in win])
                    ta = self.info.resize_a(ta)              # (rows, C_A, H_B, W_B) when resized
                    if g is not None:                       # shuffle rows within the window
                        p = torch.randperm(rows, generator=g)
                        ta, tb = ta[p], tb[p]
                    if buf_a is not None and len(buf_a):    # carry the remainder across windows
                        ta, tb = torch.cat([buf_a, ta]), torch.cat([buf_b, tb])
                    off = 0
                    while len(ta) - off >= b and done < steps:
                        ba, bb = ta[off:off + b], tb[off:off + b]
                        if self.pin:
                            ba, bb = ba.pin_memory(), bb.pin_memory()
                        if not put((ba, bb)):
                            return
                        done += 1
                        off += b
                    buf_a, buf_b = ta[off:], tb[off:]
                    if done >= steps:
                        break
                if g is None and buf_a is not None and len(buf_a) and done < steps:  # sequential: last partial
                    if not put((buf_a, buf_b)):
                        return
            finally:
                for f in files:
                    f.close()
            put(None)
        except BaseException as e:  # handed to the consumer
            put(e)

    def _stream(self, windows, g, b, steps) -> Iterator[tuple[Tensor, Tensor]]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        t = threading.Thread(target=self._reader, args=(windows, g, b, steps, q, stop), daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                a, bb = (x.to(self.device, non_blocking=True).float() for x in item)
                self.nonfinite |= ~(torch.isfinite(a).all() & torch.isfinite(bb).all())
                yield a, bb
        finally:
            stop.set()
            t.join()

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """One shuffled epoch; under DDP rank ``rank`` reads only its blocks (``rank::world``)."""
        blocks, g = self._blocks(seed, epoch, True)
        _, b = batch_plan(self.n, batch_size, world)
        return self._stream(self._windows(blocks[rank::world]), g, b, self.steps(batch_size, world))

    def sequential(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """All rows in order (evaluation)."""
        blocks, _ = self._blocks(0, 0, False)
        return self._stream(self._windows(blocks), None, batch_size, (self.n + batch_size - 1) // batch_size)

    def source_blocks(self, rows: int = 256) -> Iterator[Tensor]:
        files, ds_a, _ = _open_both(self.info)
        try:
            for s in range(0, self.info.n, rows):
                yield self.info.resize_a(self._read(ds_a, s, min(self.info.n, s + rows)))
        finally:
            for f in files:
                f.close()


# --------------------------------------------------------------------------- placement

def choose_placement(nbytes: int, device: torch.device, data_on: str = "auto",
                     reserved: int = 0, copies: int = 1) -> str:
    """``device`` (GPU memory), ``ram`` or ``disk`` for ``nbytes`` of features (``reserved``: bytes already
    placed). On a CPU run ``device`` and ``ram`` are the same place and are called ``ram``. ``copies``:
    the processes on this node that each hold their own copy in RAM (a DDP fit's local ranks; each has
    its own GPU)."""
    require_choice("--data_on", data_on, DATA_ON)
    if data_on != "auto":
        return "ram" if data_on == "device" and device.type != "cuda" else data_on
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes + reserved <= MEMORY_FRACTION * free:
            return "device"
    import psutil

    if (nbytes + reserved) * copies <= MEMORY_FRACTION * psutil.virtual_memory().available:
        return "ram"
    return "disk"


def make_source(info: PairInfo, device: torch.device, placement: str, block_rows: int = 256,
                window_blocks: int = 4) -> MemoryPairs | BlockPairs:
    """Build the batch source of a placement (``device``: GPU memory; ``ram``: pinned when the device
    is a GPU; ``disk``: contiguous HDF5 blocks)."""
    return make_sources(info, device, placement, [None], block_rows, window_blocks)[0]


def make_sources(info: PairInfo, device: torch.device, placement: str, parts: list[np.ndarray | None],
                 block_rows: int = 256, window_blocks: int = 4) -> list[MemoryPairs | BlockPairs]:
    """One source per part of the split (``parts``: sorted row numbers, or None for every row); in
    memory the parts share one copy of the split."""
    if placement == "disk":
        return [BlockPairs(info, device, block_rows, window_blocks, rows=rows) for rows in parts]
    if placement == "device" and device.type != "cpu":
        xa, xb = load_arrays(info, device=device, block_rows=block_rows)
    else:
        xa, xb = load_arrays(info, pin=device.type == "cuda", block_rows=block_rows)
    return [MemoryPairs(xa, xb, device, rows) for rows in parts]


def source_channel_std(src: MemoryPairs | BlockPairs, rows: int = 256) -> Tensor:
    """(C,) per-channel std of the source features about their per-channel mean (float64 stream)."""
    acc = ChannelMoments()
    for block in src.source_blocks(rows):
        acc.update(block)
    return acc.std().float().cpu()


def target_variance(src: MemoryPairs | BlockPairs, rows: int = 256) -> float:
    """Per-channel centred mean square of the target features (the ``target_var`` loss scale)."""
    acc = ChannelMoments()
    for _, b in src.sequential(rows):
        acc.update(b)
    return acc.variance()


def count_constant_source(src: MemoryPairs | BlockPairs, rows: int = 256) -> tuple[int, int]:
    """(spatially constant non-zero slices, all slices) of the source features, over (sample, channel);
    one pass over x_A in contiguous blocks (see ``transnet.model.constant_slices``)."""
    bad = total = 0
    for block in src.source_blocks(rows):
        bad += int(constant_slices(block).sum())
        total += int(block.shape[0] * block.shape[1])
    return bad, total
