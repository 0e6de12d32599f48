"""The report as a reader sees it: loaded in headless Chromium, with no console error, every figure
decoded, and a page of a plausible height (recorded in browser_check.json beside the report)."""
from __future__ import annotations

import json

import pytest

from analysis.report import make_report
from tests.analysis.runfolders import variance_report, write_consistency
from tests.browser import check_page


@pytest.mark.slow
@pytest.mark.browser
def test_the_report_loads_in_a_browser_with_every_image_decoded(tmp_path):
    reports = [variance_report("a", "b", [0.8, 0.1], 0.10, additive=[0.8, 0.1]),
               variance_report("b", "a", [0.5, 0.1], 0.45, verdict="not converged", additive=[0.5, 0.05],
                               reasons=["validation loss still fell 20% over the last 10% of epochs"])]
    study = write_consistency(tmp_path / "s" / "consistency" / "conv", reports, ["a", "b"]).parents[1]
    res = make_report(study, bootstrap=0)
    check = check_page(res["html"], tmp_path / "browser")
    (study / "browser_check.json").write_text(json.dumps({k: check[k] for k in ("images", "decoded", "height")}))
    assert check["errors"] == [] and check["console"] == []
    assert check["images"] >= 4 and check["decoded"] == check["images"] and min(check["widths"]) > 0
    assert check["height"] > 1500                                 # the sections and figures are laid out
