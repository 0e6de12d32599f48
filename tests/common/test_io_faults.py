"""Outputs under faults: locks taken before anything is deleted, torn log lines, untrusted pickles,
checkpoint checksums."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import UserError
from common.files import write_json
from common.rundir import PathLock, RunDir, TornLogLineWarning, read_log
from tests.processes import exit_status, flat, in_child


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


# --------------------------------------------------------------------------- torn log lines

def test_a_torn_last_log_line_is_dropped_on_resume_with_a_warning(tmp_path):
    out = tmp_path / "run"
    with RunDir(out) as r:
        for e in range(3):
            r.log({"epoch": e, "loss": 1.0 / (e + 1)})
    log = out / "log.jsonl"
    log.write_text(log.read_text() + '{"epoch": 3, "lo')          # a kill during the fourth append
    with pytest.warns(TornLogLineWarning, match="last line is torn"):
        assert [x["epoch"] for x in read_log(log)] == [0, 1, 2]
    with RunDir(out, "resume") as r, pytest.warns(TornLogLineWarning):
        r.truncate_log(1)                          # the resume of a run whose checkpoint is at epoch 1
    assert [x["epoch"] for x in read_log(log)] == [0, 1] and log.read_text().endswith("}\n")


def test_an_append_after_a_torn_line_starts_on_a_line_of_its_own(tmp_path):
    out = tmp_path / "run"
    with RunDir(out) as r:
        r.log({"epoch": 0})
    (out / "log.jsonl").write_text('{"epoch": 0}\n{"epo')
    with RunDir(out, "resume") as r, pytest.warns(TornLogLineWarning):
        r.log({"epoch": 1})
    assert (out / "log.jsonl").read_text() == '{"epoch": 0}\n{"epoch": 1}\n'


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"epoch": 0}\n{"ep\n{"epoch": 2}\n')
    with pytest.raises(UserError, match="log.jsonl: line 2 is not a JSON object"):
        read_log(log)


# --------------------------------------------------------------------------- untrusted data pickles

class _Payload:
    """What a hostile data file holds: unpickling it calls os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_cifar_batch_with_a_code_payload_is_refused_and_the_payload_never_runs(tmp_path):
    import pickle

    from common.safe_pickle import UnsafePickleError
    from tests import fakedata as fd
    from training.datasets_disk import read_cifar

    folder = fd.make_cifar_layout(tmp_path, "cifar10", per_file=2)
    batch = next(folder.rglob("data_batch_1"))
    marker = tmp_path / "payload-ran"
    with open(batch, "wb") as fh:
        pickle.dump({b"data": _Payload(marker), b"labels": [0, 1]}, fh)
    with pytest.raises(UnsafePickleError, match=f"{batch} is refused: it names posix.system"):
        read_cifar(folder, "cifar10", "train")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_data_pickles_load_under_every_protocol(tmp_path, protocol):
    import io
    import pickle

    import numpy as np

    from common.safe_pickle import load_data_pickle

    obj = {b"data": np.arange(24, dtype=np.uint8).reshape(2, 12), "labels": [1, 2], "f": np.float32(1.5),
           "names": ("a", b"b"), "nested": {"x": [np.arange(3, dtype=np.int64), 2.5, None, True]}}
    got = load_data_pickle(io.BytesIO(pickle.dumps(obj, protocol=protocol)), "mem")
    assert got.keys() == obj.keys() and got["labels"] == [1, 2] and got["names"] == ("a", b"b")
    np.testing.assert_array_equal(got[b"data"], obj[b"data"])
    assert got[b"data"].dtype == np.uint8 and got["f"] == np.float32(1.5)
    np.testing.assert_array_equal(got["nested"]["x"][0], np.arange(3))


def test_the_real_animal_mnist_pickles_still_load():
    from training.data import animal_mnist_arrays

    images, labels = animal_mnist_arrays()
    assert images.shape == (10000, 28, 28) and images.dtype.name == "uint8"
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))


# --------------------------------------------------------------------------- SIGTERM

def _cli_child(argv: list[str], err_path: str) -> int:
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    import cli as cli_mod

    return cli_mod.main(argv)


def _start(argv: list, err_path: Path):
    """``cli.py ARGV`` in a child process (forked while CUDA is untouched: torch already imported), its
    stderr in ``err_path``; returns the child process."""
    import cli as cli_mod

    cli_mod.build_parser()                      # import every command module once, before forking
    return in_child(_cli_child, [str(a) for a in argv], str(err_path), env={"KC_FAULT": ""})


def _wait_for(cond: Callable[[], bool], proc, timeout: float = 300.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert proc.is_alive(), "the command ended before the signal"
        assert time.monotonic() - t0 < timeout, "the command made no progress"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.xdist_group("subprocess")
def test_sigterm_during_train_keeps_the_last_checkpoint_and_exits_143(tmp_path):
    from common.checkpoints import load_checkpoint

    run, err = tmp_path / "run", tmp_path / "err.txt"
    pid = _start(["train", "--arch", "vgg_tiny", "--image_size", 16, "--batch_size", 64, "--train_images", 256,
                  "--epochs", 1000, "--eval_every", 1000, "--out_dir", run], err)
    _wait_for(lambda: (run / "last.pt.sha256").exists(), pid)
    os.kill(pid.pid, signal.SIGTERM)
    assert exit_status(pid) == 143
    text = flat(err.read_text())
    assert "terminated (SIGTERM)" in text and "--resume" in text and "Traceback" not in text
    assert load_checkpoint(run / "last.pt")["epoch"] >= 0          # kept, and its checksum matches
    assert not (run / ".lock").exists()


@pytest.mark.xdist_group("subprocess")
def test_sigterm_during_extract_leaves_a_resumable_file_and_exits_143(tmp_path):
    from features import store
    from tests.fakedata import tiny_checkpoint

    ck = tiny_checkpoint(tmp_path / "a.pt")
    out, err = tmp_path / "f.h5", tmp_path / "err.txt"
    pid = _start(["extract", "--nets", f"a={ck}", "--conv_layer", 4, "--split", "test", "--limit", 3000,
                  "--batch_size", 2, "--flush_s", 0.05, "--out", out], err)
    _wait_for(lambda: store.lock_path(out).exists() and out.exists(), pid)
    time.sleep(0.5)                                               # a few batches written
    os.kill(pid.pid, signal.SIGTERM)
    assert exit_status(pid) == 143
    text = flat(err.read_text())
    assert "terminated (SIGTERM)" in text and "--resume" in text and "Traceback" not in text
    with store.open_features(out) as f:
        ds = f["test/a/features.4"]
        assert not ds.attrs["complete"] and 0 < int(ds.attrs["rows_done"]) < 3000
