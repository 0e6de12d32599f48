"""Progress bars: tqdm on a terminal, silent in logs, pipes and tests."""
from __future__ import annotations

import sys


def progress(iterable, total: int | None = None, desc: str = "", leave: bool = False):
    """tqdm that is quiet when stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=not sys.stderr.isatty(),
                dynamic_ncols=True)
