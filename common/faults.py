"""Fault points for the reliability tests: ``KC_FAULT=tag:N`` kills the process at the N-th call."""
from __future__ import annotations

import os
import sys

_FAULT_COUNTS: dict[str, int] = {}


def fault_point(tag: str) -> None:
    """A place where the reliability tests kill the process: with ``KC_FAULT=tag:N`` in the
    environment the N-th call with this tag ends the process at once (``os._exit(137)``, like
    SIGKILL: no cleanup, no ``finally``). Costs one dict lookup when unset."""
    spec = os.environ.get("KC_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != tag:
        return
    _FAULT_COUNTS[tag] = _FAULT_COUNTS.get(tag, 0) + 1
    if _FAULT_COUNTS[tag] >= int(n or 1):
        sys.stderr.write(f"KC_FAULT: killing the process at {tag} #{_FAULT_COUNTS[tag]}\n")
        sys.stderr.flush()
        os._exit(137)
