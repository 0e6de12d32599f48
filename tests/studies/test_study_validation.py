"""A study file is checked whole before anything runs: every problem of it is reported at once
(data set, architecture, layers resolved on the architecture, dtypes, ranges, pair plans and member
names, Trans-Net settings, unknown keys), and a valid file passes untouched."""
from __future__ import annotations

import copy

import pytest

from common.errors import UserError
from studies.runner import run_study
from studies.spec import load_study
from tests.studies.test_study import study_dict, write_study


def _set(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    *head, last = path.split(".")
    node = d
    for k in head:
        node = node[k]
    node[last] = value
    return d


INVALID = [
    ("data.dataset", "mnist-9", "'mnist-9' is not a registered data set"),
    ("data.transform", "fancy", "data.transform 'fancy' is not one of"),
    ("data.image_size", 0, "data.image_size: expects an integer >= 1, got 0"),
    ("data.channels", 2, "data.channels: expects one of 1, 3, got 2"),
    ("data.colour", "red", "data: unknown key(s) 'colour'"),
    ("train.epochs", -1, "train.epochs: expects an integer >= 1, got -1"),
    ("train.lr", float("nan"), "train.lr: expects a finite number > 0, got nan"),
    ("train.optimizer", "lion", "train.optimizer 'lion' is not one of sgd, adam, adamw"),
    ("train.eval_every", 0, "train.eval_every: expects an integer >= 1, got 0"),
    ("members.seeds.arch", "vgg_tinny", "'vgg_tinny' is not a registered architecture"),
    ("members.seeds.seeds", [0, 0], "must list distinct seeds"),
    ("members.seeds.colour", 1, "members.seeds: unknown key(s) 'colour'"),
    ("members.distill.teacher", "seed9", "members.distill.teacher 'seed9' is not a member trained before"),
    ("members.distill.alpha", 1.5, "members.distill.alpha expects a finite number in [0, 1], got 1.5"),
    ("members.distill.name", "a/b", "member name 'a/b' must not contain '/'"),
    ("members.born_again.generations", 0, "members.born_again.generations expects an integer >= 1, got 0"),
    ("members.evolve.split_rate", 1.0, "members.evolve.split_rate expects a finite number in (0, 1), got 1.0"),
    ("members.evolve.split", "kernel", "members.evolve.split 'kernel' is not one of kels, wels"),
    ("extract.layers", ["features.99"], "unknown layer 'features.99'"),
    ("extract.dtype", "int8", "extract.dtype 'int8' is not one of float16, float32"),
    ("extract.data_on", "gpu", "extract.data_on 'gpu' is not one of auto, loader, device"),
    ("extract.splits", ["train", "dev"], "extract.splits must list distinct splits"),
    ("transnet.kernel", 4, "transnet.kernel: expects an odd integer >= 1, got 4"),
    ("transnet.epochs", -1, "--epochs must be >= 1, got -1"),
    ("transnet.input_norm", "batch", "unknown --input_norm 'batch'"),
    ("transnet.learning_rate", 0.1, "transnet: unknown key(s) 'learning_rate'"),
    ("transnet.source", "seed0", "source are set by the study itself"),
    ("pairs", [{"nets": ["seed0", "seed7"], "plan": "all"}], "unknown member(s) 'seed7'"),
    ("pairs", [{"family": "clones", "plan": "all"}], "pairs[0].family 'clones' is not a family of this study"),
    ("pairs", [{"family": "seeds", "plan": "ring"}], "unknown pair plan 'ring'"),
    ("pairs", ["seed0>nobody"], "unknown net 'nobody'"),
    ("baselines.permutations", -5, "baselines.permutations expects an integer >= 0, got -5"),
    ("baselines.split", "val", "baselines.split 'val' is not an extracted split"),
    ("diagnose", ["seed0", "ke_g1"], "needs both seed0>ke_g1 and ke_g1>seed0"),
    ("diagnose", ["seed0", "ghost"], "diagnose names unknown member(s) 'ghost'"),
    ("report", "yes", "report must be true or false"),
]


@pytest.mark.parametrize("path, value, needle", INVALID, ids=[f"{p}={v!r}" for p, v, _ in INVALID])
def test_an_invalid_study_file_is_refused_before_anything_runs(tmp_path, path, value, needle):
    d = study_dict(tmp_path / "img")
    if path in ("diagnose", "pairs", "report"):
        d[path] = value
    else:
        d = _set(d, path, value)
    sf = write_study(tmp_path / "bad.yaml", d)
    with pytest.raises(UserError) as e:
        run_study(sf, tmp_path / "out", dry_run=True, log=lambda m: None)
    msg = " ".join(str(e.value).split())
    assert needle in msg and "nothing was run" in msg, msg
    assert not (tmp_path / "out").exists()


def test_dry_run_reports_every_problem_of_the_file_at_once(cli, tmp_path):
    d = study_dict(tmp_path / "img")
    for path, value in (("data.dataset", "mnist-9"), ("extract.layers", ["features.99"]), ("extract.dtype", "int8"),
                        ("train.epochs", -1), ("transnet.kernel", 4), ("members.distill.teacher", "seed9")):
        d = _set(d, path, value)
    d["pairs"] = [{"nets": ["seed0", "seed7"], "plan": "all"}]
    d["colour"] = "red"
    sf = write_study(tmp_path / "bad.yaml", d)
    code, out, err = cli("study", sf, "--out_dir", tmp_path / "out", "--dry-run")
    assert code == 1 and "Traceback" not in err
    text = " ".join(err.split())
    assert "has 8 problem(s)" in text, text
    for needle in ("'mnist-9'", "features.99", "int8", "train.epochs", "transnet.kernel", "seed9", "seed7", "'colour'"):
        assert needle in text, needle


def test_a_valid_study_with_trans_net_epochs_auto_names_no_problem(tmp_path):
    from studies.spec import TOP_KEYS, ExtractSpec
    from studies.validate import study_problems

    d = study_dict(tmp_path / "img")
    d["transnet"]["epochs"] = "auto"
    assert study_problems(d, TOP_KEYS, ExtractSpec) == []
    study = load_study(write_study(tmp_path / "ok.yaml", study_dict(tmp_path / "img")))
    assert [m for m in study.members] == ["seeds", "distill", "born_again", "evolve"]
