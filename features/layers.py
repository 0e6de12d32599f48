"""Layers by module path: resolve a request against the real model, list what a model offers, and
build an extractor that returns the activations at several points in one forward pass.

A *layer request* is what the user names and what the feature file stores as ``<layer>``:

- a module path, ``features.30`` (``--conv_layer 30`` is an alias for ``features.30``, the paper's
  index into a VGG/AlexNet ``features`` Sequential) or a container such as ``layer3`` (its output is
  the output of the last operation inside it, torchvision's convention);
- a torch.fx node that is no module's output, e.g. the residual sum of a ResNet block before its last
  ReLU, ``layer3.1.add``. A negative block index is resolved against the model, so
  ``layer3.-1.add`` is the last block of ``layer3`` whatever the depth;
- ``logits``, the model's output.

Node names follow torchvision's feature-extraction convention (``get_graph_node_names``): the module
path for a leaf module, the module path plus the op name for functions (``layer3.1.add``), and a
``_1``, ``_2`` suffix for repeated calls (``layer3.1.relu_1``).

Stored values are the point's output *before any later in-place op*: the extractor clones a returned
tensor right where it is produced whenever the graph uses it afterwards (e.g. an in-place ReLU after
a BatchNorm would otherwise overwrite the stored BN output). Models that torch.fx cannot trace fall
back to forward hooks that clone (module outputs only).
"""
from __future__ import annotations

import difflib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torchvision
from torchvision.models.feature_extraction import NodePathTracer

from common.errors import UserError
from features.store import LOGITS

_CONV_RE = re.compile(r"^features\.(\d+)$")


@dataclass(frozen=True)
class LayerPoint:
    """One resolved extraction point of one model."""

    name: str                      # the request, the dataset name in the file: 'features.30', 'layer3.-1.add'
    node: str                      # what it resolved to on this model: 'features.30', 'layer3.1.add'
    point: str                     # 'output' (a module's output), 'fx:<op>' (another graph node), 'logits'
    conv_layer: int | None = None  # the index when given as --conv_layer N

    def attrs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.name, "node": self.node, "point": self.point}
        if self.conv_layer is not None:
            out["conv_layer"] = self.conv_layer
        return out


@dataclass(frozen=True)
class LayerInfo:
    """A row of ``list-layers``."""

    path: str
    type: str
    shape: tuple[int, ...] | None   # output shape for one image, without the batch dimension
    conv_layer: int | None = None


# --------------------------------------------------------------------------- tracing

class TraceFailed(Exception):
    """torch.fx could not trace the model (data-dependent control flow, ...)."""


def _tracer() -> NodePathTracer:
    # torchvision's own defaults: wrap math and torchvision.ops, keep torchvision.ops modules as leaves.
    leaf = [obj for _, obj in inspect.getmembers(torchvision.ops)
            if inspect.isclass(obj) and issubclass(obj, nn.Module)]
    return NodePathTracer(autowrap_modules=(math, torchvision.ops), leaf_modules=leaf)


def trace(model: nn.Module) -> tuple[fx.GraphModule, dict[fx.Node, str]]:
    """Trace ``model`` in eval mode: a GraphModule and each node's torchvision-style name."""
    was_training = model.training
    model.eval()
    tracer = _tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... on untraceable code
        raise TraceFailed(f"{type(e).__name__}: {e}") from e
    finally:
        model.train(was_training)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.eval()
    # Map the GraphModule's nodes (same graph object) to their names.
    return gm, dict(tracer.node_to_qualname)


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def available_points(model: nn.Module) -> list[str]:
    """Every name a request may use: graph node names (when traceable) and module paths."""
    names: list[str] = []
    try:
        _, qual = trace(model)
        names += list(qual.values())
    except TraceFailed:
        pass
    seen = set(names)
    names += [p for p in module_paths(model) if p not in seen]
    return names + [LOGITS]


def nearest_paths(name: str, choices: list[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:  # fall back to the same prefix ('layer3.9.add' -> 'layer3.*')
        head = name.split(".")[0]
        close = [c for c in choices if c.split(".")[0] == head][:n]
    return close


# --------------------------------------------------------------------------- resolving requests

def conv_layer_path(model: nn.Module, index: int, net: str = "") -> str:
    """``--conv_layer N`` -> ``features.N``; nets without a ``features`` Sequential are refused."""
    who = f"net {net!r} ({type(model).__name__})" if net else type(model).__name__
    feats = getattr(model, "features", None)
    if not isinstance(feats, nn.Sequential):
        raise UserError(f"--conv_layer {index}: {who} has no 'features' Sequential to index (only VGG/AlexNet-"
                        f"style nets do); name the layer by module path with --layer instead, e.g. layer3.-1.add "
                        f"for a ResNet (python cli.py list-layers --arch ... lists them)")
    if not 0 <= index < len(feats):
        raise UserError(f"--conv_layer {index} is out of range for {who}: its features has indices 0..{len(feats) - 1} "
                        f"(python cli.py list-layers lists them)")
    return f"features.{index}"


def resolve_block_aliases(model: nn.Module, path: str) -> str:
    """Replace negative child indices (``layer3.-1.add``) by the child's real name (``layer3.1.add``)."""
    parts = path.split(".")
    mod: nn.Module | None = model
    out = []
    for part in parts:
        children = dict(mod.named_children()) if mod is not None else {}
        if mod is not None and re.fullmatch(r"-\d+", part):
            names = list(children)
            k = int(part)
            if not names or -k > len(names):
                raise UserError(f"layer {path!r}: index {part} is out of range for {'.'.join(out) or 'the model'}, "
                                f"which has {len(names)} children")
            part = names[k]
        out.append(part)
        mod = children.get(part) if mod is not None else None
    return ".".join(out)


def _match_node(name: str, qual: dict[fx.Node, str]) -> fx.Node | None:
    """The node a name stands for: an exact node name, or the last node inside a module path."""
    last = None
    depth = name.count(".")
    for node, q in qual.items():
        if q == name or ".".join(q.split(".")[: depth + 1]) == name:
            last = node
    return last


def split_request(request: str) -> tuple[str, dict[str, str]]:
    """A per-net request ``NAME=NET:PATH,NET:PATH[,*:PATH]`` (nets of different architectures compared
    at comparable depths under one dataset name) -> ``(NAME, {net: path})``; a plain path -> ``(path, {})``."""
    if "=" not in request:
        return request, {}
    alias, _, rest = request.partition("=")
    paths: dict[str, str] = {}
    for item in rest.split(","):
        net, sep, path = item.strip().partition(":")
        if not alias or "/" in alias or not sep or not net or not path or net in paths:
            raise UserError(f"layer request {request!r}: expected NAME=NET:PATH,NET:PATH (each net once, '*' for "
                            f"every other net), e.g. mid=cnn0:features.8,vit0:blocks.1")
        paths[net] = path
    return alias, paths


def layer_name(request: str) -> str:
    """The dataset name a request is stored under (the request itself, or NAME of ``NAME=NET:PATH,...``)."""
    return split_request(request)[0]


def resolve_layer(model: nn.Module, name: str, conv_layer: int | None = None, net: str = "",
                  arch: str = "") -> LayerPoint:
    """Resolve one request against the model; unknown names fail with the nearest valid paths.
    A per-net request (:func:`split_request`) resolves this net's path and is stored under its NAME."""
    alias, per_net = split_request(name) if conv_layer is None else (name, {})
    if per_net:
        path = per_net.get(net, per_net.get("*"))
        if path is None:
            raise UserError(f"layer request {name!r} names no path for net {net!r} (nets: "
                            f"{', '.join(per_net)}); add {net}:PATH or *:PATH")
        p = resolve_layer(model, path, None, net, arch)
        return LayerPoint(alias, p.node, p.point)
    if conv_layer is not None:
        name = conv_layer_path(model, conv_layer, net)
    if name == LOGITS:
        return LayerPoint(LOGITS, LOGITS, "logits")
    if not name or "/" in name:
        raise UserError(f"layer {name!r} is not a module path (dots, no '/')")
    node_name = resolve_block_aliases(model, name)
    modules = dict(model.named_modules())
    try:
        _, qual = trace(model)
    except TraceFailed:
        if node_name in modules and node_name:
            return LayerPoint(name, node_name, "output", conv_layer)
        _unknown(model, name, net, arch, "the model cannot be traced by torch.fx, so only module outputs "
                                           "(forward hooks) are available")
    node = _match_node(node_name, qual)
    if node is None:
        _unknown(model, name, net, arch)
    if node_name in modules:
        point = "output"
    else:
        point = f"fx:{_op_name(node)}"
    return LayerPoint(name, node_name, point, conv_layer)


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def _unknown(model: nn.Module, name: str, net: str, arch: str, extra: str = "") -> None:
    choices = [c for c in available_points(model) if c != LOGITS]
    close = nearest_paths(name, choices)
    who = f" of net {net!r}" if net else ""
    how = f"--arch {arch}" if arch else "--checkpoint CKPT"
    msg = f"unknown layer {name!r}{who}"
    if close:
        msg += f"; nearest valid paths: {', '.join(close)}"
    msg += f". python cli.py list-layers {how} lists every layer with its output shape."
    if extra:
        msg += " (" + extra + ")"
    raise UserError(msg)


# --------------------------------------------------------------------------- extractors

class FeatureExtractor(nn.Module):
    """``forward(x) -> {name: tensor}`` for the resolved points, in one pass, computing only what is needed.

    ``method`` is ``fx`` (a rewritten graph, truncated after the last point) or ``hooks`` (forward hooks
    that clone; the forward stops early when no later output is needed).
    """

    def __init__(self, model: nn.Module, points: list[LayerPoint], method: str, graph_module: fx.GraphModule | None):
        super().__init__()
        self.points = list(points)
        self.method = method
        self.model = model if method == "hooks" else None
        self.graph_module = graph_module
        self._store: dict[str, torch.Tensor] = {}

    def _install_hooks(self) -> list:
        """Hooks live only for the duration of one forward, so the model stays usable on its own."""
        wanted = [p for p in self.points if p.point != "logits"]
        need_logits = any(p.point == "logits" for p in self.points)
        by_module: dict[str, list[str]] = {}
        for p in wanted:
            by_module.setdefault(p.node, []).append(p.name)
        handles = []
        for path, names in by_module.items():
            mod = self.model.get_submodule(path)

            def hook(_m, _inp, out, names=names):
                for n in names:
                    self._store.setdefault(n, out.clone())   # first call of a shared module, like fx
                if not need_logits and len(self._store) == len(wanted):
                    raise _Stop()

            handles.append(mod.register_forward_hook(hook))
        return handles

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.method == "fx":
            return dict(self.graph_module(x))
        self._store = {}
        logits = None
        handles = self._install_hooks()
        try:
            logits = self.model(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        out = dict(self._store)
        self._store = {}
        for p in self.points:
            if p.point == "logits":
                out[p.name] = logits
        return {p.name: out[p.name] for p in self.points}


class _Stop(Exception):
    """Raised by a hook once every wanted output is stored: the rest of the forward is skipped."""


def build_extractor(model: nn.Module, points: list[LayerPoint], method: str = "auto") -> FeatureExtractor:
    """An extractor for ``points`` (from :func:`resolve_layer`). ``method``: auto (fx, else hooks), fx, hooks."""
    if not points:
        raise ValueError("no layer points")
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise UserError(f"layer requested twice: {sorted({n for n in names if names.count(n) > 1})}")
    model.eval()
    if method in ("auto", "fx"):
        try:
            gm, qual = trace(model)
        except TraceFailed as e:
            if method == "fx":
                raise UserError(f"torch.fx cannot trace {type(model).__name__} ({e})") from e
        else:
            _rewrite_outputs(gm, qual, points)
            return FeatureExtractor(model, points, "fx", gm)
    non_module = [p.name for p in points if p.point.startswith("fx:")]
    if non_module:
        raise UserError(f"layer(s) {non_module} are graph nodes, not module outputs; they need torch.fx, which "
                        f"cannot trace {type(model).__name__}: choose a module path")
    return FeatureExtractor(model, points, "hooks", None)


def _rewrite_outputs(gm: fx.GraphModule, qual: dict[fx.Node, str], points: list[LayerPoint]) -> None:
    """Make the graph return ``{name: node}`` for every point, drop everything after, and clone a returned
    node where the graph still uses it afterwards (a later in-place op must not change what is stored)."""
    graph = gm.graph
    old_out = next(n for n in graph.nodes if n.op == "output")
    chosen: dict[str, fx.Node] = {}
    for p in points:
        if p.point == "logits":
            src = old_out.args[0]
            if not isinstance(src, fx.Node):
                raise UserError(f"{type(gm).__name__}: the model's output is not a single tensor; logits unavailable")
            chosen[p.name] = src
        else:
            node = _match_node(p.node, qual)
            if node is None:  # resolve_layer checked this already
                raise UserError(f"layer {p.name!r} not found in the traced graph")
            chosen[p.name] = node
    graph.erase_node(old_out)
    last = list(graph.nodes)[-1]
    with graph.inserting_after(last):
        out_node = graph.output({k: v for k, v in chosen.items()})
    graph.eliminate_dead_code()
    # Clone where something else still reads the node (possibly in place) after it is produced.
    replace: dict[str, fx.Node] = {}
    for name, node in chosen.items():
        if any(u is not out_node for u in node.users):
            with graph.inserting_after(node):
                replace[name] = graph.call_method("clone", (node,))
    if replace:
        out_node.args = ({k: replace.get(k, v) for k, v in chosen.items()},)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def resolve_points(model: nn.Module, requests: list[tuple[str, int | None]], net: str = "",
                   arch: str = "") -> list[LayerPoint]:
    """Resolve several ``(name, conv_layer)`` requests (``name`` ignored when ``conv_layer`` is given)."""
    return [resolve_layer(model, name, conv, net, arch) for name, conv in requests]


@torch.no_grad()
def output_shapes(extractor: FeatureExtractor, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Per-image output shape of every point, by a dummy forward of one zero image on the CPU."""
    dev = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    out = extractor(torch.zeros((1,) + tuple(input_shape), device=dev))
    shapes = {}
    for k, v in out.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(f"layer {k!r} does not produce a tensor (got {type(v).__name__}); choose another point")
        shapes[k] = tuple(v.shape[1:])
    return shapes


# --------------------------------------------------------------------------- listing

@torch.no_grad()
def list_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerInfo]:
    """Every extraction point with its type and per-image output shape (dummy forward of zeros)."""
    model.eval()
    x = torch.zeros((1,) + tuple(input_shape))
    conv_ok = isinstance(getattr(model, "features", None), nn.Sequential)
    try:
        gm, qual = trace(model)
    except TraceFailed:
        return _list_by_hooks(model, x, conv_ok)
    from torch.fx.passes.shape_prop import ShapeProp

    ShapeProp(gm).propagate(x)
    rows = []
    for node, name in qual.items():
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        meta = node.meta.get("tensor_meta")
        shape = tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else None
        kind = type(gm.get_submodule(node.target)).__name__ if node.op == "call_module" else _op_name(node)
        rows.append(LayerInfo(name, kind, shape, _conv_index(name) if conv_ok else None))
    return rows


def _conv_index(name: str) -> int | None:
    m = _CONV_RE.match(name)
    return int(m.group(1)) if m else None


def _list_by_hooks(model: nn.Module, x: torch.Tensor, conv_ok: bool) -> list[LayerInfo]:
    shapes: dict[str, tuple[int, ...] | None] = {}
    handles = []
    for name, mod in model.named_modules():
        if name:
            def hook(_m, _i, out, name=name):
                shapes.setdefault(name, tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else None)
            handles.append(mod.register_forward_hook(hook))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    mods = dict(model.named_modules())
    return [LayerInfo(n, type(mods[n]).__name__, s, _conv_index(n) if conv_ok else None) for n, s in shapes.items()]


def format_layers(rows: list[LayerInfo]) -> str:
    """A plain-text table of :func:`list_layers` rows."""
    table = [("path", "type", "output shape", "conv_layer")]
    for r in rows:
        shape = "x".join(str(s) for s in r.shape) if r.shape is not None else "-"
        table.append((r.path, r.type, shape, "" if r.conv_layer is None else str(r.conv_layer)))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


@torch.no_grad()
def check_against_hooks(model: nn.Module, extractor: FeatureExtractor, input_shape: tuple[int, ...],
                        seed: int = 0) -> None:
    """Self-check on one random image: every module point of an fx extractor equals that module's
    output seen by a forward hook (catches a container whose last op is not what it returns)."""
    if extractor.method != "fx":
        return
    module_points = [p for p in extractor.points if p.point == "output"]
    if not module_points:
        return
    dev = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    x = torch.randn((1,) + tuple(input_shape), generator=torch.Generator().manual_seed(seed)).to(dev)
    want = build_extractor(model, module_points, method="hooks")(x)
    got = extractor(x)
    for p in module_points:          # bitwise equal, a NaN equal to a NaN (a net may compute NaN/inf there)
        g, w = got[p.name], want[p.name]
        if g.shape != w.shape or not torch.allclose(g, w, rtol=0.0, atol=0.0, equal_nan=True):
            raise UserError(f"layer {p.name!r}: the last graph node inside module {p.node!r} is not what the module "
                            f"returns; name the exact node instead (python cli.py list-layers lists them)")
