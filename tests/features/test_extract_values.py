"""Non-finite features at extraction: float16 overflow refused, NaN/inf of float32 layers counted (attribute,
inspect, warning), counts kept across kill-and-resume and summed over torchrun shards; the pure checks
against numpy."""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.checkpoints import load_checkpoint, save_checkpoint
from common.errors import UserError
from features import store
from features.extract import KILL_EXIT_CODE, ExtractConfig, SimulatedKill, extract_features
from features.nets import build_feature_data, data_spec_for, load_net
from features.nonfinite import (
    FLOAT16_MAX,
    NonFiniteFeaturesWarning,
    ValueCounts,
    batch_counts,
    check_storable,
    count_array,
    range_is_clean,
    value_range,
)
from tests.fakedata import EXTRACT_BATCH as BS
from tests.fakedata import EXTRACT_ROWS as N
from tests.fakedata import tiny_checkpoint
from tests.processes import exit_status, flat, free_port, in_child, rank_env, run_cli, shared_device
from tests.tolerance import assert_features_close, feature_tolerance, values_close
from training.data import build_dataset
from training.datasets import DataSpec

LAYERS = {"features.1": 2, "features.4": 5}        # layer -> length of the `features` prefix that computes it


def _edit(path: Path, fn) -> Path:
    c = load_checkpoint(path)
    with torch.no_grad():
        fn(c["state_dict"])
    save_checkpoint(path, c)
    return path


def _wild(sd) -> None:
    """Channel 0 of the first BN scaled by 1e38: +-inf where |conv output| > 3.4 (data-dependent), NaN
    (inf - inf) and inf further on."""
    sd["features.0.weight"][0] *= 10
    sd["features.1.weight"][0] = 1e36
    sd["features.1.running_var"][0] = 1e-4 - 1e-5          # var + eps = 1e-4: scale 1e38, finite
    sd["features.1.running_mean"][0] = 0.0
    sd["features.1.bias"][0] = 0.0


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    big = _edit(tiny_checkpoint(d / "big.pt", seed=3), lambda sd: sd["features.0.weight"].mul_(3e4))   # finite, > 65504
    return {"a": tiny_checkpoint(d / "a.pt", seed=0), "big": big,
            "wild": _edit(tiny_checkpoint(d / "wild.pt", seed=4), _wild)}


@pytest.fixture(scope="module")
def reference(ckpts):
    """Direct float32 forward passes on the batch grid: {(net, split, layer): (N, C, H, W) array}."""
    out = {}
    for split in ("train", "test"):
        ds = build_dataset(DataSpec(), split, train_transform=False)
        x = torch.stack([ds[i][0] for i in range(N)])
        for net, path in ckpts.items():
            model = load_net("ref", path).model.eval()
            with torch.no_grad():
                for layer, k in LAYERS.items():
                    out[net, split, layer] = torch.cat([model.features[:k](x[i:i + BS])
                                                        for i in range(0, N, BS)]).numpy()
    return out


def _run(ckpts, names, out, dtype="float32", split="test", mode="auto", batch_size=BS, device="auto", **kw):
    nets = [load_net(n, ckpts[n]) for n in names]
    cfg = ExtractConfig(split=split, dtype=dtype, batch_size=batch_size, limit=N, device=device)
    data = build_feature_data(data_spec_for(nets, {}), split.split(","), N)
    return extract_features(nets, data, [(layer, None) for layer in LAYERS], out, cfg, mode, command="test", **kw)


def _count(a: np.ndarray) -> int:
    return int(np.count_nonzero(~np.isfinite(a)))


def _counts(path: Path) -> dict[str, tuple[int, float]]:
    with h5py.File(path, "r") as f:
        found = {}
        f.visititems(lambda k, v: found.__setitem__(k, (int(v.attrs["nonfinite"]), float(v.attrs["max_abs"])))
                     if isinstance(v, h5py.Dataset) and "nonfinite" in v.attrs else None)
    return found


def _tolerance(*paths: Path) -> float:
    """The comparison tolerance of the feature files' datasets (0: all computed on the CPU, bitwise)."""
    tol = 0.0
    for p in paths:
        with h5py.File(p, "r") as f:
            found: list[float] = []
            f.visititems(lambda k, v, found=found: found.append(feature_tolerance(v))
                         if isinstance(v, h5py.Dataset) else None)
            tol = max([tol, *found])
    return tol


def _same_counts(a: dict[str, tuple[int, float]], b: dict[str, tuple[int, float]], tol: float) -> bool:
    """Equal non-finite counts and largest magnitudes; where CUDA computed them (``tol`` > 0): the same
    datasets hold non-finite values, and finite ones agree in their largest magnitude within ``tol``.
    (cuDNN may pick Winograd or FFT kernels, which spread an inf over a tile of outputs, and picks per
    batch shape and process: where an inf lands is device- and kernel-dependent, that it lands is not.)"""
    if tol == 0.0:
        return a == b
    return a.keys() == b.keys() and all((a[k][0] > 0) == (b[k][0] > 0) and
                                        (a[k][0] > 0 or values_close(a[k][1], b[k][1], tol)) for k in a)


def _counts_describe_the_stored_rows(path: Path) -> None:
    """Every dataset's ``nonfinite`` / ``max_abs`` attributes count exactly its stored rows (any device)."""
    with h5py.File(path, "r") as f:
        for k, (n, m) in _counts(path).items():
            ds = f[k]
            a = ds[:ds.shape[0] if bool(ds.attrs["complete"]) else int(ds.attrs["rows_done"])]
            fin = a[np.isfinite(a)]
            assert n == _count(a) and m == (float(np.abs(fin).max()) if fin.size else 0.0), k


def _killed_extraction(ckpts, out: Path) -> None:
    """A child's extraction of the wild net that ends with os._exit after 3 batches, as a kill would."""
    _run(ckpts, ["wild"], out, stop_after=3, hard_kill=True)


# --------------------------------------------------------------------------- float16 overflow

def test_float16_overflow_is_refused_naming_net_layer_split_count_and_float32(cli, ckpts, reference, tmp_path):
    out = tmp_path / "f.h5"
    argv = ["extract", "--nets", f"a={ckpts['a']}", f"big={ckpts['big']}", "--layer", "features.1", "--split",
            "test", "--limit", N, "--batch_size", BS, "--out", out]
    code, _, err = cli(*argv)                               # float16 is the default
    ref = reference["big", "test", "features.1"][:BS]       # the first batch, where the extraction stops
    with np.errstate(over="ignore"):
        n_over = int(np.count_nonzero(np.isinf(ref.astype(np.float16))))
    assert np.isfinite(ref).all() and n_over > 0
    msg = flat(err)
    assert code == 1 and "Traceback" not in err
    assert "net 'big', layer 'features.1', split 'test'" in msg and f"rows 0-{BS - 1}" in msg
    assert "--dtype float32" in msg
    with store.open_features(out) as f:
        tol = feature_tolerance(f["test/big/features.1"])
    over = int(re.search(r"(\d+) values exceed the float16 range", msg).group(1))
    # on CUDA a value within 1e-5 of the float16 limit may round to either side of it
    assert over == n_over if tol == 0.0 else abs(over - n_over) <= max(1, n_over // 100)
    largest = float(re.search(r"largest magnitude (\S+) > 65504", msg).group(1))
    if tol == 0.0:                                          # the CPU's numbers: the same to the digit
        assert f"largest magnitude {float(np.abs(ref).max()):.6g} > 65504" in msg
    assert values_close(largest, float(np.abs(ref).max()), max(tol, 5e-6))     # printed to 6 digits
    with store.open_features(out) as f:                     # nothing looks complete
        for net in ("a", "big"):
            ds = f[f"test/{net}/features.1"]
            assert not ds.attrs["complete"] and int(ds.attrs["rows_done"]) == 0
        with pytest.raises(store.FeatureFileError, match="incomplete"):
            store.get_features(f, "test", "big", "features.1")
    code, so, _ = cli("inspect", out)
    assert code == 0 and so.count("INCOMPLETE") == 2

    code, _, err = cli(*argv, "--dtype", "float32", "--overwrite")
    assert code == 0, err
    with store.open_features(out) as f:
        ds = store.get_features(f, "test", "big", "features.1")
        tol = feature_tolerance(ds)
        assert_features_close(ds[...], reference["big", "test", "features.1"], tol)
        full = reference["big", "test", "features.1"]
        assert int(ds.attrs["nonfinite"]) == 0 and float(np.abs(full).max()) > 65504
        assert values_close(float(ds.attrs["max_abs"]), float(np.abs(full).max()), tol)


def test_values_that_round_to_65504_are_stored_and_65520_is_refused():
    x = torch.tensor([[1.0, -65519.0]])                     # rounds to -65504 in float16: storable
    lo, hi = value_range(x).tolist()
    assert not range_is_clean(lo, hi, "float16") and range_is_clean(lo, hi, "float32")
    counts = batch_counts(lo, hi, x.half().numpy(), "float16")
    assert counts == ValueCounts(0, 65504.0)
    check_storable("test/n/l", (0, 1), lo, hi, counts, "float16", "f.h5")
    y = torch.tensor([[1.0, 65520.0, 7e4]])
    lo, hi = value_range(y).tolist()
    counts = batch_counts(lo, hi, y.half().numpy(), "float16")
    assert counts.nonfinite == 2
    with pytest.raises(UserError, match=r"net 'n', layer 'l\.x', split 'test', rows 4-4: 2 values exceed.*70000"):
        check_storable("test/n/l.x", (4, 5), lo, hi, counts, "float16", "f.h5")


# --------------------------------------------------------------------------- NaN/inf of float32 layers

def test_float32_nonfinite_is_counted_per_dataset_warned_and_shown_by_inspect(cli, ckpts, reference, tmp_path):
    out = tmp_path / "f.h5"
    code, _, err = cli("extract", "--nets", f"a={ckpts['a']}", f"wild={ckpts['wild']}", "--layer", "features.1",
                       "--layer", "features.4", "--split", "train,test", "--limit", N, "--batch_size", BS,
                       "--dtype", "float32", "--out", out)
    assert code == 0, err
    counts, tol = _counts(out), _tolerance(out)
    assert len(counts) == 8
    for split in ("train", "test"):
        for layer in LAYERS:
            ref = reference["wild", split, layer]
            with store.open_features(out) as f:
                stored = f[f"{split}/wild/{layer}"][...]
            assert_features_close(stored, ref, tol, f"{split}/wild/{layer}", nonfinite_may_spread=True)
            want = _count(ref)
            assert want > 0 and _same_counts({0: counts[f"{split}/wild/{layer}"]},
                                             {0: (want, float(np.abs(ref[np.isfinite(ref)]).max()))}, tol)
            assert _same_counts({0: counts[f"{split}/a/{layer}"]},
                                {0: (0, float(np.abs(reference["a", split, layer]).max()))}, tol)
    _counts_describe_the_stored_rows(out)
    n1 = counts["test/wild/features.1"][0]                  # = the reference's count on the CPU (bitwise above)
    msg = flat(err)
    assert msg.startswith("warning:") and f"net 'wild', layer 'features.1', split 'test': {n1} non-finite" in msg
    assert "net 'a'" not in msg
    code, so, _ = cli("inspect", out)
    assert code == 0
    line = next(s for s in so.splitlines() if "features.1" in s and "NON-FINITE" in s)
    assert f"{n1} NON-FINITE values" in line
    assert len(re.findall("all finite", so)) == 4
    code, so, _ = cli("inspect", out, "--json")
    desc = json.loads(so)
    assert desc["splits"]["test"]["nets"]["wild"]["features.1"]["nonfinite"] == n1
    assert desc["splits"]["test"]["nets"]["a"]["features.4"]["nonfinite"] == 0


def test_api_warns_and_returns_the_counts(ckpts, reference, tmp_path):
    with pytest.warns(NonFiniteFeaturesWarning, match="net 'wild', layer 'features.4'"):
        res = _run(ckpts, ["a", "wild"], tmp_path / "f.h5")
    stored = _counts(tmp_path / "f.h5")
    assert res.nonfinite["test/wild/features.4"] == stored["test/wild/features.4"][0] > 0
    if _tolerance(tmp_path / "f.h5") == 0.0:                 # the CPU: the reference's count (see _same_counts)
        assert stored["test/wild/features.4"][0] == _count(reference["wild", "test", "features.4"])
    assert res.nonfinite["test/a/features.1"] == 0


# --------------------------------------------------------------------------- resume and shards

def test_counts_survive_a_kill_and_a_resume_with_another_batch_size(ckpts, tmp_path):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    with pytest.warns(NonFiniteFeaturesWarning):
        _run(ckpts, ["a", "wild"], full)
    with pytest.raises(SimulatedKill):
        _run(ckpts, ["a", "wild"], part, stop_after=2)
    with h5py.File(part, "r") as f:                          # the counts cover exactly the rows done
        for path, (n, _m) in _counts(part).items():
            done = int(f[path].attrs["rows_done"])
            assert done == 2 * BS and n == _count(f[path][:done])
    with pytest.warns(NonFiniteFeaturesWarning):             # resume inside a batch: rows 8.. with batches of 3
        _run(ckpts, ["a", "wild"], part, mode="resume", batch_size=3)
    _counts_describe_the_stored_rows(part)
    assert _same_counts(_counts(part), _counts(full), _tolerance(part, full))


@pytest.mark.xdist_group("subprocess")
def test_counts_of_a_killed_process_match_its_rows_and_resume_completes_them(ckpts, tmp_path):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    with pytest.warns(NonFiniteFeaturesWarning):
        _run(ckpts, ["wild"], full)
    child = in_child(_killed_extraction, ckpts, part)
    assert exit_status(child) == KILL_EXIT_CODE
    with h5py.File(part, "r") as f:
        for path, (n, _) in _counts(part).items():
            assert n == _count(f[path][:int(f[path].attrs["rows_done"])])
    with pytest.warns(NonFiniteFeaturesWarning):
        _run(ckpts, ["wild"], part, mode="resume")
    _counts_describe_the_stored_rows(part)
    assert _same_counts(_counts(part), _counts(full), _tolerance(part, full))


def test_resume_of_a_file_written_before_the_counts_recounts_its_rows(ckpts, tmp_path):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    with pytest.warns(NonFiniteFeaturesWarning):
        _run(ckpts, ["wild"], full)
    with pytest.raises(SimulatedKill):
        _run(ckpts, ["wild"], part, stop_after=2)
    with h5py.File(part, "a") as f:                          # as an older workbench left it
        for layer in LAYERS:
            del f[f"test/wild/{layer}"].attrs["nonfinite"], f[f"test/wild/{layer}"].attrs["max_abs"]
    with pytest.warns(NonFiniteFeaturesWarning):
        _run(ckpts, ["wild"], part, mode="resume")
    _counts_describe_the_stored_rows(part)
    assert _same_counts(_counts(part), _counts(full), _tolerance(part, full))


@pytest.mark.xdist_group("subprocess")
@pytest.mark.slow
def test_sharded_counts_are_the_sum_over_the_shards(ckpts, tmp_path):
    single, sharded = tmp_path / "single.h5", tmp_path / "sharded.h5"
    with pytest.warns(NonFiniteFeaturesWarning):
        _run(ckpts, ["a", "wild"], single, split="train,test", device=shared_device())
    argv = ["extract", "--nets", f"a={ckpts['a']}", f"wild={ckpts['wild']}", "--layer", "features.1", "--layer",
            "features.4", "--split", "train,test", "--limit", str(N), "--batch_size", str(BS), "--dtype", "float32",
            "--device", shared_device(), "--out", str(sharded)]
    port = free_port()
    import cli as cli_mod

    cli_mod.build_parser()
    children = [in_child(run_cli, argv, env=rank_env(r, 2, port)) for r in range(2)]
    assert [exit_status(c) for c in children] == [0, 0]
    joined, want = _counts(sharded), _counts(single)
    assert _same_counts(joined, want, _tolerance(sharded, single)) and any(n > 0 for n, _ in joined.values())
    shard_counts = [_counts(tmp_path / f"sharded.rank{r}of2.h5") for r in range(2)]
    for path, (n, m) in joined.items():
        assert all(0 < s[path][0] < n for s in shard_counts) or "wild" not in path
        assert n == sum(s[path][0] for s in shard_counts) and m == max(s[path][1] for s in shard_counts)


# --------------------------------------------------------------------------- the pure checks

def test_value_range_and_counts_agree_with_numpy_on_planted_values():
    rng = np.random.default_rng(0)
    for _trial in range(20):
        a = rng.normal(scale=10.0 ** rng.integers(0, 6), size=(4, 3, 5, 5)).astype(np.float32)
        k = int(rng.integers(0, 4))
        for v in rng.choice([np.nan, np.inf, -np.inf], size=k):
            a.flat[int(rng.integers(a.size))] = v
        lo, hi = value_range(torch.from_numpy(a)).tolist()
        finite = a[np.isfinite(a)]
        want = ValueCounts(_count(a), float(np.abs(finite).max()) if finite.size else 0.0)
        assert count_array(a) == want
        assert batch_counts(lo, hi, a, "float32") == want                 # the device range path agrees
        if np.isfinite(a).all():
            assert (lo, hi) == (float(a.min()), float(a.max())) and range_is_clean(lo, hi, "float32")
        else:
            assert not range_is_clean(lo, hi, "float32")
        with np.errstate(over="ignore"):
            h = a.astype(np.float16)
        assert batch_counts(lo, hi, h, "float16").nonfinite == _count(h)
    assert count_array(np.full((2, 2), np.nan, np.float32)) == ValueCounts(4, 0.0)
    assert FLOAT16_MAX == 65504.0
