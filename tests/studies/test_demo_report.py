"""The demo study (``studies/demo.yaml``) as ``make demo`` runs it, with every member and every stage
kept but small sizes (256 training images, 1 epoch, 64 feature rows per split, 2 Trans-Net epochs):
no member is trained twice, and its report, layer x layer heatmaps included, loads in headless
Chromium with no console error and every image decoded."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from common.files import read_json
from studies.runner import run_study
from tests.browser import check_page

ROOT = Path(__file__).resolve().parents[2]


def small_demo(path: Path) -> Path:
    d = yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())
    d["data"]["train_images"] = 256
    d["train"]["epochs"] = 1
    d["extract"]["limit"] = 64
    d["transnet"].update(epochs=2, eval_every=2, train_rows=48, batch_size=16)
    d["baselines"]["permutations"] = 2
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.browser
def test_the_demo_trains_each_recipe_once_and_its_report_loads_in_a_browser(tmp_path):
    out = tmp_path / "demo"
    res = run_study(small_demo(tmp_path / "demo.yaml"), out, log=lambda m: None)
    stages = [s["stage"] for s in res["stages"]]
    assert {"layer_matrix/seed0__seed5", "layer_matrix/seed0__seed0", "report"} <= set(stages)
    assert read_json(out / "aliases.json")["aliases"] == {"ban_g0": "seed0", "ke_g1": "seed0"}
    html, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    assert "## Layer x layer similarity" in md and "ban_g0 = seed0" in md
    srcs = re.findall(r'src="(data:image/png;base64,[^"]+)"', html)
    check = check_page(out / "report.html", tmp_path / "browser")
    (tmp_path / "browser_check.json").write_text(json.dumps({k: check[k] for k in ("images", "decoded", "height")}))
    assert check["errors"] == [] and check["console"] == []
    assert check["images"] == len(srcs) >= 10 and check["decoded"] == check["images"] and min(check["widths"]) > 0
    assert check["height"] > 3000
