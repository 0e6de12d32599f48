"""Network families built on the one training loop: knowledge distillation, Born-Again generations,
compressed copies, plus the seed's conveniences (a hyper-parameter grid and a results table).

Every training here goes through :func:`training.runner.run_training`; a family differs only in its
loss, its teacher and what happens between runs. Each family command writes ``family.json``
(:mod:`training.manifest`) listing its members so ``extract`` and the analysis can take it whole.

    distill      out_dir = the student's run dir (+ family.json: teacher, student)
    born_again   out_dir/g0, g1, ... one run dir per generation; family.json, generations.json/.md
    run_grid     out_dir/<opt=value_...>/ one run dir per grid point; search.json-style config, summary
    compress     out_dir/compressed.pt (a normal checkpoint), finetune/ (its run dir), family.json
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from common.checkpoints import load_checkpoint, save_checkpoint
from common.device import resolve_device
from common.errors import UserError
from common.files import read_json, write_json
from common.provenance import sha256_file
from common.rundir import RunDir
from training.compress import compression_stats, move_codes, project_, prune_magnitude, quantize_shared, storage_bits
from training.data import build_dataset, transform_spec
from training.datasets import DataSpec
from training.kd import ban_loss_fn, kd_loss_fn
from training.loop import TrainConfig, TrainResult, cross_entropy_loss, evaluate, make_loader, seed_everything
from training.manifest import Member, write_manifest
from training.models import model_from_checkpoint
from training.runner import ModelSpec, build_for_data, checkpoint_fields, is_finished, run_training

MEMBER_CHECKPOINTS = ("last", "best")


# =========================================================================== shared pieces

def _check_member_checkpoint(which: str) -> None:
    if which not in MEMBER_CHECKPOINTS:
        raise UserError(f"unknown --member_checkpoint {which!r}; valid: {', '.join(MEMBER_CHECKPOINTS)}")


def _member_path(run_dir: Path, which: str) -> Path:
    return Path(run_dir) / f"{which}.pt"


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(p.name != ".lock" for p in path.iterdir())


def data_num_classes(data: DataSpec) -> int:
    return build_dataset(data, "train").num_classes


def seeded_model(model_spec: ModelSpec, data: DataSpec, num_classes: int, seed: int) -> nn.Module:
    """A fresh model whose initialisation depends on ``seed`` only (not on earlier RNG use)."""
    seed_everything(seed)
    return build_for_data(model_spec, data, num_classes)


def load_teacher(path: str | Path, data: DataSpec, num_classes: int, what: str = "teacher"
                 ) -> tuple[nn.Module, dict[str, Any], str]:
    """Rebuild a teacher checkpoint and check it fits the data: class count, input channels and size.
    Returns (model, checkpoint dict, sha256 of the file)."""
    path = Path(path)
    ck = load_checkpoint(path)
    if not ck.get("arch"):
        raise UserError(f"{what} {path} is a bare state dict; a teacher must be a workbench checkpoint "
                        f"(it records its arch and class count)")
    if int(ck["num_classes"]) != num_classes:
        raise UserError(f"{what} {path} predicts {ck['num_classes']} classes but data set {data.name!r} has "
                        f"{num_classes} classes; distil from a teacher trained on the same classes")
    t = transform_spec(data)
    if ck.get("in_channels") is not None and int(ck["in_channels"]) != t.channels:
        raise UserError(f"{what} {path} takes {ck['in_channels']}-channel images but the data transform gives "
                        f"{t.channels} channels; pass --channels {ck['in_channels']}")
    if ck.get("input_size") is not None and int(ck["input_size"]) != t.image_size:
        raise UserError(f"{what} {path} was trained on {ck['input_size']} px inputs but the data transform gives "
                        f"{t.image_size} px; pass --image_size {ck['input_size']}")
    model = model_from_checkpoint(ck, f"{what} {path}")
    return model, ck, sha256_file(path)


def test_logits(model: nn.Module, data: DataSpec, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Logits (N, C) and labels (N,) of the test split in data-set order, plus top-1/loss."""
    device = resolve_device(cfg.device)
    test_set = build_dataset(data, "test")
    loader = make_loader(test_set, max(cfg.batch_size, 256), False, cfg.num_workers)
    ev = evaluate(model.to(device), loader, device, cfg.amp, return_logits=True)
    return ev.pop("logits"), torch.as_tensor(test_set.labels), ev


def _metric_subset(m: dict[str, Any]) -> dict[str, Any]:
    keys = ("test_top1", "best_test_top1", "test_top5", "test_loss", "epoch")
    return {k: m[k] for k in keys if m.get(k) is not None}


# =========================================================================== knowledge distillation

@dataclass(frozen=True)
class KDConfig:
    teacher: str | None = None          # teacher checkpoint (a workbench checkpoint of the same classes)
    alpha: float = 0.9                  # weight of the soft teacher term; 1 - alpha weights the label CE
    temperature: float = 4.0            # softmax temperature T of the soft term (scaled by T^2)
    teacher_name: str = "teacher"       # member names in family.json (the <net> names of feature files)
    student_name: str = "student"
    member_checkpoint: str = "last"     # student checkpoint family.json lists: last (final epoch) | best


@dataclass
class DistillResult:
    train: TrainResult
    teacher_metrics: dict[str, Any]
    manifest: Path


def distill(data: DataSpec, student: ModelSpec, kd: KDConfig, cfg: TrainConfig, out_dir: str | Path,
            mode: str = "new") -> DistillResult:
    """Train ``student`` with (1-α)·CE + α·T²·KL to the frozen teacher; out_dir is the student's run dir."""
    if not kd.teacher:
        raise UserError("distill needs --teacher CKPT (a checkpoint written by `train`)")
    _check_member_checkpoint(kd.member_checkpoint)
    if kd.teacher_name == kd.student_name:
        raise UserError(f"--teacher_name and --student_name must differ, both are {kd.teacher_name!r}")
    loss_fn = kd_loss_fn(kd.alpha, kd.temperature, cfg.label_smoothing)
    out = Path(out_dir)
    num_classes = data_num_classes(data)
    teacher_path = Path(kd.teacher).resolve()
    teacher, tck, sha = load_teacher(teacher_path, data, num_classes)
    if mode == "resume" and (out / "config.json").exists():
        recorded = read_json(out / "config.json").get("config", {}).get("kd", {}).get("teacher_sha256")
        if recorded and recorded != sha:
            raise UserError(f"{out} was distilled from a teacher with sha256 {recorded[:12]}…, but {teacher_path} "
                            f"has {sha[:12]}…; resume with the same teacher or use --overwrite")
    model = seeded_model(student, data, num_classes, cfg.seed)
    kd_record = {**asdict(kd), "teacher": str(teacher_path), "teacher_sha256": sha, "teacher_arch": tck["arch"]}
    family = {"family": "kd", "role": "student", "teacher_checkpoint": str(teacher_path), "teacher_sha256": sha}
    res = run_training(data, student, cfg, out, mode, loss_fn=loss_fn, teacher=teacher, model=model,
                       family=family, extra_config={"kd": kd_record}, desc="distill")
    _, _, tev = test_logits(teacher, data, cfg)
    teacher_metrics = {"test_top1": tev["top1"], "test_top5": tev["top5"], "test_loss": tev["loss"]}
    members = [
        Member(kd.teacher_name, str(teacher_path), "teacher", arch=tck["arch"], sha256=sha, metrics=teacher_metrics),
        Member(kd.student_name, str(_member_path(out, kd.member_checkpoint)), "student", teacher=kd.teacher_name,
               arch=student.arch, metrics=_metric_subset(res.metrics)),
    ]
    manifest = write_manifest(out, "kd", members, config={"kd": kd_record, "train": asdict(cfg), "data": asdict(data)})
    return DistillResult(res, teacher_metrics, manifest)


# =========================================================================== Born-Again networks

@dataclass(frozen=True)
class BANConfig:
    generations: int = 3                # generations trained: g0 (CE only), g1 .. g{G-1} (from the previous one)
    lam: float = 0.5                    # weight λ of the soft term: CE + λ·T²·H(softmax(t/T), softmax(s/T))
    temperature: float = 1.0            # T, applied to teacher and student logits (KC's script never applied it)
    member_checkpoint: str = "last"     # each generation's checkpoint used as teacher and in family.json
    name_prefix: str = "ban_g"          # member names: ban_g0, ban_g1, ...


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
    """The options every generation must share (the count of generations may grow on --resume)."""
    return {"lam": ban.lam, "temperature": ban.temperature, "member_checkpoint": ban.member_checkpoint}


def born_again(data: DataSpec, model_spec: ModelSpec, ban: BANConfig, cfg: TrainConfig, out_dir: str | Path,
               mode: str = "new") -> BANResult:
    """Train G generations of one architecture; generation g+1 learns from generation g.

    Generation g trains with seed ``cfg.seed + g`` (its own initialisation and data order). With
    ``mode="resume"`` finished generations are kept as they are, an interrupted one continues from
    its last checkpoint, and missing ones are trained.
    """
    if ban.generations < 1:
        raise UserError(f"--generations must be >= 1, got {ban.generations}")
    _check_member_checkpoint(ban.member_checkpoint)
    ban_loss_fn(ban.lam, ban.temperature)  # validates λ and T before anything is written
    out = Path(out_dir)
    num_classes = data_num_classes(data)
    rows: list[dict[str, Any]] = []
    with RunDir(out, mode) as root:
        root.write_config({"data": asdict(data), "model": asdict(model_spec), "train": asdict(cfg),
                           "born_again": asdict(ban)}, device=cfg.device)
        for g in range(ban.generations):
            gdir = out / f"g{g}"
            teacher, tpath, tsha = None, None, None
            if g > 0:
                tpath = _member_path(out / f"g{g - 1}", ban.member_checkpoint).resolve()
                teacher, _, tsha = load_teacher(tpath, data, num_classes, what=f"generation {g - 1} checkpoint")
            if is_finished(gdir):
                _check_same_generation(gdir, ban, tsha)
                status = "kept"
            else:
                gmode = "resume" if _non_empty(gdir) else "new"
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
                         "checkpoint": _member_path(gdir, ban.member_checkpoint), "teacher_sha256": tsha,
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


# =========================================================================== grid search

def grid_points(grid: dict[str, Sequence[str]]) -> list[dict[str, str]]:
    """The Cartesian product in the given key order: {"a": ["1", "2"], "b": ["x"]} -> [{a:1,b:x}, {a:2,b:x}]."""
    for k, vals in grid.items():
        if not vals:
            raise UserError(f"--grid {k}= has no values; give e.g. {k}=0.1,0.5")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    """Run-dir name of a grid point: ``alpha=0.5_temperature=4`` (unsafe characters replaced by '-')."""
    return "_".join(f"{k}={re.sub(r'[^A-Za-z0-9.+-]', '-', str(v))}" for k, v in point.items())


def run_grid(grid: dict[str, Sequence[str]], out_dir: str | Path,
             run_point: Callable[[dict[str, str], Path, str], Any], overwrite: bool = False,
             config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run ``run_point(point, run_dir, mode)`` for every grid point, one run dir each under ``out_dir``.

    Finished runs are skipped, interrupted ones resumed (mode "resume"), the rest started ("new"); with
    ``overwrite`` the whole folder is emptied first. Writes config.json/metrics.json of the search and
    ``summary.md``/``summary.csv``.
    """
    points = grid_points(grid)
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise UserError(f"grid points map to the same run directory name: {sorted(names)}")
    out = Path(out_dir)
    statuses: list[dict[str, Any]] = []
    with RunDir(out, "overwrite" if overwrite else "resume") as root:
        root.write_config({"grid": {k: list(v) for k, v in grid.items()}, **(config or {})})
        for point, name in zip(points, names):
            d = out / name
            if is_finished(d):
                statuses.append({"run": name, "point": point, "status": "skipped (finished)"})
                continue
            mode = "resume" if _non_empty(d) else "new"
            run_point(point, d, mode)
            statuses.append({"run": name, "point": point, "status": "resumed" if mode == "resume" else "trained"})
        root.finish({"runs": statuses})
    write_summary(out)
    return statuses


# =========================================================================== summarize

def find_runs(root: str | Path) -> list[dict[str, Any]]:
    """Training run dirs under ``root`` (itself included): config.json + metrics.json with test_top1."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    runs = []
    for cfg_path in sorted(root.rglob("config.json")):
        d = cfg_path.parent
        if not (d / "metrics.json").is_file():
            continue
        metrics = read_json(d / "metrics.json")
        if not isinstance(metrics, dict) or not isinstance(metrics.get("test_top1"), (int, float)):
            continue
        rel = d.relative_to(root).as_posix()
        runs.append({"run": "." if rel == "." else rel, "config": read_json(cfg_path).get("config", {}),
                     "metrics": metrics})
    return runs


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys; lists become JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


METRIC_COLUMNS = (("best_test_top1", "best_test_top1"), ("last_test_top1", "test_top1"), ("test_loss", "test_loss"))


def summary_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: run, every option with two or more distinct values among the runs that record it,
    best/last top-1, test loss.

    Options recorded twice with the same values (``kd.alpha`` and ``loss.alpha``) appear once, under
    their last name component where that is unambiguous.
    """
    flat = [flatten(r["config"]) for r in runs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys  # two or more distinct recorded values (absent in some runs does not count)
               if len({json.dumps(f[k], sort_keys=True, default=str) for f in flat if k in f}) > 1]
    kept, signatures = [], set()
    for k in varying:
        sig = (k.rsplit(".", 1)[-1], json.dumps([f.get(k) for f in flat], sort_keys=True, default=str))
        if sig not in signatures:
            signatures.add(sig)
            kept.append(k)
    shorts = [k.rsplit(".", 1)[-1] for k in kept]
    names = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, kept)]
    header = ["run"] + names + [c for c, _ in METRIC_COLUMNS]
    rows = []
    for r, f in zip(runs, flat):
        rows.append([r["run"]] + [f.get(k) for k in kept] + [r["metrics"].get(m) for _, m in METRIC_COLUMNS])
    return header, rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"
    return str(v).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(root: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path, str]:
    """Write summary.md and summary.csv of every run under ``root``; return their paths and the table."""
    runs = find_runs(root)
    if not runs:
        raise UserError(f"no finished training runs (config.json + metrics.json with test_top1) under {root}")
    header, rows = summary_table(runs)
    text = markdown_table(header, rows)
    out = Path(out_dir) if out_dir else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "summary.md", out / "summary.csv"
    md.write_text(f"# Runs under {Path(root).resolve()}\n\n{text}\nAccuracies in percent; best = best test "
                  f"top-1 over the evaluated epochs, last = the final epoch's.\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([["" if v is None else v for v in row] for row in rows])
    csv_path.write_text(buf.getvalue())
    return md, csv_path, text


# =========================================================================== compressed copies

@dataclass(frozen=True)
class CompressConfig:
    checkpoint: str | None = None       # the network to compress (a workbench checkpoint)
    prune: float = 0.8                  # fraction of conv/linear weights set to zero (by magnitude)
    prune_scope: str = "layer"          # layer: that fraction in every layer | global: one threshold
    quantize_bits: int = 5              # 2**bits shared weight values per layer (k-means); 0: no sharing
    finetune_epochs: int = 2            # fine-tuning epochs with masks and sharing kept (0: none)
    data_root: str | None = None        # override the data root recorded in the checkpoint
    original_name: str = "original"     # member names in family.json
    compressed_name: str = "compressed"


@dataclass
class CompressResult:
    metrics: dict[str, Any]
    checkpoint: Path
    manifest: Path


def compress(cc: CompressConfig, cfg: TrainConfig, out_dir: str | Path, mode: str = "new") -> CompressResult:
    """Prune + share weights of ``cc.checkpoint``, fine-tune with both kept, save ``compressed.pt``.

    ``cfg`` gives the fine-tuning options; its ``epochs`` is replaced by ``cc.finetune_epochs``.
    """
    if not cc.checkpoint:
        raise UserError("compress needs --checkpoint CKPT (a checkpoint written by `train`)")
    if cc.finetune_epochs < 0:
        raise UserError(f"--finetune_epochs must be >= 0, got {cc.finetune_epochs}")
    if cc.original_name == cc.compressed_name:
        raise UserError(f"--original_name and --compressed_name must differ, both are {cc.original_name!r}")
    src = Path(cc.checkpoint).resolve()
    ck = load_checkpoint(src)
    if not ck.get("arch") or not isinstance(ck.get("dataset"), dict):
        raise UserError(f"{src} is not a workbench checkpoint with its arch and data set; compress needs one")
    data = DataSpec(**ck["dataset"])
    if cc.data_root:
        data = replace(data, data_root=cc.data_root)
    num_classes = data_num_classes(data)
    if int(ck["num_classes"]) != num_classes:
        raise UserError(f"{src} predicts {ck['num_classes']} classes but its data set {data.name!r} now has "
                        f"{num_classes}; check --data_root")
    src_sha = sha256_file(src)
    model = model_from_checkpoint(ck, str(src))
    device = resolve_device(cfg.device)
    model.to(device)
    out = Path(out_dir)
    cfg_ft = replace(cfg, epochs=max(cc.finetune_epochs, 1))
    config = {"compress": {**asdict(cc), "checkpoint": str(src), "checkpoint_sha256": src_sha},
              "finetune": asdict(cfg_ft) if cc.finetune_epochs else None, "data": asdict(data), "arch": ck["arch"]}
    with RunDir(out, mode) as root:
        root.write_config(config, device=cfg.device)
        _, _, before = test_logits(model, data, cfg)
        codes = prune_magnitude(model, cc.prune, cc.prune_scope)
        _, _, pruned = test_logits(model, data, cfg)
        codes = move_codes(quantize_shared(model, codes, cc.quantize_bits), device)
        _, _, quantized = test_logits(model, data, cfg)
        stats_before_ft = compression_stats(model, codes)
        ft_dir = out / "finetune"
        if cc.finetune_epochs > 0:
            family = {"family": "compressed", "original_checkpoint": str(src), "original_sha256": src_sha}
            if is_finished(ft_dir):
                model.load_state_dict(load_checkpoint(ft_dir / "last.pt", map_location=device)["state_dict"])
            else:
                run_training(data, ModelSpec(ck["arch"]), cfg_ft, ft_dir, "resume" if _non_empty(ft_dir) else "new",
                             model=model, family=family, extra_config={"compress": config["compress"]},
                             desc="fine-tune", on_step_end=lambda m: project_(m, codes))
            project_(model, codes)  # no-op after the loop's last step; guards the invariant
        _, _, after = test_logits(model, data, cfg)
        stats = compression_stats(model, codes)
        metrics = {
            "test_top1": after["top1"], "test_top5": after["top5"], "test_loss": after["loss"],
            "top1_before": before["top1"], "top1_pruned": pruned["top1"], "top1_quantized": quantized["top1"],
            "top1_after": after["top1"], "test_loss_before": before["loss"], "test_loss_after": after["loss"],
            "prune": cc.prune, "prune_scope": cc.prune_scope, "bits": cc.quantize_bits,
            "finetune_epochs": cc.finetune_epochs, "sparsity": stats["sparsity"],
            "weights_total": stats["weights_total"], "weights_nonzero": stats["weights_nonzero"],
            "sparsity_per_layer": stats["sparsity_per_layer"],
            "distinct_values_per_layer": stats["distinct_values_per_layer"],
            "distinct_values_per_layer_before_finetune": stats_before_ft["distinct_values_per_layer"],
            "storage": storage_bits(stats, cc.quantize_bits),
            "note": "biases and BatchNorm parameters are not compressed; distinct values count kept weights only",
        }
        fields = checkpoint_fields(ModelSpec(ck["arch"]), data, num_classes, config, original_checkpoint=str(src),
                                   original_sha256=src_sha, family="compressed",
                                   compression={"prune": cc.prune, "prune_scope": cc.prune_scope,
                                                "bits": cc.quantize_bits})
        if "arch_kwargs" in ck:
            fields["arch_kwargs"] = ck["arch_kwargs"]
        model.cpu()
        ck_path = out / "compressed.pt"
        save_checkpoint(ck_path, {**fields, "state_dict": model.state_dict(), "epoch": cc.finetune_epochs,
                                  "metrics": {k: metrics[k] for k in ("test_top1", "test_top5", "test_loss",
                                                                      "sparsity", "bits")}})
        members = [Member(cc.original_name, str(src), "original", arch=ck["arch"], sha256=src_sha,
                          metrics={"test_top1": before["top1"], "test_loss": before["loss"]}),
                   Member(cc.compressed_name, str(ck_path), "compressed", teacher=None, arch=ck["arch"],
                          metrics={"test_top1": after["top1"], "test_loss": after["loss"],
                                   "sparsity": stats["sparsity"], "bits": cc.quantize_bits})]
        manifest = write_manifest(out, "compressed", members, config=config)
        root.finish(metrics)
    return CompressResult(metrics, ck_path, manifest)
