"""Which study a study folder holds: another study is refused before anything is written, the same
study resumes (its file edited, moved or unnamed), stages dropped from its file leave the report, and
folders from before the study was recorded still resume.

One small study (two vgg_tiny seeds and a two-generation Born-Again family, 1 epoch, Trans-Nets at two
layers) is run once per module; tests work on copies of it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from common.errors import UserError
from common.files import read_json, write_json
from studies.runner import run_study
from tests.studies.test_study import data_root, write_study  # noqa: F401  (data_root: the shared fixture)

# ruff: noqa: F811  (tests take the imported data_root fixture by name)


def small_study(data_root: Path, name: str | None = "small", **over) -> dict:
    d = {
        "name": name,
        "data": {"dataset": f"imagefolder:{data_root}", "transform": "plain", "image_size": 16},
        "train": {"epochs": 1, "batch_size": 8, "lr": 0.05, "device": "cpu"},
        "members": {"seeds": {"arch": "vgg_tiny", "seeds": [0, 1]},
                    "born_again": {"arch": "vgg_tiny", "generations": 2}},
        "extract": {"layers": ["features.4", "features.8"], "batch_size": 16, "dtype": "float32"},
        "transnet": {"orders": 1, "epochs": 1, "batch_size": 8, "eval_every": 1, "device": "cpu"},
        "pairs": [{"family": "seeds", "plan": "all"}],
        "report": True,
    }
    if name is None:
        del d["name"]
    d.update(over)
    return d


def tree(root: Path) -> dict[str, int]:
    """Every file below ``root`` with its modification time (what a refused run must leave alone)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def done(tmp_path_factory, data_root):
    base = tmp_path_factory.mktemp("small")
    sf = write_study(base / "small.yaml", small_study(data_root))
    run_study(sf, base / "out", log=lambda m: None)
    return sf, base / "out"


@pytest.fixture
def copy(done, tmp_path) -> tuple[Path, Path]:
    sf, out = done
    shutil.copytree(out, tmp_path / "out")
    shutil.copy(sf, tmp_path / "small.yaml")
    return tmp_path / "small.yaml", tmp_path / "out"


def test_a_study_of_another_name_is_refused_before_anything_is_written(copy, data_root, tmp_path, cli):
    _, out = copy
    other = small_study(data_root, name="other", members={"seeds": {"arch": "vgg_tiny", "seeds": [2, 3]}})
    other["extract"]["layers"] = ["features.8"]
    sf = write_study(tmp_path / "other.yaml", other)
    before = tree(out)
    for dry_run in (True, False):
        with pytest.raises(UserError) as e:
            run_study(sf, out, dry_run=dry_run, log=lambda m: None)
        msg = str(e.value)
        assert "holds the study 'small'" in msg and "not 'other'" in msg
        assert "--overwrite" in msg and "--out_dir" in msg
    code, _, err = cli("study", sf, "--out_dir", out)
    assert code != 0 and "holds the study 'small'" in " ".join(err.split())
    assert tree(out) == before


@pytest.mark.slow
def test_overwrite_replaces_the_other_study_whole(copy, data_root, tmp_path):
    _, out = copy
    other = small_study(data_root, name="other", members={"seeds": {"arch": "vgg_tiny", "seeds": [2, 3]}})
    other["extract"]["layers"] = ["features.8"]
    sf = write_study(tmp_path / "other.yaml", other)
    plan = run_study(sf, out, dry_run=True, overwrite=True, log=lambda m: None)["plan"]
    assert {w for _, w in plan} == {"run"}                    # the folder is emptied first: nothing cached
    run_study(sf, out, overwrite=True, log=lambda m: None)
    assert read_json(out / "state.json")["study"]["name"] == "other"
    assert sorted(p.name for p in (out / "consistency").iterdir()) == ["features.8"]
    assert sorted(p.name for p in (out / "families").iterdir()) == ["seeds"]
    md = (out / "report.md").read_text()
    assert "seed2" in md and "seed0" not in md and "ban_g" not in md


@pytest.mark.slow
def test_the_same_study_resumes_when_its_file_is_moved_or_has_no_name(copy, data_root, tmp_path):
    sf, out = copy
    moved = shutil.copy(sf, tmp_path / "elsewhere.yaml")          # same name, another file
    logs: list[str] = []
    res = run_study(moved, out, log=logs.append)
    assert {s["status"] for s in res["stages"]} == {"cached"}
    assert any("holds the study 'small' run from" in m for m in logs)
    assert read_json(out / "state.json")["study"]["study_file"] == str(Path(moved).resolve())
    unnamed = write_study(tmp_path / "small.yaml", small_study(data_root, name=None))   # name: the file's stem
    res = run_study(unnamed, out, log=lambda m: None)
    assert {s["status"] for s in res["stages"]} == {"cached"}


@pytest.mark.slow
def test_stages_dropped_from_the_study_file_leave_the_folder_and_the_report(copy):
    sf, out = copy
    assert "features.4" in (out / "report.md").read_text() and "ban_g0" in (out / "report.md").read_text()
    d = yaml.safe_load(sf.read_text())
    d["extract"]["layers"] = ["features.8"]
    del d["members"]["born_again"]
    write_study(sf, d)
    plan = run_study(sf, out, dry_run=True, log=lambda m: None)["plan"]
    assert plan[:2] == [("train/born_again", "removed (not in the study file: its outputs move to removed/)"),
                        ("consistency/features.4", "removed (not in the study file: its outputs move to removed/)")]
    assert dict(plan)["train/seeds"] == "cached"
    res = run_study(sf, out, log=lambda m: None)
    assert {s["stage"] for s in res["stages"] if s["status"] == "ran"} == {"extract", "consistency/features.8",
                                                                         "report"}
    assert not (out / "consistency/features.4").exists() and not (out / "families/born_again").exists()
    assert (out / "removed/consistency/features.4/table.json").is_file()           # kept, out of the report's way
    assert (out / "removed/families/born_again/family.json").is_file()
    state = read_json(out / "state.json")
    assert set(state["stages"]) == {"train/seeds", "extract", "consistency/features.8", "report"}
    assert set(state["removed"]) == {"train/born_again", "consistency/features.4"}
    assert read_json(out / "aliases.json")["aliases"] == {}                         # ban_g0 = seed0 left with its family
    md = (out / "report.md").read_text()
    assert "features.4" not in md and "ban_g" not in md and "born_again" not in md
    assert not any("features.4" in line or "ban_g" in line for line in res["summary"])
    assert not list((out / "figures").glob("*features_4*"))

    d["extract"]["layers"] = ["features.4", "features.8"]                           # added back: run again
    write_study(sf, d)
    plan = dict(run_study(sf, out, dry_run=True, log=lambda m: None)["plan"])
    assert plan["consistency/features.4"] == "run"
    run_study(sf, out, log=lambda m: None)
    assert (out / "consistency/features.4/table.json").is_file()
    assert "consistency/features.4" not in read_json(out / "state.json").get("removed", {})


@pytest.mark.slow
def test_a_folder_from_before_the_study_was_recorded_still_resumes(copy, data_root, tmp_path):
    sf, out = copy
    state = read_json(out / "state.json")
    del state["study"]
    for entry in state["stages"].values():
        entry.pop("outputs")
    write_json(out / "state.json", state)
    res = run_study(sf, out, log=lambda m: None)
    assert {s["status"] for s in res["stages"]} == {"cached"}
    assert read_json(out / "state.json")["study"]["name"] == "small"                # recorded from now on

    state = read_json(out / "state.json")                                          # old again: study.json tells
    del state["study"]
    assert not any("outputs" in entry for entry in state["stages"].values())       # cached stages keep their entry
    write_json(out / "state.json", state)
    other = write_study(tmp_path / "other.yaml", small_study(data_root, name="other"))
    with pytest.raises(UserError, match="holds the study 'small'"):
        run_study(other, out, dry_run=True, log=lambda m: None)

    d = yaml.safe_load(sf.read_text())                          # no recorded outputs: where the layout puts them
    d["extract"]["layers"] = ["features.8"]
    write_study(sf, d)
    run_study(sf, out, log=lambda m: None)
    assert (out / "removed/consistency/features.4/table.json").is_file()
    assert "features.4" not in (out / "report.md").read_text()


def test_state_json_of_a_run_names_its_study(done):
    sf, out = done
    study = read_json(out / "state.json")["study"]
    assert study["name"] == "small" and study["study_file"] == str(sf.resolve())
    assert len(study["spec_sha256"]) == 64
    assert json.loads(json.dumps(study)) == study


@pytest.mark.slow
def test_images_edited_in_place_redo_the_stages_that_read_them(tmp_path, data_root):
    """The data set's files are an input of training and extraction: an image rewritten under the same
    name (new size and time) makes them run again, as a changed key would; the rest follows them."""
    images = Path(shutil.copytree(data_root, tmp_path / "img"))
    d = small_study(images, members={"seeds": {"arch": "vgg_tiny", "seeds": [0, 1]}}, report=False)
    d["extract"]["layers"] = ["features.8"]
    sf = write_study(tmp_path / "small.yaml", d)
    out = tmp_path / "out"
    run_study(sf, out, log=lambda m: None)
    plan = dict(run_study(sf, out, dry_run=True, log=lambda m: None)["plan"])
    assert set(plan.values()) == {"cached"}, plan
    state = read_json(out / "state.json")["stages"]
    assert state["train/seeds"]["data_source"] == state["extract"]["data_source"]
    picture = next((images / "train").rglob("*.jpg"))
    picture.write_bytes(picture.read_bytes() + b"\0")                   # same name, other bytes
    plan = dict(run_study(sf, out, dry_run=True, log=lambda m: None)["plan"])
    assert plan["train/seeds"] == "redo (inputs changed)", plan
    assert plan["extract"] != "cached" and plan["consistency/features.8"] != "cached", plan
