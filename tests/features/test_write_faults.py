"""Faults of the machine while writing: a full disk during extraction, checkpoints and JSON outputs,
and bit flips in stored feature rows."""
from __future__ import annotations

import os
import resource
import signal
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from common import faults
from common.checkpoints import load_checkpoint, save_checkpoint
from common.errors import UserError
from common.files import WriteFailed, write_json
from features import store
from tests.fakedata import EXTRACT_BATCH as BS
from tests.fakedata import EXTRACT_ROWS as N
from tests.fakedata import tiny_checkpoint
from tests.processes import exit_status, flat, in_child


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ck") / "a.pt", seed=0)


@pytest.fixture
def fault(monkeypatch):
    """Set ``KC_FAULT`` for this test (the counts start from zero)."""
    def set_fault(spec: str) -> None:
        monkeypatch.setenv("KC_FAULT", spec)
        faults.reset()

    yield set_fault
    faults.reset()


def _argv(ckpt: Path, out: Path, *extra) -> list:
    return ["extract", "--nets", f"a={ckpt}", "--conv_layer", 4, "--split", "test", "--limit", N,
            "--batch_size", BS, "--dtype", "float32", "--out", out, *extra]


def _says(err: str, text: str) -> bool:
    """``text`` in a CLI error paragraph (wrapped at spaces and at the hyphens of a path)."""
    return "".join(text.split()) in "".join(err.split())


def _state(out: Path) -> tuple[bool, int]:
    with h5py.File(out, "r") as f:
        ds = f["test/a/features.4"]
        return bool(ds.attrs["complete"]), int(ds.attrs["rows_done"])


# --------------------------------------------------------------------------- full disk during extract

def test_full_disk_at_the_writer_stops_extract_and_resume_completes(cli, ckpt, tmp_path, fault):
    out, ref = tmp_path / "f.h5", tmp_path / "ref.h5"
    fault("h5_write:3:enospc")                     # the third write and every later one fail
    code, so, err = cli(*_argv(ckpt, out))
    assert code == 1 and so == ""
    assert _says(err, f"no space left on device while writing {out} (net 'a', layer 'features.4', split 'test')")
    assert "--resume" in err and "Traceback" not in err
    assert _state(out) == (False, 2 * BS)          # the two batches that landed, nothing more
    with h5py.File(out, "r") as f:                 # readers refuse it
        with pytest.raises(store.FeatureFileError, match="incomplete"):
            store.get_features(f, "test", "a", "features.4")
    fault("")
    assert cli(*_argv(ckpt, out, "--resume"))[0] == 0
    assert cli(*_argv(ckpt, ref))[0] == 0
    with h5py.File(out, "r") as f, h5py.File(ref, "r") as g:
        assert np.array_equal(f["test/a/features.4"][...], g["test/a/features.4"][...])
        assert bool(f["test/a/features.4"].attrs["complete"])


def test_full_disk_at_the_flush_marks_nothing_complete(cli, ckpt, tmp_path, fault):
    out = tmp_path / "f.h5"
    fault("h5_flush:1:eio")                        # every row written, the flush before the marks fails
    code, _, err = cli(*_argv(ckpt, out))
    assert code == 1 and "input/output error (EIO) while writing" in flat(err)
    assert _state(out) == (False, 0)


def _extract_with_small_file_limit(argv: list, err_path: Path, limit: int) -> int:
    """The extraction in this (forked) process with files limited to ``limit`` bytes: the kernel refuses
    the write beyond it (EFBIG), the way a full disk refuses it (ENOSPC), inside HDF5's own write."""
    import cli as cli_mod

    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return cli_mod.main([str(a) for a in argv])


@pytest.mark.xdist_group("subprocess")
def test_a_real_write_error_inside_hdf5_surfaces_with_exit_code_1(ckpt, tmp_path):
    out, err = tmp_path / "f.h5", tmp_path / "err.txt"
    import cli as cli_mod

    cli_mod.build_parser()                         # import the command modules before forking
    # 20 rows of 32x16x16 float32 are 655 kB: the file may grow to 300 kB only.
    pid = in_child(_extract_with_small_file_limit, _argv(ckpt, out), err, 300_000)
    assert exit_status(pid) == 1
    text = err.read_text()
    assert _says(text, f"file too large for this file system while writing {out} (net 'a'")
    assert "Traceback" not in text and "Exception ignored" not in text
    try:                                           # HDF5 may have recorded the unwritten chunk's space:
        with store.open_features(out) as f:        # then the file is refused as truncated
            assert not bool(f["test/a/features.4"].attrs["complete"])
    except store.FeatureFileError as e:
        assert str(out) in str(e)


# --------------------------------------------------------------------------- checkpoints and JSON

def test_full_disk_while_saving_a_checkpoint_names_it_and_keeps_the_old_one(ckpt, tmp_path, fault):
    p = tmp_path / "last.pt"
    first = load_checkpoint(ckpt)
    save_checkpoint(p, first)
    before = p.read_bytes()
    fault("atomic_write:1:enospc")
    with pytest.raises(WriteFailed, match=f"no space left on device while writing {p}; it keeps its previous"):
        save_checkpoint(p, {**first, "epoch": 7})
    assert p.read_bytes() == before and not list(tmp_path.glob("*.tmp"))
    assert load_checkpoint(p)["epoch"] == first["epoch"]


def test_full_disk_while_writing_json_names_the_file(tmp_path, fault):
    fault("atomic_write:1:enospc")
    with pytest.raises(WriteFailed, match=f"no space left on device while writing {tmp_path / 'm.json'}"):
        write_json(tmp_path / "m.json", {"a": 1})
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- a running extraction

def test_overwrite_beside_a_running_extraction_is_refused_with_its_pid(cli, ckpt, tmp_path):
    from tests.common.test_io_faults import held_by_child

    out = tmp_path / "f.h5"
    assert cli(*_argv(ckpt, out))[0] == 0
    before = out.read_bytes()
    with held_by_child(lambda: store.lock_features(out)) as pid:
        code, _, err = cli(*_argv(ckpt, out, "--overwrite"))
        assert code == 1 and _says(err, f"feature file {out} is in use by pid {pid} on")
        assert out.read_bytes() == before
    assert cli(*_argv(ckpt, out, "--overwrite"))[0] == 0
    assert not store.lock_path(out).exists()


# --------------------------------------------------------------------------- bit flips

def _flip_bit(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([b ^ (1 << bit)]))


def _row_offset(out: Path, row: int) -> int:
    """File offset of the middle of a stored row's chunk (one sample per chunk)."""
    with h5py.File(out, "r") as f:
        info = f["test/a/features.4"].id.get_chunk_info_by_coord((row, 0, 0, 0))
        return info.byte_offset + info.size // 2


def test_a_flipped_bit_in_a_stored_row_fails_the_read_naming_file_dataset_and_row(cli, ckpt, tmp_path):
    out = tmp_path / "f.h5"
    assert cli(*_argv(ckpt, out))[0] == 0
    _flip_bit(out, _row_offset(out, 7), 3)
    with store.open_features(out) as f:
        ds = store.get_features(f, "test", "a", "features.4")
        assert ds.fletcher32
        for read in (lambda: ds[...], lambda: store.read_rows(ds, 4, 12), lambda: ds[7]):
            with pytest.raises(store.FeatureFileError) as e:
                read()
            assert f"{out}: /test/a/features.4 rows 7 fail their fletcher32 checksum" in str(e.value)
        assert np.isfinite(ds[8:]).all() and np.isfinite(ds[:7]).all()      # the other rows read
    code, so, err = cli("inspect", out, "--verify")
    assert code == 1 and "FAILED   test/a/features.4: stored rows:" in so and "rows 7 fail" in so


def test_without_checksums_a_flip_is_caught_by_the_recount_of_inspect_verify(cli, ckpt, tmp_path):
    out = tmp_path / "f.h5"
    assert cli(*_argv(ckpt, out, "--no-checksum"))[0] == 0
    with h5py.File(out, "r") as f:
        assert not f["test/a/features.4"].fletcher32
        off = f["test/a/features.4"].id.get_chunk_info_by_coord((7, 0, 0, 0)).byte_offset
    _flip_bit(out, off + 4 * 10 + 3, 6)            # the top exponent bit of the 11th float32 of row 7
    code, so, _ = cli("inspect", out)
    assert code == 0 and "all finite (max |x|" in so and "recorded at write, --verify recounts" in so
    code, so, err = cli("inspect", out, "--verify")
    assert code == 1 and "MISMATCH test/a/features.4: stored rows (all 20): 0 non-finite, max |x| " in so
    assert "the stored values changed after they were written" in so


def test_checkpoints_carry_a_sha256_sidecar_checked_on_load(ckpt, cli, tmp_path):
    from common.checkpoints import sidecar_path
    from common.provenance import sha256_file

    p = tmp_path / "net.pt"
    digest = save_checkpoint(p, load_checkpoint(ckpt))
    assert sidecar_path(p).read_text() == f"{digest}  net.pt\n" and digest == sha256_file(p)
    _flip_bit(p, p.stat().st_size // 2, 0)
    with pytest.raises(UserError, match=f"checkpoint {p} does not match its checksum"):
        load_checkpoint(p)
    code, _, err = cli(*_argv(p, tmp_path / "f.h5"))
    assert code == 1 and "does not match its checksum" in flat(err) and not (tmp_path / "f.h5").exists()
    p2 = tmp_path / "old.pt"
    save_checkpoint(p2, load_checkpoint(ckpt))
    sidecar_path(p2).unlink()                      # a checkpoint of an older version: no sidecar
    assert load_checkpoint(p2)["arch"] == "vgg_tiny"


# --------------------------------------------------------------------------- why a file does not open

def test_open_failures_say_what_happened(ckpt, cli, tmp_path, monkeypatch):
    from tests.common.test_io_faults import held_by_child

    out = tmp_path / "f.h5"
    assert cli(*_argv(ckpt, out))[0] == 0

    def writing():                                 # a running extraction: its lock and the open file
        return store.lock_features(out), h5py.File(out, "a")

    with held_by_child(writing) as pid:
        with pytest.raises(store.FeatureFileError, match=f"is being written by pid {pid} on .*running extraction") as e:
            store.open_features(out)
        assert "--overwrite" not in str(e.value)
    with held_by_child(lambda: h5py.File(out, "a")):  # another program, without the workbench's lock
        with pytest.raises(store.FeatureFileError, match="locked by another process") as e:
            store.open_features(out)
        assert "--overwrite" not in str(e.value)
    for code, text, says in [(30, "Read-only file system", "read-only file system: it can be read but not changed"),
                             (28, "No space left on device", "no space left on device while opening"),
                             (13, "Permission denied", "no permission to write")]:
        def refuse(*a, code=code, text=text, **k):
            raise OSError(code, f"Unable to synchronously open file (errno = {code}, error message = '{text}')")

        monkeypatch.setattr(store.h5py, "File", refuse)
        with pytest.raises(store.FeatureFileError, match=says) as e:
            store.open_features(out, "a")
        assert "--overwrite" not in str(e.value)
    monkeypatch.undo()
    bad = tmp_path / "cut.h5"
    bad.write_bytes(out.read_bytes()[:2000])       # a copy that stopped early
    with pytest.raises(store.FeatureFileError, match=f"{bad} cannot be opened as HDF5 .*corrupt or truncated.*--overwrite"):
        store.open_features(bad)


def test_zeroed_metadata_names_the_file(ckpt, cli, tmp_path):
    out = tmp_path / "f.h5"
    assert cli(*_argv(ckpt, out))[0] == 0
    data = bytearray(out.read_bytes())
    at = data.index(b"TREE")                       # the root group's B-tree node
    data[at:at + 64] = bytes(64)
    out.write_bytes(bytes(data))
    code, _, err = cli("inspect", out)
    assert code == 1 and _says(err, f"feature file {out} is damaged: HDF5 cannot read its structure")
    assert "B-tree signature" in err


# --------------------------------------------------------------------------- the writer's host buffers

def test_host_buffers_are_reused_after_their_rows_are_written_and_the_rows_stay_intact(tmp_path):
    import torch

    from features.writer import FeatureWriter, HostBuffers, WriteBatch

    n, b, queued = 64, 4, 2
    want = torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    buffers = HostBuffers(pin=False)               # pinned on CUDA; the reuse is the same
    with store.open_features(tmp_path / "w.h5", "w") as f:
        store.create_features(f, "test", "a", "l", (n, 3, 5, 5), "float32", {}, preallocate=True, checksum=True)
        w = FeatureWriter(f, {"test/a/l": 0}, queued, 0.0, buffers=buffers)
        for s in range(0, n, b):
            host = buffers.take((b, 3, 5, 5), torch.float32)
            host.copy_(want[s:s + b])              # as the device-to-host copy fills it
            w.put(WriteBatch("test", s, s + b, {"test/a/l": host}, torch.tensor([[-9.0, 9.0]])))
        w.close()
        assert np.array_equal(store.get_features(f, "test", "a", "l")[...], want.numpy())
    # the batches in the queue, the one being written and the one being filled: never one per batch
    assert buffers.allocated <= queued + 2 < n // b
