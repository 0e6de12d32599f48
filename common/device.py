"""Devices: the one owner of ``--device`` (names to an indexed ``torch.device``, the device made
current, the process group of a torchrun job joined or started: :func:`resolve_device`,
:func:`use_device`, :func:`start_workers`), the bf16 autocast every stage uses on CUDA, and the
numeric precision of a Trans-Net fit (``--precision``).

Device names: ``auto`` is ``cuda`` when CUDA is available, else ``cpu``. A bare ``cuda`` is the
current CUDA device (``torch.cuda.current_device()``), except under torchrun (``WORLD_SIZE`` > 1),
where every rank takes ``cuda:LOCAL_RANK`` (modulo the device count). ``cuda:N`` is taken as given.
The result always carries an index, so ``torch.cuda.set_device`` never sees a bare ``cuda``.

Precisions (``PRECISIONS``), on CUDA:

- ``fp32``: IEEE float32 everywhere; TF32 is switched **off** for cuDNN convolutions (PyTorch leaves
  it on by default) and for matmuls. The paper-faithful choice: the original code trained in plain
  float32 (2019, before TF32 existed).
- ``tf32``: float32 storage, TF32 tensor-core math in convolutions and matmuls (10-bit mantissa).
- ``bf16``: bf16 autocast for the forward pass (TF32 for what autocast keeps in float32).

On the CPU every choice computes in float32 (autocast and TF32 are CUDA features);
``effective_precision`` says so, and fits record both the asked and the effective precision.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from common.distributed import ControlGroup, DistInfo, dist_from_env, init_group, is_local_only, local_world_size
from common.errors import UserError, require_choice
from common.precision import PRECISIONS


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` as an indexed device (see the
    module docstring); a clear error for an unknown name or a CUDA device that is not there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is None:
        info = dist_from_env()
        index = info.local_rank % count if info.active else torch.cuda.current_device()
        return torch.device("cuda", index)
    if dev.index >= count:
        raise UserError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return dev


def use_device(name: str) -> torch.device:
    """:func:`resolve_device`, made the current CUDA device (``torch.cuda.set_device``) when it is one.
    Every command that computes with torch resolves its ``--device`` here."""
    dev = resolve_device(name)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


@dataclass
class Workers:
    """This process's place in a run: its device, its rank and the number of ranks (1 outside a
    torchrun job, and inside :func:`common.distributed.local_only`), and whether it started the
    process group (then :meth:`close` ends it)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel over the ranks; ``model`` itself for one process."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a decision every rank must share); ``obj`` for one process."""
        return self._control().from_main(obj)

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag true on every rank when it is true on any, so the ranks stop, or fail, together;
        the flags as given for one process."""
        control = self._control()
        return tuple(control.any_failed(f) for f in flags)

    def _control(self) -> ControlGroup:
        """The control-plane collectives (gloo, CPU tensors) over these ranks; no-ops for one process."""
        return ControlGroup(DistInfo(self.rank, self.world))

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()
            self.owns_group = False


def start_workers(name: str, start_group: bool = True) -> Workers:
    """The device (:func:`use_device`) and the ranks of this run. Under torchrun the process group is
    joined when one is initialised, else started when ``start_group`` (nccl for CUDA tensors, gloo
    for CPU ones: :func:`common.distributed.init_group`). Inside ``local_only`` the run is one process."""
    if is_local_only():                 # one run per rank (the study runner shares the work out)
        return Workers(use_device(name))
    import torch.distributed as dist

    info = dist_from_env()
    starts = info.active and start_group and dist.is_available() and not dist.is_initialized()
    if starts:
        _one_gpu_per_rank(resolve_device(name), info)
    device = use_device(name)
    owns = False
    if starts:
        init_group(cuda=device.type == "cuda")
        owns = True
    if dist.is_available() and dist.is_initialized():
        return Workers(device, dist.get_rank(), dist.get_world_size(), owns)
    return Workers(device)


def _one_gpu_per_rank(device: torch.device, info) -> None:
    """A CUDA job's ranks train through NCCL, which refuses two ranks on one GPU ("Duplicate GPU
    detected"): each local rank needs its own device, ``cuda:LOCAL_RANK``."""
    if device.type != "cuda":
        return
    local_world = local_world_size()
    count = torch.cuda.device_count()
    if local_world > count or device.index != info.local_rank:
        raise UserError(f"a torchrun job on CUDA needs one GPU per process (NCCL refuses two ranks on one GPU): "
                        f"this node runs {local_world} processes on {count} GPU(s) and local rank "
                        f"{info.local_rank} was given cuda:{device.index}; run at most {count} processes per "
                        f"node (--nproc_per_node) with --device cuda or auto (each rank takes cuda:LOCAL_RANK)")


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when ``amp``; a no-op context on the CPU or with ``amp=False``."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def check_precision(precision: str) -> str:
    require_choice("--precision", precision, PRECISIONS)
    return precision


def effective_precision(device: torch.device, precision: str) -> str:
    """What the arithmetic really is: ``precision`` on CUDA, ``fp32`` on every other device."""
    check_precision(precision)
    return precision if device.type == "cuda" else "fp32"


def tf32_mode(precision: str) -> str:
    """PyTorch's ``fp32_precision`` value for float32 convolutions and matmuls under ``precision``:
    ``ieee`` (TF32 off) for ``fp32``, ``tf32`` for ``tf32`` and ``bf16``."""
    return "ieee" if check_precision(precision) == "fp32" else "tf32"


@contextlib.contextmanager
def cuda_float32_flags(mode: str) -> Iterator[None]:
    """Set cuDNN convolutions' and CUDA matmuls' float32 precision to ``mode`` (``ieee`` | ``tf32``)
    inside the block and put the previous state back afterwards. The flags are process-wide; they
    matter only to CUDA kernels.

    PyTorch keeps two views of these flags: the legacy ones (``cudnn.allow_tf32``,
    ``cuda.matmul.allow_tf32``, ``get_float32_matmul_precision``), derived from the per-backend
    ``fp32_precision`` strings underneath. Setting only the strings can leave them in a state the legacy
    getters refuse to read, and torch.compile's inductor reads them in some releases. So the legacy
    setters go first, then the strings, and both are put back in that order on the way out."""
    cudnn, matmul, cpu_matmul = torch.backends.cudnn, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved_legacy = (_readable(lambda: cudnn.allow_tf32), _readable(torch.get_float32_matmul_precision))
    saved = (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision, cpu_matmul.fp32_precision)
    cudnn.allow_tf32 = mode == "tf32"
    torch.set_float32_matmul_precision("high" if mode == "tf32" else "highest")
    cudnn.conv.fp32_precision = cudnn.rnn.fp32_precision = matmul.fp32_precision = mode
    try:
        yield
    finally:
        if saved_legacy[0] is not None:
            cudnn.allow_tf32 = saved_legacy[0]
        if saved_legacy[1] is not None:
            torch.set_float32_matmul_precision(saved_legacy[1])
        (cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, matmul.fp32_precision,
         cpu_matmul.fp32_precision) = saved


def _readable(getter: Callable[[], Any]) -> Any:
    """A legacy TF32 flag's value, or None where PyTorch refuses to read it (set before us through the
    per-backend strings alone)."""
    try:
        return getter()
    except RuntimeError:
        return None


@contextlib.contextmanager
def float32_math(device: torch.device, precision: str) -> Iterator[None]:
    """Inside the block, float32 convolutions and matmuls on CUDA use IEEE float32 (``fp32``: TF32
    off, although PyTorch's default lets cuDNN convolutions use it) or TF32 (``tf32``, ``bf16``). A
    no-op off CUDA, where float32 is always IEEE."""
    mode = tf32_mode(precision)
    if device.type != "cuda":
        yield
        return
    with cuda_float32_flags(mode):
        yield


_MATMUL_MODES = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


def arithmetic_record(device: torch.device, amp: bool) -> dict[str, Any]:
    """What a stage that does not set the TF32 flags itself (a classifier's training) computes in, for
    config.json: bf16 autocast or none, and the float32 modes PyTorch's flags give cuDNN convolutions
    and CUDA matmuls at this moment (its defaults: convolutions TF32, matmuls IEEE). Off CUDA: IEEE."""
    if device.type != "cuda":
        return {"autocast": None, "conv_float32": "ieee", "matmul_float32": "ieee"}
    conv = _readable(lambda: "tf32" if torch.backends.cudnn.allow_tf32 else "ieee")
    matmul = _readable(lambda: _MATMUL_MODES.get(torch.get_float32_matmul_precision()))
    return {"autocast": "bf16" if amp else None,
            "conv_float32": conv or torch.backends.cudnn.conv.fp32_precision,
            "matmul_float32": matmul or torch.backends.cuda.matmul.fp32_precision,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark)}


@contextlib.contextmanager
def cudnn_autotune(device: torch.device) -> Iterator[None]:
    """Inside the block on CUDA, cuDNN times its convolution algorithms once per shape and keeps the
    fastest (``cudnn.benchmark``: the shapes of a fit or an extraction repeat every batch); the previous
    setting comes back afterwards, so later work in the process (a study's training) is not changed.
    A no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved


def precision_autocast(device: torch.device, precision: str):
    """The forward-pass context of ``precision``: bf16 autocast for ``bf16`` on CUDA, else a no-op."""
    return autocast(device, check_precision(precision) == "bf16")
