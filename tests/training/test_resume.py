"""--resume with other options: ``train``, ``distill`` and ``born-again`` refuse a run started with other
settings before anything is written, naming each change old -> new; options that only say where and how
fast a run goes may change. ``search`` refuses to reuse a run of its grid whose options changed."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import UserError
from tests.fakedata import make_imagefolder
from tests.processes import flat
from training.config import RESUME_FREE
from training.loop import changed_settings, resume_changes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-class ImageFolder (8 train + 8 test images per class, 16x16), the options of a one-epoch
    vgg_tiny run on it and a teacher trained with them."""
    root = tmp_path_factory.mktemp("resume")
    data = make_imagefolder(root / "data", n_classes=3, per_class=8, size=(16, 16))
    opts = ["--dataset", f"imagefolder:{data}", "--transform", "plain", "--image_size", "16", "--device", "cpu",
            "--batch_size", "8", "--arch", "vgg_tiny", "--epochs", "1"]
    import cli as cli_mod

    assert cli_mod.main(["train", *opts, "--out_dir", str(root / "teacher")]) == 0
    return {"data": data, "opts": opts, "teacher": root / "teacher" / "last.pt"}


def _files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory (the lock aside), by relative path."""
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def _bare(text: str) -> str:
    """``text`` without white space: cli.py wraps error paragraphs, also inside paths (at hyphens)."""
    return "".join(text.split())


def _with(opts: list[str], **over: str) -> list[str]:
    """``opts`` with the values of options in ``over`` replaced (e.g. epochs="2")."""
    out = list(opts)
    for k, v in over.items():
        out[out.index(f"--{k}") + 1] = v
    return out


# --------------------------------------------------------------------------- the comparison

def test_resume_changes_name_each_setting_and_skip_free_and_unrecorded_ones():
    old = {"train": {"epochs": 4, "lr": 0.05, "device": "cuda"}, "data": {"data_root": "/a", "image_size": 16},
           "loss": {"alpha": 0.5}, "kd": {"teacher_name": "t"}}
    new = {"train": {"epochs": 6, "lr": 0.1, "device": "cpu", "grad_clip": 0.0},
           "data": {"data_root": "/b", "image_size": 16}, "loss": {"alpha": 0.9}, "kd": {"teacher_name": "u"}}
    assert resume_changes(old, new) == ["train.epochs: 4 -> 6", "train.lr: 0.05 -> 0.1", "loss.alpha: 0.5 -> 0.9"]
    assert "device" in RESUME_FREE["train"] and "epochs" not in RESUME_FREE["train"]
    assert changed_settings({"a": (1, 2), "b": 1}, {"a": [1, 2], "b": 2, "c": 3}) == ["b: 1 -> 2"]


# --------------------------------------------------------------------------- train, distill, born-again

def test_train_resume_with_other_settings_is_refused_before_anything_is_written(cli, tiny, tmp_path):
    out = tmp_path / "seed0"
    code, _, err = cli("train", *tiny["opts"], "--out_dir", out)
    assert code == 0, err
    before = _files(out)
    code, _, err = cli("train", *_with(tiny["opts"], epochs="2"), "--lr", "0.1", "--out_dir", out, "--resume")
    assert code == 1
    text = flat(err)
    assert _bare(f"cannot resume {out}: it was started with other settings (train.epochs: 1 -> 2; "
                 f"train.lr: 0.05 -> 0.1)") in _bare(text)
    assert "not --epochs" in text and "--overwrite" in text and "--device" in text
    assert _files(out) == before


def test_train_resume_may_change_where_and_how_often_it_saves(cli, tiny, tmp_path):
    out = tmp_path / "seed0"
    assert cli("train", *tiny["opts"], "--out_dir", out)[0] == 0
    code, _, err = cli("train", *tiny["opts"], "--num_workers", "1", "--eval_every", "2", "--save_every", "3",
                       "--data_on", "loader", "--out_dir", out, "--resume")
    assert code == 0, err


def test_distill_resume_with_other_alpha_is_refused(cli, tiny, tmp_path):
    out = tmp_path / "kd"
    argv = ["distill", *tiny["opts"], "--teacher", tiny["teacher"], "--alpha", "0.5", "--out_dir", out]
    code, _, err = cli(*argv)
    assert code == 0, err
    before = _files(out)
    code, _, err = cli(*_with(argv, alpha="0.9"), "--resume")
    assert code == 1 and "loss.alpha: 0.5 -> 0.9" in flat(err)
    assert _files(out) == before
    code, _, err = cli(*argv, "--student_name", "pupil", "--resume")     # names in family.json only
    assert code == 0, err


def test_born_again_resume_with_other_lr_is_refused_and_may_add_generations(cli, tiny, tmp_path):
    out = tmp_path / "ban"
    argv = ["born-again", *tiny["opts"], "--generations", "1", "--out_dir", out]
    code, _, err = cli(*argv)
    assert code == 0, err
    before = _files(out)
    code, _, err = cli(*argv, "--lr", "0.1", "--resume")
    assert code == 1
    assert _bare(f"cannot resume {out}: it was started with other settings (train.lr: 0.05 -> 0.1)") in _bare(err)
    assert "--generations" in flat(err).split("Resume with")[1]
    assert _files(out) == before
    code, _, err = cli(*_with(argv, generations="2"), "--resume")
    assert code == 0, err
    assert (out / "g1" / "metrics.json").exists()


# --------------------------------------------------------------------------- search

def _base(tiny, path: Path, **over: str) -> Path:
    opts = dict(zip(tiny["opts"][::2], tiny["opts"][1::2]))
    opts.update({f"--{k}": v for k, v in over.items()})
    path.write_text("command: train\n" + "".join(f"{k.lstrip('-')}: {v}\n" for k, v in opts.items()))
    return path


def test_search_refuses_to_reuse_runs_of_other_settings(cli, tiny, tmp_path):
    out = tmp_path / "grid"
    grid = ["--grid", "lr=0.05,0.1", "--out_dir", out]
    code, _, err = cli("search", "--base", _base(tiny, tmp_path / "a.yaml"), *grid)
    assert code == 0, err
    before = _files(out)
    code, _, err = cli("search", "--base", _base(tiny, tmp_path / "b.yaml", epochs="2"), *grid)
    assert code == 1
    text = flat(err)
    assert _bare(f"{out / 'lr=0.05'} (epochs: 1 -> 2), {out / 'lr=0.1'} (epochs: 1 -> 2)") in _bare(text)
    assert "--overwrite" in text and "--out_dir" in text
    assert _files(out) == before
    # where a run goes may change: finished runs are kept
    code, stdout, err = cli("search", "--base", _base(tiny, tmp_path / "c.yaml", num_workers="1"), *grid)
    assert code == 0, err
    assert "2 runs (2 already finished)" in stdout


def test_search_refuses_to_resume_an_interrupted_run_of_other_settings(cli, tiny, tmp_path):
    out = tmp_path / "grid"
    grid = ["--grid", "lr=0.05", "--out_dir", out]
    code, _, err = cli("search", "--base", _base(tiny, tmp_path / "a.yaml"), *grid)
    assert code == 0, err
    (out / "lr=0.05" / "metrics.json").unlink()             # as if it had been interrupted
    code, _, err = cli("search", "--base", _base(tiny, tmp_path / "b.yaml", batch_size="4"), *grid)
    assert code == 1 and "batch_size: 8 -> 4" in flat(err)


def test_search_compares_a_run_s_options_with_the_defaults_filled_in(tmp_path):
    """A base that now spells out a default, or changes a free option, changes nothing; another command does."""
    from training.grid import check_reuse

    (tmp_path / "lr=0.05").mkdir()
    (tmp_path / "lr=0.05" / "log.jsonl").write_text("")
    points = {"lr=0.05": {"lr": "0.05"}, "lr=0.1": {"lr": "0.1"}}          # lr=0.1 has not started: not compared
    options = lambda base, point: {"lr": 0.05, "epochs": 1, "device": "auto", **base, **point}  # noqa: E731
    prev = {"command": "train", "base": {}}
    check_reuse(tmp_path, points, prev, {"command": "train", "base": {"epochs": 1, "device": "cpu"}}, options)
    with pytest.raises(UserError, match=r"lr=0.05 \(epochs: 1 -> 3\)"):
        check_reuse(tmp_path, points, prev, {"command": "train", "base": {"epochs": 3}}, options)
    with pytest.raises(UserError, match="command: 'train' -> 'distill'"):
        check_reuse(tmp_path, points, prev, {"command": "distill", "base": {}}, options)
