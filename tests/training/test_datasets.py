"""On-disk data set layouts, subsets and transform presets, read from tiny fake copies (tests/fakedata.py)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from common.errors import UserError
from tests import fakedata as fd
from training.data import build_dataset
from training.datasets import DATASETS, DataSpec
from training.transforms import TRANSFORMS

SIZE = (40, 32)


def spec(name: str, root, **kw) -> DataSpec:
    return DataSpec(name=name, data_root=str(root), transform="plain", image_size=16, **kw)


def mean_rgb(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(0)


def assert_colour(img, colour, tol=20.0):
    assert np.abs(mean_rgb(img) - np.array(colour)).max() < tol, (mean_rgb(img), colour)


def assert_indexed(ds):
    """Every row returns (tensor, int label, int index) with index == position and the listed label."""
    for i in range(len(ds)):
        x, y, idx = ds[i]
        assert isinstance(x, torch.Tensor) and x.shape == (3, 16, 16)
        assert type(y) is int and type(idx) is int
        assert idx == i and y == ds.labels[i]


# --------------------------------------------------------------------------- CUB-200

@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    return fd.make_cub_layout(tmp_path_factory.mktemp("cub"), n_classes=3, per_class=4, size=SIZE)


def test_cub_official_split_labels_and_box_crops(cub):
    train = build_dataset(spec("cub200", cub), "train")
    test = build_dataset(spec("cub200", cub), "test")
    # even j of each class is train (ids 1, 3 | 5, 7 | 9, 11), odd j test
    assert len(train) == len(test) == 6 and train.num_classes == 3
    assert list(train.labels) == [0, 0, 1, 1, 2, 2]
    assert [f.name for f in train.files][:2] == ["Class_1_0000_1.jpg", "Class_1_0002_3.jpg"]
    assert train.class_names == ["001.Class_1", "002.Class_2", "003.Class_3"]
    assert_indexed(train)
    for ds, ks in ((train, [0, 2, 4, 6, 8, 10]), (test, [1, 3, 5, 7, 9, 11])):
        for i, k in enumerate(ks):
            img = ds.load_image(i)
            x, y, w, h = fd.fake_box(k, SIZE)
            assert img.size == (w, h)  # cropped to the box of bounding_boxes.txt
            assert_colour(img, fd.class_colour(int(ds.labels[i])))


def test_cub_parent_folder_and_whole_images(cub):
    via_parent = build_dataset(spec("cub200", cub.parent), "test")
    assert [f.name for f in via_parent.files] == [f.name for f in build_dataset(spec("cub200", cub), "test").files]
    whole = build_dataset(spec("cub200", cub, bbox_crop=False), "train")
    assert whole.boxes is None and whole.load_image(0).size == SIZE


def test_cub_missing_file_names_path_and_layout(cub, tmp_path):
    broken = tmp_path / "CUB_200_2011"
    shutil.copytree(cub, broken)
    (broken / "bounding_boxes.txt").unlink()
    with pytest.raises(UserError) as e:
        build_dataset(spec("cub200", broken), "train")
    msg = str(e.value)
    assert str(broken / "bounding_boxes.txt") in msg and "image_class_labels.txt" in msg and "images/" in msg
    # without the crop the boxes file is not needed
    assert len(build_dataset(spec("cub200", broken, bbox_crop=False), "train")) == 6
    with pytest.raises(UserError, match="no 'val' split; valid splits: train, test"):
        build_dataset(spec("cub200", cub), "val")


# --------------------------------------------------------------------------- Stanford Dogs

@pytest.mark.parametrize("lists", ["mat", "txt", "txt_labels"])
def test_dogs_lists_labels_and_union_box(tmp_path, lists):
    root = fd.make_dogs_layout(tmp_path, n_classes=3, per_class=4, size=SIZE, lists=lists)
    train = build_dataset(spec("dogs120", root), "train")
    test = build_dataset(spec("dogs120", root), "test")
    assert len(train) == len(test) == 6 and train.num_classes == 3
    assert list(test.labels) == [0, 0, 1, 1, 2, 2]
    assert train.class_names == ["Breed_0", "Breed_1", "Breed_2"]
    assert_indexed(test)
    # train rows are images k = 0, 2, 4, 6, 8, 10; k % 3 == 0 has two boxes -> their union
    for i, k in enumerate([0, 2, 4, 6, 8, 10]):
        b = np.array(fd.dogs_boxes(k, SIZE))
        want = (b[:, 2].max() - b[:, 0].min(), b[:, 3].max() - b[:, 1].min())
        img = train.load_image(i)
        assert img.size == want
        assert_colour(img, fd.class_colour(int(train.labels[i])))


def test_dogs_missing_annotation_and_lists(tmp_path):
    root = fd.make_dogs_layout(tmp_path, n_classes=2, per_class=2, size=SIZE)
    shutil.rmtree(root / "Annotation")
    with pytest.raises(UserError, match="no-bbox_crop") as e:
        build_dataset(spec("dogs120", root), "train")
    assert str(root / "Annotation") in str(e.value)
    assert build_dataset(spec("dogs120", root, bbox_crop=False), "train").load_image(0).size == SIZE
    (root / "test_list.mat").unlink()
    with pytest.raises(UserError) as e:
        build_dataset(spec("dogs120", root, bbox_crop=False), "test")
    assert str(root / "test_list.mat") in str(e.value) and "Images/<wnid>-<breed>" in str(e.value)


# --------------------------------------------------------------------------- KE csv layouts

@pytest.mark.parametrize("first_label", [0, 1])
def test_flower_ke_lists_map_labels_to_0_k(tmp_path, first_label):
    root = fd.make_flower_layout(tmp_path, n_classes=4, per_class=3, size=SIZE, first_label=first_label)
    parts = {s: build_dataset(spec("flower102", root), s) for s in ("train", "val", "test")}
    for _s, ds in parts.items():
        assert len(ds) == 4 and ds.num_classes == 4 and list(ds.labels) == [0, 1, 2, 3]
        assert_indexed(ds)
        for i in range(len(ds)):
            assert_colour(ds.load_image(i), fd.class_colour(i))
    # image j of each class goes to trn/val/tst by j % 3: file numbers 1, 4, 7, 10 in trn
    assert [f.name for f in parts["train"].files] == [f"image_{k:05d}.jpg" for k in (1, 4, 7, 10)]
    assert [f.name for f in parts["test"].files] == [f"image_{k:05d}.jpg" for k in (3, 6, 9, 12)]


def test_aircraft_text_labels_and_bad_csv(tmp_path):
    root = fd.make_aircraft_layout(tmp_path, n_classes=3, per_class=3, size=SIZE, label_names=["B737", "A320", "MD-11"])
    ds = build_dataset(spec("aircraft100", root), "train")
    assert ds.class_names == ["A320", "B737", "MD-11"]  # sorted text labels
    assert list(ds.labels) == [1, 0, 2]
    assert_colour(ds.load_image(0), fd.class_colour(0))  # written as class 0 = "B737"
    shutil.rmtree(root / "images")
    with pytest.raises(UserError) as e:
        build_dataset(spec("aircraft100", root), "train")
    assert str(root / "images") in str(e.value) and "lists/trn.csv" in str(e.value)
    (root / "lists" / "tst.csv").write_text("name,class\nimage_00001.jpg,A320\n")
    with pytest.raises(UserError, match="needs the columns file_name,label; found name, class"):
        build_dataset(spec("aircraft100", root), "test")


# --------------------------------------------------------------------------- ImageFolder

def test_imagefolder_classes_splits_and_mismatch(tmp_path):
    root = fd.make_imagefolder(tmp_path / "f", n_classes=3, per_class=2, size=SIZE)
    train = build_dataset(DataSpec(name=f"imagefolder:{root}", transform="plain", image_size=16), "train")
    assert train.class_names == ["class_0", "class_1", "class_2"] and list(train.labels) == [0, 0, 1, 1, 2, 2]
    assert_indexed(train)  # the grayscale PNG comes back as 3 channels
    assert train.files[0].suffix == ".png"
    # data_root works for a plain "imagefolder"
    assert len(build_dataset(spec("imagefolder", root), "test")) == 6
    with pytest.raises(UserError) as e:
        build_dataset(spec("imagefolder", root), "val")
    assert str(root / "val") in str(e.value) and "{train,test}/<class>" in str(e.value)
    shutil.rmtree(root / "test" / "class_2")
    (root / "test" / "class_9").mkdir()
    with pytest.raises(UserError, match=r"missing \['class_2'\], extra \['class_9'\]"):
        build_dataset(spec("imagefolder", root), "test")
    with pytest.raises(UserError, match="is not a directory"):
        build_dataset(DataSpec(name=f"imagefolder:{tmp_path / 'nope'}"), "train")


# --------------------------------------------------------------------------- CIFAR

@pytest.mark.parametrize("kind,n_train,n_classes", [("cifar10", 20, 10), ("cifar100", 4, 100)])
def test_cifar_pickles_read_as_hwc(tmp_path, kind, n_train, n_classes):
    folder = fd.make_cifar_layout(tmp_path, kind, per_file=4)
    for root in (folder, folder.parent):
        train = build_dataset(spec(kind, root), "train")
        assert len(train) == n_train and train.num_classes == n_classes
        assert list(train.labels) == [i % n_classes for i in range(n_train)]
        assert train.class_names[1] == ("c10_1" if kind == "cifar10" else "c100_1")
        for i in (0, n_train - 1):
            np.testing.assert_array_equal(np.asarray(train.load_image(i)), fd.cifar_pixels(i))
    test = build_dataset(spec(kind, folder), "test")
    assert len(test) == 4
    x, y, idx = test[3]
    assert x.shape == (3, 16, 16) and (y, idx) == (3, 3)
    (folder / ("test_batch" if kind == "cifar10" else "test")).unlink()
    with pytest.raises(UserError, match="missing .*the python version"):
        build_dataset(spec(kind, folder), "test")


# --------------------------------------------------------------------------- VOC animal crops

def test_voc_animal_object_crops(tmp_path):
    root = fd.make_voc_layout(tmp_path, n_images=6, size=SIZE)
    train = build_dataset(spec("voc_animals", root), "train")
    test = build_dataset(spec("voc_animals", root), "test")
    assert train.class_names == ["bird", "cat", "cow", "dog", "horse", "sheep"] and train.num_classes == 6
    # train = images 0, 2, 4: one animal each (persons and difficult cats skipped)
    assert list(train.labels) == [0, 2, 4]
    # test = images 1 (cat + second animal cow), 3 (dog; its difficult cat skipped), 5 (sheep + bird)
    assert list(test.labels) == [1, 2, 3, 5, 0]
    assert test.files[0] == test.files[1]  # two crops of one image
    assert_indexed(test)
    for ds in (train, test):
        first = [i for i in range(len(ds)) if i == 0 or ds.files[i] != ds.files[i - 1]]
        for i in first:  # the first animal: 1-based inclusive box (3, 2, 3+w/2-1, 2+h/2-1)
            img = ds.load_image(i)
            assert img.size == (SIZE[0] // 2, SIZE[1] // 2)
            assert_colour(img, fd.class_colour(int(ds.labels[i])))
    x0, y0, x1, y1 = fd.voc_objects(1, SIZE)[2]["box"]
    assert test.load_image(1).size == (x1 - x0 + 1, y1 - y0 + 1)
    for root_form in (root / "VOCdevkit", root / "VOCdevkit" / "VOC2012"):
        assert len(build_dataset(spec("voc_animals", root_form), "test")) == 5


def test_voc_missing_list_names_path(tmp_path):
    root = fd.make_voc_layout(tmp_path, n_images=2, size=SIZE)
    (root / "VOCdevkit" / "VOC2012" / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(UserError) as e:
        build_dataset(spec("voc_animals", root), "test")
    assert "ImageSets/Main/val.txt" in str(e.value) and "Annotations/*.xml" in str(e.value)


# --------------------------------------------------------------------------- Mix-320

def test_mix320_concatenates_with_shifted_dog_labels(tmp_path):
    root = fd.make_mix_layout(tmp_path, cub_classes=3, dog_classes=2, per_class=4, size=SIZE)
    ds = build_dataset(spec("mix320", root), "train")
    cub = build_dataset(spec("cub200", root), "train")
    dogs = build_dataset(spec("dogs120", root / "StanfordDogs"), "train")
    assert len(ds) == len(cub) + len(dogs) and ds.num_classes == 5
    assert list(ds.labels) == list(cub.labels) + [3 + int(l) for l in dogs.labels]
    assert ds.class_names == cub.class_names + dogs.class_names
    assert_indexed(ds)
    assert ds.load_image(len(cub)).size == dogs.load_image(0).size  # dogs rows keep their crop
    shutil.rmtree(root / "StanfordDogs")
    with pytest.raises(UserError, match="no Stanford Dogs folder"):
        build_dataset(spec("mix320", root), "train")


# --------------------------------------------------------------------------- subsets (two halves)

def test_class_halves_are_disjoint_cover_and_remap(tmp_path):
    root = fd.make_imagefolder(tmp_path, n_classes=5, per_class=2, size=SIZE)
    full = build_dataset(spec("imagefolder", root), "train")
    halves = {h: build_dataset(spec("imagefolder", root, subset=h, subset_kind="class"), "train") for h in "AB"}
    files = {h: [full.files[r] for r in ds.rows] for h, ds in halves.items()}
    orig = {h: {int(full.labels[r]) for r in ds.rows} for h, ds in halves.items()}
    assert orig["A"].isdisjoint(orig["B"]) and orig["A"] | orig["B"] == set(range(5))
    assert len(files["A"]) + len(files["B"]) == len(full)
    for h, ds in halves.items():
        assert ds.num_classes == len(orig[h]) and set(ds.labels.tolist()) == set(range(len(orig[h])))
        assert ds.class_names == [full.class_names[c] for c in sorted(orig[h])]
        assert_indexed(ds)
        for i, r in enumerate(ds.rows):  # a subset row is the base row, remapped
            assert ds.class_names[ds.labels[i]] == full.class_names[full.labels[r]]
            np.testing.assert_array_equal(ds[i][0].numpy(), full[int(r)][0].numpy())
    # the test split is halved by class too, with the same class sets
    test_a = build_dataset(spec("imagefolder", root, subset="A", subset_kind="class"), "test")
    assert test_a.class_names == halves["A"].class_names


def test_sample_halves_are_disjoint_per_class_and_cover_train(cub):
    root = cub
    full = build_dataset(spec("cub200", root), "train")
    halves = {h: build_dataset(spec("cub200", root, subset=h, subset_kind="sample", split_seed=3), "train")
              for h in "AB"}
    a, b = (set(halves[h].rows.tolist()) for h in "AB")
    assert a.isdisjoint(b) and a | b == set(range(len(full)))
    for _h, ds in halves.items():
        assert ds.num_classes == full.num_classes
        assert np.bincount(ds.labels, minlength=3).tolist() == [1, 1, 1]  # half of each class's 2
        assert_indexed(ds)
    test = build_dataset(spec("cub200", root, subset="A", subset_kind="sample"), "test")
    assert len(test) == len(build_dataset(spec("cub200", root), "test"))  # both halves share the test split


# --------------------------------------------------------------------------- names, layouts, presets

def test_unknown_dataset_and_transform_list_valid_names(cub):
    with pytest.raises(UserError) as e:
        build_dataset(DataSpec(name="cub201", data_root=str(cub)), "train")
    for name in ("cub200", "flower102", "dogs120", "imagefolder:DIR", "cifar10", "cifar100", "aircraft100",
                 "voc_animals", "mix320", "animal-mnist"):
        assert name in str(e.value)
    assert "did you mean 'cub200'" in str(e.value)
    with pytest.raises(UserError) as e:
        build_dataset(DataSpec(name="cub200", data_root=str(cub), transform="fancy"), "train")
    assert all(t in str(e.value) for t in TRANSFORMS.names()) and "'fancy'" in str(e.value)


@pytest.mark.parametrize("name", ["cub200", "dogs120", "flower102", "aircraft100", "cifar10", "cifar100",
                                  "voc_animals", "mix320", "imagefolder"])
def test_empty_root_error_names_path_and_layout(tmp_path, name):
    with pytest.raises(UserError) as e:
        build_dataset(spec(name, tmp_path), "train")
    msg = str(e.value)
    assert str(tmp_path) in msg and "expected layout" in msg
    with pytest.raises(UserError, match="pass --data_root DIR holding"):
        build_dataset(DataSpec(name=name), "train")


def test_every_disk_layout_is_registered():
    assert {"cub200", "dogs120", "flower102", "aircraft100", "imagefolder", "cifar10", "cifar100",
            "voc_animals", "mix320"} <= set(DATASETS.names())


@pytest.mark.parametrize("preset,size,train_shape,test_shape", [
    ("paper", None, (3, 224, 224), (3, 224, 224)),
    ("ke", None, (3, 224, 224), (3, 224, 224)),
    ("small", None, (3, 32, 32), (3, 32, 32)),
    ("plain", None, (3, 32, 32), (3, 32, 32)),
    ("paper", 48, (3, 48, 48), (3, 48, 48)),
    ("ke", 40, (3, 40, 40), (3, 40, 40)),
])
def test_presets_give_expected_shapes(cub, preset, size, train_shape, test_shape):
    s = DataSpec(name="cub200", data_root=str(cub), transform=preset, image_size=size)
    assert build_dataset(s, "train")[0][0].shape == train_shape
    x = build_dataset(s, "test")[0][0]
    assert x.shape == test_shape and x.dtype == torch.float32
    gray = DataSpec(name="cub200", data_root=str(cub), transform=preset, image_size=size, channels=1)
    assert build_dataset(gray, "test")[0][0].shape == (1,) + test_shape[1:]


def test_eval_presets_are_deterministic_and_ke_train_augments(cub):
    s = DataSpec(name="cub200", data_root=str(cub), transform="ke", image_size=24)
    test = build_dataset(s, "test")
    torch.testing.assert_close(test[0][0], test[0][0])
    train = build_dataset(s, "train")
    torch.manual_seed(0)
    draws = [train[0][0] for _ in range(4)]
    assert any(not torch.equal(draws[0], d) for d in draws[1:])


# --------------------------------------------------------------------------- end to end

def test_cli_train_on_fake_imagefolder(tmp_path, cli):
    root = fd.make_imagefolder(tmp_path / "data", n_classes=2, per_class=3, size=(24, 24))
    out = tmp_path / "run"
    code, stdout, err = cli("train", "--dataset", f"imagefolder:{root}", "--arch", "vgg_tiny", "--epochs", "1",
                            "--transform", "small", "--batch_size", "4", "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    assert "test top-1" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_top1"] <= 100.0 and metrics["epoch"] == 1
    assert f"imagefolder:{root}" in (out / "config.json").read_text()
    code, _, err = cli("train", "--dataset", "imagefolder:" + str(tmp_path / "missing"), "--arch", "vgg_tiny",
                       "--epochs", "1", "--out_dir", tmp_path / "run2")
    assert code != 0 and "is not a directory" in " ".join(err.split())
