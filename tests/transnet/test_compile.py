"""``--compile``: a fit whose training forward runs under torch.compile (inductor) equals the eager fit
to float tolerance, alone and fitted together with other pairs; an unknown mode is refused."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from common.checkpoints import load_checkpoint
from common.errors import UserError
from tests.fakedata import FAST_FIT, planted_features
from transnet.fit import fit_transnet
from transnet.group_fit import FitJob, fit_group

FIT = replace(FAST_FIT, orders=2, kernel=3, input_norm="instance", epochs=3, lr=0.01, eval_every=3, save_every=3)


def _same(a, b):
    sa, sb = load_checkpoint(a / "transnet.pt")["state_dict"], load_checkpoint(b / "transnet.pt")["state_dict"]
    for k, v in sa.items():
        assert torch.allclose(v, sb[k], rtol=1e-4, atol=1e-5), (k, (v - sb[k]).abs().max())
    ra, rb = (json.loads((d / "metrics.json").read_text())["r2"] for d in (a, b))
    assert rb == pytest.approx(ra, abs=1e-5)


def _compiled_equals_eager(root, mode: str, **fit) -> None:
    """Two pairs fitted eagerly, each under ``--compile mode``, and both together under it: the same fits."""
    planted = planted_features(root / "planted.h5")
    cfgs = [replace(FIT, features=str(planted), source=s, target=t, layer="conv", **fit)
            for s, t in (("a", "b"), ("b", "a"))]
    for c in cfgs:
        fit_transnet(c, root / "eager" / c.source)
        fit_transnet(replace(c, compile=mode), root / "compiled" / c.source)
        _same(root / "eager" / c.source, root / "compiled" / c.source)
    fit_group([FitJob(replace(c, compile=mode), root / "together" / c.source) for c in cfgs])
    for c in cfgs:
        _same(root / "eager" / c.source, root / "together" / c.source)


@pytest.mark.slow
def test_a_compiled_fit_equals_the_eager_fit_alone_and_together(tmp_path, monkeypatch):
    calls, real = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append(kw["mode"]) or real(m, **kw))
    _compiled_equals_eager(tmp_path, "default")
    assert calls == ["default"] * 3                    # each compiled fit, and the group, compiled its forward once
    assert json.loads((tmp_path / "compiled" / "a" / "config.json").read_text())["config"]["compile"] == "default"


def test_an_unknown_compile_mode_is_refused(tmp_path):
    with pytest.raises(UserError, match="unknown --compile 'fast'; valid: off, default, reduce-overhead, max-autotune"):
        fit_transnet(replace(FIT, features="f.h5", source="a", target="b", layer="conv", compile="fast"), tmp_path)


def test_cudagraphs_is_refused_off_cuda_before_anything_is_written(tmp_path):
    planted = planted_features(tmp_path / "planted.h5")
    cfg = replace(FIT, features=str(planted), source="a", target="b", layer="conv", compile="cudagraphs",
                  device="cpu")
    with pytest.raises(UserError, match="--compile cudagraphs captures CUDA graphs and needs a CUDA device, not cpu"):
        fit_transnet(cfg, tmp_path / "alone")
    with pytest.raises(UserError, match="needs a CUDA device"):
        fit_group([FitJob(replace(cfg, source=s, target=t), tmp_path / s) for s, t in (("a", "b"), ("b", "a"))])
    assert not (tmp_path / "alone").exists() and not (tmp_path / "a").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check runs this)")
@pytest.mark.parametrize("mode", ["off", "cudagraphs"])
def test_on_cuda_fits_alone_and_together_equal_the_eager_fit(tmp_path, mode):
    """On CUDA (channels_last, fused Adam, cuDNN's grouped convolutions): eager fits alone and together
    (``off``), and under CUDA graphs, equal the eager fit alone."""
    _compiled_equals_eager(tmp_path, mode, device="cuda", precision="fp32")
