"""Family builders on a tiny on-disk ImageFolder (3 classes, 16 px): KD, Born-Again, grid search,
summaries, compressed copies and their family manifests."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import training.born_again as born_again_mod
import training.grid as grid
from common.checkpoints import load_checkpoint, save_checkpoint
from common.files import read_json
from common.provenance import sha256_file
from tests.fakedata import make_imagefolder
from training.kd import ban_loss
from training.manifest import read_manifest
from training.models import build_model, model_from_checkpoint
from training.pruning import compression_stats, kmeans_1d, project_, prune_magnitude, quantize_shared


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-class ImageFolder (8 train + 8 test images per class, 16x16) and a teacher trained on it."""
    root = tmp_path_factory.mktemp("families")
    data = make_imagefolder(root / "data", n_classes=3, per_class=8, size=(16, 16))
    opts = ["--dataset", f"imagefolder:{data}", "--transform", "plain", "--image_size", "16", "--device", "cpu",
            "--batch_size", "8", "--arch", "vgg_tiny"]
    import cli as cli_mod

    assert cli_mod.main(["train", *opts, "--epochs", "2", "--out_dir", str(root / "teacher")]) == 0
    return {"root": root, "data": data, "opts": opts, "teacher": root / "teacher" / "last.pt"}


def _log_epochs(run_dir: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- KD

def test_distill_writes_student_run_with_teacher_hash_and_family(cli, tiny, tmp_path):
    out = tmp_path / "kd"
    code, stdout, err = cli("distill", *tiny["opts"], "--teacher", tiny["teacher"], "--alpha", "0.7",
                            "--temperature", "3", "--epochs", "1", "--out_dir", out)
    assert code == 0, err
    cfg = read_json(out / "config.json")["config"]
    assert cfg["loss"]["loss"] == "kd" and cfg["loss"]["alpha"] == 0.7 and cfg["loss"]["temperature"] == 3.0
    assert "batchmean" in cfg["loss"]["kl_reduction"]
    sha = sha256_file(tiny["teacher"])
    assert cfg["kd"]["teacher_sha256"] == sha
    ck = load_checkpoint(out / "last.pt")
    assert ck["teacher_sha256"] == sha and ck["teacher_checkpoint"] == str(tiny["teacher"].resolve())
    members = {m.name: m for m in read_manifest(out)}
    assert members["teacher"].role == "teacher" and members["teacher"].checkpoint == str(tiny["teacher"].resolve())
    assert members["student"].role == "student" and members["student"].teacher == "teacher"
    assert members["student"].checkpoint == str((out / "last.pt").resolve())
    assert "teacher: test top-1" in stdout


def test_distill_teacher_with_other_class_count_is_refused(cli, tiny, tmp_path):
    ck = load_checkpoint(tiny["teacher"])
    model = build_model("vgg_tiny", 5, 3, 16)
    bad = tmp_path / "teacher5.pt"
    save_checkpoint(bad, {**{k: ck[k] for k in ("arch", "dataset", "transform", "epoch", "metrics", "config",
                                                  "in_channels", "input_size")},
                          "num_classes": 5, "state_dict": model.state_dict()})
    code, _, err = cli("distill", *tiny["opts"], "--teacher", bad, "--epochs", "1", "--out_dir", tmp_path / "o")
    assert code == 1
    text = " ".join(err.split())
    assert "5 classes" in text and "has 3 classes" in text
    assert not (tmp_path / "o").exists()


def test_distill_teacher_input_size_mismatch_names_the_size(cli, tiny, tmp_path):
    opts = [o if o != "16" else "32" for o in tiny["opts"]]
    code, _, err = cli("distill", *opts, "--teacher", tiny["teacher"], "--epochs", "1", "--out_dir", tmp_path / "o")
    assert code == 1 and "--image_size 16" in " ".join(err.split())


# --------------------------------------------------------------------------- Born-Again

def test_born_again_passes_temperature_and_records_teacher_hash(cli, tiny, tmp_path, monkeypatch):
    seen = []
    real = born_again_mod.run_training

    def spy(*args, **kw):
        seen.append(kw.get("loss_fn"))
        return real(*args, **kw)

    monkeypatch.setattr(born_again_mod, "run_training", spy)
    out = tmp_path / "ban"
    code, stdout, err = cli("born-again", *tiny["opts"], "--generations", "2", "--lambda", "0.8",
                            "--temperature", "3", "--epochs", "1", "--out_dir", out)
    assert code == 0, err
    # generation 1's loss is CE + λ·T²·softCE at the configured T (fails if T were ignored)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=g, dtype=torch.float64) * 3, torch.randn(5, 3, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 1, 0])
    assert len(seen) == 2 and seen[1].convention["temperature"] == 3.0
    assert float(seen[1](s, y, t)) == pytest.approx(float(ban_loss(s, y, t, 0.8, 3.0)), rel=1e-12)
    assert float(seen[1](s, y, t)) != pytest.approx(float(ban_loss(s, y, t, 0.8, 1.0)), rel=1e-3)
    assert seen[0].convention["loss"] == "cross_entropy"
    # each generation its own run dir; g1 records g0's checkpoint hash; seeds differ per generation
    g1 = load_checkpoint(out / "g1" / "last.pt")
    assert g1["generation"] == 1 and g1["teacher_sha256"] == sha256_file(out / "g0" / "last.pt")
    assert read_json(out / "g1" / "config.json")["config"]["train"]["seed"] == 1
    gens = read_json(out / "generations.json")["generations"]
    assert [r["generation"] for r in gens] == [0, 1]
    assert gens[0]["ensemble_top1"] == pytest.approx(gens[0]["test_top1"])
    members = read_manifest(out)
    assert [(m.name, m.role, m.generation, m.teacher) for m in members] == [
        ("ban_g0", "generation", 0, None), ("ban_g1", "generation", 1, "ban_g0")]
    assert "ensemble" in (out / "generations.md").read_text() and "ban_g1" in stdout


def test_born_again_rejects_zero_generations(cli, tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli("born-again", *tiny["opts"], "--generations", "0", "--out_dir", tmp_path / "b")
    assert e.value.code == 2 and "argument --generations: expects an integer >= 1, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_born_again_resume_continues_interrupted_generation_only(cli, tiny, tmp_path, monkeypatch):
    real = born_again_mod.run_training

    def interrupt_g1(*args, **kw):
        if kw["family"]["generation"] == 1:
            def stop(model, epoch):
                if epoch == 2:
                    raise KeyboardInterrupt
            kw["on_epoch_end"] = stop
        return real(*args, **kw)

    out = tmp_path / "ban"
    argv = ["born-again", *tiny["opts"], "--generations", "2", "--epochs", "2", "--temperature", "2", "--out_dir", out]
    monkeypatch.setattr(born_again_mod, "run_training", interrupt_g1)
    code, _, err = cli(*argv)
    assert code == 130 and "--resume" in err
    assert _log_epochs(out / "g1") == [1]  # epoch 2 was interrupted before its checkpoint
    g0_sha = sha256_file(out / "g0" / "last.pt")
    g0_log = (out / "g0" / "log.jsonl").read_text()

    calls = []

    def count(*args, **kw):
        calls.append(kw["family"]["generation"])
        return real(*args, **kw)

    monkeypatch.setattr(born_again_mod, "run_training", count)
    code, _, err = cli(*argv, "--resume")
    assert code == 0, err
    assert calls == [1]                                             # g0 not retrained
    assert sha256_file(out / "g0" / "last.pt") == g0_sha and (out / "g0" / "log.jsonl").read_text() == g0_log
    assert _log_epochs(out / "g1") == [1, 2]                        # g1 continued from its epoch-1 checkpoint
    assert "resumed_utc" in read_json(out / "g1" / "config.json")
    status = [r["status"] for r in read_json(out / "generations.json")["generations"]]
    assert status == ["kept", "resumed"]


def test_ensemble_top1_averages_softmax():
    labels = torch.tensor([0, 1, 2])
    a = torch.tensor([[5.0, 0, 0], [0, 0, 5.0], [0, 0, 5.0]])      # 2/3 right
    b = torch.tensor([[0, 5.0, 0], [0, 9.0, 0], [0, 0, 1.0]])      # 2/3 right, sample 1 strongly
    acc = born_again_mod.ensemble_top1([a, b], labels)
    assert acc[0] == pytest.approx(200 / 3)
    # mean softmax: sample 0 tie 0/1 (argmax picks 0: right), sample 1 class 1 (right), sample 2 class 2 (right)
    assert acc[1] == pytest.approx(100.0)


# --------------------------------------------------------------------------- grid search and summaries

def test_search_runs_grid_skips_finished_and_summarizes(cli, tiny, tmp_path):
    base = tmp_path / "base.yaml"
    opts = dict(zip(tiny["opts"][::2], tiny["opts"][1::2]))
    lines = [f"{k.lstrip('-')}: {v}" for k, v in opts.items()] + [f"teacher: {tiny['teacher']}", "epochs: 1", "alpha: 0.5"]
    base.write_text("\n".join(lines) + "\n")
    out = tmp_path / "grid"
    code, stdout, err = cli("search", "--base", base, "--grid", "alpha=0.1,0.9", "temperature=2", "--out_dir", out)
    assert code == 0, err
    names = ["alpha=0.1_temperature=2", "alpha=0.9_temperature=2"]
    assert all((out / n / "family.json").exists() for n in names)
    assert read_json(out / names[1] / "config.json")["config"]["kd"]["alpha"] == 0.9
    mtime = (out / names[0] / "last.pt").stat().st_mtime_ns
    code, stdout, err = cli("search", "--base", base, "--grid", "alpha=0.1,0.9", "temperature=2", "--out_dir", out)
    assert code == 0, err
    assert "2 already finished" in stdout and (out / names[0] / "last.pt").stat().st_mtime_ns == mtime
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [r["run"] for r in rows] == names and [float(r["alpha"]) for r in rows] == [0.1, 0.9]
    assert {"best_test_top1", "last_test_top1", "test_loss"} <= set(rows[0]) and "temperature" not in rows[0]
    assert "| alpha=0.9_temperature=2 |" in (out / "summary.md").read_text()

    code, _, err = cli("search", "--base", base, "--grid", "alpah=0.1", "--out_dir", tmp_path / "g2")
    assert code == 1 and "alpah" in err and "alpha" in err.split("valid:")[1]


def test_summary_table_shows_only_varying_options_once():
    runs = [{"run": f"r{i}", "config": {"train": {"lr": 0.1, "seed": i}, "kd": {"alpha": a}, "loss": {"alpha": a}},
             "metrics": {"test_top1": 50.0 + i, "best_test_top1": 60.0 + i, "test_loss": 1.0}}
            for i, a in enumerate([0.1, 0.5])]
    header, rows = grid.summary_table(runs)
    assert header == ["run", "alpha", "seed", "best_test_top1", "last_test_top1", "test_loss"]
    assert rows[1] == ["r1", 0.5, 1, 61.0, 51.0, 1.0]


def test_grid_points_and_names():
    pts = grid.grid_points({"alpha": ["0.1", "0.5"], "temperature": ["4"]})
    assert pts == [{"alpha": "0.1", "temperature": "4"}, {"alpha": "0.5", "temperature": "4"}]
    assert grid.point_name(pts[1]) == "alpha=0.5_temperature=4"
    assert grid.point_name({"data_root": "/a b"}) == "data_root=-a-b"


# --------------------------------------------------------------------------- compression

def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


@pytest.mark.slow
def test_prune_and_share_keep_exact_budget_through_a_training_step():
    net = _small_net()
    codes = prune_magnitude(net, 0.6)
    stats = compression_stats(net, codes)
    assert stats["sparsity_per_layer"] == {"0": pytest.approx(0.6, abs=1e-3), "3": pytest.approx(0.6, abs=1e-3)}
    quantize_shared(net, codes, bits=3)
    assert compression_stats(net, codes)["distinct_values_per_layer"] == {"0": 8, "3": 8}
    # one SGD step breaks both; the projection restores them with the same masks and clusters
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 3, 6, 6)).pow(2).mean().backward()
    opt.step()
    assert compression_stats(net, codes)["distinct_values_per_layer"]["3"] > 8
    project_(net, codes)
    after = compression_stats(net, codes)
    assert after["distinct_values_per_layer"] == {"0": 8, "3": 8}
    for name, code in codes.items():
        w = dict(net.named_modules())[name].weight
        assert bool((w[~code.mask] == 0).all())
        for k in range(code.k):  # every cluster holds exactly one value
            assert torch.unique(w[code.mask & (code.assign == k)]).numel() == 1


def test_kmeans_recovers_planted_centres():
    rng = np.random.default_rng(0)
    centres = np.array([-1.0, -0.2, 0.3, 2.0])
    x = np.concatenate([c + 0.01 * rng.standard_normal(200) for c in centres])
    got, labels = kmeans_1d(x, 4)
    assert np.allclose(got, centres, atol=0.01)
    assert np.array_equal(np.bincount(labels), [200] * 4)


def test_compress_writes_normal_checkpoint_and_family(cli, tiny, tmp_path):
    out = tmp_path / "comp"
    code, stdout, err = cli("compress", "--checkpoint", tiny["teacher"], "--prune", "0.5", "--quantize_bits", "3",
                            "--finetune_epochs", "1", "--batch_size", "8", "--device", "cpu", "--out_dir", out)
    assert code == 0, err
    ck = load_checkpoint(out / "compressed.pt")
    orig = load_checkpoint(tiny["teacher"])
    model = model_from_checkpoint(ck)                       # the same architecture, a plain state dict
    assert ck["arch"] == orig["arch"] and set(ck["state_dict"]) == set(orig["state_dict"])
    m = read_json(out / "metrics.json")
    assert m["sparsity"] == pytest.approx(0.5, abs=0.01) and m["bits"] == 3
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = mod.weight.detach()
            kept = w[w != 0]
            assert torch.unique(kept).numel() == m["distinct_values_per_layer"][name] <= 8
            if kept.numel() > 8:
                assert m["distinct_values_per_layer"][name] == 8
    assert {"top1_before", "top1_pruned", "top1_quantized", "top1_after"} <= set(m)
    members = read_manifest(out)
    assert [(x.name, x.role) for x in members] == [("original", "original"), ("compressed", "compressed")]
    assert members[0].sha256 == sha256_file(tiny["teacher"]) and ck["original_sha256"] == members[0].sha256
    assert "sparsity 0.5" in stdout
    # a resume with another pruning fraction is refused before config.json is rewritten
    before = (out / "config.json").read_bytes()
    code, _, err = cli("compress", "--checkpoint", tiny["teacher"], "--prune", "0.7", "--quantize_bits", "3",
                       "--finetune_epochs", "1", "--batch_size", "8", "--device", "cpu", "--out_dir", out, "--resume")
    assert code == 1 and "compress.prune: 0.5 -> 0.7" in err and (out / "config.json").read_bytes() == before


def test_compress_refuses_a_bad_data_on_before_making_its_folder(cli, tiny, tmp_path):
    with pytest.raises(SystemExit) as e:                    # argparse: exit 2 naming the choices
        cli("compress", "--checkpoint", tiny["teacher"], "--data_on", "foo", "--out_dir", tmp_path / "c")
    assert e.value.code == 2 and not (tmp_path / "c").exists()
