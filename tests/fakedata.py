"""Tiny fake copies of the on-disk data set layouts, for tests (a few small generated images each).

Every ``make_*`` writes the official folder layout under ``root`` and returns the path to pass as
``--data_root`` (or as ``DIR`` of ``imagefolder:DIR``). Images are filled with their class colour
(``class_colour``), so a net can learn them; where a layout has boxes, only the box holds the class
colour and the rest is grey, so a crop can be checked by its size and colour.

    from tests.fakedata import make_cub_layout
    root = make_cub_layout(tmp_path, n_classes=3, per_class=4, size=(40, 32))

Also the other builders shared by several test files: small untrained checkpoints (``tiny_checkpoint``),
kc-features files of given arrays (``write_features_one_split``, ``write_features_by_split``), the planted
family features (``planted_features``) and the options of quick Trans-Net fits (``FAST_FIT``,
``FAST_FIT_ARGS``, ``FAST_FIT_KWARGS``).
"""
from __future__ import annotations

import colorsys
import csv
import pickle
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from common.checkpoints import save_checkpoint
from features import store
from features.store import create_features, init_root, init_split, mark_complete, mark_rows_done, open_features
from training.datasets import DataSpec
from training.models import build_model
from training.runner import ModelSpec, checkpoint_fields
from transnet.fit import FitConfig

GREY = (128, 128, 128)
VOC_ANIMALS = ("bird", "cat", "cow", "dog", "horse", "sheep")


def class_colour(c: int) -> tuple[int, int, int]:
    """A saturated colour per class (hues spread by the golden ratio)."""
    r, g, b = colorsys.hsv_to_rgb((c * 0.618034) % 1.0, 0.9, 0.9)
    return int(r * 255), int(g * 255), int(b * 255)


def write_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int],
                box: tuple[int, int, int, int] | None = None, seed: int = 0, mode: str = "RGB") -> Path:
    """A W x H image: ``colour`` everywhere, or grey with ``colour`` in ``box`` = (x0, y0, x1, y1) half-open;
    a little noise so no two files are identical. Format from the suffix (.jpg, .png)."""
    w, h = size
    rng = np.random.default_rng(seed)
    a = np.empty((h, w, 3), dtype=np.float32)
    a[:] = GREY if box is not None else colour
    if box is not None:
        x0, y0, x1, y1 = box
        a[y0:y1, x0:x1] = colour
    a += rng.normal(0, 4, a.shape)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else img.save(path)
    return path


def fake_box(k: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box (x, y, w, h) of fake image ``k`` (CUB convention; whole pixels)."""
    w, h = size
    return 1 + k % 5, 1 + k % 3, w // 2 + k % 4, h // 2 + k % 2


def _split_of(j: int) -> int:
    return j % 2  # 0: train, 1: test


# --------------------------------------------------------------------------- CUB-200-2011

def make_cub_layout(root: Path, n_classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 32)) -> Path:
    """``root/CUB_200_2011`` with images.txt, image_class_labels.txt, train_test_split.txt (even j of
    each class train, odd j test), bounding_boxes.txt (``fake_box`` of the 0-based image number),
    classes.txt, images/. Returns the CUB_200_2011 folder."""
    cub = Path(root) / "CUB_200_2011"
    lines = {k: [] for k in ("images", "labels", "split", "boxes", "classes")}
    k = 0
    for c in range(n_classes):
        folder = f"{c + 1:03d}.Class_{c + 1}"
        lines["classes"].append(f"{c + 1} {folder}")
        for j in range(per_class):
            iid = k + 1
            rel = f"{folder}/Class_{c + 1}_{j:04d}_{iid}.jpg"
            x, y, w, h = fake_box(k, size)
            write_image(cub / "images" / rel, size, class_colour(c), (x, y, x + w, y + h), seed=k)
            lines["images"].append(f"{iid} {rel}")
            lines["labels"].append(f"{iid} {c + 1}")
            lines["split"].append(f"{iid} {1 - _split_of(j)}")
            lines["boxes"].append(f"{iid} {x:.1f} {y:.1f} {w:.1f} {h:.1f}")
            k += 1
    for fname, key in (("images.txt", "images"), ("image_class_labels.txt", "labels"),
                       ("train_test_split.txt", "split"), ("bounding_boxes.txt", "boxes"),
                       ("classes.txt", "classes")):
        (cub / fname).write_text("\n".join(lines[key]) + "\n")
    return cub


# --------------------------------------------------------------------------- Stanford Dogs

def dogs_class_dir(c: int) -> str:
    return f"n0209{c:04d}-Breed_{c}"


def _voc_xml(filename: str, size: tuple[int, int], objects: Sequence[dict]) -> str:
    w, h = size
    objs = "".join(
        f"<object><name>{o['name']}</name><pose>Unspecified</pose><truncated>{int(o.get('truncated', 0))}"
        f"</truncated><difficult>{int(o.get('difficult', 0))}</difficult><bndbox><xmin>{o['box'][0]}</xmin>"
        f"<ymin>{o['box'][1]}</ymin><xmax>{o['box'][2]}</xmax><ymax>{o['box'][3]}</ymax></bndbox></object>"
        for o in objects)
    return (f"<annotation><folder>images</folder><filename>{filename}</filename><size><width>{w}</width>"
            f"<height>{h}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def dogs_boxes(k: int, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """The dog boxes (xmin, ymin, xmax, ymax) of fake image ``k``: two boxes when k % 3 == 0."""
    w, h = size
    boxes = [(2, 2, w // 2, h // 2)]
    if k % 3 == 0:
        boxes.append((w // 2 - 4, h // 2 - 4, w - 3, h - 2))
    return boxes


def make_dogs_layout(root: Path, n_classes: int = 3, per_class: int = 4, size: tuple[int, int] = (40, 32),
                     lists: str = "mat") -> Path:
    """``root/{Images, Annotation}`` plus ``train_list`` / ``test_list`` as ``.mat`` (the official
    file_list, annotation_list, labels fields; labels 1-based), ``.txt`` (a path per line) or, with
    ``lists="txt_labels"``, ``.txt`` lines "path label" (1-based).
    Boxes: ``dogs_boxes``; the class colour fills their union. Returns ``root``."""
    import scipy.io

    root = Path(root)
    split_rows: dict[str, list[tuple[str, int]]] = {"train": [], "test": []}
    k = 0
    for c in range(n_classes):
        d = dogs_class_dir(c)
        wnid = d.split("-")[0]
        for j in range(per_class):
            stem = f"{wnid}_{j + 1}"
            boxes = dogs_boxes(k, size)
            union = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
                     max(b[3] for b in boxes))
            write_image(root / "Images" / d / f"{stem}.jpg", size, class_colour(c), union, seed=100 + k)
            ann = root / "Annotation" / d / stem
            ann.parent.mkdir(parents=True, exist_ok=True)
            ann.write_text(_voc_xml(stem, size, [{"name": d.split("-", 1)[1], "box": b} for b in boxes]))
            split_rows["train" if _split_of(j) == 0 else "test"].append((f"{d}/{stem}.jpg", c + 1))
            k += 1
    for split, rows in split_rows.items():
        if lists == "mat":
            files = np.empty((len(rows), 1), dtype=object)
            anns = np.empty((len(rows), 1), dtype=object)
            for i, (f, _) in enumerate(rows):
                files[i, 0], anns[i, 0] = f, f[: -len(".jpg")]
            scipy.io.savemat(root / f"{split}_list.mat", {
                "file_list": files, "annotation_list": anns,
                "labels": np.array([[y] for _, y in rows], dtype=np.float64)})
        elif lists == "txt":
            (root / f"{split}_list.txt").write_text("".join(f"{f}\n" for f, _ in rows))
        elif lists == "txt_labels":
            (root / f"{split}_list.txt").write_text("".join(f"{f} {y}\n" for f, y in rows))
        else:
            raise ValueError(f"lists must be 'mat', 'txt' or 'txt_labels', got {lists!r}")
    return root


# --------------------------------------------------------------------------- KE csv layouts

def _write_ke(root: Path, image_dir: str, labels_of: Sequence, per_class: int, size: tuple[int, int],
              seed0: int) -> Path:
    root = Path(root)
    lists: dict[str, list[tuple[str, object]]] = {"trn": [], "val": [], "tst": []}
    k = 0
    for c, label in enumerate(labels_of):
        for j in range(per_class):
            name = f"image_{k + 1:05d}.jpg"
            write_image(root / image_dir / name, size, class_colour(c), seed=seed0 + k)
            lists[("trn", "val", "tst")[j % 3]].append((name, label))
            k += 1
    (root / "lists").mkdir(parents=True, exist_ok=True)
    for split, rows in lists.items():
        with open(root / "lists" / f"{split}.csv", "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["file_name", "label"])
            wr.writerows(rows)
    return root


def make_flower_layout(root: Path, n_classes: int = 3, per_class: int = 3, size: tuple[int, int] = (40, 32),
                       first_label: int = 1) -> Path:
    """KE Flower102: ``root/jpg/image_00001.jpg`` ... and ``root/lists/{trn,val,tst}.csv``
    (file_name,label; labels start at ``first_label``; image j of a class goes to list j % 3)."""
    return _write_ke(root, "jpg", [first_label + c for c in range(n_classes)], per_class, size, 200)


def make_aircraft_layout(root: Path, n_classes: int = 3, per_class: int = 3, size: tuple[int, int] = (40, 32),
                         label_names: Sequence[str] | None = None) -> Path:
    """KE Aircraft100: ``root/images/*.jpg`` and ``root/lists/{trn,val,tst}.csv``; labels are
    ``label_names`` (text, e.g. variant names) when given, else 0-based integers."""
    labels = list(label_names) if label_names is not None else list(range(n_classes))
    return _write_ke(root, "images", labels, per_class, size, 300)


# --------------------------------------------------------------------------- ImageFolder

def make_imagefolder(root: Path, n_classes: int = 3, per_class: int = 3, size: tuple[int, int] = (40, 32),
                     splits: Sequence[str] = ("train", "test")) -> Path:
    """``root/<split>/class_<c>/img_<j>.jpg``; the first image of class 0 in each split is a grayscale
    PNG (to exercise mode conversion and extensions). Returns ``root``."""
    root = Path(root)
    for s, split in enumerate(splits):
        for c in range(n_classes):
            for j in range(per_class):
                gray = c == 0 and j == 0
                name = f"img_{j}.png" if gray else f"img_{j}.jpg"
                write_image(root / split / f"class_{c}" / name, size, class_colour(c), seed=1000 * s + 10 * c + j,
                            mode="L" if gray else "RGB")
    return root


# --------------------------------------------------------------------------- CIFAR

def cifar_pixels(n: int) -> np.ndarray:
    """The planted (32, 32, 3) HWC image number ``n`` of a split: R = 4*row, G = 4*col, B = n."""
    rows, cols = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    return np.stack([rows * 4, cols * 4, np.full((32, 32), n % 256)], axis=-1).astype(np.uint8)


def make_cifar_layout(root: Path, kind: str = "cifar10", per_file: int = 4, n_classes: int | None = None) -> Path:
    """The python pickles: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` or
    ``cifar-100-python/{train, test, meta}``. Image n of a split is ``cifar_pixels(n)`` with label
    n % n_classes; ``per_file`` images per batch file. Returns the extracted folder."""
    if kind == "cifar10":
        folder, train, test, meta = "cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], ["test_batch"], "batches.meta"
        n_classes = n_classes or 10
        label_key, names = b"labels", {b"label_names": [f"c10_{k}".encode() for k in range(10)]}
    elif kind == "cifar100":
        folder, train, test, meta = "cifar-100-python", ["train"], ["test"], "meta"
        n_classes = n_classes or 100
        label_key = b"fine_labels"
        names = {b"fine_label_names": [f"c100_{k}".encode() for k in range(100)],
                 b"coarse_label_names": [f"super_{k}".encode() for k in range(20)]}
    else:
        raise ValueError(f"kind must be cifar10 or cifar100, got {kind!r}")
    out = Path(root) / folder
    out.mkdir(parents=True, exist_ok=True)
    for files in (train, test):
        n = 0
        for fname in files:
            idx = range(n, n + per_file)
            data = np.stack([cifar_pixels(i).transpose(2, 0, 1).reshape(-1) for i in idx])  # (n, 3072) CHW rows
            d = {b"batch_label": fname.encode(), b"data": data, label_key: [i % n_classes for i in idx],
                 b"filenames": [f"img_{i}.png".encode() for i in idx]}
            if kind == "cifar100":
                d[b"coarse_labels"] = [(i % n_classes) % 20 for i in idx]
            with open(out / fname, "wb") as f:
                pickle.dump(d, f)
            n += per_file
    with open(out / meta, "wb") as f:
        pickle.dump(names, f)
    return out


# --------------------------------------------------------------------------- VOC animal crops

def voc_objects(k: int, size: tuple[int, int]) -> list[dict]:
    """Objects of fake VOC image ``k``: one animal (VOC_ANIMALS[k % 6], truncated when k is odd), a
    person, a difficult cat when k % 3 == 0, a second animal VOC_ANIMALS[(k + 1) % 6] when k % 4 == 1.
    Boxes are VOC's 1-based inclusive pixels."""
    w, h = size
    objs = [{"name": VOC_ANIMALS[k % 6], "truncated": k % 2, "box": (3, 2, 3 + w // 2 - 1, 2 + h // 2 - 1)},
            {"name": "person", "box": (1, 1, w // 4, h // 4)}]
    if k % 3 == 0:
        objs.append({"name": "cat", "difficult": 1, "box": (2, h // 2, w // 3, h - 1)})
    if k % 4 == 1:
        objs.append({"name": VOC_ANIMALS[(k + 1) % 6], "box": (w // 2 + 2, h // 2 + 1, w - 1, h)})
    return objs


def make_voc_layout(root: Path, n_images: int = 6, size: tuple[int, int] = (40, 32), year: str = "2012") -> Path:
    """``root/VOCdevkit/VOC<year>/{Annotations, JPEGImages, ImageSets/Main/{train,val}.txt}``: image k
    has ``voc_objects(k)``; even k in train.txt, odd k in val.txt. The first animal's box holds its
    class colour. Returns ``root``."""
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    main = base / "ImageSets" / "Main"
    main.mkdir(parents=True, exist_ok=True)
    (base / "Annotations").mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[str]] = {"train": [], "val": []}
    for k in range(n_images):
        iid = f"{year}_{k + 1:06d}"
        objs = voc_objects(k, size)
        x0, y0, x1, y1 = objs[0]["box"]
        write_image(base / "JPEGImages" / f"{iid}.jpg", size, class_colour(VOC_ANIMALS.index(objs[0]["name"])),
                    (x0 - 1, y0 - 1, x1, y1), seed=400 + k)
        (base / "Annotations" / f"{iid}.xml").write_text(_voc_xml(f"{iid}.jpg", size, objs))
        ids["train" if k % 2 == 0 else "val"].append(iid)
    for split, rows in ids.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in rows))
    return Path(root)


# --------------------------------------------------------------------------- Mix-320

def make_mix_layout(root: Path, cub_classes: int = 3, dog_classes: int = 2, per_class: int = 4,
                    size: tuple[int, int] = (40, 32)) -> Path:
    """``root/CUB_200_2011`` and ``root/StanfordDogs`` (mat lists). Returns ``root``."""
    make_cub_layout(root, cub_classes, per_class, size)
    make_dogs_layout(Path(root) / "StanfordDogs", dog_classes, per_class, size)
    return Path(root)


# --------------------------------------------------------------------------- small checkpoints

EXTRACT_ROWS = 20        # rows per split the extraction tests read (--limit)
EXTRACT_BATCH = 4        # their batch size: 5 batches per split


def tiny_checkpoint(path: Path, arch: str = "vgg_tiny", seed: int = 0, num_classes: int = 10,
                    data: DataSpec | None = None) -> Path:
    """An untrained ``arch`` checkpoint (seeded) with BN statistics that make the BN output non-trivial,
    in the workbench's checkpoint layout (``data``: the default DataSpec when None). Returns ``path``."""
    data = DataSpec() if data is None else data
    torch.manual_seed(seed)
    m = build_model(arch, num_classes, 1, data.image_size or 32)
    for mod in m.modules():                       # BN statistics that make the BN output non-trivial
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    fields = checkpoint_fields(ModelSpec(arch), data, num_classes, {})
    save_checkpoint(path, {**fields, "state_dict": m.state_dict(), "epoch": 0, "metrics": {}})
    return path


# --------------------------------------------------------------------------- kc-features files

def write_features_one_split(path, nets: dict[str, np.ndarray], layer="conv", split="test", dtype="float32"):
    """A kc-features file of one split: ``nets[net] = (N, C, H, W)`` array at ``layer``, all complete."""
    n = len(next(iter(nets.values())))
    with open_features(path, "w") as f:
        init_root(f, "toy", {"name": "plain"}, 4, "pytest")
        init_split(f, split, np.arange(n), np.arange(n) % 3)
        for name, x in nets.items():
            ds = create_features(f, split, name, layer, x.shape, dtype, {"arch": "toy"})
            ds[...] = x
            mark_complete(ds)
    return path


FIT_LAYER = "features.4"
# FitConfig options of a quick Trans-Net fit (global input scale, 1x1 kernels) between nets A and B at FIT_LAYER,
# trained on every training row (no validation rows).
FAST_FIT_KWARGS = dict(source="A", target="B", layer=FIT_LAYER, input_norm="global", kernel=1, lr=2e-2,
                       final_lr=1e-4, schedule="cosine", weight_decay=0.0, eval_every=1000, save_every=1000,
                       device="cpu", val_fraction=0.0)


def write_features_by_split(path: Path, splits: dict[str, dict[str, np.ndarray]], layer: str = FIT_LAYER,
                            complete: bool = True, index_offset: int = 0, dtype: str = "float32") -> Path:
    """A kc-features file: ``splits[split][net] = (N, C, H, W)`` array."""
    with h5py.File(path, "w") as f:
        init_root(f, "synthetic", {"preset": "plain"}, 8, "pytest")
        for split, nets in splits.items():
            n = next(iter(nets.values())).shape[0]
            init_split(f, split, np.arange(n) + index_offset, np.zeros(n, dtype=np.int64))
            for net, x in nets.items():
                ds = create_features(f, split, net, layer, x.shape, dtype,
                                     {"arch": "synthetic", "layer": layer, "checkpoint": f"{net}.pt"})
                ds[...] = x
                if complete:
                    mark_complete(ds)
                else:
                    mark_rows_done(ds, n // 2)
    return path


# --------------------------------------------------------------------------- planted family features

PLANTED_C, PLANTED_HW, PLANTED_N_TRAIN, PLANTED_N_TEST = 4, 4, 64, 32
PLANTED_CHANNEL, PLANTED_ROW = 2, 5
# Linear, per-position Trans-Nets (1x1 kernels, global input scale) converge in seconds on this data.
FAST_FIT = FitConfig(orders=1, kernel=1, input_norm="global", epochs=60, lr=0.03, schedule="constant",
                     batch_size=16, eval_every=60, save_every=60, device="cpu", val_fraction=0.0)
FAST_FIT_ARGS = ["--orders", "1", "--kernel", "1", "--input_norm", "global", "--epochs", "60", "--lr", "0.03",
                 "--schedule", "constant", "--batch_size", "16", "--eval_every", "60", "--save_every", "60",
                 "--val_fraction", "0", "--device", "cpu"]


def planted_features(path: Path, seed: int = 0) -> Path:
    """Four nets at layer ``conv`` (PLANTED_C channels of PLANTED_HW x PLANTED_HW): ``b`` is a scaled
    channel permutation of ``a`` (fully consistent, linear), ``c`` is independent of ``a`` (fully
    inconsistent), ``d`` equals 2·a except channel PLANTED_CHANNEL, which is independent noise, and test
    row PLANTED_ROW of ``d``, which is all noise (a planted blind spot in one channel and one image)."""
    C, HW = PLANTED_C, PLANTED_HW
    rng = np.random.default_rng(seed)
    perm = rng.permutation(C)
    with h5py.File(path, "w") as f:
        store.init_root(f, "planted", {}, HW, "tests.fakedata.planted_features")
        for split, n in (("train", PLANTED_N_TRAIN), ("test", PLANTED_N_TEST)):
            a = rng.normal(size=(n, C, HW, HW)).astype(np.float32)
            d = 2.0 * a
            d[:, PLANTED_CHANNEL] = rng.normal(size=(n, HW, HW))
            if split == "test":
                d[PLANTED_ROW] = 2.0 * rng.normal(size=(C, HW, HW))
            nets = {"a": a, "b": 2.0 * a[:, perm], "c": rng.normal(size=a.shape).astype(np.float32), "d": d}
            store.init_split(f, split, np.arange(n) * 3, np.arange(n) % 3)
            for name, x in nets.items():
                ds = store.create_features(f, split, name, "conv", x.shape, "float32", {"arch": "planted"})
                ds[...] = x
                store.mark_complete(ds)
    return path
