"""Common foundations: registries, checkpoint files, run directories."""
from __future__ import annotations

import pytest
import torch

from common.checkpoints import load_checkpoint
from common.errors import UserError, require_choice
from common.files import write_json
from common.registry import Registry, UnknownNameError
from common.rundir import RunDir

# --------------------------------------------------------------------------- registries

def test_unknown_registry_name_lists_choices_and_close_match():
    reg = Registry("arch")
    reg.add("resnet18", lambda: 1)
    reg.add("vgg16_bn", lambda: 2)
    with pytest.raises(UnknownNameError) as e:
        reg.get("resnet19")
    msg = str(e.value)
    assert "'resnet19'" in msg and "did you mean 'resnet18'" in msg and "vgg16_bn" in msg


# --------------------------------------------------------------------------- checkpoints

def test_an_unknown_option_value_is_refused_naming_it_and_every_choice():
    require_choice("--data_on", "device", ("auto", "loader", "device"))
    with pytest.raises(UserError, match=r"unknown --data_on 'gpu'; valid: auto, loader, device$"):
        require_choice("--data_on", "gpu", ("auto", "loader", "device"))


def test_truncated_checkpoint_is_named(tmp_path):
    p = tmp_path / "broken.pt"
    p.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UserError, match="broken.pt cannot be read"):
        load_checkpoint(p)


# --------------------------------------------------------------------------- run dirs

def test_run_dir_refuses_nonempty_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    with RunDir(out) as r:
        write_json(r.file("metrics.json"), {"a": 1})
    with pytest.raises(UserError, match="--resume .* --overwrite"):
        RunDir(out)
    with RunDir(out, "resume") as r:
        assert r.resuming and r.file("metrics.json").exists()
    with RunDir(out, "overwrite") as r:
        assert not r.file("metrics.json").exists()


def test_concurrent_run_into_same_dir_is_refused(tmp_path):
    first = RunDir(tmp_path / "run")
    try:
        with pytest.raises(UserError, match="in use by pid"):
            RunDir(tmp_path / "run", "resume")
    finally:
        first.close()
    RunDir(tmp_path / "run", "resume").close()


def test_an_unfinished_run_names_where_a_resume_continues(tmp_path):
    import json

    from common.finished import unfinished_reason

    run = tmp_path / "run"
    run.mkdir()
    write_json(run / "config.json", {"config": {"epochs": 30}, "start_utc": "t0", "end_utc": None,
                                     "provenance": {"command": f"cli.py fit-transnet --out_dir {run}"}})
    (run / "log.jsonl").write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, 10)))
    why = unfinished_reason(run)
    assert "stopped at epoch 9 of 30 before its first checkpoint (a resume starts again at epoch 1)" in why
    assert why.endswith(f"resume it with python cli.py fit-transnet --out_dir {run} --resume")
    torch.save({"epoch": 5, "state_dict": {}}, run / "last.pt")
    assert "stopped at epoch 9 of 30; its last checkpoint holds epoch 5, where a resume continues" in unfinished_reason(run)
    torch.save({"epoch": 9, "state_dict": {}}, run / "last.pt")
    assert "stopped at epoch 9 of 30 (started t0)" in unfinished_reason(run)


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise UserError(f"cannot read image {i}.jpg (Truncated File Read)")


def test_a_user_error_in_a_loader_worker_is_one_paragraph():
    """torch re-raises a worker's UserError with the worker's traceback as its message."""
    from common.errors import user_message

    loader = torch.utils.data.DataLoader(_Unreadable(), num_workers=1)
    with pytest.raises(UserError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)
    assert user_message(caught.value) == "cannot read image 0.jpg (Truncated File Read) (raised in DataLoader worker process 0)"
    assert user_message(UserError("plain")) == "plain"


def test_a_file_the_safe_unpickler_refuses_is_named_without_advice_to_unpickle_it(tmp_path):
    import h5py
    import numpy as np

    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["x"] = np.zeros(3)
    torch.save({"state_dict": {}, "when": __import__("datetime").date(2026, 1, 1)}, tmp_path / "obj.pt")
    for name in ("f.h5", "obj.pt"):
        with pytest.raises(UserError, match=rf"{name} cannot be read \(the safe unpickler refused it: ") as caught:
            load_checkpoint(tmp_path / name)
        assert "weights_only" not in str(caught.value) and "Please file an issue" not in str(caught.value)
