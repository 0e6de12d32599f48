"""The kc-features v1 contract against a committed golden file (``tests/data/kc_features_v1.h5``,
written with plain h5py by ``tests/data/make_golden.py``): its layout, attributes and values read
through ``features/store.py``, what the store writes matches it, the schema check dispatches on the
version, and progress and reserved names have one owner."""
from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from analysis.cka import linear_cka_similarity
from common.errors import UserError
from features import store
from features.nets import check_net_name
from tests.data import make_golden

GOLDEN = Path(__file__).resolve().parent.parent / "data" / "kc_features_v1.h5"
LAYER = "features.3"


def _copy(tmp_path: Path) -> Path:
    return Path(shutil.copy(GOLDEN, tmp_path / "copy.h5"))


# --------------------------------------------------------------------------- the golden file

def test_golden_file_holds_the_pinned_layout_and_attributes():
    with store.open_features(GOLDEN) as f:
        assert store.attrs_dict(f) == {
            "schema": "kc-features", "schema_version": 1, "dataset": "golden", "transform": {"name": "plain", "size": 8},
            "image_size": 8, "created_utc": "2026-01-01T00:00:00+00:00", "code_version": "golden",
            "command": "python tests/data/make_golden.py"}
        assert store.list_splits(f) == ["test"] and store.list_nets(f, "test") == ["a", "b"]
        assert store.list_layers(f, "test", "a") == [LAYER] == store.list_layers(f, "test", "b")   # logits is no layer
        assert store.read_index(f, "test").tolist() == [3 * i + 1 for i in range(12)]
        assert store.read_labels(f, "test").tolist() == [i % 5 for i in range(12)]
        a, b = store.get_features(f, "test", "a", LAYER), store.get_features(f, "test", "b", LAYER)
        logits = store.get_logits(f, "test", "a")
        assert (a.shape, a.dtype, a.chunks) == ((12, 3, 4, 4), np.float32, (1, 3, 4, 4))
        assert (b.shape, b.dtype, b.chunks) == ((12, 4, 4, 4), np.float16, (1, 4, 4, 4))
        assert (logits.shape, logits.dtype) == ((12, 5), np.float32)
        prov = store.provenance_of(a)
        assert {k: prov[k] for k in ("checkpoint", "checkpoint_sha256", "arch", "layer", "conv_layer", "point",
                                     "nonfinite", "source")} == {
            "checkpoint": "runs/a/last.pt", "checkpoint_sha256": "a" * 64, "arch": "vgg_tiny", "layer": LAYER,
            "conv_layer": 3, "point": "output", "nonfinite": 0, "source": "extract"}
        assert prov["root"]["dataset"] == "golden" and prov["dataset"] == "/test/a/features.3"
        assert store.dataset_progress(a) == store.Progress(True, 12, 12)
        assert float(b.attrs["max_abs"]) == 2.154296875 == float(np.abs(b[...].astype(np.float64)).max())


def test_golden_values_are_the_closed_forms_and_their_pinned_sums():
    with store.open_features(GOLDEN) as f:
        a = store.read_rows(store.get_features(f, "test", "a", LAYER), 0, 12, np.float64)
        b = store.read_rows(store.get_features(f, "test", "b", LAYER), 0, 12, np.float64)
        logits = store.get_logits(f, "test", "a")[...].astype(np.float64)
    assert np.array_equal(a, make_golden.features_a().astype(np.float32))
    assert np.array_equal(b, make_golden.features_b().astype(np.float16))
    assert np.array_equal(logits, make_golden.logits_a().astype(np.float32))
    assert a[0, 0, 0, 0] == np.float32(np.sin(0.1)) and a[11, 2, 3, 1] == np.float32(np.sin(5.5 + 2.2 + 0.9 - 0.2 + 0.1))
    assert a.sum() == pytest.approx(-13.119867574423552, abs=1e-9)
    assert b.sum() == pytest.approx(-19.558427810668945, abs=1e-9)
    assert logits.sum() == pytest.approx(-0.6622844217345119, abs=1e-9)


def test_linear_cka_between_the_golden_nets_is_pinned():
    """Linear CKA (biased HSIC, per-sample flattened features, centred) read straight from the file
    equals the pinned value and the closed form ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    with store.open_features(GOLDEN) as f:
        cka = linear_cka_similarity(store.get_features(f, "test", "a", LAYER), store.get_features(f, "test", "b", LAYER))
        x = f["test/a/features.3"][...].astype(np.float64).reshape(12, -1)
        y = f["test/b/features.3"][...].astype(np.float64).reshape(12, -1)
    x, y = x - x.mean(0), y - y.mean(0)
    closed = np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    assert cka == pytest.approx(0.9876274920619079, abs=1e-9) and cka == pytest.approx(closed, abs=1e-12)


def test_the_store_writes_the_golden_layout(tmp_path):
    """Root attributes, per-split datasets, chunking and progress attributes written by the store are
    those of the golden file (values of time and code version aside)."""
    out = tmp_path / "written.h5"
    with store.open_features(out, "w") as f:
        store.init_root(f, "golden", {"name": "plain", "size": 8}, 8, "python tests/data/make_golden.py")
        store.init_split(f, "test", np.arange(12) * 3 + 1, np.arange(12) % 5)
        ds = store.create_features(f, "test", "a", LAYER, (12, 3, 4, 4), "float32", {"arch": "vgg_tiny"})
        ds[...] = make_golden.features_a()
        store.mark_complete(ds)
    with h5py.File(out, "r") as w, h5py.File(GOLDEN, "r") as g:
        assert set(w.attrs) == set(g.attrs)
        assert {k: w.attrs[k] for k in ("schema", "schema_version", "image_size")} == \
               {k: g.attrs[k] for k in ("schema", "schema_version", "image_size")}
        for key in ("test/index", "test/label", "test/a/features.3"):
            assert (w[key].shape, w[key].dtype) == (g[key].shape, g[key].dtype), key
            assert np.array_equal(w[key][...], g[key][...]), key
        assert w["test/a/features.3"].chunks == g["test/a/features.3"].chunks
        assert {k: w["test/a/features.3"].attrs[k] for k in store.PROGRESS_ATTRS} == \
               {k: g["test/a/features.3"].attrs[k] for k in store.PROGRESS_ATTRS}


# --------------------------------------------------------------------------- schema versions

@pytest.mark.parametrize("version", [2, 0, "v1"])
def test_an_unknown_schema_version_is_refused_naming_the_known_ones(tmp_path, version):
    path = _copy(tmp_path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = version
    with pytest.raises(store.FeatureFileError, match=rf"kc-features version {version}; this workbench reads version 1 only"):
        store.open_features(path)


def test_the_schema_check_dispatches_on_the_version(tmp_path, monkeypatch):
    """A version is read by its entry in READERS: an added reader makes a v2 file readable."""
    path = _copy(tmp_path)
    with h5py.File(path, "a") as f:
        f.attrs["schema_version"] = 2
    seen = []
    monkeypatch.setitem(store.READERS, 2, lambda f, where: seen.append(where))
    with store.open_features(path) as f:
        assert store.list_nets(f, "test") == ["a", "b"]
    assert seen == [str(path)]


def test_a_v1_split_without_labels_fails_on_opening(tmp_path):
    path = _copy(tmp_path)
    with h5py.File(path, "a") as f:
        del f["test/label"]
    with pytest.raises(store.FeatureFileError, match=r"split 'test' has no label dataset"):
        store.open_features(path)
    with store.open_features(path, "a"):      # a file being written is checked by its root only
        pass


# --------------------------------------------------------------------------- progress and reserved names

def test_progress_is_read_through_the_store(tmp_path):
    path = _copy(tmp_path)
    with h5py.File(path, "a") as f:
        f["test/b/features.3"].attrs["complete"] = False
        f["test/b/features.3"].attrs["rows_done"] = 5
        for k in store.PROGRESS_ATTRS:           # a foreign writer that recorded no progress at all
            del f["test/a/logits"].attrs[k]
    with store.open_features(path) as f:
        b = f["test/b/features.3"]
        assert store.dataset_progress(b) == store.Progress(False, 5, 12) and str(store.dataset_progress(b)) == \
            "incomplete, 5 of 12 rows"
        assert store.dataset_progress(f["test/a/logits"]) == store.Progress(False, 0, 12)
        with pytest.raises(store.FeatureFileError, match=r"is incomplete \(5 of 12 rows\)"):
            store.get_features(f, "test", "b", LAYER)


@pytest.mark.parametrize("name", store.SPLIT_KEYS)
def test_a_net_may_not_take_a_per_split_dataset_name(name):
    with pytest.raises(UserError, match="not usable as an HDF5 group"):
        check_net_name(name)
