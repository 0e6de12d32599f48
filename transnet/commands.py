"""Subcommands ``fit-transnet``, ``variance``, ``import-transnet`` and ``refine``; each ``run_*`` is
callable from Python."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.device import PRECISIONS, resolve_device
from common.errors import UserError
from common.files import read_json, write_json
from common.options import Command, add_dataclass_args, add_run_args, dataclass_from_args
from common.provenance import provenance
from common.rundir import RunDir, run_mode
from training.commands import add_train_args
from training.loop import TrainConfig
from transnet.data import DATA_ON, choose_placement, make_source, open_pair
from transnet.fit import (FIT_SCHEDULES, LOSS_SCALES, FitConfig, add_warning, fit_transnet, in_sample_warning,
                          load_transnet)
from transnet.model import INPUT_NORMS, STD_CORRECTIONS
from transnet.original import ImportConfig, import_transnet
from transnet.refine import REFINE_PRESET, RefineConfig, run_refine
from transnet.summary import summary_line
from transnet.variance import variance_report

FIT_HELP = {
    "features": "kc-features file with the source (and target) features",
    "source": "net A: the input of the Trans-Net (a net name in the file)",
    "target": "net B: the features to reconstruct",
    "layer": "layer (module path) in the file, e.g. features.30",
    "target_features": "a second kc-features file for the target (same rows required)",
    "allow_changed_checkpoints": "use stored features even when their checkpoint file changed since extraction "
                                 "(refused by default: the sha256 recorded in the feature file must match)",
    "train_split": "split to fit on",
    "train_rows": "fit on the first N rows of --train_split only (0: every row); held-out metrics still use "
                  "the whole --eval_split",
    "eval_split": "held-out split for the metrics: a split other than --train_split ('none', or --train_split "
                  "itself, gives an in-sample report, labelled held_out: false with a warning)",
    "orders": "K: number of gates / nonlinear orders (0 = linear Trans-Net, one conv)",
    "kernel": "conv kernel size (odd)",
    "alpha": "α per order, order 1 first (comma list; one value = every order): loss + Σ α_k p_k²",
    "input_norm": "input normalisation: instance (paper: per-sample spatial std), global (per-channel std of "
                  "the training features), none",
    "std_correction": "spatial std convention of every instance std: 0 = population std (divide by H*W; default), "
                      "1 = unbiased std (divide by H*W-1; the original code). Fits agree under either up to the "
                      "optimiser's path (the factor is absorbed by the last conv); weights moved between conventions "
                      "do not (components off by sqrt(HW/(HW-1))). 1x1 maps always "
                      "use s = 1",
    "std_floor": "floor F for every instance std, a fraction of the slice's rms: s = max(std, F*rms) + eps, so "
                 "spatially constant slices give |x̂| <= 1/F instead of x/eps; 0 = off (the paper's preset)",
    "freeze_gates": "keep the gates at --gate_init",
    "gate_init": "initial gate value p (0.5 = the paper)",
    "loss_scale": "none (paper) or target_var (MSE / Var(x_B): scale-free, a deviation from the paper)",
    "epochs": "epochs (paper: 800-1000)", "batch_size": "global batch size",
    "lr": "initial learning rate (Adam)", "final_lr": "learning rate at the last epoch (geometric) / cosine floor",
    "schedule": "learning-rate schedule (geometric per epoch = the paper)",
    "weight_decay": "Adam L2 weight decay (gate logits included, as the paper)",
    "eval_every": "held-out evaluation every N epochs", "save_every": "write the resumable last.pt every N epochs",
    "data_on": "where the features live while fitting: auto, device (GPU memory), ram (pinned), disk "
               "(contiguous HDF5 blocks)",
    "block_rows": "rows per contiguous HDF5 read", "device": "auto, cpu, cuda or cuda:N",
    "precision": "arithmetic on CUDA: fp32 (IEEE float32, TF32 off: the paper-faithful choice), tf32 (TF32 tensor "
                 "cores for convs and matmuls) or bf16 (bf16 autocast); on the CPU every choice computes in fp32 "
                 "(metrics.json records precision and precision_effective)",
    "channels_last": "channels_last memory format on CUDA", "seed": "random seed",
}


# Choices of the fit options (shared with the consistency command).
FIT_CHOICES = {"input_norm": list(INPUT_NORMS), "schedule": list(FIT_SCHEDULES), "loss_scale": list(LOSS_SCALES),
               "data_on": list(DATA_ON), "precision": list(PRECISIONS), "std_correction": list(STD_CORRECTIONS)}


# --------------------------------------------------------------------------- fit-transnet

def _add_fit(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, FitConfig, help=FIT_HELP, choices=FIT_CHOICES)
    add_run_args(p)


def _run_fit(args: argparse.Namespace) -> None:
    cfg = dataclass_from_args(FitConfig, args)
    m = fit_transnet(cfg, args.out_dir, run_mode(args.resume, args.overwrite))
    if m:  # rank 0
        print(summary_line(m))
        print(f"wrote {Path(args.out_dir) / 'transnet.pt'} and {Path(args.out_dir) / 'metrics.json'}")


# --------------------------------------------------------------------------- variance

def variance_filename(split: str) -> str:
    """``variance.json`` for the test split, ``variance_<split>.json`` for any other."""
    return "variance.json" if split == "test" else f"variance_{split}.json"


def run_variance(transnet_dir: str | Path, features: str | None = None, split: str = "test",
                 out_dir: str | Path | None = None, *, source: str | None = None, target: str | None = None,
                 target_features: str | None = None, device: str = "auto", batch_size: int = 256,
                 data_on: str = "auto", mode: str = "new") -> dict[str, Any]:
    """Variance report of a fitted Trans-Net on one split (one streaming float64 pass); written to
    ``variance.json`` in the Trans-Net run directory, or in ``out_dir`` (a run directory of its own)."""
    model, info = load_transnet(transnet_dir)
    dev = resolve_device(device)
    feats = features or info["features"]
    tfeats = target_features or (info["target_features"] if not features and info["target_features"] != info["features"]
                                 else None)
    src_name, tgt_name = source or info["source"], target or info["target"]
    pair = open_pair(feats, src_name, tgt_name, info["layer"], split, tfeats)
    if (pair.shape_a[0], pair.shape_b[0]) != (model.channels, model.out_channels):
        raise UserError(f"{pair.dataset_path('a')} -> {pair.dataset_path('b')} has {pair.shape_a[0]} -> "
                        f"{pair.shape_b[0]} channels; the Trans-Net maps {model.channels} -> {model.out_channels}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    src = make_source(pair, dev, choose_placement(pair.nbytes, dev, data_on))
    model = model.to(dev)
    rep = variance_report(model, src.sequential(batch_size), device=dev, split=split, source=pair.source,
                          target=pair.target, layer=pair.layer)
    train_split = (info.get("config") or {}).get("train_split", "train")
    rep["held_out"] = split != train_split
    if not rep["held_out"]:
        cfg = info.get("config") or {}
        add_warning(rep, in_sample_warning(split, train_split, int(cfg.get("train_rows") or 0), pair.n),
                    first=True)
    rep.update({"transnet": info["path"], "features": str(Path(feats).resolve()),
                "feature_provenance": {"source": pair.provenance_a, "target": pair.provenance_b}})
    name = variance_filename(split)
    if out_dir is None:
        dest = Path(info["path"]).parent
        with RunDir(dest, "resume"):          # the lock: no second writer in the Trans-Net run directory
            write_json(dest / name, {**rep, "provenance": provenance(dev)})
        rep["path"] = str(dest / name)
    else:
        with RunDir(out_dir, mode) as run:
            run.write_config({"transnet": str(transnet_dir), "features": feats, "target_features": tfeats,
                              "split": split, "source": src_name, "target": tgt_name, "batch_size": batch_size,
                              "data_on": data_on}, device=dev)
            write_json(run.file(name), rep)
            run.finish(rep)
        rep["path"] = str(Path(out_dir) / name)
    return rep


def _add_variance(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transnet", required=True, help="fit-transnet run directory (or its transnet.pt)")
    p.add_argument("--features", default=None, help="kc-features file (default: the one the Trans-Net was fitted on)")
    p.add_argument("--target_features", default=None, help="a second file holding the target net")
    p.add_argument("--split", default="test", help="split to report on")
    p.add_argument("--source", default=None, help="source net (default: the Trans-Net's)")
    p.add_argument("--target", default=None, help="target net (default: the Trans-Net's)")
    p.add_argument("--batch_size", type=int, default=256, help="rows per batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--data_on", default="auto", choices=list(DATA_ON), help="where the features are held")
    add_run_args(p, out_required=False)


def _run_variance(args: argparse.Namespace) -> None:
    if args.out_dir is None and (args.resume or args.overwrite):
        raise UserError("--resume/--overwrite apply to --out_dir only")
    rep = run_variance(args.transnet, args.features, args.split, args.out_dir, source=args.source,
                       target=args.target, target_features=args.target_features, device=args.device,
                       batch_size=args.batch_size, data_on=args.data_on,
                       mode=run_mode(args.resume, args.overwrite))
    print(summary_line(rep))
    print(f"wrote {rep['path']}")


# --------------------------------------------------------------------------- import-transnet

IMPORT_HELP = {
    "checkpoint": "Trans-Net checkpoint saved by the original code (torch.save of {'epoch', 'arch', 'state_dict', "
                  "'optimizer'}, or a bare state dict): linearLayers_conv.<j>.weight for j = 0..K in forward order "
                  "and nonLinearLayers_p_pre (K gate logits, forward order) or nonLinearLayers_p (probabilities); "
                  "a 'module.' prefix is stripped",
    "features": "kc-features file holding the pair the Trans-Net maps (its shapes are checked)",
    "source": "net A in the file: the Trans-Net's input", "target": "net B in the file: the features it rebuilds",
    "layer": "layer (module path) in the file, e.g. features.30",
    "target_features": "a second kc-features file for the target (same rows required)",
    "train_split": "the split the original was fitted on (reports on it are labelled in-sample)",
    "eval_split": "split of the variance report written to metrics.json ('none': no report now; run variance later)",
    "std_correction": "spatial std of every instance std: 1 = unbiased, as the original computes it (default); "
                      "0 = population std (changes every component by sqrt(HW/(HW-1)))",
    "batch_size": "rows per batch of the variance pass", "data_on": "where the features are held",
    "device": "auto, cpu, cuda or cuda:N",
    "allow_changed_checkpoints": "use stored features even when their checkpoint file changed since extraction",
}


def _add_import(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, ImportConfig, help=IMPORT_HELP,
                       choices={"data_on": list(DATA_ON), "std_correction": list(STD_CORRECTIONS)})
    add_run_args(p)


def _run_import(args: argparse.Namespace) -> None:
    cfg = dataclass_from_args(ImportConfig, args)
    m = import_transnet(cfg, args.out_dir, run_mode(args.resume, args.overwrite))
    if "r2" in m:
        print(summary_line(m))
    imported = read_json(Path(args.out_dir) / "config.json")["imported"]
    strip = "".join(f", prefix {x!r} stripped" for x in imported["stripped_prefixes"])
    print(f"imported {cfg.checkpoint} (sha256 {m['source_checkpoint_sha256'][:12]}...; "
          f"{len(imported['found_keys'])} tensors{strip}); keys mapped:")
    for key, ours in imported["mapping"].items():
        print(f"  {key} -> {ours}")
    print(f"wrote {Path(args.out_dir) / 'transnet.pt'}, config.json (source sha256, key mapping, assumptions) "
          f"and metrics.json")


# --------------------------------------------------------------------------- refine

REFINE_HELP = {
    "net_a": "checkpoint of net A (frozen up to the layer)",
    "net_b": "checkpoint of net B (its upper part is fine-tuned)",
    "transnet": "fit-transnet run directory (or its transnet.pt) fitted from A to B",
    "orders": "orders of the Trans-Net fed to B's upper part: all or e.g. 0,1,2",
    "layer": "layer to split at (default: the Trans-Net's layer)",
    "baseline": "also fine-tune B's upper part on B's own features (same budget): the fair baseline",
    "data_root": "data root override (default: the one in net B's checkpoint)",
    "allow_other_checkpoints": "accept nets other than those the Trans-Net's features were extracted from",
}


def _add_refine(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("refinement")
    add_dataclass_args(g, RefineConfig, help=REFINE_HELP)
    add_train_args(p, **REFINE_PRESET)
    add_run_args(p)


def _run_refine(args: argparse.Namespace) -> None:
    cfg = dataclass_from_args(RefineConfig, args)
    tcfg = dataclass_from_args(TrainConfig, args)
    m = run_refine(cfg, tcfg, args.out_dir, run_mode(args.resume, args.overwrite))
    line = (f"top-1: original B {m['original_b_top1']:.2f}%, refined (orders {','.join(map(str, m['orders']))}) "
            f"{m['refined_top1']:.2f}% (before fine-tuning {m['refined_top1_before_finetune']:.2f}%)")
    if "baseline_b_finetuned_top1" in m:
        line += f", B fine-tuned on its own features {m['baseline_b_finetuned_top1']:.2f}%"
    print(line)
    print(f"wrote {Path(args.out_dir) / 'metrics.json'}")


COMMANDS = [
    Command("fit-transnet", "fit a Trans-Net reconstructing net B's features from net A's", _add_fit, _run_fit,
            "Fit a Trans-Net (nested convs with K ReLU gates) from a kc-features file; writes config.json, "
            "log.jsonl, TensorBoard events, last.pt (resume), transnet.pt and metrics.json (the held-out variance "
            "report) into --out_dir. Defaults are the paper's preset (Adam 1e-4 -> 1e-6, 1000 epochs, batch 64)."),
    Command("variance", "variance of each order, the residual and the target for a fitted Trans-Net",
            _add_variance, _run_variance,
            "One streaming float64 pass over a split; writes variance.json (variance_<split>.json for splits other "
            "than test) into the Trans-Net run directory, or into --out_dir."),
    Command("import-transnet", "import a Trans-Net checkpoint saved by the original code", _add_import, _run_import,
            "Load a Trans-Net checkpoint of the original code (Liang et al., ICLR 2020; key layout in "
            "transnet/original.py), check it against a kc-features pair, and write a run directory (transnet.pt, "
            "config.json with the source sha256 and the key mapping, metrics.json with the variance report of "
            "--eval_split) that variance, consistency (as D/pairs/A__B), diagnose and the figures accept. Uses the "
            "original's unbiased spatial std (--std_correction 1)."),
    Command("refine", "feed Trans-Net orders into net B's upper part and fine-tune it", _add_refine, _run_refine,
            "Net A up to the layer and the Trans-Net (frozen) feed the chosen orders into net B's upper part, which "
            "is fine-tuned; reports top-1 against the original B and against fine-tuning B on its own features with "
            "the same budget. Defaults: the paper's preset (Adam 1e-5 -> 1e-7, 100 epochs)."),
]
