"""Process helpers shared by several test files: child processes that hold on a CUDA machine, free TCP
ports for torchrun-style rendezvous, and CLI error text without its wrapping.

A child is forked while this process has not touched CUDA (torch is already imported: no start-up cost)
and spawned once it has (CUDA cannot be re-initialised in a forked child: "Cannot re-initialize CUDA in
forked subprocess"). Asking whether CUDA is available does not count: tests/conftest.py makes
``torch.cuda.is_available()`` ask NVML, which leaves the CUDA driver untouched. So the function a child
runs and its arguments must be picklable in both cases: a module-level function, never a lambda;
:func:`in_child` checks this when it forks too, so a test that would break on a CUDA machine breaks on
the CPU as well.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any


def start_method() -> str:
    """``fork`` while CUDA is untouched in this process, ``spawn`` once it was initialised."""
    torch = sys.modules.get("torch")
    return "spawn" if torch is not None and torch.cuda.is_initialized() else "fork"


def in_child(fn: Callable[..., Any], *args: Any, env: dict[str, str] | None = None) -> multiprocessing.Process:
    """Run ``fn(*args)`` in a child process with ``env`` added to its environment; its return value (an
    int, or None for 0) becomes the exit status, an exception exit status 1. Returns the started process
    (pass it to :func:`exit_status`)."""
    pickle.dumps((fn, args, env))          # a spawned child receives them pickled: fail the same way everywhere
    ctx = multiprocessing.get_context(start_method())
    proc = ctx.Process(target=_child_main, args=(fn, args, dict(env or {})), daemon=False)
    proc.start()
    return proc


def _child_main(fn: Callable[..., Any], args: tuple, env: dict[str, str]) -> None:
    code = 1
    try:
        os.environ.update(env)
        code = int(fn(*args) or 0)
    except BaseException as e:  # noqa: BLE001 - reported through the exit status
        sys.stderr.write(f"child failed: {type(e).__name__}: {e}\n")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)                      # never return into pytest (a forked child holds its state)


def exit_status(proc: multiprocessing.Process) -> int:
    proc.join()
    return int(proc.exitcode)


def run_cli(argv: list[str]) -> int:
    """``cli.main(argv)`` (a picklable child function)."""
    import cli

    return cli.main(argv)


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """torchrun's environment of ``rank`` in a one-node job of ``world`` processes."""
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def shared_device() -> str:
    """The ``--device`` of every rank of a test's multi-process job: ``cuda:0`` on a CUDA machine (the
    ranks share one GPU, so the test holds on a machine with one), else ``cpu``."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flat(text: str) -> str:
    """cli.py wraps error paragraphs: compare with the line breaks removed."""
    return " ".join(text.split())
