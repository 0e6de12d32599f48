"""The nets of an extraction and the images they see: a :class:`Net` built from a workbench checkpoint
(what identifies it: path, sha256, arch, the data set and transform it was trained with) and the
:class:`FeatureData` every net of one feature file shares (one eval-transformed data set per split).

The data set comes from the nets' checkpoints (:func:`data_spec_for`; explicit overrides win, nets that
disagree are refused); :func:`check_nets_fit_data` refuses nets trained on another class count, input
size or channel count than the data set gives.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn
from torch.utils.data import Dataset

from common.checkpoints import load_checkpoint
from common.errors import UserError
from common.files import jsonable
from common.provenance import sha256_file
from features.store import SPLIT_KEYS
from training.data import build_dataset, transform_spec
from training.datasets import DataSpec
from training.models import build_model, model_from_checkpoint


@dataclass
class Net:
    """One net to extract from: a built model plus what identifies it."""

    name: str
    model: nn.Module
    arch: str
    num_classes: int | None = None
    checkpoint: str = ""              # path; "" for an in-memory model (benchmarks)
    sha256: str = ""
    dataset: dict[str, Any] | None = None     # the checkpoint's DataSpec dict
    transform: dict[str, Any] | None = None
    input_size: int | None = None
    in_channels: int | None = None
    provenance: dict[str, Any] = field(default_factory=dict)   # arch_kwargs, own-model entry point + file sha256


@dataclass(frozen=True)
class BareBuild:
    """How to build a net whose file records no arch (a plain state dict, a timm checkpoint, a
    ``.safetensors`` file): ``extract --arch timm:NAME`` or ``--model package.module:callable``."""

    arch: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None        # None: the builder's default (timm: its pretrained_cfg's)
    in_channels: int = 3
    input_size: int | None = None


PROVENANCE_KEYS = ("arch_kwargs", "model_entry", "model_file", "model_file_sha256", "weights", "weights_sha256")


def check_net_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or name in SPLIT_KEYS or name.strip() != name:
        raise UserError(f"net name {name!r} is not usable as an HDF5 group: no '/', not empty, not "
                        f"{' or '.join(SPLIT_KEYS)}, no surrounding spaces")


def load_net(name: str, checkpoint: str | os.PathLike, expect_sha256: str | None = None,
             bare: BareBuild | None = None, recorded_by: str = "the family manifest") -> Net:
    """Build a net from a workbench checkpoint (weights_only load); ``expect_sha256`` from a manifest.
    With ``bare``, a file that is no workbench checkpoint (or records no arch) is built as ``bare`` says
    and its weights loaded strictly (``training/weights.py``: timm formats and safetensors included).
    ``recorded_by`` names where ``expect_sha256`` comes from, in the error when the file differs."""
    check_net_name(name)
    path = Path(checkpoint)
    if bare is not None and not _is_workbench_checkpoint(path):
        return _bare_net(name, path, bare, expect_sha256, recorded_by)
    ckpt = load_checkpoint(path)
    sha = sha256_file(path)
    if expect_sha256 and expect_sha256 != sha:
        raise UserError(f"net {name!r}: {path} has sha256 {sha[:12]}..., {recorded_by} recorded "
                        f"{expect_sha256[:12]}...; the checkpoint changed since then")
    model = model_from_checkpoint(ckpt, source=f"net {name!r} ({path})")
    tf = ckpt.get("transform") or None
    prov = {k: ckpt[k] for k in PROVENANCE_KEYS if ckpt.get(k) not in (None, {}, "")}
    _check_model_file(name, prov)
    return Net(name=name, model=model.eval(), arch=str(ckpt.get("arch")), num_classes=ckpt.get("num_classes"),
               checkpoint=str(path.resolve()), sha256=sha, dataset=ckpt.get("dataset") or None, transform=tf,
               input_size=ckpt.get("input_size") or (tf or {}).get("image_size"),
               in_channels=ckpt.get("in_channels") or (tf or {}).get("channels"), provenance=prov)


def _is_workbench_checkpoint(path: Path) -> bool:
    if path.suffix.lower() in (".safetensors", ".npz", ".npy") or not path.is_file():
        return False
    try:
        ck = load_checkpoint(path)
    except UserError:
        return False
    return bool(ck.get("arch")) and ck.get("num_classes") is not None   # a timm checkpoint may name its arch too


def _bare_net(name: str, path: Path, bare: BareBuild, expect_sha256: str | None, recorded_by: str) -> Net:
    from training.user_models import entry_provenance, is_user_model
    from training.weights import check_local, load_weights_file

    check_local(str(path))
    sha = sha256_file(path)
    if expect_sha256 and expect_sha256 != sha:
        raise UserError(f"net {name!r}: {path} has sha256 {sha[:12]}..., {recorded_by} recorded "
                        f"{expect_sha256[:12]}...; the weights file changed since then")
    model = build_model(bare.arch, bare.num_classes, bare.in_channels, bare.input_size, **bare.kwargs)
    load_weights_file(model, str(path), f"net {name!r} ({path})")
    prov: dict[str, Any] = {"weights": str(path.resolve()), "weights_sha256": sha}
    prov.update({k: v for k, v in (("build_num_classes", bare.num_classes), ("build_input_size", bare.input_size))
                 if v is not None})
    if bare.kwargs:
        prov["arch_kwargs"] = dict(bare.kwargs)
    if is_user_model(bare.arch):
        prov.update(entry_provenance(bare.arch))
    return Net(name=name, model=model.eval(), arch=bare.arch, num_classes=None, checkpoint=str(path.resolve()),
               sha256=sha, in_channels=bare.in_channels, provenance=prov)


def _check_model_file(name: str, prov: dict[str, Any]) -> None:
    """An own model's defining file must still be the one the checkpoint was trained with."""
    if not prov.get("model_entry") or not prov.get("model_file_sha256"):
        return
    from training.user_models import entry_provenance

    now = entry_provenance(str(prov["model_entry"]))
    if now["model_file_sha256"] != prov["model_file_sha256"]:
        raise UserError(f"net {name!r}: {now['model_file']} (defining {prov['model_entry']}) has sha256 "
                        f"{now['model_file_sha256'][:12]}..., the checkpoint was trained with "
                        f"{str(prov['model_file_sha256'])[:12]}...; the model code changed since training")


@dataclass
class FeatureData:
    """The images every net sees: one eval-transformed data set per split."""

    name: str                               # root attribute ``dataset``
    spec: dict[str, Any]                    # the DataSpec (root attribute ``dataset_spec``)
    transform: dict[str, Any]
    image_size: int
    channels: int
    num_classes: int
    splits: dict[str, Dataset]
    labels: dict[str, np.ndarray]           # per split, (N,) int64, N after --limit


DATA_FIELDS = [f.name for f in fields(DataSpec)]


def data_spec_for(nets: Sequence[Net], overrides: dict[str, Any]) -> DataSpec:
    """The data set all nets were trained on (from their checkpoints), with explicit overrides applied.
    Nets that disagree on a field nobody overrode are refused, the field and both values named."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(DATA_FIELDS))
    if unknown:
        raise ValueError(f"unknown data fields {unknown}")
    base: dict[str, Any] | None = None
    base_net = ""
    for n in nets:
        if n.dataset is None:
            if "name" not in overrides:
                raise UserError(f"net {n.name!r}: its checkpoint records no data set; pass --dataset (and "
                                f"--data_root, --transform, --image_size as needed)")
            continue
        d = {k: v for k, v in n.dataset.items() if k in DATA_FIELDS}
        if base is None:
            base, base_net = d, n.name
            continue
        for k in DATA_FIELDS:
            if k in overrides:
                continue
            if jsonable(d.get(k)) != jsonable(base.get(k)):
                raise UserError(f"nets disagree on the data set: {base_net!r} was trained with {k}={base.get(k)!r}, "
                                f"{n.name!r} with {k}={d.get(k)!r}; all nets of one feature file see the same "
                                f"images: extract them into separate files, or override --{_flag(k)} explicitly")
    merged = {**(base or {}), **overrides}
    return DataSpec(**{k: v for k, v in merged.items() if k in DATA_FIELDS})


def _flag(field_name: str) -> str:
    return "dataset" if field_name == "name" else field_name


def build_feature_data(spec: DataSpec, splits: Sequence[str], limit: int = 0) -> FeatureData:
    """Eval-transformed (never augmented) data sets of ``splits``; ``limit`` keeps the first rows."""
    t = transform_spec(spec)
    dss, labels = {}, {}
    num_classes = None
    for split in splits:
        ds = build_dataset(spec, split, train_transform=False)
        lab = getattr(ds, "labels", None)
        if lab is None:
            raise UserError(f"data set {spec.name!r} split {split!r} exposes no labels array")
        lab = np.asarray(lab, dtype=np.int64)
        if limit and limit > 0:
            lab = lab[:limit]
        if len(lab) == 0:
            raise UserError(f"data set {spec.name!r} split {split!r} is empty")
        dss[split], labels[split] = ds, lab
        num_classes = num_classes or int(ds.num_classes)
    return FeatureData(name=spec.name, spec=jsonable(asdict(spec)), transform=t.to_dict(), image_size=t.image_size,
                       channels=t.channels, num_classes=int(num_classes or 0), splits=dss, labels=labels)


def check_nets_fit_data(nets: Sequence[Net], data: FeatureData) -> None:
    """Nets trained on another class count, input size or channel count than the data set are refused."""
    for n in nets:
        if n.num_classes is not None and data.num_classes and int(n.num_classes) != data.num_classes:
            raise UserError(f"net {n.name!r} was trained on {n.num_classes} classes, but data set {data.name!r} "
                            f"(as given) has {data.num_classes}; extract it with the data set it was trained on "
                            f"(its checkpoint records {(n.dataset or {}).get('name')!r}, subset "
                            f"{(n.dataset or {}).get('subset')!r}) or check --dataset/--subset")
        if n.input_size is not None and int(n.input_size) != data.image_size:
            raise UserError(f"net {n.name!r} was trained on {n.input_size} px inputs, but the transform gives "
                            f"{data.image_size} px (--image_size / --transform); extract at the size it was trained on")
        if n.in_channels is not None and int(n.in_channels) != data.channels:
            raise UserError(f"net {n.name!r} takes {n.in_channels}-channel images, the data set gives "
                            f"{data.channels} (--channels)")
