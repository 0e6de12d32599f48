"""Knowledge Evolution (Taha et al., CVPR 2021): split masks, re-initialisation between generations
and slim-network extraction. Pure functions over ``nn.Module``s; no I/O (``training/evolution.py``
runs the generations and writes the files).

Every conv/linear weight is split into a *fit hypothesis* (a fixed binary mask, stored with the
weights, never applied in the forward pass) and a *reset hypothesis* (re-drawn before each new
generation).

- KELS (kernel level): a layer keeps its first ``ceil(k * out)`` filters and, of each filter, the
  input channels that carry kept channels of the layer before. The first conv keeps every input
  (RGB) channel; the classifier keeps every output (class).
- WELS (weight level): an i.i.d. Bernoulli(k) mask per weight; no slim network.

Which input channels are "kept" is found by tracing the channel flow with ``torch.fx`` rather than
by walking module lists in lockstep (the original's trap): a tensor node carries a boolean mask
over its channel dimension (dim 1), and

- placeholder (the image): every channel kept;
- conv / linear: outputs ``first ceil(k * out)`` (every output for a *head*, a layer whose output
  reaches the net's output without another conv/linear in between: the classifier);
- ``torch.cat(..., dim=1)`` (DenseNet dense layers, GoogLeNet inception outputs): the concatenation
  of its inputs' masks, so each concatenated chunk keeps its own first channels;
- flatten of (N, C, H, W) to (N, C*H*W) (KDNet5, AlexNet, torchvision VGG classifiers): each kept
  channel keeps its H*W features (channel-major order);
- anything else that keeps the channel count (BN, ReLU, pooling, dropout, residual ``add``):
  the mask passes through; the inputs of an ``add`` must agree (KELS keeps the first channels
  everywhere, so both branches of a residual sum keep the same subset).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from common.errors import UserError
from common.registry import unknown_choice_message
from training.family_config import SPLIT_MODES  # re-exported: its old home

SPLIT_TYPES = (nn.Conv2d, nn.Linear)          # layers with a fit/reset split
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)    # kept whole between generations; sliced for the slim net


@dataclass(frozen=True)
class LayerSplit:
    """The KELS channel selection of one module (by module path)."""

    path: str
    kind: str                 # "conv" | "linear" | "bn"
    keep_in: torch.Tensor     # (C_in,) bool; for BN the channel mask (keep_in == keep_out)
    keep_out: torch.Tensor    # (C_out,) bool
    head: bool = False        # classifier: keeps every output


def kept_count(n: int, k: float) -> int:
    """ceil(k * n), robust to float noise (ceil(0.1 * 30) is 3, not 4); at least 1."""
    return max(1, math.ceil(k * n - 1e-9))


def first_channels(n: int, k: float) -> torch.Tensor:
    """(n,) bool: the first ceil(k * n) entries."""
    m = torch.zeros(n, dtype=torch.bool)
    m[:kept_count(n, k)] = True
    return m


def check_split(mode: str, split_rate: float) -> None:
    if mode not in SPLIT_MODES:
        raise UserError(unknown_choice_message("split mode", mode, list(SPLIT_MODES)))
    if not 0.0 < float(split_rate) < 1.0:
        raise UserError(f"--split_rate must lie strictly between 0 and 1 (the fraction of each layer kept "
                        f"in the fit hypothesis), got {split_rate}")


# --------------------------------------------------------------------------- tracing the channel flow

def _trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """fx graph of ``model`` with shapes (``node.meta['tensor_meta']``) from one eval-mode pass.
    The modules' train/eval flags are restored; BN statistics are not touched (eval mode)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        gm = fx.symbolic_trace(model)
        p = next(model.parameters(), None)
        x = example.to(p.device, p.dtype) if p is not None else example
        with torch.no_grad():
            ShapeProp(gm).propagate(x)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"Knowledge Evolution traces the channel flow with torch.fx; {type(model).__name__} "
                        f"cannot be traced ({type(e).__name__}: {e})") from e
    finally:
        for m, t in modes.items():
            m.training = t
    return gm


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _is_split_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), SPLIT_TYPES)


def _head_layers(gm: fx.GraphModule) -> set[str]:
    """Conv/linear module paths whose output reaches the graph output with no conv/linear between."""
    heads: set[str] = set()
    out = [n for n in gm.graph.nodes if n.op == "output"]
    stack, seen = list(out), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_split_call(gm, node):
            heads.add(node.target)
            continue
        stack.extend(node.all_input_nodes)
    return heads


def head_layers(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Module paths of the classifier layer(s): they keep every output under KELS, and their bias
    is never re-drawn."""
    return _head_layers(_trace(model, example))


def _tensor_inputs(node: fx.Node, masks: dict[fx.Node, torch.Tensor | None]) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if masks.get(a) is not None]


def _flow(node: fx.Node, masks: dict[fx.Node, torch.Tensor | None]) -> torch.Tensor | None:
    """Channel mask of the output of a parameter-free op, from its inputs' masks and the shapes."""
    shape = _shape(node)
    if shape is None or len(shape) < 2:
        return None  # sizes, tuples, scalars: no channels
    ins = _tensor_inputs(node, masks)
    if not ins:
        return None  # a constant made inside the forward (no channel of the input flows into it)
    if node.op == "call_function" and node.target in (torch.cat, torch.concat):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        parts = node.args[0]
        if dim % len(shape) == 1:  # channel concat: one chunk per input
            return torch.cat([masks[p] for p in parts])
    c = shape[1]
    same = [a for a in ins if _shape(a) is not None and len(_shape(a)) == len(shape) and _shape(a)[1] == c]
    if same:
        first = masks[same[0]]
        for other in same[1:]:
            if not torch.equal(masks[other], first):
                raise UserError(f"KELS: op {node.name} ({node.target}) combines tensors that keep different "
                                f"channels; the slim network could not represent it")
        return first
    if len(ins) == 1:
        in_shape = _shape(ins[0])
        if in_shape is not None and len(in_shape) > 2 and len(shape) == 2 and \
                shape[1] == math.prod(in_shape[1:]):
            # flatten (N, C, H, W) -> (N, C*H*W): channel-major, each channel owns H*W features
            return masks[ins[0]].repeat_interleave(math.prod(in_shape[2:]))
    raise UserError(f"KELS cannot follow the channels through op {node.name} ({node.op} {node.target}): "
                    f"its output has {c} channels, its inputs {[_shape(a) for a in ins]}")


def channel_plan(model: nn.Module, split_rate: float, example: torch.Tensor) -> dict[str, LayerSplit]:
    """KELS channel selection of every conv, linear and BN module, keyed by module path.

    ``example``: one input batch (1, C, H, W) of the size the net is used at (it fixes flatten sizes).
    """
    check_split("kels", split_rate)
    gm = _trace(model, example)
    heads = _head_layers(gm)
    masks: dict[fx.Node, torch.Tensor | None] = {}
    plan: dict[str, LayerSplit] = {}

    def record(s: LayerSplit) -> None:
        prev = plan.get(s.path)
        if prev is not None and not (torch.equal(prev.keep_in, s.keep_in) and torch.equal(prev.keep_out, s.keep_out)):
            raise UserError(f"KELS: module {s.path} is called twice with different channel selections")
        plan[s.path] = s

    def input_mask(node: fx.Node, path: str, want: int) -> torch.Tensor:
        m = masks.get(node.args[0]) if node.args else None
        if m is None or len(m) != want:
            raise UserError(f"KELS: the input of {path} has no channel mask of length {want}")
        return m

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            masks[node] = torch.ones(shape[1], dtype=torch.bool) if shape and len(shape) >= 2 else None
        elif node.op == "call_module":
            mod = gm.get_submodule(node.target)
            path = node.target
            if isinstance(mod, nn.Conv2d):
                if mod.groups != 1:
                    raise UserError(f"KELS cannot split grouped conv {path} (groups={mod.groups})")
                keep_in = input_mask(node, path, mod.in_channels)
                keep_out = (torch.ones(mod.out_channels, dtype=torch.bool) if path in heads
                            else first_channels(mod.out_channels, split_rate))
                record(LayerSplit(path, "conv", keep_in, keep_out, path in heads))
                masks[node] = keep_out
            elif isinstance(mod, nn.Linear):
                keep_in = input_mask(node, path, mod.in_features)
                keep_out = (torch.ones(mod.out_features, dtype=torch.bool) if path in heads
                            else first_channels(mod.out_features, split_rate))
                record(LayerSplit(path, "linear", keep_in, keep_out, path in heads))
                masks[node] = keep_out
            elif isinstance(mod, BN_TYPES):
                keep = input_mask(node, path, mod.num_features)
                record(LayerSplit(path, "bn", keep, keep))
                masks[node] = keep
            elif any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
                raise UserError(f"KELS cannot split module {path} of type {type(mod).__name__}; supported "
                                f"layers with weights: Conv2d, Linear, BatchNorm1d/2d")
            else:
                masks[node] = _flow(node, masks)
        elif node.op in ("call_function", "call_method"):
            masks[node] = _flow(node, masks)
        else:  # get_attr, output
            masks[node] = None
    return plan


# --------------------------------------------------------------------------- weight masks

def _weight_mask(weight: torch.Tensor, keep_out: torch.Tensor, keep_in: torch.Tensor) -> torch.Tensor:
    """(out, in, *k) bool: kept outputs x kept inputs, every kernel position."""
    m = keep_out[:, None] & keep_in[None, :]  # (out, in)
    return m.view(*m.shape, *([1] * (weight.dim() - 2))).expand_as(weight).clone()


def kels_masks(model: nn.Module, plan: dict[str, LayerSplit]) -> dict[str, torch.Tensor]:
    """Bool masks keyed by parameter name (``<path>.weight``, ``<path>.bias``) of every conv/linear.
    A bias keeps the entries of kept outputs (all of them for the classifier)."""
    out: dict[str, torch.Tensor] = {}
    for path, s in plan.items():
        if s.kind == "bn":
            continue
        mod = model.get_submodule(path)
        out[f"{path}.weight"] = _weight_mask(mod.weight, s.keep_out, s.keep_in)
        if mod.bias is not None:
            out[f"{path}.bias"] = s.keep_out.clone()
    return out


def wels_masks(model: nn.Module, split_rate: float, seed: int, heads: set[str]) -> dict[str, torch.Tensor]:
    """i.i.d. Bernoulli(split_rate) masks over every conv/linear weight and bias (seeded); the
    classifier's bias is kept whole."""
    check_split("wels", split_rate)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for path, mod in model.named_modules():
        if not isinstance(mod, SPLIT_TYPES):
            continue
        for name in ("weight", "bias"):
            p = getattr(mod, name)
            if p is None:
                continue
            if name == "bias" and path in heads:
                out[f"{path}.bias"] = torch.ones(p.shape, dtype=torch.bool)
            else:
                out[f"{path}.{name}"] = torch.rand(p.shape, generator=gen) < split_rate
    return out


def split_masks(model: nn.Module, mode: str, split_rate: float, example: torch.Tensor,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """The fit-hypothesis masks of ``mode`` (kels | wels) keyed by parameter name."""
    check_split(mode, split_rate)
    if mode == "kels":
        return kels_masks(model, channel_plan(model, split_rate, example))
    return wels_masks(model, split_rate, seed, head_layers(model, example))


# --------------------------------------------------------------------------- between generations

def reinit(model: nn.Module, masks: dict[str, torch.Tensor], seed: int) -> nn.Module:
    """A copy of ``model`` for the next generation: in every conv/linear the masked (fit) weights
    are kept and the others re-drawn with the module's PyTorch default init (``reset_parameters``
    on a fresh copy, seeded); BN parameters and statistics, and every other parameter, are kept."""
    new = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for path, mod in new.named_modules():
            if not isinstance(mod, SPLIT_TYPES):
                continue
            fresh = copy.deepcopy(mod)
            fresh.reset_parameters()
            for name in ("weight", "bias"):
                p = getattr(mod, name)
                if p is None:
                    continue
                key = f"{path}.{name}" if path else name
                if key not in masks:
                    raise ValueError(f"no split mask for parameter {key}; masks cover {len(masks)} parameters")
                m = masks[key].to(p.device)
                if m.shape != p.shape:
                    raise ValueError(f"mask of {key} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(torch.where(m, p, getattr(fresh, name)))
    return new


# --------------------------------------------------------------------------- the slim network

def _set_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _idx(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    return mask.nonzero().squeeze(1).to(device)


def _slim_module(mod: nn.Module, s: LayerSplit) -> nn.Module:
    w = mod.weight
    fk = {"device": w.device, "dtype": w.dtype}
    i_in, i_out = _idx(s.keep_in, w.device), _idx(s.keep_out, w.device)
    with torch.no_grad():
        if isinstance(mod, nn.Conv2d):
            new = nn.Conv2d(len(i_in), len(i_out), mod.kernel_size, mod.stride, mod.padding, mod.dilation, 1,
                            mod.bias is not None, mod.padding_mode, **fk)
            new.weight.copy_(w[i_out][:, i_in])
        elif isinstance(mod, nn.Linear):
            new = nn.Linear(len(i_in), len(i_out), mod.bias is not None, **fk)
            new.weight.copy_(w[i_out][:, i_in])
        else:  # BatchNorm: the kept channels' parameters and running statistics
            new = type(mod)(len(i_out), mod.eps, mod.momentum, mod.affine, mod.track_running_stats, **fk)
            if mod.affine:
                new.weight.copy_(w[i_out])
            if mod.track_running_stats:
                new.running_mean.copy_(mod.running_mean[i_out])
                new.running_var.copy_(mod.running_var[i_out])
                new.num_batches_tracked.copy_(mod.num_batches_tracked)
        if getattr(mod, "bias", None) is not None and new.bias is not None:
            new.bias.copy_(mod.bias[i_out])
    new.train(mod.training)
    return new


def extract_slim(model: nn.Module, plan: dict[str, LayerSplit]) -> nn.Module:
    """The KELS slim network: a copy of ``model`` whose every conv/linear/BN is replaced, by module
    path, with a smaller one holding the masked block (kept outputs x kept inputs; kept BN channels)."""
    slim = copy.deepcopy(model)
    for path, s in plan.items():
        _set_module(slim, path, _slim_module(model.get_submodule(path), s))
    return slim


def zero_cross_weights(model: nn.Module, plan: dict[str, LayerSplit]) -> nn.Module:
    """A copy of ``model`` in which the weights from dropped input channels into kept outputs are 0.
    Then the kept channels (and the logits) depend only on kept channels, so in eval mode
    ``extract_slim(copy, plan)(x) == copy(x)``: the exact check of the slim extraction."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        for path, s in plan.items():
            if s.kind == "bn":
                continue
            w = new.get_submodule(path).weight  # (out, in, ...)
            cross = s.keep_out[:, None] & ~s.keep_in[None, :]
            w[cross.to(w.device)] = 0
    return new


def shrink_to_width(model: nn.Module, width: float, in_channels: int, input_size: int) -> nn.Module:
    """The net at width multiplier ``width`` (every layer but the classifier's outputs at
    ceil(width * channels); concatenated chunks each at their own ceil): the KELS sub-network of the
    full-width ``model``, with the corresponding blocks of its weights. ``training.models.build_model``
    calls this for ``width=`` so slim checkpoints (``arch_kwargs={"width": k}``) rebuild."""
    if not 0.0 < float(width) <= 1.0:
        raise UserError(f"width multiplier must be in (0, 1], got {width}")
    if float(width) == 1.0:
        return model
    example = torch.zeros(1, in_channels, input_size, input_size)
    return extract_slim(model, channel_plan(model, float(width), example))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
