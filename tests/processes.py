"""Process helpers shared by several test files: forked children (torch already imported, so no
start-up cost), free TCP ports for torchrun-style rendezvous, and CLI error text without its wrapping."""
from __future__ import annotations

import os
import sys


def in_child(fn, env: dict[str, str] | None = None) -> int:
    """Run ``fn`` in a forked copy of this process (torch already imported: no start-up cost); the
    child never returns into pytest. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.update(env or {})
            code = int(fn() or 0)
        except BaseException as e:  # noqa: BLE001 - reported through the exit status
            sys.stderr.write(f"child failed: {type(e).__name__}: {e}\n")
        finally:
            os._exit(code)
    return pid


def exit_status(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flat(text: str) -> str:
    """cli.py wraps error paragraphs: compare with the line breaks removed."""
    return " ".join(text.split())
