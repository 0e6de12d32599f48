"""A small real study on the embedded Animal-MNIST data, for the notebooks and the tests.

``build_demo_study(root)`` trains a few seeds of a tiny VGG on a seeded subset of Animal-MNIST's
training images (real training, a few epochs: the nets reach well above chance, far below what
longer training gives), extracts their raw conv activations at one layer for the first ``rows``
images of each split, fits a Trans-Net for every ordered pair, computes the similarity baselines,
diagnoses one pair and writes the report: the study-folder layout of ``analysis/report.py``.

Every stage goes through the package's own functions (``training.loop.train``,
``features.extract.extract_features``, ``analysis.consistency.run_consistency``,
``analysis.similarity_commands.similarity_matrix``, ``analysis.diagnose.diagnose_pair``,
``analysis.report.make_report``). The full study runner (``python cli.py study``) trains on every
training image; the demo trains on a subset so that a notebook builds it in well under a minute.

The folder is a cache: ``demo.json`` records the options and the code version; a call with the same
options and code returns at once, otherwise the demo is rebuilt. A blocking lock (``<root>.lock`` beside the folder) lets
several notebooks ask for the same demo at the same time: one builds, the others wait and reuse it.
"""
from __future__ import annotations

import contextlib
import fcntl
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from torch.utils.data import Subset

from analysis.consistency import ConsistencyConfig, run_consistency
from analysis.diagnose import DiagnoseConfig, diagnose_pair
from analysis.report import make_report
from analysis.similarity_commands import similarity_matrix
from common.errors import UserError
from common.files import read_json, write_json
from common.provenance import code_version
from common.rundir import RunDir
from features.extract import ExtractConfig, build_feature_data, extract_features, load_net
from training.data import build_dataset
from training.datasets import DataSpec
from training.families import seeded_model
from training.loop import TrainConfig, train
from training.manifest import Member, write_manifest
from training.runner import ModelSpec, checkpoint_fields, is_finished
from transnet.fit import FitConfig

MARKER = "demo.json"


@dataclass(frozen=True)
class DemoConfig:
    """The demo study's options (defaults: about half a minute on two CPU cores)."""

    arch: str = "vgg_tiny"
    image_size: int = 16             # px; Animal-MNIST's 28 px images resized (plain transform, no augmentation)
    seeds: str = "0,1,2"             # one net per seed: a family of seeds
    train_images: int = 2000         # seeded subset of the 8,000 training images each net learns from
    epochs: int = 3
    lr: float = 0.05
    batch_size: int = 64
    layer: str = "features.4"        # vgg_tiny's second conv (32 channels, 8x8 at 16 px), raw output before BN
    rows: int = 500                  # feature rows per split: train rows fit the Trans-Nets, test rows are held out
    orders: int = 2                  # Trans-Net as the paper's (2 orders, 3x3, instance norm, alpha 0.1) ...
    kernel: int = 3
    alpha: str = "0.1"
    input_norm: str = "instance"
    fit_epochs: int = 25             # ... fitted briefly: Adam 1e-2 -> 1e-4 instead of 1e-4 -> 1e-6 over 1000 epochs
    fit_lr: float = 1e-2
    fit_final_lr: float = 1e-4
    fit_batch_size: int = 32
    pairs: str = "all"
    baselines: str = "cka,svcca"
    permutations: int = 20
    diagnose: str = "seed0,seed1"    # A,B of the diagnosis ("" for none)
    seed: int = 0                    # seed of the training subset


def demo_nets(cfg: DemoConfig) -> list[str]:
    return [f"seed{int(s)}" for s in cfg.seeds.split(",") if s.strip()]


@contextlib.contextmanager
def _wait_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)          # blocks until another builder is done
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_demo_study(root: str | Path, cfg: DemoConfig | None = None, log: Callable[[str], None] = print,
                     **overrides: Any) -> Path:
    """Build (or reuse) the demo study in ``root``; returns ``root``. ``overrides`` replace
    :class:`DemoConfig` fields (e.g. ``epochs=1`` for a quicker, weaker demo)."""
    cfg = replace(cfg or DemoConfig(), **overrides)
    nets = demo_nets(cfg)
    if len(nets) < 2:
        raise UserError(f"the demo needs at least two seeds, got {cfg.seeds!r}")
    root = Path(root)
    with _wait_lock(root.with_name(root.name + ".lock")):
        marker = root / MARKER
        want = {"config": asdict(cfg), "code_version": code_version()}
        have = read_json(marker) if marker.is_file() else None
        if have is None and root.is_dir() and any(root.iterdir()):
            raise UserError(f"{root} exists and is not a demo study folder (no {MARKER}); choose another folder")
        same = have is not None and all(have.get(k) == v for k, v in want.items())
        if same and have.get("complete"):
            log(f"demo study in {root} is up to date")
            return root
        if have is not None and not same:
            log(f"demo options or code changed: rebuilding {root}")
            shutil.rmtree(root)
        root.mkdir(parents=True, exist_ok=True)
        write_json(marker, {**want, "complete": False})     # an interrupted build resumes where it stopped
        _build(root, cfg, nets, log)
        write_json(marker, {**want, "complete": True, "nets": nets})
    return root


def _build(root: Path, cfg: DemoConfig, nets: list[str], log: Callable[[str], None]) -> None:
    data = DataSpec(name="animal-mnist", transform="plain", image_size=cfg.image_size)
    write_json(root / "study.json", {
        "name": "demo", "description": (
            f"Which knowledge do {len(nets)} seeds of a tiny VGG share? Each net was trained for {cfg.epochs} "
            f"epochs on {cfg.train_images} Animal-MNIST images ({cfg.image_size} px); their raw conv outputs at "
            f"{cfg.layer} are compared on the first {cfg.rows} test images with Trans-Nets fitted on the first "
            f"{cfg.rows} training images, and with similarity baselines."),
        "data": asdict(data), "members": {"seeds": {"arch": cfg.arch, "seeds": cfg.seeds}},
        "layers": [cfg.layer], "pairs": cfg.pairs, "baselines": cfg.baselines, "diagnose": cfg.diagnose,
        "demo": asdict(cfg)})

    # ---- train the family
    fam = root / "families" / "seeds"
    train_set, test_set = build_dataset(data, "train"), build_dataset(data, "test")
    rows = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_set))[:cfg.train_images])
    spec = ModelSpec(cfg.arch)
    members = []
    for name in nets:
        seed = int(name.removeprefix("seed"))
        tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed, device="cpu")
        run_dir = fam / name
        if not is_finished(run_dir):
            log(f"training {name}: {cfg.arch}, {cfg.epochs} epochs on {len(rows)} images")
            config = {"data": asdict(data), "model": asdict(spec), "train": asdict(tcfg),
                      "train_images": {"count": len(rows), "seed": cfg.seed}}
            with RunDir(run_dir, "overwrite") as run:
                run.write_config(config, device="cpu", n_train=len(rows), n_test=len(test_set))
                model = seeded_model(spec, data, train_set.num_classes, seed)
                fields = checkpoint_fields(spec, data, train_set.num_classes, config)
                train(model, Subset(train_set, rows.tolist()), test_set, tcfg, run, fields, desc=name)
        m = read_json(run_dir / "metrics.json")
        log(f"{name}: test top-1 {m['test_top1']:.1f}%")
        members.append(Member(name, str(run_dir / "last.pt"), "seed", arch=cfg.arch,
                              metrics={"test_top1": m["test_top1"]}))
    write_manifest(fam, "seeds", members, config={"demo": asdict(cfg)})

    # ---- features
    features = root / "features.h5"
    loaded = [load_net(m.name, m.checkpoint) for m in members]
    ecfg = ExtractConfig(split="train,test", dtype="float32", device="cpu", limit=cfg.rows)
    log(f"extracting {cfg.layer} of {', '.join(nets)} ({cfg.rows} rows per split)")
    extract_features(loaded, build_feature_data(data, ["train", "test"], cfg.rows), [(cfg.layer, None)], features,
                     ecfg, mode="resume", command="analysis.demo.build_demo_study")

    # ---- Trans-Nets for every pair
    fit = FitConfig(orders=cfg.orders, kernel=cfg.kernel, alpha=cfg.alpha, input_norm=cfg.input_norm,
                    epochs=cfg.fit_epochs, lr=cfg.fit_lr, final_lr=cfg.fit_final_lr, batch_size=cfg.fit_batch_size,
                    eval_every=cfg.fit_epochs, save_every=cfg.fit_epochs, device="cpu")
    cons = root / "consistency" / cfg.layer
    run_consistency(ConsistencyConfig(str(features), cfg.layer, cfg.pairs, ",".join(nets)), fit, cons, "resume", log=log)

    # ---- similarity baselines
    if cfg.baselines:
        log(f"similarity baselines: {cfg.baselines}")
        sim = similarity_matrix(features, cfg.layer, "test", nets, cfg.baselines.split(","),
                                permutations=cfg.permutations)
        (root / "similarity" / cfg.layer).mkdir(parents=True, exist_ok=True)
        write_json(root / "similarity" / cfg.layer / "similarity.json", sim)

    # ---- diagnosis of one pair
    if cfg.diagnose:
        a, b = (s.strip() for s in cfg.diagnose.split(","))
        log(f"diagnosis of {a} against {b}")
        diagnose_pair(DiagnoseConfig(features=str(features), layer=cfg.layer, a=a, b=b, consistency=str(cons),
                                     top=5, panels=1), root / "diagnosis" / cfg.layer, "overwrite")

    res = make_report(root)
    log(f"report: {res['html']}")
