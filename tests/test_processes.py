"""The tests' child processes: forked while CUDA is untouched, spawned once it was initialised (a forked
child cannot use CUDA then), and the same picklability asked of both so that neither breaks only on a
CUDA machine. (No torch import at module level: a spawned child imports this module.)"""
from __future__ import annotations

import os
import pickle

import pytest

from tests.processes import exit_status, in_child, start_method

_STATE = {"set_by_the_parent": False}


def _probe(forked: bool, env_value: str) -> int:
    """0 when the child saw what its start method implies (a fork keeps the parent's module state, a
    spawned interpreter imports this module afresh) and got the environment; 3 otherwise."""
    ok = _STATE["set_by_the_parent"] == forked and os.environ.get("KC_TEST_PROBE") == env_value
    return 0 if ok else 3


def _fails() -> int:
    raise RuntimeError("boom")


@pytest.mark.parametrize("cuda_initialised, method", [(False, "fork"), (True, "spawn")])
def test_children_are_forked_until_cuda_is_initialised_then_spawned(monkeypatch, cuda_initialised, method):
    import torch

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda_initialised)
    assert start_method() == method
    monkeypatch.setitem(_STATE, "set_by_the_parent", True)
    assert exit_status(in_child(_probe, method == "fork", "v1", env={"KC_TEST_PROBE": "v1"})) == 0
    assert exit_status(in_child(_probe, method != "fork", "v1", env={"KC_TEST_PROBE": "v1"})) == 3
    assert exit_status(in_child(_fails)) == 1


def test_a_lambda_is_refused_on_the_cpu_too():
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        in_child(lambda: 0)
