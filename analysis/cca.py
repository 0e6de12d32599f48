"""SVCCA (Raghu et al. 2017), PWCCA (Morcos et al. 2018) and R²_CCA between the features of two nets:
the math of one pair, on each net's SVD (:class:`CCAView`, computed once per net and reused by every
pair and permutation, see :mod:`analysis.similarity_cca`).

Conventions, each named in ``similarity.json``:

- **samples**: ``pooled`` (spatial mean per channel, N x C), ``flat`` (N x C·H·W) or ``positions``
  (N·H·W x C); CCA between r_x and r_y dimensions is refused unless rows > r_x + r_y (otherwise
  perfect correlations appear by construction).
- **numerical rank**: singular values of the centred samples above ``tol`` count. ``tol`` follows the
  precision of the stored data: the rounding of each stored value is at most eps/2 of it (eps of the
  storage dtype: float16 9.8e-4, float32 1.2e-7), so the rounding error matrix has spectral norm at
  most ``eps/2 · ||X||_F`` (X as stored, before centring; ``/ sqrt(H·W)`` for pooled means); float64
  arithmetic adds ``s_max · max(rows, dims) · eps_float64``; the larger counts. ``rank_tol > 0``
  replaces both by ``rank_tol · s_max``.
- **SVCCA's k**: a fraction f keeps the fewest leading directions whose Σs² (``variance``, the
  default) or Σs (``singular``, google/svcca's tutorial) reach f of the total; an integer keeps that
  many (at most the rank).
- **PWCCA weights** come from x's side (the row net): ``paper`` is Morcos et al.'s formula on whitened
  canonical variates of centred data; ``svcca-code`` reproduces google/svcca's ``compute_pwcca``
  (directions ``Xc u`` without whitening, neuron means added back, an orthonormal basis by QR,
  weights from the uncentred activations; x at full rank with no more dimensions than y), for
  comparison with papers that used that code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.config import CCA_FEATURES, PWCCA_VARIANTS, SVCCA_RULES  # re-exported: their old home
from analysis.sources import (
    BLOCK_BYTES,
    SimilarityError,
    as_source,
    check_same_rows,
    load_matrix,
    n_rows,
    row_blocks,
    row_dim,
)
from common.errors import UserError
from common.registry import unknown_choice_message

CCA_FAMILY = ("svcca", "pwcca", "r2cca")


def cca_data(x: Any, mode: str = "flat", block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, float]:
    """Features as a (samples, dims) float64 matrix for CCA (see :func:`cca_samples`) and the bound
    ``||E||_F / (eps/2)`` on the rounding error of its entries (``||X||_F`` of the stored values, over
    ``sqrt(H·W)`` for pooled means)."""
    if mode not in CCA_FEATURES:
        raise UserError(unknown_choice_message("CCA feature mode", mode, list(CCA_FEATURES)))
    src = as_source(x)
    if mode == "flat" or len(src.shape) == 2:
        out = load_matrix(src, block_bytes)
        return out, float(np.linalg.norm(out))
    n, c = n_rows(src), int(src.shape[1])
    hw = int(np.prod(src.shape[2:], dtype=np.int64))
    out = np.empty((n, c) if mode == "pooled" else (n * hw, c), dtype=np.float64)
    s, ss = 0, 0.0
    for blk in row_blocks(src, block_bytes):
        b = len(blk)
        ss += float(np.einsum("ij,ij->", blk, blk))
        blk = blk.reshape(b, c, hw)
        if mode == "pooled":
            out[s:s + b] = blk.mean(2)
        else:
            out[s * hw:(s + b) * hw] = blk.transpose(0, 2, 1).reshape(b * hw, c)
        s += b
    return out, float(np.sqrt(ss / (hw if mode == "pooled" else 1)))


def cca_samples(x: Any, mode: str = "flat", block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """Features as a (samples, dims) float64 matrix for CCA: ``flat`` (N, C·H·W); ``pooled`` (N, C),
    the spatial mean per channel; ``positions`` (N·H·W, C), every position of every image a sample."""
    return cca_data(x, mode, block_bytes)[0]


def rows_per_sample(x: Any, mode: str) -> int:
    """How many CCA rows one image gives (H·W for ``positions``, else 1)."""
    src = as_source(x)
    return int(np.prod(src.shape[2:], dtype=np.int64)) if mode == "positions" and len(src.shape) > 2 else 1


def matched_sources(sources: Any, features: str, names: Any = None) -> tuple[list[Any], int, list[str], int,
                                                                              list[int]]:
    """The nets' features as sources with their common row count, names, CCA rows per image (one
    spatial size in every net for ``positions``) and each net's view dimension (channels, or the flat
    row for ``flat``)."""
    srcs = [as_source(s) for s in sources]
    n = check_same_rows(*srcs)
    names = list(names) if names else [str(i) for i in range(len(srcs))]
    per = [rows_per_sample(s, features) for s in srcs]
    if len(set(per)) > 1:
        raise UserError(f"--cca_features positions needs the same spatial size in every net; positions per image: "
                        f"{per}; use --cca_features pooled, or --spatial pool|interpolate")
    dims = [int(s.shape[1]) if features != "flat" and len(s.shape) > 2 else row_dim(s) for s in srcs]
    return srcs, n, names, per[0], dims


def storage_eps(dtype: Any) -> float:
    """Machine epsilon of the dtype the features are stored in (0 for integers: stored exactly)."""
    dt = np.dtype(dtype)
    return float(np.finfo(dt).eps) if np.issubdtype(dt, np.floating) else 0.0


def rank_tolerance(s: np.ndarray, shape: tuple[int, int], rounding_norm: float = 0.0, eps: float = 0.0,
                   rank_tol: float = 0.0) -> float:
    """The singular value at or below which a direction is numerical noise (see the module docstring)."""
    smax = float(s[0]) if len(s) else 0.0
    if rank_tol > 0:
        return rank_tol * smax
    return max(eps / 2 * rounding_norm, smax * max(shape) * float(np.finfo(np.float64).eps))


@dataclass(frozen=True)
class CCAView:
    """One net's centred samples as their thin SVD ``xc = u diag(s) vt`` truncated to the numerical
    rank, with the column means (``svcca-code`` adds them back)."""

    u: np.ndarray            # (rows, r)
    s: np.ndarray            # (r,)
    vt: np.ndarray           # (r, d)
    mean: np.ndarray         # (d,)
    tol: float               # singular values <= tol were dropped
    eps: float               # of the storage dtype

    @property
    def rank(self) -> int:
        return len(self.s)

    @classmethod
    def of(cls, samples: np.ndarray, rounding_norm: float = 0.0, eps: float = 0.0,
           rank_tol: float = 0.0) -> CCAView:
        mean = samples.mean(0)
        u, s, vt = np.linalg.svd(samples - mean, full_matrices=False)
        tol = rank_tolerance(s, samples.shape, rounding_norm, eps, rank_tol)
        r = int(np.sum(s > tol)) if len(s) and s[0] > 0 else 0
        return cls(u[:, :r], s[:r], vt[:r], mean, tol, eps)

    def keep(self, keep: float, rule: str = "variance") -> int:
        """SVCCA's k: see :func:`svcca_k`."""
        return svcca_k(self.s, keep, rule)


def check_keep(keep: float) -> None:
    if not (0.0 < keep <= 1.0 or (keep > 1 and float(keep).is_integer())):
        raise UserError(f"--svcca_keep {keep:g}: give a fraction 0 < f <= 1 (of the variance or of the summed "
                        f"singular values, see --svcca_rule) or an integer count of directions >= 2")


def svcca_k(s: np.ndarray, keep: float, rule: str = "variance") -> int:
    """Directions SVCCA keeps of singular values ``s`` (descending, already rank-truncated): an
    integer ``keep > 1`` is a count (at most ``len(s)``); a fraction keeps the fewest leading
    directions whose Σs² (``variance``) or Σs (``singular``) reach ``keep`` of the total."""
    check_keep(keep)
    if rule not in SVCCA_RULES:
        raise UserError(unknown_choice_message("--svcca_rule", rule, list(SVCCA_RULES)))
    if not len(s):
        return 0
    if keep > 1:
        return min(len(s), int(keep))
    w = s ** 2 if rule == "variance" else s
    cum = np.cumsum(w) / np.sum(w)
    return min(len(s), int(np.searchsorted(cum, keep - 1e-12)) + 1)


def check_cca_dims(n: int, rx: int, ry: int, metric: str) -> None:
    """CCA between r_x and r_y dimensions finds perfect correlations by construction once
    r_x + r_y >= n (centred data spans n - 1 dimensions): refuse."""
    if rx == 0 or ry == 0:
        raise SimilarityError(f"{metric} is undefined: the features of one net have zero variance")
    if n <= rx + ry:
        raise SimilarityError(
            f"{metric} is meaningless here: {n} samples for {rx} + {ry} canonical dimensions (CCA needs "
            f"more samples than the dimensions of both sides together, or it finds perfect correlations by "
            f"construction); use fewer dimensions (--cca_features pooled: spatial mean per channel) or more samples")


def canonical_correlations(qx: np.ndarray, qy: np.ndarray) -> np.ndarray:
    """Canonical correlations (descending) between the spans of two orthonormal bases."""
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def svcca_from_bases(ux: np.ndarray, uy: np.ndarray) -> float:
    return float(canonical_correlations(ux, uy).mean())


def r2cca_from_bases(qx: np.ndarray, qy: np.ndarray) -> float:
    """R²_CCA: the mean squared canonical correlation over min(r_x, r_y) pairs of variates."""
    return float(np.mean(canonical_correlations(qx, qy) ** 2))


def pwcca_from_bases(qx: np.ndarray, qy: np.ndarray, xc: np.ndarray | None = None, *,
                     proj: np.ndarray | None = None) -> float:
    """Morcos et al. 2018: canonical correlations weighted by how much of x's (centred) neurons each
    of x's canonical variates accounts for, ``a_i = sum_j |<h_i, x_j>|``. The variates are
    ``h = qx a``, so ``h^T xc = a^T (qx^T xc)``: ``proj = qx^T xc`` (r, C), computed once per net,
    spares the (n, r) variates and an n·r·C product per pair and permutation."""
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    rho = np.clip(rho, 0.0, 1.0)
    if proj is None:
        proj = qx.T @ xc
    alpha = np.abs(a[:, :len(rho)].T @ proj).sum(1)                         # (r,)
    if not alpha.sum() > 0:
        raise SimilarityError("PWCCA is undefined: the features have zero variance")
    return float(alpha @ rho / alpha.sum())


def pwcca_svcca_code(vx: CCAView, qy: np.ndarray, vty: np.ndarray) -> float:
    """google/svcca's ``compute_pwcca`` convention, re-derived from its description: x's canonical
    directions ``u`` are the left singular vectors (numpy's signs) of the whitened cross-covariance
    ``Sxx^-1/2 Sxy Syy^-1/2`` (here ``Vx Ux^T Uy Vy^T``, the scale factors cancel); direction i is
    ``Xc u_i`` WITHOUT whitening, plus the mean of neuron i; an orthonormal basis ``p`` of those
    columns by QR (in their order); weights ``sum_j |<p_i, x_j>|`` over x's uncentred neurons.
    Because a mean is added, the value depends on the singular vectors' signs, as in that code.
    Defined when x is at full rank with no more dimensions than y (``qy``, ``vty``: y's view)."""
    d = len(vx.mean)
    if vx.rank < d:
        raise SimilarityError(f"PWCCA (svcca-code) needs the row net's features at full rank ({vx.rank} of {d} "
                              f"dimensions): that code whitens a singular covariance with a pseudo-inverse; use "
                              f"--pwcca_variant paper")
    if d > qy.shape[1]:
        raise SimilarityError(f"PWCCA (svcca-code) needs the row net to have no more dimensions than the column "
                              f"net ({d} > {qy.shape[1]}), as google/svcca's compute_pwcca does")
    arr = vx.vt.T @ (vx.u.T @ qy) @ vty                          # (d, d_y)
    ug, rho, _ = np.linalg.svd(arr)
    rho = np.clip(rho, 0.0, 1.0)
    ones = np.ones(len(vx.u))
    dirs = (vx.u * vx.s) @ (vx.vt @ ug) + np.outer(ones, vx.mean)      # Xc u + 1 mean^T, (rows, d)
    p, _ = np.linalg.qr(dirs)
    acts = ((p.T @ vx.u) * vx.s) @ vx.vt + np.outer(p.T @ ones, vx.mean)   # p^T x, x uncentred
    w = np.abs(acts).sum(1)
    if not w.sum() > 0:
        raise SimilarityError("PWCCA is undefined: the features have zero variance")
    return float(w @ rho / w.sum())


def pwcca_value(vx: CCAView, qy: np.ndarray, variant: str = "paper", vty: np.ndarray | None = None) -> float:
    if variant == "paper":
        return pwcca_from_bases(vx.u, qy, proj=vx.s[:, None] * vx.vt)
    if variant == "svcca-code":
        return pwcca_svcca_code(vx, qy, vty)
    raise UserError(unknown_choice_message("--pwcca_variant", variant, list(PWCCA_VARIANTS)))


# --------------------------------------------------------------------------- one pair

def _views(x: Any, y: Any, features: str, rank_tol: float) -> tuple[CCAView, CCAView, int]:
    (xs, nx), (ys, ny) = cca_data(x, features), cca_data(y, features)
    rows = check_same_rows(xs, ys)
    ex, ey = storage_eps(as_source(x).dtype), storage_eps(as_source(y).dtype)
    return CCAView.of(xs, nx, ex, rank_tol), CCAView.of(ys, ny, ey, rank_tol), rows


def svcca_similarity(x: Any, y: Any, *, keep_variance: float = 0.99, features: str = "flat",
                     rule: str = "variance", rank_tol: float = 0.0) -> float:
    """SVCCA (Raghu et al. 2017): keep each side's leading singular directions (``keep_variance``: a
    fraction under ``rule``, or an integer count), then the mean canonical correlation between them."""
    vx, vy, rows = _views(x, y, features, rank_tol)
    kx, ky = vx.keep(keep_variance, rule), vy.keep(keep_variance, rule)
    check_cca_dims(rows, kx, ky, "SVCCA")
    return svcca_from_bases(vx.u[:, :kx], vy.u[:, :ky])


def pwcca_similarity(x: Any, y: Any, *, features: str = "flat", variant: str = "paper",
                     rank_tol: float = 0.0) -> float:
    """PWCCA (Morcos et al. 2018), weights from x's side (so not symmetric); CCA on the full-rank
    part of each side (no variance truncation)."""
    vx, vy, rows = _views(x, y, features, rank_tol)
    check_cca_dims(rows, vx.rank, vy.rank, "PWCCA")
    return pwcca_value(vx, vy.u, variant, vy.vt)


def r2cca_similarity(x: Any, y: Any, *, features: str = "flat", rank_tol: float = 0.0) -> float:
    """R²_CCA: the mean squared canonical correlation of the full-rank parts of both sides."""
    vx, vy, rows = _views(x, y, features, rank_tol)
    check_cca_dims(rows, vx.rank, vy.rank, "R2_CCA")
    return r2cca_from_bases(vx.u, vy.u)
