"""Shared test set-up: one torch thread per pytest worker (the suite runs with -n 2 on 2 cores)."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")
# The decoded-image cache (training/device_data.py) of every test and its children: never the user's ~/.cache.
os.environ.setdefault("KC_DATA_CACHE", tempfile.mkdtemp(prefix="kc-test-images-"))
# torch.cuda.is_available() asks NVML, not the CUDA runtime: a runtime probe initialises the driver, and a
# child forked after it (tests/processes.py forks while CUDA is untouched) fails its first CUDA call
# with "initialization error". Read at each call, so setting it after the import holds.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
torch.set_num_threads(1)


@pytest.fixture
def cli(capsys):
    """Run ``cli.py`` in-process: returns (exit code, stdout, stderr)."""
    import cli as cli_mod

    def run(*argv: str):
        code = cli_mod.main([str(a) for a in argv])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
