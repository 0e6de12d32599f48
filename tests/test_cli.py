"""The command line: ``train`` end to end from a config file, bad names and config keys; and the faults a
user meets: garbage options, corrupt or truncated feature files, checkpoints that changed
after extraction. (Kill-and-resume of whole studies is in studies/test_study.py; of single stages in
training/test_training.py, features/test_extract.py and transnet/test_transnet_fit.py; full disks in
features/test_extract.py; NaN features in transnet/test_transnet_fit.py.)"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cli as cli_mod
from common.checkpoints import load_checkpoint, save_checkpoint
from common.files import read_json
from features.extract import ExtractConfig, extract_features
from features.nets import build_feature_data, data_spec_for, load_net
from tests.fakedata import tiny_checkpoint, write_features_one_split

COMMANDS = sorted(cli_mod.build_parser()[1])


def _assert_one_paragraph(err: str) -> None:
    text = err.strip()
    assert "Traceback" not in text
    assert text.startswith("error:") or "error:" in text.splitlines()[-1]
    assert "\n\n" not in text                                        # one paragraph


def test_every_command_is_covered_below():
    assert set(COMMANDS) == set(BAD_CALLS), set(COMMANDS) ^ set(BAD_CALLS)


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_option_exits_2_with_usage_and_no_traceback(command, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_mod.main([command, *REQUIRED[command](tmp_path), "--no_such_option", "zzz"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no_such_option" in err and "Traceback" not in err


@pytest.mark.parametrize("command", COMMANDS)
def test_broken_config_file_is_named(command, cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1, 2\n  lr: }{")
    code, _, err = cli(command, "--config", bad, *REQUIRED[command](tmp_path))
    assert code != 0
    _assert_one_paragraph(err)
    assert "bad.yaml" in err


def _g(tmp_path: Path) -> dict[str, str]:
    """Garbage inputs: a missing file, a file of random bytes named .h5/.pt, a missing folder."""
    junk_h5 = tmp_path / "junk.h5"
    junk_h5.write_bytes(np.random.default_rng(0).bytes(4096))
    junk_pt = tmp_path / "junk.pt"
    junk_pt.write_bytes(b"not a checkpoint at all")
    return {"missing": str(tmp_path / "missing.h5"), "junk_h5": str(junk_h5), "junk_pt": str(junk_pt),
            "out": str(tmp_path / "out"), "dir": str(tmp_path / "nowhere")}


# command -> argv builder that passes the required options with garbage that must fail quickly
BAD_CALLS = {
    "train": lambda g: ["--dataset", f"imagefolder:{g['dir']}", "--arch", "vgg_tiny", "--out_dir", g["out"]],
    "distill": lambda g: ["--teacher", g["junk_pt"], "--arch", "vgg_tiny", "--out_dir", g["out"]],
    "born-again": lambda g: ["--arch", "vgg_tiny", "--generations", "0", "--out_dir", g["out"]],
    "search": lambda g: ["--base", g["missing"], "--grid", "alpha=0.1,0.5", "--out_dir", g["out"]],
    "summarize": lambda g: [g["dir"]],
    "compress": lambda g: ["--checkpoint", g["junk_pt"], "--prune", "0.8", "--out_dir", g["out"]],
    "evolve": lambda g: ["--arch", "vgg_tiny", "--split_rate", "1.5", "--out_dir", g["out"]],
    "extract": lambda g: ["--nets", f"a={g['junk_pt']}", "--layer", "features.8", "--out", g["out"] + ".h5"],
    "inspect": lambda g: [g["junk_h5"]],
    "import-features": lambda g: ["--net", f"a={g['junk_pt']}", "--out", g["out"] + ".h5"],
    "list-layers": lambda g: ["--arch", "vgg_tinny"],
    "fit-transnet": lambda g: ["--features", g["junk_h5"], "--source", "a", "--target", "b", "--layer",
                               "features.8", "--out_dir", g["out"]],
    "variance": lambda g: ["--transnet", g["dir"]],
    "import-transnet": lambda g: ["--checkpoint", g["junk_pt"], "--features", g["missing"], "--source", "a",
                                  "--target", "b", "--layer", "features.8", "--out_dir", g["out"]],
    "refine": lambda g: ["--transnet", g["dir"], "--out_dir", g["out"]],
    "similarity": lambda g: ["--features", g["junk_h5"], "--layer", "features.8", "--out_dir", g["out"]],
    "consistency": lambda g: ["--features", g["missing"], "--layer", "features.8", "--out_dir", g["out"]],
    "visualize": lambda g: [g["dir"]],
    "diagnose": lambda g: ["--consistency", g["dir"], "--a", "x", "--b", "y", "--out_dir", g["out"]],
    "report": lambda g: [g["dir"]],
    "study": lambda g: [g["missing"].replace(".h5", ".yaml"), "--out_dir", g["out"]],
}
# the required options alone (for the config-file test: the broken config fails before they matter)
REQUIRED = {name: (lambda f: (lambda tmp_path: f(_g(tmp_path))))(f) for name, f in BAD_CALLS.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_garbage_inputs_exit_nonzero_with_one_paragraph(command, cli, tmp_path):
    code, out, err = cli(command, *BAD_CALLS[command](_g(tmp_path)))
    assert code != 0, out
    _assert_one_paragraph(err)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception):
        cli_mod.main(["inspect", str(tmp_path / "missing.h5"), "--debug"])


# --------------------------------------------------------------------------- damaged feature files

def _features(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return write_features_one_split(tmp_path / "f.h5", {"a": rng.normal(size=(64, 8, 3, 3)).astype(np.float32),
                                                      "b": rng.normal(size=(64, 8, 3, 3)).astype(np.float32)})


@pytest.mark.parametrize("damage", ["truncate", "zero_header", "empty"])
def test_damaged_feature_file_is_detected_and_named(cli, tmp_path, damage):
    path = _features(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "zero_header":
        path.write_bytes(b"\0" * 512 + data[512:])
    else:
        path.write_bytes(b"")
    for argv in (["inspect", path], ["similarity", "--features", path, "--layer", "conv", "--out_dir", tmp_path / "s"],
                 ["fit-transnet", "--features", path, "--source", "a", "--target", "b", "--layer", "conv",
                  "--train_split", "test", "--eval_split", "none", "--out_dir", tmp_path / "t"]):
        code, _, err = cli(*argv)
        assert code != 0
        _assert_one_paragraph(err)
        assert "f.h5" in err and ("corrupt" in err or "truncated" in err or "not a kc-features" in err)


# --------------------------------------------------------------------------- changed checkpoints

def test_features_of_a_checkpoint_changed_since_extraction_are_refused_unless_allowed(cli, tmp_path):
    ck = {"a": tiny_checkpoint(tmp_path / "a.pt", seed=0), "b": tiny_checkpoint(tmp_path / "b.pt", seed=1)}
    nets = [load_net(n, p) for n, p in ck.items()]
    cfg = ExtractConfig(split="test", dtype="float32", batch_size=8, limit=24)
    data = build_feature_data(data_spec_for(nets, {}), ["test"], cfg.limit)
    feats = tmp_path / "f.h5"
    extract_features(nets, data, [("features.8", None)], feats, cfg, command="test")
    sim = ["similarity", "--features", feats, "--layer", "features.8", "--permutations", "0"]
    code, _, err = cli(*sim, "--out_dir", tmp_path / "s0")
    assert code == 0, err

    c = load_checkpoint(ck["b"])                                   # b is trained on after extraction
    with torch.no_grad():
        c["state_dict"]["features.0.weight"] += 0.01
    save_checkpoint(ck["b"], c)
    code, _, err = cli(*sim, "--out_dir", tmp_path / "s1")
    assert code == 1
    _assert_one_paragraph(err)
    assert "b.pt" in err and "changed since extraction" in err and "--allow_changed_checkpoints" in err
    fit = ["fit-transnet", "--features", feats, "--source", "a", "--target", "b", "--layer", "features.8",
           "--train_split", "test", "--eval_split", "none", "--epochs", "1", "--device", "cpu"]
    code, _, err = cli(*fit, "--out_dir", tmp_path / "t1")
    assert code == 1 and "changed since extraction" in err

    code, _, err = cli(*sim, "--out_dir", tmp_path / "s2", "--allow_changed_checkpoints")
    assert code == 0, err
    code, _, err = cli(*fit, "--out_dir", tmp_path / "t2", "--allow_changed_checkpoints")
    assert code == 0, err

    shutil.move(ck["b"], tmp_path / "elsewhere.pt")                # a checkpoint moved away cannot be checked
    code, _, err = cli(*sim, "--out_dir", tmp_path / "s3")
    assert code == 0, err


# --------------------------------------------------------------------------- train from a config file, bad names

def test_cli_train_end_to_end_with_config_file(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 1\narch: vgg_tiny\nbatch_size: 256\nimage_size: 16\n")
    code, out, err = cli("train", "--config", cfg, "--out_dir", tmp_path / "run")
    assert code == 0, err
    conf = read_json(tmp_path / "run" / "config.json")
    assert conf["config"]["train"]["epochs"] == 1 and conf["config"]["model"]["arch"] == "vgg_tiny"
    assert conf["provenance"]["code_version"] and conf["end_utc"]
    assert "test top-1" in out
    # a second run into the same directory is refused with the fix named
    code, out, err = cli("train", "--config", cfg, "--out_dir", tmp_path / "run")
    assert code == 1 and "--overwrite" in err and "Traceback" not in err


def test_cli_config_file_with_unknown_key_is_refused(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochz: 1\n")
    code, _, err = cli("train", "--config", cfg, "--out_dir", tmp_path / "run")
    assert code == 1 and "epochz" in err and "epochs" in err


@pytest.mark.parametrize("argv, needle", [
    (["train", "--arch", "nope", "--out_dir", "X"], "unknown arch 'nope'"),
    (["train", "--dataset", "mnist", "--out_dir", "X"], "unknown data set 'mnist'"),
    (["trian"], "did you mean 'train'"),
])
def test_cli_bad_names_exit_nonzero_without_traceback(cli, tmp_path, argv, needle):
    argv = [str(tmp_path / a) if a == "X" else a for a in argv]
    code, out, err = cli(*argv)
    assert code != 0 and needle in err and "Traceback" not in err
