"""Knowledge Evolution: split masks, re-initialisation, slim extraction, presets and the evolve command."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from common.checkpoints import load_checkpoint
from common.errors import UserError
from training import ke
from training.models import build_model, model_from_checkpoint


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN parameters and statistics, so a wrong BN slice changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = m.num_features
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g))
                m.running_mean.copy_(torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


def _first(n: int, k: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.bool)
    m[:k] = True
    return m


def _block(shape: tuple[int, ...], rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Expected weight mask: rows x cols at every kernel position."""
    m = torch.zeros(shape, dtype=torch.bool)
    m[rows.nonzero().squeeze(1)[:, None], cols.nonzero().squeeze(1)[None, :]] = True
    return m


# --------------------------------------------------------------------------- KELS masks

def test_kels_masks_vgg_tiny_first_conv_keeps_rgb_and_classifier_keeps_classes():
    model = build_model("vgg_tiny", 10, 3, 32)  # features: conv16 M conv32 M conv64 M; classifier 64 -> 10
    plan = ke.channel_plan(model, 0.5, torch.zeros(1, 3, 32, 32))
    masks = ke.kels_masks(model, plan)
    assert set(masks) == {"features.0.weight", "features.4.weight", "features.8.weight",
                          "classifier.weight", "classifier.bias"}
    assert torch.equal(masks["features.0.weight"], _block((16, 3, 3, 3), _first(16, 8), _first(3, 3)))
    assert torch.equal(masks["features.4.weight"], _block((32, 16, 3, 3), _first(32, 16), _first(16, 8)))
    assert torch.equal(masks["features.8.weight"], _block((64, 32, 3, 3), _first(64, 32), _first(32, 16)))
    assert torch.equal(masks["classifier.weight"], _block((10, 64), _first(10, 10), _first(64, 32)))
    assert masks["classifier.bias"].all()
    assert plan["classifier"].head and not plan["features.0"].head
    assert torch.equal(plan["features.5"].keep_out, _first(32, 16))  # BN after the second conv


def test_kels_masks_resnet18_rounds_up_and_follows_downsample_paths():
    model = build_model("resnet18", 7, 3, 32)
    k = 0.3  # ceil(0.3 * 64) = 20, ceil(0.3 * 128) = 39, ceil(0.3 * 512) = 154
    plan = ke.channel_plan(model, k, torch.zeros(1, 3, 32, 32))
    masks = ke.kels_masks(model, plan)
    assert torch.equal(masks["conv1.weight"], _block((64, 3, 7, 7), _first(64, 20), _first(3, 3)))
    assert torch.equal(masks["layer1.0.conv2.weight"], _block((64, 64, 3, 3), _first(64, 20), _first(64, 20)))
    assert torch.equal(masks["layer2.0.conv1.weight"], _block((128, 64, 3, 3), _first(128, 39), _first(64, 20)))
    assert torch.equal(masks["layer2.0.downsample.0.weight"], _block((128, 64, 1, 1), _first(128, 39), _first(64, 20)))
    assert torch.equal(plan["layer2.0.downsample.1"].keep_in, _first(128, 39))
    assert torch.equal(masks["fc.weight"], _block((7, 512), torch.ones(7, dtype=torch.bool), _first(512, 154)))
    assert masks["fc.bias"].all() and masks["fc.bias"].shape == (7,)
    assert {p for p, s in plan.items() if s.head} == {"fc"}


def test_kels_masks_densenet121_keep_the_first_channels_of_every_concatenated_chunk():
    model = build_model("densenet121", 5, 3, 32)  # init 64, growth 32, bottleneck 128, blocks 6-12-24-16
    plan = ke.channel_plan(model, 0.5, torch.zeros(1, 3, 32, 32))

    def chunks(sizes: list[int]) -> torch.Tensor:  # first ceil(k * size) of each chunk
        return torch.cat([_first(s, math.ceil(0.5 * s)) for s in sizes])

    assert torch.equal(plan["features.conv0"].keep_in, torch.ones(3, dtype=torch.bool))
    # dense layer 3 of block 1 reads [conv0 64 | layer1 32 | layer2 32]
    layer3 = plan["features.denseblock1.denselayer3.conv1"]
    assert torch.equal(layer3.keep_in, chunks([64, 32, 32]))
    assert torch.equal(layer3.keep_in.nonzero().squeeze(1),
                       torch.cat([torch.arange(0, 32), torch.arange(64, 80), torch.arange(96, 112)]))
    assert torch.equal(layer3.keep_out, _first(128, 64))
    assert torch.equal(plan["features.denseblock1.denselayer3.norm1"].keep_in, chunks([64, 32, 32]))
    assert torch.equal(plan["features.transition1.conv"].keep_in, chunks([64] + [32] * 6))
    # block 2 starts from transition1's 128 outputs; the classifier reads block 4: [512 | 16 x 32]
    assert torch.equal(plan["features.denseblock2.denselayer2.conv1"].keep_in, chunks([128, 32]))
    assert torch.equal(plan["classifier"].keep_in, chunks([512] + [32] * 16))
    assert plan["classifier"].head and plan["classifier"].keep_out.all()
    w = ke.kels_masks(model, plan)["features.denseblock1.denselayer3.conv1.weight"]
    assert torch.equal(w, _block((128, 128, 1, 1), _first(128, 64), chunks([64, 32, 32])))


def test_kels_flatten_before_linear_selects_the_kept_channels_features():
    model = build_model("kdnet5", 10, 3, 16)  # conv 32-64-128, 16 px -> 128 x 2 x 2 -> Linear(512, 128)
    plan = ke.channel_plan(model, 0.25, torch.zeros(1, 3, 16, 16))
    fc1 = plan["classifier.1"]
    assert torch.equal(fc1.keep_in, _first(512, 32 * 4))  # first 32 of 128 channels, each 2 x 2 features
    assert torch.equal(fc1.keep_out, _first(128, 32)) and not fc1.head
    assert torch.equal(plan["classifier.2"].keep_in, _first(128, 32))  # BatchNorm1d
    assert plan["classifier.5"].head and torch.equal(plan["classifier.5"].keep_in, _first(128, 32))


def test_split_rate_and_mode_errors_name_the_value_and_choices():
    with pytest.raises(UserError, match="strictly between 0 and 1.*got 1.0"):
        ke.check_split("kels", 1.0)
    with pytest.raises(UserError, match="got 0"):
        ke.check_split("wels", 0)
    with pytest.raises(UserError, match="'kelz'.*did you mean 'kels'.*kels, wels"):
        ke.check_split("kelz", 0.5)


# --------------------------------------------------------------------------- slim extraction

@pytest.mark.parametrize("arch,size,k", [("vgg_tiny", 16, 0.5), ("kdnet5", 16, 0.4), ("cifar_resnet20", 16, 0.5),
                                         ("wrn16_2", 16, 0.3),
                                         pytest.param("densenet121", 32, 0.5, marks=pytest.mark.slow)])
def test_slim_net_equals_dense_net_when_cross_weights_are_zeroed(arch, size, k):
    torch.manual_seed(0)
    dense = _randomise_bn(build_model(arch, 6, 3, size)).eval()
    x = torch.randn(3, 3, size, size)
    plan = ke.channel_plan(dense, k, x[:1])
    zeroed = ke.zero_cross_weights(dense, plan)
    slim = ke.extract_slim(zeroed, plan).eval()
    with torch.no_grad():
        ref = zeroed(x)  # (3, 6)
        out = slim(x)
        assert out.shape == ref.shape == (3, 6)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        # the check is sensitive: without zeroing the dropped channels' contributions are missing
        assert (ke.extract_slim(dense, plan).eval()(x) - dense(x)).abs().max() > 1e-3
    assert ke.count_params(slim) < 0.6 * ke.count_params(dense)


def test_width_multiplier_rebuilds_the_slim_net_shapes_from_arch_kwargs():
    slim = build_model("vgg_tiny", 10, 3, 32, width=0.5)
    convs = [m for m in slim.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(8, 3, 3, 3), (16, 8, 3, 3), (32, 16, 3, 3)]
    assert slim.classifier.weight.shape == (10, 32)
    dense = _randomise_bn(build_model("cifar_resnet20", 4, 1, 16)).eval()
    plan = ke.channel_plan(dense, 0.5, torch.zeros(1, 1, 16, 16))
    extracted = ke.extract_slim(dense, plan)
    ckpt = {"arch": "cifar_resnet20", "num_classes": 4, "in_channels": 1, "input_size": 16,
            "arch_kwargs": {"width": 0.5}, "state_dict": extracted.state_dict()}
    rebuilt = model_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), extracted.eval()(x))
    with pytest.raises(UserError, match="width multiplier must be in"):
        build_model("vgg_tiny", 10, width=1.5)


# --------------------------------------------------------------------------- re-initialisation

def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{p}.{k}": v.clone() for p, m in model.named_modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d))
            for k, v in m.state_dict().items()}


@pytest.mark.parametrize("mode", ["kels", "wels"])
def test_reinit_keeps_masked_weights_bn_and_classifier_bias_and_redraws_the_rest(mode):
    torch.manual_seed(1)
    model = _randomise_bn(build_model("kdnet5", 5, 3, 16))
    with torch.no_grad():  # trained-looking weights: far outside the default init's range
        for p in model.parameters():
            p.add_(3.0)
    masks = ke.split_masks(model, mode, 0.5, torch.zeros(1, 3, 16, 16), seed=3)
    new = ke.reinit(model, masks, seed=7)
    old_sd, new_sd = model.state_dict(), new.state_dict()
    n_checked = 0
    for path, mod in new.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        fan_in = mod.weight[0].numel()
        for name in ("weight", "bias"):
            key = f"{path}.{name}"
            m = masks[key]
            assert torch.equal(new_sd[key][m], old_sd[key][m]), key
            redrawn = new_sd[key][~m]
            assert (redrawn != old_sd[key][~m]).all(), key
            # PyTorch's default init of conv/linear: weight and bias uniform in +-1/sqrt(fan_in)
            assert (redrawn.abs() <= 1 / math.sqrt(fan_in) + 1e-6).all(), key
            n_checked += int((~m).sum())
    assert n_checked > 1000
    assert masks["classifier.5.bias"].all() and torch.equal(new_sd["classifier.5.bias"], old_sd["classifier.5.bias"])
    for k, v in _bn_state(model).items():
        assert torch.equal(new_sd[k], v), k
    assert torch.equal(ke.reinit(model, masks, seed=7).state_dict()["features.0.weight"], new_sd["features.0.weight"])
    assert not torch.equal(ke.reinit(model, masks, seed=8).state_dict()["features.0.weight"],
                           new_sd["features.0.weight"])
    assert torch.equal(model.state_dict()["features.0.weight"], old_sd["features.0.weight"])  # input untouched


def test_wels_masks_are_seeded_bernoulli_with_the_split_rate():
    model = build_model("vgg_small", 10, 3, 32)
    x = torch.zeros(1, 3, 32, 32)
    a = ke.split_masks(model, "wels", 0.3, x, seed=0)
    b = ke.split_masks(model, "wels", 0.3, x, seed=0)
    c = ke.split_masks(model, "wels", 0.3, x, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.3.weight"], c["features.3.weight"])
    w = torch.cat([a[k].flatten() for k in a if k.endswith("weight")])
    assert w.numel() > 100_000 and abs(w.float().mean().item() - 0.3) < 0.01
    assert a["classifier.bias"].all()


# --------------------------------------------------------------------------- presets and bad input

def _evolve_parser():
    import cli

    return cli.build_parser()[1]["evolve"]


def test_preset_fills_only_the_options_not_given(tmp_path):
    import cli
    from training.ke_commands import PRESETS, resolve_options
    from training.loop import TrainConfig

    p = _evolve_parser()
    a, from_preset = resolve_options(p.parse_args(["--preset", "ke", "--split_rate", "0.8", "--out_dir", "x"]))
    assert a.split_rate == 0.8 and "split_rate" not in from_preset
    for key, value in PRESETS["ke"].items():
        if key != "split_rate":
            assert getattr(a, key) == value, key
    assert (a.lr, a.epochs, a.batch_size, a.arch, a.transform) == (0.256, 200, 32, "resnet18", "ke")
    assert a.seed == TrainConfig.seed and a.generations == 3  # not in the preset: plain defaults

    p = _evolve_parser()  # no preset: one flag changes only itself
    plain, _ = resolve_options(p.parse_args(["--out_dir", "x"]))
    given, from_preset = resolve_options(p.parse_args(["--split_rate", "0.8", "--out_dir", "x"]))
    assert from_preset == [] and given.split_rate == 0.8
    assert {k: v for k, v in vars(given).items() if k != "split_rate"} == \
           {k: v for k, v in vars(plain).items() if k != "split_rate"}
    assert plain.lr == TrainConfig.lr and plain.epochs == TrainConfig.epochs and plain.split_rate == 0.5

    cfg = tmp_path / "ke.yaml"  # a --config file value counts as given and beats the preset
    cfg.write_text("epochs: 7\n")
    a, _ = resolve_options(cli._apply_config(_evolve_parser(), ["--preset", "ke", "--config", str(cfg),
                                                                "--out_dir", "x"]))
    assert a.epochs == 7 and a.lr == 0.256


@pytest.mark.parametrize("flags,message", [
    (["--split_rate", "1.0"], "argument --split_rate: expects a finite number in (0, 1), got '1.0'"),
    (["--split_rate", "0"], "argument --split_rate: expects a finite number in (0, 1), got '0'"),
    (["--split_rate", "-0.5"], "got '-0.5'"),
    (["--generations", "0"], "argument --generations: expects an integer >= 1, got '0'"),
    (["--split", "kernel"], "unknown split mode 'kernel'; did you mean 'kels'? Valid split mode names: kels, wels"),
    (["--preset", "kee"], "unknown preset 'kee'; did you mean 'ke'"),
])
def test_evolve_bad_input_is_one_clear_error(cli, tmp_path, capsys, flags, message):
    try:
        code, out, err = cli("evolve", *flags, "--out_dir", tmp_path / "run")
    except SystemExit as e:                                 # refused by the option's range: usage + error
        code, err = (1 if e.code == 2 else e.code), capsys.readouterr().err
    assert code == 1
    assert message in " ".join(err.split())
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the evolve command

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from tests.fakedata import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("ke_data"), n_classes=3, per_class=4, size=(16, 16))


def _tiny_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["evolve", "--dataset", f"imagefolder:{root}", "--image_size", "16", "--arch", "vgg_tiny",
            "--epochs", "1", "--batch_size", "4", "--device", "cpu", "--out_dir", str(out), *extra]


def test_evolve_writes_generations_slim_checkpoints_and_family(cli, tiny_folder, tmp_path):
    from training.data import build_dataset
    from training.datasets import DataSpec
    from training.loop import evaluate, make_loader

    out = tmp_path / "ke"
    code, stdout, err = cli(*_tiny_args(tiny_folder, out, "--generations", "2", "--split_rate", "0.5"))
    assert code == 0, err
    table = (out / "generations.md").read_text()
    md_rows = [ln for ln in table.splitlines() if re.match(r"\| \d+ \|", ln)]
    assert [ln.split("|")[1].strip() for ln in md_rows] == ["1", "2"] and md_rows[1] in stdout
    rows = json.loads((out / "generations.json").read_text())["generations"]
    assert [r["generation"] for r in rows] == [1, 2]
    family = json.loads((out / "family.json").read_text())
    assert [(m["name"], m["role"], m["generation"]) for m in family["members"]] == [
        ("ke_g1", "generation", 1), ("ke_g1_slim", "slim", 1), ("ke_g2", "generation", 2), ("ke_g2_slim", "slim", 2)]
    g1, g2 = load_checkpoint(out / "g1" / "last.pt"), load_checkpoint(out / "g2" / "last.pt")
    assert (g1["generation"], g2["generation"], g2["split"], g2["split_rate"]) == (1, 2, "kels", 0.5)
    assert set(g1["masks"]) == {k for k in g1["state_dict"] if k.startswith(("features.0.", "features.4.",
                                                                                "features.8.", "classifier."))}
    assert all(torch.equal(g1["masks"][k], g2["masks"][k]) for k in g1["masks"])
    assert g1["masks"]["features.4.weight"].shape == (32, 16, 3, 3)
    assert int(g1["masks"]["features.4.weight"].sum()) == 16 * 8 * 9

    # the slim checkpoint is a real smaller model that rebuilds from its own fields
    slim_ck = load_checkpoint(out / "g2" / "slim.pt")
    slim = model_from_checkpoint(slim_ck).eval()
    assert slim_ck["arch_kwargs"] == {"width": 0.5} and slim.classifier.weight.shape == (3, 32)
    dense = model_from_checkpoint(g2).eval()
    plan = ke.channel_plan(dense, 0.5, torch.zeros(1, 3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), ke.extract_slim(dense, plan).eval()(x))
    test_set = build_dataset(DataSpec(f"imagefolder:{tiny_folder}", image_size=16), "test")
    ev = evaluate(slim, make_loader(test_set, 64, False), torch.device("cpu"))
    assert ev["top1"] == pytest.approx(rows[1]["slim_top1"])


def test_evolve_resume_continues_the_interrupted_generation_only(tiny_folder, tmp_path, monkeypatch):
    import training.evolution as kc
    from training.datasets import DataSpec
    from training.loop import TrainConfig
    from training.runner import ModelSpec

    trained: list[tuple[int, int]] = []  # (generation, epoch) of every epoch actually trained
    interrupt_at: list[tuple[int, int]] = [(2, 2)]
    real = kc.run_training

    def spy(*args, **kw):
        g = kw["family"]["generation"]

        def on_epoch_end(model, epoch):
            if (g, epoch) in interrupt_at:
                interrupt_at.clear()
                raise KeyboardInterrupt
            trained.append((g, epoch))
        return real(*args, on_epoch_end=on_epoch_end, **kw)

    monkeypatch.setattr(kc, "run_training", spy)
    data = DataSpec(f"imagefolder:{tiny_folder}", image_size=16)
    cfg = TrainConfig(epochs=2, batch_size=4, device="cpu")
    out = tmp_path / "ke"
    with pytest.raises(KeyboardInterrupt):
        kc.evolve(data, ModelSpec("vgg_tiny"), cfg, kc.EvolveConfig(generations=2), out, log=None)
    assert trained == [(1, 1), (1, 2), (2, 1)]
    g1_bytes = (out / "g1" / "last.pt").read_bytes()
    rows = kc.evolve(data, ModelSpec("vgg_tiny"), cfg, kc.EvolveConfig(generations=3), out, "resume", log=None)
    assert trained == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2)]  # g2 resumed at epoch 2, never g1
    assert (out / "g1" / "last.pt").read_bytes() == g1_bytes
    assert [r["generation"] for r in rows] == [1, 2, 3]
    epochs = [json.loads(line)["epoch"] for line in (out / "g2" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    with pytest.raises(UserError, match="ke.split_rate: 0.5 -> 0.25"):
        kc.evolve(data, ModelSpec("vgg_tiny"), cfg, kc.EvolveConfig(generations=3, split_rate=0.25), out, "resume",
                  log=None)


def test_evolve_wels_has_no_slim_network(cli, tiny_folder, tmp_path):
    out = tmp_path / "wels"
    code, stdout, err = cli(*_tiny_args(tiny_folder, out, "--generations", "2", "--split", "wels",
                                        "--split_rate", "0.4"))
    assert code == 0, err
    rows = json.loads((out / "generations.json").read_text())["generations"]
    assert [r["slim_top1"] for r in rows] == [None, None]
    assert not (out / "g1" / "slim.pt").exists()
    family = json.loads((out / "family.json").read_text())
    assert [m["role"] for m in family["members"]] == ["generation", "generation"]
    masks = load_checkpoint(out / "g2" / "last.pt")["masks"]
    frac = torch.cat([m.flatten() for k, m in masks.items() if k.endswith("weight")]).float().mean()
    assert 0.35 < float(frac) < 0.45
