"""The feature file: ``kc-features`` version 1 (see ``design.md``; a contract other tools read).

    /                       attrs: schema="kc-features", schema_version=1, dataset, transform (JSON),
                                   image_size, created_utc, code_version, command
    /<split>/index          (N,) int64 dataset index of each row, rows in dataset order
    /<split>/label          (N,) int64
    /<split>/<net>/<layer>  (N, C, H, W) float16|float32, one sample per chunk
        attrs: checkpoint, checkpoint_sha256, arch, layer, conv_layer?, point, complete, rows_done,
               nonfinite? (NaN/inf values among the rows done), max_abs? (their largest finite |value|)
    /<split>/<net>/logits   (N, num_classes) float32, optional

A feature dataset may also be an h5py virtual dataset over shard files beside the file (written by
``extract`` under torchrun); :func:`get_features` refuses one whose shard files are missing.

Readers need only the root schema/version, the datasets and ``complete``. This module is the only
place that knows the layout: everything else reads and writes through it (progress through
:func:`dataset_progress`, the reserved names through :data:`SPLIT_KEYS` and :data:`LOGITS`). The
schema check dispatches on the version through :data:`READERS`; an unknown version is refused.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from common.errors import UserError
from common.provenance import code_version, now_utc, sha256_file
from common.registry import unknown_choice_message
from common.rundir import PathLock, lock_holder

SCHEMA = "kc-features"
SCHEMA_VERSION = 1
# The reserved names of the layout: no net may be named like a per-split dataset, no layer like logits.
INDEX, LABEL = "index", "label"       # per split: the dataset index and the label of each row
SPLIT_KEYS = (INDEX, LABEL)           # per-split datasets that are not nets
LOGITS = "logits"                     # the per-net dataset that is not a layer
PROGRESS_ATTRS = ("complete", "rows_done")   # a feature dataset's progress: read with dataset_progress()
CHUNK_CACHE_BYTES = 64 << 20          # raw-data chunk cache per open file


class UnverifiedProvenanceWarning(UserWarning):
    """Stored features whose checkpoint can no longer be read: nothing tells whether they are its features."""


class FeatureFileError(UserError):
    """A feature file that is missing, corrupt, of another schema/version, or lacks what was asked."""


class NonFiniteFeatures(UserError):
    """Features (a dataset of a feature file, or an array of them) hold NaN or inf values."""


# --------------------------------------------------------------------------- opening

def open_features(path: str | os.PathLike, mode: str = "r") -> h5py.File:
    """Open a feature file and check its schema. Corrupt/truncated files fail with the path named."""
    path = Path(path)
    if mode == "r" and not path.is_file():
        raise FeatureFileError(f"feature file {path} does not exist")
    try:
        f = h5py.File(path, mode, rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=100_003)
    except OSError as e:
        raise open_error(path, mode, e) from e
    if mode != "w" and (mode == "r" or SCHEMA_ATTR in f.attrs):
        try:
            with named_errors(path):
                check_schema(f, path, structure=mode == "r")
        except Exception:
            f.close()
            raise
    return f


def open_error(path: Path, mode: str, e: OSError) -> FeatureFileError:
    """Why a feature file did not open, told apart: written by a running extraction (its pid), locked by
    another program, a read-only file system, no permission, a full disk, or a damaged file. Only the
    last one suggests ``--overwrite``, and only when no process holds the file."""
    text, code = str(e), e.errno
    holder = lock_holder(lock_path(path))
    if holder is not None:
        return FeatureFileError(f"feature file {path} is being written by {holder} (a running extraction); wait for "
                                f"it to finish (or stop it) before reading or changing the file")
    if code == errno.EAGAIN or "unable to lock file" in text:
        return FeatureFileError(f"feature file {path} is locked by another process that has it open for writing "
                                f"(HDF5's file lock); wait for it to close the file. ({text})")
    if code == errno.EROFS or "Read-only file system" in text:
        return FeatureFileError(f"feature file {path} is on a read-only file system: it can be read but not "
                                f"{'created' if mode == 'w' else 'changed'}; write to another --out")
    if code in (errno.EACCES, errno.EPERM) or "Permission denied" in text:
        return FeatureFileError(f"no permission to {'read' if mode == 'r' else 'write'} the feature file {path} "
                                f"({text})")
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text:
        return FeatureFileError(f"no space left on device while opening the feature file {path} for writing; free "
                                f"space and re-run")
    return FeatureFileError(f"feature file {path} cannot be opened as HDF5 ({text}); it is corrupt or truncated (a "
                            f"copy or a write that stopped early, a damaged disk): re-extract it (python cli.py extract "
                            f"... --overwrite) or restore it from a good copy")


@contextlib.contextmanager
def named_errors(path: str | os.PathLike) -> Iterator[None]:
    """HDF5 failures of reading a file's structure (damaged metadata: "wrong B-tree signature", ...) as
    a :class:`FeatureFileError` that names the file."""
    try:
        yield
    except FeatureFileError:
        raise
    except (OSError, RuntimeError) as e:
        raise FeatureFileError(f"feature file {path} is damaged: HDF5 cannot read its structure ({e}); re-extract it "
                               f"(python cli.py extract ... --overwrite) or restore it from a good copy") from e


def _names_file(fn: Callable) -> Callable:
    """Decorate a reader whose first argument is the open file: its HDF5 failures name the file."""
    @functools.wraps(fn)
    def wrapper(f: h5py.File, *args: Any, **kwargs: Any) -> Any:
        with named_errors(f.filename):
            return fn(f, *args, **kwargs)
    return wrapper


SCHEMA_ATTR = "schema"


def _read_v1(f: h5py.File, where: str) -> None:
    """Version 1: every split holds its ``index`` and ``label``, one row per sample each (what every
    reader here relies on; a file from another tool that lacks them fails on opening, named)."""
    for split in list_splits(f):
        g = f[split]
        missing = [k for k in SPLIT_KEYS if k not in g]
        if missing:
            raise FeatureFileError(f"{where}: split {split!r} has no {' or '.join(missing)} dataset "
                                   f"({SCHEMA} v1 needs /<split>/index and /<split>/label)")
        if g[INDEX].shape != g[LABEL].shape or len(g[INDEX].shape) != 1:
            raise FeatureFileError(f"{where}: split {split!r} has index {g[INDEX].shape} and label "
                                   f"{g[LABEL].shape}; {SCHEMA} v1 needs two (N,) datasets")


# The schema check of each version this workbench reads; a new version is an added entry.
READERS: dict[int, Callable[[h5py.File, str], None]] = {1: _read_v1}


def check_schema(f: h5py.File, path: str | os.PathLike = "", structure: bool = False) -> None:
    """Refuse a file of another schema or of a version not in :data:`READERS`; with ``structure``, also
    run that version's check of the layout (a file being written is checked by its root only)."""
    where = str(path or f.filename)
    schema = _attr_str(f.attrs.get("schema"))
    version = f.attrs.get("schema_version")
    if schema != SCHEMA:
        raise FeatureFileError(f"{where} is not a {SCHEMA} file (schema attribute {schema!r})")
    try:
        reader = READERS.get(int(version))
    except (TypeError, ValueError):                # absent or not a number
        reader = None
    if reader is None:
        raise FeatureFileError(f"{where} has {SCHEMA} version {version}; this workbench reads "
                               f"version{'s' if len(READERS) > 1 else ''} {', '.join(map(str, sorted(READERS)))} only")
    if structure:
        reader(f, where)


def _attr_str(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def attrs_dict(obj: h5py.HLObject) -> dict[str, Any]:
    """HDF5 attributes as plain Python values (JSON strings decoded where they parse)."""
    out = {}
    for k, v in obj.attrs.items():
        v = _attr_str(v)
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        if isinstance(v, str) and v[:1] in "{[":
            try:
                v = json.loads(v)
            except json.JSONDecodeError:
                pass
        out[k] = v
    return out


# --------------------------------------------------------------------------- listing

@_names_file
def list_splits(f: h5py.File) -> list[str]:
    return sorted(k for k in f.keys() if isinstance(f[k], h5py.Group))


@_names_file
def list_nets(f: h5py.File, split: str) -> list[str]:
    g = _split_group(f, split)
    return sorted(k for k in g.keys() if isinstance(g[k], h5py.Group))


@_names_file
def list_layers(f: h5py.File, split: str, net: str) -> list[str]:
    g = _net_group(f, split, net)
    return sorted(k for k in g.keys() if k != LOGITS)


def _split_group(f: h5py.File, split: str) -> h5py.Group:
    if split not in f or not isinstance(f[split], h5py.Group):
        raise FeatureFileError(f"{unknown_choice_message('split', split, list_splits(f))} (file {f.filename})")
    return f[split]


def _net_group(f: h5py.File, split: str, net: str) -> h5py.Group:
    g = _split_group(f, split)
    if net not in g or not isinstance(g[net], h5py.Group):
        raise FeatureFileError(f"{unknown_choice_message('net', net, list_nets(f, split))} "
                               f"(split {split!r} of {f.filename})")
    return g[net]


@dataclass(frozen=True)
class Progress:
    """How far a feature dataset was written: ``complete``, and the rows written and flushed so far
    (all of them when complete, whatever a foreign writer recorded)."""

    complete: bool
    rows_done: int
    rows: int                       # the dataset's N

    def __str__(self) -> str:
        return "complete" if self.complete else f"incomplete, {self.rows_done} of {self.rows} rows"


def dataset_progress(ds: h5py.Dataset) -> Progress:
    """The ``complete`` and ``rows_done`` attributes of a feature dataset (absent: nothing written)."""
    complete = bool(ds.attrs.get("complete", False))
    rows = int(ds.shape[0])
    return Progress(complete, rows if complete else int(ds.attrs.get("rows_done", 0)), rows)


@_names_file
def get_features(f: h5py.File, split: str, net: str, layer: str, require_complete: bool = True) -> h5py.Dataset:
    """The ``(N, C, H, W)`` dataset of one net and layer; incomplete ones are refused by default."""
    g = _net_group(f, split, net)
    if layer not in g or layer == LOGITS:
        raise FeatureFileError(f"{unknown_choice_message('layer', layer, list_layers(f, split, net))} "
                               f"(net {net!r}, split {split!r} of {f.filename}; python cli.py inspect "
                               f"{f.filename} lists what the file holds)")
    ds = CheckedDataset(g[layer].id)
    check_virtual_sources(ds)
    progress = dataset_progress(ds)
    if require_complete and not progress.complete:
        raise FeatureFileError(
            f"{f.filename}: /{split}/{net}/{layer} is incomplete ({progress.rows_done} of {progress.rows} rows); "
            f"resume the extraction by re-running the same extract command with --resume")
    return ds


@_names_file
def get_logits(f: h5py.File, split: str, net: str) -> h5py.Dataset:
    g = _net_group(f, split, net)
    if LOGITS not in g:
        raise FeatureFileError(f"{f.filename}: net {net!r} has no logits in split {split!r}; extract with --logits")
    return CheckedDataset(g[LOGITS].id)


class CheckedDataset(h5py.Dataset):
    """An h5py dataset whose failed reads name the file, the dataset and the rows: a row whose fletcher32
    checksum fails (its bytes changed after writing: a bit flip on the disk or in a copy), or an I/O
    error. Every reader of :func:`get_features` / :func:`get_logits` gets one (it is an h5py.Dataset)."""

    def __getitem__(self, args, new_dtype=None):
        try:
            return super().__getitem__(args, new_dtype)
        except OSError as e:
            raise self.read_error(e, args) from e

    def read_direct(self, dest, source_sel=None, dest_sel=None):
        try:
            return super().read_direct(dest, source_sel, dest_sel)
        except OSError as e:
            raise self.read_error(e, source_sel) from e

    def read_error(self, e: OSError, sel: Any) -> FeatureFileError:
        """The rows of ``sel`` (first axis) that fail on their own, found one row at a time."""
        rows = _selected_rows(sel, self.shape[0])
        bad = []
        for r in rows:
            try:
                h5py.Dataset.__getitem__(self, np.s_[r:r + 1])
            except OSError:
                bad.append(r)
        where = f"rows {_ranges(bad)}" if bad else f"rows {_ranges(rows)}"
        if self.fletcher32 and "filter" in str(e):
            return FeatureFileError(
                f"{self.file.filename}: {self.name} {where} fail their fletcher32 checksum: the stored bytes changed "
                f"after they were written (a bit flip on the disk or in a copy). Re-extract the file "
                f"(python cli.py extract ... --overwrite) or restore it from a good copy ({e})")
        return FeatureFileError(f"{self.file.filename}: {self.name} {where} cannot be read ({e}); the file is damaged "
                                f"or its disk failed: re-extract it or restore it from a good copy")


def _selected_rows(sel: Any, n: int) -> list[int]:
    """The rows (first axis) a selection reads: a slice, an index, a list, or everything."""
    first = sel[0] if isinstance(sel, tuple) and sel else sel
    if first is None or first is Ellipsis:
        return list(range(n))
    if isinstance(first, slice):
        return list(range(n))[first]
    if isinstance(first, (int, np.integer)):
        return [int(first) % n]
    try:
        return sorted({int(r) for r in np.asarray(first).ravel()})
    except (TypeError, ValueError):
        return list(range(n))


def _ranges(rows: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7" (at most 8 runs shown)."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:8])
    return text + (f" and {len(runs) - 8} more runs" if len(runs) > 8 else "")


@_names_file
def read_index(f: h5py.File, split: str) -> np.ndarray:
    return np.asarray(_split_group(f, split)[INDEX][...], dtype=np.int64)


@_names_file
def read_labels(f: h5py.File, split: str) -> np.ndarray:
    return np.asarray(_split_group(f, split)[LABEL][...], dtype=np.int64)


def read_rows(ds: h5py.Dataset, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
    """Rows ``start:stop`` as one contiguous read (never per-sample fancy indexing)."""
    out = np.empty((stop - start,) + ds.shape[1:], dtype=ds.dtype)
    ds = ds if isinstance(ds, CheckedDataset) else CheckedDataset(ds.id)
    ds.read_direct(out, np.s_[start:stop])
    return out.astype(dtype, copy=False)


def iter_blocks(ds: h5py.Dataset, block_rows: int, dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(start, rows)`` blocks of a dataset in order."""
    n = ds.shape[0]
    for s in range(0, n, block_rows):
        yield s, read_rows(ds, s, min(n, s + block_rows), dtype)


def provenance_of(ds: h5py.Dataset) -> dict[str, Any]:
    """Provenance attributes of a feature dataset plus the file's root attributes."""
    return {"file": str(ds.file.filename), "dataset": ds.name, "root": attrs_dict(ds.file), **attrs_dict(ds)}


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def check_checkpoint_unchanged(ds: h5py.Dataset, allow: bool = False) -> None:
    """Refuse features whose checkpoint file changed since extraction (its sha256 differs from the
    recorded ``checkpoint_sha256``). A checkpoint that is no longer there cannot be checked: it passes
    with a :class:`UnverifiedProvenanceWarning`; ``allow`` (``--allow_changed_checkpoints``) skips the check."""
    path, want = ds.attrs.get("checkpoint"), ds.attrs.get("checkpoint_sha256")
    if allow or not path or not want:
        return
    p = Path(str(path))
    if not p.is_file():
        warnings.warn(UnverifiedProvenanceWarning(
            f"{ds.file.filename}: the checkpoint {p} that {ds.name} was extracted from is gone, so the features' "
            f"provenance cannot be verified (recorded sha256 {str(want)[:12]}...)"), stacklevel=2)
        return
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(p)
    have = _SHA_CACHE[key]
    if have != str(want):
        raise FeatureFileError(
            f"{ds.file.filename}: {ds.name} was extracted from {p} (sha256 {str(want)[:12]}...), but that checkpoint "
            f"now has sha256 {have[:12]}...: it changed since extraction, so the stored features are not its "
            f"features. Re-extract (python cli.py extract ... --overwrite), or pass --allow_changed_checkpoints "
            f"to use the stored features anyway")


# --------------------------------------------------------------------------- writing

def init_root(f: h5py.File, dataset: str, transform: dict[str, Any], image_size: int, command: str) -> None:
    f.attrs["schema"] = SCHEMA
    f.attrs["schema_version"] = SCHEMA_VERSION
    f.attrs["dataset"] = dataset
    f.attrs["transform"] = json.dumps(transform, sort_keys=True)
    f.attrs["image_size"] = int(image_size)
    f.attrs["created_utc"] = now_utc()
    f.attrs["code_version"] = code_version()
    f.attrs["command"] = command


def init_split(f: h5py.File, split: str, index: np.ndarray, labels: np.ndarray) -> h5py.Group:
    """Create ``/<split>`` with its ``index`` and ``label``; an existing split must hold the same rows."""
    index = np.asarray(index, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if split in f:
        g = f[split]
        if not np.array_equal(g[INDEX][...], index) or not np.array_equal(g[LABEL][...], labels):
            raise FeatureFileError(f"{f.filename}: split {split!r} already holds other rows (index/label differ); "
                                   f"write to a new file")
        return g
    g = f.create_group(split)
    g.create_dataset(INDEX, data=index)
    g.create_dataset(LABEL, data=labels)
    return g


def create_features(f: h5py.File, split: str, net: str, layer: str, shape: tuple[int, ...], dtype: str,
                    attrs: dict[str, Any], compression: str | None = None, preallocate: bool = False,
                    checksum: bool = False) -> h5py.Dataset:
    """Pre-size ``/<split>/<net>/<layer>`` with one sample per chunk, marked incomplete.

    ``preallocate``: allocate every chunk now without writing fill values (sparse on disk), so that
    filling the rows later never changes the file's structure: a process killed mid-way leaves a
    file whose metadata is the one flushed at creation plus the attributes (``rows_done``).
    ``checksum``: HDF5's fletcher32 filter (4 bytes per chunk, i.e. per row): a chunk whose bytes
    changed after writing fails its read (see :class:`CheckedDataset`). Any HDF5 reader checks it.
    HDF5 fills every chunk of a filtered dataset when it allocates them early (the whole dataset
    written twice), so a checksummed dataset allocates each chunk when its row is written instead;
    the writer then keeps the chunk index in memory between flushes (:func:`hold_metadata`), so a
    killed process leaves the index of the flushed rows intact.
    """
    if dtype not in ("float16", "float32"):
        raise UserError(f"unknown --dtype {dtype!r}; valid: float16, float32")
    g = f.require_group(f"{split}/{net}")
    extra: dict[str, Any] = {}
    if shape[0] == 0:  # an empty shard: a chunk may not exceed the (zero) extent unless it can grow
        extra = {"maxshape": (None,) + tuple(shape[1:])}
    elif preallocate and compression is None and not checksum:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        extra = {"dcpl": dcpl, "fill_time": "never"}
    ds = g.create_dataset(layer, shape=shape, dtype=dtype, chunks=(1,) + tuple(shape[1:]), compression=compression,
                          fletcher32=bool(checksum), **extra)
    _set_attrs(ds, attrs)
    mark_incomplete(ds)
    return ds


def _set_attrs(obj: h5py.HLObject, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        obj.attrs[k] = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else ("" if v is None else v)


def create_virtual_features(f: h5py.File, split: str, net: str, layer: str, sources: list[tuple[str, int, int]],
                            shape: tuple[int, ...], dtype: str, attrs: dict[str, Any]) -> h5py.Dataset:
    """``/<split>/<net>/<layer>`` as an h5py virtual dataset over row shards, marked incomplete (the
    joiner marks it complete when every shard is).

    ``sources``: ``(file, start, stop)`` per shard, the shard file holding rows ``start:stop`` of the
    split at the same dataset path. Relative file names resolve against this file's folder, so the
    shard files must stay beside it (moving the folder as a whole is fine). Rows of a missing shard
    would read as NaN; :func:`get_features` refuses such a dataset instead.
    """
    layout = h5py.VirtualLayout(shape=tuple(shape), dtype=dtype)
    path = f"{split}/{net}/{layer}"
    covered = 0
    for file, start, stop in sources:
        if start != covered:
            raise ValueError(f"shards must tile the rows in order: expected a shard at row {covered}, got {start}")
        if stop > start:
            layout[start:stop] = h5py.VirtualSource(file, path, shape=(stop - start,) + tuple(shape[1:]))
        covered = stop
    if covered != shape[0]:
        raise ValueError(f"shards cover {covered} rows, the dataset has {shape[0]}")
    g = f.require_group(f"{split}/{net}")
    if layer in g:
        del g[layer]
    ds = g.create_virtual_dataset(layer, layout, fillvalue=np.nan)
    _set_attrs(ds, attrs)
    mark_incomplete(ds)
    return ds


def check_virtual_sources(ds: h5py.Dataset) -> None:
    """A virtual dataset whose source files are missing would read as fill values: refuse it."""
    if not ds.is_virtual:
        return
    base = Path(ds.file.filename).resolve().parent
    missing = sorted({m.file_name for m in ds.virtual_sources()
                      if m.file_name != "." and not (base / m.file_name).is_file() and not Path(m.file_name).is_file()})
    if missing:
        raise FeatureFileError(f"{ds.file.filename}: {ds.name} is a virtual dataset over shard files, and "
                               f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing from {base}; "
                               f"keep the shard files beside the feature file (or re-extract)")


def mark_incomplete(ds: h5py.Dataset) -> None:
    ds.attrs["complete"] = False
    ds.attrs["rows_done"] = 0
def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of a feature file: ``features.h5`` -> ``features.h5.lock`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def lock_features(path: str | os.PathLike) -> PathLock:
    """Take the writer's lock of a feature file (before it is deleted, created or changed); a file in use
    by another process is refused naming its pid. Release with ``.release()``."""
    return PathLock(lock_path(path), f"feature file {path}",
                    "wait for that extraction to finish (or stop it) or write to another --out")


def open_for_writing(f: h5py.File, path: str) -> h5py.Dataset:
    """A handle on ``path`` with no chunk cache: each write goes to the file in the write call itself, so
    a disk error raises there (a cached chunk is written when the handle closes, where h5py can only
    print the error) and nothing is left to flush after a failure."""
    dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    dapl.set_chunk_cache(0, 0, 1.0)
    return h5py.Dataset(h5py.h5d.open(f.id, path.encode(), dapl))


def hold_metadata(f: h5py.File) -> None:
    """Keep HDF5's metadata (the chunk index that grows as rows are written) in memory until the next
    flush: no eviction writes a half-updated index node to the file between two flushes, so a process
    killed there leaves the file as the last flush wrote it. Costs the index's size in memory (about
    50 bytes per row)."""
    cfg = f.id.get_mdc_config()
    cfg.evictions_enabled = False
    cfg.incr_mode, cfg.decr_mode, cfg.flash_incr_mode = 0, 0, 0     # required with evictions off
    f.id.set_mdc_config(cfg)


def mark_rows_done(ds: h5py.Dataset, rows_done: int) -> None:
    ds.attrs["rows_done"] = int(rows_done)


def mark_complete(ds: h5py.Dataset) -> None:
    ds.attrs["rows_done"] = int(ds.shape[0])
    ds.attrs["complete"] = True
