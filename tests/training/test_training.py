"""Training foundations: architectures, checkpoints of models, the animal-mnist data, learning-rate schedules,
the training loop (resume, checkpoint fields). (Registries, checkpoint files and run directories are in
common/test_common.py; the ``train`` command in test_cli.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.checkpoints import load_checkpoint, save_checkpoint
from common.errors import UserError
from common.files import read_json
from common.rundir import RunDir
from training.data import animal_mnist_split, build_dataset
from training.datasets import ArrayDataset, DataSpec
from training.loop import TrainConfig, lr_factor, train
from training.models import ARCH_INFO, ARCHS, build_model, load_weights, model_from_checkpoint
from training.transforms import TransformSpec, build_transform

# --------------------------------------------------------------------------- archs

def test_unknown_arch_is_a_user_error_listing_archs():
    with pytest.raises(UserError) as e:
        build_model("vgg17", 10)
    assert "vgg16_bn" in str(e.value) and "vgg_small" in str(e.value)


# The 224-px VGGs take 7-10 s each on one core.
SLOW_ARCHS = ("vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW_ARCHS else a
                                  for a in ARCHS.names()])
def test_every_arch_builds_with_class_count_and_channels(arch):
    size = max(ARCH_INFO[arch]["min_size"], 32) if ARCH_INFO[arch]["default_size"] == 32 else 64
    model = build_model(arch, num_classes=7, in_channels=1, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)


def test_too_small_input_is_refused():
    with pytest.raises(UserError, match="at least 63 px"):
        build_model("alexnet", 10, input_size=32)


def test_checkpoint_of_other_class_count_names_the_field(tmp_path):
    model = build_model("vgg_tiny", 10, 1, 32)
    ck = {"state_dict": model.state_dict(), "arch": "vgg_tiny", "num_classes": 10, "in_channels": 1,
          "input_size": 32, "dataset": {}, "transform": {}, "epoch": 0, "metrics": {}, "config": {}}
    save_checkpoint(tmp_path / "a.pt", ck)
    loaded = load_checkpoint(tmp_path / "a.pt")
    with pytest.raises(UserError, match="num_classes=10, expected 200"):
        model_from_checkpoint(loaded, num_classes=200)
    other = build_model("vgg_tiny", 5, 1, 32)
    with pytest.raises(UserError, match=r"classifier.weight has shape \(10, 64\).*\(5, 64\)"):
        load_weights(other, loaded["state_dict"])
    rebuilt = model_from_checkpoint(loaded)
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v)


# --------------------------------------------------------------------------- data

def test_animal_mnist_split_is_fixed_stratified_and_disjoint():
    labels = np.repeat(np.arange(10), 100)
    a, b = animal_mnist_split(labels, 0), animal_mnist_split(labels, 0)
    assert np.array_equal(a["train"], b["train"]) and np.array_equal(a["test"], b["test"])
    assert not set(a["train"]) & set(a["test"])
    assert len(a["train"]) + len(a["test"]) == 1000
    assert np.all(np.bincount(labels[a["test"]]) == 20)
    assert not np.array_equal(animal_mnist_split(labels, 1)["test"], a["test"])


def test_animal_mnist_yields_image_label_index():
    ds = build_dataset(DataSpec("animal-mnist", transform="plain", image_size=32, channels=3), "test")
    assert len(ds) == 2000 and ds.num_classes == 10
    x, y, i = ds[17]
    assert x.shape == (3, 32, 32) and isinstance(y, int) and i == 17


def test_unknown_dataset_and_transform_list_valid_names():
    with pytest.raises(UserError, match="animal-mnist.*imagefolder:DIR"):
        build_dataset(DataSpec("cub-200"), "train")
    with pytest.raises(UserError, match="paper, plain, small"):
        build_dataset(DataSpec("animal-mnist", transform="fancy"), "train")


# --------------------------------------------------------------------------- schedules

def test_lr_schedules():
    geo = TrainConfig(epochs=11, lr=1e-4, final_lr=1e-6, schedule="geometric")
    assert lr_factor(geo, 0) == 1.0
    assert lr_factor(geo, 10) * geo.lr == pytest.approx(1e-6)
    assert lr_factor(geo, 5) * geo.lr == pytest.approx(1e-5)
    cos = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=2)
    assert lr_factor(cos, 1) == pytest.approx(0.5) and lr_factor(cos, 2) == pytest.approx(1.0)
    assert lr_factor(cos, 10) == pytest.approx(0.0)
    step = TrainConfig(epochs=100, schedule="step", step_size=30, gamma=0.1)
    assert lr_factor(step, 29.9) == 1.0 and lr_factor(step, 60) == pytest.approx(0.01)


# --------------------------------------------------------------------------- training loop

def _tiny_sets(n=96, classes=3, size=16):
    g = np.random.default_rng(0)
    labels = np.arange(n) % classes
    # planted: class c brightens band c of the image so the task is learnable
    imgs = (g.random((n, size, size)) * 60).astype(np.uint8)
    for i, c in enumerate(labels):
        imgs[i, c * 5:(c * 5) + 5, :] += 150
    tf = build_transform(TransformSpec("plain", size, 1, (0.5,), (0.25,)), train=False)
    return (ArrayDataset("tiny", "train", imgs, labels, classes, tf),
            ArrayDataset("tiny", "test", imgs[:30], labels[:30], classes, tf))


def _fields(model_cfg):
    return {"arch": "vgg_tiny", "num_classes": 3, "in_channels": 1, "input_size": 16, "dataset": {},
            "transform": {}, "config": model_cfg}


class _Kill(Exception):
    pass


def test_resumed_training_equals_uninterrupted_bitwise(tmp_path):
    """On the CPU, whatever device the machine has: bitwise equality needs deterministic kernels, and
    cuDNN's weight gradients (and its benchmark-chosen algorithms) are not."""
    train_set, test_set = _tiny_sets()
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, seed=3, schedule="cosine", warmup_epochs=0.5, device="cpu")

    torch.manual_seed(0)
    ref_model = build_model("vgg_tiny", 3, 1, 16)
    init = {k: v.clone() for k, v in ref_model.state_dict().items()}
    with RunDir(tmp_path / "ref") as run:
        ref = train(ref_model, train_set, test_set, cfg, run, _fields({}))

    # same start, killed in the middle of epoch 2, then resumed in a new process-like call
    model = build_model("vgg_tiny", 3, 1, 16)
    model.load_state_dict(init)
    calls = {"n": 0}

    def killing_loss(logits, y, t=None):
        calls["n"] += 1
        if calls["n"] == 9:  # 6 steps per epoch: inside epoch 2
            raise _Kill()
        return torch.nn.functional.cross_entropy(logits, y)

    with RunDir(tmp_path / "run") as run, pytest.raises(_Kill):
        train(model, train_set, test_set, cfg, run, _fields({}), loss_fn=killing_loss)
    fresh = build_model("vgg_tiny", 3, 1, 16)
    with RunDir(tmp_path / "run", "resume") as run:
        res = train(fresh, train_set, test_set, cfg, run, _fields({}))
    for k, v in ref_model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert res.metrics["test_top1"] == ref.metrics["test_top1"]
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert ref.metrics["test_top1"] > 60  # learnable planted task, well above chance (33%)


def test_best_and_last_checkpoints_have_design_fields(tmp_path):
    train_set, test_set = _tiny_sets()
    cfg = TrainConfig(epochs=1, batch_size=32)
    with RunDir(tmp_path / "r") as run:
        res = train(build_model("vgg_tiny", 3, 1, 16), train_set, test_set, cfg, run, _fields({"x": 1}))
    for p in (res.best_path, res.last_path):
        ck = load_checkpoint(p)
        for key in ("state_dict", "arch", "num_classes", "dataset", "transform", "epoch", "metrics", "config"):
            assert key in ck
        assert ck["epoch"] == 1 and ck["config"] == {"x": 1}
    m = read_json(tmp_path / "r" / "metrics.json")
    assert set(m) >= {"epoch", "test_top1", "test_top5", "test_loss", "train_loss"}


@pytest.mark.parametrize("command", [["train"], ["born-again", "--generations", "1"]])
def test_training_under_torchrun_is_refused_before_its_run_folder_is_made(cli, tmp_path, monkeypatch, command):
    """Every rank would train the same net into the same folder: refused, naming the rank and the way out
    (a study shares members out across ranks)."""
    from tests.fakedata import make_imagefolder
    from tests.processes import flat

    images = make_imagefolder(tmp_path / "img", n_classes=2, per_class=2, size=(16, 16))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    code, _, err = cli(*command, "--dataset", f"imagefolder:{images}", "--arch", "vgg_tiny", "--epochs", "1",
                       "--transform", "small", "--batch_size", "2", "--device", "cpu", "--out_dir", tmp_path / "run")
    assert code == 1
    assert "rank 1 of a 2-process torchrun job; run it without torchrun" in flat(err)
    assert "Under torchrun: extract, fit-transnet, study" in flat(err)
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / "g0").exists()


def test_evaluation_in_the_channels_last_layout_gives_the_same_figures():
    """On CUDA a trained model is channels_last and its evaluation batches are put in that layout too;
    the figures are the layout's business only."""
    from torch.utils.data import DataLoader

    from training.loop import evaluate

    _, test_set = _tiny_sets()
    torch.manual_seed(0)
    model = build_model("vgg_tiny", 3, 1, 16).eval()
    loader = DataLoader(test_set, batch_size=8)
    plain = evaluate(model, loader, torch.device("cpu"))
    laid = evaluate(model.to(memory_format=torch.channels_last), loader, torch.device("cpu"), channels_last=True)
    assert laid["top1"] == plain["top1"] and laid["loss"] == pytest.approx(plain["loss"], rel=1e-5)
