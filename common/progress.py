"""Progress bars: tqdm on a terminal, silent in logs, pipes and tests.

A loop that is one epoch of several passes ``epoch=(e, E)`` (e counted from 0): its bar then shows the
whole stage, ``epoch e+1/E`` and the steps done of all E epochs, so tqdm's rate and ETA are those of
the whole fit, not of the one epoch.
"""
from __future__ import annotations

import sys


def stage_span(total: int | None, epoch: tuple[int, int] | None) -> tuple[int | None, int]:
    """(total steps of the stage, steps already done) of a loop of ``total`` steps that is epoch
    ``epoch[0]`` (from 0) of ``epoch[1]``; (total, 0) without an epoch."""
    if epoch is None or total is None:
        return total, 0
    e, n_epochs = epoch
    return total * n_epochs, total * e


def bar_options(total: int | None, desc: str, epoch: tuple[int, int] | None) -> dict:
    """tqdm's ``total``, ``initial`` and ``desc`` of a loop (see the module docstring)."""
    stage_total, done = stage_span(total, epoch)
    if epoch is not None:
        desc = f"{desc} epoch {epoch[0] + 1}/{epoch[1]}".strip()
    return {"total": stage_total, "initial": done, "desc": desc}


def progress(iterable, total: int | None = None, desc: str = "", leave: bool = False,
             epoch: tuple[int, int] | None = None):
    """tqdm that is quiet when stderr is not a terminal; with ``epoch`` it spans the whole stage."""
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=leave, disable=not sys.stderr.isatty(), dynamic_ncols=True,
                **bar_options(total, desc, epoch))
