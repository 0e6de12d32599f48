"""A progress bar of one epoch spans the whole stage, so its ETA is that of the whole fit."""
from __future__ import annotations

import io

from tqdm import tqdm

from common.progress import bar_options, progress, stage_span


def test_an_epoch_bar_counts_the_steps_of_every_epoch():
    assert stage_span(10, (2, 5)) == (50, 20)
    assert stage_span(10, None) == (10, 0) and stage_span(None, (0, 3)) == (None, 0)
    opts = bar_options(10, "fit", (2, 5))
    assert opts == {"total": 50, "initial": 20, "desc": "fit epoch 3/5"}
    out = io.StringIO()
    bar = tqdm(range(10), file=out, **opts)
    assert list(bar) == list(range(10)) and bar.n == 30 and "30/50" in out.getvalue()
    assert list(progress(range(3), 3, "quiet", epoch=(0, 2))) == [0, 1, 2]     # silent off a terminal
