"""The device-aware comparison the feature tests use: bitwise for CPU extractions, a stated tolerance for
CUDA ones, non-finite positions always exact."""
from __future__ import annotations

import numpy as np
import pytest

from tests.tolerance import CUDA_FP32, FLOAT16_STEP, assert_features_close, feature_tolerance, values_close


def test_the_tolerance_follows_device_precision_and_storage():
    cpu = {"device": "cpu", "precision_effective": "fp32"}
    cuda = {"device": "cuda:0", "precision_effective": "fp32"}
    assert feature_tolerance(cpu) == 0.0 and feature_tolerance() == 0.0
    assert feature_tolerance(cuda) == CUDA_FP32 == feature_tolerance(cpu, cuda)
    assert feature_tolerance({**cuda, "dtype": "float16"}) == CUDA_FP32 + FLOAT16_STEP
    assert feature_tolerance({**cuda, "precision_effective": "bf16"}) == 3e-2
    assert feature_tolerance({"device": "cuda:0"}) == 1e-2          # unrecorded on CUDA: cuDNN's TF32 default


def test_bitwise_and_tolerant_comparisons_fail_where_they_should():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 4, 5)).astype(np.float32)
    assert_features_close(a, a.copy(), 0.0)
    b = np.nextafter(a, np.float32(np.inf))                           # one float32 ulp away
    with pytest.raises(AssertionError, match="not bitwise"):
        assert_features_close(b, a, 0.0)
    scale = float(np.abs(a).max())
    assert_features_close(a + np.float32(0.5e-5 * scale), a, CUDA_FP32)
    with pytest.raises(AssertionError, match=r"max \|diff\| .* > 1e-05 x"):
        assert_features_close(a + np.float32(2e-5 * scale), a, CUDA_FP32)
    c, d = a.copy(), a.copy()
    c[0, 0, 0], d[0, 0, 1] = np.nan, np.nan
    assert_features_close(c, c.copy(), 0.0)                           # NaN equals NaN
    with pytest.raises(AssertionError, match="NaN positions"):
        assert_features_close(c, d, CUDA_FP32)
    assert_features_close(c, d, CUDA_FP32, nonfinite_may_spread=True)   # CUDA kernels may move an inf/NaN
    with pytest.raises(AssertionError, match="non-finite values in one only"):
        assert_features_close(c, a, CUDA_FP32, nonfinite_may_spread=True)
    assert values_close(1.0, 1.0, 0.0) and not values_close(1.0 + 1e-7, 1.0, 0.0)
    assert values_close(1.0 + 1e-6, 1.0, CUDA_FP32) and not values_close(1.0 + 1e-4, 1.0, CUDA_FP32)
