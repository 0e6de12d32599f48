"""Born-Again generations: generation g+1 has generation g's architecture and learns from its outputs
(CE + lambda·T²·soft-CE, ``training/kd.py``); the family reports each generation and the ensemble of
generations 0..g.

    born_again   out_dir/g0, g1, ... one run dir per generation; family.json, generations.json/.md
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from common.checkpoints import load_checkpoint
from common.device import use_device
from common.errors import UserError
from common.files import read_json, write_json
from common.rundir import RunDir, is_finished
from training.datasets import DataSpec
from training.families import (
    adopt_run,
    check_member_checkpoint,
    data_num_classes,
    load_teacher,
    member_path,
    non_empty,
    seeded_model,
    test_logits,
)
from training.family_config import RESUME_FREE_BAN, BANConfig  # BANConfig: re-exported, its old home
from training.kd import ban_loss_fn
from training.loop import RESUME_FREE, RUN_SECTIONS, TrainConfig, check_resume_config, cross_entropy_loss
from training.manifest import Member, write_manifest
from training.models import model_from_checkpoint
from training.runner import ModelSpec, resolve_data, run_training


@dataclass
class BANResult:
    generations: list[dict[str, Any]]
    manifest: Path
    table: str


def ensemble_top1(logits: Sequence[torch.Tensor], labels: torch.Tensor) -> list[float]:
    """Top-1 (percent) of the running ensembles: entry g averages the softmax of logits[0..g].
    logits: G tensors (N, C); labels (N,)."""
    acc, probs = [], torch.zeros_like(logits[0], dtype=torch.float64)
    for lg in logits:
        probs += torch.softmax(lg.double(), dim=1)                       # (N, C) running sum
        acc.append(100.0 * float((probs.argmax(dim=1) == labels).double().mean()))
    return acc


def _ban_options(ban: BANConfig) -> dict[str, Any]:
    """The options every generation must share."""
    return {k: v for k, v in asdict(ban).items() if k not in RESUME_FREE_BAN}


def born_again(data: DataSpec, model_spec: ModelSpec, ban: BANConfig, cfg: TrainConfig, out_dir: str | Path,
               mode: str = "new", reuse: str | Path | None = None) -> BANResult:
    """Train G generations of one architecture; generation g+1 learns from generation g.

    Generation g trains with seed ``cfg.seed + g`` (its own initialisation and data order). With
    ``mode="resume"`` finished generations are kept as they are, an interrupted one continues from
    its last checkpoint, and missing ones are trained. ``reuse``: a finished run directory with
    generation 0's recipe (``training.families.recipe_hash``), reused as generation 0 instead of
    training the same net again.
    """
    if ban.generations < 1:
        raise UserError(f"--generations must be >= 1, got {ban.generations}")
    check_member_checkpoint(ban.member_checkpoint)
    ban_loss_fn(ban.lam, ban.temperature)  # validates λ and T before anything is written
    data = resolve_data(data, model_spec)  # a timm arch: input size / normalisation from its pretrained_cfg
    out = Path(out_dir)
    num_classes = data_num_classes(data)
    rows: list[dict[str, Any]] = []
    config = {"data": asdict(data), "model": asdict(model_spec), "train": asdict(cfg), "born_again": asdict(ban)}
    with RunDir(out, mode) as root:
        if root.resuming and root.file("config.json").exists():    # before config.json is rewritten
            check_resume_config(read_json(root.file("config.json")).get("config", {}), config, out,
                                (*RUN_SECTIONS, "born_again"), {**RESUME_FREE, "born_again": RESUME_FREE_BAN})
        root.write_config(config, device=use_device(cfg.device))
        for g in range(ban.generations):
            gdir = out / f"g{g}"
            teacher, tpath, tsha = None, None, None
            if g > 0:
                tpath = member_path(out / f"g{g - 1}", ban.member_checkpoint).resolve()
                teacher, _, tsha = load_teacher(tpath, data, num_classes, what=f"generation {g - 1} checkpoint")
            if g == 0 and reuse is not None and not non_empty(gdir):
                adopt_run(reuse, gdir)
                status = "reused"
            elif is_finished(gdir):
                _check_same_generation(gdir, ban, tsha)
                status = "kept"
            else:
                gmode = "resume" if non_empty(gdir) else "new"
                if gmode == "resume":
                    _check_same_generation(gdir, ban, tsha)
                loss_fn = (cross_entropy_loss(cfg.label_smoothing) if g == 0
                           else ban_loss_fn(ban.lam, ban.temperature, cfg.label_smoothing))
                cfg_g = replace(cfg, seed=cfg.seed + g)
                model = seeded_model(model_spec, data, num_classes, cfg_g.seed)
                record = {**_ban_options(ban), "generation": g, "teacher": str(tpath) if tpath else None,
                          "teacher_sha256": tsha}
                family = {"family": "born-again", "generation": g, "teacher_checkpoint": record["teacher"],
                          "teacher_sha256": tsha}
                run_training(data, model_spec, cfg_g, gdir, gmode, loss_fn=loss_fn, teacher=teacher, model=model,
                             family=family, extra_config={"born_again": record}, desc=f"generation {g}")
                status = "resumed" if gmode == "resume" else "trained"
            rows.append({"generation": g, "name": f"{ban.name_prefix}{g}", "status": status,
                         "checkpoint": member_path(gdir, ban.member_checkpoint), "teacher_sha256": tsha,
                         "train_time_s": read_json(gdir / "metrics.json").get("train_time_s")})
        # evaluate the chosen checkpoint of every generation and the running ensembles
        logits, labels = [], None
        for r in rows:
            model = model_from_checkpoint(load_checkpoint(r["checkpoint"]), str(r["checkpoint"]))
            lg, labels, ev = test_logits(model, data, cfg)
            logits.append(lg)
            r["test_top1"], r["test_loss"] = ev["top1"], ev["loss"]
        for r, e in zip(rows, ensemble_top1(logits, labels)):
            r["ensemble_top1"] = e
        members = [Member(r["name"], str(r["checkpoint"]), "generation", generation=r["generation"],
                          teacher=rows[r["generation"] - 1]["name"] if r["generation"] > 0 else None,
                          arch=model_spec.arch,
                          metrics={"test_top1": r["test_top1"], "test_loss": r["test_loss"],
                                   "ensemble_top1": r["ensemble_top1"]}) for r in rows]
        manifest = write_manifest(out, "born-again", members, config={"born_again": asdict(ban),
                                                                     "train": asdict(cfg), "data": asdict(data)})
        summary = [{**r, "checkpoint": f"g{r['generation']}/{ban.member_checkpoint}.pt"} for r in rows]
        table = generations_markdown(summary, ban.member_checkpoint)
        write_json(out / "generations.json", {"member_checkpoint": ban.member_checkpoint,
                                              "ensemble": "mean softmax of generations 0..g", "generations": summary})
        (out / "generations.md").write_text(table)
        root.finish({"generations": len(rows), "test_top1": [r["test_top1"] for r in rows],
                     "ensemble_top1": [r["ensemble_top1"] for r in rows],
                     "final_test_top1": rows[-1]["test_top1"], "final_ensemble_top1": rows[-1]["ensemble_top1"]})
    return BANResult(summary, manifest, table)


def _check_same_generation(gdir: Path, ban: BANConfig, teacher_sha: str | None) -> None:
    """A kept or resumed generation must have been trained with the same options and teacher."""
    rec = read_json(gdir / "config.json").get("config", {}).get("born_again", {})
    want = _ban_options(ban)
    diff = {k: (rec.get(k), v) for k, v in want.items() if k in rec and rec.get(k) != v}
    if diff:
        shown = ", ".join(f"{k}: recorded {a!r}, asked {b!r}" for k, (a, b) in diff.items())
        raise UserError(f"{gdir} was trained with other Born-Again options ({shown}); use the same options, "
                        f"--overwrite, or another --out_dir")
    if teacher_sha and rec.get("teacher_sha256") and rec["teacher_sha256"] != teacher_sha:
        raise UserError(f"{gdir} was trained from a teacher that is not the current previous generation "
                        f"(sha256 differs); use --overwrite to retrain the later generations")


def generations_markdown(rows: list[dict[str, Any]], which: str) -> str:
    lines = ["| generation | member | test top-1 (%) | ensemble 0..g top-1 (%) | status |",
             "|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['generation']} | {r['name']} | {r['test_top1']:.2f} | {r['ensemble_top1']:.2f} | "
                     f"{r['status']} |")
    note = (f"\nEach generation's `{which}.pt` on the test split; the ensemble averages the softmax of "
            f"generations 0..g.\n")
    return "\n".join(lines) + "\n" + note
