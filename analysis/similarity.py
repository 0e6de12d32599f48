"""Similarity baselines between two nets' features at one layer: linear CKA (biased, unbiased and
minibatch HSIC), SVCCA, PWCCA and the orthogonal Procrustes distance, with a permutation null.

Names say the direction: ``*_similarity`` (larger = more alike, 1 = alike up to the metric's
invariances) and ``*_distance`` (smaller = more alike, 0 = alike). Everything is float64.

Inputs ("sources") are numpy arrays, torch tensors or h5py datasets of shape ``(N, ...)``, one row
per sample; CKA and Procrustes flatten each sample (C·H·W). h5py datasets are read block by block
(:func:`features.store.iter_blocks` / :func:`features.store.read_rows`), never whole, unless a
function says it loads them.

Two exact forms of linear CKA and of the Procrustes distance (both give the same number):

- ``features``: accumulate ``Z^T W`` (p x q), the column sums, row norms, ... of the rows shifted by a
  reference row (the first block's mean, which keeps float64 cancellation small), over row blocks;
  centring is applied at the end (``Xc^T Yc = Z^T W - sz sw^T / n``). One sequential pass over the
  rows (the feature file's chunk layout), memory ``O(p·q)`` and independent of N, cost ``N·p·q``.
  The self terms (``X^T X``) are separate passes using a symmetric rank-k update (half the flops).
- ``gram``: the centred Gram matrix ``K = Xc Xc^T`` (N x N) accumulated over column (channel)
  blocks, each block centred exactly (all rows present); memory ``O(N^2)`` and independent of
  C·H·W, cost ``N^2·p``. Used when C·H·W is large (vgg16_bn conv4_3: 401,408 dims).
- ``auto`` takes ``features`` when ``max(p, q) <= N`` and ``gram`` otherwise: the smaller of the two
  in memory and in flops.

Estimators. ``hsic_biased = tr(K H L H) / (n-1)^2`` (the plug-in one of Kornblith et al. 2019);
``hsic_unbiased`` is the U-statistic of Song et al. 2012 (needs n >= 4; translation invariant, so it
is computed on shifted rows as well); the minibatch estimator of Nguyen et al. 2021 averages the
unbiased HSIC over random minibatches. Unbiased estimates of an unrelated pair scatter around 0 and
may be slightly negative.

Permutation null: the pairing of samples is shuffled (rows of the second net permuted; the same
seeded permutations for every pair), the metric recomputed, and the p-value is
``(1 + #{null at least as close as observed}) / (1 + permutations)``; its mean is the chance level.
The minibatch CKA shuffles the pairing within each (random) minibatch instead, keeping one pass.

SVCCA / PWCCA see ``pooled`` (spatial mean per channel, N x C), ``flat`` (N x C·H·W) or
``positions`` (N·H·W x C) features; CCA between r_x and r_y dimensions is refused unless
N > r_x + r_y (otherwise perfect correlations appear by construction).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np
import torch
from scipy.linalg import blas

from common.errors import UserError
from common.progress import progress
from common.registry import Registry, unknown_choice_message
from features.store import iter_blocks

BLOCK_BYTES = 64 << 20           # float64 working block of a streamed source
FORMS = ("auto", "features", "gram")
CCA_FEATURES = ("pooled", "flat", "positions")
CKA_FAMILY = ("cka", "cka_unbiased", "procrustes")
CCA_FAMILY = ("svcca", "pwcca")


class SimilarityError(UserError):
    """The data cannot give a meaningful value (zero variance, too few samples for the estimator)."""


# =========================================================================== sources

Source = Any  # np.ndarray | h5py.Dataset (after as_source)


def as_source(x: Any) -> Source:
    """An array-like of shape (N, ...) as something we can slice rows/columns of (h5py stays lazy)."""
    if isinstance(x, h5py.Dataset):
        src = x
    elif isinstance(x, torch.Tensor):
        src = x.detach().cpu().numpy()
    else:
        src = np.asarray(x)
    if len(src.shape) < 2:
        raise UserError(f"features must have one row per sample, shape (N, ...); got shape {tuple(src.shape)}")
    return src


def n_rows(src: Source) -> int:
    return int(src.shape[0])


def row_dim(src: Source) -> int:
    """Flattened per-sample dimension (C·H·W)."""
    return int(np.prod(src.shape[1:], dtype=np.int64))


def _rows_per_block(dim: int, block_bytes: int) -> int:
    return max(1, int(block_bytes) // (8 * max(1, dim)))


def row_blocks(src: Source, block_bytes: int = BLOCK_BYTES, rows: int | None = None) -> Iterator[np.ndarray]:
    """Consecutive row blocks as (b, C·H·W) float64 (``rows`` per block, default from ``block_bytes``)."""
    rows = rows or _rows_per_block(row_dim(src), block_bytes)
    if isinstance(src, h5py.Dataset):
        for _, blk in iter_blocks(src, rows, np.float64):
            yield blk.reshape(len(blk), -1)
    else:
        for s in range(0, n_rows(src), rows):
            blk = np.asarray(src[s:s + rows], dtype=np.float64)
            yield blk.reshape(len(blk), -1)


def column_blocks(src: Source, block_bytes: int = BLOCK_BYTES) -> Iterator[np.ndarray]:
    """Blocks of whole channels (axis 1) over all rows, as (N, cols) float64, C-contiguous."""
    n = n_rows(src)
    inner = int(np.prod(src.shape[2:], dtype=np.int64))
    per = max(1, int(block_bytes) // (8 * n * max(1, inner)))
    for c0 in range(0, int(src.shape[1]), per):
        blk = np.asarray(src[:, c0:c0 + per])
        yield np.array(blk, dtype=np.float64, order="C").reshape(n, -1)


def rows_at(src: Source, idx: np.ndarray) -> np.ndarray:
    """Rows at sorted unique indices, in the source dtype; runs of consecutive rows are read as one
    contiguous read (h5py point selections are ~10x slower than a loop of small slices)."""
    idx = np.asarray(idx, dtype=np.int64)
    if not isinstance(src, h5py.Dataset):
        return np.asarray(src[idx])
    out = np.empty((len(idx),) + tuple(src.shape[1:]), dtype=src.dtype)
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    k = 0
    for run in np.split(idx, breaks):
        if len(run):
            src.read_direct(out, np.s_[int(run[0]):int(run[-1]) + 1], np.s_[k:k + len(run)])
            k += len(run)
    return out


def load_matrix(src: Source, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """The whole source as (N, C·H·W) float64 (read block by block into one array)."""
    out = np.empty((n_rows(src), row_dim(src)), dtype=np.float64)
    s = 0
    for blk in row_blocks(src, block_bytes):
        out[s:s + len(blk)] = blk
        s += len(blk)
    return out


# =========================================================================== small linear algebra

def _fro2(a: np.ndarray) -> float:
    """Squared Frobenius norm without a temporary (a must be C- or F-contiguous)."""
    r = a.ravel(order="K")
    return float(np.dot(r, r))


def _symmetrise_upper(m: np.ndarray, step: int = 1024) -> np.ndarray:
    """Fill the lower triangle of a square matrix from its upper one (as left by BLAS ``syrk``), in
    blocks so no full-size temporary is made."""
    p = m.shape[0]
    for j0 in range(0, p, step):
        j1 = min(p, j0 + step)
        blk = m[j0:j1, j0:j1]
        blk[...] = np.triu(blk) + np.triu(blk, 1).T
        m[j1:, j0:j1] = m[j0:j1, j1:].T
    return m


def _hsic_unbiased_terms(n: int, tr_kl: float, sum_k: float, sum_l: float, k1_l1: float) -> float | None:
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
    return _hsic_unbiased_terms(n, tr_kl, float(rk.sum()), float(rl.sum()), float(rk @ rl))


# =========================================================================== moments of a pair

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
            _symmetrise_upper(m)
        fro2 = _fro2(m)
        sx_m_sy = float(sx @ m @ sy)
        hu = _hsic_unbiased_terms(n, fro2 - self.a, float(sx @ sx) - self.tx, float(sy @ sy) - self.ty,
                                  sx_m_sy - float(sx @ self.ux) - float(sy @ self.uy) + self.a)
        m = blas.dger(-1.0 / n, sx, sy, a=m, overwrite_a=1)                 # Xc^T Yc   (p, q)
        ss_x = self.tx - float(sx @ sx) / n
        ss_y = self.ty - float(sy @ sy) / n
        hb = _fro2(m) / (n - 1) ** 2
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
    _check_pair(sx, sy)
    p, q = row_dim(sx), row_dim(sy)
    acc = FeatureMoments(p, q)
    rows = _rows_per_block(p + q, block_bytes)
    for xb, yb in zip(row_blocks(sx, rows=rows), row_blocks(sy, rows=rows)):
        acc.update(xb, yb)
    return acc.result(nuclear)


def _check_pair(sx: Source, sy: Source) -> None:
    if n_rows(sx) != n_rows(sy):
        raise UserError(f"the two feature sets have different numbers of samples ({n_rows(sx)} vs {n_rows(sy)}); "
                        f"similarities compare the same images row by row")


def centred_gram(x: Any, *, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """``Kc = Xc Xc^T`` (N, N) of the flattened, column-centred features, accumulated over channel
    blocks (memory O(N^2) + one block, independent of C·H·W). Returns a C-contiguous symmetric array."""
    src = as_source(x)
    n = n_rows(src)
    k = np.zeros((n, n), dtype=np.float64, order="F")
    for xb in column_blocks(src, block_bytes):                              # (n, cols)
        xb -= xb.mean(0)
        k = blas.dsyrk(1.0, xb.T, beta=1.0, c=k, trans=1, lower=0, overwrite_c=1)
    _symmetrise_upper(k)
    return k.T                                                               # symmetric: C-contiguous view


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
    def of(cls, k: np.ndarray) -> "GramStats":
        rows = k.sum(1)
        diag = np.diagonal(k).copy()
        return cls(rows, diag, float(rows.sum()), float(diag.sum()))

    def permuted(self, perm: np.ndarray) -> "GramStats":
        return GramStats(self.rows[perm], self.diag[perm], self.total, self.trace)

    def moments_with(self, other: "GramStats", kl: float, nuclear: float | None = None) -> Moments:
        """Moments of the pair (this Gram K, ``other``'s L) from ``kl = <K, L>``; the same values as
        :func:`gram_moments` up to float rounding."""
        n = len(self.rows)
        hb = (kl - 2.0 / n * float(self.rows @ other.rows) + self.total * other.total / n ** 2) / (n - 1) ** 2
        rk, rl = self.rows - self.diag, other.rows - other.diag
        hu = _hsic_unbiased_terms(n, kl - float(self.diag @ other.diag), float(rk.sum()), float(rl.sum()),
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
    _check_pair(sx, sy)
    chosen = choose_form(n_rows(sx), row_dim(sx), row_dim(sy), form)
    if chosen == "features":
        return (feature_moments(sx, sy, nuclear=nuclear, block_bytes=block_bytes),
                feature_moments(sx, nuclear=nuclear, block_bytes=block_bytes),
                feature_moments(sy, nuclear=nuclear, block_bytes=block_bytes))
    k, l = centred_gram(sx, block_bytes=block_bytes), centred_gram(sy, block_bytes=block_bytes)
    fk, fl = (gram_factor(k), gram_factor(l)) if nuclear else (None, None)
    return gram_moments(k, l, fk=fk, fl=fl), gram_moments(k, fk=fk), gram_moments(l, fk=fl)


# =========================================================================== metrics from moments

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


# =========================================================================== minibatch CKA

def minibatch_indices(n: int, batch_size: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded random batches of rows (each sorted for reading): ``n // batch_size`` full batches; the
    ``n % batch_size`` left-over rows are not used. One batch of all rows when n <= batch_size."""
    if batch_size < 4:
        raise UserError(f"--batch_size {batch_size}: the minibatch CKA needs batches of at least 4 samples")
    if n < 4:
        raise SimilarityError(f"minibatch CKA needs at least 4 samples, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    if n <= batch_size:
        return [np.sort(perm)]
    return [np.sort(perm[i * batch_size:(i + 1) * batch_size]) for i in range(n // batch_size)]


def batch_gram(src: Source, idx: np.ndarray, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """Gram (b, b) of the rows ``idx`` (column-centred within the batch), accumulated over column
    chunks so a batch of wide features never needs a full float64 copy."""
    rows = rows_at(src, idx).reshape(len(idx), -1)                          # (b, d) source dtype
    b, d = rows.shape
    k = np.zeros((b, b), dtype=np.float64, order="F")
    per = max(1, int(block_bytes) // (8 * b))
    for c0 in range(0, d, per):
        chunk = np.array(rows[:, c0:c0 + per], dtype=np.float64, order="C")
        chunk -= chunk.mean(0)
        k = blas.dsyrk(1.0, chunk.T, beta=1.0, c=k, trans=1, lower=0, overwrite_c=1)
    return _symmetrise_upper(k).T


@dataclass
class MinibatchHSIC:
    """Mean unbiased HSIC over minibatches for every pair of sources, and its within-batch null."""

    hsic: np.ndarray          # (K, K)
    null: np.ndarray          # (P, K, K): pairing shuffled within each batch
    batches: int
    samples_used: int


def minibatch_hsic(sources: Sequence[Any], *, batch_size: int = 256, seed: int = 0, permutations: int = 0,
                   block_bytes: int = BLOCK_BYTES, desc: str = "minibatch CKA") -> MinibatchHSIC:
    """Nguyen et al. 2021: average the unbiased HSIC of each pair over random minibatches (one pass,
    memory O(batch_size^2 · K)). The null shuffles the pairing within each batch (each batch is a
    random subset, so this is a shuffle of the pairing of samples)."""
    srcs = [as_source(s) for s in sources]
    for s in srcs[1:]:
        _check_pair(srcs[0], s)
    n, kk = n_rows(srcs[0]), len(srcs)
    batches = minibatch_indices(n, batch_size, seed)
    rng = np.random.default_rng([seed, 1])
    acc = np.zeros((kk, kk))
    null = np.zeros((permutations, kk, kk))
    for idx in progress(batches, total=len(batches), desc=desc):
        grams = [batch_gram(s, idx, block_bytes) for s in srcs]
        for i in range(kk):
            for j in range(i, kk):
                acc[i, j] += hsic_unbiased(grams[i], grams[j])
        for t in range(permutations):
            sigma = rng.permutation(len(idx))
            permuted = [g[np.ix_(sigma, sigma)] for g in grams]
            for i in range(kk):
                for j in range(i, kk):
                    null[t, i, j] += hsic_unbiased(grams[i], permuted[j])
    nb = len(batches)
    acc, null = acc / nb, null / nb
    iu = np.triu_indices(kk, 1)
    acc[(iu[1], iu[0])] = acc[iu]
    null[:, iu[1], iu[0]] = null[:, iu[0], iu[1]]
    return MinibatchHSIC(acc, null, nb, nb * len(batches[0]))


def cka_from_hsic(hsic_xy: np.ndarray | float, hsic_xx: float, hsic_yy: float) -> np.ndarray | float:
    if not (hsic_xx > 0 and hsic_yy > 0):
        raise SimilarityError("minibatch CKA is undefined: the mean unbiased HSIC of a net with itself is not "
                              "positive (zero-variance features, or batches too small)")
    return hsic_xy / math.sqrt(hsic_xx * hsic_yy)


def minibatch_cka_similarity(x: Any, y: Any, *, batch_size: int = 256, seed: int = 0,
                             block_bytes: int = BLOCK_BYTES) -> float:
    """Minibatch linear CKA (Nguyen et al. 2021): ``mean HSIC_u(x, y) / sqrt(mean HSIC_u(x, x) mean
    HSIC_u(y, y))`` over seeded random batches of ``batch_size`` rows."""
    r = minibatch_hsic([x, y], batch_size=batch_size, seed=seed, block_bytes=block_bytes)
    return float(cka_from_hsic(r.hsic[0, 1], r.hsic[0, 0], r.hsic[1, 1]))


# =========================================================================== SVCCA / PWCCA

def cca_samples(x: Any, mode: str = "flat", block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """Features as a (samples, dims) float64 matrix for CCA: ``flat`` (N, C·H·W); ``pooled`` (N, C),
    the spatial mean per channel; ``positions`` (N·H·W, C), every position of every image a sample."""
    if mode not in CCA_FEATURES:
        raise UserError(unknown_choice_message("CCA feature mode", mode, list(CCA_FEATURES)))
    src = as_source(x)
    if mode == "flat" or len(src.shape) == 2:
        return load_matrix(src, block_bytes)
    n, c = n_rows(src), int(src.shape[1])
    hw = int(np.prod(src.shape[2:], dtype=np.int64))
    out = np.empty((n, c) if mode == "pooled" else (n * hw, c), dtype=np.float64)
    s = 0
    for blk in row_blocks(src, block_bytes):
        b = len(blk)
        blk = blk.reshape(b, c, hw)
        if mode == "pooled":
            out[s:s + b] = blk.mean(2)
        else:
            out[s * hw:(s + b) * hw] = blk.transpose(0, 2, 1).reshape(b * hw, c)
        s += b
    return out


def rows_per_sample(x: Any, mode: str) -> int:
    """How many CCA rows one image gives (H·W for ``positions``, else 1)."""
    src = as_source(x)
    return int(np.prod(src.shape[2:], dtype=np.int64)) if mode == "positions" and len(src.shape) > 2 else 1


def _centre(a: np.ndarray) -> np.ndarray:
    return a - a.mean(0)


def orthonormal_basis(xc: np.ndarray, keep_variance: float | None = None) -> np.ndarray:
    """Orthonormal basis (n, r) of the column space of centred data: numerical rank, or the top
    directions holding ``keep_variance`` of the variance (SVCCA's SVD step)."""
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    if not len(s) or s[0] <= 0:
        return u[:, :0]
    rank = int(np.sum(s > s[0] * max(xc.shape) * np.finfo(np.float64).eps))
    k = rank
    if keep_variance is not None:
        cum = np.cumsum(s[:rank] ** 2) / np.sum(s[:rank] ** 2)
        k = min(rank, int(np.searchsorted(cum, keep_variance - 1e-12)) + 1)
    return u[:, :k]


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


def pwcca_from_bases(qx: np.ndarray, qy: np.ndarray, xc: np.ndarray) -> float:
    """Morcos et al. 2018: canonical correlations weighted by how much of x's (centred) neurons each
    of x's canonical variates accounts for, ``a_i = sum_j |<h_i, x_j>|``."""
    a, rho, _ = np.linalg.svd(qx.T @ qy, full_matrices=False)
    rho = np.clip(rho, 0.0, 1.0)
    h = qx @ a[:, :len(rho)]                                                # canonical variates (n, r)
    alpha = np.abs(h.T @ xc).sum(1)                                         # (r,)
    if not alpha.sum() > 0:
        raise SimilarityError("PWCCA is undefined: the features have zero variance")
    return float(alpha @ rho / alpha.sum())


def svcca_similarity(x: Any, y: Any, *, keep_variance: float = 0.99, features: str = "flat") -> float:
    """SVCCA (Raghu et al. 2017): keep the top singular directions of each side holding
    ``keep_variance`` of its variance, then the mean canonical correlation between them."""
    xs, ys = cca_samples(x, features), cca_samples(y, features)
    _check_pair(xs, ys)
    ux, uy = orthonormal_basis(_centre(xs), keep_variance), orthonormal_basis(_centre(ys), keep_variance)
    check_cca_dims(len(xs), ux.shape[1], uy.shape[1], "SVCCA")
    return svcca_from_bases(ux, uy)


def pwcca_similarity(x: Any, y: Any, *, features: str = "flat") -> float:
    """PWCCA (Morcos et al. 2018), weights from x's side (so not symmetric); CCA on the full-rank
    part of each side (no variance truncation)."""
    xs, ys = cca_samples(x, features), cca_samples(y, features)
    _check_pair(xs, ys)
    xc, yc = _centre(xs), _centre(ys)
    qx, qy = orthonormal_basis(xc), orthonormal_basis(yc)
    check_cca_dims(len(xs), qx.shape[1], qy.shape[1], "PWCCA")
    return pwcca_from_bases(qx, qy, xc)


# =========================================================================== registry and the null

@dataclass(frozen=True)
class Metric:
    name: str
    direction: str                      # "similarity" (larger = closer) | "distance" (smaller = closer)
    fn: Callable[..., float]
    description: str

    def __call__(self, x: Any, y: Any, **kw: Any) -> float:
        return self.fn(x, y, **kw)


METRICS: Registry = Registry("similarity metric")
for _m in (
    Metric("cka", "similarity", linear_cka_similarity,
           "linear CKA, plug-in (biased) HSIC, flattened C*H*W features, all samples, exact"),
    Metric("cka_unbiased", "similarity", unbiased_cka_similarity,
           "linear CKA with the unbiased HSIC of Song et al. 2012 (may be slightly negative for unrelated nets)"),
    Metric("cka_minibatch", "similarity", minibatch_cka_similarity,
           "minibatch linear CKA of Nguyen et al. 2021: unbiased HSIC averaged over random minibatches"),
    Metric("svcca", "similarity", svcca_similarity,
           "SVCCA: SVD keeping 99% of the variance, then the mean canonical correlation"),
    Metric("pwcca", "similarity", pwcca_similarity,
           "PWCCA: canonical correlations weighted by the row net's neurons (not symmetric)"),
    Metric("procrustes", "distance", procrustes_distance,
           "orthogonal Procrustes distance of centred, Frobenius-normalised features, in [0, 2]"),
):
    METRICS.add(_m.name, _m)


def get_metric(name: str) -> Metric:
    try:
        return METRICS.get(name)
    except KeyError as e:
        raise UserError(str(e)) from None


def permutation_indices(n: int, permutations: int, seed: int = 0) -> Iterator[np.ndarray]:
    """The seeded sequence of row permutations every null of this module uses."""
    rng = np.random.default_rng(seed)
    for _ in range(permutations):
        yield rng.permutation(n)


@dataclass(frozen=True)
class NullSummary:
    observed: float
    null_mean: float
    null_std: float
    p_value: float
    permutations: int
    null: np.ndarray = field(repr=False)


def null_summary(observed: float, null: np.ndarray, direction: str) -> NullSummary:
    """Chance level and permutation p-value ``(1 + #{null at least as close}) / (1 + P)``."""
    null = np.asarray(null, dtype=np.float64)
    if direction not in ("similarity", "distance"):
        raise ValueError(f"direction {direction!r}; valid: similarity, distance")
    as_close = null >= observed if direction == "similarity" else null <= observed
    p = (1.0 + float(as_close.sum())) / (1.0 + len(null))
    return NullSummary(float(observed), float(null.mean()) if len(null) else float("nan"),
                       float(null.std()) if len(null) else float("nan"), p, len(null), null)


def permutation_test(metric: str, x: Any, y: Any, *, permutations: int = 100, seed: int = 0,
                     **kwargs: Any) -> NullSummary:
    """Observed metric and its permutation null: recompute with the rows (images) of y shuffled. x and
    y are loaded into memory; ``kwargs`` go to the metric (e.g. ``features="pooled"``)."""
    m = get_metric(metric)
    xs, ys = as_source(x), as_source(y)
    xs = xs[...] if isinstance(xs, h5py.Dataset) else xs
    ys = ys[...] if isinstance(ys, h5py.Dataset) else ys
    _check_pair(xs, ys)
    observed = m(xs, ys, **kwargs)
    null = [m(xs, ys[perm], **kwargs) for perm in permutation_indices(len(ys), permutations, seed)]
    return null_summary(observed, np.asarray(null), m.direction)


# =========================================================================== matrices over several nets

@dataclass
class MatrixResult:
    """One metric over every pair of K nets: values, and the permutation null when asked for.
    Undefined entries are NaN here and ``None`` in :meth:`to_json`, always with a warning saying why."""

    metric: str
    direction: str
    matrix: np.ndarray                        # (K, K)
    null: np.ndarray | None = None            # (P, K, K) null values, NaN where not computed
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def warn(self, msg: str) -> None:
        if msg not in self.warnings:
            self.warnings.append(msg)

    def summaries(self) -> dict[str, np.ndarray]:
        """null_mean, null_std, p_values (K, K); NaN where there is no value or no null."""
        k = self.matrix.shape[0]
        out = {key: np.full((k, k), np.nan) for key in ("null_mean", "null_std", "p_values")}
        if self.null is None:
            return out
        for i in range(k):
            for j in range(k):
                col = self.null[:, i, j]
                if np.isfinite(self.matrix[i, j]) and len(col) and np.all(np.isfinite(col)):
                    s = null_summary(self.matrix[i, j], col, self.direction)
                    out["null_mean"][i, j], out["null_std"][i, j], out["p_values"][i, j] = \
                        s.null_mean, s.null_std, s.p_value
        return out

    def to_json(self) -> dict[str, Any]:
        def lists(a: np.ndarray) -> list:
            return [[None if not np.isfinite(v) else float(v) for v in row] for row in a]

        body: dict[str, Any] = {"direction": self.direction, "matrix": lists(self.matrix)}
        if self.null is not None:
            sums = self.summaries()
            body.update({"null_mean": lists(sums["null_mean"]), "null_std": lists(sums["null_std"]),
                         "p_values": lists(sums["p_values"]), "permutations": int(self.null.shape[0])})
            missing_null = np.isfinite(self.matrix) & ~np.isfinite(sums["p_values"])
            if missing_null.any() and not self.warnings:
                self.warn("the permutation null is missing for some pairs")
        if not np.all(np.isfinite(self.matrix)) and not self.warnings:
            self.warn("some values are undefined")
        body.update(self.details)
        body["warnings"] = list(self.warnings)
        return body


def _fill_symmetric(a: np.ndarray) -> None:
    """Copy the upper triangle of the last two axes to the lower one."""
    k = a.shape[-1]
    iu = np.triu_indices(k, 1)
    a[..., iu[1], iu[0]] = a[..., iu[0], iu[1]]


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2 ** 30:.2f} GiB"


def _same_rows(srcs: list[Source]) -> int:
    for s in srcs[1:]:
        _check_pair(srcs[0], s)
    return n_rows(srcs[0])


def cka_family_matrices(sources: Sequence[Any], metrics: Sequence[str], *, form: str = "auto",
                        permutations: int = 0, seed: int = 0, memory_bytes: int = 4 << 30,
                        block_bytes: int = BLOCK_BYTES) -> dict[str, MatrixResult]:
    """``cka``, ``cka_unbiased`` and ``procrustes`` over every pair of sources, exact and streamed.

    ``features`` form: one pass per net (self terms) and one per pair, memory O(max p·q); the null
    loads a pair into memory (skipped with a warning when it does not fit ``memory_bytes``).
    ``gram`` form: one centred Gram per net held in memory (refused when they do not fit); the null
    permutes Gram matrices (O(N^2) per permutation)."""
    metrics = [m for m in metrics if m in CKA_FAMILY]
    block_bytes = min(block_bytes, max(1 << 12, memory_bytes // 8))
    srcs = [as_source(s) for s in sources]
    n, k = _same_rows(srcs), len(srcs)
    dims = [row_dim(s) for s in srcs]
    chosen = choose_form(n, max(dims), max(dims), form, permutations)
    nuclear = "procrustes" in metrics
    if form == "auto" and chosen == "gram" and \
            k * n * n * 8 * (2 if nuclear else 1) + (n * n * 8 if permutations else 0) > memory_bytes:
        chosen = "features"                 # the Gram matrices would not fit: stream the features instead
    res = {m: MatrixResult(m, get_metric(m).direction, np.full((k, k), np.nan),
                           np.full((permutations, k, k), np.nan) if permutations else None,
                           {"form": chosen}) for m in metrics}

    def record(i: int, j: int, xy: Moments, xx: Moments, yy: Moments, t: int | None = None) -> None:
        for m in metrics:
            try:
                v = (procrustes_from_moments(xy) if m == "procrustes"
                     else cka_from_moments(xy, xx, yy, unbiased=m == "cka_unbiased"))
            except SimilarityError as e:
                res[m].warn(f"{e} (pair {i},{j})" if t is None else f"null: {e}")
                continue
            if t is None:
                res[m].matrix[i, j] = v
            else:
                res[m].null[t, i, j] = v

    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    if chosen == "gram":
        need = k * n * n * 8 * (2 if nuclear else 1) + (n * n * 8 if permutations else 0)
        if need > memory_bytes:
            raise UserError(
                f"the Gram form of CKA holds one {n} x {n} float64 matrix per net: {_gib(need)} for {k} nets, "
                f"more than --memory_gb {memory_bytes / 2 ** 30:g}; raise --memory_gb, compare fewer --nets at "
                f"a time, or use --cka_form features (memory {_gib(8 * max(dims) ** 2)}, independent of N)")
        grams = [centred_gram(s, block_bytes=block_bytes) for s in progress(srcs, total=k, desc="Gram matrices")]
        factors = [gram_factor(g) for g in grams] if nuclear else [None] * k
        selfm = [gram_moments(g, fk=f) for g, f in zip(grams, factors)]
        for i, j in progress(pairs, total=len(pairs), desc="CKA pairs"):
            xy = selfm[i] if i == j else gram_moments(grams[i], grams[j], fk=factors[i], fl=factors[j])
            record(i, j, xy, selfm[i], selfm[j])
        # The null: each net's Gram is permuted once per permutation (not once per pair), and only
        # <K_i, P L_j P^T> needs the permuted matrix; row sums and diagonals are permuted vectors.
        stats = [GramStats.of(g) for g in grams]
        for t, perm in progress(enumerate(permutation_indices(n, permutations, seed)), total=permutations,
                                desc="CKA null") if permutations else ():
            for j in range(k):
                lp = np.take(np.take(grams[j], perm, 0), perm, 1)
                lst = stats[j].permuted(perm)
                fl = factors[j][perm] if nuclear else None
                for i in range(j + 1):
                    nuc = None
                    if nuclear:
                        fk = factors[i]
                        nuc = float(np.linalg.svd(fk.T @ fl, compute_uv=False).sum()) if fk.shape[1] and fl.shape[1] \
                            else 0.0
                    record(i, j, stats[i].moments_with(lst, float(np.vdot(grams[i], lp)), nuc), selfm[i], selfm[j], t)
    else:
        need = 8 * max(dims) ** 2 + 2 * block_bytes
        if need > memory_bytes:
            raise UserError(
                f"the feature form of CKA holds a {max(dims)} x {max(dims)} float64 matrix ({_gib(need)}), more "
                f"than --memory_gb {memory_bytes / 2 ** 30:g}; raise --memory_gb or use --cka_form gram "
                f"(memory {_gib(8 * n * n * k)}, independent of C*H*W)")
        selfm = [feature_moments(s, nuclear=nuclear, block_bytes=block_bytes)
                 for s in progress(srcs, total=k, desc="CKA self terms")]
        loaded: dict[int, np.ndarray] = {}
        for i, j in progress(pairs, total=len(pairs), desc="CKA pairs"):
            xy = selfm[i] if i == j else feature_moments(srcs[i], srcs[j], nuclear=nuclear, block_bytes=block_bytes)
            record(i, j, xy, selfm[i], selfm[j])
            if not permutations:
                continue
            pair_need = 8 * n * (dims[i] + 2 * dims[j]) + 8 * dims[i] * dims[j] + block_bytes
            if pair_need > memory_bytes:
                for m in metrics:
                    res[m].warn(f"permutation null skipped for pairs needing more than --memory_gb "
                                f"{memory_bytes / 2 ** 30:g} in memory (pair {i},{j} needs {_gib(pair_need)})")
                continue
            for key in list(loaded):
                if key not in (i, j):
                    del loaded[key]
            zx = loaded.setdefault(i, load_matrix(srcs[i], block_bytes))
            zy = loaded.setdefault(j, load_matrix(srcs[j], block_bytes))
            for t, perm in enumerate(permutation_indices(n, permutations, seed)):
                record(i, j, feature_moments(zx, zy[perm], nuclear=nuclear, block_bytes=block_bytes),
                       selfm[i], selfm[j], t)
    for m in metrics:
        _fill_symmetric(res[m].matrix)
        if res[m].null is not None:
            _fill_symmetric(res[m].null)
    return res


def minibatch_cka_matrix(sources: Sequence[Any], *, batch_size: int = 256, seed: int = 0, permutations: int = 0,
                         block_bytes: int = BLOCK_BYTES) -> MatrixResult:
    """``cka_minibatch`` over every pair of sources in one pass (Nguyen et al. 2021)."""
    r = minibatch_hsic(sources, batch_size=batch_size, seed=seed, permutations=permutations, block_bytes=block_bytes)
    k = r.hsic.shape[0]
    out = MatrixResult("cka_minibatch", "similarity", np.full((k, k), np.nan),
                       np.full((permutations, k, k), np.nan) if permutations else None,
                       {"batch_size": batch_size, "batches": r.batches, "samples_used": r.samples_used,
                        "null": "pairing shuffled within each random minibatch"})
    for i in range(k):
        for j in range(k):
            try:
                out.matrix[i, j] = cka_from_hsic(r.hsic[i, j], r.hsic[i, i], r.hsic[j, j])
                if permutations:
                    out.null[:, i, j] = cka_from_hsic(r.null[:, i, j], r.hsic[i, i], r.hsic[j, j])
            except SimilarityError as e:
                out.warn(f"{e} (pair {i},{j})")
    return out


def cca_matrices(sources: Sequence[Any], metrics: Sequence[str], *, features: str = "pooled",
                 keep_variance: float = 0.99, permutations: int = 0, seed: int = 0,
                 memory_bytes: int = 4 << 30, block_bytes: int = BLOCK_BYTES) -> dict[str, MatrixResult]:
    """``svcca`` (symmetric) and ``pwcca`` (row net gives the weights) over every pair. The features
    are loaded (``cca_samples``); the null shuffles the pairing of images."""
    metrics = [m for m in metrics if m in CCA_FAMILY]
    block_bytes = min(block_bytes, max(1 << 12, memory_bytes // 8))
    srcs = [as_source(s) for s in sources]
    n, k = _same_rows(srcs), len(srcs)
    if features not in CCA_FEATURES:
        raise UserError(unknown_choice_message("CCA feature mode", features, list(CCA_FEATURES)))
    per = [rows_per_sample(s, features) for s in srcs]
    if len(set(per)) > 1:
        raise UserError(f"--cca_features positions needs the same spatial size in every net; positions per image: "
                        f"{per}; use --cca_features pooled")
    hw = per[0]
    cdims = [int(s.shape[1]) if features != "flat" else row_dim(s) for s in srcs]
    need = sum(8 * n * hw * d * 3 for d in cdims)
    if need > memory_bytes:
        raise UserError(f"SVCCA/PWCCA load the features: {features} features of {k} nets need about {_gib(need)}, "
                        f"more than --memory_gb {memory_bytes / 2 ** 30:g}; use --cca_features pooled or raise "
                        f"--memory_gb")
    views = []
    for s in progress(srcs, total=k, desc="CCA bases"):
        xc = _centre(cca_samples(s, features, block_bytes))
        views.append({"xc": xc,
                      "svcca": orthonormal_basis(xc, keep_variance) if "svcca" in metrics else None,
                      "pwcca": orthonormal_basis(xc) if "pwcca" in metrics else None})
    rows = n * hw
    res = {}
    for m in metrics:
        label = "SVCCA" if m == "svcca" else "PWCCA"
        ranks = [v[m].shape[1] for v in views]
        if max(ranks) > 0:   # every pair, a net with itself included, must have n > r_i + r_j
            check_cca_dims(rows, max(ranks), max(ranks), label)
        r = MatrixResult(m, "similarity", np.full((k, k), np.nan),
                         np.full((permutations, k, k), np.nan) if permutations else None,
                         {"dims_kept" if m == "svcca" else "rank": ranks, "samples": rows})
        if m == "svcca":
            r.details["keep_variance"] = keep_variance
        else:
            r.details["symmetric"] = False
            r.details["note"] = "row net's neurons give the weights: matrix[i][j] = PWCCA(nets[i], nets[j])"
        if 2 * max(ranks) * 5 > rows:
            r.warn(f"{rows} samples for up to {max(ranks)} + {max(ranks)} canonical dimensions: canonical "
                   f"correlations are inflated at this ratio; compare with null_mean")
        res[m] = r
    for m in metrics:
        r = res[m]
        pairs = [(i, j) for i in range(k) for j in range(k) if m == "pwcca" or j >= i]
        for i, j in progress(pairs, total=len(pairs), desc=m):
            try:
                check_cca_dims(rows, views[i][m].shape[1], views[j][m].shape[1], m.upper())
                r.matrix[i, j] = _cca_value(m, views[i], views[j][m])
                for t, perm in enumerate(permutation_indices(n, permutations, seed)):
                    rowperm = (perm[:, None] * hw + np.arange(hw)).ravel() if hw > 1 else perm   # whole images
                    r.null[t, i, j] = _cca_value(m, views[i], views[j][m][rowperm])
            except SimilarityError as e:
                r.warn(f"{e} (pair {i},{j})")
        if m == "svcca":
            _fill_symmetric(r.matrix)
            if r.null is not None:
                _fill_symmetric(r.null)
    return res


def _cca_value(metric: str, view_x: dict[str, np.ndarray], qy: np.ndarray) -> float:
    if metric == "svcca":
        return svcca_from_bases(view_x["svcca"], qy)
    return pwcca_from_bases(view_x["pwcca"], qy, view_x["xc"])
