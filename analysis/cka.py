"""Exact linear CKA (biased and unbiased HSIC) and the orthogonal Procrustes distance of one pair of
sources, in float64, streamed.

Names say the direction: ``*_similarity`` (larger = more alike, 1 = alike up to the metric's
invariances) and ``*_distance`` (smaller = more alike, 0 = alike).

Two exact forms (both give the same number):

- ``features``: accumulate ``Z^T W`` (p x q), the column sums, row norms, ... of the rows shifted by a
  reference row (the first block's mean, which keeps float64 cancellation small), over row blocks;
  centring is applied at the end (``Xc^T Yc = Z^T W - sz sw^T / n``). One sequential pass over the
  rows (the feature file's chunk layout), memory ``O(p·q)`` and independent of N, cost ``N·p·q``.
  The self terms (``X^T X``) are separate passes using a symmetric rank-k update (half the flops).
- ``gram``: the centred Gram matrix ``K = Xc Xc^T`` (N x N) accumulated over column (channel)
  blocks, each block centred exactly (all rows present); memory ``O(N^2)`` and independent of
  C·H·W, cost ``N^2·p``. Used when C·H·W is large (vgg16_bn conv4_3: 401,408 dims).
- ``auto`` (:func:`choose_form`) takes the cheaper of the two in multiply-adds.

Estimators. ``hsic_biased = tr(K H L H) / (n-1)^2`` (the plug-in one of Kornblith et al. 2019);
``hsic_unbiased`` is the U-statistic of Song et al. 2012 (needs n >= 4; translation invariant, so it
is computed on shifted rows as well). Unbiased estimates of an unrelated pair scatter around 0 and
may be slightly negative.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
from scipy.linalg import blas

from analysis.config import FORMS  # re-exported: its old home
from analysis.sources import (
    BLOCK_BYTES,
    SimilarityError,
    as_source,
    check_same_rows,
    column_blocks,
    n_rows,
    read_whole,
    row_blocks,
    row_dim,
    rows_per_block,
    stored_bytes,
)
from common.errors import UserError
from common.registry import unknown_choice_message

DIRECTIONS = {"cka": "similarity", "cka_unbiased": "similarity", "procrustes": "distance"}

def fro2(a: np.ndarray) -> float:
    """Squared Frobenius norm without a temporary (a must be C- or F-contiguous)."""
    r = a.ravel(order="K")
    return float(np.dot(r, r))


def symmetrise_upper(m: np.ndarray, step: int = 1024) -> np.ndarray:
    """Fill the lower triangle of a square matrix from its upper one (as left by BLAS ``syrk``), in
    blocks so no full-size temporary is made."""
    p = m.shape[0]
    for j0 in range(0, p, step):
        j1 = min(p, j0 + step)
        blk = m[j0:j1, j0:j1]
        blk[...] = np.triu(blk) + np.triu(blk, 1).T
        m[j1:, j0:j1] = m[j0:j1, j1:].T
    return m


def hsic_unbiased_terms(n: int, tr_kl: float, sum_k: float, sum_l: float, k1_l1: float) -> float | None:
    """Song et al. 2012 with zero-diagonal Grams K~, L~: ``tr_kl = tr(K~L~)``, ``sum_k = 1'K~1``,
    ``k1_l1 = 1'K~L~1``. None when n < 4 (the estimator needs four distinct samples)."""
    if n < 4:
        return None
    return (tr_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * k1_l1 / (n - 2)) / (n * (n - 3))


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    """Plug-in HSIC ``tr(K H L H) / (n-1)^2`` of two symmetric (n, n) Gram matrices (centred or not)."""
    n = k.shape[0]
    k1, l1 = k.sum(1), l.sum(1)
    tr = float(np.vdot(k, l)) - 2.0 / n * float(k1 @ l1) + float(k1.sum()) * float(l1.sum()) / n ** 2
    return tr / (n - 1) ** 2


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float | None:
    """Unbiased HSIC (Song et al. 2012) of two symmetric (n, n) Gram matrices; None when n < 4."""
    n = k.shape[0]
    dk, dl = np.diagonal(k), np.diagonal(l)
    rk, rl = k.sum(1) - dk, l.sum(1) - dl            # K~1, L~1
    tr_kl = float(np.vdot(k, l)) - float(dk @ dl)
    return hsic_unbiased_terms(n, tr_kl, float(rk.sum()), float(rl.sum()), float(rk @ rl))


# --------------------------------------------------------------------------- moments of a pair

@dataclass(frozen=True)
class Moments:
    """What CKA and Procrustes need of a pair (x, y); a self pair has x = y.

    ``hsic_biased = ||Xc^T Yc||_F^2 / (n-1)^2``, ``hsic_unbiased`` (None when n < 4),
    ``ss_x = ||Xc||_F^2 = tr(Kc)``, ``nuclear = ||Xc^T Yc||_*`` (None unless asked for)."""

    n: int
    hsic_biased: float
    hsic_unbiased: float | None
    ss_x: float
    ss_y: float
    nuclear: float | None = None


class FeatureMoments:
    """Streaming feature-space accumulator of one pair (``q=None``: the self pair of x).

    ``update(xb, yb)`` takes row blocks (b, p) and (b, q); memory is O(p·q) whatever the number of
    rows. ``result()`` consumes the accumulator (the p x q matrix is centred in place)."""

    def __init__(self, p: int, q: int | None = None):
        self.self_pair = q is None
        q = p if q is None else q
        self.p, self.q, self.n = p, q, 0
        self.m = np.zeros((p, q), dtype=np.float64, order="F")   # sum z w^T   (p, q)
        self.sx, self.sy = np.zeros(p), np.zeros(q)              # sum z, sum w
        self.ux, self.uy = np.zeros(p), np.zeros(q)              # sum z |w|^2, sum w |z|^2
        self.tx = self.ty = self.a = 0.0                         # sum |z|^2, sum |w|^2, sum |z|^2 |w|^2
        self._shift_x: np.ndarray | None = None
        self._shift_y: np.ndarray | None = None
        self._done = False

    def update(self, xb: np.ndarray, yb: np.ndarray | None = None) -> None:
        assert not self._done, "FeatureMoments.result() was already taken"
        xb = np.asarray(xb, dtype=np.float64).reshape(len(xb), -1)           # (b, p)
        if xb.shape[1] != self.p:
            raise ValueError(f"row block has {xb.shape[1]} features, expected {self.p}")
        if len(xb) == 0:
            return
        if self._shift_x is None:
            self._shift_x = xb.mean(0)
        z = xb - self._shift_x
        nz = np.einsum("ij,ij->i", z, z)                                     # (b,)
        if self.self_pair:
            w, nw = z, nz
            self.m = blas.dsyrk(1.0, z.T, beta=1.0, c=self.m, trans=0, lower=0, overwrite_c=1)
        else:
            yb = np.asarray(yb, dtype=np.float64).reshape(len(yb), -1)       # (b, q)
            if yb.shape != (len(xb), self.q):
                raise ValueError(f"row blocks do not pair: x {xb.shape}, y {yb.shape} (expected q={self.q})")
            if self._shift_y is None:
                self._shift_y = yb.mean(0)
            w = yb - self._shift_y
            nw = np.einsum("ij,ij->i", w, w)
            self.m = blas.dgemm(1.0, z.T, w.T, beta=1.0, c=self.m, trans_b=1, overwrite_c=1)
        self.n += len(z)
        self.sx += z.sum(0)
        self.sy += w.sum(0)
        self.ux += z.T @ nw
        self.uy += w.T @ nz
        self.tx += float(nz.sum())
        self.ty += float(nw.sum())
        self.a += float(nz @ nw)

    def result(self, nuclear: bool = False) -> Moments:
        assert not self._done, "FeatureMoments.result() was already taken"
        self._done = True
        n, m, sx, sy = self.n, self.m, self.sx, self.sy
        if n < 2:
            raise SimilarityError(f"similarity needs at least 2 samples, got {n}")
        if self.self_pair:
            symmetrise_upper(m)
        frob2 = fro2(m)
        sx_m_sy = float(sx @ m @ sy)
        hu = hsic_unbiased_terms(n, frob2 - self.a, float(sx @ sx) - self.tx, float(sy @ sy) - self.ty,
                                  sx_m_sy - float(sx @ self.ux) - float(sy @ self.uy) + self.a)
        m = blas.dger(-1.0 / n, sx, sy, a=m, overwrite_a=1)                 # Xc^T Yc   (p, q)
        ss_x = self.tx - float(sx @ sx) / n
        ss_y = self.ty - float(sy @ sy) / n
        hb = fro2(m) / (n - 1) ** 2
        nuc = None
        if nuclear:
            nuc = ss_x if self.self_pair else float(np.linalg.svd(m, compute_uv=False).sum())
        self.m = np.zeros((0, 0))
        return Moments(n, hb, hu, ss_x, ss_y if not self.self_pair else ss_x, nuc)


def feature_moments(x: Any, y: Any = None, *, nuclear: bool = False, block_bytes: int = BLOCK_BYTES) -> Moments:
    """Moments of (x, y) (or of x with itself when y is None) in one streaming pass over rows."""
    sx = as_source(x)
    if y is None:
        acc = FeatureMoments(row_dim(sx))
        for xb in row_blocks(sx, block_bytes):
            acc.update(xb)
        return acc.result(nuclear)
    sy = as_source(y)
    check_same_rows(sx, sy)
    p, q = row_dim(sx), row_dim(sy)
    acc = FeatureMoments(p, q)
    rows = rows_per_block(p + q, block_bytes)
    for xb, yb in zip(row_blocks(sx, rows=rows), row_blocks(sy, rows=rows)):
        acc.update(xb, yb)
    return acc.result(nuclear)

def centred_gram(x: Any, *, block_bytes: int = BLOCK_BYTES, out: np.ndarray | None = None,
                 load_bytes: int = 0) -> np.ndarray:
    """``Kc = Xc Xc^T`` (N, N) of the flattened, column-centred features, accumulated over channel
    blocks by symmetric rank-k updates (memory O(N^2) + one block, independent of C·H·W). Returns a
    C-contiguous symmetric array (``out`` when given: a C-contiguous (N, N) float64 array).

    ``load_bytes``: an h5py source no larger than this (in its stored dtype) is read whole in one
    contiguous read and its channel blocks are cut in memory; larger ones are read a channel block at
    a time (every block touches every sample's chunk)."""
    src = as_source(x)
    n = n_rows(src)
    checked = False
    if isinstance(src, h5py.Dataset) and stored_bytes(src) <= load_bytes:
        src, checked = read_whole(src), True
    if out is None:
        out = np.empty((n, n), dtype=np.float64)
    k = out.T                                                                # F-contiguous: BLAS writes in place
    beta = 0.0                                                               # the first block overwrites
    for xb in column_blocks(src, block_bytes, reuse=True, centre=True, check=not checked):   # (n, cols)
        k = blas.dsyrk(1.0, xb.T, beta=beta, c=k, trans=1, lower=0, overwrite_c=1)
        beta = 1.0
    if beta == 0.0:                                                          # no columns at all
        k[...] = 0.0
    if not np.shares_memory(k, out):                                         # BLAS did not work in place
        out.T[...] = k
    symmetrise_upper(out.T)
    return out


def gram_factor(k: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """F (N, r) with ``F F^T = K`` for a PSD Gram K: rows are features with the same centred Gram,
    r = numerical rank (Procrustes needs singular values of ``Xc^T Yc``, which equal those of
    ``Fx^T Fy``)."""
    w, u = np.linalg.eigh(k)
    keep = w > rtol * max(float(w[-1]), 0.0) if len(w) else np.zeros(0, bool)
    return u[:, keep] * np.sqrt(w[keep])


@dataclass(frozen=True)
class GramStats:
    """What the HSIC estimators need of one (n, n) Gram matrix besides ``<K, L>``: row sums,
    diagonal, total and trace. Permuting the samples permutes the vectors and keeps the scalars."""

    rows: np.ndarray
    diag: np.ndarray
    total: float
    trace: float

    @classmethod
    def of(cls, k: np.ndarray) -> GramStats:
        rows = k.sum(1)
        diag = np.diagonal(k).copy()
        return cls(rows, diag, float(rows.sum()), float(diag.sum()))

    def permuted(self, perm: np.ndarray) -> GramStats:
        return GramStats(self.rows[perm], self.diag[perm], self.total, self.trace)

    def moments_with(self, other: GramStats, kl: float, nuclear: float | None = None) -> Moments:
        """Moments of the pair (this Gram K, ``other``'s L) from ``kl = <K, L>``; the same values as
        :func:`gram_moments` up to float rounding."""
        n = len(self.rows)
        hb = (kl - 2.0 / n * float(self.rows @ other.rows) + self.total * other.total / n ** 2) / (n - 1) ** 2
        rk, rl = self.rows - self.diag, other.rows - other.diag
        hu = hsic_unbiased_terms(n, kl - float(self.diag @ other.diag), float(rk.sum()), float(rl.sum()),
                                  float(rk @ rl))
        return Moments(n, hb, hu, self.trace - self.total / n, other.trace - other.total / n, nuclear)


def gram_moments(k: np.ndarray, l: np.ndarray | None = None, *, fk: np.ndarray | None = None,
                 fl: np.ndarray | None = None) -> Moments:
    """Moments from Gram matrices (centred or not). ``l=None``: the self pair. The nuclear norm is
    computed when the factors ``fk``, ``fl`` (:func:`gram_factor`) are given."""
    n = k.shape[0]
    if n < 2:
        raise SimilarityError(f"similarity needs at least 2 samples, got {n}")
    self_pair = l is None
    l = k if l is None else l
    ss_x = float(np.trace(k)) - float(k.sum()) / n
    ss_y = float(np.trace(l)) - float(l.sum()) / n
    nuc = None
    if self_pair and fk is not None:
        nuc = ss_x
    elif fk is not None and fl is not None:
        nuc = float(np.linalg.svd(fk.T @ fl, compute_uv=False).sum()) if fk.shape[1] and fl.shape[1] else 0.0
    return Moments(n, hsic_biased(k, l), hsic_unbiased(k, l), ss_x, ss_y, nuc)


def choose_form(n: int, p: int, q: int, form: str = "auto", permutations: int = 0) -> str:
    """``features`` (memory independent of N) or ``gram`` (memory independent of C·H·W).

    ``auto`` picks the cheaper in multiply-adds: the feature form costs n·p·q per evaluation (the
    observed value and every permutation), the Gram form n²·max(p, q) once to build the Gram matrices
    plus about 4·n² per evaluation (a permuted Gram is a gather). Without permutations this is
    "features when C·H·W <= N"; with a null, the Gram form wins for all but very large N."""
    if form not in FORMS:
        raise UserError(unknown_choice_message("CKA form", form, list(FORMS)))
    if form != "auto":
        return form
    evals = 1 + max(int(permutations), 0)
    cost_features = n * p * q * evals
    cost_gram = n * n * max(p, q) + 4 * n * n * evals
    return "features" if cost_features <= cost_gram else "gram"


def pair_moments(x: Any, y: Any, *, form: str = "auto", nuclear: bool = False,
                 block_bytes: int = BLOCK_BYTES) -> tuple[Moments, Moments, Moments]:
    """(xy, xx, yy) moments of a pair, exact, streamed in the chosen form."""
    sx, sy = as_source(x), as_source(y)
    check_same_rows(sx, sy)
    chosen = choose_form(n_rows(sx), row_dim(sx), row_dim(sy), form)
    if chosen == "features":
        return (feature_moments(sx, sy, nuclear=nuclear, block_bytes=block_bytes),
                feature_moments(sx, nuclear=nuclear, block_bytes=block_bytes),
                feature_moments(sy, nuclear=nuclear, block_bytes=block_bytes))
    k, l = centred_gram(sx, block_bytes=block_bytes), centred_gram(sy, block_bytes=block_bytes)
    fk, fl = (gram_factor(k), gram_factor(l)) if nuclear else (None, None)
    return gram_moments(k, l, fk=fk, fl=fl), gram_moments(k, fk=fk), gram_moments(l, fk=fl)


# --------------------------------------------------------------------------- metrics from moments

def cka_from_moments(xy: Moments, xx: Moments, yy: Moments, unbiased: bool = False) -> float:
    """``HSIC(x, y) / sqrt(HSIC(x, x) HSIC(y, y))`` with the biased or the unbiased HSIC."""
    num, dx, dy = ((xy.hsic_unbiased, xx.hsic_unbiased, yy.hsic_unbiased) if unbiased
                   else (xy.hsic_biased, xx.hsic_biased, yy.hsic_biased))
    if num is None or dx is None or dy is None:
        raise SimilarityError(f"unbiased CKA needs at least 4 samples, got {xy.n}")
    if not (xx.ss_x > 0 and yy.ss_x > 0):
        raise SimilarityError("CKA is undefined: the features of one net have zero variance "
                              "(every sample has the same activations at this layer)")
    if not (dx > 0 and dy > 0):
        raise SimilarityError(f"unbiased CKA is undefined here: the unbiased HSIC of a net with itself is "
                              f"not positive (n={xy.n} is too small for these features)")
    return float(num / math.sqrt(dx * dy))


def procrustes_from_moments(xy: Moments) -> float:
    """``2 - 2 ||Xc^T Yc||_* / (||Xc||_F ||Yc||_F)``: min over orthogonal R of ``||X R - Y||_F^2`` for
    centred features scaled to unit Frobenius norm (the smaller side zero-padded), in [0, 2]."""
    if xy.nuclear is None:
        raise ValueError("Procrustes needs moments computed with nuclear=True")
    if not (xy.ss_x > 0 and xy.ss_y > 0):
        raise SimilarityError("the Procrustes distance is undefined: the features of one net have zero variance")
    return float(max(0.0, 2.0 - 2.0 * xy.nuclear / math.sqrt(xy.ss_x * xy.ss_y)))


def linear_cka_similarity(x: Any, y: Any, *, form: str = "auto", block_bytes: int = BLOCK_BYTES) -> float:
    """Linear CKA with the plug-in (biased) HSIC on per-sample flattened, centred features; exact.
    1 for x = y; invariant to orthogonal transforms and isotropic scaling of either side."""
    xy, xx, yy = pair_moments(x, y, form=form, block_bytes=block_bytes)
    return cka_from_moments(xy, xx, yy)


def unbiased_cka_similarity(x: Any, y: Any, *, form: str = "auto", block_bytes: int = BLOCK_BYTES) -> float:
    """Linear CKA with the unbiased HSIC of Song et al. 2012 (n >= 4); ~0 for independent features."""
    xy, xx, yy = pair_moments(x, y, form=form, block_bytes=block_bytes)
    return cka_from_moments(xy, xx, yy, unbiased=True)


def procrustes_distance(x: Any, y: Any, *, form: str = "auto", block_bytes: int = BLOCK_BYTES) -> float:
    """Orthogonal Procrustes distance of centred, Frobenius-normalised flattened features, in [0, 2]."""
    xy, _, _ = pair_moments(x, y, form=form, nuclear=True, block_bytes=block_bytes)
    return procrustes_from_moments(xy)


