"""Non-finite values of extracted features: found on the device, counted per dataset, refused where
float16 storage would make them.

Every batch of every dataset gets one reduction on the device, :func:`value_range` (``aminmax`` of the
rows being written: one pass, no temporary, nothing copied back but two numbers). A batch whose range
is finite and fits the storage dtype is clean: 0 non-finite values, largest magnitude read off the
range. Only a batch whose range holds a NaN/inf, or for float16 storage a magnitude above
:data:`FLOAT16_MAX`, is counted exactly, on the host copy the writer stores anyway
(:func:`batch_counts`, vectorised numpy, no extra copy).

The policy (:func:`check_storable`):
- float16 storage is refused for a batch with any non-finite stored value. When the computed values
  were finite this is overflow (values above 65504 would be stored as inf); when they were not, float16
  cannot tell the net's own NaN/inf from overflow. Either way the error names the net, layer, split,
  rows, the count and the largest magnitude, and asks for ``--dtype float32``; the extraction stops and
  the dataset stays marked incomplete.
- float32 storage keeps the values as computed (the file is faithful to the net): the count is
  recorded in the dataset's ``nonfinite`` attribute and reported as a warning
  (:class:`NonFiniteFeaturesWarning`, printed by ``extract``; ``inspect`` shows the count), so that the
  user learns it at extraction rather than from a metric later.

Dataset attributes (kc-features v1, optional: readers need neither): ``nonfinite`` (int, NaN/±inf values
among the ``rows_done`` rows) and ``max_abs`` (float, largest finite magnitude among them). Both are
raised together with ``rows_done``, so a resumed extraction continues from consistent counts, and a
torchrun join sums (``nonfinite``) or maxes (``max_abs``) the shards' values.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from common.errors import UserError

FLOAT16_MAX = float(torch.finfo(torch.float16).max)      # 65504; a value >= 65520 becomes inf in float16
BLOCK_ROWS = 256                                         # rows per read when recounting a file's rows


class NonFiniteFeaturesWarning(UserWarning):
    """Stored features hold NaN/inf values computed by the net (float32 storage keeps them)."""


@dataclass
class ValueCounts:
    """What the stored rows of one dataset hold."""

    nonfinite: int = 0          # NaN/±inf values
    max_abs: float = 0.0        # largest finite magnitude (0 when there is none)

    def add(self, other: ValueCounts) -> ValueCounts:
        return ValueCounts(self.nonfinite + other.nonfinite, max(self.max_abs, other.max_abs))


def value_range(x: torch.Tensor) -> torch.Tensor:
    """x: (n, ...) on its device -> (2,) float32 ``[min, max]`` on the same device, one pass. A NaN
    anywhere gives NaN; an inf shows as ``±inf``."""
    if x.numel() == 0:
        return torch.zeros(2, dtype=torch.float32, device=x.device)
    mn, mx = torch.aminmax(x)
    return torch.stack([mn, mx]).float()


def range_is_clean(lo: float, hi: float, dtype: str) -> bool:
    """Whether a batch with values in ``[lo, hi]`` stores without a non-finite value in ``dtype``."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return False
    return dtype != "float16" or max(-lo, hi) <= FLOAT16_MAX


def count_array(a: np.ndarray) -> ValueCounts:
    """Exact counts of a host array (any float dtype)."""
    finite = np.isfinite(a)
    n_bad = int(a.size - np.count_nonzero(finite))
    if n_bad == a.size:
        return ValueCounts(n_bad, 0.0)
    mag = np.abs(a, where=finite, out=np.zeros(a.shape, dtype=a.dtype)) if n_bad else np.abs(a)
    return ValueCounts(n_bad, float(mag.max()) if a.size else 0.0)


def batch_counts(lo: float, hi: float, stored: np.ndarray, dtype: str) -> ValueCounts:
    """Counts of one batch: from its device range ``[lo, hi]`` when clean, else from the stored array."""
    if range_is_clean(lo, hi, dtype):
        return ValueCounts(0, float(max(-lo, hi, 0.0)))
    return count_array(stored)


def check_storable(path: str, rows: tuple[int, int], lo: float, hi: float, counts: ValueCounts, dtype: str,
                   fname: str) -> None:
    """Refuse a float16 batch with non-finite stored values (module doc); ``rows`` is ``[start, stop)``."""
    if dtype != "float16" or counts.nonfinite == 0:
        return
    split, net, layer = path.split("/", 2)
    where = f"net {net!r}, layer {layer!r}, split {split!r}, rows {rows[0]}-{rows[1] - 1}"
    if math.isfinite(lo) and math.isfinite(hi):
        what = (f"{counts.nonfinite} values exceed the float16 range (largest magnitude {max(-lo, hi):.6g} > "
                f"{FLOAT16_MAX:g}) and would be stored as inf")
    else:
        what = (f"the net's activations are themselves non-finite ({counts.nonfinite} NaN/inf values after the "
                f"float16 cast; largest finite magnitude {counts.max_abs:.6g}), and float16 cannot tell them "
                f"from overflow")
    raise UserError(f"{where}: {what}. Pass --dtype float32 to store this layer (float32 counts NaN/inf exactly); "
                    f"the extraction stopped and {fname} holds this dataset marked incomplete (readers refuse it): "
                    f"re-run with --dtype float32 and --overwrite (which replaces the file) or another --out")


def stored_counts(ds: h5py.Dataset, rows: int) -> ValueCounts:
    """Counts of the first ``rows`` stored rows: the dataset's attributes, or, for a file written before
    they existed, recounted from the rows (contiguous blocks)."""
    if rows <= 0:
        return ValueCounts()
    if "nonfinite" in ds.attrs and "max_abs" in ds.attrs:
        return ValueCounts(int(ds.attrs["nonfinite"]), float(ds.attrs["max_abs"]))
    total = ValueCounts()
    for s in range(0, rows, BLOCK_ROWS):
        block = np.empty((min(rows, s + BLOCK_ROWS) - s,) + ds.shape[1:], dtype=ds.dtype)
        ds.read_direct(block, np.s_[s:s + len(block)])
        total = total.add(count_array(block))
    return total


def write_counts(ds: h5py.Dataset, counts: ValueCounts) -> None:
    ds.attrs["nonfinite"] = int(counts.nonfinite)
    ds.attrs["max_abs"] = float(counts.max_abs)


def joined_counts(parts: Sequence[h5py.Dataset]) -> ValueCounts | None:
    """The counts of a join over shards (None when a shard does not record them)."""
    if not all("nonfinite" in d.attrs and "max_abs" in d.attrs for d in parts):
        return None
    total = ValueCounts()
    for d in parts:
        total = total.add(ValueCounts(int(d.attrs["nonfinite"]), float(d.attrs["max_abs"])))
    return total


def warning_text(counts: dict[str, int], fname: str) -> str:
    """The warning of datasets stored with NaN/inf values (float32 storage)."""
    bad = [(p, n) for p, n in counts.items() if n > 0]
    listed = "; ".join(f"net {p.split('/')[1]!r}, layer {p.split('/', 2)[2]!r}, split {p.split('/')[0]!r}: "
                       f"{n} non-finite values" for p, n in bad[:5])
    more = f"; and {len(bad) - 5} more datasets" if len(bad) > 5 else ""
    return (f"{fname}: the nets computed NaN/inf activations, stored as computed ({listed}{more}); the counts are "
            f"in each dataset's 'nonfinite' attribute (python cli.py inspect {fname}). Check the network (diverged "
            f"training, a broken checkpoint): Trans-Net fits refuse such features and similarities are undefined")
