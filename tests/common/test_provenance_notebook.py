"""Provenance written from a notebook names the notebook and the cell's call, not the kernel's argv."""
from __future__ import annotations

import linecache
import sys

from common.provenance import invocation, provenance


def test_a_command_line_is_recorded_as_given(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/repo/cli.py", "report", "runs/demo"])
    assert invocation() == "cli.py report runs/demo"


def test_a_notebook_kernel_records_the_notebook_and_the_call(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.11/site-packages/ipykernel_launcher.py", "-f",
                                      "/root/.local/share/jupyter/runtime/kernel-1.json"])
    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/01_quickstart.ipynb")
    cell = "/tmp/ipykernel_4242/1234.py"
    source = "record = provenance()\n"
    linecache.cache[cell] = (len(source), None, [source], cell)          # what IPython registers for a cell
    scope = {"provenance": provenance}
    exec(compile(source, cell, "exec"), scope)
    assert scope["record"]["command"] == "notebook notebooks/01_quickstart.ipynb: record = provenance()"
    assert "kernel-1.json" not in scope["record"]["command"]
    monkeypatch.delenv("JPY_SESSION_NAME")
    assert invocation().startswith("notebook a notebook (its name was not passed to the kernel)")
