"""Compressed copies of a network: prune and share weights (``training/pruning.py``), fine-tune with
both kept, and write the copy as a normal checkpoint beside a family manifest of original and copy.

    compress     out_dir/compressed.pt (a normal checkpoint), finetune/ (its run dir), family.json
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common.checkpoints import load_checkpoint, save_checkpoint
from common.device import use_device
from common.errors import UserError
from common.files import read_json
from common.provenance import sha256_file
from common.rundir import RunDir, is_finished
from training.config import RESUME_FREE
from training.datasets import DataSpec
from training.families import (
    data_num_classes,
    non_empty,
    test_logits,
)
from training.family_config import RESUME_FREE_COMPRESS, CompressConfig  # CompressConfig: re-exported, its old home
from training.loop import TrainConfig, check_resume_config
from training.loop import validate as validate_train
from training.manifest import Member, write_manifest
from training.models import model_from_checkpoint
from training.pruning import compression_stats, move_codes, project_, prune_magnitude, quantize_shared, storage_bits
from training.runner import ModelSpec, checkpoint_fields, run_training


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
    model_spec = ModelSpec(ck["arch"], kwargs=ck.get("arch_kwargs") or {})   # recorded in the new checkpoints
    data = DataSpec(**ck["dataset"])
    if cc.data_root:
        data = replace(data, data_root=cc.data_root)
    num_classes = data_num_classes(data)
    if int(ck["num_classes"]) != num_classes:
        raise UserError(f"{src} predicts {ck['num_classes']} classes but its data set {data.name!r} now has "
                        f"{num_classes}; check --data_root")
    src_sha = sha256_file(src)
    model = model_from_checkpoint(ck, str(src))
    device = use_device(cfg.device)
    model.to(device)
    out = Path(out_dir)
    cfg_ft = replace(cfg, epochs=max(cc.finetune_epochs, 1))
    config = {"compress": {**asdict(cc), "checkpoint": str(src), "checkpoint_sha256": src_sha},
              "finetune": asdict(cfg_ft) if cc.finetune_epochs else None, "data": asdict(data), "arch": ck["arch"]}
    validate_train(cfg_ft)                  # before any folder is made
    with RunDir(out, mode) as root:
        if root.resuming and root.file("config.json").exists():    # before config.json is rewritten
            check_resume_config(read_json(root.file("config.json")).get("config", {}), config, out,
                                ("compress", "finetune", "data"), {**RESUME_FREE, "finetune": RESUME_FREE["train"],
                                                                   "compress": RESUME_FREE_COMPRESS})
        root.write_config(config, device=device)
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
                run_training(data, model_spec, cfg_ft, ft_dir, "resume" if non_empty(ft_dir) else "new",
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
        fields = checkpoint_fields(model_spec, data, num_classes, config, original_checkpoint=str(src),
                                   original_sha256=src_sha, family="compressed",
                                   compression={"prune": cc.prune, "prune_scope": cc.prune_scope,
                                                "bits": cc.quantize_bits})
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
