"""Nets beyond the registry: timm models by name (pretrained_cfg defaults, no downloads, local weights
in timm's formats) and your own module by entry point (provenance: entry, file sha256, weights sha256)."""
from __future__ import annotations

import json
import textwrap

import h5py
import pytest
import torch
from safetensors.torch import save_file

from common.checkpoints import load_checkpoint
from common.errors import UserError
from common.provenance import sha256_file
from training.datasets import DataSpec
from training.models import build_model, model_from_checkpoint
from training.runner import ModelSpec, resolve_data
from training.weights import load_weights_file

VIT = "timm:vit_tiny_patch16_224"
VIT_KW = {"patch_size": 4, "depth": 1, "embed_dim": 16, "num_heads": 2}
FAST = ["--epochs", 1, "--train_images", 32, "--batch_size", 16, "--device", "cpu", "--transform", "plain"]

OWN = textwrap.dedent('''
    import torch.nn as nn

    def build(num_classes, width=4):
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(width, num_classes))

    NOT_A_NET = 3

    def wrong():
        return "a string"
''')


def test_timm_arch_takes_input_size_and_normalisation_from_pretrained_cfg_unless_given():
    d = resolve_data(DataSpec(), ModelSpec(VIT))
    assert (d.image_size, d.mean, d.std) == (224, "0.5", "0.5")          # vit: mean = std = 0.5 per channel
    d = resolve_data(DataSpec(channels=3), ModelSpec("timm:resnet18"))
    assert d.mean == "0.485,0.456,0.406" and d.image_size == 224
    given = DataSpec(image_size=32, mean="0.1", std="0.2")
    assert resolve_data(given, ModelSpec(VIT)) == given
    assert resolve_data(DataSpec(), ModelSpec("vgg_tiny")) == DataSpec()    # registry archs: unchanged


def test_hub_downloads_and_unknown_timm_names_are_refused():
    with pytest.raises(UserError, match="never downloads"):
        build_model("timm:hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", 10)
    with pytest.raises(UserError, match="pretrained=False"):
        build_model(VIT, 10, 3, 32, pretrained=True, **VIT_KW)
    with pytest.raises(UserError, match="never downloads"):
        load_weights_file(torch.nn.Linear(2, 2), "hf-hub:timm/resnet18.a1_in1k")
    with pytest.raises(UserError, match="unknown timm model 'vit_tinyy_patch16_224'.*vit_tiny_patch16_224"):
        build_model("timm:vit_tinyy_patch16_224", 10)


def test_timm_weights_load_from_safetensors_and_timm_checkpoints_strictly(tmp_path):
    torch.manual_seed(0)
    src = build_model("timm:resnet10t", 5, 1, 32)
    sd = src.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"model": sd, "epoch": 9}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        dst = build_model("timm:resnet10t", 5, 1, 32)
        load_weights_file(dst, str(tmp_path / name))
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(UserError, match=r"fc\.(weight|bias) has shape \(5,.*the model expects \(7,"):
        load_weights_file(build_model("timm:resnet10t", 7, 1, 32), str(tmp_path / "w.safetensors"))


def test_cli_trains_a_timm_vit_at_32_px_and_the_checkpoint_rebuilds_it(cli, tmp_path):
    code, _, err = cli("train", "--arch", VIT, "--model_kwargs", json.dumps(VIT_KW), "--image_size", 32, *FAST,
                       "--out_dir", tmp_path / "vit")
    assert code == 0, err
    ck = load_checkpoint(tmp_path / "vit" / "last.pt")
    assert ck["arch"] == VIT and ck["arch_kwargs"] == VIT_KW and ck["input_size"] == 32
    assert ck["transform"]["mean"] == [0.5] and ck["in_channels"] == 1      # pretrained_cfg, grayscale
    m = model_from_checkpoint(ck)
    assert m.patch_embed.grid_size == (8, 8) and len(m.blocks) == 1
    code, out, err = cli("list-layers", "--checkpoint", tmp_path / "vit" / "last.pt")
    assert code == 0 and "blocks.0.add_1 " in out and "65x16" in out, err   # the block output: 1 + 8x8 tokens


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    (tmp_path / "kc_own_nets.py").write_text(OWN)
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "kc_own_nets.py"
    import sys

    sys.modules.pop("kc_own_nets", None)


def test_own_model_by_entry_point_trains_extracts_and_records_its_code(cli, tmp_path, own_module):
    code, out, err = cli("list-layers", "--model", "kc_own_nets:build", "--model_kwargs", '{"width": 6}',
                         "--input_size", 16, "--in_channels", 1)
    assert code == 0 and "6x16x16" in out, err
    start = tmp_path / "start.pt"
    torch.manual_seed(1)
    torch.save(build_model("model:kc_own_nets:build", 10, 1, 32, width=6).state_dict(), start)
    code, _, err = cli("train", "--model", "kc_own_nets:build", "--model_kwargs", '{"width": 6}', "--weights", start,
                       *FAST, "--out_dir", tmp_path / "own")
    assert code == 0, err
    ck = load_checkpoint(tmp_path / "own" / "last.pt")
    assert ck["arch"] == "model:kc_own_nets:build" and ck["model_entry"] == "kc_own_nets:build"
    assert ck["model_file_sha256"] == sha256_file(own_module) and ck["weights_sha256"] == sha256_file(start)
    out = tmp_path / "f.h5"
    code, _, err = cli("extract", "--nets", f"own={tmp_path / 'own' / 'last.pt'}", "--layer", "0", "--split", "test",
                       "--limit", 4, "--out", out)
    assert code == 0, err
    with h5py.File(out, "r") as f:
        d = f["test/own/0"]
        assert d.shape == (4, 6, 32, 32) and d.attrs["model_file_sha256"] == sha256_file(own_module)
    own_module.write_text(OWN + "\n# edited\n")                             # the code changed since training
    code, _, err = cli("extract", "--nets", f"own={tmp_path / 'own' / 'last.pt'}", "--layer", "0", "--split", "test",
                       "--limit", 4, "--out", tmp_path / "g.h5")
    assert code != 0 and "model code changed" in err


def test_own_model_entry_point_errors_name_the_problem(own_module):
    with pytest.raises(UserError, match="package.module:callable"):
        build_model("model:kc_own_nets", 10)
    with pytest.raises(UserError, match="cannot import module 'kc_no_such'"):
        build_model("model:kc_no_such:build", 10)
    with pytest.raises(UserError, match="has no 'buld'.*build"):
        build_model("model:kc_own_nets:buld", 10)
    with pytest.raises(UserError, match="returned a str"):
        build_model("model:kc_own_nets:wrong", 10)
