"""Device-aware comparison of stored features: bitwise where every extraction involved ran on the CPU,
within a stated tolerance where one ran on CUDA.

Convention: ``max |a - b| <= tol * max |b|`` over the finite values (``b`` the reference), and the NaN,
+inf and -inf positions identical. On CUDA, an ``fp32`` extraction (TF32 off) agrees with float32 CPU
arithmetic to about 1e-6 of the largest value, not bitwise (other kernels, another summation order):
:data:`CUDA_FP32` allows 1e-5. A float16 file adds one float16 rounding step (2**-10 of a value: two
float32 values that close may round to neighbouring float16 numbers). ``tf32`` and ``bf16`` files
differ from float32 arithmetic in the 3rd significant digit (:data:`CUDA_REDUCED`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

CUDA_FP32 = 1e-5
CUDA_REDUCED = {"tf32": 1e-2, "bf16": 3e-2}
FLOAT16_STEP = 2.0 ** -10


def _attrs(d: Any) -> Mapping[str, Any]:
    return d.attrs if hasattr(d, "attrs") else d


def feature_tolerance(*datasets: Any) -> float:
    """The tolerance for comparing ``datasets`` (h5py datasets or their attribute mappings, from the
    ``device``, ``precision_effective`` and dtype they record) with each other or with a float32 CPU
    forward pass: 0.0 (bitwise) when none was computed on CUDA."""
    tol = 0.0
    for d in datasets:
        a = _attrs(d)
        if not str(a.get("device", "cpu")).startswith("cuda"):
            continue
        prec = str(a.get("precision_effective", "tf32"))      # unrecorded on CUDA: cuDNN's TF32 default
        t = CUDA_REDUCED.get(prec, CUDA_FP32)
        dtype = str(getattr(d, "dtype", a.get("dtype", "")))
        tol = max(tol, t + (FLOAT16_STEP if dtype == "float16" else 0.0))
    return tol


def assert_features_close(got: Any, want: Any, tol: float, what: str = "", nonfinite_may_spread: bool = False) -> None:
    """``got`` equals ``want`` bitwise (``tol`` 0) or within ``tol`` (see the module doc); NaN equals NaN.

    ``nonfinite_may_spread`` (features computed from inf/NaN inputs, on CUDA only): cuDNN may pick
    Winograd or FFT kernels, which spread an inf over a tile of outputs, so the NaN/inf positions
    are kernel-dependent there: only the values finite in both are compared, and both must hold
    non-finite values or neither."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if tol == 0.0:
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), f"{what}: not bitwise equal"
        return
    g, w = got.astype(np.float64), want.astype(np.float64)
    if nonfinite_may_spread:
        assert np.isfinite(g).all() == np.isfinite(w).all(), f"{what}: non-finite values in one only"
    else:
        for name, mask in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
            assert np.array_equal(mask(g), mask(w)), f"{what}: the {name} positions differ"
    fin = np.isfinite(w) & np.isfinite(g)
    if not fin.any():
        return
    scale = float(np.abs(w[fin]).max())
    diff = float(np.abs(g[fin] - w[fin]).max())
    assert diff <= tol * scale, f"{what}: max |diff| {diff:.3g} > {tol:g} x max |reference| {scale:.3g}"


def values_close(a: float, b: float, tol: float) -> bool:
    """Two scalars (a recorded max_abs, say) equal, or within ``tol`` relative to ``b`` when ``tol`` > 0."""
    return a == b if tol == 0.0 else abs(a - b) <= tol * abs(b)
