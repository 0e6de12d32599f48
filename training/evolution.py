"""Knowledge-Evolution generations (Taha et al., CVPR 2021) on top of the one training loop.

``out_dir`` holds ``g1 .. gG`` (normal run directories; every checkpoint carries the family fields
generation, split, split_rate and the fit-hypothesis ``masks``), ``g{g}/slim.pt`` (KELS: the slim
network as a real smaller model, ``arch_kwargs={"width": k}``), ``g{g}/generation.json``,
``generations.json`` + ``generations.md`` (the per-generation table), ``family.json`` and the
family's own ``config.json``/``metrics.json``. Before each later generation the fit hypothesis is
kept and the reset hypothesis re-drawn (``training/ke.py``); an interrupted family resumes at the
interrupted generation.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from common.checkpoints import load_checkpoint, save_checkpoint
from common.device import use_device
from common.errors import UserError
from common.files import atomic_write, read_json, write_json
from common.provenance import sha256_file
from common.rundir import RunDir, is_finished
from training.data import build_dataset, transform_spec
from training.datasets import DataSpec
from training.families import adopt_run
from training.family_config import RESUME_FREE_KE, EvolveConfig  # EvolveConfig: re-exported, its old home
from training.ke import LayerSplit, channel_plan, check_split, count_params, extract_slim, reinit, split_masks
from training.loop import RESUME_FREE, RUN_SECTIONS, TrainConfig, check_resume_config, evaluate, make_loader
from training.loop import validate as validate_train
from training.manifest import Member, write_manifest
from training.models import model_from_checkpoint, slim_arch_kwargs
from training.runner import ModelSpec, build_for_data, resolve_data, run_training

FAMILY = "knowledge-evolution"


def validate_evolve(ke: EvolveConfig) -> None:
    if int(ke.generations) < 1:
        raise UserError(f"--generations must be >= 1, got {ke.generations}")
    check_split(ke.split, ke.split_rate)


def _generation_done(gdir: Path, ke: EvolveConfig) -> bool:
    return (is_finished(gdir) and (gdir / "generation.json").exists()
            and (ke.split != "kels" or (gdir / "slim.pt").exists()))


def _reinit_seed(seed: int, generation: int) -> int:
    return seed * 1000 + generation


def _finish_generation(g: int, gdir: Path, ke: EvolveConfig, plan: dict[str, LayerSplit] | None,
                       cfg: TrainConfig, test_set, t0: float) -> dict[str, Any]:
    """Evaluate the generation's dense net (its last epoch) and, for KELS, extract, evaluate and save
    the slim net; write ``generation.json``."""
    device = use_device(cfg.device)
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
                       arch_kwargs=slim_arch_kwargs(ck["arch"], ck.get("arch_kwargs"), ke.split_rate), role="slim",
                       slim_of="last.pt",
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
           log: Callable[[str], None] | None = print, reuse: str | Path | None = None) -> list[dict[str, Any]]:
    """Run (or resume) ``ke.generations`` Knowledge-Evolution generations into ``out_dir``; return
    one row per generation (dense/slim top-1 and top-5, parameters, times, checkpoints).

    Generation 1 trains the dense net; before generation g > 1 the fit-hypothesis weights of g-1's
    last epoch are kept, the rest re-drawn (:func:`training.ke.reinit`), and the whole net is trained
    again with a fresh optimiser and schedule. Finished generations are never retrained. ``reuse``: a
    finished run directory with generation 1's recipe (``training.families.recipe_hash``), reused as
    generation 1 (its checkpoint gains the split masks) instead of training the same net again.
    """
    log = log or (lambda s: None)
    validate_evolve(ke)
    validate_train(cfg)
    data = resolve_data(data, model_spec)  # a timm arch: input size / normalisation from its pretrained_cfg
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
            check_resume_config(read_json(run.file("config.json")).get("config", {}), config, out,
                                (*RUN_SECTIONS, "ke"), {**RESUME_FREE, "ke": RESUME_FREE_KE})
        run.write_config(config, device=use_device(cfg.device), n_train=len(train_set), n_test=len(test_set))
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
            if g == 1 and reuse is not None and not is_finished(gdir) and not any(gdir.glob("*.pt")):
                adopt_run(reuse, gdir)
                ck = load_checkpoint(gdir / "last.pt")
                (gdir / "last.pt").unlink()                   # a hard link: write a new file, not through it
                save_checkpoint(gdir / "last.pt", {**ck, "family": FAMILY, "generation": 1, "split": ke.split,
                                                   "split_rate": ke.split_rate, "masks": masks,
                                                   "parent_checkpoint": None, "parent_sha256": None,
                                                   "reused_from": str(Path(reuse).resolve())})
                log(f"g1: the recipe of {reuse}: reused, not trained again")
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
