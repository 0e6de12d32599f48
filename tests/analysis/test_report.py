"""The report: readings computed from numbers, a study folder read whole or in part, and the
self-contained HTML of a small real study (the notebooks' demo study, run tiny) holding every table and figure."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import spearmanr

from analysis.consistency import ConsistencyConfig, pair_row, run_consistency
from analysis.convergence import usable
from analysis.document import render_html, render_markdown
from analysis.readings import (
    agreement_points,
    agreement_readings,
    consistency_readings,
    pair_reading,
    spearman,
    summary_lines,
)
from analysis.report import make_report
from analysis.study_folder import read_study_folder
from common.errors import UserError
from common.files import write_json
from studies.runner import cached_study
from tests.fakedata import FAST_FIT, planted_features
from training.manifest import Member, write_manifest

ROOT = Path(__file__).resolve().parents[2]


def tiny_demo_study(path: Path) -> Path:
    """The notebooks' demo study (``studies/notebook_demo.yaml``), run tiny: 2 seeds, 256 training
    images, 1 epoch, 48 feature rows per split, 3 Trans-Net epochs, 5 permutations."""
    d = yaml.safe_load((ROOT / "studies" / "notebook_demo.yaml").read_text())
    d["data"]["train_images"] = 256
    d["train"]["epochs"] = 1
    d["members"]["seeds"]["seeds"] = [0, 1]
    d["extract"]["limit"] = 48
    d["transnet"].update(epochs=3, batch_size=16, eval_every=3, save_every=3)
    d["baselines"]["permutations"] = 5
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


# --------------------------------------------------------------------------- readings (pure)

def _row(src, tgt, f0, f1, res, r2=None, **kw):
    return {"source": src, "target": tgt, "orders": 1, "fraction_order0": f0, "fraction_order1": f1,
            "fraction_residual": res, "r2": 1 - res if r2 is None else r2, "warnings": "", **kw}


def test_pair_reading_says_what_the_numbers_say():
    assert pair_reading(_row("ban_g2", "ban_g3", 0.81, 0.03, 0.21, r2=0.79)) == (
        "ban_g2 explains 81% of ban_g3's variance at order 0, 3% at order 1; 21% is inconsistent (held-out R² 0.79).")


def test_overlapping_components_are_not_called_explained():
    text = pair_reading(_row("a", "b", 1.9, 0.3, 0.5))
    assert "explains" not in text and "overlap" in text and "190% (order 0)" in text and "50% is inconsistent" in text


def test_consistency_readings_name_the_extremes_and_the_asymmetry():
    rows = [_row("a", "b", 0.7, 0.05, 0.2), _row("b", "a", 0.5, 0.05, 0.45), _row("a", "c", 0.6, 0.1, 0.3),
            _row("c", "a", 0.55, 0.1, 0.35)]
    lines = consistency_readings(rows, "L")
    assert lines[0].startswith("At layer L, over 4 directed pair(s)") and "from 20% (a→b) to 45% (b→a)" in lines[0]
    assert "median 32%" in lines[0]
    assert "Largest asymmetry: 45% of a's variance is not rebuilt from b, but only 20% of b's from a" in lines[1]
    assert lines[2].startswith("Convergence was not judged for 4 pair(s)") and len(lines) == 3


def test_readings_compare_only_values_whose_intervals_separate():
    rows = [_row("a", "b", 0.7, 0.05, 0.2, fraction_residual_ci=[0.15, 0.4]),
            _row("b", "a", 0.5, 0.05, 0.3, fraction_residual_ci=[0.1, 0.45])]
    lines = consistency_readings(rows, "L")
    assert "the extremes' bootstrap intervals overlap, so no pair is named" in lines[0]
    assert "cannot be told apart: their bootstrap intervals overlap" in lines[1]
    pts = [{"label": f"p{i}", "x": 0.966 + 0.001 * i, "y": 0.5 + 0.1 * i, "x_ci": [0.95, 0.98], "y_ci": None}
           for i in range(4)]
    text = agreement_readings(pts, "cka")[0]
    assert text.startswith("The 4 pairs cannot be ranked by cka: their values (0.966 to 0.969) lie within each other's")


def test_agreement_uses_spearman_over_unordered_pairs():
    nets = ["a", "b", "c", "d"]
    cka = np.array([[1, .9, .5, .2], [.9, 1, .6, .3], [.5, .6, 1, .4], [.2, .3, .4, 1]])
    rows = []
    r2 = {("a", "b"): .8, ("a", "c"): .5, ("a", "d"): .1, ("b", "c"): .6, ("b", "d"): .2, ("c", "d"): .45}
    for (x, y), v in r2.items():
        rows += [_row(x, y, v, 0, 1 - v), _row(y, x, v - 0.02, 0, 1 - v + 0.02)]
    pts = agreement_points(rows, {"nets": nets, "metrics": {"cka": {"matrix": cka.tolist()}}}, "cka")
    assert len(pts) == 6 and pts[0]["label"] == "a–b" and pts[0]["y"] == pytest.approx(0.79)
    rho = spearman([p["x"] for p in pts], [p["y"] for p in pts])
    assert rho == pytest.approx(spearmanr([p["x"] for p in pts], [p["y"] for p in pts]).statistic)
    assert agreement_readings(pts, "cka")[0].startswith(f"cka and the Trans-Net R² agree on the ranking of the 6 "
                                                        f"pairs (Spearman ρ = {rho:.2f})")
    assert "too few" in agreement_readings(pts[:2], "cka")[0]


def test_renderers_escape_text_and_embed_figures(tmp_path):
    png = tmp_path / "f.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    doc = [("h", 1, "T <1>"), ("p", "a < b & c"), ("ul", ["x|y"]), ("table", ["h|1", "h2"], [["1", "<2>"]]),
           ("fig", png, "cap")]
    html = render_html(doc)
    assert "<title>T &lt;1&gt;</title>" in html and "a &lt; b &amp; c" in html and "&lt;2&gt;" in html
    assert f'src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}"' in html
    md = render_markdown(doc, tmp_path)
    assert "| h\\|1 | h2 |" in md and "![cap](f.png)" in md


# --------------------------------------------------------------------------- study folders

def test_empty_or_missing_study_folders_are_refused(tmp_path, cli):
    with pytest.raises(UserError, match="does not exist"):
        read_study_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    code, out, err = cli("report", tmp_path / "empty")
    err = " ".join(err.split())                                  # cli.py wraps messages at 100 columns
    assert code == 1 and "holds no results" in err and "consistency folder (table.json)" in err


@pytest.mark.slow
def test_a_partial_study_reports_what_is_missing(tmp_path, cli):
    study = tmp_path / "study"
    feats = planted_features(tmp_path / "f.h5")
    run_consistency(ConsistencyConfig(str(feats), "conv", "a>b,b>a"), FAST_FIT, study / "consistency" / "conv",
                    log=lambda m: None)
    (study / "consistency" / "broken").mkdir()                   # an interrupted run: no table.json
    code, out, err = cli("report", study, "--out_dir", tmp_path / "rep")
    assert code == 0, err
    assert f"wrote {tmp_path / 'rep' / 'report.html'} (self-contained)" in out
    out = " ".join(out.split())
    assert "missing: families" in out and "warning: consistency/broken has no table.json" in out
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "## Knowledge consistency at conv" in text and "| a | b |" in text
    assert "95% percentile bootstrap intervals over test rows" in text and "200 resamples" in text
    rows = read_study_folder(study).consistency["conv"]["rows"]
    assert re.search(r"\| a \| b \| \d+ \|.*\| -?\d\.\d{3} \[-?\d\.\d{3}, -?\d\.\d{3}\] \|", text), text  # R² [lo, hi]
    assert rows and "no bootstrap interval" not in text

    assert "consistency/broken has no table.json" in text and "missing: features.h5" in text
    assert (tmp_path / "rep" / "figures" / "consistency_residual_conv.png").is_file()
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def shared_tmp(tmp_path_factory):
    """A folder all xdist workers of this run share (the run's own basetemp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    # Built once per run: a second worker waits on the study's lock and finds every stage cached.
    base = shared_tmp(tmp_path_factory)
    return cached_study(tiny_demo_study(base / "tiny_demo.yaml"), base / "demo_study", log=lambda m: None)


@pytest.mark.slow
def test_report_of_a_real_small_study_holds_every_table_and_figure(demo, tmp_path, cli):
    html = (demo / "report.html").read_text()
    md = (demo / "report.md").read_text()
    for section in ("At a glance", "What was compared", "Networks", "Knowledge consistency at features.4",
                    "Similarity baselines at features.4", "Network diagnosis at features.4", "Training curves",
                    "Missing parts and warnings", "Provenance"):
        assert f">{section}</h2>" in html and f"## {section}" in md
    # tables: family members, consistency rows (2 pairs), R² matrix, one per similarity metric
    assert html.count("<table>") == 1 + 1 + 1 + 2
    # self-contained: every figure embedded, nothing fetched from elsewhere
    srcs = re.findall(r'src="([^"]+)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in html and "<script" not in html
    links = re.findall(r"!\[(?:\\.|[^\]\\])*\]\(([^)]+)\)", md)
    assert len(links) == len(srcs) and all((demo / link).is_file() for link in links)
    for key in ("consistency_residual_features_4", "order_fractions_features_4", "similarity_cka_features_4",
                "similarity_svcca_features_4", "training_seeds"):
        assert (demo / "figures" / f"{key}.png").is_file() and (demo / "figures" / f"{key}.svg").is_file()
    assert "figures/panel_blind_spots_1.png" in md and "residual_energy.png" in md
    assert not re.search(r"\bnan\b", md, re.IGNORECASE)
    assert re.search(r"\| seed0 \| 1\.000 \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \|", md)   # CKA with its interval
    # the numbers in the readings are the table's
    rows = read_study_folder(demo).consistency["features.4"]["rows"]
    ok = [r["fraction_residual"] for r in rows if usable(r)]
    if ok:       # the extremes are the table's, over the pairs that may carry a conclusion
        assert f"ranges from {100 * min(ok):.0f}%" in md and f"to {100 * max(ok):.0f}%" in md
        assert any(line.startswith(f"At layer features.4, over {len(ok)} directed pair(s)") for line in summary_lines(demo))
    if len(ok) < len(rows):
        assert f"No conclusion is drawn from {len(rows) - len(ok)} of 2 pair(s)" in md

    code, out, err = cli("visualize", demo / "consistency" / "features.4", "--out_dir", tmp_path / "vis")
    assert code == 0, err
    assert (tmp_path / "vis" / "residual_fraction.png").is_file() and (tmp_path / "vis" / "r2.svg").is_file()


@pytest.mark.slow
def test_the_demo_study_is_a_cache(demo):
    stamp = (demo / "report.html").stat().st_mtime_ns
    messages = []
    assert cached_study(demo.parent / "tiny_demo.yaml", demo, log=messages.append) == demo
    stages = [m for m in messages if m.startswith("[")]
    assert stages and all(m.endswith(": cached") for m in stages), messages
    assert (demo / "report.html").stat().st_mtime_ns == stamp
    other = demo.parent / "other"
    other.mkdir()
    (other / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no study"):
        cached_study(demo.parent / "tiny_demo.yaml", other, log=messages.append)
    assert (other / "x.txt").read_text() == "mine"
    shutil.rmtree(other)


@pytest.mark.slow
def test_visualize_draws_a_decomposition_panel(demo, tmp_path, cli):
    code, out, err = cli("visualize", "--what", "panel", "--transnet", demo / "consistency" / "features.4" / "pairs" /
                         "seed0__seed1", "--rows", "0,3", "--channels", "1", "--out_dir", tmp_path)
    assert code == 0, err
    assert (tmp_path / "panel_test_rows0-3_ch1.png").is_file() and (tmp_path / "panel_test_rows0-3_ch1.svg").is_file()
    code, out, err = cli("visualize", "--what", "panel", "--transnet", demo / "consistency" / "features.4" / "pairs" /
                         "seed0__seed1", "--channels", "99", "--out_dir", tmp_path)
    assert code == 1 and "channels [99] are out of range" in " ".join(err.split())


@pytest.mark.slow
def test_generation_families_get_curves_and_a_table(tmp_path):
    study = tmp_path / "study"
    fam = study / "families" / "evolve"
    members = []
    for g, (dense, slim) in enumerate([(40.0, 9.0), (50.0, 45.0), (55.0, 54.0)], start=1):
        run = fam / f"g{g}"
        run.mkdir(parents=True)
        (run / "last.pt").write_bytes(b"x")
        (run / "log.jsonl").write_text("".join(json.dumps({"epoch": e, "train_loss": 2.0 / e, "test_top1": dense - 5 + e})
                                               + "\n" for e in (1, 2)) + '{"epoch": 3, "train_lo')   # cut line
        members += [Member(f"ke_g{g}", str(run / "last.pt"), "generation", g, metrics={"test_top1": dense}),
                    Member(f"ke_g{g}_slim", str(run / "last.pt"), "slim", g, metrics={"test_top1": slim})]
    write_manifest(fam, "knowledge-evolution", members)
    residual = {("ke_g1", "ke_g2"): 0.4, ("ke_g2", "ke_g3"): 0.2, ("ke_g1", "ke_g3"): 0.5, ("ke_g3", "ke_g1"): 0.6}
    rows = [pair_row({"source": a, "target": b, "layer": "L", "split": "test", "n_samples": 9, "var_target": 1.0,
                      "var_orders": [1 - r], "fraction_orders": [1 - r], "var_residual": r, "fraction_residual": r,
                      "r2": 1 - r, "gates": [], "mse": r}) for (a, b), r in residual.items()]
    (study / "consistency" / "L").mkdir(parents=True)
    write_json(study / "consistency" / "L" / "table.json", {"rows": rows})
    res = make_report(study)
    md = res["markdown"].read_text()
    assert "## Generations" in md and "| 2 | ke_g2 | 50.000 | 45.000 | 0.400 | 0.400 |" in md
    assert "| 3 | ke_g3 | 55.000 | 54.000 | 0.200 | 0.500 |" in md
    assert "Test top-1 goes from 40.0% (generation 1) to 55.0% (generation 3)" in md
    assert "The slim net goes from 9.0% to 54.0% top-1." in md
    assert "Residual fraction to the previous generation: g2 40%, g3 20%." in md
    assert (study / "figures" / "generations_evolve_L.png").is_file()
    assert (study / "figures" / "training_evolve.svg").is_file()              # the cut log line is skipped
