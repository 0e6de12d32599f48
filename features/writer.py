"""The background writer: batches of host tensors come through a bounded queue and are written into
the pre-allocated datasets by one thread, so the forward passes and the HDF5 writes overlap and memory
does not grow with the number of images.

Progress is crash-safe: ``rows_done`` of a dataset is raised only after the rows it covers were
written and flushed without an error, at most every ``flush_s`` seconds (and on
:meth:`FeatureWriter.close`), and ``complete`` is set when the last row lands, after the file was
also synced to the disk (``fsync``: a file system that reports a full disk only at write-back, such as
NFS, reports it there, before anything is marked complete). A process killed mid-way leaves a readable
file marked incomplete.

Write errors surface: each dataset is written through its own handle with no chunk cache
(:func:`features.store.open_for_writing`), so every row goes to the file in the write call itself and
a full disk raises there, in the writer thread; the error is handed to the main thread (the next
:meth:`FeatureWriter.put` or :meth:`FeatureWriter.close` raises it) as a
:class:`common.files.WriteFailed` naming the file, net, layer and split. Nothing half-written is
marked: the datasets stay incomplete and resumable.

Before a batch is written its values are checked (``features/nonfinite.py``): a float16 batch with a
non-finite stored value is refused (the writer fails, nothing of that batch lands), and the
``nonfinite`` / ``max_abs`` counts of each dataset are raised together with ``rows_done``.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import torch

from common.faults import fault_point
from common.files import is_disk_error, write_failed
from features import store
from features.nonfinite import ValueCounts, batch_counts, check_storable, write_counts


@dataclass
class WriteBatch:
    split: str
    start: int                                   # first row in the target file
    stop: int
    arrays: dict[str, torch.Tensor]              # dataset path -> (stop - start, ...) host tensor
    ranges: torch.Tensor                         # (len(arrays), 2) float32 host: [min, max] of the computed
                                                 # values of each array's rows still to write, arrays' order
    event: Any = None                            # CUDA event to wait for before reading the host tensors


class HostBuffers:
    """Reusable host buffers (pinned when ``pin``: the device-to-host copies of a batch are then
    asynchronous, ``non_blocking`` and ordered by the batch's CUDA event). The forward side takes a
    buffer per array; the writer gives it back once its rows are written, so the pinned memory in use
    is bounded by the batches in flight and none is allocated per batch after the first few."""

    def __init__(self, pin: bool):
        self.pin = pin
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.allocated = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
            self.allocated += 1
        return torch.empty(key[0], dtype=dtype, pin_memory=self.pin)

    def give(self, t: torch.Tensor) -> None:
        with self._lock:
            self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)


class FeatureWriter:
    """Writes batches from a bounded queue in a thread; raises ``rows_done`` only after a flush."""

    def __init__(self, f: h5py.File, starts: dict[str, int], max_batches: int, flush_s: float,
                 on_landed: Callable[[int], None] | None = None, counts: dict[str, ValueCounts] | None = None,
                 buffers: HostBuffers | None = None):
        self.f = f
        store.hold_metadata(f)
        self.ds = {p: store.open_for_writing(f, p) for p in starts}     # no chunk cache: errors raise at once
        self.q: queue.Queue = queue.Queue(maxsize=max(1, max_batches))
        self.flush_s = flush_s
        self.done = dict(starts)                 # rows written (in order) per dataset path
        self.marked = dict(starts)               # rows_done on disk
        self.n = {p: f[p].shape[0] for p in starts}
        self.dtypes = {p: str(f[p].dtype) for p in starts}
        self.counts = {p: (counts or {}).get(p, ValueCounts()) for p in starts}   # of the rows written, per path
        self.error: BaseException | None = None
        self.batches = 0
        self.bytes = 0
        self.on_landed = on_landed
        self.buffers = buffers                   # the arrays of a written batch go back there
        self._last_flush = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="kc-h5-writer", daemon=True)
        self.thread.start()

    def put(self, item: WriteBatch) -> None:
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
            finally:
                if self.buffers is not None:     # written (or abandoned): the buffers can take the next batch
                    for t in item.arrays.values():
                        self.buffers.give(t)
                item.arrays = {}                 # release the host memory of the batch at once

    def _write(self, b: WriteBatch) -> None:
        if b.event is not None:
            b.event.synchronize()
        ranges = b.ranges.tolist()
        checked = []                             # every array of the batch is checked before any is written
        for i, (path, t) in enumerate(b.arrays.items()):
            lo = max(b.start, self.done[path])
            if lo >= b.stop:
                continue
            if lo != self.done[path]:
                raise RuntimeError(f"rows of /{path} arrived out of order ({lo} after {self.done[path]})")
            arr = np.ascontiguousarray(t[lo - b.start:].numpy())
            vmin, vmax = ranges[i]
            counts = batch_counts(vmin, vmax, arr, self.dtypes[path])
            check_storable(path, (lo, b.stop), vmin, vmax, counts, self.dtypes[path], self.f.filename)
            checked.append((path, lo, arr, counts))
        for path, lo, arr, counts in checked:
            try:
                fault_point("h5_write", self.f.filename)       # the reliability tests fill the disk here
                self.ds[path].write_direct(arr, dest_sel=np.s_[lo:b.stop])
            except OSError as e:
                raise self._failed(e, [path]) from e
            self.done[path] = b.stop
            self.counts[path] = self.counts[path].add(counts)
            self.bytes += arr.nbytes

    def _checkpoint(self) -> None:
        """Flush the data, then raise rows_done/complete and the counts, then flush those attributes."""
        changed = [p for p in self.done if self.done[p] != self.marked[p]]
        if not changed:
            return
        try:                                     # the rows are in the file (on the disk when one completes)
            self._sync(durable=any(self.done[p] >= self.n[p] for p in changed))
        except OSError as e:
            raise self._failed(e, changed) from e
        for p in changed:
            ds = self.ds[p]
            write_counts(ds, self.counts[p])
            if self.done[p] >= self.n[p]:
                store.mark_complete(ds)
            else:
                store.mark_rows_done(ds, self.done[p])
            self.marked[p] = self.done[p]
        try:
            self._sync()
        except OSError as e:
            raise self._failed(e, changed) from e
        self._last_flush = time.monotonic()

    def _sync(self, durable: bool = False) -> None:
        """HDF5's buffers to the file; with ``durable`` the file to the disk too (``fsync``: a disk that
        reports a full disk only at write-back, such as NFS, reports it here)."""
        fault_point("h5_flush", self.f.filename)
        self.f.flush()
        if durable and self.f.driver == "sec2":
            os.fsync(self.f.id.get_vfd_handle())

    def _failed(self, e: OSError, paths: list[str]) -> BaseException:
        """A disk error as the one-paragraph message of the module doc; other errors unchanged."""
        if not is_disk_error(e):
            return e
        split, net, layer = paths[0].split("/", 2)
        more = f", and {len(paths) - 1} more datasets" if len(paths) > 1 else ""
        return write_failed(e, self.f.filename, f"net {net!r}, layer {layer!r}, split {split!r}{more}",
                            "the extraction stopped; the file stays readable with the unfinished datasets marked "
                            "incomplete: free space (or fix the disk) and re-run the same command with --resume")
