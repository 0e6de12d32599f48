"""Subcommands ``fit-transnet``, ``variance``, ``import-transnet`` and ``refine``; each ``run_*`` is
callable from Python. The parsers need only torch-free modules (transnet/config.py, transnet/options.py);
each run imports the fitting code it calls."""
from __future__ import annotations

import argparse
from pathlib import Path

from common.errors import UserError
from common.files import read_json
from common.options import Command, add_dataclass_args, add_run_args, dataclass_from_args
from common.ranges import positive_int
from common.rundir import run_mode
from training.config import TrainConfig
from training.options import add_train_args
from transnet.config import DATA_ON, REFINE_PRESET, STD_CORRECTIONS, FitConfig, ImportConfig, RefineConfig
from transnet.options import FIT_CHOICES, FIT_HELP, FIT_TYPES
from transnet.summary import summary_line

# --------------------------------------------------------------------------- fit-transnet

def _add_fit(p: argparse.ArgumentParser) -> None:
    add_dataclass_args(p, FitConfig, help=FIT_HELP, choices=FIT_CHOICES, types=FIT_TYPES)
    add_run_args(p)


def _run_fit(args: argparse.Namespace) -> None:
    from transnet.fit import fit_transnet

    cfg = dataclass_from_args(FitConfig, args)
    m = fit_transnet(cfg, args.out_dir, run_mode(args.resume, args.overwrite))
    if m:  # rank 0
        print(summary_line(m))
        print(f"wrote {Path(args.out_dir) / 'transnet.pt'} and {Path(args.out_dir) / 'metrics.json'}")


# --------------------------------------------------------------------------- variance

def _add_variance(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transnet", required=True, help="fit-transnet run directory (or its transnet.pt)")
    p.add_argument("--features", default=None, help="kc-features file (default: the one the Trans-Net was fitted on)")
    p.add_argument("--target_features", default=None, help="a second file holding the target net")
    p.add_argument("--split", default="test", help="split to report on")
    p.add_argument("--source", default=None, help="source net (default: the Trans-Net's)")
    p.add_argument("--target", default=None, help="target net (default: the Trans-Net's)")
    p.add_argument("--batch_size", type=positive_int(), default=256, help="rows per batch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--data_on", default="auto", choices=list(DATA_ON), help="where the features are held")
    p.add_argument("--allow_other_checkpoints", action="store_true",
                   help="apply the Trans-Net to nets (--source/--target, --features) other than the checkpoints it "
                        "was fitted on")
    p.add_argument("--allow_unfinished", action="store_true",
                   help="report on a Trans-Net whose fit did not finish (its last.pt)")
    add_run_args(p, out_required=False)


def _run_variance(args: argparse.Namespace) -> None:
    from transnet.variance_file import run_variance

    if args.out_dir is None and (args.resume or args.overwrite):
        raise UserError("--resume/--overwrite apply to --out_dir only")
    rep = run_variance(args.transnet, args.features, args.split, args.out_dir, source=args.source,
                       target=args.target, target_features=args.target_features, device=args.device,
                       batch_size=args.batch_size, data_on=args.data_on,
                       mode=run_mode(args.resume, args.overwrite),
                       allow_other_checkpoints=args.allow_other_checkpoints, allow_unfinished=args.allow_unfinished)
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
    from transnet.original import import_transnet

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
    "allow_unfinished": "use a Trans-Net whose fit did not finish (its last.pt)",
}


def _add_refine(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("refinement")
    add_dataclass_args(g, RefineConfig, help=REFINE_HELP)
    add_train_args(p, **REFINE_PRESET)
    add_run_args(p)


def _run_refine(args: argparse.Namespace) -> None:
    from transnet.refine import run_refine

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
            "report) into --out_dir. Defaults are the paper's preset (Adam 1e-4 -> 1e-6, 1000 epochs, batch 64).",
            torchrun=True),
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
