"""Knowledge distillation: a student trained with (1-alpha)·CE + alpha·T²·KL to a frozen teacher's
outputs on the student's own augmented batch (``training/kd.py`` holds the loss).

    distill      out_dir = the student's run dir (+ family.json: teacher, student)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import read_json
from training.datasets import DataSpec
from training.families import (
    check_member_checkpoint,
    data_num_classes,
    load_teacher,
    member_path,
    metric_subset,
    seeded_model,
    test_logits,
)
from training.family_config import KDConfig  # re-exported: its old home
from training.kd import kd_loss_fn
from training.loop import TrainConfig, TrainResult
from training.manifest import Member, write_manifest
from training.runner import ModelSpec, resolve_data, run_training


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
    check_member_checkpoint(kd.member_checkpoint)
    if kd.teacher_name == kd.student_name:
        raise UserError(f"--teacher_name and --student_name must differ, both are {kd.teacher_name!r}")
    data = resolve_data(data, student)  # a timm arch: input size / normalisation from its pretrained_cfg
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
        Member(kd.student_name, str(member_path(out, kd.member_checkpoint)), "student", teacher=kd.teacher_name,
               arch=student.arch, metrics=metric_subset(res.metrics)),
    ]
    manifest = write_manifest(out, "kd", members, config={"kd": kd_record, "train": asdict(cfg), "data": asdict(data)})
    return DistillResult(res, teacher_metrics, manifest)
