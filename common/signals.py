"""SIGTERM (what cluster schedulers send before SIGKILL) handled like SIGINT: it raises
:class:`Terminated`, a ``KeyboardInterrupt``, in the main thread, so every command stops the way Ctrl-C
stops it (the writer lands its rows and marks progress, the last checkpoint stays as written) and
``cli.py`` exits with 143 (128 + 15) and says how to resume."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

TERMINATED_EXIT_CODE = 128 + signal.SIGTERM          # 143, the shell's code of a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)      # one clean stop; a second SIGTERM does not cut it short
    raise Terminated(f"received signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (main thread only; elsewhere a no-op); the
    previous handler is restored after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
