"""torchrun helpers: the rank layout from the environment, a control-plane process group, and a
switch that makes training and fitting run as one local process inside a multi-rank job."""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from common.errors import UserError

# How long a rank waits for the others at a control-plane collective of a long job: a study's ranks
# wait while rank 0 trains a family, an extraction's while the slowest rank finishes its shard.
# (torch's default is 30 minutes.)
RANK_WAIT = datetime.timedelta(days=7)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1


def dist_from_env() -> DistInfo:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK (a single process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def local_world_size() -> int:
    """torchrun's processes on this node (``LOCAL_WORLD_SIZE``; the whole job's when unset)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", dist_from_env().world))


def job_ranks() -> DistInfo:
    """The ranks this process works with: torchrun's (:func:`dist_from_env`), or one process inside
    :func:`local_only` (a study's stage run by one rank; its device stays ``cuda:LOCAL_RANK``)."""
    info = dist_from_env()
    return DistInfo(0, 1, info.local_rank) if is_local_only() else info


def init_group(cuda: bool, timeout: datetime.timedelta | None = None) -> None:
    """Start the torchrun job's process group: gloo for CPU tensors, plus nccl for CUDA tensors when
    ``cuda`` (``cpu:gloo,cuda:nccl``, so control-plane collectives on CPU tensors work in a CUDA job).
    The only place that initialises a process group."""
    import torch.distributed as dist

    kw = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", **kw)


class ControlGroup:
    """Control-plane collectives over gloo (CPU tensors) between the ranks of a torchrun job; every
    call is a no-op for one process. Joins an initialised process group or starts (and later closes)
    its own; ``timeout`` bounds how long a rank waits at a collective."""

    def __init__(self, info: DistInfo | None = None, timeout: datetime.timedelta | None = None):
        info = dist_from_env() if info is None else info
        self.rank, self.world = info.rank, info.world
        self.owned = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                init_group(cuda=False, timeout=timeout)
                self.owned = True
            self.dist = dist
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            self.dist.barrier()

    def total(self, value: int) -> int:
        """The sum of ``value`` over the ranks."""
        if not self.active:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64)
        self.dist.all_reduce(t)
        return int(t.item())

    def any_failed(self, failed: bool) -> bool:
        return self.total(int(bool(failed))) > 0

    def from_main(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def together(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on this rank; if it fails on any rank, fail on every rank (no rank is left waiting)."""
        err: BaseException | None = None
        out = None
        try:
            out = fn()
        except Exception as e:      # re-raised below, after every rank knows
            err = e
        if self.any_failed(err is not None):
            if err is not None:
                raise err
            raise UserError(f"{what} failed on another rank; its error is printed above")
        return out

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()
            self.owned = False


_LOCAL_ONLY = [False]


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Within this block, training (and Trans-Net fitting) ignores an initialised process group and
    runs as one process: the study runner under torchrun gives each rank its own members or pairs."""
    prev = _LOCAL_ONLY[0]
    _LOCAL_ONLY[0] = True
    try:
        yield
    finally:
        _LOCAL_ONLY[0] = prev


def is_local_only() -> bool:
    return _LOCAL_ONLY[0]
