"""Nets are matched by checkpoint sha256, not by name: a Trans-Net is applied only to features of the
checkpoints it was fitted on (variance, diagnose, the decomposition panel), ``variance --target`` must
name the fitted target, and ``consistency --family`` refuses a feature file whose nets of the members'
names came from other checkpoints. ``--allow_other_checkpoints`` goes on anyway."""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import h5py
import pytest

from common.provenance import sha256_file
from tests.fakedata import FAST_FIT, FAST_FIT_ARGS, planted_features
from training.manifest import Member, write_manifest
from transnet.fit import fit_transnet


def _stamp(path: Path, ckpts: dict[str, Path]) -> Path:
    """Record each net's checkpoint path and sha256 on its datasets, as extract does."""
    with h5py.File(path, "a") as f:
        for split in ("train", "test"):
            for net, ck in ckpts.items():
                ds = f[split][net]["conv"]
                ds.attrs["checkpoint"] = str(ck)
                ds.attrs["checkpoint_sha256"] = sha256_file(ck)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    ck = {}
    for name in ("a", "b", "c", "d", "other"):
        ck[name] = root / f"{name}.pt"
        ck[name].write_bytes(f"checkpoint of {name}".encode())
    ours = _stamp(planted_features(root / "ours.h5"), {n: ck[n] for n in "abcd"})
    theirs = root / "theirs.h5"                          # same names, same values, b from another checkpoint
    shutil.copy(ours, theirs)
    _stamp(theirs, {"a": ck["a"], "b": ck["other"], "c": ck["c"], "d": ck["d"]})
    fit = replace(FAST_FIT, features=str(ours), layer="conv")
    fit_transnet(replace(fit, source="a", target="b"), root / "ab")
    fit_transnet(replace(fit, source="b", target="a"), root / "ba")
    return {"root": root, "ck": ck, "ours": ours, "theirs": theirs}


def _flat(text: str) -> str:
    return "".join(text.split())                         # the CLI wraps lines, also inside long paths


def _refused(code: int, err: str, needle: str) -> None:
    assert code == 1 and "Traceback" not in err, err
    assert _flat(needle) in _flat(err) and "--allow_other_checkpoints" in err, err


def test_variance_on_features_of_other_checkpoints_is_refused_unless_allowed(cli, world, tmp_path):
    ab = world["root"] / "ab"
    code, _, err = cli("variance", "--transnet", ab, "--features", world["theirs"], "--out_dir", tmp_path / "v1")
    _refused(code, err, f"'b' comes from {world['ck']['other']}")
    code, _, err = cli("variance", "--transnet", ab, "--features", world["theirs"], "--out_dir", tmp_path / "v2",
                       "--allow_other_checkpoints")
    assert code == 0, err
    code, _, err = cli("variance", "--transnet", ab, "--out_dir", tmp_path / "v3")   # its own features: fine
    assert code == 0, err


def test_variance_target_other_than_the_fitted_target_is_refused(cli, world, tmp_path):
    code, _, err = cli("variance", "--transnet", world["root"] / "ab", "--target", "c", "--out_dir", tmp_path / "v")
    _refused(code, err, "the target features")
    assert _flat("'c' comes from") in _flat(err)


def test_diagnose_and_the_panel_refuse_another_pairs_features(cli, world, tmp_path):
    r = world["root"]
    code, _, err = cli("diagnose", "--features", world["theirs"], "--layer", "conv", "--a", "a", "--b", "b",
                       "--transnet_ab", r / "ab", "--transnet_ba", r / "ba", "--panels", "0", "--out_dir", tmp_path / "d")
    _refused(code, err, "maps a -> b")
    assert not (tmp_path / "d").exists()
    code, _, err = cli("visualize", "--what", "panel", "--transnet", r / "ab", "--features", world["theirs"],
                       "--out_dir", tmp_path / "p")
    _refused(code, err, "'b' comes from")
    code, _, err = cli("visualize", "--what", "panel", "--transnet", r / "ab", "--out_dir", tmp_path / "p2")
    assert code == 0, err


def test_consistency_family_against_features_of_other_checkpoints_is_refused(cli, world, tmp_path):
    ck = world["ck"]
    fam = tmp_path / "fam"
    fam.mkdir()
    write_manifest(fam, "seeds", [Member("a", str(ck["a"]), "seed"), Member("b", str(ck["other"]), "seed")])
    argv = ["consistency", "--features", world["ours"], "--layer", "conv", "--family", fam, "--pairs", "a>b",
            *FAST_FIT_ARGS, "--no_figures"]
    code, _, err = cli(*argv, "--out_dir", tmp_path / "c1")
    _refused(code, err, "family")
    assert _flat(f"not from {ck['other']}") in _flat(err)
    code, _, err = cli(*argv[:2], world["theirs"], *argv[3:], "--out_dir", tmp_path / "c2")  # its own nets: fine
    assert code == 0, err
