"""What the similarity metrics read: "sources" of features, one row per sample.

A source is a numpy array, a torch tensor or an h5py dataset of shape ``(N, ...)``; CKA and Procrustes
flatten each sample (C·H·W). h5py datasets are read block by block (row blocks follow the feature
file's one-sample-per-chunk layout; column blocks are whole channels over all rows), never whole,
unless a function says it loads them. Every block read is checked for NaN/inf: a non-finite value
fails with the net, layer, split and first row named, never as a NaN similarity or a LinAlgError.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np

from common.errors import UserError
from features.store import NonFiniteFeatures, iter_blocks

BLOCK_BYTES = 64 << 20           # float64 working block of a streamed source

Source = Any  # np.ndarray | h5py.Dataset (after as_source)


class SimilarityError(UserError):
    """The data cannot give a meaningful value (zero variance, too few samples for the estimator)."""


def as_source(x: Any) -> Source:
    """An array-like of shape (N, ...) as something we can slice rows/columns of (h5py stays lazy).
    A torch tensor is copied to a numpy array (torch itself is not imported here)."""
    if isinstance(x, h5py.Dataset):
        src = x
    elif type(x).__module__.split(".")[0] == "torch":
        src = x.detach().cpu().numpy()
    else:
        src = np.asarray(x)
    if len(src.shape) < 2:
        raise UserError(f"features must have one row per sample, shape (N, ...); got shape {tuple(src.shape)}")
    if isinstance(src, h5py.Dataset):
        stored = src.attrs.get("nonfinite")
        if stored is not None and int(stored) > 0:
            raise NonFiniteFeatures(f"{describe(src)} holds {int(stored)} NaN/inf values (counted at extraction); "
                                    f"{_remedy()}")
    return src


def describe(src: Source) -> str:
    """``net N, layer L, split S of FILE`` for a feature-file dataset, ``an array (N, ...)`` otherwise."""
    if isinstance(src, h5py.Dataset):
        parts = src.name.strip("/").split("/", 2)
        if len(parts) == 3:
            split, net, layer = parts
            return f"net {net!r}, layer {layer!r}, split {split!r} of {src.file.filename}"
        return f"dataset {src.name} of {src.file.filename}"
    return f"an array of shape {tuple(src.shape)}"


def _remedy() -> str:
    return ("similarity metrics need finite features. Float16 features overflow above 65504: re-extract with "
            "--dtype float32; a net that computes NaN/inf needs fixing first (python cli.py inspect FILE shows "
            "the stored counts)")


def check_finite(block: np.ndarray, src: Source, first_row: int = 0, rows: np.ndarray | None = None) -> None:
    """Raise :class:`NonFiniteFeatures` naming the source and the first bad row of ``block`` (whose
    row r is source row ``first_row + r``, or ``rows[r]`` when given)."""
    flat = block.reshape(len(block), -1)
    if np.isfinite(flat.sum(1, dtype=np.float64)).all():     # one pass: a finite sum needs finite values
        return
    bad = np.flatnonzero(~np.isfinite(flat).all(1))
    if not len(bad):                         # finite values whose sum overflowed: nothing to report
        return
    row = int(rows[bad[0]]) if rows is not None else first_row + int(bad[0])
    count = int((~np.isfinite(flat)).sum())
    raise NonFiniteFeatures(f"{describe(src)} holds NaN/inf values ({count} in the rows read so far, first at row "
                            f"{row}); {_remedy()}")


def n_rows(src: Source) -> int:
    return int(src.shape[0])


def row_dim(src: Source) -> int:
    """Flattened per-sample dimension (C·H·W)."""
    return int(np.prod(src.shape[1:], dtype=np.int64))


def check_same_rows(*srcs: Source) -> int:
    """The common number of rows of the sources (similarities pair the same images row by row)."""
    n = n_rows(srcs[0])
    for s in srcs[1:]:
        if n_rows(s) != n:
            raise UserError(f"the feature sets have different numbers of samples ({n} vs {n_rows(s)}); "
                            f"similarities compare the same images row by row")
    return n


def rows_per_block(dim: int, block_bytes: int) -> int:
    return max(1, int(block_bytes) // (8 * max(1, dim)))


def row_blocks(src: Source, block_bytes: int = BLOCK_BYTES, rows: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive row blocks as (b, C·H·W) float64 (``rows`` per block, default from ``block_bytes``)."""
    rows = rows or rows_per_block(row_dim(src), block_bytes)
    if isinstance(src, h5py.Dataset):
        for start, blk in iter_blocks(src, rows, np.float64):
            check_finite(blk, src, start)
            yield blk.reshape(len(blk), -1)
    else:
        for s in range(0, n_rows(src), rows):
            blk = np.asarray(src[s:s + rows], dtype=np.float64)
            check_finite(blk, src, s)
            yield blk.reshape(len(blk), -1)


def column_blocks(src: Source, block_bytes: int = BLOCK_BYTES, reuse: bool = False, centre: bool = False,
                  check: bool = True) -> Iterator[np.ndarray]:
    """Blocks of whole channels (axis 1) over all rows, as (N, cols) float64, C-contiguous.

    ``reuse``: every block is written into one buffer allocated once (a block is valid until the
    next one is taken), which spares a fresh 64 MiB allocation and its page faults per block.
    ``centre``: each column minus its mean over all rows, converted and centred in one pass.
    ``check=False`` skips the NaN/inf check (for a source already checked)."""
    n = n_rows(src)
    inner = int(np.prod(src.shape[2:], dtype=np.int64))
    per = max(1, int(block_bytes) // (8 * n * max(1, inner)))
    buf = np.empty(n * min(per, int(src.shape[1])) * inner, dtype=np.float64) if reuse else None
    for c0 in range(0, int(src.shape[1]), per):
        raw = np.asarray(src[:, c0:c0 + per]).reshape(n, -1)
        if check:
            check_finite(raw, src)
        blk = np.empty(raw.shape) if buf is None else buf[:raw.size].reshape(raw.shape)
        if centre:
            np.subtract(raw, raw.mean(0, dtype=np.float64), out=blk)
        else:
            np.copyto(blk, raw)
        yield blk


def read_whole(src: h5py.Dataset) -> np.ndarray:
    """The whole dataset in its stored dtype (one contiguous read), checked finite."""
    out = np.empty(src.shape, dtype=src.dtype)
    src.read_direct(out)
    check_finite(out, src)
    return out


def stored_bytes(src: Source) -> int:
    """Bytes of the source in its stored dtype."""
    return n_rows(src) * row_dim(src) * np.dtype(src.dtype).itemsize


def rows_at(src: Source, idx: np.ndarray) -> np.ndarray:
    """Rows at sorted unique indices, in the source dtype; runs of consecutive rows are read as one
    contiguous read (h5py point selections are ~10x slower than a loop of small slices)."""
    idx = np.asarray(idx, dtype=np.int64)
    if not isinstance(src, h5py.Dataset):
        out = np.asarray(src[idx])
    else:
        out = np.empty((len(idx),) + tuple(src.shape[1:]), dtype=src.dtype)
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        k = 0
        for run in np.split(idx, breaks):
            if len(run):
                src.read_direct(out, np.s_[int(run[0]):int(run[-1]) + 1], np.s_[k:k + len(run)])
                k += len(run)
    check_finite(out, src, rows=idx)
    return out


def load_matrix(src: Source, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """The whole source as (N, C·H·W) float64 (read block by block into one array)."""
    out = np.empty((n_rows(src), row_dim(src)), dtype=np.float64)
    s = 0
    for blk in row_blocks(src, block_bytes):
        out[s:s + len(blk)] = blk
        s += len(blk)
    return out
