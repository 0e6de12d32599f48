"""Feature extraction to HDF5: bitwise fidelity, resume after a kill, append, sharding, inspect, bad input."""
from __future__ import annotations

import errno
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.errors import UserError
from common.provenance import sha256_file
from features import store
from features.extract import KILL_EXIT_CODE, ExtractConfig, SimulatedKill, extract_features
from features.nets import build_feature_data, data_spec_for, load_net
from features.shards import shard_rows
from features.writer import FeatureWriter
from tests.fakedata import EXTRACT_BATCH as BS
from tests.fakedata import EXTRACT_ROWS as N
from tests.fakedata import tiny_checkpoint
from tests.processes import exit_status, flat, free_port, in_child, rank_env, run_cli, shared_device
from tests.tolerance import assert_features_close, feature_tolerance
from training.data import build_dataset
from training.datasets import DataSpec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    return {"a": tiny_checkpoint(d / "a.pt", seed=0), "b": tiny_checkpoint(d / "b.pt", seed=1),
            "r": tiny_checkpoint(d / "r.pt", arch="cifar_resnet20", seed=2)}


@pytest.fixture(scope="module")
def images():
    """The first N eval-transformed test and train images (the rows every extraction here sees)."""
    out = {}
    for split in ("train", "test"):
        ds = build_dataset(DataSpec(), split, train_transform=False)
        out[split] = (torch.stack([ds[i][0] for i in range(N)]), ds.labels[:N])
    return out


@torch.no_grad()
def _reference(ckpt: Path, x: torch.Tensor, fn) -> torch.Tensor:
    """A direct forward pass in batches of BS (the same batch grid as the extraction)."""
    model = load_net("ref", ckpt).model.eval()
    return torch.cat([fn(model, x[i:i + BS]) for i in range(0, len(x), BS)])


def _api(ckpts, names, out, layers=(("features.4", 4),), split="test", mode="auto", **cfg):
    nets = [load_net(n, ckpts[n]) for n in names]
    c = ExtractConfig(split=split, dtype=cfg.pop("dtype", "float32"), batch_size=BS, limit=N, **cfg)
    data = build_feature_data(data_spec_for(nets, {}), c.split.split(","), c.limit)
    return lambda **kw: extract_features(nets, data, list(layers), out, c, mode, command="test", **kw)


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda k, v: out.__setitem__(k, v[...]) if isinstance(v, h5py.Dataset) else None)
    return out


def _assert_same_files(a: Path, b: Path) -> None:
    """The same datasets, bitwise equal (within the tolerance of a CUDA extraction where one ran there)."""
    da, db = _datasets(a), _datasets(b)
    assert sorted(da) == sorted(db)
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for k in da:
            assert da[k].dtype == db[k].dtype, k
            assert_features_close(da[k], db[k], feature_tolerance(fa[k], fb[k]), k)


def _killed_extraction(ckpts, out: Path) -> None:
    """A child's extraction that ends with os._exit after 3 batches, as a kill would."""
    _api(ckpts, ["a"], out, flush_s=0.0)(stop_after=3, hard_kill=True)


# --------------------------------------------------------------------------- fidelity

def test_stored_features_equal_direct_forward_bitwise_on_the_cpu(cli, ckpts, images, tmp_path):
    """Bitwise where the extraction ran on the CPU; within 1e-5 of the largest value (fp32, TF32 off) on CUDA."""
    out = tmp_path / "f.h5"
    code, so, err = cli("extract", "--nets", f"a={ckpts['a']}", f"b={ckpts['b']}", "--conv_layer", 4,
                        "--layer", "features.1", "--logits", "--split", "train,test", "--limit", N,
                        "--batch_size", BS, "--dtype", "float32", "--out", out)
    assert code == 0, err
    assert "12 datasets" in so
    with store.open_features(out) as f:
        assert f.attrs["schema"] == "kc-features" and int(f.attrs["schema_version"]) == 1
        assert f.attrs["dataset"] == "animal-mnist" and int(f.attrs["image_size"]) == 32
        for split in ("train", "test"):
            x, labels = images[split]
            assert np.array_equal(store.read_index(f, split), np.arange(N))
            assert np.array_equal(store.read_labels(f, split), labels)
            for net in ("a", "b"):
                conv = store.get_features(f, split, net, "features.4")
                tol = feature_tolerance(conv)
                assert conv.chunks == (1, 32, 16, 16) and conv.compression is None and conv.dtype == np.float32
                assert_features_close(conv[...], _reference(ckpts[net], x, lambda m, v: m.features[:5](v)), tol)
                # features.1 (BN) is followed by an in-place ReLU in the net: the stored values keep their sign.
                bn = store.get_features(f, split, net, "features.1")[...]
                assert (bn < 0).any()
                assert_features_close(bn, _reference(ckpts[net], x, lambda m, v: m.features[:2](v)), tol)
                assert_features_close(store.get_logits(f, split, net)[...],
                                      _reference(ckpts[net], x, lambda m, v: m(v)), tol)
                a = store.attrs_dict(conv)
                assert a["checkpoint"] == str(ckpts[net].resolve())
                assert a["checkpoint_sha256"] == sha256_file(ckpts[net])
                assert (a["arch"], a["layer"], a["conv_layer"], a["point"], a["complete"], a["rows_done"]) == \
                    ("vgg_tiny", "features.4", 4, "output", True, N)
                assert a["transform"]["image_size"] == 32 and a["code_version"] and "extract" in a["command"]


def test_fx_sum_before_relu_point_is_extracted(cli, ckpts, images, tmp_path):
    out = tmp_path / "r.h5"
    code, _, err = cli("extract", "--nets", f"r={ckpts['r']}", "--layer", "layer3.-1.add", "--split", "test",
                       "--limit", N, "--batch_size", BS, "--dtype", "float32", "--out", out)
    assert code == 0, err

    def manual(m, v):
        h = m.layer2(m.layer1(m.relu(m.bn1(m.conv1(v)))))
        h = m.layer3[1](m.layer3[0](h))
        b = m.layer3[2]
        return b.bn2(b.conv2(b.relu(b.bn1(b.conv1(h))))) + h

    with store.open_features(out) as f:
        ds = store.get_features(f, "test", "r", "layer3.-1.add")
        assert (ds.attrs["node"], ds.attrs["point"]) == ("layer3.2.add", "fx:add")
        assert_features_close(ds[...], _reference(ckpts["r"], images["test"][0], manual), feature_tolerance(ds))


# --------------------------------------------------------------------------- interruption and resume

def test_resume_after_simulated_kill_equals_uninterrupted_run(cli, ckpts, tmp_path):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    _api(ckpts, ["a", "b"], full, dtype="float16")()
    run = _api(ckpts, ["a", "b"], part, dtype="float16")
    with pytest.raises(SimulatedKill):
        run(stop_after=2)
    with store.open_features(part) as f:           # readable, marked incomplete, progress recorded
        ds = f["test/a/features.4"]
        assert not ds.attrs["complete"] and int(ds.attrs["rows_done"]) == 2 * BS
        with pytest.raises(store.FeatureFileError, match="incomplete"):
            store.get_features(f, "test", "a", "features.4")
    argv = ["extract", "--nets", f"a={ckpts['a']}", f"b={ckpts['b']}", "--conv_layer", 4, "--split", "test",
            "--limit", N, "--batch_size", BS, "--out", part]
    code, _, err = cli(*argv)
    assert code == 1 and "--resume" in err and "incomplete, 8 of 20 rows" in flat(err)
    code, _, err = cli(*argv, "--resume")
    assert code == 0, err
    _assert_same_files(full, part)


@pytest.mark.xdist_group("subprocess")
def test_killed_process_leaves_readable_file_and_resume_completes(ckpts, tmp_path):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    _api(ckpts, ["a"], full)()
    # The child ends with os._exit in the middle of the pass (the writer thread may be mid-write, the
    # file is never closed), as a kill would.
    child = in_child(_killed_extraction, ckpts, part)
    assert exit_status(child) == KILL_EXIT_CODE
    with store.open_features(part) as f:           # the file of a killed process opens, incomplete
        ds = f["test/a/features.4"]
        assert not ds.attrs["complete"] and 0 <= int(ds.attrs["rows_done"]) <= 3 * BS
    _api(ckpts, ["a"], part, mode="resume")()
    _assert_same_files(full, part)


def test_full_disk_leaves_readable_incomplete_file(ckpts, tmp_path, monkeypatch):
    out = tmp_path / "f.h5"
    real_write, calls = FeatureWriter._write, []

    def failing_write(self, b):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, b)

    monkeypatch.setattr(FeatureWriter, "_write", failing_write)
    with pytest.raises(UserError, match="readable and marked incomplete.*--resume"):
        _api(ckpts, ["a"], out)()
    monkeypatch.setattr(FeatureWriter, "_write", real_write)
    with store.open_features(out) as f:
        ds = f["test/a/features.4"]
        assert not ds.attrs["complete"] and int(ds.attrs["rows_done"]) == 2 * BS
    _api(ckpts, ["a"], out, mode="resume")()
    ref = tmp_path / "ref.h5"
    _api(ckpts, ["a"], ref)()
    _assert_same_files(ref, out)


def test_resume_with_another_checkpoint_is_refused_naming_the_field(cli, ckpts, tmp_path):
    out = tmp_path / "f.h5"
    _api(ckpts, ["a"], out)()
    code, _, err = cli("extract", "--nets", f"a={ckpts['b']}", "--conv_layer", 4, "--split", "test", "--limit", N,
                       "--batch_size", BS, "--dtype", "float32", "--out", out, "--resume")
    assert code == 1 and "checkpoint_sha256" in flat(err) and "--overwrite" in err
    code, _, err = cli("extract", "--nets", f"a={ckpts['a']}", "--conv_layer", 4, "--split", "test", "--limit", N,
                       "--batch_size", BS, "--dtype", "float16", "--out", out, "--resume")
    assert code == 1 and "dtype" in err


def test_append_adds_nets_and_layers_without_reextracting(cli, ckpts, images, tmp_path):
    out = tmp_path / "f.h5"
    _api(ckpts, ["a"], out)()
    with h5py.File(out, "a") as f:                 # a sentinel that a re-extraction would overwrite
        f["test/a/features.4"][0, 0, 0, 0] = 12345.0
    base = ["--split", "test", "--limit", N, "--batch_size", BS, "--dtype", "float32", "--out", out]
    code, _, err = cli("extract", "--nets", f"b={ckpts['b']}", "--conv_layer", 4, *base)      # a new net
    assert code == 0, err
    code, so, err = cli("extract", "--nets", f"a={ckpts['a']}", f"b={ckpts['b']}", "--conv_layer", 4,
                        "--conv_layer", 8, *base, "--resume")                                # a new layer
    assert code == 0, err
    assert "2 already complete" in so
    with store.open_features(out) as f:
        assert f["test/a/features.4"][0, 0, 0, 0] == 12345.0
        assert store.list_nets(f, "test") == ["a", "b"]
        assert store.list_layers(f, "test", "b") == ["features.4", "features.8"]
        x = images["test"][0]
        ds = store.get_features(f, "test", "b", "features.8")
        assert_features_close(ds[...], _reference(ckpts["b"], x, lambda m, v: m.features[:9](v)), feature_tolerance(ds))


def test_existing_output_is_refused_unless_resume_or_overwrite(cli, ckpts, tmp_path):
    out = tmp_path / "f.h5"
    argv = ["extract", "--nets", f"a={ckpts['a']}", "--conv_layer", 4, "--split", "test", "--limit", N,
            "--batch_size", BS, "--out", out]
    assert cli(*argv)[0] == 0
    code, _, err = cli(*argv)
    assert code == 1 and "already holds /test/a/features.4 (complete)" in flat(err) and "--overwrite" in err
    with h5py.File(out, "a") as f:
        f["test/a/features.4"][0, 0, 0, 0] = 12345.0
    code, _, err = cli(*argv, "--overwrite")
    assert code == 0, err
    with store.open_features(out) as f:
        assert f["test/a/features.4"][0, 0, 0, 0] != 12345.0


# --------------------------------------------------------------------------- sharding

def test_shard_rows_tile_the_split_on_the_batch_grid():
    for n, bs, world in [(20, 4, 2), (21, 4, 3), (5, 4, 3), (1000, 64, 7), (3, 8, 2)]:
        bounds = [shard_rows(n, bs, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(world - 1))   # contiguous, no overlap
        assert all(lo % bs == 0 and lo <= hi for lo, hi in bounds)


@pytest.mark.xdist_group("subprocess")
@pytest.mark.slow
def test_two_process_sharded_extraction_equals_single_process(ckpts, tmp_path):
    single, sharded = tmp_path / "single.h5", tmp_path / "sharded.h5"
    _api(ckpts, ["a", "b"], single, split="train,test", logits=True, device=shared_device())()
    # Two processes with torchrun's environment and the gloo backend (forked where CUDA is untouched, to
    # skip the start-up cost of `torchrun --nproc_per_node=2 cli.py extract ...`, which runs the same code).
    argv = ["extract", "--nets", f"a={ckpts['a']}", f"b={ckpts['b']}", "--conv_layer", "4", "--logits",
            "--split", "train,test", "--limit", str(N), "--batch_size", str(BS), "--dtype", "float32",
            "--device", shared_device(), "--out", str(sharded)]
    port = free_port()
    import cli as cli_mod

    cli_mod.build_parser()                      # import every command module once, before forking
    children = [in_child(run_cli, argv, env=rank_env(r, 2, port)) for r in range(2)]
    assert [exit_status(c) for c in children] == [0, 0]
    assert sorted(p.name for p in tmp_path.glob("sharded*")) == ["sharded.h5", "sharded.rank0of2.h5",
                                                                "sharded.rank1of2.h5"]
    _assert_same_files(single, sharded)
    with store.open_features(sharded) as f:      # readers see the same data through the contract API
        ds = store.get_features(f, "test", "b", "features.4")
        assert ds.is_virtual and ds.attrs["complete"] and int(ds.attrs["rows_done"]) == N
        with store.open_features(single) as g:
            one = store.get_features(g, "test", "b", "features.4")
            assert_features_close(ds[...], one[...], feature_tolerance(ds, one))
    (tmp_path / "sharded.rank1of2.h5").rename(tmp_path / "moved.h5")
    with store.open_features(sharded) as f:
        with pytest.raises(store.FeatureFileError, match="sharded.rank1of2.h5 is missing"):
            store.get_features(f, "test", "b", "features.4")


# --------------------------------------------------------------------------- inspect

def test_inspect_prints_contents_and_verify_detects_tampering(cli, ckpts, tmp_path):
    out = tmp_path / "f.h5"
    _api(ckpts, ["a"], out, dtype="float16", logits=True)()
    code, so, _ = cli("inspect", out)
    assert code == 0
    assert "split test: 20 rows" in so and "arch vgg_tiny" in so
    assert "features.4" in so and "32x16x16" in so and "float16" in so and "complete" in so
    code, so, _ = cli("inspect", out, "--json", "--verify")
    assert code == 0
    import json

    desc = json.loads(so)
    assert desc["splits"]["test"]["nets"]["a"]["logits"]["dtype"] == "float32"
    assert {r["status"] for r in desc["verify"]} == {"ok"} and len(desc["verify"]) == 2
    assert {r["status"] for r in desc["recount"]} == {"ok"} and len(desc["recount"]) == 2
    with h5py.File(out, "a") as f:
        f["test/a/features.4"][:] = f["test/a/features.4"][...] * 1.1
    code, so, err = cli("inspect", out, "--verify")
    assert code == 1 and "MISMATCH test/a/features.4" in so and "OK       test/a/logits" in so
    with h5py.File(out, "a") as f:
        f["test/a/logits"].attrs["checkpoint_sha256"] = "0" * 64
    code, so, err = cli("inspect", out, "--verify")
    assert code == 1 and "the feature file recorded 000000000000...; the checkpoint changed since then" in flat(so + err)


# --------------------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def odd_ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    return {"five": tiny_checkpoint(d / "five.pt", num_classes=5),
            "seed1": tiny_checkpoint(d / "s1.pt", data=DataSpec(split_seed=1))}


@pytest.mark.parametrize("args, message", [
    (["--nets", "a={a}", "--conv_layer", "40"], "out of range"),
    (["--nets", "a={a}", "--layer", "features.44"], "nearest valid paths: features.4"),
    (["--nets", "r={r}", "--conv_layer", "4"], "no 'features' Sequential"),
    (["--nets", "x/y={a}", "--conv_layer", "4"], "no '/'"),
    (["--nets", "a={a}", "a={b}", "--conv_layer", "4"], "given twice"),
    (["--nets", "five={five}", "--conv_layer", "4"], "trained on 5 classes"),
    (["--nets", "a={a}", "--conv_layer", "4", "--image_size", "40"], "trained on 32 px inputs"),
    (["--nets", "a={a}", "s={seed1}", "--conv_layer", "4"], "disagree on the data set.*split_seed"),
    (["--nets", "a={a}", "--conv_layer", "4", "--split", "tset"], "--split: 'tset': unknown 'tset'; valid: train, val, test"),
    (["--nets", "a={missing}", "--conv_layer", "4"], "does not exist"),
    (["--nets", "a={a}"], "no layers requested"),
])
def test_bad_input_is_refused_with_a_clear_message(cli, ckpts, odd_ckpts, tmp_path, capsys, args, message):
    paths = {**{k: str(v) for k, v in ckpts.items()}, **{k: str(v) for k, v in odd_ckpts.items()},
             "missing": str(tmp_path / "nope.pt")}
    argv = [a.format(**paths) for a in args]
    try:
        code, _, err = cli("extract", *argv, "--limit", 4, "--out", tmp_path / "f.h5")
    except SystemExit as e:                  # refused by the option's own type (unknown split): usage + error
        code, err = (1 if e.code == 2 else e.code), capsys.readouterr().err
    assert code == 1
    import re

    assert re.search(message, flat(err)), err
    assert not (tmp_path / "f.h5").exists()


def test_family_manifest_members_are_extracted_and_checked(cli, ckpts, tmp_path):
    from training.manifest import Member, write_manifest

    fam = tmp_path / "fam"
    fam.mkdir()
    write_manifest(fam, "seeds", [Member("s0", str(ckpts["a"]), "seed"), Member("s1", str(ckpts["b"]), "seed")])
    out = tmp_path / "f.h5"
    code, _, err = cli("extract", "--family", fam / "family.json", "--conv_layer", 4, "--split", "test",
                       "--limit", 8, "--batch_size", BS, "--out", out)
    assert code == 0, err
    with store.open_features(out) as f:
        assert store.list_nets(f, "test") == ["s0", "s1"]
    write_manifest(fam, "seeds", [Member("s0", str(ckpts["a"]), "seed", sha256="0" * 64)])
    code, _, err = cli("extract", "--family", fam, "--conv_layer", 4, "--split", "test", "--limit", 8,
                       "--out", tmp_path / "g.h5")
    assert code == 1 and "the family manifest recorded 000000000000...; the checkpoint changed since then" in flat(err)
