"""The CNN-vs-transformer study: a tiny VGG and a timm ViT trained on Animal-MNIST, compared at one layer
name that resolves to each net's own module path (the ViT's tokens as a 4x4 grid), with Trans-Nets in
both directions, CKA and the report. The shipped study file, shrunk to seconds."""
from __future__ import annotations

from pathlib import Path

import h5py
import pytest
import yaml

from common.files import read_json
from studies.runner import run_study

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cnn_vs_vit_study_compares_a_cnn_map_with_a_vit_token_grid(tmp_path):
    d = yaml.safe_load((ROOT / "studies" / "cnn_vs_vit.yaml").read_text())
    d["data"]["train_images"] = 160
    d["train"].update(epochs=1, batch_size=32)
    d["members"]["seeds"][1]["train"]["epochs"] = 1
    d["extract"]["limit"] = 48
    d["transnet"].update(epochs=2, eval_every=2, save_every=2, batch_size=16)
    d["baselines"]["permutations"] = 3
    sf = tmp_path / "cnn_vs_vit.yaml"
    sf.write_text(yaml.safe_dump(d, sort_keys=False))
    run_study(sf, tmp_path / "out", log=lambda m: None)
    out = tmp_path / "out"
    with h5py.File(out / "features.h5", "r") as f:
        cnn, vit = f["test/cnn0/top"], f["test/vit0/top"]
        assert cnn.shape == (48, 64, 4, 4) and cnn.attrs["node"] == "features.8" and cnn.attrs["point"] == "output"
        assert vit.shape == (48, 48, 4, 4) and vit.attrs["node"] == "blocks.1"
        assert vit.attrs["point"] == "tokens->grid" and int(vit.attrs["prefix_tokens"]) == 1
        assert vit.attrs["arch"] == "timm:vit_tiny_patch16_224"
    table = read_json(out / "consistency" / "top" / "table.json")
    rows = table["rows"] if isinstance(table, dict) and "rows" in table else table
    assert {(r["source"], r["target"]) for r in rows} == {("cnn0", "vit0"), ("vit0", "cnn0")}
    sim = read_json(out / "similarity" / "top" / "similarity.json")
    m = sim["metrics"]["cka"]["matrix"]
    assert sim["nets"] == ["cnn0", "vit0"] and m[0][0] == pytest.approx(1.0) and 0 <= m[0][1] <= 1
    report = (out / "report.md").read_text()
    assert "vit0" in report and "timm:vit_tiny_patch16_224" in report
