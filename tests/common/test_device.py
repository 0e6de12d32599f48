"""Device resolution and every command's device path, on a CPU machine that pretends to have CUDA.

CUDA's availability, device count and current device are faked; ``torch.cuda.set_device`` is a spy
that records the device it is given and stops the command there, so nothing is ever placed on CUDA.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.device import resolve_device, start_workers, use_device
from common.distributed import local_only
from common.errors import UserError
from tests.fakedata import FAST_FIT_ARGS, make_imagefolder, planted_features, tiny_checkpoint, write_features_by_split


class Stopped(BaseException):
    """Raised by the ``set_device`` spy: the command got as far as choosing its device."""


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two CUDA devices, the current one cuda:1, no torchrun environment; returns the list of the
    devices ``torch.cuda.set_device`` was called with (the first call stops the caller)."""
    calls: list = []

    def set_device(dev):
        calls.append(dev)
        raise Stopped(str(dev))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    return calls


def _torchrun(monkeypatch, rank: int, world: int = 2) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))


# --------------------------------------------------------------------------- resolution

@pytest.mark.parametrize("name, want", [("auto", "cuda:1"), ("cuda", "cuda:1"), ("cuda:0", "cuda:0"),
                                        ("cuda:1", "cuda:1"), ("cpu", "cpu")])
def test_device_names_resolve_to_indexed_devices(fake_cuda, name, want):
    assert resolve_device(name) == torch.device(want)
    assert fake_cuda == []                      # resolving alone makes no device current


def test_under_torchrun_a_bare_cuda_is_the_local_rank(fake_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _torchrun(monkeypatch, rank=1)
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 1)
    _torchrun(monkeypatch, rank=3, world=4)     # more ranks than devices: wrap around
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)      # an explicit index is kept


def test_bad_or_missing_devices_are_user_errors(fake_cuda, monkeypatch):
    with pytest.raises(UserError, match=r"cuda:5.*2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:5")
    with pytest.raises(UserError, match=r"unknown --device 'gpu'; valid: auto, cpu, cuda, cuda:N"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="no CUDA device is available"):
        resolve_device("cuda")


def test_use_device_makes_the_indexed_device_current(fake_cuda):
    with pytest.raises(Stopped):
        use_device("cuda")
    assert fake_cuda == [torch.device("cuda", 1)]
    assert use_device("cpu") == torch.device("cpu") and len(fake_cuda) == 1


def test_workers_outside_torchrun_and_in_local_only_mode_are_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    w = start_workers("cpu")
    assert (w.device, w.rank, w.world, w.owns_group) == (torch.device("cpu"), 0, 1, False)
    _torchrun(monkeypatch, rank=1)
    with local_only():                          # the study runner's mode: no process group is started
        w = start_workers("cpu")
    assert (w.rank, w.world, w.owns_group) == (0, 1, False)
    assert not torch.distributed.is_initialized()


# --------------------------------------------------------------------------- every command's device path

def _fit_args(features: Path, out: Path) -> list:
    return ["fit-transnet", "--features", features, "--source", "a", "--target", "b", "--layer", "conv",
            "--out_dir", out]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("device_inputs")
    feats = planted_features(d / "planted.h5")
    images = make_imagefolder(d / "img", n_classes=2, per_class=2, size=(16, 16))
    return {"features": feats, "images": images, "ckpt": tiny_checkpoint(d / "a.pt")}


def _commands(i: dict, out: Path) -> dict[str, list]:
    f, ck = i["features"], i["ckpt"]
    return {
        "train": ["train", "--dataset", f"imagefolder:{i['images']}", "--arch", "vgg_tiny", "--epochs", "1",
                  "--transform", "small", "--batch_size", "2", "--out_dir", out],
        "born-again": ["born-again", "--dataset", f"imagefolder:{i['images']}", "--arch", "vgg_tiny", "--epochs",
                       "1", "--transform", "small", "--batch_size", "2", "--generations", "1", "--out_dir", out],
        "distill": ["distill", "--teacher", ck, "--arch", "vgg_tiny", "--epochs", "1", "--out_dir", out],
        "evolve": ["evolve", "--dataset", f"imagefolder:{i['images']}", "--arch", "vgg_tiny", "--epochs", "1",
                   "--transform", "small", "--batch_size", "2", "--generations", "1", "--out_dir", out],
        "compress": ["compress", "--checkpoint", ck, "--prune", "0.5", "--out_dir", out],
        "extract": ["extract", "--nets", f"a={ck}", "--conv_layer", "1", "--split", "test", "--limit", "4",
                    "--out", out / "f.h5"],
        "fit-transnet": _fit_args(f, out),
        "variance": ["variance", "--transnet", out / "missing"],
        "consistency": ["consistency", "--features", f, "--layer", "conv", "--nets", "a,b", *FAST_FIT_ARGS[:-2],
                        "--out_dir", out],
        "diagnose": ["diagnose", "--features", f, "--layer", "conv", "--a", "a", "--b", "b",
                     "--transnet_ab", out / "x", "--transnet_ba", out / "y", "--out_dir", out],
        "refine": ["refine", "--net_a", ck, "--net_b", ck, "--transnet", out / "missing", "--out_dir", out],
    }


COMMANDS = ("train", "born-again", "distill", "evolve", "compress", "extract", "fit-transnet", "variance",
            "consistency", "diagnose", "refine")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_every_command_runs_on_the_indexed_current_cuda_device(fake_cuda, cli, inputs, tmp_path, command, device):
    argv = [*_commands(inputs, tmp_path / "out")[command], "--device", device]
    with pytest.raises(Stopped):
        cli(*argv)
    assert fake_cuda[0] == torch.device("cuda", 1), fake_cuda


def test_fit_under_torchrun_takes_the_local_rank_before_any_process_group(fake_cuda, cli, inputs, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    _torchrun(monkeypatch, rank=1)
    with pytest.raises(Stopped):
        cli(*_fit_args(inputs["features"], tmp_path / "out"), "--device", "cuda")
    assert fake_cuda == [torch.device("cuda", 1)] and not torch.distributed.is_initialized()


def test_a_study_trains_its_members_on_the_indexed_current_device(fake_cuda, cli, inputs, tmp_path):
    import yaml

    study = {"name": "dev", "data": {"dataset": f"imagefolder:{inputs['images']}", "transform": "plain",
                                     "image_size": 16},
             "train": {"epochs": 1, "batch_size": 2, "device": "cuda"},
             "members": {"seeds": {"arch": "vgg_tiny", "seeds": [0, 1]}},
             "extract": {"layers": ["features.8"]}, "transnet": {"epochs": 2, "device": "cuda"},
             "pairs": [{"family": "seeds", "plan": "all"}]}
    sf = tmp_path / "s.yaml"
    sf.write_text(yaml.safe_dump(study))
    with pytest.raises(Stopped):
        cli("study", sf, "--out_dir", tmp_path / "out")
    assert fake_cuda[0] == torch.device("cuda", 1)


def test_on_the_cpu_the_fit_runs_unchanged(tmp_path):
    """The device owner leaves a CPU fit as it was: one process, finite metrics."""
    from tests.fakedata import FAST_FIT_KWARGS
    from transnet.fit import FitConfig, fit_transnet

    rng = np.random.default_rng(0)
    a = rng.normal(size=(16, 2, 2, 2)).astype(np.float32)
    f = write_features_by_split(tmp_path / "f.h5", {"train": {"A": a, "B": 2 * a}, "test": {"A": a, "B": 2 * a}})
    m = fit_transnet(FitConfig(features=str(f), epochs=2, orders=0, batch_size=8, **FAST_FIT_KWARGS),
                     tmp_path / "run")
    assert m["epochs"] == 2 and np.isfinite(m["r2"])


# --------------------------------------------------------------------------- TF32 flags

_FLAGS_PROBE = r"""
import sys, warnings
warnings.simplefilter("error")
import torch
from common.device import cuda_float32_flags
b = torch.backends
GETTERS = {"cudnn.allow_tf32": lambda: b.cudnn.allow_tf32, "matmul.allow_tf32": lambda: b.cuda.matmul.allow_tf32,
           "float32_matmul_precision": torch.get_float32_matmul_precision}
STRINGS = {"conv": lambda: b.cudnn.conv.fp32_precision, "rnn": lambda: b.cudnn.rnn.fp32_precision,
           "matmul": lambda: b.cuda.matmul.fp32_precision, "cpu_matmul": lambda: b.mkldnn.matmul.fp32_precision}
def legacy():
    out = {}
    for name, get in GETTERS.items():
        try:
            out[name] = get()
        except RuntimeError:
            out[name] = None
    return out
def strings():
    return {name: get() for name, get in STRINGS.items()}
exec(sys.argv[1])
before_legacy, before = legacy(), strings()
for mode in ("ieee", "tf32"):
    with cuda_float32_flags(mode):
        inside = legacy()
        assert None not in inside.values(), inside                  # every legacy getter readable
        assert (strings()["conv"], strings()["rnn"], strings()["matmul"]) == (mode,) * 3, strings()
        assert inside["cudnn.allow_tf32"] == inside["matmul.allow_tf32"] == (mode == "tf32"), inside
        with cuda_float32_flags("tf32" if mode == "ieee" else "ieee"):
            assert None not in legacy().values()
        assert legacy() == inside
    assert strings() == before, (strings(), before)
    after = legacy()
    assert all(after[k] == v for k, v in before_legacy.items() if v is not None), (after, before_legacy)
print("ok")
"""


@pytest.mark.parametrize("before", [
    "pass",                                                     # PyTorch's defaults
    "torch.set_float32_matmul_precision('high')",               # a user's legacy settings
    "torch.set_float32_matmul_precision('medium')",
    "torch.backends.cudnn.allow_tf32 = False",
    "torch.backends.cudnn.conv.fp32_precision = 'ieee'",        # a user's per-backend strings
    "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
])
def test_tf32_flags_keep_the_legacy_getters_readable_and_are_put_back(before):
    """cuda_float32_flags sets both of PyTorch's views of the TF32 flags, so the legacy getters (read by
    torch.compile's inductor) never raise inside the block, and puts the per-backend strings, and every
    legacy value that was readable, back afterwards. Run in a child: the flags are process-wide."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _FLAGS_PROBE, before], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_cudnn_autotune_holds_only_inside_the_block_and_only_on_cuda(monkeypatch):
    """cuDNN's algorithm search is on inside an extraction or a fit on CUDA and back to what it was
    afterwards (a study's later training keeps PyTorch's default), also after an error."""
    from common.device import cudnn_autotune

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with cudnn_autotune(torch.device("cpu")):
        assert torch.backends.cudnn.benchmark is False
    with pytest.raises(RuntimeError), cudnn_autotune(torch.device("cuda", 0)):
        assert torch.backends.cudnn.benchmark is True
        raise RuntimeError("stop")
    assert torch.backends.cudnn.benchmark is False


def test_the_arithmetic_of_training_is_recorded_as_the_flags_leave_it(monkeypatch):
    """Training sets no TF32 flag, so config.json records what PyTorch's flags give it: on CUDA by
    default TF32 convolutions and IEEE matmuls (bf16 autocast with --amp); under the fp32 flags IEEE."""
    from common.device import arithmetic_record, cuda_float32_flags

    cuda = torch.device("cuda", 0)
    assert arithmetic_record(torch.device("cpu"), True) == {"autocast": None, "conv_float32": "ieee",
                                                             "matmul_float32": "ieee"}
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with cuda_float32_flags("tf32"):
        assert arithmetic_record(cuda, True) == {"autocast": "bf16", "conv_float32": "tf32", "matmul_float32": "tf32",
                                                 "cudnn_benchmark": False}
    with cuda_float32_flags("ieee"):
        rec = arithmetic_record(cuda, False)
        assert rec["autocast"] is None and rec["conv_float32"] == rec["matmul_float32"] == "ieee"


def test_a_cuda_job_with_two_ranks_on_one_gpu_is_refused_before_any_process_group(fake_cuda, monkeypatch):
    """NCCL refuses two ranks on one GPU: more processes on a node than GPUs, or an explicit cuda:N
    given to every rank, is a clear error before anything is started; one GPU per rank goes ahead."""
    _torchrun(monkeypatch, rank=3, world=4)
    with pytest.raises(UserError, match=r"runs 4 processes on 2 GPU\(s\) and local rank 3 was given cuda:1"):
        start_workers("cuda")
    _torchrun(monkeypatch, rank=1, world=2)
    with pytest.raises(UserError, match=r"local rank 1 was given cuda:0; run at most 2 processes"):
        start_workers("cuda:0")
    assert fake_cuda == [] and not torch.distributed.is_initialized()
    with pytest.raises(Stopped):
        start_workers("cuda")
    assert fake_cuda == [torch.device("cuda", 1)]


def _agree_child(rank: int) -> int:
    """One rank of a two-process gloo job: 0 when both ranks got rank 0's placement and stopped together
    although only rank 1 asked to stop."""
    from common.device import start_workers

    w = start_workers("cpu")
    try:
        placement = w.from_main("device" if w.rank == 0 else "disk")
        flags = w.any_rank(False, w.rank == 1)
        return 0 if (w.world, placement, flags) == (2, "device", (False, True)) else 3
    finally:
        w.close()


@pytest.mark.xdist_group("subprocess")
def test_ranks_share_rank_0s_decisions_and_stop_together():
    """A DDP fit's placement is rank 0's on every rank, and a stop (or a divergence) on any rank stops
    every rank: ranks that decided apart took different numbers of steps and waited on each other."""
    from tests.processes import exit_status, free_port, in_child, rank_env

    port = free_port()
    procs = [in_child(_agree_child, r, env=rank_env(r, 2, port)) for r in (0, 1)]
    assert [exit_status(p) for p in procs] == [0, 0]
