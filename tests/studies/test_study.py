"""The study runner: a whole study from one file, cached stages, dry-run plans, kill-and-resume.

One tiny real study (3 classes of generated images at 16 px, vgg_tiny, 2 epochs) is run once per
module; tests that change files work on copies of it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from common.errors import UserError
from common.files import read_json
from studies.cache import stage_mode
from studies.runner import run_study
from studies.spec import load_study
from tests.fakedata import make_imagefolder
from tests.processes import flat, free_port

ROOT = Path(__file__).resolve().parents[2]


def study_dict(data_root: Path, **over) -> dict:
    d = {
        "name": "tiny",
        "data": {"dataset": f"imagefolder:{data_root}", "transform": "plain", "image_size": 16},
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.05, "device": "cpu"},
        "members": {
            "seeds": {"arch": "vgg_tiny", "seeds": [0, 1]},
            "distill": {"arch": "vgg_tiny", "teacher": "seed0", "alpha": 0.9, "temperature": 4.0,
                        "name": "kd_student"},
            "born_again": {"arch": "vgg_tiny", "generations": 2, "lambda": 0.5, "temperature": 2.0},
            "evolve": {"arch": "vgg_tiny", "generations": 2, "split": "kels", "split_rate": 0.5},
        },
        "extract": {"layers": ["features.8"], "batch_size": 16, "dtype": "float32", "logits": True,
                    "precision": "tf32"},
        "transnet": {"orders": 2, "epochs": 2, "lr": 0.001, "final_lr": 0.0001, "batch_size": 8, "eval_every": 2,
                     "save_every": 1, "device": "cpu"},
        "pairs": [{"family": "seeds", "plan": "all"}, {"nets": ["seed0", "kd_student"], "plan": "all"},
                  {"family": "born_again", "plan": "chain"}, {"nets": ["ke_g2_slim", "ke_g2"], "plan": "all"}],
        "baselines": {"metrics": ["cka", "svcca"], "permutations": 5},
        "diagnose": ["seed0", "seed1"],
        "report": True,
    }
    d.update(over)
    return d


def write_study(path: Path, d: dict) -> Path:
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("img"), n_classes=3, per_class=6, size=(20, 20))


@pytest.fixture(scope="module")
def done_study(tmp_path_factory, data_root):
    """A finished study: (study file, study folder, the stage list of its first run)."""
    base = tmp_path_factory.mktemp("study")
    sf = write_study(base / "tiny.yaml", study_dict(data_root))
    res = run_study(sf, base / "out", log=lambda m: None)
    return sf, base / "out", res


def copy_study(done_study, tmp_path) -> tuple[Path, Path]:
    sf, out, _ = done_study
    shutil.copytree(out, tmp_path / "out")
    shutil.copy(sf, tmp_path / "tiny.yaml")
    return tmp_path / "tiny.yaml", tmp_path / "out"


# --------------------------------------------------------------------------- the study file

@pytest.mark.parametrize("change, needle", [
    ({"colour": "red"}, "unknown key(s) 'colour'"),
    ({"members": {"clones": {"arch": "vgg_tiny"}}}, "valid: seeds, distill, born_again, evolve"),
    ({"extract": {"layers": []}}, "list-layers"),
    ({"baselines": ["cka", "cosine"]}, "cosine"),
    ({"diagnose": ["seed0"]}, "diagnose must be a pair"),
    ({"pairs": []}, "pairs is empty"),
    ({"train": {"epochs": 2, "learning_rate": 0.1}}, "learning_rate"),
    ({"extract": {"layers": ["features.8"], "precision": "fp16"}}, "extract.precision 'fp16' is not one of fp32, "
                                                                   "tf32, bf16"),
])
def test_bad_study_files_name_the_bad_key_and_the_choices(tmp_path, data_root, change, needle):
    sf = write_study(tmp_path / "bad.yaml", study_dict(data_root, **change))
    with pytest.raises(UserError) as e:
        load_study(sf)
    assert needle in str(e.value)


def test_stage_mode_decides_skip_resume_redo():
    assert stage_mode({"key": "k", "status": "done"}, "k", True, True) == "skip"
    assert stage_mode({"key": "k", "status": "done"}, "k", False, True) == "resume"     # outputs damaged
    assert stage_mode({"key": "k", "status": "running"}, "k", False, True) == "resume"  # interrupted
    assert stage_mode({"key": "old", "status": "done"}, "k", True, True) == "overwrite"
    assert stage_mode({}, "k", False, False) == "new"


def test_dry_run_of_a_new_study_lists_every_stage_and_writes_nothing(tmp_path, data_root):
    sf = write_study(tmp_path / "s.yaml", study_dict(data_root))
    res = run_study(sf, tmp_path / "out", dry_run=True, log=lambda m: None)
    names = [n for n, _ in res["plan"]]
    assert names == ["train/seeds", "train/distill", "train/born_again", "train/evolve", "extract",
                     "consistency/features.8", "similarity/features.8", "diagnosis/features.8", "report"]
    assert {w for _, w in res["plan"]} == {"run"}
    assert not (tmp_path / "out").exists()


def test_a_folder_that_is_not_a_study_is_not_overwritten(tmp_path, data_root):
    sf = write_study(tmp_path / "s.yaml", study_dict(data_root))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="--overwrite"):
        run_study(sf, tmp_path / "out", log=lambda m: None)
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


# --------------------------------------------------------------------------- a whole study

@pytest.mark.slow
def test_study_writes_every_stage_and_the_report(done_study):
    _, out, res = done_study
    assert [s["status"] for s in res["stages"]] == ["ran"] * 9
    state = read_json(out / "state.json")
    assert all(v["status"] == "done" for v in state["stages"].values())
    fams = {k: read_json(out / "families" / k / "family.json") for k in ("seeds", "distill", "born_again", "evolve")}
    names = {m["name"] for f in fams.values() for m in f["members"]}
    assert {"seed0", "seed1", "kd_student", "ban_g0", "ban_g1", "ke_g1", "ke_g2", "ke_g2_slim"} <= names
    # seeds differ in their initial weights (--seed reaches the model)
    a = torch.load(out / "families/seeds/seed0/last.pt", weights_only=False)["state_dict"]
    b = torch.load(out / "families/seeds/seed1/last.pt", weights_only=False)["state_dict"]
    assert not torch.equal(a["features.0.weight"], b["features.0.weight"])
    with h5py.File(out / "features.h5") as f:
        for split in ("train", "test"):
            for net in names:
                att = f[split][net]["features.8"].attrs
                assert bool(att["complete"])
                # the study's extract.precision reaches the extraction (the CPU computes it in fp32)
                assert (att["precision"], att["precision_effective"]) == ("tf32", "fp32")
    table = read_json(out / "consistency/features.8/table.json")
    pairs = {(r["source"], r["target"]) for r in (table["rows"] if isinstance(table, dict) else table)}
    assert {("seed0", "seed1"), ("seed1", "seed0"), ("seed0", "kd_student"), ("ban_g0", "ban_g1"),
            ("ke_g2_slim", "ke_g2")} <= pairs
    sim = read_json(out / "similarity/features.8/similarity.json")
    assert set(sim["metrics"]) == {"cka", "svcca"}
    assert (out / "diagnosis/features.8/diagnosis.json").is_file()
    html = (out / "report.html").read_text()
    assert "seed0" in html and "kd_student" in html
    assert 1 <= len(res["summary"]) <= 5
    # one recipe, one training: Born-Again g0 and KE g1 are seed0 again, reused instead of retrained
    assert read_json(out / "aliases.json")["aliases"] == {"ban_g0": "seed0", "ke_g1": "seed0"}
    seed0 = out / "families/seeds/seed0"
    assert (out / "families/born_again/g0/last.pt").stat().st_ino == (seed0 / "last.pt").stat().st_ino
    ke1 = torch.load(out / "families/evolve/g1/last.pt", weights_only=False)
    assert torch.equal(ke1["state_dict"]["features.0.weight"], a["features.0.weight"]) and "masks" in ke1
    assert "Trained once, reused: ban_g0 = seed0, ke_g1 = seed0." in html


@pytest.mark.slow
def test_rerun_is_cached_and_a_change_redoes_only_what_depends_on_it(done_study, tmp_path):
    sf, out = copy_study(done_study, tmp_path)
    feats_mtime = (out / "features.h5").stat().st_mtime_ns
    res = run_study(sf, out, log=lambda m: None)
    assert {s["status"] for s in res["stages"]} == {"cached"}
    assert (out / "features.h5").stat().st_mtime_ns == feats_mtime

    d = yaml.safe_load(sf.read_text())
    d["transnet"]["epochs"] = 3
    write_study(sf, d)
    plan = dict(run_study(sf, out, dry_run=True, log=lambda m: None)["plan"])
    assert plan["train/seeds"] == "cached" and plan["extract"] == "cached"
    assert plan["similarity/features.8"] == "cached"
    assert plan["consistency/features.8"] == "redo (inputs changed)"
    res = run_study(sf, out, log=lambda m: None)
    ran = {s["stage"] for s in res["stages"] if s["status"] == "ran"}
    assert ran == {"consistency/features.8", "diagnosis/features.8", "report"}
    fit_cfg = read_json(out / "consistency/features.8/config.json")
    assert json.dumps(fit_cfg).count('"epochs": 3') >= 1
    assert (out / "features.h5").stat().st_mtime_ns == feats_mtime

    d["members"]["born_again"]["lambda"] = 0.7                    # a training option: that family and after
    write_study(sf, d)
    plan = dict(run_study(sf, out, dry_run=True, log=lambda m: None)["plan"])
    assert plan["train/seeds"] == "cached" and plan["train/evolve"] == "cached"
    assert plan["train/born_again"] == "redo (inputs changed)"
    assert plan["extract"] == "run (after upstream stages)"


@pytest.mark.slow
def test_a_second_run_into_the_same_folder_is_refused_while_one_runs(done_study, tmp_path):
    from common.rundir import RunDir

    sf, out = copy_study(done_study, tmp_path)
    with RunDir(out, "resume"):                     # another study process holds the folder
        with pytest.raises(UserError, match="(?i)lock|another|running"):
            run_study(sf, out, log=lambda m: None)


def test_overwrite_while_a_study_runs_is_refused_and_deletes_nothing(done_study, tmp_path):
    from common.rundir import RunDir

    sf, out = copy_study(done_study, tmp_path)
    with RunDir(out, "resume"):                     # the running study's lock (this process's pid)
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on"):
            run_study(sf, out, overwrite=True, log=lambda m: None)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


# --------------------------------------------------------------------------- kill and resume

def _run_cli(sf: Path, out: Path, fault: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), "study", str(sf), "--out_dir", str(out)],
                          cwd=ROOT, env=_env(fault), capture_output=True, text=True, timeout=600)


def _env(fault: str | None = None) -> dict[str, str]:
    """A subprocess environment: one thread per process (CPU determinism), no inherited fault."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    env.pop("KC_FAULT", None)
    if fault:
        env["KC_FAULT"] = fault
    return env


def _rows(path: Path) -> dict:
    t = read_json(path)
    rows = t["rows"] if isinstance(t, dict) else t
    return {(r["source"], r["target"]): r for r in rows}


@pytest.fixture(scope="module")
def small_ref(tmp_path_factory, data_root):
    """A smaller study (seeds + a KD student, no diagnosis or report) run once, uninterrupted, in
    one process with one thread: the reference of the kill/resume and torchrun tests."""
    base = tmp_path_factory.mktemp("small")
    d = study_dict(data_root, diagnose=None, report=False)
    d["members"] = {"seeds": d["members"]["seeds"], "distill": d["members"]["distill"]}
    d["pairs"] = [{"family": "seeds", "plan": "all"}, {"nets": ["seed0", "kd_student"], "plan": "all"}]
    sf = write_study(base / "s.yaml", d)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_study(sf, base / "ref", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    return sf, base / "ref"


def assert_same_study(ref: Path, out: Path) -> None:
    for rel in ("families/seeds/seed0/last.pt", "families/seeds/seed1/last.pt", "families/distill/last.pt"):
        a = torch.load(ref / rel, weights_only=False)["state_dict"]
        b = torch.load(out / rel, weights_only=False)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a), rel
    with h5py.File(ref / "features.h5") as fa, h5py.File(out / "features.h5") as fb:
        for split in ("train", "test"):
            for net in ("seed0", "seed1", "kd_student"):
                assert np.array_equal(fa[split][net]["features.8"][:], fb[split][net]["features.8"][:])
    ra, rb = _rows(ref / "consistency/features.8/table.json"), _rows(out / "consistency/features.8/table.json")
    assert ra.keys() == rb.keys()
    for k in ra:
        for field in ("r2", "fraction_residual", "var_order0", "var_order1", "var_order2"):
            assert ra[k][field] == pytest.approx(rb[k][field], rel=1e-6, abs=1e-9), (k, field)
    sa = read_json(ref / "similarity/features.8/similarity.json")["metrics"]
    sb = read_json(out / "similarity/features.8/similarity.json")["metrics"]
    for m in sa:
        assert np.allclose(np.array(sa[m]["matrix"], float), np.array(sb[m]["matrix"], float), rtol=1e-6)


@pytest.mark.slow
def test_a_study_killed_in_training_extraction_and_fitting_resumes_to_the_same_results(tmp_path, small_ref):
    sf, ref = small_ref
    out = tmp_path / "killed"
    for fault, stage in [("train_step:5", "train/seeds"), ("extract_batch:2", "extract"),
                         ("transnet_step:2", "consistency/features.8")]:   # fits trained together: 2 steps in all
        p = _run_cli(sf, out, fault)
        assert p.returncode == 137, p.stderr[-2000:]
        state = read_json(out / "state.json")["stages"]
        assert state[stage]["status"] == "running"           # the stage that was killed is marked so
    p = _run_cli(sf, out, None)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming" in p.stdout
    assert_same_study(ref, out)


@pytest.mark.slow
def test_a_two_process_torchrun_study_gives_the_same_results_as_one_process(tmp_path, small_ref):
    sf, ref = small_ref
    out = tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(ROOT / "cli.py"), "study", str(sf),
                        "--out_dir", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert "on 2 processes" in p.stdout
    assert p.stdout.count("study finished") == 1                   # rank 0 alone reports
    assert read_json(out / "state.json")["processes"] == 2
    assert list(out.glob("features.rank*of2.h5"))                   # rows were extracted in two shards
    assert_same_study(ref, out)


def test_the_extract_section_takes_the_extract_commands_defaults_and_keeps_explicit_values(tmp_path, data_root):
    from features.extract import ExtractConfig

    d = study_dict(data_root)
    d["extract"] = {"layers": ["features.8"]}
    spec = load_study(write_study(tmp_path / "defaults.yaml", d)).extract
    assert spec.config("cpu") == ExtractConfig(device="cpu")              # float16, no logits, batch 64, all rows
    d["extract"] = {"layers": ["features.8"], "splits": ["test"], "dtype": "float32", "batch_size": 7,
                    "logits": True, "limit": 5}
    spec = load_study(write_study(tmp_path / "set.yaml", d)).extract
    assert spec.config("cuda:1") == ExtractConfig(split="test", dtype="float32", batch_size=7, device="cuda:1",
                                                  logits=True, limit=5)


@pytest.mark.parametrize("name", ["demo", "kc_stability_cub", "ke_flower102", "kd_ban_cifar"])
def test_shipped_studies_load_and_plan(name, tmp_path):
    sf = ROOT / "studies" / f"{name}.yaml"
    study = load_study(sf)
    assert study.extract.layers and study.pairs
    plan = run_study(sf, tmp_path / "out", dry_run=True, log=lambda m: None)["plan"]
    assert plan[0][1] == "run" and plan[-1][0] == "report"


@pytest.mark.slow
def test_a_failure_on_one_rank_of_a_torchrun_study_stops_every_rank(tmp_path):
    """Rank 0 trains seeds 0 and 7, rank 1 seed 5; a disk error at rank 0's 5th training step (its second
    seed; 18 images, batch 8, 2 epochs: 4 steps a seed) must stop rank 1 too, at once, instead of leaving
    it in a barrier until the study's timeout."""
    data_root = make_imagefolder(tmp_path / "img", n_classes=3, per_class=6, size=(20, 20))
    d = study_dict(data_root, diagnose=None, report=False)
    d["members"] = {"seeds": {"arch": "vgg_tiny", "seeds": [0, 5, 7]}}
    d["pairs"] = [{"family": "seeds", "plan": "all"}]
    sf = write_study(tmp_path / "s.yaml", d)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), str(ROOT / "cli.py"), "study", str(sf),
                        "--out_dir", str(tmp_path / "out")], cwd=ROOT, env=_env("train_step:5:eio"),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    err = flat(p.stdout + p.stderr)
    assert "Input/output error" in err and "training the seeds failed on another rank" in err, err[-3000:]
    assert (tmp_path / "out" / "families" / "seeds" / "seed5" / "metrics.json").is_file()   # rank 1 finished its own
