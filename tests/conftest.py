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
