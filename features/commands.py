"""Subcommands of the feature stage: ``extract``, ``inspect`` and ``list-layers``. The parsers need only
torch-free modules; each run imports the extraction, inspection or model code it calls."""
from __future__ import annotations

import argparse
import json
import sys
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import UserError
from common.files import jsonable
from common.options import Command, add_dataclass_args, dataclass_from_args, parse_kv_list
from common.precision import PRECISIONS
from common.ranges import csv_nonempty, nonneg_int, positive_int
from common.rundir import run_mode
from features.config import COMPRESSIONS, DATA_ON, DTYPES, ExtractConfig
from features.recorded import DATA_DESTS, command_line
from training.config import SPLITS, ModelSpec
from training.names import MODEL_PREFIX, arch_names
from training.options import add_data_args

if TYPE_CHECKING:
    from features.nets import BareBuild, Net

# --------------------------------------------------------------------------- extract

EXTRACT_HELP = {
    "split": "comma-separated splits to extract (train, test, val)",
    "dtype": "storage dtype of the layer features (logits are always float32); float16 is refused for a layer "
             "with values beyond its range (65504) or NaN/inf: use float32 there (which stores NaN/inf as "
             "computed, counts them and warns)",
    "batch_size": "images per forward pass", "device": "auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)",
    "num_workers": "data-loader worker processes (with --data_on device: the processes that decode the images "
                   "once)",
    "data_on": "where the input images are read from: loader (a DataLoader decodes and resizes every batch), "
               "device (each split decoded once to uint8 at the input size, cached on disk like train --data_on "
               "device, held on the device and normalised there: the same pixels, bit for bit) or auto (device on "
               "CUDA in one process without --limit when the images take at most a quarter of the free memory)",
    "precision": "arithmetic of the forward pass on CUDA: fp32 (IEEE float32, TF32 off: the faithful choice), "
                 "tf32 (TF32 tensor cores in convs and matmuls) or bf16 (bf16 autocast); on the CPU every choice "
                 "computes in fp32 (each dataset records precision and precision_effective)",
    "channels_last": "channels_last memory format on CUDA", "logits": "also store each net's logits",
    "limit": "extract only the first N images of every split (0: all)",
    "compression": "HDF5 compression (none is fastest; lzf is ~16x slower to write and saves nothing on "
                   "signed activations)",
    "queue_batches": "batches in flight between the forward passes and the writer thread",
    "flush_s": "seconds between flushes (rows_done is raised only after the rows it covers are flushed)",
    "keep_prefix": "transformer layers (tokens -> grid): also store the class/distillation/register tokens as "
                   "<layer>.prefix, (N, C, P, 1)",
    "checksum": "HDF5's fletcher32 checksum on every stored row (a flipped bit fails the read, naming the rows)",
}

def _without_default(text: str) -> str:
    """``text`` less its ``(default: ...)`` note (nested parentheses kept whole): extraction's data
    options default to what the checkpoints record, not to train's defaults."""
    start = text.find("(default:")
    if start < 0:
        return text
    depth = 0
    for end in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            return (text[:start].rstrip() + text[end + 1:]).strip()
    return text


def _add_extract(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to extract")
    g.add_argument("--nets", nargs="+", default=None, metavar="NAME=CKPT",
                   help="nets by name and checkpoint (names become HDF5 groups: no '/')")
    g.add_argument("--family", default=None, help="a family.json (or its folder): extract all its members")
    g.add_argument("--layer", action="append", default=None, metavar="PATH",
                   help="module path or fx node (features.30, layer3, layer3.-1.add); repeat for several")
    g.add_argument("--conv_layer", action="append", type=nonneg_int(), default=None, metavar="N",
                   help="alias of --layer features.N (the paper's index into a VGG/AlexNet `features`)")
    g.add_argument("--out", required=True, help="the feature file to write (kc-features v1)")
    b = p.add_argument_group("nets from weights files that record no arch (plain state dicts, timm checkpoints, "
                             ".safetensors)")
    which = b.add_mutually_exclusive_group()
    which.add_argument("--arch", default=None, help="build such nets as this arch (e.g. timm:convnext_atto)")
    which.add_argument("--model", default=None, metavar="PACKAGE.MODULE:CALLABLE",
                       help="build such nets with your own callable")
    b.add_argument("--model_kwargs", default=None, metavar="JSON", help="kwargs of the builder (a JSON object)")
    b.add_argument("--num_classes", type=positive_int(), default=None,
                   help="their class count (default: the builder's own; timm: its pretrained_cfg's)")
    m = p.add_mutually_exclusive_group()
    m.add_argument("--resume", action="store_true",
                   help="continue an interrupted extraction in --out (complete datasets are skipped)")
    m.add_argument("--overwrite", action="store_true", help="replace --out (and its shard files)")
    add_data_args(p)
    p.set_defaults(**{d: None for d in DATA_DESTS})
    for a in p._actions:
        if a.dest in DATA_DESTS:
            # "%(default).0s" formats to nothing and keeps the formatter from appending "(default: None)".
            a.help = _without_default(a.help or "") + " (default: what the checkpoints record)%(default).0s"
    g2 = p.add_argument_group("extraction")
    add_dataclass_args(g2, ExtractConfig, help=EXTRACT_HELP,
                       choices={"dtype": list(DTYPES), "compression": list(COMPRESSIONS),
                                "precision": list(PRECISIONS), "data_on": list(DATA_ON)},
                       types={"split": csv_nonempty(SPLITS)})
    g2.add_argument("--amp", action="store_true", help="alias of --precision bf16 (kept for older command lines)")
    p.add_argument("--max_batches", type=nonneg_int(), default=None, help=argparse.SUPPRESS)  # simulated kill (tests)


def nets_from_args(args: argparse.Namespace) -> list[Net]:
    from features.nets import load_net
    from training.manifest import read_manifest

    entries: list[tuple[str, str, str | None]] = []
    if args.family:
        for m in read_manifest(args.family):
            entries.append((m.name, m.checkpoint, m.sha256))
    for name, path in parse_kv_list(args.nets, "--nets").items():
        entries.append((name, path, None))
    if not entries:
        raise UserError("no nets given: pass --nets NAME=CKPT ... and/or --family DIR/family.json")
    names = [e[0] for e in entries]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"net name(s) {dup} given twice (--nets and --family together?); names must be unique")
    return [load_net(name, path, sha, bare_build(args)) for name, path, sha in entries]


def bare_build(args: argparse.Namespace) -> BareBuild | None:
    """``--arch`` / ``--model`` of ``extract``: how to build nets whose file records no arch."""
    from features.nets import BareBuild
    from training.models import default_input_size, parse_model_kwargs

    arch = f"{MODEL_PREFIX}{args.model}" if getattr(args, "model", None) else getattr(args, "arch", None)
    if not arch:
        return None
    size = getattr(args, "image_size", None) or default_input_size(arch)
    return BareBuild(arch, parse_model_kwargs(args.model_kwargs), args.num_classes, args.channels or 3, size)


def precision_from_args(args: argparse.Namespace) -> str:
    """``--precision``, with ``--amp`` as an alias of ``bf16`` (refused beside another explicit choice)."""
    if not getattr(args, "amp", False):
        return args.precision
    if args.precision not in ("fp32", "bf16"):          # fp32 is the default: --amp alone means bf16
        raise UserError(f"--amp is an alias of --precision bf16 and contradicts --precision {args.precision}; "
                        f"give one of them")
    return "bf16"


def _run_extract(args: argparse.Namespace) -> int:
    from common.distributed import dist_from_env
    from features.extract import extract_features
    from features.nets import build_feature_data, data_spec_for
    from features.nonfinite import NonFiniteFeaturesWarning
    from training.runner import resolve_data

    args.precision, args.amp = precision_from_args(args), False     # the command line records --precision
    cfg = dataclass_from_args(ExtractConfig, args)
    layers = [(name, None) for name in (args.layer or [])] + [(f"features.{n}", n) for n in (args.conv_layer or [])]
    nets = nets_from_args(args)
    overrides = {field: getattr(args, dest) for dest, field in DATA_DESTS.items()}
    spec = data_spec_for(nets, overrides)
    bare = bare_build(args)
    if bare is not None and any(n.arch == bare.arch and n.dataset is None for n in nets):
        spec = resolve_data(spec, ModelSpec(bare.arch))   # timm: size / normalisation from its pretrained_cfg
    splits = [s.strip() for s in cfg.split.split(",") if s.strip()]
    data = build_feature_data(spec, splits, cfg.limit)
    mode = run_mode(args.resume, args.overwrite)
    mode = "auto" if mode == "new" else mode
    stop = args.max_batches
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonFiniteFeaturesWarning)
        res = extract_features(nets, data, layers, args.out, cfg, mode, command=command_line(args, "extract"),
                               stop_after=stop, hard_kill=stop is not None)
    for w in caught:                           # NaN/inf stored (float32): one paragraph on stderr
        if issubclass(w.category, NonFiniteFeaturesWarning):
            print(textwrap.fill(f"warning: {w.message}", width=100), file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if dist_from_env().rank != 0:
        return 0
    done = res.images
    print(f"{res.out}: {len(res.datasets)} datasets ({len(nets)} nets x {len(splits)} splits), {done} images "
          f"extracted in {res.seconds:.1f}s ({res.images_per_s:.1f} images/s, inputs from the {res.data_on})"
          + (f", {len(res.skipped)} already complete" if res.skipped else ""))
    if res.shards:
        print(f"joined {len(res.shards)} shard files ({', '.join(p.name for p in res.shards)}) as virtual datasets; "
              f"keep them beside {Path(res.out).name}")
    return 0


# --------------------------------------------------------------------------- inspect

def _add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a kc-features file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--verify", action="store_true",
                   help="read every stored row (checksums) and recount the non-finite values and largest magnitude "
                        "against the recorded ones; re-compute a few random rows of every dataset from its "
                        "checkpoint and compare")
    p.add_argument("--verify_rows", type=positive_int(), default=4, help="rows per split and net to re-compute")
    p.add_argument("--seed", type=nonneg_int(), default=0, help="seed of the rows chosen by --verify")
    p.add_argument("--device", default="cpu", help="device for --verify")


def format_description(desc: dict) -> str:
    root = desc["root"]
    tf = root.get("transform") if isinstance(root.get("transform"), dict) else {}
    lines = [f"{desc['file']}: {root.get('schema')} v{root.get('schema_version')}, data set {root.get('dataset')!r} "
             f"({tf.get('preset', '?')} transform, {root.get('image_size')} px), created {root.get('created_utc')}, "
             f"code {root.get('code_version')}",
             f"  command: {root.get('command')}"]
    for split, sd in desc["splits"].items():
        lines.append(f"split {split}: {sd['rows']} rows")
        for net, nd in sd["nets"].items():
            first = next(iter(nd.values()), {"attrs": {}})["attrs"]
            sha = str(first.get("checkpoint_sha256") or "")[:12]
            lines.append(f"  net {net}: arch {first.get('arch')}, checkpoint {first.get('checkpoint') or '-'}"
                         + (f" (sha256 {sha}...)" if sha else ""))
            for layer, e in nd.items():
                a = e["attrs"]
                state = "complete" if e["complete"] else f"INCOMPLETE ({e['rows_done']} of {e['shape'][0]} rows)"
                if e.get("nonfinite") is not None and (e["complete"] or e["rows_done"]):
                    state += (f", {e['nonfinite']} NON-FINITE values" if e["nonfinite"] else ", all finite")
                    big = f"max |x| {e['max_abs']:.4g}; " if e.get("max_abs") is not None else ""
                    state += f" ({big}recorded at write, --verify recounts)"
                where = a.get("node", layer)
                extra = f"node {where}, point {a.get('point', '?')}" + (
                    f", conv_layer {a['conv_layer']}" if a.get("conv_layer") not in (None, "") else "")
                if a.get("precision") or a.get("precision_effective"):
                    asked, eff = a.get("precision") or "?", a.get("precision_effective") or "?"
                    extra += f", precision {asked}" + (f" (computed in {eff})" if eff != asked else "")
                elif a.get("autocast") not in (None, "none"):
                    extra += f", autocast {a['autocast']}"
                if e["virtual"]:
                    extra += ", virtual over shards" + ("" if e.get("sources_ok", True) else " (SHARDS MISSING)")
                shape = "x".join(str(s) for s in e["shape"][1:])
                lines.append(f"    {layer:<20} {shape:<14} {e['dtype']:<8} {state}; {extra}")
    return "\n".join(lines)


def _run_inspect(args: argparse.Namespace) -> int:
    from features.inspection import describe_file, recount_file, verify_file

    desc = describe_file(args.file)
    counts = recount_file(args.file) if args.verify else None
    rows = verify_file(args.file, args.verify_rows, args.seed, args.device) if args.verify else None
    if args.json:
        if rows is not None:
            desc["recount"] = [jsonable(r.__dict__) for r in counts]
            desc["verify"] = [jsonable(r.__dict__) for r in rows]
        print(json.dumps(desc, indent=2))
    else:
        print(format_description(desc))
        if rows is not None:
            print("recount (every stored row read, checksums checked, vs the counts recorded at write):")
            for r in counts:
                print(f"  {r.status.upper():<8} {r.split}/{r.net}/{r.layer}: {r.reason}")
            print("verify (re-computed rows vs stored):")
            for r in rows:
                detail = (f"rows {r.rows}, max |diff| {r.max_abs_diff:.3g}, relative {r.rel_diff:.3g} (tol {r.tolerance:g})"
                          if r.max_abs_diff is not None else r.reason)
                print(f"  {r.status.upper():<8} {r.split}/{r.net}/{r.layer}: {detail}")
    if rows is not None and any(r.status in ("mismatch", "failed") for r in counts + rows):
        bad = list(dict.fromkeys(f"{r.split}/{r.net}/{r.layer}" for r in counts + rows
                                 if r.status in ("mismatch", "failed")))
        print(f"verify failed for {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- list-layers

def _add_list_layers(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--arch", default=None, help="architecture: " + ", ".join(arch_names()) +
                     " (a timm NAME is checked when the command runs)")
    src.add_argument("--model", default=None, metavar="PACKAGE.MODULE:CALLABLE",
                     help="your own model: the nn.Module this callable returns")
    src.add_argument("--checkpoint", default=None, help="a workbench checkpoint (arch, classes, input size from it)")
    p.add_argument("--model_kwargs", default=None, metavar="JSON",
                   help="kwargs of the builder as a JSON object (with --arch timm:NAME or --model)")
    p.add_argument("--num_classes", type=positive_int(), default=10, help="classes (with --arch)")
    p.add_argument("--in_channels", type=positive_int(), default=3, help="input channels (with --arch)")
    p.add_argument("--input_size", type=positive_int(), default=None,
                   help="input size in px (default: the arch's own, or the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_list_layers(args: argparse.Namespace) -> int:
    from common.checkpoints import load_checkpoint
    from features.layers import format_layers, list_layers
    from training.models import build_model, default_input_size, model_from_checkpoint, parse_model_kwargs

    if args.checkpoint:
        ck = load_checkpoint(args.checkpoint)
        model = model_from_checkpoint(ck, source=args.checkpoint)
        size = args.input_size or ck.get("input_size") or (ck.get("transform") or {}).get("image_size")
        chans = int(ck.get("in_channels") or (ck.get("transform") or {}).get("channels") or 3)
        what = f"{args.checkpoint} (arch {ck.get('arch')})"
    else:
        arch = f"{MODEL_PREFIX}{args.model}" if args.model else args.arch
        size = args.input_size or default_input_size(arch)
        chans = args.in_channels
        model = build_model(arch, args.num_classes, chans, size, **parse_model_kwargs(args.model_kwargs))
        what = f"arch {arch}"
    if not size:
        raise UserError("no input size known (a checkpoint or own model that records none); pass --input_size")
    rows = list_layers(model, (chans, int(size), int(size)))
    if args.json:
        print(json.dumps([jsonable(r.__dict__) for r in rows], indent=2))
        return 0
    print(f"{what}, input {chans}x{size}x{size}: {len(rows)} points (module paths and fx nodes; a container path "
          f"such as layer3 means the output of its last node; a negative block index like layer3.-1.add is "
          f"resolved against the model)")
    print(format_layers(rows))
    return 0


COMMANDS = [
    Command("extract", "cache activations of several nets to a feature file", _add_extract, _run_extract,
            "Run every net once over the same images (eval transform, dataset order) and stream the activations "
            "at the requested layers into a kc-features v1 HDF5 file. Re-run with --resume after an interruption; "
            "a request that only adds nets/layers to an existing file is appended. Under torchrun each rank "
            "extracts a contiguous shard and rank 0 joins them as virtual datasets.",
            torchrun=True),
    Command("inspect", "show what a feature file holds (and --verify it)", _add_inspect, _run_inspect,
            "Print splits, nets, layers, shapes, dtypes, completeness and provenance of a feature file; --verify "
            "re-computes a few random rows from the checkpoints and compares."),
    Command("list-layers", "list a model's layers with output shapes", _add_list_layers, _run_list_layers,
            "Every extraction point of an architecture or checkpoint: module path / fx node, type, output shape "
            "and, for nets with a `features` Sequential, the paper's --conv_layer index."),
]
