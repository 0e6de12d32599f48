"""Transformer layers as maps: token sequences to a patch grid, channels-last maps to channels-first,
vectors to 1x1, each checked against a manual reshape; timm ViT, ConvNeXt and Swin nets extracted at a
block's output from local weights files (state dict, timm checkpoint, safetensors)."""
from __future__ import annotations

import hashlib
import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.errors import UserError
from features.layers import build_extractor, resolve_layer
from features.tokens import TokenMap, map_tokens
from training.data import build_dataset
from training.datasets import DataSpec
from training.models import build_model

VIT = ("timm:vit_tiny_patch16_224", {"patch_size": 4, "depth": 2, "embed_dim": 24, "num_heads": 2})
DEIT = ("timm:deit_tiny_distilled_patch16_224", {"patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2})
SWIN = ("timm:swin_tiny_patch4_window7_224", {"window_size": 4, "depths": (1, 1, 1, 1), "embed_dim": 16,
                                              "num_heads": (1, 1, 1, 1)})
CONVNEXT = ("timm:convnext_atto", {"dims": (8, 16, 24, 32)})


def _net(spec, seed=0, in_chans=1):
    torch.manual_seed(seed)
    return build_model(spec[0], 10, in_chans, 32, **spec[1]).eval()


def _raw(model, path, x):
    """The module's own output, seen by a forward hook (the reference)."""
    got = {}
    h = model.get_submodule(path).register_forward_hook(lambda m, i, o: got.setdefault("o", o.detach().clone()))
    with torch.no_grad():
        model(x)
    h.remove()
    return got["o"]


def _mapped(model, layer, x, keep_prefix=False):
    ex = map_tokens(model, build_extractor(model, [resolve_layer(model, layer)]), tuple(x.shape[1:]), keep_prefix)
    with torch.no_grad():
        return ex, ex(x)


@pytest.mark.parametrize("spec,prefix", [(VIT, 1), (DEIT, 2)])
def test_vit_tokens_become_the_patch_grid_of_a_manual_reshape(spec, prefix):
    m = _net(spec)
    x = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    raw = _raw(m, "blocks.0", x).numpy()                          # (N, P + 64, C)
    assert raw.shape == (3, prefix + 64, 24)
    ex, out = _mapped(m, "blocks.0", x, keep_prefix=True)
    # numpy reference: patch (h, w) is token P + 8h + w
    want = np.empty((3, 24, 8, 8), dtype=raw.dtype)
    for h in range(8):
        for w in range(8):
            want[:, :, h, w] = raw[:, prefix + 8 * h + w, :]
    assert np.array_equal(out["blocks.0"].numpy(), want)
    assert np.array_equal(out["blocks.0.prefix"].numpy()[:, :, :, 0], raw[:, :prefix, :].transpose(0, 2, 1))
    assert ex.extra_attrs["blocks.0"] == {"point": "tokens->grid", "grid": [8, 8], "prefix_tokens": prefix}
    assert ex.extra_attrs["blocks.0.prefix"]["point"] == "tokens->prefix"


def test_swin_channels_last_stage_is_permuted_and_its_conv_stem_left_alone():
    m = _net(SWIN)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    raw = _raw(m, "layers.1", x)                                   # (N, H, W, C)
    assert raw.shape == (2, 4, 4, 32)
    ex, out = _mapped(m, "layers.1", x)
    assert torch.equal(out["layers.1"], raw.permute(0, 3, 1, 2))
    assert ex.extra_attrs["layers.1"] == {"point": "nhwc->nchw", "grid": [4, 4]}
    _, out2 = _mapped(m, "patch_embed.proj", x)                    # a Conv2d: already (N, C, H, W)
    assert torch.equal(out2["patch_embed.proj"], _raw(m, "patch_embed.proj", x))


def test_pooled_vector_is_stored_as_c_by_1_by_1_and_a_mismatched_token_count_is_refused():
    t = torch.arange(12.0).reshape(3, 4)
    assert torch.equal(TokenMap("vector->1x1").apply(t), t[:, :, None, None])
    m = _net(VIT)
    x = torch.zeros(1, 1, 32, 32)
    _, out = _mapped(m, "fc_norm", x)
    assert out["fc_norm"].shape == (1, 24, 1, 1)
    m.patch_embed.grid_size = (4, 4)                               # 65 tokens no longer fit 1 + 4*4
    with pytest.raises(UserError, match="65 tokens.*4x4"):
        _mapped(m, "blocks.0", x)


@pytest.mark.parametrize("spec,layer,fmt,want_point", [
    (VIT, "blocks.1", "pth", "tokens->grid"),
    (CONVNEXT, "stages.2", "timm", "output"),
    (SWIN, "layers.2", "safetensors", "nhwc->nchw"),
])
def test_extract_a_timm_block_from_a_local_weights_file(cli, tmp_path, spec, layer, fmt, want_point):
    m = _net(spec, seed=3)
    sd = m.state_dict()
    path = tmp_path / f"w.{fmt if fmt != 'timm' else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "timm":                                            # timm's training checkpoint layout
        torch.save({"epoch": 3, "arch": spec[0], "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        torch.save(sd, path)
    out = tmp_path / "f.h5"
    code, so, err = cli("extract", "--nets", f"t={path}", "--arch", spec[0], "--model_kwargs", json.dumps(spec[1]),
                        "--num_classes", 10, "--layer", layer,
                        "--dataset", "animal-mnist", "--channels", 1, "--image_size", 32, "--mean", "0.2",
                        "--std", "0.4", "--split", "test", "--limit", 6, "--dtype", "float32", "--out", out)
    assert code == 0, err
    ds = build_dataset(DataSpec(image_size=32, mean="0.2", std="0.4"), "test", train_transform=False)
    x = torch.stack([ds[i][0] for i in range(6)])
    raw = _raw(m, layer, x)
    want = {"tokens->grid": lambda r: r[:, 1:, :].reshape(6, 8, 8, -1).permute(0, 3, 1, 2),   # 1 + 8x8 tokens
            "output": lambda r: r, "nhwc->nchw": lambda r: r.permute(0, 3, 1, 2)}[want_point](raw)
    with h5py.File(out, "r") as f:
        d = f[f"test/t/{layer}"]
        assert d.attrs["point"] == want_point and d.attrs["arch"] == spec[0]
        assert d.ndim == 4 and d.attrs["weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        np.testing.assert_allclose(d[...], want.numpy(), rtol=1e-5, atol=1e-5)
    code, so, err = cli("inspect", out, "--verify", "--verify_rows", 2)      # rebuilt from the weights file
    assert code == 0 and "OK" in so, so + err
