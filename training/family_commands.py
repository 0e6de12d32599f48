"""Family subcommands: ``distill``, ``born-again``, ``search``, ``summarize``, ``compress``.

Thin: parse, call :mod:`training.families`, print where the results went. The parsers need only the
torch-free configs (training/config.py, training/family_config.py); each run imports its builder.

    python cli.py distill --teacher runs/t/last.pt --arch vgg_tiny --alpha 0.9 --temperature 4 --out_dir runs/kd
    python cli.py born-again --arch vgg_tiny --generations 3 --lambda 0.5 --temperature 2 --out_dir runs/ban
    python cli.py search --base kd.yaml --grid alpha=0.1,0.5,0.9 temperature=1,4,20 --out_dir runs/kd_grid
    python cli.py summarize runs/kd_grid
    python cli.py compress --checkpoint runs/t/last.pt --prune 0.8 --quantize_bits 5 --out_dir runs/t_comp
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import load_config_file
from common.options import (
    Command,
    add_dataclass_args,
    add_run_args,
    convert_value,
    dataclass_from_args,
    parse_csv,
    parse_kv_list,
)
from common.ranges import OPTION_TYPES
from common.registry import unknown_choice_message
from common.rundir import run_mode
from training.config import DATA_ON, OPTIMIZERS, SCHEDULES, TrainConfig, resume_note
from training.family_config import (
    MEMBER_CHECKPOINTS,
    PRUNE_SCOPES,
    RESUME_FREE_BAN,
    BANConfig,
    CompressConfig,
    KDConfig,
)
from training.options import (
    TRAIN_HELP,
    add_data_args,
    add_model_args,
    add_train_args,
    add_train_command_args,
    data_from_args,
    model_spec_from_args,
    train_from_args,
    training_summary,
)

KD_HELP = {
    "teacher": "teacher checkpoint (written by `train`; same classes, channels and input size as the data)",
    "alpha": "weight of the soft teacher term: (1-alpha)*CE + alpha*T^2*KL(teacher || student)",
    "temperature": "softmax temperature T of the soft term",
    "teacher_name": "teacher's member name in family.json", "student_name": "student's member name in family.json",
    "member_checkpoint": "student checkpoint listed in family.json: last (final epoch) or best (best test top-1)",
}
BAN_HELP = {
    "generations": "number of generations G (g0 trained with CE, g1..g{G-1} each from the previous one)",
    "temperature": "softmax temperature T of the soft term (applied to teacher and student)",
    "member_checkpoint": "each generation's checkpoint used as the next teacher and listed in family.json",
    "name_prefix": "member names in family.json: PREFIX0, PREFIX1, ...",
}
COMPRESS_HELP = {
    "checkpoint": "checkpoint to compress (written by `train`)",
    "prune": "fraction of conv/linear weights set to zero by magnitude",
    "prune_scope": "layer: that fraction in every layer; global: one magnitude threshold over all layers",
    "quantize_bits": "2**bits shared weight values per layer by k-means (0: no weight sharing)",
    "finetune_epochs": "fine-tuning epochs keeping pruned weights at zero and shared weights shared (0: none)",
    "data_root": "data root to use instead of the one recorded in the checkpoint",
    "original_name": "original's member name in family.json", "compressed_name": "the copy's member name",
}


def _print_metrics(m: dict[str, Any], what: str) -> None:
    print(f"{what}: test top-1 {m['test_top1']:.2f}% (best {m['best_test_top1']:.2f}%), "
          f"{m['train_time_s']:.1f}s of training")


# --------------------------------------------------------------------------- distill

def _add_distill(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    add_model_args(p)
    add_train_args(p)
    g = p.add_argument_group("knowledge distillation")
    add_dataclass_args(g, KDConfig, help=KD_HELP, choices={"member_checkpoint": list(MEMBER_CHECKPOINTS)})
    add_run_args(p)


def _run_distill(args: argparse.Namespace) -> None:
    from training.distill import distill

    res = distill(data_from_args(args), model_spec_from_args(args), dataclass_from_args(KDConfig, args),
                  dataclass_from_args(TrainConfig, args), args.out_dir, run_mode(args.resume, args.overwrite))
    _print_metrics(res.train.metrics, "student")
    print(f"teacher: test top-1 {res.teacher_metrics['test_top1']:.2f}%")
    print(f"checkpoints: {res.train.best_path} (best), {res.train.last_path} (last); family: {res.manifest}")


# --------------------------------------------------------------------------- born-again

def _add_born_again(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    add_model_args(p)
    add_train_args(p)
    g = p.add_argument_group("Born-Again networks")
    add_dataclass_args(g, BANConfig, skip=("lam",), help=BAN_HELP,
                       choices={"member_checkpoint": list(MEMBER_CHECKPOINTS)})
    g.add_argument("--lambda", "--lam", dest="lam", type=OPTION_TYPES["lam"], default=BANConfig.lam,
                   help="weight of the soft term: CE + lambda*T^2*softCE(teacher, student)")
    add_run_args(p)


def _run_born_again(args: argparse.Namespace) -> None:
    from training.born_again import born_again

    res = born_again(data_from_args(args), model_spec_from_args(args), dataclass_from_args(BANConfig, args),
                     dataclass_from_args(TrainConfig, args), args.out_dir, run_mode(args.resume, args.overwrite))
    print(res.table, end="")
    print(f"family: {res.manifest}; per generation: {Path(args.out_dir) / 'generations.json'}")


# --------------------------------------------------------------------------- search

def _searchable() -> dict[str, Command]:
    train = Command("train", "train one classifier", add_train_command_args,
                    lambda args: print(training_summary(train_from_args(args))))
    return {"train": train, "distill": next(c for c in COMMANDS if c.name == "distill")}


def _add_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="YAML/JSON config of the searched command's options "
                   "(may hold `command: distill|train`)")
    p.add_argument("--grid", nargs="+", required=True, metavar="OPTION=V1,V2",
                   help="values per option, e.g. alpha=0.1,0.5,0.9 temperature=1,4,20")
    p.add_argument("--command", default=None, choices=["distill", "train"],
                   help="command run at every grid point (default: the base config's `command`, else distill)")
    p.add_argument("--out_dir", required=True, help="one run directory per grid point is made here")
    p.add_argument("--overwrite", action="store_true", help="delete every run in --out_dir and start again "
                   "(default: finished runs are skipped, interrupted ones resumed, if started with the same options)")


def _run_search(args: argparse.Namespace) -> None:
    from training.grid import run_grid

    base = load_config_file(args.base)
    command = args.command or base.get("command") or "distill"
    base.pop("command", None)
    cmds = _searchable()
    if command not in cmds:
        raise UserError(unknown_choice_message("searchable command", command, sorted(cmds)))
    cmd = cmds[command]
    parser = argparse.ArgumentParser(prog=f"search {command}", add_help=False)
    cmd.add_args(parser)
    actions = {a.dest: a for a in parser._actions}
    reserved = {"out_dir", "resume", "overwrite"}
    valid = sorted(k for k in actions if k not in reserved)
    grid = {k: parse_csv(v) for k, v in parse_kv_list(args.grid, "--grid").items()}
    for where, keys in ((f"--base {args.base}", base), ("--grid", grid)):
        bad = sorted(set(keys) & reserved)
        if bad:
            raise UserError(f"{where} sets {', '.join(bad)}; search names and resumes each run directory itself")
        unknown = sorted(set(keys) - set(actions))
        if unknown:
            raise UserError(f"{where} sets unknown {command} option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    base = {k: convert_value(actions[k], v, f"--base {args.base}") for k, v in base.items()}
    for k, vals in grid.items():
        for v in vals:
            convert_value(actions[k], v, "--grid")

    defaults = {k: a.default for k, a in actions.items() if k not in reserved}

    def options(base: dict[str, Any], point: dict[str, str]) -> dict[str, Any]:
        """A run's options: the command's defaults, then the base config, then the grid point."""
        return {**defaults, **base, **{k: convert_value(actions[k], v, "--grid") for k, v in point.items()}}

    def run_point(point: dict[str, str], run_dir: Path, mode: str) -> None:
        print(f"== {run_dir.name} ({'resuming' if mode == 'resume' else 'new'})")
        parser.set_defaults(**options(base, point))
        argv = ["--out_dir", str(run_dir)] + (["--resume"] if mode == "resume" else [])
        cmd.run(parser.parse_args(argv))

    statuses = run_grid(grid, args.out_dir, run_point, overwrite=args.overwrite, options=options,
                        config={"command": command, "base": base, "base_file": str(Path(args.base).resolve())})
    skipped = sum(s["status"].startswith("skipped") for s in statuses)
    print(f"{len(statuses)} runs ({skipped} already finished) in {args.out_dir}")
    _print_summary(args.out_dir, None)


# --------------------------------------------------------------------------- summarize

def _print_summary(root: str, out_dir: str | None) -> None:
    from training.grid import write_summary

    md, csv_path, text = write_summary(root, out_dir)
    print(text, end="")
    print(f"written: {md}, {csv_path}")


def _add_summarize(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder whose training runs (config.json + metrics.json) are tabulated")
    p.add_argument("--out_dir", default=None, help="where summary.md and summary.csv go (default: DIR)")


def _run_summarize(args: argparse.Namespace) -> None:
    _print_summary(args.dir, args.out_dir)


# --------------------------------------------------------------------------- compress

def _add_compress(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compression")
    add_dataclass_args(g, CompressConfig, help=COMPRESS_HELP, choices={"prune_scope": list(PRUNE_SCOPES)})
    t = p.add_argument_group("fine-tuning")
    add_dataclass_args(t, TrainConfig, skip=("epochs",), help=TRAIN_HELP,
                       choices={"optimizer": list(OPTIMIZERS), "schedule": list(SCHEDULES), "data_on": list(DATA_ON)})
    p.set_defaults(lr=0.005)  # fine-tuning: a tenth of the training default
    add_run_args(p)


def _run_compress(args: argparse.Namespace) -> None:
    from training.compress import compress

    res = compress(dataclass_from_args(CompressConfig, args), dataclass_from_args(TrainConfig, args), args.out_dir,
                   run_mode(args.resume, args.overwrite))
    m = res.metrics
    print(f"test top-1: {m['top1_before']:.2f}% before, {m['top1_pruned']:.2f}% pruned, "
          f"{m['top1_quantized']:.2f}% shared weights, {m['top1_after']:.2f}% after {m['finetune_epochs']} "
          f"fine-tuning epochs")
    print(f"sparsity {m['sparsity']:.3f}, {m['bits']} bits; weight storage ~{m['storage']['ratio_without_index_overhead']:.1f}x "
          f"smaller (sparse-index overhead not counted)")
    print(f"checkpoint: {res.checkpoint}; family: {res.manifest}")


COMMANDS = [
    Command("distill", "train a student with knowledge distillation", _add_distill, _run_distill,
            "Knowledge distillation: (1-alpha)*CE + alpha*T^2*KL(softmax(t/T) || softmax(s/T)), KL summed over "
            "classes and averaged over the batch; the frozen teacher sees the student's exact augmented batch. "
            "--out_dir becomes the student's run directory plus family.json. --resume continues it with the options "
            f"it was started with ({resume_note('teacher_name', 'student_name', 'member_checkpoint')})."),
    Command("born-again", "train Born-Again generations", _add_born_again, _run_born_again,
            "Born-Again networks: generation 0 with CE, generation g+1 with CE + lambda*T^2*softCE to generation g. "
            "Each generation is a run directory out_dir/gN; generations.json/.md give each generation's and the "
            "running ensemble's test top-1; --resume continues an interrupted generation and keeps finished ones, "
            f"with the options they were started with ({resume_note(*RESUME_FREE_BAN)})."),
    Command("search", "grid search over options of distill or train", _add_search, _run_search,
            "Run the command of a base config once per grid point (one run directory each, named like "
            "alpha=0.5_temperature=4); finished runs are skipped, interrupted ones resumed; a run started with other "
            "options (a changed base config) is refused: pass --overwrite or a new --out_dir. Ends with a summary."),
    Command("summarize", "table of runs (markdown + CSV)", _add_summarize, _run_summarize,
            "Walk DIR for training runs and write summary.md and summary.csv: run, the options that differ "
            "between runs, best and last test top-1, test loss."),
    Command("compress", "pruned + weight-shared copy of a network", _add_compress, _run_compress,
            "Deep-Compression-style copy: magnitude pruning (torch.nn.utils.prune), k-means weight sharing with "
            "2**bits values per layer, fine-tuning that keeps both; writes compressed.pt (same architecture), "
            "metrics.json (sparsity, bits, distinct values, accuracy before/after) and family.json."),
]
