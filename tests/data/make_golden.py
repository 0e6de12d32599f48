"""Write ``tests/data/kc_features_v1.h5``: a small golden ``kc-features`` version 1 file.

    python tests/data/make_golden.py            # rewrites the committed file (only for a new golden)

It is written with plain h5py from the contract in ``design.md``, not through ``features/store.py``,
so that a change of the store's reading or writing shows up as a difference from this file. The
values are closed-form (sines and cosines of the row, channel and position; no random generator),
so the file is the same on every machine; ``tests/features/test_golden.py`` pins them.

    /                          schema, schema_version=1, dataset, transform (JSON), image_size,
                               created_utc, code_version, command
    /test/index, /test/label   (12,) int64: index 3i+1, label i mod 5
    /test/a/features.3         (12, 3, 4, 4) float32  a = sin(0.5 i + 1.1 c + 0.3 h - 0.2 w + 0.1)
    /test/b/features.3         (12, 4, 4, 4) float16  b = M a + 0.25 cos(0.9 i + k + 0.5 h w)
    /test/a/logits             (12, 5) float32        cos(i + 2 k)
"""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

PATH = Path(__file__).resolve().parent / "kc_features_v1.h5"
N, LAYER = 12, "features.3"
MIX = np.array([[1.0, 0.0, -1.0], [0.5, 1.0, 0.0], [0.0, -0.5, 1.0], [1.0, 1.0, 1.0]])   # (C_b, C_a)


def features_a() -> np.ndarray:
    i, c, h, w = np.meshgrid(np.arange(N), np.arange(3), np.arange(4), np.arange(4), indexing="ij")
    return np.sin(0.5 * i + 1.1 * c + 0.3 * h - 0.2 * w + 0.1)                      # (N, 3, 4, 4) float64


def features_b() -> np.ndarray:
    i, k, h, w = np.meshgrid(np.arange(N), np.arange(4), np.arange(4), np.arange(4), indexing="ij")
    return np.einsum("kc,nchw->nkhw", MIX, features_a()) + 0.25 * np.cos(0.9 * i + k + 0.5 * h * w)


def logits_a() -> np.ndarray:
    i, k = np.meshgrid(np.arange(N), np.arange(5), indexing="ij")
    return np.cos(i + 2.0 * k)


def _dataset(g: h5py.Group, name: str, data: np.ndarray, attrs: dict) -> None:
    ds = g.create_dataset(name, data=data, chunks=(1,) + data.shape[1:], track_times=False)
    for k, v in attrs.items():
        ds.attrs[k] = v


def write(path: Path = PATH) -> Path:
    with h5py.File(path, "w", track_order=False) as f:
        f.attrs.update({"schema": "kc-features", "schema_version": 1, "dataset": "golden",
                        "transform": json.dumps({"name": "plain", "size": 8}, sort_keys=True), "image_size": 8,
                        "created_utc": "2026-01-01T00:00:00+00:00", "code_version": "golden",
                        "command": "python tests/data/make_golden.py"})
        g = f.create_group("test")
        g.create_dataset("index", data=np.arange(N, dtype=np.int64) * 3 + 1, track_times=False)
        g.create_dataset("label", data=np.arange(N, dtype=np.int64) % 5, track_times=False)
        for net, data, dtype in (("a", features_a(), "float32"), ("b", features_b(), "float16")):
            stored = data.astype(dtype)
            _dataset(g.create_group(net), LAYER, stored, {
                "checkpoint": f"runs/{net}/last.pt", "checkpoint_sha256": ("a" if net == "a" else "b") * 64,
                "arch": "vgg_tiny", "layer": LAYER, "conv_layer": 3, "point": "output", "complete": True,
                "rows_done": N, "nonfinite": 0, "max_abs": float(np.abs(stored).max()), "source": "extract"})
        _dataset(g["a"], "logits", logits_a().astype("float32"), {
            "checkpoint": "runs/a/last.pt", "checkpoint_sha256": "a" * 64, "arch": "vgg_tiny", "layer": "logits",
            "point": "logits", "complete": True, "rows_done": N})
    return path


if __name__ == "__main__":
    out = write()
    print(f"wrote {out} ({out.stat().st_size} bytes)")
