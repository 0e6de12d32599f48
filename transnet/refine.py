"""Feature refinement (the paper's transClassifier): net A up to the layer and the Trans-Net, both
frozen, feed Σ_k m_k Y_k (the chosen orders) into net B's upper part, which is fine-tuned.

    python cli.py refine --net_a A.pt --net_b B.pt --transnet RUN --orders 0,1,2 --out_dir D

The report puts the refined classifier's top-1 next to the original net B and next to the fair
baseline the paper omits: B's own lower part (frozen) feeding B's upper part fine-tuned with the
same budget (epochs, optimiser, schedule, data). Paper preset: Adam, lr 1e-5 -> 1e-7 geometric,
100 epochs, batch 64 (weight decay 1e-4 is our choice; the README does not give one).

**Splitting a classifier at a layer.** ``split_at(model, layer)`` traces the model with torch.fx
(torchvision's ``NodePathTracer``, so layer names are the ones ``torchvision.models.feature_extraction``
uses: module paths such as ``features.30`` or ``layer3``, and non-module points such as
``layer3.1.add``, the residual sum before the block's last ReLU; a ``-1`` segment means the last
block: ``layer3.-1.add``). The lower part is every node the layer's value needs; the upper part
starts from a placeholder that stands for that value and keeps every node the output needs after
it. A split inside a residual block, where the upper part would also read a value from before the
layer (the skip connection), is refused with the crossing nodes named. For ``features.N`` nets
this is the slicing of ``features`` plus the net's own head (pool, flatten, classifier).
"""
from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from common.checkpoints import load_checkpoint
from common.device import use_device
from common.errors import UserError
from common.files import read_json
from common.finished import require_finished_result
from common.provenance import sha256_file
from common.registry import unknown_choice_message
from common.rundir import RunDir, is_finished
from features.identity import fitted_nets
from training.data import build_dataset
from training.datasets import DataSpec
from training.loop import TrainConfig, evaluate, make_loader, train
from training.models import model_from_checkpoint
from transnet.config import RefineConfig  # re-exported: their old home
from transnet.fit import load_transnet
from transnet.model import TransNet

# --------------------------------------------------------------------------- splitting

def resolve_layer_alias(model: nn.Module, layer: str) -> str:
    """``layer3.-1.add`` -> ``layer3.1.add``: negative segments index the preceding container."""
    parts, mod, out = layer.split("."), model, []
    for p in parts:
        if p.startswith("-") and p[1:].isdigit() and isinstance(mod, (nn.Sequential, nn.ModuleList)):
            i = len(mod) + int(p)
            if i < 0:
                raise UserError(f"layer {layer!r}: {p} is out of range for a container of {len(mod)}")
            p = str(i)
        out.append(p)
        mod = mod._modules.get(p) if isinstance(mod, nn.Module) else None
    return ".".join(out)


def _trace(model: nn.Module, leaf: str | None = None) -> tuple[fx.Graph, dict[fx.Node, str]]:
    """fx graph of ``model`` and each node's qualified name; ``leaf`` (a module path) is kept as one
    call so a container such as ``layer3`` has a node of its own (its output)."""
    from torchvision.models.feature_extraction import NodePathTracer

    class Tracer(NodePathTracer):
        def is_leaf_module(self, m: nn.Module, module_qualname: str) -> bool:
            return module_qualname == leaf or super().is_leaf_module(m, module_qualname)

    tracer = Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # dynamic control flow fx cannot follow
        raise UserError(f"cannot trace {type(model).__name__} with torch.fx to split it ({type(e).__name__}: {e}); "
                        f"refinement supports nets fx can trace (VGG/AlexNet features.N nets, ResNets, ...)") from e
    return graph, dict(tracer.node_to_qualname)


def layer_names(model: nn.Module) -> list[str]:
    """Every point ``split_at`` accepts: fx points (module outputs and operations such as
    ``layer3.1.add``) in execution order, then container modules (``layer3``, ``features``)."""
    _, names = _trace(model)
    points = [q for q in names.values() if q != "x"]
    known = set(points)
    return points + [n for n, _ in model.named_modules() if n and n not in known]


def _ancestors(node: fx.Node, stop: fx.Node | None) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is not stop:
            stack.extend(n.all_input_nodes)
    return seen


def split_at(model: nn.Module, layer: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(lower, upper) with ``upper(lower(x)) == model(x)``; both share ``model``'s submodules."""
    resolved = resolve_layer_alias(model, layer)
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    graph, names = _trace(model, resolved if resolved in modules else None)
    model.train(was_training)
    by_name = {q: n for n, q in names.items()}
    if resolved not in by_name:
        raise UserError(unknown_choice_message("layer", layer, layer_names(model),
                                               "Layers are module paths or fx points such as layer3.1.add."))
    split = by_name[resolved]
    order = {n: i for i, n in enumerate(graph.nodes)}
    out_node = next(n for n in graph.nodes if n.op == "output")

    # the upper part: everything the output needs, stopping at the split node
    up = _ancestors(out_node, split)
    if any(n.op == "placeholder" for n in up):
        crossing = sorted({names.get(n, n.name) for n in up if n is not split and order[n] < order[split]
                           and n.op not in ("get_attr", "placeholder")}, key=lambda q: q)
        raise UserError(f"cannot split {type(model).__name__} at {layer!r}: the part after it also reads "
                        f"{', '.join(crossing) or 'the input'} computed before it (a skip connection); split at a "
                        f"block boundary instead (e.g. a whole block such as layer3 or its residual sum layer3.1.add)")
    if split not in up:
        raise UserError(f"the output of {type(model).__name__} does not depend on {layer!r}")

    g_up = fx.Graph()
    env: dict[fx.Node, fx.Node] = {split: g_up.placeholder("features")}
    for n in graph.nodes:
        if n in up and n is not split:
            env[n] = g_up.node_copy(n, lambda a: env[a])
    upper = fx.GraphModule(model, g_up, class_name=f"{type(model).__name__}Upper")

    g_low = fx.Graph()
    low = _ancestors(split, None)
    env2: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n in low:
            env2[n] = g_low.node_copy(n, lambda a: env2[a])
    g_low.output(env2[split])
    lower = fx.GraphModule(model, g_low, class_name=f"{type(model).__name__}Lower")
    return lower, upper


# --------------------------------------------------------------------------- the classifiers

class SplitClassifier(nn.Module):
    """A frozen lower part (and optionally a frozen Trans-Net whose chosen orders are summed) feeding a
    trainable upper part. ``train()`` keeps the frozen parts in eval mode (BN statistics fixed)."""

    def __init__(self, lower: nn.Module, upper: nn.Module, transnet: TransNet | None = None,
                 orders: list[int] | None = None):
        super().__init__()
        self.lower, self.upper, self.transnet = lower, upper, transnet
        for p in self.lower.parameters():
            p.requires_grad_(False)
        mask = None
        if transnet is not None:
            for p in transnet.parameters():
                p.requires_grad_(False)
            k = transnet.orders
            orders = list(range(k + 1)) if orders is None else orders
            mask = torch.zeros(k + 1)
            mask[orders] = 1.0
        self.register_buffer("order_mask", mask if mask is not None else torch.ones(1))  # (K+1,) m_k
        self.train()

    def train(self, mode: bool = True) -> SplitClassifier:
        super().train(mode)
        self.lower.eval()
        if self.transnet is not None:
            self.transnet.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: images (N, 3, S, S) -> the upper part's input (N, C_B, H, W), without gradients."""
        with torch.no_grad():
            f = self.lower(x)                                    # (N, C_A, H, W)
            if self.transnet is None:
                return f
            comps, _ = self.transnet.decompose(f)                # K+1 x (N, C_B, H, W)
            return sum(m * c for m, c in zip(self.order_mask.to(comps[0].dtype), comps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upper(self.features(x))


def parse_orders(orders: str, k: int) -> list[int]:
    if str(orders).strip().lower() == "all":
        return list(range(k + 1))
    try:
        vals = [int(v) for v in str(orders).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--orders expects 'all' or comma-separated integers, got {orders!r}") from None
    bad = [v for v in vals if not 0 <= v <= k]
    if bad or not vals:
        raise UserError(f"--orders {orders!r}: the Trans-Net has orders 0..{k}; choose among them")
    if len(set(vals)) != len(vals):
        raise UserError(f"--orders {orders!r} names an order twice")
    return sorted(vals)


# --------------------------------------------------------------------------- the command

def _check_provenance(info: dict[str, Any], which: str, ckpt_path: str, allow: bool) -> None:
    """The Trans-Net's features record the checkpoint sha256 they came from: the net must be that one."""
    prov = fitted_nets(info).get(which) or {}
    want = prov.get("checkpoint_sha256")
    if not want or allow:
        return
    have = sha256_file(ckpt_path)
    if have != want:
        role = "net_a" if which == "source" else "net_b"
        raise UserError(f"--{role} {ckpt_path} (sha256 {have[:12]}...) is not the checkpoint the Trans-Net's "
                        f"{which} features came from ({prov.get('checkpoint', '?')}, sha256 {want[:12]}...); "
                        f"pass that checkpoint, or --allow_other_checkpoints to go on anyway")


def _same_data(ck_a: dict[str, Any], ck_b: dict[str, Any]) -> None:
    for key in ("transform",):
        if ck_a.get(key) and ck_b.get(key) and ck_a[key] != ck_b[key]:
            raise UserError(f"net A and net B were trained with different {key}s ({ck_a[key]} vs {ck_b[key]}); "
                            f"refinement feeds the same images to both")
    da, db = (ck_a.get("dataset") or {}).get("name"), (ck_b.get("dataset") or {}).get("name")
    if da and db and da != db:
        raise UserError(f"net A was trained on {da!r} but net B on {db!r}; refinement needs one data set")


def run_refine(cfg: RefineConfig, tcfg: TrainConfig, out_dir: str | Path, mode: str = "new") -> dict[str, Any]:
    """Fine-tune B's upper part on the refined features (and the baseline); return the summary metrics."""
    for name in ("net_a", "net_b", "transnet"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    out = Path(out_dir)
    device = use_device(tcfg.device)
    require_finished_result(cfg.transnet, "refine", cfg.allow_unfinished)
    ck_a, ck_b = load_checkpoint(cfg.net_a), load_checkpoint(cfg.net_b)
    _same_data(ck_a, ck_b)
    transnet, info = load_transnet(cfg.transnet)
    layer = cfg.layer or info["layer"]
    if cfg.layer and cfg.layer != info["layer"]:
        raise UserError(f"--layer {cfg.layer!r} differs from the Trans-Net's layer {info['layer']!r}")
    orders = parse_orders(cfg.orders, transnet.orders)
    _check_provenance(info, "source", cfg.net_a, cfg.allow_other_checkpoints)
    _check_provenance(info, "target", cfg.net_b, cfg.allow_other_checkpoints)
    if not ck_b.get("dataset"):
        raise UserError(f"--net_b {cfg.net_b} records no data set; refinement needs a workbench checkpoint")
    spec = DataSpec(**ck_b["dataset"])
    if cfg.data_root:
        spec = replace(spec, data_root=cfg.data_root)
    train_set, test_set = build_dataset(spec, "train"), build_dataset(spec, "test")
    test_loader = make_loader(test_set, max(tcfg.batch_size, 256), False, tcfg.num_workers)

    net_a = model_from_checkpoint(ck_a, f"--net_a {cfg.net_a}")
    net_b = model_from_checkpoint(ck_b, f"--net_b {cfg.net_b}")
    lower_a, _ = split_at(net_a, layer)
    lower_b_ref, upper_b = split_at(net_b, layer)
    _check_shapes(lower_a, lower_b_ref, transnet, test_set, layer)
    refined = SplitClassifier(lower_a, upper_b, transnet, orders)

    config = {"refine": asdict(cfg), "train": asdict(tcfg), "layer": layer, "orders": orders,
              "transnet_path": info["path"], "transnet_source": info["source"], "transnet_target": info["target"]}
    with RunDir(out, mode) as run:
        run.write_config(config, device=device, net_a_sha256=sha256_file(cfg.net_a),
                         net_b_sha256=sha256_file(cfg.net_b), data=asdict(spec))
        original = evaluate(net_b.to(device), test_loader, device, tcfg.amp)
        before = evaluate(refined.to(device), test_loader, device, tcfg.amp)
        net_b.cpu()                     # frees its lower layers; its upper ones are refined's and stay
        refined.to(device)
        fields = _ckpt_fields(ck_b, spec, config, cfg, "refined")
        res = _train_part(refined, train_set, test_set, tcfg, out / "refined", mode, fields, "refine")
        summary: dict[str, Any] = {
            "layer": layer, "orders": orders, "epochs": tcfg.epochs, "n_test": len(test_set),
            "original_b_top1": original["top1"], "original_b_top5": original["top5"],
            "refined_top1_before_finetune": before["top1"],
            "refined_top1": res["test_top1"], "refined_top5": res["test_top5"],
            "refined_best_top1": res["best_test_top1"],
            "refined_minus_original": res["test_top1"] - original["top1"],
        }
        if cfg.baseline:
            fresh_b = model_from_checkpoint(load_checkpoint(cfg.net_b), f"--net_b {cfg.net_b}")
            lower_b, upper_b2 = split_at(fresh_b, layer)
            base = SplitClassifier(lower_b, upper_b2)
            fields_b = _ckpt_fields(ck_b, spec, config, cfg, "baseline_b")
            rb = _train_part(base, train_set, test_set, tcfg, out / "baseline_b", mode, fields_b, "baseline")
            summary.update({"baseline_b_finetuned_top1": rb["test_top1"], "baseline_b_finetuned_top5": rb["test_top5"],
                            "baseline_b_best_top1": rb["best_test_top1"],
                            "refined_minus_baseline": res["test_top1"] - rb["test_top1"]})
        summary["note"] = ("refined = net A up to the layer + Trans-Net orders " + ",".join(map(str, orders)) +
                           " (frozen) -> net B's upper part fine-tuned; baseline_b = net B's own lower part (frozen) "
                           "-> net B's upper part fine-tuned with the same budget; accuracies in percent on the "
                           "test split")
        run.finish(summary)
    return summary


def _check_shapes(lower_a: nn.Module, lower_b: nn.Module, transnet: TransNet, test_set, layer: str) -> None:
    x = test_set[0][0][None]
    with torch.no_grad():
        fa, fb = lower_a.eval()(x), lower_b.eval()(x)
    if fa.dim() != 4 or fa.shape[1] != transnet.channels or fb.shape[1] != transnet.out_channels \
            or fa.shape[2:] != fb.shape[2:]:
        raise UserError(f"at layer {layer!r} net A gives {tuple(fa.shape[1:])} and net B {tuple(fb.shape[1:])}, but "
                        f"the Trans-Net maps {transnet.channels} -> {transnet.out_channels} channels; was it fitted "
                        f"on these nets and this input size?")


def _ckpt_fields(ck_b: dict[str, Any], spec: DataSpec, config: dict[str, Any], cfg: RefineConfig,
                 part: str) -> dict[str, Any]:
    return {"arch": f"{part}:{ck_b.get('arch')}", "num_classes": ck_b.get("num_classes"), "dataset": asdict(spec),
            "transform": ck_b.get("transform"), "config": config, "net_a": cfg.net_a, "net_b": cfg.net_b,
            "transnet": cfg.transnet}


def _train_part(model: nn.Module, train_set, test_set, tcfg: TrainConfig, out: Path, mode: str,
                fields: dict[str, Any], desc: str) -> dict[str, Any]:
    if mode == "resume" and is_finished(out):
        return read_json(out / "metrics.json")
    with RunDir(out, mode) as run:
        run.write_config(fields["config"], device=use_device(tcfg.device), part=desc)
        return train(model, train_set, test_set, tcfg, run, fields, desc=desc).metrics
