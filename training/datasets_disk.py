"""On-disk data set layouts (CUB-200, Flower102, Dogs, ImageFolder, CIFAR, Aircraft, VOC animals, Mix-320).

Each builder registers itself in :data:`training.data.DATASETS` on import, with the signature
``builder(spec, split, transform, arg) -> IndexedDataset``. Nothing is downloaded: every data set is
read from ``--data_root`` in the layout of its official release (or of the Knowledge Evolution
repository for ``flower102`` / ``aircraft100``). A missing folder or file raises a
:class:`~common.errors.UserError` that names the path and the expected layout.

Readers parse the index files into a :class:`FileListing` (files, 0-based labels, class names and
optional crop boxes ``(x0, y0, x1, y1)`` in PIL's half-open pixel convention); the data set is a
:class:`~training.data.FileListDataset` over that listing, so its ``index`` is the row's position.
"""
from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import UserError
from common.safe_pickle import UnsafePickleError, load_data_pickle
from training.datasets import DATASETS, ArrayDataset, DataSpec, FileListDataset, IndexedDataset, need_file, need_root

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), PIL crop convention


@dataclass(frozen=True)
class FileListing:
    """The rows of one split: image files, 0-based labels, optional crop boxes."""

    files: list[Path]
    labels: list[int]
    num_classes: int
    class_names: list[str]
    boxes: list[Box] | None = None

    def dataset(self, name: str, split: str, transform: Callable | None) -> FileListDataset:
        return FileListDataset(name, split, self.files, self.labels, self.num_classes, transform,
                               boxes=self.boxes, class_names=self.class_names)


def concat_listings(parts: Sequence[FileListing]) -> FileListing:
    """Rows of every part in order; labels of part k are shifted by the class counts of parts < k.
    Boxes are kept only when every part has them."""
    files, labels, names, boxes = [], [], [], []
    shift = 0
    for p in parts:
        files += p.files
        labels += [shift + l for l in p.labels]
        names += p.class_names
        boxes += p.boxes or []
        shift += p.num_classes
    keep_boxes = all(p.boxes is not None for p in parts)
    return FileListing(files, labels, shift, names, boxes if keep_boxes else None)


def _only_splits(name: str, split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise UserError(f"data set {name!r} has no {split!r} split; valid splits: {', '.join(valid)}")


def _read_rows(path: Path, ncols: int, layout: str) -> list[list[str]]:
    """Whitespace-separated lines with at least ``ncols`` fields (blank lines skipped)."""
    rows = []
    with open(need_file(path, layout)) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < ncols:
                raise UserError(f"{path}, line {lineno}: expected {ncols} fields, got {line.strip()!r}; "
                                f"the expected layout is {layout}")
            rows.append(parts)
    return rows


def _check_first_image(files: Sequence[Path], listed_in: Path, layout: str) -> None:
    if files and not files[0].exists():
        raise UserError(f"missing image {files[0]} (listed in {listed_in}); the expected layout is {layout}")


def _pick_root(root: Path, marker: str, subdirs: Sequence[str]) -> Path:
    """``root`` itself if it holds ``marker``, else the first ``root/<subdir>`` that does, else ``root``
    (the caller's need_file then names the missing path)."""
    if (root / marker).exists():
        return root
    for s in subdirs:
        if (root / s / marker).exists():
            return root / s
    return root


def _xml_boxes(path: Path, layout: str) -> list[tuple[str, bool, Box]]:
    """(name, difficult, (xmin, ymin, xmax, ymax)) of every ``<object>`` of a PASCAL-style annotation."""
    try:
        tree = ET.parse(need_file(path, layout))
    except ET.ParseError as e:
        raise UserError(f"cannot parse annotation {path} ({e})") from e
    out = []
    for obj in tree.getroot().iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            raise UserError(f"{path}: an <object> has no <bndbox>")
        try:
            box = tuple(float(bb.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise UserError(f"{path}: <bndbox> needs numeric xmin, ymin, xmax, ymax") from None
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        out.append(((obj.findtext("name") or "").strip(), difficult, box))  # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------- CUB-200-2011

CUB_FILES = ("CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, bounding_boxes.txt, "
             "classes.txt, images/<class>/<file>.jpg}")
CUB_LAYOUT = CUB_FILES + " (--data_root may be CUB_200_2011 or its parent)"


def cub_root(root: Path) -> Path:
    return _pick_root(root, "images.txt", ["CUB_200_2011"])


def read_cub(root: Path, split: str, bbox_crop: bool) -> FileListing:
    """The official split of CUB-200-2011 (train 5,994 / test 5,794 images), rows in image-id order.
    bounding_boxes.txt holds ``id x y w h`` (floats) -> crop box (x, y, x + w, y + h)."""
    _only_splits("cub200", split, ("train", "test"))
    root = cub_root(root)
    images = {r[0]: r[1] for r in _read_rows(root / "images.txt", 2, CUB_LAYOUT)}
    labels = {r[0]: int(r[1]) - 1 for r in _read_rows(root / "image_class_labels.txt", 2, CUB_LAYOUT)}
    is_train = {r[0]: r[1] == "1" for r in _read_rows(root / "train_test_split.txt", 2, CUB_LAYOUT)}
    if (root / "classes.txt").exists():
        class_names = [r[1] for r in _read_rows(root / "classes.txt", 2, CUB_LAYOUT)]
    else:
        folders = {images[i].split("/")[0]: labels[i] for i in images if i in labels}
        class_names = [n for n, _ in sorted(folders.items(), key=lambda kv: kv[1])]
    ids = sorted((i for i in images if is_train.get(i) == (split == "train")), key=int)
    missing = [i for i in ids if i not in labels]
    if missing:
        raise UserError(f"{root / 'image_class_labels.txt'} has no label for image id {missing[0]}")
    files = [root / "images" / images[i] for i in ids]
    _check_first_image(files, root / "images.txt", CUB_LAYOUT)
    ys = [labels[i] for i in ids]
    num_classes = max(len(class_names), max(labels.values(), default=-1) + 1)
    boxes = None
    if bbox_crop:
        bb = {r[0]: tuple(float(v) for v in r[1:5]) for r in _read_rows(root / "bounding_boxes.txt", 5, CUB_LAYOUT)}
        if any(i not in bb for i in ids):
            raise UserError(f"{root / 'bounding_boxes.txt'} lacks a box for some images; pass --no-bbox_crop "
                            f"to use whole images")
        boxes = [(x, y, x + w, y + h) for x, y, w, h in (bb[i] for i in ids)]
    return FileListing(files, ys, num_classes, class_names, boxes)


@DATASETS.register("cub200")
def cub200(spec: DataSpec, split: str, transform: Callable, arg: str | None = None) -> IndexedDataset:
    return read_cub(need_root(spec, CUB_LAYOUT), split, spec.bbox_crop).dataset("cub200", split, transform)


# --------------------------------------------------------------------------- Stanford Dogs

DOGS_LAYOUT = ("{Images/<wnid>-<breed>/<file>.jpg, train_list.mat, test_list.mat (or train_list.txt, "
               "test_list.txt: an image path relative to Images/ per line, optionally followed by its "
               "1-based label), Annotation/<wnid>-<breed>/<file without .jpg> (PASCAL XML boxes, for the "
               "bbox crop)}")


def _dogs_list(root: Path, split: str, class_dirs: list[str]) -> tuple[list[str], list[int]]:
    """Relative image paths and 0-based labels of one split from ``<split>_list.mat`` or ``.txt``."""
    mat, txt = root / f"{split}_list.mat", root / f"{split}_list.txt"
    if mat.exists():
        import scipy.io

        try:
            m = scipy.io.loadmat(str(mat), squeeze_me=True)
        except Exception as e:  # scipy raises several kinds for a damaged file
            raise UserError(f"cannot read {mat} as a MATLAB file ({e})") from e
        if "file_list" not in m or "labels" not in m:
            raise UserError(f"{mat} lacks the fields file_list and labels of the official Stanford Dogs lists")
        files = [str(f) for f in np.atleast_1d(m["file_list"])]
        labels = [int(l) - 1 for l in np.atleast_1d(m["labels"])]
        return files, labels
    if txt.exists():
        index = {d: k for k, d in enumerate(class_dirs)}
        files, labels = [], []
        for r in _read_rows(txt, 1, DOGS_LAYOUT):
            files.append(r[0])
            if len(r) > 1:
                if not r[1].isdigit():
                    raise UserError(f"{txt}: the label of {r[0]!r} must be a 1-based integer, got {r[1]!r}")
                labels.append(int(r[1]) - 1)
            else:
                folder = r[0].replace("\\", "/").split("/")[0]
                if folder not in index:
                    raise UserError(f"{txt}: image {r[0]!r} is not in a class folder of {root / 'Images'}")
                labels.append(index[folder])
        return files, labels
    raise UserError(f"missing {mat} (or {txt}); the expected layout is {DOGS_LAYOUT}")


def read_dogs(root: Path, split: str, bbox_crop: bool) -> FileListing:
    """Stanford Dogs (120 breeds; train 12,000 / test 8,580). With ``bbox_crop`` each image is cropped
    to the union of its annotated dog boxes (one sample per listed image)."""
    _only_splits("dogs120", split, ("train", "test"))
    images = need_file(root / "Images", DOGS_LAYOUT)
    class_dirs = sorted(d.name for d in images.iterdir() if d.is_dir())
    rel, labels = _dogs_list(root, split, class_dirs)
    num_classes = len(class_dirs)
    bad = [l for l in labels if not 0 <= l < num_classes]
    if bad:
        raise UserError(f"the {split} list of {root} has label {bad[0] + 1} but {images} holds "
                        f"{num_classes} class folders")
    files = [images / r for r in rel]
    _check_first_image(files, root / f"{split}_list.*", DOGS_LAYOUT)
    names = [d.split("-", 1)[1] if "-" in d else d for d in class_dirs]
    boxes = None
    if bbox_crop:
        boxes = []
        for r in rel:
            ann = root / "Annotation" / Path(r).with_suffix("")
            objs = _xml_boxes(ann, DOGS_LAYOUT + " (or pass --no-bbox_crop)")
            if not objs:
                raise UserError(f"{ann} has no <object> box; pass --no-bbox_crop to use whole images")
            b = np.array([o[2] for o in objs])
            boxes.append((b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max()))
    return FileListing(files, labels, num_classes, names, boxes)


@DATASETS.register("dogs120")
def dogs120(spec: DataSpec, split: str, transform: Callable, arg: str | None = None) -> IndexedDataset:
    return read_dogs(need_root(spec, DOGS_LAYOUT), split, spec.bbox_crop).dataset("dogs120", split, transform)


# --------------------------------------------------------------------------- KE csv lists (Flower102, Aircraft100)

KE_LIST_FILES = {"train": "trn.csv", "val": "val.csv", "test": "tst.csv"}


def _ke_layout(image_dir: str) -> str:
    return f"{{{image_dir}/*.jpg, lists/trn.csv, lists/val.csv, lists/tst.csv}} with a header file_name,label"


def _read_ke_csv(path: Path, layout: str) -> list[tuple[str, str]]:
    with open(need_file(path, layout), newline="") as f:
        reader = csv.DictReader(f)
        cols = {(c or "").strip(): c for c in reader.fieldnames or []}
        if "file_name" not in cols or "label" not in cols:
            raise UserError(f"{path} needs the columns file_name,label; found {', '.join(cols) or 'none'}")
        return [(row[cols["file_name"]].strip(), row[cols["label"]].strip()) for row in reader]


def _label_order(labels: set[str]) -> list[str]:
    """Sorted numerically when every label is an integer (1-based or 0-based alike), else as text."""
    try:
        return sorted(labels, key=int)
    except ValueError:
        return sorted(labels)


def read_ke_lists(root: Path, split: str, image_dir: str) -> FileListing:
    """The Knowledge Evolution layout: ``<image_dir>/`` and ``lists/{trn,val,tst}.csv``. Labels map to
    0..k-1 by sorted unique label over all present lists, so 0- and 1-based lists read the same."""
    layout = _ke_layout(image_dir)
    rows = _read_ke_csv(root / "lists" / KE_LIST_FILES[split], layout)
    seen: set[str] = set()
    for name in KE_LIST_FILES.values():
        p = root / "lists" / name
        if p.exists():
            seen.update(l for _, l in _read_ke_csv(p, layout))
    order = _label_order(seen)
    index = {l: k for k, l in enumerate(order)}
    folder = need_file(root / image_dir, layout)
    # A file_name may be relative to the image folder (KE) or already include it.
    base = root if rows and not (folder / rows[0][0]).exists() and (root / rows[0][0]).exists() else folder
    files = [base / f for f, _ in rows]
    _check_first_image(files, root / "lists" / KE_LIST_FILES[split], layout)
    return FileListing(files, [index[l] for _, l in rows], len(order), order)


@DATASETS.register("flower102")
def flower102(spec: DataSpec, split: str, transform: Callable, arg: str | None = None) -> IndexedDataset:
    root = need_root(spec, _ke_layout("jpg"))
    return read_ke_lists(root, split, "jpg").dataset("flower102", split, transform)


@DATASETS.register("aircraft100")
def aircraft100(spec: DataSpec, split: str, transform: Callable, arg: str | None = None) -> IndexedDataset:
    root = need_root(spec, _ke_layout("images"))
    return read_ke_lists(root, split, "images").dataset("aircraft100", split, transform)


# --------------------------------------------------------------------------- ImageFolder

IMAGEFOLDER_LAYOUT = "DIR/{train,test}/<class>/<image> (val/ optional), the same class folders in every split"


def read_imagefolder(root: Path, split: str) -> FileListing:
    """``root/<split>/<class>/*``; classes are the sorted folder names of ``train/``, and every split
    must have exactly those class folders."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    def classes_of(d: Path) -> dict[str, int]:
        need_file(d, IMAGEFOLDER_LAYOUT)
        try:
            return find_classes(str(d))[1]
        except FileNotFoundError:
            raise UserError(f"{d} holds no class folders; the expected layout is {IMAGEFOLDER_LAYOUT}") from None

    train_classes = classes_of(root / "train")
    here = classes_of(root / split)
    if set(here) != set(train_classes):
        missing, extra = sorted(set(train_classes) - set(here)), sorted(set(here) - set(train_classes))
        raise UserError(f"the class folders of {root / split} differ from those of {root / 'train'}: "
                        f"missing {missing or 'none'}, extra {extra or 'none'}")
    try:
        samples = make_dataset(str(root / split), train_classes, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as e:
        raise UserError(f"{root / split}: {e}") from None
    return FileListing([Path(p) for p, _ in samples], [int(y) for _, y in samples], len(train_classes),
                       sorted(train_classes, key=train_classes.get))


@DATASETS.register("imagefolder")
def imagefolder(spec: DataSpec, split: str, transform: Callable, arg: str | None = None) -> IndexedDataset:
    if arg:
        root = Path(arg).expanduser()
        if not root.is_dir():
            raise UserError(f"imagefolder:{arg}: {root} is not a directory; the expected layout is "
                            f"{IMAGEFOLDER_LAYOUT}")
    else:
        root = need_root(spec, IMAGEFOLDER_LAYOUT)
    return read_imagefolder(root, split).dataset(f"imagefolder:{root}", split, transform)


# --------------------------------------------------------------------------- CIFAR (python pickles)

CIFAR_FILES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{k}" for k in range(1, 6)], ["test_batch"],
                "batches.meta", b"labels", b"label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", b"fine_labels", b"fine_label_names", 100),
}


def _cifar_layout(name: str) -> str:
    folder, train, test, meta, *_ = CIFAR_FILES[name]
    return (f"{folder}/{{{', '.join(train + test + [meta])}}} (the python version; --data_root may be "
            f"{folder} or its parent)")


def _unpickle(path: Path, layout: str) -> dict:
    with open(need_file(path, layout), "rb") as f:
        try:
            return load_data_pickle(f, path, encoding="bytes")       # plain data only: no code runs
        except UnsafePickleError:
            raise
        except Exception as e:  # a damaged pickle raises many kinds
            raise UserError(f"cannot read {path} as a CIFAR python pickle ({e})") from e


def read_cifar(root: Path, name: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images (N, 32, 32, 3) uint8 HWC, labels (N,), class names."""
    _only_splits(name, split, ("train", "test"))
    folder, train, test, meta, label_key, names_key, num_classes = CIFAR_FILES[name]
    layout = _cifar_layout(name)
    root = _pick_root(root, (train + test)[0], [folder])
    images, labels = [], []
    for fname in train if split == "train" else test:
        d = _unpickle(root / fname, layout)
        if b"data" not in d or label_key not in d:
            raise UserError(f"{root / fname} lacks the keys data and {label_key.decode()}")
        images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # (n, C, H, W)
        labels.append(np.asarray(d[label_key], dtype=np.int64))
    x = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)
    names = [str(k) for k in range(num_classes)]
    if (root / meta).exists():
        m = _unpickle(root / meta, layout)
        if names_key in m:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in m[names_key]]
    return x, np.concatenate(labels), names


def _cifar_builder(name: str) -> Callable[..., IndexedDataset]:
    def build(spec: DataSpec, split: str, transform: Callable, arg: str | None = None) -> IndexedDataset:
        x, y, names = read_cifar(need_root(spec, _cifar_layout(name)), name, split)
        return ArrayDataset(name, split, x, y, CIFAR_FILES[name][6], transform, names)

    build.__name__ = name
    return build


DATASETS.add("cifar10", _cifar_builder("cifar10"))
DATASETS.add("cifar100", _cifar_builder("cifar100"))


# --------------------------------------------------------------------------- VOC animal crops

VOC_ANIMALS = ("bird", "cat", "cow", "dog", "horse", "sheep")
VOC_SPLITS = {"train": "train", "test": "val"}
VOC_LAYOUT = ("VOCdevkit/VOC20xx/{Annotations/*.xml, JPEGImages/*.jpg, ImageSets/Main/train.txt, "
              "ImageSets/Main/val.txt} (--data_root may be the parent of VOCdevkit, VOCdevkit or VOC20xx)")


def voc_root(root: Path) -> Path:
    """The VOC20xx folder under ``root`` (the newest year when several are present)."""
    if (root / "Annotations").is_dir():
        return root
    for base in (root / "VOCdevkit", root):
        years = sorted((d for d in base.glob("VOC20*") if (d / "Annotations").is_dir()), reverse=True)
        if years:
            return years[0]
    return root


def read_voc_animals(root: Path, split: str) -> FileListing:
    """One sample per object of the 6 animal classes (``difficult`` objects skipped, truncated kept),
    cropped to its box; train = ImageSets/Main/train.txt, test = val.txt; rows in list then object order.
    VOC boxes are 1-based inclusive pixels -> crop box (xmin - 1, ymin - 1, xmax, ymax)."""
    _only_splits("voc_animals", split, tuple(VOC_SPLITS))
    root = voc_root(root)
    ids_file = root / "ImageSets" / "Main" / f"{VOC_SPLITS[split]}.txt"
    ids = [r[0] for r in _read_rows(ids_file, 1, VOC_LAYOUT)]
    index = {c: k for k, c in enumerate(VOC_ANIMALS)}
    files, labels, boxes = [], [], []
    for i in ids:
        for name, difficult, (x0, y0, x1, y1) in _xml_boxes(root / "Annotations" / f"{i}.xml", VOC_LAYOUT):
            if name not in index or difficult:
                continue
            if x1 < x0 or y1 < y0:
                raise UserError(f"{root / 'Annotations' / f'{i}.xml'}: empty box {(x0, y0, x1, y1)} for {name!r}")
            files.append(root / "JPEGImages" / f"{i}.jpg")
            labels.append(index[name])
            boxes.append((x0 - 1, y0 - 1, x1, y1))
    _check_first_image(files, ids_file, VOC_LAYOUT)
    return FileListing(files, labels, len(VOC_ANIMALS), list(VOC_ANIMALS), boxes)


@DATASETS.register("voc_animals")
def voc_animals(spec: DataSpec, split: str, transform: Callable, arg: str | None = None) -> IndexedDataset:
    return read_voc_animals(need_root(spec, VOC_LAYOUT), split).dataset("voc_animals", split, transform)


# --------------------------------------------------------------------------- Mix-320 (CUB + Dogs)

MIX_DOGS_DIRS = ("dogs", "StanfordDogs", "stanford_dogs", "Stanford_Dogs", "dogs120", "Dogs", "DOG120")
MIX_LAYOUT = (f"DIR/{CUB_FILES} and DIR/<dogs>/{DOGS_LAYOUT}, where <dogs> is one of "
              f"{', '.join(MIX_DOGS_DIRS)} or any sub-folder holding Images/ and train_list.mat or .txt")


def _mix_dogs_root(root: Path) -> Path:
    def is_dogs(d: Path) -> bool:
        return (d / "Images").is_dir() and any((d / f"train_list{e}").exists() for e in (".mat", ".txt"))

    for d in [root / n for n in MIX_DOGS_DIRS] + sorted(p for p in root.iterdir() if p.is_dir()) + [root]:
        if is_dogs(d):
            return d
    raise UserError(f"no Stanford Dogs folder under {root}; the expected layout is {MIX_LAYOUT}")


def read_mix320(root: Path, split: str, bbox_crop: bool) -> FileListing:
    """CUB-200 rows then Dogs rows; Dogs labels shifted by CUB's class count (200 -> 320 classes)."""
    _only_splits("mix320", split, ("train", "test"))
    cub = root / "CUB_200_2011"
    need_file(cub / "images.txt", MIX_LAYOUT)
    return concat_listings([read_cub(cub, split, bbox_crop), read_dogs(_mix_dogs_root(root), split, bbox_crop)])


@DATASETS.register("mix320")
def mix320(spec: DataSpec, split: str, transform: Callable, arg: str | None = None) -> IndexedDataset:
    return read_mix320(need_root(spec, MIX_LAYOUT), split, spec.bbox_crop).dataset("mix320", split, transform)
