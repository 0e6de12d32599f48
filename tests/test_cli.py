"""The command line: ``train`` end to end from a config file, bad names and config keys; and the faults a
user meets: garbage options, corrupt or truncated feature files, checkpoints that changed
after extraction. (Kill-and-resume of whole studies is in studies/test_study.py; of single stages in
training/test_training.py, features/test_extract.py and transnet/test_transnet_fit.py; full disks in
features/test_extract.py; NaN features in transnet/test_transnet_fit.py.)"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cli as cli_mod
from common.checkpoints import load_checkpoint, save_checkpoint
from common.errors import UserError
from common.files import read_json
from common.options import is_flag
from common.ranges import CsvList, Name, Number, OptionType
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
    "born-again": lambda g: ["--arch", "vgg_tiny", "--weights", g["junk_pt"], "--out_dir", g["out"]],
    "search": lambda g: ["--base", g["missing"], "--grid", "alpha=0.1,0.5", "--out_dir", g["out"]],
    "summarize": lambda g: [g["dir"]],
    "compress": lambda g: ["--checkpoint", g["junk_pt"], "--prune", "0.8", "--out_dir", g["out"]],
    "evolve": lambda g: ["--arch", "vgg_tiny", "--dataset", f"imagefolder:{g['dir']}", "--out_dir", g["out"]],
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
REQUIRED = {name: (lambda f: (lambda tmp_path, f=f: f(_g(tmp_path))))(f) for name, f in BAD_CALLS.items()}


@pytest.mark.parametrize("command", COMMANDS)
def test_garbage_inputs_exit_nonzero_with_one_paragraph(command, cli, tmp_path):
    code, out, err = cli(command, *BAD_CALLS[command](_g(tmp_path)))
    assert code != 0, out
    _assert_one_paragraph(err)


# --------------------------------------------------------------------------- every option's range, from the parsers

PARSERS = cli_mod.build_parser()[1]


def _default(action: argparse.Action):
    return getattr(action.default, "value", action.default)      # evolve wraps defaults (preset detection)


def _bad_values(t: OptionType) -> list[str]:
    """Strings the option type must refuse: not a number, non-finite, just outside each bound."""
    if isinstance(t, Name):
        return ["", "a/b", "..", "a b", "../up"]
    if isinstance(t, CsvList):
        return [",", "", "a,,b", "x,x"] + (["zzz"] if t.choices else [])
    assert isinstance(t, Number), t
    out = ["abc", "", "nan", "1e400" if t.kind is float else "1.5"]
    out += ["inf", "-inf"] if t.kind is float else []
    step = 1 if t.kind is int else 1e-3
    if t.values is not None:
        out += [str(max(t.values) + 1), str(min(t.values) - 1)] + [str(v) for v in range(min(t.values), max(t.values))
                                                                   if v not in t.values]
    if t.lo is not None:
        out.append(str(t.lo if t.lo_open else t.lo - step))
    if t.hi is not None:
        out.append(str(t.hi if t.hi_open else t.hi + step))
    if t.odd:
        out.append(str(int(t.lo or 1) + 1))
    return out


def _good_value(t: OptionType) -> str:
    if isinstance(t, Name):
        return "net_1"
    if isinstance(t, CsvList):
        return ",".join(t.choices[:2]) if t.choices else "a,b"
    if t.values is not None:
        return str(t.values[0])
    lo = t.lo if t.lo is not None else 0
    v = lo + (1 if t.lo_open or t.odd and lo % 2 == 0 else 0) if t.kind is int else lo + (0.5 if t.lo_open else 0)
    return str(v if t.hi is None else min(v, t.hi if not t.hi_open else (lo + t.hi) / 2))


def _checked_options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if isinstance(a.type, OptionType) and a.option_strings]


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace | None, str]:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser.parse_args(argv), err.getvalue()
    except SystemExit as e:
        assert e.code == 2, (argv, err.getvalue())
        return None, err.getvalue()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_numeric_option_has_a_range_shown_in_its_help(command):
    parser = PARSERS[command]
    plain = [a.dest for a in parser._actions if a.type in (int, float) or (
        a.type is None and isinstance(_default(a), (int, float)) and not isinstance(_default(a), bool))]
    assert not plain, f"{command}: numeric options without a declared range: {plain}"
    for a in _checked_options(parser):
        assert a.help == argparse.SUPPRESS or a.type.text in a.help, (command, a.dest)
        if _default(a) is not None and not isinstance(_default(a), str):
            a.type(_default(a))                                   # the default lies in the range


@pytest.mark.parametrize("command", COMMANDS)
def test_no_option_states_two_defaults(command):
    """A help that names its default in words gets no "(default: None)" after it."""
    parser = PARSERS[command]
    fmt = parser._get_formatter()
    for a in parser._actions:
        if a.help and a.help != argparse.SUPPRESS:
            shown = fmt._expand_help(a)                            # the text --help prints
            assert shown.count("(default:") <= 1, (command, a.dest, shown)


@pytest.mark.parametrize("command", COMMANDS)
def test_out_of_range_and_garbage_values_are_refused_by_the_parser(command, tmp_path):
    """Every checked option of the command, each bad value generated from its declared range: argparse
    refuses it (exit 2) naming the option and the range; a value inside the range is taken."""
    parser, required = PARSERS[command], REQUIRED[command](tmp_path)
    accepted, unclear = [], []
    for a in _checked_options(parser):
        opt = a.option_strings[0]
        for bad in _bad_values(a.type):
            ns, err = _parse(parser, [*required, f"{opt}={bad}"])
            if ns is not None:
                accepted.append(f"{opt}={bad!r}")
            elif f"argument {opt}" not in err or "Traceback" in err or "expects" not in err and "names" not in err \
                    and "must" not in err and "unknown" not in err:
                unclear.append(f"{opt}={bad!r}: {err.strip().splitlines()[-1]}")
        ns, err = _parse(parser, [*required, f"{opt}={_good_value(a.type)}"])
        assert ns is not None, (opt, _good_value(a.type), err)
    assert not accepted, f"{command} accepted: {accepted}"
    assert not unclear, f"{command} refused without naming the option or the range: {unclear}"


def _bad_config_values(a: argparse.Action) -> list:
    if is_flag(a):
        return ["maybe", 3, None, [True]]
    out = [{"k": 1}, [[1]]]
    if not (a.nargs in ("+", "*") or isinstance(a, argparse._AppendAction)):
        out.append([1, 2])
    if _default(a) is not None:
        out.append(None)
    if isinstance(a.type, Number):
        out += ["abc", True] + ([2.5] if a.type.kind is int else [float("nan")])
    elif a.choices is not None:
        out.append("zzz_not_a_choice")
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_config_file_values_of_the_wrong_type_are_refused_naming_the_option(command, tmp_path):
    """A list, a mapping, null, a float for an int, text for a number, a non-boolean for a flag: each is
    refused by the config reader as one clear error that names the file and the option."""
    parser = PARSERS[command]
    bad_cases = []
    for a in parser._actions:
        if a.dest in ("help", "config", "debug", "_run") or a.default is argparse.SUPPRESS:
            continue
        for value in _bad_config_values(a):
            cfg = tmp_path / "c.json"
            cfg.write_text(json.dumps({a.dest: value}))
            try:
                cli_mod._apply_config(parser, [*REQUIRED[command](tmp_path), "--config", str(cfg)])
            except UserError as e:
                if f"--{a.dest}" not in str(e) or "c.json" not in str(e):
                    bad_cases.append(f"{a.dest}={value!r}: unclear ({e})")
            except SystemExit:
                bad_cases.append(f"{a.dest}={value!r}: argparse exit (config values must be checked first)")
            else:
                bad_cases.append(f"{a.dest}={value!r}: accepted")
            finally:
                parser.set_defaults(**{a.dest: a.default})
    assert not bad_cases, f"{command}: {bad_cases}"


def test_config_file_values_in_range_are_converted_like_the_command_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\nlr: 1\nwarmup_epochs: 0\namp: 'false'\nimage_size: null\n")
    parser = cli_mod.build_parser("train")[1]["train"]
    args = cli_mod._apply_config(parser, ["--config", str(cfg), "--out_dir", str(tmp_path / "o")])
    assert (args.epochs, args.lr, args.amp, args.image_size) == (2, 1.0, False, None)
    assert isinstance(args.lr, float)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception) as e:       # noqa: B017 - --debug re-raises whatever the command raised
        cli_mod.main(["inspect", str(tmp_path / "missing.h5"), "--debug"])
    assert "missing.h5" in str(e.value)


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

    shutil.move(ck["b"], tmp_path / "elsewhere.pt")                # a checkpoint moved away cannot be checked:
    code, _, err = cli(*sim, "--out_dir", tmp_path / "s3")         # it goes on, saying so
    assert code == 0, err
    assert err.startswith("warning:") and "provenance cannot be verified" in " ".join(err.split()) and "b.pt" in err


# --------------------------------------------------------------------------- train from a config file, bad names

@pytest.mark.slow
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


@pytest.mark.parametrize("command", [["consistency", "--features", "f.h5", "--layer", "conv", "--nets", "a,b"],
                                     ["similarity", "--features", "f.h5", "--layer", "conv"]])
def test_commands_that_run_in_one_process_are_refused_under_torchrun(cli, tmp_path, monkeypatch, command):
    """Every rank would write the same folder: refused before anything is made, naming the commands that
    do run across torchrun's ranks (their Command says so)."""
    from tests.processes import flat

    for key, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(key, value)
    code, _, err = cli(*command, "--out_dir", tmp_path / "out")
    assert code == 1, err
    assert f"{command[0]} runs in one process, but this is rank 0 of a 2-process torchrun job" in flat(err)
    assert "Under torchrun: extract, fit-transnet, study" in flat(err)
    assert not (tmp_path / "out").exists()


def test_running_out_of_device_memory_says_how_to_go_on(cli, tmp_path, monkeypatch):
    """A CUDA out-of-memory error is one paragraph naming the ways out (a smaller batch, the data off the
    GPU) and --resume, not a bare RuntimeError."""
    import transnet.fit
    from tests.processes import flat

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB.\nmore lines")

    monkeypatch.setattr(transnet.fit, "fit_transnet", oom)
    code, _, err = cli("fit-transnet", "--features", "f.h5", "--source", "a", "--target", "b", "--layer", "conv",
                       "--out_dir", tmp_path / "out")
    assert code == 1
    assert ("the device ran out of memory (CUDA out of memory. Tried to allocate 20.00 GiB.). What was saved is "
            "kept: lower --batch_size") in flat(err)
    assert "--data_on ram or disk" in flat(err) and "--resume" in flat(err) and "more lines" not in err
