"""Resizing the source of a cross-layer Trans-Net (transnet/spatial.py), against references computed
independently here: numpy block means and explicit adaptive windows for ``pool``, the closed form of
bilinear interpolation on a planted linear ramp for ``interpolate``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import UserError
from transnet.spatial import resize_maps, spatial_plan


def _maps(n=2, c=3, h=8, w=6, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, c, h, w))


def test_pool_of_a_divisible_size_is_the_numpy_block_mean():
    x = _maps(h=8, w=6)
    want = x.reshape(2, 3, 4, 2, 3, 2).mean(axis=(3, 5))          # 2x2 blocks -> (2, 3, 4, 3)
    got = resize_maps(torch.from_numpy(x), (4, 3), "pool").numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_pool_of_an_indivisible_size_averages_overlapping_windows():
    x = _maps(h=5, w=7)
    want = np.empty((2, 3, 2, 3))
    for i in range(2):                      # cell i covers rows floor(i*5/2) .. ceil((i+1)*5/2) - 1
        r0, r1 = (i * 5) // 2, -(-((i + 1) * 5) // 2)
        for j in range(3):
            c0, c1 = (j * 7) // 3, -(-((j + 1) * 7) // 3)
            want[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    got = resize_maps(torch.from_numpy(x), (2, 3), "pool").numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _ramp_reference(h: int, w: int, oh: int, ow: int, a0=3.0, ah=2.0, aw=-0.5) -> tuple[np.ndarray, np.ndarray]:
    """A linear ramp x[i, j] = a0 + ah*i + aw*j and its bilinear resampling in closed form: output cell o
    sits at source coordinate (o + 0.5) * H/h - 0.5 (half-pixel centres), clamped to [0, H - 1]; a
    linear function is interpolated exactly between its samples."""
    i, j = np.arange(h)[:, None], np.arange(w)[None, :]
    x = a0 + ah * i + aw * j
    si = np.clip((np.arange(oh) + 0.5) * h / oh - 0.5, 0, h - 1)[:, None]
    sj = np.clip((np.arange(ow) + 0.5) * w / ow - 0.5, 0, w - 1)[None, :]
    return x, a0 + ah * si + aw * sj


@pytest.mark.parametrize("h, w, oh, ow", [(4, 4, 8, 8), (4, 6, 7, 5), (8, 8, 4, 4), (3, 5, 6, 2)])
def test_interpolate_follows_the_closed_form_on_a_planted_ramp(h, w, oh, ow):
    x, want = _ramp_reference(h, w, oh, ow)
    got = resize_maps(torch.from_numpy(x)[None, None].repeat(2, 3, 1, 1), (oh, ow), "interpolate").numpy()
    assert got.shape == (2, 3, oh, ow)
    np.testing.assert_allclose(got[1, 2], want, rtol=0, atol=1e-5)


def test_resizing_keeps_the_storage_dtype_and_leaves_equal_sizes_alone():
    x = torch.from_numpy(_maps(h=4, w=4)).half()
    assert resize_maps(x, (2, 2), "pool").dtype == torch.float16
    assert resize_maps(x, (4, 4), "interpolate") is x
    x64 = torch.from_numpy(_maps(h=4, w=4)) * 1e-9 + 1.0            # float32 would round the 1e-9 away
    got = resize_maps(x64, (2, 2), "pool")
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy() - 1.0, x64.numpy().reshape(2, 3, 2, 2, 2, 2).mean((3, 5)) - 1.0,
                               rtol=0, atol=1e-14)


def test_spatial_plan_records_the_convention_and_refuses_what_it_cannot_do():
    assert spatial_plan((4, 4), (4, 4), "") is None and spatial_plan((4, 4), (4, 4), "pool") is None
    rec = spatial_plan((8, 8), (4, 4), "pool")
    assert rec["spatial"] == "pool" and rec["source_size"] == [8, 8] and rec["target_size"] == [4, 4]
    assert "source" in rec["spatial_rule"] and "target" in rec["spatial_rule"]
    assert spatial_plan((4, 4), (8, 8), "interpolate")["spatial"] == "interpolate"
    with pytest.raises(UserError, match=r"source maps 8x8, target maps 4x4.*--spatial pool\|interpolate"):
        spatial_plan((8, 8), (4, 4), "")
    with pytest.raises(UserError, match="pool only shrinks.*interpolate"):
        spatial_plan((4, 4), (8, 8), "pool")
    with pytest.raises(UserError, match="unknown --spatial 'nearest'.*pool, interpolate"):
        spatial_plan((8, 8), (4, 4), "nearest")
