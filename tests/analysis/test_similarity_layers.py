"""Layer x layer similarity: every layer of one net against every layer of another (or of itself),
each cell equal to the one-pair metric, the ``layers`` schema of similarity.json and its heatmap."""
from __future__ import annotations

import json

import numpy as np
import pytest

from analysis import similarity as S
from analysis.similarity_layers import layer_matrix
from analysis.similarity_run import SimilarityConfig
from common.errors import UserError
from features.store import create_features, init_root, init_split, mark_complete, open_features

LAYERS = ("l1", "l2", "l3")


@pytest.fixture
def two_nets(tmp_path):
    """A's three layers of different widths and sizes; B: l1 a rotation of A's l1, l2 twice A's l2,
    l3 independent."""
    rng = np.random.default_rng(30)
    n = 40
    a = {"l1": rng.normal(size=(n, 3, 4, 4)), "l2": rng.normal(size=(n, 5, 2, 2)), "l3": rng.normal(size=(n, 6, 1, 1))}
    q, _ = np.linalg.qr(rng.normal(size=(48, 48)))
    b = {"l1": (a["l1"].reshape(n, -1) @ q).reshape(n, 3, 4, 4), "l2": 2 * a["l2"], "l3": rng.normal(size=(n, 6, 1, 1))}
    path = tmp_path / "f.h5"
    with open_features(path, "w") as f:
        init_root(f, "toy", {"name": "plain"}, 4, "pytest")
        init_split(f, "test", np.arange(n), np.arange(n) % 3)
        for net, layers in (("A", a), ("B", b)):
            for layer, x in layers.items():
                ds = create_features(f, "test", net, layer, x.shape, "float32", {"arch": "toy"})
                ds[...] = x.astype(np.float32)
                mark_complete(ds)
    return path, {k: v.astype(np.float32) for k, v in a.items()}, {k: v.astype(np.float32) for k, v in b.items()}


def test_every_cell_is_the_metric_of_that_pair_of_layers(two_nets):
    path, a, b = two_nets
    cfg = SimilarityConfig(layers=",".join(LAYERS), nets="A,B", metric="cka,svcca", permutations=4)
    body = layer_matrix(path, cfg)
    lay = body["layers"]
    assert "layer" not in body and "metrics" not in body and body["nets"] == ["A", "B"]
    assert lay["row_net"] == "A" and lay["column_net"] == "B" and lay["names"] == list(LAYERS)
    cka = np.array(lay["metrics"]["cka"]["matrix"], dtype=float)
    for i, li in enumerate(LAYERS):
        for j, lj in enumerate(LAYERS):
            assert cka[i, j] == pytest.approx(S.get_metric("cka")(a[li], b[lj]), rel=1e-6)
    assert cka[0, 0] == pytest.approx(1.0, abs=1e-5) and cka[1, 1] == pytest.approx(1.0, abs=1e-5)
    assert np.array(lay["metrics"]["cka"]["p_values"]).shape == (3, 3)
    sv = lay["metrics"]["svcca"]
    assert sv["matrix"][2][0] == pytest.approx(S.get_metric("svcca")(a["l3"], b["l1"], features="pooled"), rel=1e-6)
    assert set(body["dims"]) == {f"{n}/{layer}" for n in "AB" for layer in LAYERS}


def test_one_net_against_itself_is_symmetric_with_ones_on_the_diagonal(two_nets):
    path, a, _ = two_nets
    body = layer_matrix(path, SimilarityConfig(layers="l1,l2,l3", nets="A", metric="cka", permutations=0))
    m = np.array(body["layers"]["metrics"]["cka"]["matrix"], dtype=float)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    np.testing.assert_allclose(m, m.T, atol=1e-12)
    assert m[0, 1] == pytest.approx(S.get_metric("cka")(a["l1"], a["l2"]), rel=1e-6)
    with pytest.raises(UserError, match="one net"):
        layer_matrix(path, SimilarityConfig(layers="l1,l2", nets="", metric="cka"))


def test_the_command_writes_the_layers_matrix_and_its_heatmap(cli, two_nets, tmp_path):
    path, _, _ = two_nets
    out = tmp_path / "o"
    code, stdout, err = cli("similarity", "--features", path, "--layers", "l1,l2,l3", "--nets", "A,B",
                            "--metric", "cka,pwcca", "--permutations", "0", "--cca_features", "flat", "--out_dir", out)
    assert code == 0, err
    body = json.loads((out / "similarity.json").read_text())
    pw = body["layers"]["metrics"]["pwcca"]
    assert pw["matrix"][0][0] is None and pw["refused"]               # 40 images, 48 + 48 flat dims: refused
    assert pw["matrix"][2][2] is not None                              # 6 + 6 dims: computed
    assert (out / "layers_cka.png").stat().st_size > 0 and "layers_cka.png" in body["layers"]["metrics"]["cka"]["figure"]
    assert "A (rows) x B (columns)" in stdout and "blank: refused" in stdout
    assert np.load(out / "cca_correlations.npz")["pwcca/A/l3/B/l3"].shape == (6,)
