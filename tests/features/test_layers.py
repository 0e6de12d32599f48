"""Layers by module path: aliases, nearest-path errors, fx points, in-place safety, listing."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from common.checkpoints import save_checkpoint
from common.errors import UserError
from features.layers import (
    LayerPoint,
    build_extractor,
    check_against_hooks,
    conv_layer_path,
    list_layers,
    output_shapes,
    resolve_block_aliases,
    resolve_layer,
)
from training.datasets import DataSpec
from training.models import build_model
from training.runner import ModelSpec, checkpoint_fields


def _eval(arch: str, seed: int = 0, in_channels: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    m = build_model(arch, 10, in_channels, 32).eval()
    # Non-trivial BN statistics so BN outputs are not a plain rescaling of the conv output.
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m


def _x(n: int = 3, c: int = 1, s: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(seed))


def test_conv_layer_alias_is_features_index_and_refuses_nets_without_features():
    vgg = _eval("vgg_tiny")
    assert conv_layer_path(vgg, 4) == "features.4"
    p = resolve_layer(vgg, "ignored", conv_layer=4)
    assert (p.name, p.node, p.point, p.conv_layer) == ("features.4", "features.4", "output", 4)
    with pytest.raises(UserError, match=r"out of range.*0\.\.11"):
        conv_layer_path(vgg, 12)
    with pytest.raises(UserError, match="no 'features' Sequential.*--layer"):
        resolve_layer(_eval("cifar_resnet20"), "x", conv_layer=3, net="r")


def test_negative_block_index_resolves_against_the_model():
    r20 = _eval("cifar_resnet20")            # 3 blocks per stage
    assert resolve_block_aliases(r20, "layer3.-1.add") == "layer3.2.add"
    assert resolve_block_aliases(r20, "layer2.-3.conv1") == "layer2.0.conv1"
    p = resolve_layer(r20, "layer3.-1.add")
    assert (p.name, p.node, p.point) == ("layer3.-1.add", "layer3.2.add", "fx:add")
    with pytest.raises(UserError, match="out of range"):
        resolve_block_aliases(r20, "layer3.-4.add")


def test_unknown_layer_lists_nearest_paths_and_points_to_list_layers():
    with pytest.raises(UserError) as e:
        resolve_layer(_eval("vgg_tiny"), "features.40", net="seed0", arch="vgg_tiny")
    msg = str(e.value)
    assert "'features.40'" in msg and "features.4" in msg and "list-layers --arch vgg_tiny" in msg
    with pytest.raises(UserError, match="layer3.2.add"):
        resolve_layer(_eval("cifar_resnet20"), "layer3.9.add")


@torch.no_grad()
def test_extracted_layer_equals_direct_forward_bitwise():
    m = _eval("vgg_tiny")
    x = _x()
    ex = build_extractor(m, [resolve_layer(m, "", conv_layer=4), resolve_layer(m, "logits")])
    assert ex.method == "fx"
    out = ex(x)
    assert torch.equal(out["features.4"], m.features[:5](x))
    assert torch.equal(out["logits"], m(x))


@torch.no_grad()
def test_inplace_relu_after_the_layer_does_not_change_what_is_stored():
    m = _eval("vgg_tiny")                     # features.1 = BN, features.2 = ReLU(inplace=True)
    assert isinstance(m.features[2], nn.ReLU) and m.features[2].inplace
    x = _x()
    want = m.features[:2](x)                  # BN output, before the in-place ReLU
    assert (want < 0).any()
    for method in ("fx", "hooks"):
        # A later point forces the ReLU to run after features.1 was produced.
        ex = build_extractor(m, [resolve_layer(m, "features.1"), resolve_layer(m, "features.8")], method=method)
        out = ex(x)
        assert torch.equal(out["features.1"], want), method
        assert torch.equal(out["features.8"], m.features[:9](x)), method


@torch.no_grad()
def test_fx_sum_before_relu_equals_manual_computation():
    m = _eval("cifar_resnet20")
    x = _x()
    ex = build_extractor(m, [resolve_layer(m, "layer3.-1.add"), resolve_layer(m, "layer3.-1")])
    out = ex(x)
    h = m.relu(m.bn1(m.conv1(x)))
    h = m.layer2(m.layer1(h))
    h = m.layer3[1](m.layer3[0](h))
    blk = m.layer3[2]
    identity = h if blk.downsample is None else blk.downsample(h)
    s = blk.bn2(blk.conv2(blk.relu(blk.bn1(blk.conv1(h))))) + identity
    assert torch.equal(out["layer3.-1.add"], s)
    assert (s < 0).any()                       # really before the ReLU
    assert torch.equal(out["layer3.-1"], torch.relu(s))   # a container path: the block's output


@torch.no_grad()
def test_torchvision_resnet_add_node_naming():
    import torchvision

    m = torchvision.models.resnet18(num_classes=4).eval()
    p = resolve_layer(m, "layer3.-1.add")
    assert p.node == "layer3.1.add"
    ex = build_extractor(m, [p])
    assert output_shapes(ex, (3, 64, 64)) == {"layer3.-1.add": (256, 4, 4)}


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        if h.sum() > 0:                        # data-dependent control flow: torch.fx cannot trace this
            h = h * 2
        return self.fc(h.mean(dim=(2, 3)))


@torch.no_grad()
def test_untraceable_model_falls_back_to_cloning_hooks():
    torch.manual_seed(0)
    m = _Untraceable().eval()
    m.bn.running_mean.fill_(0.3)
    x = _x(c=1)
    p = resolve_layer(m, "bn")
    ex = build_extractor(m, [p, resolve_layer(m, "logits")])
    assert ex.method == "hooks"
    out = ex(x)
    want = m.bn(m.conv(x))
    assert (want < 0).any() and torch.equal(out["bn"], want)
    assert torch.equal(out["logits"], m(x))
    with pytest.raises(UserError, match="nearest valid paths: bn"):
        resolve_layer(m, "bm")
    with pytest.raises(UserError, match="need torch.fx"):
        build_extractor(m, [LayerPoint("bn.add", "bn.add", "fx:add")])


def test_container_point_is_checked_against_hooks():
    m = _eval("cifar_resnet20")
    ex = build_extractor(m, [resolve_layer(m, "layer2")])
    check_against_hooks(m, ex, (1, 32, 32))   # passes: layer2's last node is its output


def test_self_check_accepts_a_net_that_computes_nan_and_still_catches_a_wrong_node():
    m = _eval("vgg_tiny")
    with torch.no_grad():
        m.features[1].running_var[0] = -1.0          # BN channel 0: sqrt(-1) = NaN, everywhere after it
    ex = build_extractor(m, [resolve_layer(m, "features.1"), resolve_layer(m, "features.4")])
    assert torch.isnan(ex(_x())["features.4"]).all()
    check_against_hooks(m, ex, (1, 32, 32))          # NaN == NaN here: the points are the modules' outputs
    wrong = build_extractor(m, [LayerPoint("features.1", "features.1", "output")])
    real_forward = wrong.forward
    wrong.forward = lambda x: {k: v + 1 for k, v in real_forward(x).items()}
    with pytest.raises(UserError, match="not what the module returns"):
        check_against_hooks(m, wrong, (1, 32, 32))


def test_list_layers_shapes_types_and_conv_index():
    rows = {r.path: r for r in list_layers(_eval("vgg_tiny"), (1, 32, 32))}
    assert rows["features.0"].type == "Conv2d" and rows["features.0"].shape == (16, 32, 32)
    assert rows["features.4"].shape == (32, 16, 16) and rows["features.4"].conv_layer == 4
    assert rows["features.11"].shape == (64, 4, 4)
    assert rows["classifier"].shape == (10,) and rows["classifier"].conv_layer is None
    res = {r.path: r for r in list_layers(_eval("cifar_resnet20"), (1, 32, 32))}
    assert res["layer3.2.add"].type == "add" and res["layer3.2.add"].shape == (64, 8, 8)
    assert all(r.conv_layer is None for r in res.values())


def test_list_layers_cli(cli, tmp_path):
    code, out, _ = cli("list-layers", "--arch", "vgg_tiny", "--in_channels", "1")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("features.8 "))
    assert line.split()[1:] == ["Conv2d", "64x8x8", "8"]
    m = _eval("cifar_resnet20")
    ck = tmp_path / "r.pt"
    save_checkpoint(ck, {**checkpoint_fields(ModelSpec("cifar_resnet20"), DataSpec(), 10, {}),
                         "state_dict": m.state_dict(), "epoch": 0, "metrics": {}})
    code, out, _ = cli("list-layers", "--checkpoint", ck)
    assert code == 0 and "layer3.2.add" in out and "input 1x32x32" in out
    code, _, err = cli("list-layers", "--arch", "vgg_tinny")
    assert code == 1 and "vgg_tiny" in err


def test_per_net_request_stores_each_nets_own_path_under_one_name():
    vgg, r20 = _eval("vgg_tiny"), _eval("cifar_resnet20")
    req = "mid=cnn:features.4,res:layer3.-1.add"
    p = resolve_layer(vgg, req, net="cnn")
    assert (p.name, p.node, p.point) == ("mid", "features.4", "output")
    p = resolve_layer(r20, req, net="res")
    assert (p.name, p.node, p.point) == ("mid", "layer3.2.add", "fx:add")
    assert resolve_layer(vgg, "mid=*:features.8", net="any").node == "features.8"
    with pytest.raises(UserError, match="no path for net 'other'"):
        resolve_layer(vgg, req, net="other")
    with pytest.raises(UserError, match="NAME=NET:PATH"):
        resolve_layer(vgg, "mid=features.4", net="cnn")
