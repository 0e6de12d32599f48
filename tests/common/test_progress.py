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


def test_off_a_terminal_a_stage_prints_a_line_every_interval_across_its_epochs():
    from common.progress import progress_lines

    now = [0.0]

    def clock():
        now[0] += 1.0                   # one second a step
        return now[0]

    out = io.StringIO()
    for e in range(3):                  # three epochs of 10 steps: one stage, one clock
        assert list(progress_lines(range(10), 10, "fit a>b", (e, 3), interval=12, clock=clock, out=out)) == list(range(10))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2              # at 12 s and 24 s of the 30 s stage
    assert lines[0] == "fit a>b: epoch 2/3, 12/30 steps (40.0%), 12 s, ETA 18 s"
    assert lines[1].startswith("fit a>b: epoch 3/3, 24/30 steps (80.0%), 24 s")
    quiet = io.StringIO()
    assert list(progress_lines(range(5), 5, "x", interval=0, clock=clock, out=quiet)) == list(range(5))
    assert quiet.getvalue() == ""
