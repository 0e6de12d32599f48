"""A job that did not finish is not read as finished: variance, diagnose, visualize, refine and report refuse
its folder, saying how far it got and how to resume it, unless --allow_unfinished. Files that are not
what a command needs (a Trans-Net given as a net, a malformed family.json) are named with a clear error."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.analysis.test_identity import _flat, world  # noqa: F401  (the shared fitted Trans-Nets)


def _died(run: Path, dest: Path, epochs_done: int = 20) -> Path:
    """A copy of a finished fit as a kill at epoch ``epochs_done`` leaves it: last.pt and the log so far,
    no transnet.pt, no metrics.json, no end time."""
    shutil.copytree(run, dest)
    (dest / "transnet.pt").unlink()
    (dest / "metrics.json").unlink()
    log = (dest / "log.jsonl").read_text().splitlines()
    (dest / "log.jsonl").write_text("\n".join(log[:epochs_done]) + '\n{"epoch": 2')   # and a torn last line
    cfg = json.loads((dest / "config.json").read_text())
    cfg["end_utc"] = None
    cfg["provenance"]["command"] = f"cli.py fit-transnet --features F --source a --target b --out_dir {dest}"
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _refused(code: int, err: str, *needles: str) -> None:
    assert code == 1 and "Traceback" not in err, err
    for n in (*needles, "--allow_unfinished"):
        assert _flat(n) in _flat(err), (n, err)


def test_variance_diagnose_visualize_and_refine_refuse_a_fit_that_died(cli, world, tmp_path):  # noqa: F811
    dead = _died(world["root"] / "ab", tmp_path / "dead")
    resume = f"resume it with python cli.py fit-transnet --features F --source a --target b --out_dir {dead} --resume"
    code, _, err = cli("variance", "--transnet", dead, "--out_dir", tmp_path / "v")
    _refused(code, err, "stopped at epoch 20 of 60", resume)
    code, _, err = cli("variance", "--transnet", dead / "last.pt", "--out_dir", tmp_path / "v")
    _refused(code, err, "stopped at epoch 20 of 60")
    code, _, err = cli("variance", "--transnet", dead, "--out_dir", tmp_path / "v2", "--allow_unfinished")
    assert code == 0, err
    code, _, err = cli("diagnose", "--features", world["ours"], "--layer", "conv", "--a", "a", "--b", "b",
                       "--transnet_ab", dead, "--transnet_ba", world["root"] / "ba", "--panels", "0",
                       "--out_dir", tmp_path / "d")
    _refused(code, err, "stopped at epoch 20 of 60")
    code, _, err = cli("visualize", "--what", "panel", "--transnet", dead, "--out_dir", tmp_path / "p")
    _refused(code, err, "stopped at epoch 20 of 60")
    code, _, err = cli("refine", "--net_a", world["ck"]["a"], "--net_b", world["ck"]["b"], "--transnet", dead,
                       "--out_dir", tmp_path / "r")
    _refused(code, err, "stopped at epoch 20 of 60")


def test_a_bare_last_checkpoint_is_not_taken_for_a_result(cli, world, tmp_path):  # noqa: F811
    shutil.copy(world["root"] / "ab" / "last.pt", tmp_path / "last.pt")
    code, _, err = cli("variance", "--transnet", tmp_path / "last.pt", "--features", world["ours"],
                       "--out_dir", tmp_path / "v")
    _refused(code, err, "is the resumable last.pt of a job")


def test_report_and_visualize_refuse_an_unfinished_study_or_consistency_folder(cli, tmp_path):
    for name in ("study", "cons"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"config": {}, "start_utc": "2026-01-01T00:00:00Z", "end_utc": None,
                                                   "provenance": {"command": "cli.py study s.yaml --out_dir x"}}))
    (tmp_path / "cons" / "table.json").write_text(json.dumps({"rows": []}))
    code, _, err = cli("report", tmp_path / "study")
    _refused(code, err, "did not finish", "python cli.py study s.yaml --out_dir x --resume")
    code, _, err = cli("visualize", tmp_path / "cons")
    _refused(code, err, "did not finish")


def test_a_trans_net_given_as_a_net_is_named(cli, world, tmp_path):  # noqa: F811
    code, _, err = cli("extract", "--nets", f"a={world['root'] / 'ab' / 'transnet.pt'}", "--layer", "features.8",
                       "--out", tmp_path / "f.h5")
    assert code == 1 and "Traceback" not in err
    assert "is a Trans-Net checkpoint" in " ".join(err.split())


@pytest.mark.parametrize("body, needle", [
    ({"schema": "kc-family", "schema_version": 1, "members": {"a": "x.pt"}}, "'members' must be a list"),
    ({"schema": "kc-family", "schema_version": 1, "members": ["a"]}, "members[0] must be a mapping"),
    ({"schema": "kc-family", "schema_version": 1, "members": [{"name": "a", "role": "seed"}]}, "lacks 'checkpoint'"),
    ({"schema": "kc-family", "schema_version": 1, "members": [{"name": "a", "checkpoint": "a.pt", "role": "seed",
                                                               "colour": 1}]}, "unknown key(s) 'colour'"),
    ({"schema": "kc-family", "schema_version": 1, "members": [{"name": "../a", "checkpoint": "a.pt", "role": "seed"}]},
     "must not contain '/'"),
    (["not", "a", "mapping"], "is not a kc-family v1 manifest"),
])
def test_a_malformed_family_json_is_named_with_the_key(cli, tmp_path, body, needle):
    (tmp_path / "family.json").write_text(json.dumps(body))
    code, _, err = cli("extract", "--family", tmp_path, "--layer", "features.8", "--out", tmp_path / "f.h5")
    text = " ".join(err.split())
    assert code == 1 and "Traceback" not in err and needle in text and "family.json" in text, text
