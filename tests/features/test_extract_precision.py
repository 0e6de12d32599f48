"""The arithmetic of an extraction (``--precision``): recorded per dataset and shown by ``inspect``, the CUDA
flags chosen around the forward pass (on a faked CUDA device), ``--amp`` as an alias of bf16, and files
written before the precision was recorded."""
from __future__ import annotations

import contextlib

import h5py
import numpy as np
import pytest
import torch

import features.extract as extract_mod
from common.errors import UserError
from features import store
from features.extract import ExtractConfig, extract_features
from features.nets import build_feature_data, data_spec_for, load_net
from features.targets import stored_precision
from tests.fakedata import EXTRACT_BATCH as BS
from tests.fakedata import EXTRACT_ROWS as N
from tests.fakedata import tiny_checkpoint
from tests.processes import flat


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "a.pt", seed=0)


def _extract(ckpt, out, precision="fp32", mode="auto", limit=N):
    nets = [load_net("a", ckpt)]
    cfg = ExtractConfig(split="test", dtype="float32", batch_size=BS, limit=limit, precision=precision, device="cpu")
    data = build_feature_data(data_spec_for(nets, {}), ["test"], limit)
    return extract_features(nets, data, [("features.4", None)], out, cfg, mode, command="test")


def test_precision_is_recorded_per_dataset_and_shown_by_inspect(cli, ckpt, tmp_path):
    base = ["extract", "--nets", f"a={ckpt}", "--layer", "features.4", "--split", "test", "--limit", N,
            "--batch_size", BS, "--dtype", "float32", "--device", "cpu"]
    assert ExtractConfig.precision == "fp32"                         # the faithful default: TF32 off on CUDA
    for flags, asked in [([], "fp32"), (["--precision", "tf32"], "tf32"), (["--amp"], "bf16")]:
        out = tmp_path / f"{asked}.h5"
        code, _, err = cli(*base, *flags, "--out", out)
        assert code == 0, err
        with store.open_features(out) as f:
            a = f["test/a/features.4"].attrs
            assert (a["precision"], a["precision_effective"]) == (asked, "fp32")    # the CPU computes in fp32
            assert a["autocast"] == "none" and f"--precision {asked}" in a["command"]
        code, so, _ = cli("inspect", out)
        line = next(s for s in so.splitlines() if s.strip().startswith("features.4"))
        assert line.endswith(f"precision {asked}" + ("" if asked == "fp32" else " (computed in fp32)"))
    with store.open_features(tmp_path / "fp32.h5") as f, store.open_features(tmp_path / "bf16.h5") as g:
        assert np.array_equal(f["test/a/features.4"][...], g["test/a/features.4"][...])   # no bf16 on the CPU
    code, _, err = cli(*base, "--amp", "--precision", "tf32", "--out", tmp_path / "x.h5")
    assert code == 1 and "--amp is an alias of --precision bf16 and contradicts --precision tf32" in flat(err)
    with pytest.raises(SystemExit):                                  # argparse lists the choices
        cli(*base, "--precision", "fp16", "--out", tmp_path / "y.h5")
    with pytest.raises(UserError, match="unknown --precision 'fp16'; valid: fp32, tf32, bf16"):
        _extract(ckpt, tmp_path / "z.h5", precision="fp16")


@pytest.mark.parametrize("precision, conv_mode, autocast_on", [("fp32", "ieee", False), ("tf32", "tf32", False),
                                                                ("bf16", "tf32", True)])
def test_the_forward_pass_runs_under_the_cuda_flags_of_its_precision(ckpt, tmp_path, monkeypatch, precision,
                                                                    conv_mode, autocast_on):
    """The flags are chosen as on a CUDA device (``float32_math`` and ``precision_autocast`` are given
    ``cuda`` whatever the tensors' device) and observed inside every forward pass."""
    cuda = torch.device("cuda")
    real_math, real_autocast = extract_mod.float32_math, extract_mod.precision_autocast
    calls, state = [], {"autocast": None}

    def math_spy(device, p):
        calls.append(("float32_math", device.type, p))
        return real_math(cuda, p)

    def autocast_spy(device, p):
        calls.append(("precision_autocast", device.type, p))
        return real_autocast(cuda, p)

    @contextlib.contextmanager
    def fake_torch_autocast(device_type, dtype, enabled):      # torch.autocast("cuda") needs a CUDA build
        state["autocast"] = (device_type, dtype) if enabled else None
        try:
            yield
        finally:
            state["autocast"] = None

    monkeypatch.setattr(extract_mod, "float32_math", math_spy)
    monkeypatch.setattr(extract_mod, "precision_autocast", autocast_spy)
    monkeypatch.setattr(torch, "autocast", fake_torch_autocast)
    seen = []

    def hook(module, inputs):
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
                     state["autocast"]))

    monkeypatch.setattr(extract_mod, "build_extractor", _hooked(extract_mod.build_extractor, hook))
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    _extract(ckpt, tmp_path / "f.h5", precision=precision)
    assert len(seen) >= N // BS
    # the last N / BS calls are the pass (one per batch; the earlier ones check the extractor's shapes)
    bf16 = ("cuda", torch.bfloat16) if autocast_on else None
    assert set(seen[-(N // BS):]) == {(conv_mode, conv_mode, bf16)}
    assert ("float32_math", "cpu", precision) in calls and ("precision_autocast", "cpu", precision) in calls
    assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == before
    assert state["autocast"] is None


def _hooked(build, hook):
    """``build_extractor`` whose extractors call ``hook`` before their first module runs."""
    def wrapped(model, points):
        ex = build(model, points)
        next(m for m in ex.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_pre_hook(hook)
        return ex
    return wrapped


def test_files_without_a_recorded_precision_have_the_arithmetic_of_their_time(ckpt, tmp_path):
    assert stored_precision({"precision_effective": "tf32", "device": "cpu"}) == "tf32"
    assert stored_precision({"autocast": "bfloat16", "device": "cuda:0"}) == "bf16"
    assert stored_precision({"autocast": "none", "device": "cuda:0"}) == "tf32"     # cuDNN's TF32 default then
    assert stored_precision({"autocast": "none", "device": "cpu"}) == "fp32"
    out = tmp_path / "f.h5"
    with pytest.raises(extract_mod.SimulatedKill):
        _extract_stopping(ckpt, out)
    with h5py.File(out, "a") as f:                   # as an older workbench left it, on the CPU: resumable
        a = f["test/a/features.4"].attrs
        del a["precision"], a["precision_effective"]
    _extract(ckpt, out, mode="resume")
    with h5py.File(out, "a") as f:                   # the same, written on CUDA (TF32 convolutions)
        a = f["test/a/features.4"].attrs
        assert bool(a["complete"]) and "precision_effective" not in a
        a["complete"], a["rows_done"], a["device"] = False, BS, "cuda:0"
    with pytest.raises(UserError, match="precision_effective: file has 'tf32', this request 'fp32'"):
        _extract(ckpt, out, mode="resume")


def _extract_stopping(ckpt, out):
    nets = [load_net("a", ckpt)]
    cfg = ExtractConfig(split="test", dtype="float32", batch_size=BS, limit=N, device="cpu")
    data = build_feature_data(data_spec_for(nets, {}), ["test"], N)
    return extract_features(nets, data, [("features.4", None)], out, cfg, "auto", command="test", stop_after=1)
