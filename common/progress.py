"""Progress: tqdm bars on a terminal; off a terminal (a log file, a pipe, a batch job) one plain line
every ``KC_PROGRESS_SECONDS`` seconds (default 30; 0: silent) per stage, with its rate and ETA.

A loop that is one epoch of several passes ``epoch=(e, E)`` (e counted from 0): its bar then shows the
whole stage, ``epoch e+1/E`` and the steps done of all E epochs, so tqdm's rate and ETA are those of
the whole fit, not of the one epoch.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator


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
    """tqdm on a terminal, else :func:`progress_lines`; with ``epoch`` it spans the whole stage."""
    if not sys.stderr.isatty():
        return progress_lines(iterable, total, desc, epoch)
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=leave, dynamic_ncols=True, **bar_options(total, desc, epoch))


def line_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("KC_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


# desc -> [start time, steps done at the start, time of the last line, last epoch]: one stage's clock,
# kept across the loops of its epochs
_STAGES: dict[str, list] = {}


def progress_lines(iterable: Iterable, total: int | None = None, desc: str = "",
                   epoch: tuple[int, int] | None = None, interval: float | None = None,
                   clock=time.monotonic, out=None) -> Iterator:
    """``iterable``, writing to ``out`` (stderr) a line such as ``fit a>b: epoch 3/50, 120/2000 steps
    (6.0%), 12 s, ETA 3 min`` at most every ``interval`` seconds of the stage (not the loop)."""
    interval = line_interval() if interval is None else interval
    if interval <= 0 or os.environ.get("RANK", "0") != "0":     # under torchrun, rank 0 speaks for all
        yield from iterable
        return
    stage_total, done = stage_span(total, epoch)
    st = _STAGES.get(desc)
    if st is None or epoch is None or epoch[0] <= st[3]:       # a new stage, not the next epoch of one
        now = clock()
        st = _STAGES[desc] = [now, done, now, -1]
    st[3] = epoch[0] if epoch is not None else -1
    for n, item in enumerate(iterable, start=1):
        yield item
        t = clock()
        if t - st[2] >= interval:
            st[2] = t
            print(_line(desc, epoch, done + n, stage_total, t - st[0], done + n - st[1]), file=out or sys.stderr,
                  flush=True)


def _line(desc: str, epoch: tuple[int, int] | None, n: int, total: int | None, elapsed: float, ran: int) -> str:
    parts = [f"epoch {epoch[0] + 1}/{epoch[1]}"] if epoch is not None else []
    if total:
        parts.append(f"{n}/{total} steps ({100 * n / total:.1f}%)")
    else:
        parts.append(f"{n} steps")
    parts.append(_duration(elapsed))
    if total and ran > 0:
        parts.append(f"ETA {_duration(elapsed / ran * (total - n))}")
    return f"{desc or 'progress'}: {', '.join(parts)}"


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"
