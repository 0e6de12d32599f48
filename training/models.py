"""Architectures (a registry): torchvision ImageNet-size nets and small CIFAR-size nets, plus two
open-ended name spaces that resolve through the same :func:`build_model`:

- ``timm:NAME``: any timm model, ``pretrained=False`` (``training/timm_models.py``);
- ``model:package.module:callable``: the ``nn.Module`` your own code returns (``training/user_models.py``).

``build_model(arch, num_classes, in_channels, input_size, **arch_kwargs)`` returns a CPU module; the
caller moves it to a device. Module paths are stable (``features.N`` for VGG-style nets, ``layerK``
for ResNets) because feature files store them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torchvision.models as tvm

from common.errors import UserError
from common.registry import Registry, UnknownNameError
from training.names import EXTERNAL_ARCHS, arch_names  # noqa: F401 (re-exported: their old home)

ARCHS: Registry[Callable[..., nn.Module]] = Registry("arch")

# Metadata per arch: the smallest input it accepts and the size it was designed for.
ARCH_INFO: dict[str, dict[str, Any]] = {}


def register_arch(name: str, *, family: str, default_size: int, min_size: int):
    def deco(fn):
        ARCHS.add(name, fn)
        ARCH_INFO[name] = {"family": family, "default_size": default_size, "min_size": min_size}
        return fn
    return deco


def _first_conv_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first conv so the net takes ``in_channels`` (grayscale data)."""
    if in_channels == 3:
        return model
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                            mod.dilation, mod.groups, mod.bias is not None)
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return model
    raise ValueError("model has no Conv2d")


# --------------------------------------------------------------------------- torchvision (224 px)

def _tv(builder: Callable[..., nn.Module], **fixed: Any) -> Callable[..., nn.Module]:
    def make(num_classes: int, in_channels: int = 3, **kw: Any) -> nn.Module:
        model = builder(weights=None, num_classes=num_classes, **fixed)
        return _first_conv_channels(model, in_channels)
    make.__name__ = builder.__name__
    return make


for _name in ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"):
    register_arch(_name, family="vgg", default_size=224, min_size=32)(_tv(getattr(tvm, _name)))
register_arch("alexnet", family="alexnet", default_size=224, min_size=63)(_tv(tvm.alexnet))
for _name in ("resnet18", "resnet34", "resnet50"):
    register_arch(_name, family="resnet", default_size=224, min_size=32)(_tv(getattr(tvm, _name)))
register_arch("densenet121", family="densenet", default_size=224, min_size=32)(_tv(tvm.densenet121))
register_arch("googlenet", family="googlenet", default_size=224, min_size=32)(
    _tv(tvm.googlenet, aux_logits=False, init_weights=True))


# --------------------------------------------------------------------------- small nets (32 px)

class KDNet5(nn.Module):
    """The KD seed's 5-layer CNN: three conv-BN-ReLU-pool blocks (32, 64, 128 ch) and two FC layers.

    ``features`` is a Sequential so ``--conv_layer N`` indexes it like VGG.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 32, dropout: float = 0.5,
                 input_size: int = 32):
        super().__init__()
        c = [width, width * 2, width * 4]
        layers: list[nn.Module] = []
        prev = in_channels
        for ch in c:
            layers += [nn.Conv2d(prev, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev = ch
        self.features = nn.Sequential(*layers)
        side = input_size // 8
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(c[2] * side * side, c[2]), nn.BatchNorm1d(c[2]),
                                        nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(c[2], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# Compact VGG configs: numbers are conv widths, "M" a 2x2 max-pool.
SMALL_VGG_CFG = {
    "vgg_small": [32, 32, "M", 64, 64, "M", 128, 128, "M", 256, "M"],
    "vgg_tiny": [16, "M", 32, "M", 64, "M"],
}


class SmallVGG(nn.Module):
    """VGG-style net for small images: conv-BN-ReLU units in ``features``, global pool, linear head."""

    def __init__(self, cfg: list, num_classes: int = 10, in_channels: int = 3, **kw: Any):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(prev, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                prev = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity  # the residual sum: an fx node `add` before the block's last ReLU
        return self.relu(out)


class CifarResNet(nn.Module):
    """ResNet for 32 px images: 3x3 stem, no max-pool. ``stages`` gives blocks and widths per stage."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int = 10, in_channels: int = 3,
                 **kw: Any):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        prev = widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            layer = []
            for j in range(n):
                layer.append(BasicBlock(prev, w, stride if j == 0 else 1))
                prev = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layer))
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class WideBasic(nn.Module):
    """Pre-activation wide-ResNet block."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu1 = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut = None if (stride == 1 and cin == cout) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        short = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + short


class WideResNet(nn.Module):
    """WRN-depth-k for 32 px images (Zagoruyko & Komodakis)."""

    def __init__(self, depth: int, k: int, num_classes: int = 10, in_channels: int = 3, **kw: Any):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        prev = widths[0]
        for i in range(3):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(prev, widths[i + 1], (1 if i == 0 else 2) if j == 0 else 1))
                prev = widths[i + 1]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(prev)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


register_arch("kdnet5", family="kdnet", default_size=32, min_size=8)(
    lambda num_classes, in_channels=3, input_size=32, **kw: KDNet5(num_classes, in_channels, input_size=input_size))
register_arch("vgg_small", family="vgg", default_size=32, min_size=16)(
    lambda num_classes, in_channels=3, **kw: SmallVGG(SMALL_VGG_CFG["vgg_small"], num_classes, in_channels))
register_arch("vgg_tiny", family="vgg", default_size=32, min_size=8)(
    lambda num_classes, in_channels=3, **kw: SmallVGG(SMALL_VGG_CFG["vgg_tiny"], num_classes, in_channels))
register_arch("cifar_resnet18", family="resnet", default_size=32, min_size=8)(
    lambda num_classes, in_channels=3, **kw: CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels))
register_arch("cifar_resnet20", family="resnet", default_size=32, min_size=8)(
    lambda num_classes, in_channels=3, **kw: CifarResNet([3, 3, 3], [16, 32, 64], num_classes, in_channels))
register_arch("cifar_resnet56", family="resnet", default_size=32, min_size=8)(
    lambda num_classes, in_channels=3, **kw: CifarResNet([9, 9, 9], [16, 32, 64], num_classes, in_channels))
register_arch("wrn16_2", family="wrn", default_size=32, min_size=8)(
    lambda num_classes, in_channels=3, **kw: WideResNet(16, 2, num_classes, in_channels))


# --------------------------------------------------------------------------- building and loading

def _external_builder(arch: str) -> Callable[..., nn.Module] | None:
    from training.timm_models import build_timm, is_timm
    from training.user_models import build_user_model, is_user_model

    return build_timm if is_timm(arch) else build_user_model if is_user_model(arch) else None


def width_key(arch: str) -> str:
    """The ``arch_kwargs`` key of the Knowledge-Evolution width multiplier: ``width`` for registry archs (older
    slim checkpoints use it), ``kels_width`` for timm / own models, whose builders may take a ``width`` of their own."""
    return "kels_width" if _external_builder(str(arch)) is not None else "width"


def slim_arch_kwargs(arch: str, arch_kwargs: dict[str, Any] | None, rate: float) -> dict[str, Any]:
    """``arch_kwargs`` of a slim (width ``rate``) copy of a net built with ``arch_kwargs``."""
    return {**(arch_kwargs or {}), width_key(arch): rate}


def default_input_size(arch: str) -> int | None:
    """The input size an arch was designed for: the registry's, timm's ``pretrained_cfg``, or None (own model)."""
    from training.timm_models import default_input_size as timm_size
    from training.timm_models import is_timm

    if is_timm(arch):
        return timm_size(arch)
    if arch in ARCH_INFO:
        return int(ARCH_INFO[arch]["default_size"])
    return None


def build_model(arch: str, num_classes: int | None, in_channels: int = 3, input_size: int | None = None,
                **kw: Any) -> nn.Module:
    """A freshly initialised CPU model. Unknown arch: the error lists every registered name.
    ``num_classes`` None (timm / own models only): the builder's own default."""
    external = _external_builder(str(arch))
    if num_classes is None and external is None:
        raise UserError(f"arch {arch!r} needs a class count (num_classes)")
    if num_classes is not None and num_classes < 1:
        raise UserError(f"num_classes must be >= 1, got {num_classes}")
    width = kw.pop(width_key(arch), None)
    if external is not None:
        size = input_size or default_input_size(arch)
        model = external(arch, num_classes, in_channels, size, **kw)
    else:
        try:
            fn = ARCHS.get(arch)
        except UnknownNameError as e:
            raise UserError(f"{e} Or timm:NAME (any timm model) or --model package.module:callable.") from None
        info = ARCH_INFO[arch]
        size = input_size or info["default_size"]
        if size < info["min_size"]:
            raise UserError(f"arch {arch!r} needs inputs of at least {info['min_size']} px, got {size}")
        model = fn(num_classes=num_classes, in_channels=in_channels, input_size=size, **kw)
    if width is not None and float(width) != 1.0:
        # Width multiplier (any arch): the Knowledge-Evolution KELS sub-network, every layer but the
        # classifier's outputs at ceil(width * channels). Slim checkpoints carry arch_kwargs={"width": k}.
        from training.ke import shrink_to_width

        model = shrink_to_width(model, float(width), in_channels, size)
    return model


def parse_model_kwargs(text: str | dict | None) -> dict[str, Any]:
    """``--model_kwargs``: a JSON object (a dict from a config file passes through); None is {}."""
    if text is None or text == "":
        return {}
    if isinstance(text, dict):
        return dict(text)
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--model_kwargs {text!r} is not JSON ({e.msg}); give an object such as "
                        f"'{{\"patch_size\": 4, \"depth\": 4}}'") from None
    if not isinstance(value, dict):
        raise UserError(f"--model_kwargs must be a JSON object (name: value), got {type(value).__name__}")
    return value


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes left by DDP (``module.``) or torch.compile (``_orig_mod.``)."""
    out = {}
    for k, v in state_dict.items():
        for p in ("module.", "_orig_mod."):
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load a state dict strictly; shape mismatches name the parameter and both shapes."""
    sd = strip_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise UserError(f"{source} does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    for k, v in sd.items():
        if own[k].shape != v.shape:
            raise UserError(f"{source}: parameter {k} has shape {tuple(v.shape)}, the model expects "
                            f"{tuple(own[k].shape)} (another class count or width?)")
    model.load_state_dict(sd)


def model_from_checkpoint(ckpt: dict[str, Any], source: str = "checkpoint", **expect: Any) -> nn.Module:
    """Rebuild the model a checkpoint describes. ``expect`` (e.g. ``num_classes=200``) is checked
    field by field, so a mismatch names the field and both values."""
    for key, want in expect.items():
        have = ckpt.get(key)
        if want is not None and have is not None and have != want:
            raise UserError(f"{source} has {key}={have!r}, expected {want!r}")
    if ckpt.get("kind") == "transnet" or "model_args" in ckpt:
        raise UserError(f"{source} is a Trans-Net checkpoint (written by fit-transnet), not a network; give a "
                        f"checkpoint written by train (or another family command)")
    if not ckpt.get("arch"):
        raise UserError(f"{source} is a bare state dict without 'arch'; pass --arch so the model can be built")
    bad = [k for k, ok in (("num_classes", isinstance(ckpt.get("num_classes"), int) and ckpt["num_classes"] > 0),
                           ("state_dict", isinstance(ckpt.get("state_dict"), dict))) if not ok]
    if bad:
        raise UserError(f"{source} (arch {ckpt['arch']!r}) lacks a valid {' and '.join(map(repr, bad))}; it is not "
                        f"a workbench network checkpoint")
    model = build_model(ckpt["arch"], int(ckpt["num_classes"]), int(ckpt.get("in_channels", 3)),
                        ckpt.get("input_size"), **ckpt.get("arch_kwargs", {}))
    load_weights(model, ckpt["state_dict"], source)
    return model
