"""Outputs under faults: locks taken before anything is deleted, torn log lines, untrusted pickles,
checkpoint checksums."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator

import pytest

from common.errors import UserError
from common.files import write_json
from common.rundir import PathLock, RunDir


@contextlib.contextmanager
def held_by_child(take: Callable[[], object]) -> Iterator[int]:
    """A live child process that holds what ``take()`` locks until the block ends; yields its pid."""
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: lock, report, wait, exit without cleanup
        try:
            os.close(ready_r)
            os.close(stop_w)
            held = take()                          # noqa: F841 - kept alive until the exit
            os.write(ready_w, b"1")
            os.read(stop_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(stop_r)
    try:
        assert os.read(ready_r, 1) == b"1", "the child could not take the lock"
        yield pid
    finally:
        os.close(stop_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


# --------------------------------------------------------------------------- locks before deletion

def test_overwrite_beside_a_running_job_is_refused_with_its_pid_and_deletes_nothing(tmp_path):
    out = tmp_path / "run"
    with RunDir(out) as r:
        write_json(r.file("config.json"), {"a": 1})
        (out / "last.pt").write_bytes(b"weights")
    with held_by_child(lambda: RunDir(out, "resume")) as pid:
        for mode in ("overwrite", "resume", "new"):
            with pytest.raises(UserError, match=f"{out} is in use by pid {pid} on "):
                RunDir(out, mode)
        assert (out / "last.pt").read_bytes() == b"weights" and (out / "config.json").exists()
    with RunDir(out, "overwrite"):                  # the job ended: now it is replaced
        assert not (out / "last.pt").exists()


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("pid 999999 on gone-host")       # left behind by a killed process
    (out / "old.txt").write_text("x")
    with RunDir(out, "overwrite"):
        assert not (out / "old.txt").exists()


def test_path_lock_names_the_live_holder(tmp_path):
    with held_by_child(lambda: PathLock(tmp_path / "x.lock", "thing X")) as pid:
        with pytest.raises(UserError, match=f"thing X is in use by pid {pid} on .*; wait for it to finish"):
            PathLock(tmp_path / "x.lock", "thing X")
    PathLock(tmp_path / "x.lock", "thing X").release()
