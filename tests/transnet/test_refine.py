"""Refinement: splitting classifiers at a layer (VGG-style ``features.N`` and ResNets), the frozen
A + Trans-Net -> trainable B-upper classifier, and the ``refine`` command end to end on a tiny
image folder with untrained tiny nets."""
from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from common.checkpoints import load_checkpoint, save_checkpoint
from common.errors import UserError
from common.provenance import sha256_file
from features.store import create_features, init_root, init_split, mark_complete
from training.data import build_dataset
from training.datasets import DataSpec
from training.loop import evaluate, make_loader
from training.models import build_model
from training.runner import ModelSpec, checkpoint_fields
from transnet.model import TransNet, TransNetConfig
from transnet.refine import SplitClassifier, layer_names, parse_orders, split_at


@pytest.mark.parametrize("arch,size,layer", [
    ("vgg_tiny", 16, "features.4"),
    ("vgg_tiny", 16, "features.6"),           # the output of an in-place ReLU
    ("cifar_resnet20", 16, "layer2"),
    ("cifar_resnet20", 16, "layer2.-1.add"),  # the residual sum before the last block's ReLU
    ("resnet18", 32, "layer3"),
])
def test_split_parts_compose_to_the_whole_net(arch, size, layer):
    torch.manual_seed(0)
    model = build_model(arch, 5, 3, size).eval()
    x = torch.randn(3, 3, size, size)
    lower, upper = split_at(model, layer)
    with torch.no_grad():
        want = model(x)
        mid = lower(x)
        got = upper(mid.clone())
    assert mid.dim() == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the parts share the net's modules (fine-tuning the upper part trains the net's own layers)
    shared = {id(p) for p in model.parameters()}
    assert all(id(p) in shared for p in upper.parameters())


def test_resnet_sum_point_is_the_sum_before_the_relu():
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 5, 3, 16).eval()
    block = model.layer2[-1]
    seen = {}
    block.bn2.register_forward_hook(lambda m, i, o: seen.__setitem__("bn2", o.clone()))
    model.layer2[-2].register_forward_hook(lambda m, i, o: seen.__setitem__("in", o.clone()))
    x = torch.randn(2, 3, 16, 16)
    lower, _ = split_at(model, "layer2.-1.add")
    with torch.no_grad():
        model(x)
        got = lower(x)
    torch.testing.assert_close(got, seen["bn2"] + seen["in"])       # out + identity, no ReLU
    assert (got < 0).any()


def test_split_inside_a_residual_block_and_unknown_layers_are_refused():
    model = build_model("cifar_resnet20", 5, 3, 16)
    with pytest.raises(UserError, match="skip connection"):
        split_at(model, "layer2.0.conv2")
    with pytest.raises(UserError, match=r"unknown layer 'layer2.0.conv9'.*did you mean.*layer2.0.conv2"):
        split_at(model, "layer2.0.conv9")
    assert "layer2.2.add" in layer_names(model)


def test_identity_transnet_reproduces_net_b_and_orders_select_components():
    torch.manual_seed(0)
    net = build_model("vgg_tiny", 5, 3, 16).eval()
    lower, upper = split_at(net, "features.4")
    ident = TransNet(TransNetConfig(32, 0, 1, "none"))
    with torch.no_grad():
        ident.convs[0].weight.copy_(torch.eye(32)[:, :, None, None])
    x = torch.randn(4, 3, 16, 16)
    refined = SplitClassifier(lower, upper, ident).eval()
    with torch.no_grad():
        torch.testing.assert_close(refined(x), net(x), rtol=1e-5, atol=1e-5)
    tn = TransNet(TransNetConfig(32, 2, 3, "instance"))
    only0 = SplitClassifier(lower, upper, tn, [0])
    with torch.no_grad():
        comps, _ = tn.eval().decompose(lower(x))
        torch.testing.assert_close(only0.features(x), comps[0])
    # frozen parts stay in eval mode and without gradients while the upper part trains
    only0.train()
    assert not only0.lower.training and not only0.transnet.training and only0.upper.training
    assert not any(p.requires_grad for p in only0.transnet.parameters())
    assert parse_orders("all", 2) == [0, 1, 2] and parse_orders("2,0", 2) == [0, 2]
    with pytest.raises(UserError, match="orders 0..2"):
        parse_orders("3", 2)


# --------------------------------------------------------------------------- end to end

def _image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 80, (16, 16, 3)).astype(np.uint8)
                img[..., c] += 150                                     # a class-coloured tint
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def _checkpoint(path: Path, spec: DataSpec, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model("vgg_tiny", 3, 3, 16)
    fields = checkpoint_fields(ModelSpec("vgg_tiny"), spec, 3, {"seed": seed})
    save_checkpoint(path, {**fields, "state_dict": model.state_dict(), "epoch": 0, "metrics": {}})
    return path


def _extract(path: Path, nets: dict[str, Path], spec: DataSpec, layer: str) -> Path:
    """Features by a direct forward of each net's lower part (the extract command's job elsewhere)."""
    from training.models import model_from_checkpoint

    with h5py.File(path, "w") as f:
        init_root(f, spec.name, {"preset": spec.transform}, 16, "pytest")
        for split in ("train", "test"):
            ds = build_dataset(spec, split, train_transform=False)
            x = torch.stack([ds[i][0] for i in range(len(ds))])
            init_split(f, split, np.arange(len(ds)), ds.labels)
            for name, ck in nets.items():
                lower, _ = split_at(model_from_checkpoint(load_checkpoint(ck)).eval(), layer)
                with torch.no_grad():
                    feats = lower(x).numpy()
                d = create_features(f, split, name, layer, feats.shape, "float32",
                                    {"checkpoint": str(ck), "checkpoint_sha256": sha256_file(ck), "arch": "vgg_tiny",
                                     "layer": layer, "point": "output"})
                d[...] = feats
                mark_complete(d)
    return path


def test_refine_command_end_to_end(tmp_path, cli):
    spec = DataSpec(name=f"imagefolder:{_image_folder(tmp_path / 'img')}", transform="plain", image_size=16)
    ck_a, ck_b = _checkpoint(tmp_path / "a.pt", spec, 0), _checkpoint(tmp_path / "b.pt", spec, 1)
    feats = _extract(tmp_path / "f.h5", {"A": ck_a, "B": ck_b}, spec, "features.4")
    code, _, err = cli("fit-transnet", "--features", feats, "--source", "A", "--target", "B", "--layer", "features.4",
                       "--epochs", 2, "--kernel", 1, "--batch_size", 8, "--device", "cpu", "--out_dir", tmp_path / "tn")
    assert code == 0, err
    common = ["--net_a", ck_a, "--net_b", ck_b, "--transnet", tmp_path / "tn", "--epochs", 1, "--lr", 1e-3,
              "--batch_size", 6, "--device", "cpu", "--eval_every", 1]
    code, text, err = cli("refine", *common, "--orders", "0,1", "--out_dir", tmp_path / "ref")
    assert code == 0, err
    assert "original B" in text and "own features" in text
    m = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert m["orders"] == [0, 1] and m["layer"] == "features.4" and m["n_test"] == 9
    for key in ("original_b_top1", "refined_top1", "refined_top1_before_finetune", "baseline_b_finetuned_top1"):
        assert 0 <= m[key] <= 100 and (m[key] * 9 / 100) == pytest.approx(round(m[key] * 9 / 100))  # k of 9 images
    assert m["refined_minus_baseline"] == pytest.approx(m["refined_top1"] - m["baseline_b_finetuned_top1"])
    from training.models import model_from_checkpoint

    net_b = model_from_checkpoint(load_checkpoint(ck_b)).eval()
    test_set = build_dataset(spec, "test")
    assert m["original_b_top1"] == evaluate(net_b, make_loader(test_set, 16, False), torch.device("cpu"))["top1"]
    assert (tmp_path / "ref" / "refined" / "metrics.json").exists()
    assert (tmp_path / "ref" / "baseline_b" / "metrics.json").exists()
    # only B's upper part was trained: A's lower part and the Trans-Net are bit-identical afterwards
    state = load_checkpoint(tmp_path / "ref" / "refined" / "last.pt")["state_dict"]
    sd_a = load_checkpoint(ck_a)["state_dict"]
    for k in ("features.0.weight", "features.1.running_mean", "features.4.weight"):
        assert torch.equal(state[f"lower.{k}"], sd_a[k]), k
    tn_sd = load_checkpoint(tmp_path / "tn" / "transnet.pt")["state_dict"]
    assert all(torch.equal(state[f"transnet.{k}"], v) for k, v in tn_sd.items())
    sd_b = load_checkpoint(ck_b)["state_dict"]
    assert not torch.equal(state["upper.features.8.weight"], sd_b["features.8.weight"])

    # bad input: a net that the Trans-Net's features did not come from, an order it does not have
    code, _, err = cli("refine", *[str(v) for v in common[:2]], "--net_b", ck_a, *[str(v) for v in common[4:]],
                       "--out_dir", tmp_path / "bad1")
    assert code != 0 and "not the checkpoint the Trans-Net's target features came from" in " ".join(err.split())
    code, _, err = cli("refine", *common, "--orders", "3", "--out_dir", tmp_path / "bad2")
    assert code != 0 and "orders 0..2" in err
