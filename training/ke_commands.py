"""``evolve``: Knowledge-Evolution generations (Taha et al., CVPR 2021) on top of the one training loop.

    python cli.py evolve --dataset animal-mnist --arch vgg_small --generations 3 --epochs 5 \\
        --split kels --split_rate 0.5 --out_dir runs/ke
    python cli.py evolve --preset ke --dataset flower102 --data_root DATA --out_dir runs/ke_flower

``out_dir`` holds ``g1 .. gG`` (normal run directories; every checkpoint carries the family fields
generation, split, split_rate and the fit-hypothesis ``masks``), ``g{g}/slim.pt`` (KELS: the slim
network as a real smaller model, ``arch_kwargs={"width": k}``), ``g{g}/generation.json``,
``generations.json`` + ``generations.md`` (the per-generation table), ``family.json`` and the
family's own ``config.json``/``metrics.json``.

Presets (``--preset ke``) fill only the options the user did not give (on the command line or in
``--config``): each flag overrides its own value and nothing else (the original switched every
default as soon as any flag was given).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from common.checkpoints import load_checkpoint, save_checkpoint
from common.device import resolve_device
from common.errors import UserError
from common.files import atomic_write, read_json, write_json
from common.options import Command, add_dataclass_args, add_run_args, dataclass_from_args
from common.provenance import sha256_file
from common.registry import unknown_choice_message
from common.rundir import RunDir, run_mode
from training.commands import add_data_args, add_model_args, add_train_args, data_from_args
from training.data import build_dataset, transform_spec
from training.datasets import DataSpec
from training.ke import (
    SPLIT_MODES,
    LayerSplit,
    channel_plan,
    check_split,
    count_params,
    extract_slim,
    reinit,
    split_masks,
)
from training.loop import TrainConfig, evaluate, make_loader
from training.loop import validate as validate_train
from training.manifest import Member, write_manifest
from training.models import model_from_checkpoint
from training.runner import ModelSpec, build_for_data, is_finished, run_training

FAMILY = "knowledge-evolution"


@dataclass(frozen=True)
class EvolveConfig:
    generations: int = 3        # KE generations; the first trains the dense net from scratch
    split: str = "kels"         # kels (kernel level, gives a slim net) | wels (weight level)
    split_rate: float = 0.5     # k: fraction of each layer in the fit hypothesis, in (0, 1)


KE_HELP = {
    "generations": "number of generations (>= 1); --resume may raise it to continue evolving",
    "split": "split mode: " + ", ".join(SPLIT_MODES) + " (kels: first ceil(k*out) x ceil(k*in) kernels, "
             "has a slim net; wels: i.i.d. Bernoulli(k) weights)",
    "split_rate": "k, the fraction of each layer kept in the fit hypothesis, in (0, 1)",
}

# Knowledge Evolution's published defaults (methods.md section 2): ResNet18, split 0.5, 200 epochs
# per generation, SGD lr 0.256, momentum 0.9, wd 1e-4, batch 32, cosine with 5 warm-up epochs,
# label smoothing 0.1, RandomResizedCrop/flip transform.
PRESETS: dict[str, dict[str, Any]] = {
    "ke": {"arch": "resnet18", "split": "kels", "split_rate": 0.5, "epochs": 200, "optimizer": "sgd",
           "lr": 0.256, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 32, "schedule": "cosine",
           "warmup_epochs": 5.0, "label_smoothing": 0.1, "transform": "ke"},
}

# Options that may change on --resume (they do not change what a generation computes).
RESUMABLE_TRAIN_KEYS = ("device", "num_workers", "amp", "channels_last", "eval_every", "save_every")


def validate_evolve(ke: EvolveConfig) -> None:
    if int(ke.generations) < 1:
        raise UserError(f"--generations must be >= 1, got {ke.generations}")
    check_split(ke.split, ke.split_rate)


# --------------------------------------------------------------------------- presets

class Unset:
    """Default of an option the user did not give: the preset's value wins, else ``value``."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)

    def __str__(self) -> str:
        return str(self.value)


_NEVER_PRESET = ("help", "out_dir", "resume", "overwrite", "preset")


def mark_unset(p: argparse.ArgumentParser) -> None:
    """Wrap every option default in :class:`Unset` so explicitly given values can be told apart
    (``--config`` files set real defaults through ``set_defaults`` and so count as given)."""
    for action in p._actions:
        if action.dest in _NEVER_PRESET or action.default is argparse.SUPPRESS:
            continue
        p.set_defaults(**{action.dest: Unset(action.default)})


def resolve_options(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Options with the preset applied to the ones not given; also the names the preset set."""
    name = getattr(args, "preset", None)
    if name is not None and name not in PRESETS:
        raise UserError(unknown_choice_message("preset", name, sorted(PRESETS)))
    preset = PRESETS.get(name, {}) if name else {}
    out, from_preset = {}, []
    for key, value in vars(args).items():
        if isinstance(value, Unset):
            if key in preset:
                out[key] = preset[key]
                from_preset.append(key)
            else:
                out[key] = value.value
        else:
            out[key] = value
    unknown = sorted(set(preset) - set(out))
    assert not unknown, f"preset {name!r} names options the command lacks: {unknown}"
    return argparse.Namespace(**out), sorted(from_preset)


# --------------------------------------------------------------------------- generations

def _check_resume(prev: dict[str, Any], now: dict[str, Any], out_dir: Path) -> None:
    """A resumed family must compute the same generations: compare what defines them."""
    pairs = [(f"data.{k}", v, now["data"].get(k)) for k, v in prev.get("data", {}).items()]
    pairs += [(f"model.{k}", v, now["model"].get(k)) for k, v in prev.get("model", {}).items()]
    pairs += [(f"ke.{k}", prev.get("ke", {}).get(k), now["ke"][k]) for k in ("split", "split_rate")]
    pairs += [(f"train.{k}", v, now["train"].get(k)) for k, v in prev.get("train", {}).items()
              if k not in RESUMABLE_TRAIN_KEYS]
    diffs = [f"{k} was {a!r}, now {b!r}" for k, a, b in pairs if a != b]
    if diffs:
        raise UserError(f"cannot resume {out_dir}: it was started with other settings ({'; '.join(diffs)}). "
                        f"Resume with the same options (only --generations and {', '.join(RESUMABLE_TRAIN_KEYS)} "
                        f"may change), or use --overwrite or another --out_dir")


def _generation_done(gdir: Path, ke: EvolveConfig) -> bool:
    return (is_finished(gdir) and (gdir / "generation.json").exists()
            and (ke.split != "kels" or (gdir / "slim.pt").exists()))


def _reinit_seed(seed: int, generation: int) -> int:
    return seed * 1000 + generation


def _finish_generation(g: int, gdir: Path, ke: EvolveConfig, plan: dict[str, LayerSplit] | None,
                       cfg: TrainConfig, test_set, t0: float) -> dict[str, Any]:
    """Evaluate the generation's dense net (its last epoch) and, for KELS, extract, evaluate and save
    the slim net; write ``generation.json``."""
    device = resolve_device(cfg.device)
    loader = make_loader(test_set, max(cfg.batch_size, 256), False, cfg.num_workers)
    last = gdir / "last.pt"
    ck = load_checkpoint(last)
    dense = model_from_checkpoint(ck, str(last)).to(device)
    ev = evaluate(dense, loader, device, cfg.amp)
    row: dict[str, Any] = {
        "generation": g, "dense_top1": ev["top1"], "dense_top5": ev["top5"], "dense_loss": ev["loss"],
        "dense_params": count_params(dense), "checkpoint": f"g{g}/last.pt", "epochs": int(ck["epoch"]),
        "train_time_s": float(read_json(gdir / "metrics.json").get("train_time_s", 0.0)),
        "slim_top1": None, "slim_top5": None, "slim_loss": None, "slim_params": None, "slim_checkpoint": None}
    if plan is not None:
        slim = extract_slim(dense, plan)  # (kept out x kept in) blocks, by module path
        ev_s = evaluate(slim, loader, device, cfg.amp)
        skip = ("state_dict", "optimizer", "scheduler", "history", "best_top1", "masks", "metrics")
        slim_ck = {k: v for k, v in ck.items() if k not in skip}
        slim_ck.update(state_dict={k: v.cpu() for k, v in slim.state_dict().items()},
                       arch_kwargs={"width": ke.split_rate}, role="slim", slim_of="last.pt",
                       slim_of_sha256=sha256_file(last),
                       metrics={"test_top1": ev_s["top1"], "test_top5": ev_s["top5"], "test_loss": ev_s["loss"]})
        save_checkpoint(gdir / "slim.pt", slim_ck)
        row.update(slim_top1=ev_s["top1"], slim_top5=ev_s["top5"], slim_loss=ev_s["loss"],
                   slim_params=count_params(slim), slim_checkpoint=f"g{g}/slim.pt")
    row["time_s"] = time.perf_counter() - t0
    write_json(gdir / "generation.json", row)
    return row


def generations_markdown(rows: list[dict[str, Any]], title: str) -> str:
    """The per-generation table (accuracies in percent)."""
    def f(v: Any, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    lines = [f"# {title}", "",
             "| generation | dense top-1 (%) | slim top-1 (%) | dense params | slim params | train time (s) | time (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['generation']} | {f(r['dense_top1'], '.2f')} | {f(r['slim_top1'], '.2f')} | "
                     f"{f(r['dense_params'], ',d')} | {f(r['slim_params'], ',d')} | {f(r['train_time_s'], '.1f')} | "
                     f"{f(r.get('time_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


def _write_family(out: Path, rows: list[dict[str, Any]], model_spec: ModelSpec, ke: EvolveConfig,
                  data: DataSpec, config: dict[str, Any]) -> None:
    write_json(out / "generations.json", {"arch": model_spec.arch, "split": ke.split, "split_rate": ke.split_rate,
                                          "dataset": data.name, "generations": rows})
    title = (f"Knowledge Evolution: {model_spec.arch}, {ke.split.upper()} split rate {ke.split_rate}, "
             f"data set {data.name} (test top-1 of each generation's last epoch)")
    with atomic_write(out / "generations.md") as fh:
        fh.write(generations_markdown(rows, title))
    members = []
    for r in rows:
        g = r["generation"]
        members.append(Member(f"ke_g{g}", str(out / r["checkpoint"]), "generation", g, None, model_spec.arch,
                              metrics={"test_top1": r["dense_top1"]}))
        if r["slim_checkpoint"]:
            members.append(Member(f"ke_g{g}_slim", str(out / r["slim_checkpoint"]), "slim", g, None,
                                  model_spec.arch, metrics={"test_top1": r["slim_top1"]}))
    write_manifest(out, FAMILY, members, config)


def evolve(data: DataSpec, model_spec: ModelSpec, cfg: TrainConfig, ke: EvolveConfig, out_dir: str | Path,
           mode: str = "new", preset: str | None = None, preset_keys: list[str] | None = None,
           log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Run (or resume) ``ke.generations`` Knowledge-Evolution generations into ``out_dir``; return
    one row per generation (dense/slim top-1 and top-5, parameters, times, checkpoints).

    Generation 1 trains the dense net; before generation g > 1 the fit-hypothesis weights of g-1's
    last epoch are kept, the rest re-drawn (:func:`training.ke.reinit`), and the whole net is trained
    again with a fresh optimiser and schedule. Finished generations are never retrained.
    """
    log = log or (lambda s: None)
    validate_evolve(ke)
    validate_train(cfg)
    out = Path(out_dir)
    train_set = build_dataset(data, "train")
    test_set = build_dataset(data, "test")
    t = transform_spec(data)
    example = torch.zeros(1, t.channels, t.image_size, t.image_size)  # fixes flatten sizes of the plan
    config = {"data": asdict(data), "model": asdict(model_spec), "train": asdict(cfg), "ke": asdict(ke),
              "preset": preset, "from_preset": preset_keys or []}

    # The dense net of generation 1 (seeded) defines the split; checked before anything is written.
    torch.manual_seed(cfg.seed)
    dense0 = build_for_data(model_spec, data, train_set.num_classes)
    plan = channel_plan(dense0, ke.split_rate, example) if ke.split == "kels" else None

    rows: list[dict[str, Any]] = []
    with RunDir(out, mode) as run:
        if run.resuming and run.file("config.json").exists():
            _check_resume(read_json(run.file("config.json")).get("config", {}), config, out)
        run.write_config(config, device=cfg.device, n_train=len(train_set), n_test=len(test_set))
        first = out / "g1" / "last.pt"
        if run.resuming and first.exists():
            masks = load_checkpoint(first)["masks"]  # the stored split is the source of truth
        else:
            masks = split_masks(dense0, ke.split, ke.split_rate, example, seed=cfg.seed)
        sub_mode = "resume" if run.resuming else "new"
        for g in range(1, ke.generations + 1):
            gdir = out / f"g{g}"
            t0 = time.perf_counter()
            if _generation_done(gdir, ke):
                rows.append(read_json(gdir / "generation.json"))
                log(f"g{g}: finished earlier (dense {rows[-1]['dense_top1']:.2f}%), skipped")
                continue
            if not is_finished(gdir):
                parent = out / f"g{g - 1}" / "last.pt" if g > 1 else None
                if parent is None:
                    model = dense0
                else:
                    prev = model_from_checkpoint(load_checkpoint(parent), str(parent))
                    model = reinit(prev, masks, _reinit_seed(cfg.seed, g))
                family = {"family": FAMILY, "generation": g, "split": ke.split, "split_rate": ke.split_rate,
                          "masks": masks, "parent_checkpoint": str(parent) if parent else None,
                          "parent_sha256": sha256_file(parent) if parent else None}
                extra = {"ke": {**asdict(ke), "generation": g, "reinit_seed": _reinit_seed(cfg.seed, g) if parent
                                else None, "parent_checkpoint": str(parent) if parent else None},
                         "preset": preset}
                run_training(data, model_spec, replace(cfg, seed=cfg.seed + g - 1), gdir, sub_mode, model=model,
                             family=family, extra_config=extra, desc=f"ke g{g}")
            row = _finish_generation(g, gdir, ke, plan, cfg, test_set, t0)
            rows.append(row)
            _write_family(out, rows, model_spec, ke, data, config)
            slim = f", slim {row['slim_top1']:.2f}%" if row["slim_top1"] is not None else ""
            log(f"g{g}: dense {row['dense_top1']:.2f}%{slim} ({row['train_time_s']:.1f}s training, "
                f"{row['time_s']:.1f}s in all)")
        _write_family(out, rows, model_spec, ke, data, config)
        last = rows[-1]
        run.finish({"generations": len(rows), "test_top1": last["dense_top1"], "test_top5": last["dense_top5"],
                    "slim_test_top1": last["slim_top1"], "dense_top1": [r["dense_top1"] for r in rows],
                    "slim_top1": [r["slim_top1"] for r in rows],
                    "train_time_s": sum(r["train_time_s"] for r in rows)})
    return rows


# --------------------------------------------------------------------------- the command

def _add_evolve(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    add_model_args(p)
    add_train_args(p)
    g = p.add_argument_group("knowledge evolution")
    add_dataclass_args(g, EvolveConfig, help=KE_HELP)
    g.add_argument("--preset", default=None,
                   help="defaults of a published set-up, for the options not given: " +
                        "; ".join(f"{k}: " + ", ".join(f"{o}={v}" for o, v in sorted(d.items()))
                                  for k, d in PRESETS.items()))
    add_run_args(p)
    mark_unset(p)


def _run_evolve(args: argparse.Namespace) -> None:
    a, from_preset = resolve_options(args)
    data = data_from_args(a)
    cfg = dataclass_from_args(TrainConfig, a)
    ke = dataclass_from_args(EvolveConfig, a)
    out = Path(a.out_dir)
    evolve(data, ModelSpec(a.arch, a.weights), cfg, ke, out, run_mode(a.resume, a.overwrite),
           preset=a.preset, preset_keys=from_preset)
    print((out / "generations.md").read_text(), end="")
    print(f"generations: {out / 'generations.json'}; family manifest: {out / 'family.json'}")


COMMANDS = [
    Command("evolve", "Knowledge Evolution: train generations with split, re-initialised layers", _add_evolve,
            _run_evolve,
            "Knowledge Evolution (Taha et al. 2021): generation 1 trains the dense net; each later generation "
            "keeps the fit hypothesis (KELS: the first ceil(k*out) x ceil(k*in) kernels, WELS: random weights), "
            "re-draws the other weights, keeps BN and the classifier bias, and retrains with a fresh optimiser "
            "and schedule. After every generation the dense net (and the KELS slim net, saved as its own "
            "checkpoint) is evaluated. Writes g1..gG run directories, generations.json/.md and family.json "
            "into --out_dir. --preset ke gives the paper's defaults; every flag still overrides its own value."),
]
