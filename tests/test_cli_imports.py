"""Arguments are checked before the heavy libraries are imported: building a command's parser, its
``--help`` and refusing a bad option (unknown option, bad choice, a value out of its range, a missing
required option) import neither torch nor the other libraries a command only needs to run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cli

ROOT = Path(__file__).resolve().parent.parent
# What no parser may import. numpy is light enough (~0.1 s) to stay allowed.
HEAVY = ("torch", "torchvision", "timm", "h5py", "matplotlib", "scipy", "safetensors", "sklearn", "PIL")

# For each command, argument lists that argparse itself must refuse (exit code 2): an unknown option
# for every command, plus a bad choice, a value out of its range or a missing required option where
# the command has one.
BAD_ARGS: dict[str, list[list[str]]] = {cmd: [["--bogus_option"]] for names in cli.COMMAND_MODULES.values()
                                        for cmd in names}
BAD_ARGS["train"] += [["--out_dir", "x", "--optimizer", "nope"], ["--out_dir", "x", "--lr", "-1"],
                      ["--out_dir", "x", "--transform", "nope"], ["--lr", "0.1"]]
BAD_ARGS["fit-transnet"] += [["--out_dir", "x", "--input_norm", "nope"], ["--out_dir", "x", "--kernel", "2"],
                             ["--out_dir", "x", "--epochs", "many"], ["--out_dir", "x", "--spatial", "nope"]]
BAD_ARGS["extract"] += [["--out", "f.h5", "--split", "nope"], ["--out", "f.h5", "--dtype", "int3"], []]
BAD_ARGS["similarity"] += [["--features", "f.h5", "--layer", "x", "--out_dir", "d", "--cka_form", "nope"]]
BAD_ARGS["consistency"] += [["--out_dir", "d", "--schedule", "nope"]]
BAD_ARGS["compress"] += [["--out_dir", "d", "--prune_scope", "nope"]]
BAD_ARGS["evolve"] += [["--out_dir", "d", "--split_rate", "2"]]
BAD_ARGS["visualize"] += [["--what", "nope"]]
BAD_ARGS["variance"] += [["--transnet", "t", "--data_on", "nope"]]
BAD_ARGS["import-features"] += [["--net", "a=x.npy", "--out", "f.h5", "--tokens", "nope"]]

# Commands whose parser still imports a heavy library, each with the reason: they are checked for their
# exit codes only, in an interpreter of their own, and the test fails once one of them no longer needs
# its entry (delete it then). ``consistency`` builds its options from ConsistencyConfig, which lives in
# analysis/consistency.py, left there while other branches edit that module; it moves (with PAIR_PLANS and
# PER_PAIR) to analysis/config.py next. The overall --help builds every parser and so waits for it too.
PENDING: dict[str, str] = {}     # command -> why its parser still imports a heavy library (none left)

_PROBE = r"""
import contextlib, io, json, sys
import cli
heavy, bad = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = []
def loaded():
    return sorted(m for m in heavy if m in sys.modules)
def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    out.append({"argv": argv, "code": code, "heavy": loaded(), "stderr": err.getvalue()[-300:]})
for cmd, lists in bad.items():
    run([cmd, "--help"])
    for argv in lists:
        run([cmd] + argv)
if sys.argv[3] == "all":
    run(["--help"])
print(json.dumps(out))
"""


def _probe(bad: dict[str, list[list[str]]], overall_help: bool) -> list[dict]:
    res = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(HEAVY), json.dumps(bad),
                          "all" if overall_help else "commands"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = json.loads(res.stdout)
    assert len(runs) == sum(len(v) + 1 for v in bad.values()) + overall_help
    for r in runs:
        want = 0 if "--help" in r["argv"] else 2
        assert r["code"] == want, f"cli.py {' '.join(r['argv'])} exited {r['code']}, not {want}: {r['stderr']}"
    return runs


def test_parsers_help_and_bad_arguments_import_no_heavy_library():
    """One fresh interpreter runs every command's --help and bad argument lists in turn (the overall
    --help last); the first one that imports a heavy library is named (the later ones inherit it)."""
    runs = _probe({c: v for c, v in BAD_ARGS.items() if c not in PENDING}, overall_help=not PENDING)
    for r in runs:
        assert not r["heavy"], f"cli.py {' '.join(r['argv'])} imported {', '.join(r['heavy'])} before running"


def test_pending_commands_refuse_bad_arguments_and_still_need_their_entry():
    assert set(PENDING) <= set(BAD_ARGS), f"unknown command in PENDING: {sorted(set(PENDING) - set(BAD_ARGS))}"
    for cmd in PENDING:
        runs = _probe({cmd: BAD_ARGS[cmd]}, overall_help=False)
        assert any(r["heavy"] for r in runs), f"{cmd}'s parser imports no heavy library now: delete it from PENDING"
    if PENDING:
        _probe({}, overall_help=True)


def test_a_refused_argument_names_the_option():
    res = subprocess.run([sys.executable, "cli.py", "fit-transnet", "--out_dir", "x", "--input_norm", "nope"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--input_norm" in res.stderr and "instance" in res.stderr, res.stderr
