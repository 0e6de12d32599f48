"""Fault points for the reliability tests.

``KC_FAULT=tag:N`` kills the process at the N-th call of ``fault_point(tag)`` (``os._exit(137)``, like
SIGKILL). ``KC_FAULT=tag:N:enospc`` (or ``:eio``, ``:erofs``) instead raises the ``OSError`` a full disk
(an I/O error, a read-only file system) gives, at the N-th call and every later one, as a full disk
keeps failing: the write paths call :func:`fault_point` right before they touch the disk, so a test
simulates the failure where the real one happens. Several faults are separated by commas.
"""
from __future__ import annotations

import errno
import os
import sys

_FAULT_COUNTS: dict[str, int] = {}
FAULT_ERRNOS = {"enospc": errno.ENOSPC, "eio": errno.EIO, "erofs": errno.EROFS}


def reset() -> None:
    """Forget the calls counted so far (tests that set ``KC_FAULT`` in-process)."""
    _FAULT_COUNTS.clear()


def fault_point(tag: str, path: str | os.PathLike | None = None) -> None:
    """A place where the reliability tests make the process fail: see the module doc. ``path`` is the
    file the raised ``OSError`` names. Costs one dict lookup when ``KC_FAULT`` is unset."""
    spec = os.environ.get("KC_FAULT")
    if not spec:
        return
    for one in spec.split(","):
        want, _, rest = one.partition(":")
        if want != tag:
            continue
        n, _, kind = rest.partition(":")
        _FAULT_COUNTS[tag] = _FAULT_COUNTS.get(tag, 0) + 1
        if _FAULT_COUNTS[tag] < int(n or 1):
            return
        if kind:
            code = FAULT_ERRNOS[kind.lower()]
            raise OSError(code, os.strerror(code), None if path is None else str(path))
        sys.stderr.write(f"KC_FAULT: killing the process at {tag} #{_FAULT_COUNTS[tag]}\n")
        sys.stderr.flush()
        os._exit(137)
