"""The variance report of a fitted Trans-Net on one split, as a file: ``variance.json`` in the
Trans-Net's run directory (``variance_<split>.json`` for a split other than ``test``), or a run
directory of its own. The ``variance`` command and the consistency stage call it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from common.device import use_device
from common.errors import UserError
from common.files import write_json
from common.finished import require_finished_result
from common.provenance import provenance
from common.rundir import RunDir
from features.identity import check_transnet_features
from transnet.convergence import verdict
from transnet.data import choose_placement, make_source, open_pair
from transnet.fit import add_warning, in_sample_warning, load_transnet
from transnet.variance import variance_report


def variance_filename(split: str) -> str:
    """``variance.json`` for the test split, ``variance_<split>.json`` for any other."""
    return "variance.json" if split == "test" else f"variance_{split}.json"


def run_variance(transnet_dir: str | Path, features: str | None = None, split: str = "test",
                 out_dir: str | Path | None = None, *, source: str | None = None, target: str | None = None,
                 target_features: str | None = None, device: str = "auto", batch_size: int = 256,
                 data_on: str = "auto", mode: str = "new", allow_other_checkpoints: bool = False,
                 allow_unfinished: bool = False) -> dict[str, Any]:
    """Variance report of a fitted Trans-Net on one split (one streaming float64 pass); written to
    ``variance.json`` in the Trans-Net run directory, or in ``out_dir`` (a run directory of its own)."""
    dev = use_device(device)
    require_finished_result(transnet_dir, "variance", allow_unfinished)
    model, info = load_transnet(transnet_dir)
    feats = features or info["features"]
    tfeats = target_features or (info["target_features"] if not features and info["target_features"] != info["features"]
                                 else None)
    src_name, tgt_name = source or info["source"], target or info["target"]
    check_transnet_features(info, feats, split, source=src_name, target=tgt_name, target_features=tfeats,
                            allow=allow_other_checkpoints)
    pair = open_pair(feats, src_name, tgt_name, info["layer"], split, tfeats,
                     target_layer=info.get("target_layer") or "", spatial=info.get("spatial") or "")
    if (pair.shape_a[0], pair.shape_b[0]) != (model.channels, model.out_channels):
        raise UserError(f"{pair.dataset_path('a')} -> {pair.dataset_path('b')} has {pair.shape_a[0]} -> "
                        f"{pair.shape_b[0]} channels; the Trans-Net maps {model.channels} -> {model.out_channels}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    src = make_source(pair, dev, choose_placement(pair.nbytes, dev, data_on))
    model = model.to(dev)
    rep = variance_report(model, src.sequential(batch_size), device=dev, split=split, source=pair.source,
                          target=pair.target, layer=pair.layer)
    rep.update(pair.layer_record())
    train_split = (info.get("config") or {}).get("train_split", "train")
    rep["held_out"] = split != train_split
    if not rep["held_out"]:
        cfg = info.get("config") or {}
        add_warning(rep, in_sample_warning(split, train_split, int(cfg.get("train_rows") or 0), pair.n),
                    first=True)
    rep["convergence"] = fit_convergence(info, rep)
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


def fit_convergence(info: dict[str, Any], rep: dict[str, Any]) -> dict[str, Any]:
    """The fit's ``convergence`` block (from its metrics); for a Trans-Net fitted before verdicts existed,
    or imported, the verdict of this report alone (no validation curve: at best ``unknown``)."""
    block = (info.get("metrics") or {}).get("convergence")
    if block is not None:
        return block
    epochs = int(info.get("epoch") or 0)
    return verdict([], rep, epochs, epochs)

