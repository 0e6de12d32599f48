"""A study's layer x layer section (``baselines.layer_matrix``) and ``pair_layers``: checked before
anything runs, run as cached stages into ``STUDY/layer_matrix/<A>__<B>/``, drawn in the report.

One tiny study (two seeds of vgg_tiny on 3 classes of generated 16 px images, 2 epochs, two conv
layers extracted, pairs at the last one only, a layer matrix over all three convs, extracted into its
own file) is run once per module."""
from __future__ import annotations

import re
import shutil

import h5py
import numpy as np
import pytest
import yaml

from analysis import similarity as S
from common.errors import UserError
from common.files import read_json
from studies.runner import run_study
from studies.spec import LayerMatrixSpec, load_study
from tests.fakedata import make_imagefolder
from tests.studies.test_study import study_dict, write_study

LAYERS = ["features.0", "features.4", "features.8"]
EXTRACTED = ["features.4", "features.8"]


def layer_study(data_root, **over) -> dict:
    d = study_dict(data_root, diagnose=None)
    d["members"] = {"seeds": d["members"]["seeds"]}
    d["pairs"] = [{"family": "seeds", "plan": "all"}]
    d["extract"]["layers"] = list(EXTRACTED)
    d["pair_layers"] = ["features.8"]
    d["baselines"] = {"metrics": ["cka"], "permutations": 3,
                      "layer_matrix": {"layers": list(LAYERS), "nets": [["seed0", "seed1"], ["seed0"]],
                                       "metrics": ["cka"]}}
    d.update(over)
    return d


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagefolder(tmp_path_factory.mktemp("img"), n_classes=3, per_class=6, size=(20, 20))


@pytest.fixture(scope="module")
def layer_run(tmp_path_factory, data_root):
    base = tmp_path_factory.mktemp("layers")
    sf = write_study(base / "layers.yaml", layer_study(data_root))
    return sf, base / "out", run_study(sf, base / "out", log=lambda m: None)


# --------------------------------------------------------------------------- the study file

def _with(d: dict, section: str, key: str, value) -> dict:
    if section == "layer_matrix":
        d["baselines"]["layer_matrix"][key] = value
    elif section == "baselines":
        d["baselines"][key] = value
    else:
        d[key] = value
    return d


BAD = [
    ("layer_matrix", "layers", ["features.0", "features.0"], "baselines.layer_matrix.layers must list two or more "
                                                             "distinct layers"),
    ("layer_matrix", "layers", ["features.8"], "baselines.layer_matrix.layers must list two or more distinct"),
    ("layer_matrix", "nets", [["seed0", "seed9"]],
     "baselines.layer_matrix.nets[0] names unknown member(s) 'seed9'; members: seed0, seed1"),
    ("layer_matrix", "nets", ["seed0", ["seed0", "seed1", "seed1"]],
     "baselines.layer_matrix.nets[1] must be one member name or a list of one or two"),
    ("layer_matrix", "nets", [["seed0"], ["seed1", "seed0"], ["seed0", "seed0"]],
     "baselines.layer_matrix.nets[2] ['seed0', 'seed0'] repeats an earlier entry"),
    ("layer_matrix", "nets", [], "baselines.layer_matrix.nets must list entries of one member"),
    ("layer_matrix", "colour", "red",
     "baselines.layer_matrix: unknown key(s) 'colour'; valid: layers, nets, metrics, split, permutations"),
    ("layer_matrix", "metrics", ["cka", "cosine"],
     "baselines.layer_matrix.metrics: unknown similarity metric 'cosine' Valid similarity metric names: cka,"),
    ("layer_matrix", "split", "val", "baselines.layer_matrix.split 'val' is not an extracted split"),
    ("layer_matrix", "permutations", -1, "baselines.layer_matrix.permutations expects an integer >= 0, got -1"),
    ("baselines", "layer_matrices", {}, "baselines: unknown key(s) 'layer_matrices'; valid: metrics, split, "
                                        "permutations, layer_matrix"),
    ("top", "pair_layers", ["features.2"],
     "pair_layers 'features.2' is not an extracted layer; extracted: features.4, features.8"),
]


@pytest.mark.parametrize("section, key, value, needle", BAD, ids=[f"{s}.{k}={v!r}" for s, k, v, _ in BAD])
def test_a_bad_layer_matrix_or_pair_layers_is_refused_naming_the_value_and_the_choices(tmp_path, section, key,
                                                                                      value, needle):
    sf = write_study(tmp_path / "bad.yaml", _with(layer_study(tmp_path / "img"), section, key, value))
    with pytest.raises(UserError) as e:
        run_study(sf, tmp_path / "out", dry_run=True, log=lambda m: None)
    msg = " ".join(str(e.value).split())
    assert needle in msg and "nothing was run" in msg, msg
    assert not (tmp_path / "out").exists()


def test_the_section_is_read_with_its_defaults_and_pairs_stay_at_their_layer(tmp_path):
    d = layer_study(tmp_path / "img")
    d["baselines"]["layer_matrix"] = {"layers": ["features.4", "features.8"], "nets": ["seed1", ["seed0", "seed1"]]}
    study = load_study(write_study(tmp_path / "ok.yaml", d))
    assert study.layer_matrix == LayerMatrixSpec(layers=("features.4", "features.8"),
                                                 nets=(("seed1",), ("seed0", "seed1")), metrics=("cka",),
                                                 split="test", permutations=0)
    assert study.pair_layers == ("features.8",)
    plan = [n for n, _ in run_study(tmp_path / "ok.yaml", tmp_path / "out", dry_run=True, log=lambda m: None)["plan"]]
    assert plan == ["train/seeds", "extract", "consistency/features.8", "similarity/features.8",
                    "layer_matrix/extract", "layer_matrix/seed1__seed1", "layer_matrix/seed0__seed1", "report"]
    del d["pair_layers"], d["baselines"]["layer_matrix"]              # without them: pairs at every extracted layer
    study = load_study(write_study(tmp_path / "old.yaml", d))
    assert study.pair_layers == tuple(EXTRACTED) and study.layer_matrix is None
    plan = [n for n, _ in run_study(tmp_path / "old.yaml", tmp_path / "out", dry_run=True, log=lambda m: None)["plan"]]
    assert [n for n in plan if n.startswith("consistency/")] == [f"consistency/{x}" for x in EXTRACTED]
    assert not any(n.startswith("layer_matrix/") for n in plan)


# --------------------------------------------------------------------------- a run

@pytest.mark.slow
def test_the_study_writes_the_layer_matrices_and_only_the_pair_layer_fits(layer_run):
    _, out, res = layer_run
    assert [s["stage"] for s in res["stages"]] == ["train/seeds", "extract", "consistency/features.8",
                                                   "similarity/features.8", "layer_matrix/extract",
                                                   "layer_matrix/seed0__seed1", "layer_matrix/seed0__seed0", "report"]
    assert sorted(p.name for p in (out / "consistency").iterdir()) == ["features.8"]
    cross = read_json(out / "layer_matrix/seed0__seed1/similarity.json")
    own = read_json(out / "layer_matrix/seed0__seed0/similarity.json")
    assert cross["split"] == "test" and cross["nets"] == ["seed0", "seed1"] and own["nets"] == ["seed0"]
    assert cross["layers"]["names"] == LAYERS and cross["layers"]["column_net"] == "seed1"
    with h5py.File(out / "features.h5") as f:                  # the study's file: the extracted layers only
        assert sorted(f["train"]["seed0"]) == [*EXTRACTED, "logits"]
    with h5py.File(out / "layer_matrix" / "features.h5") as f:  # the matrices' own: their nets, split, layers
        assert sorted(k for k in f if isinstance(f[k], h5py.Group)) == ["test"]
        assert sorted(k for k in f["test"] if isinstance(f["test"][k], h5py.Group)) == ["seed0", "seed1"]
        assert sorted(f["test"]["seed0"]) == LAYERS
        x = {(n, layer): f["test"][n][layer][:] for n in ("seed0", "seed1") for layer in LAYERS}
    m = np.array(cross["layers"]["metrics"]["cka"]["matrix"], dtype=float)
    for i, li in enumerate(LAYERS):                         # rows: seed0's layers, columns: seed1's
        for j, lj in enumerate(LAYERS):
            assert m[i, j] == pytest.approx(S.get_metric("cka")(x["seed0", li], x["seed1", lj]), rel=1e-5)
    m = np.array(own["layers"]["metrics"]["cka"]["matrix"], dtype=float)
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-6)
    assert m[0, 2] == pytest.approx(S.get_metric("cka")(x["seed0", "features.0"], x["seed0", "features.8"]), rel=1e-5)
    assert (out / "layer_matrix/seed0__seed1/layers_cka.png").is_file()
    assert read_json(out / "study.json")["layer_matrix"]["nets"] == [["seed0", "seed1"], ["seed0"]]


@pytest.mark.slow
@pytest.mark.browser
def test_the_report_shows_each_layer_heatmap_with_its_caption_and_loads_in_a_browser(layer_run, tmp_path):
    from tests.browser import check_page

    _, out, _ = layer_run
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert ">Layer x layer similarity</h2>" in html and "## Layer x layer similarity" in md
    for key in ("layers_cka_seed0__seed1", "layers_cka_seed0__seed0"):
        assert (out / "figures" / f"{key}.png").is_file() and f"](figures/{key}.png)" in md
    cap = re.search(r"!\[(cka, layer x layer: seed0's layers \(rows\) against seed1's \(columns\)[^\]]*)\]", md)
    assert cap, md
    body = read_json(out / "layer_matrix/seed0__seed1/similarity.json")
    assert f"on the test split ({body['n_samples']} images)" in cap.group(1)
    assert f"convention: {body['layers']['metrics']['cka']['convention']}" in cap.group(1)
    assert "seed0 against itself" in html
    assert md.index("### seed0 (rows) against seed1 (columns)") < md.index("### seed0 against itself")   # the study file's order
    srcs = re.findall(r'src="(data:image/png;base64,[^"]+)"', html)
    assert len(srcs) == len(re.findall(r"!\[", md))
    check = check_page(out / "report.html", tmp_path / "browser")
    assert check["errors"] == [] and check["console"] == []
    assert check["images"] == len(srcs) and check["decoded"] == check["images"] and min(check["widths"]) > 0


@pytest.mark.slow
def test_the_layer_matrix_is_cached_redone_alone_when_it_changes_and_optional_in_the_report(layer_run, tmp_path):
    from analysis.report import make_report

    sf, out, _ = layer_run
    shutil.copytree(out, tmp_path / "out")
    shutil.copy(sf, tmp_path / "s.yaml")
    sf, out = tmp_path / "s.yaml", tmp_path / "out"
    assert {s["status"] for s in run_study(sf, out, log=lambda m: None)["stages"]} == {"cached"}
    d = yaml.safe_load(sf.read_text())
    d["baselines"]["layer_matrix"]["metrics"] = ["cka", "cka_unbiased"]
    write_study(sf, d)
    res = run_study(sf, out, log=lambda m: None)
    assert {s["stage"] for s in res["stages"] if s["status"] == "ran"} == {
        "layer_matrix/seed0__seed1", "layer_matrix/seed0__seed0", "report"}
    body = read_json(out / "layer_matrix/seed0__seed1/similarity.json")
    assert list(body["layers"]["metrics"]) == ["cka", "cka_unbiased"]
    assert "Layer x layer similarity" in (out / "report.md").read_text()

    shutil.rmtree(out / "layer_matrix")                               # a study without the section
    rep = make_report(out, tmp_path / "rep", bootstrap=0)
    md = rep["markdown"].read_text()
    assert "Layer x layer" not in md and "## Similarity baselines at features.8" in md


@pytest.mark.slow
def test_a_two_process_torchrun_study_runs_its_layer_matrix_on_rank_0_alone(tmp_path, data_root):
    """The layer matrix's own extraction runs on rank 0 inside a one-process stage: it must not join the
    job's ranks (it did, and met the other ranks' stage collectives: a hang until the study's timeout)."""
    import subprocess
    import sys

    from tests.processes import free_port
    from tests.studies.test_study import ROOT, _env

    sf = write_study(tmp_path / "layers.yaml", layer_study(data_root))
    out = tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(free_port()), str(ROOT / "cli.py"), "study", str(sf), "--out_dir", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert read_json(out / "state.json")["processes"] == 2
    cross = read_json(out / "layer_matrix/seed0__seed1/similarity.json")
    with h5py.File(out / "layer_matrix" / "features.h5") as f:
        assert not [k for k in f if "rank" in k]                    # one file, not shards
        x = {(n, layer): f["test"][n][layer][:] for n in ("seed0", "seed1") for layer in LAYERS}
    m = np.array(cross["layers"]["metrics"]["cka"]["matrix"], dtype=float)
    assert m[1, 2] == pytest.approx(S.get_metric("cka")(x["seed0", "features.4"], x["seed1", "features.8"]), rel=1e-5)
