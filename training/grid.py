"""The hyper-parameter grid of any training command (``search``) and the results table of a folder
of runs (``summarize``).

    run_grid     out_dir/<opt=value_...>/ one run dir per grid point; search.json-style config, summary
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.files import read_json
from common.rundir import RunDir, is_finished
from training.config import RESUME_FREE, resume_note
from training.families import non_empty
from training.loop import changed_settings


def grid_points(grid: dict[str, Sequence[str]]) -> list[dict[str, str]]:
    """The Cartesian product in the given key order: {"a": ["1", "2"], "b": ["x"]} -> [{a:1,b:x}, {a:2,b:x}]."""
    for k, vals in grid.items():
        if not vals:
            raise UserError(f"--grid {k}= has no values; give e.g. {k}=0.1,0.5")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: dict[str, Any]) -> str:
    """Run-dir name of a grid point: ``alpha=0.5_temperature=4`` (unsafe characters replaced by '-')."""
    return "_".join(f"{k}={re.sub(r'[^A-Za-z0-9.+-]', '-', str(v))}" for k, v in point.items())


def run_grid(grid: dict[str, Sequence[str]], out_dir: str | Path,
             run_point: Callable[[dict[str, str], Path, str], Any], overwrite: bool = False,
             config: dict[str, Any] | None = None,
             options: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]] | None = None
             ) -> list[dict[str, Any]]:
    """Run ``run_point(point, run_dir, mode)`` for every grid point, one run dir each under ``out_dir``.

    Finished runs are skipped, interrupted ones resumed (mode "resume"), the rest started ("new"); with
    ``overwrite`` the whole folder is emptied first. ``options(base, point)``: the full options of a run
    (defaults filled in) from ``config["base"]``; given it, runs already in ``out_dir`` that were started
    with other options are refused before anything is written (:func:`check_reuse`). Writes
    config.json/metrics.json of the search and ``summary.md``/``summary.csv``.
    """
    points = grid_points(grid)
    names = [point_name(p) for p in points]
    if len(set(names)) != len(names):
        raise UserError(f"grid points map to the same run directory name: {sorted(names)}")
    out = Path(out_dir)
    config = config or {}
    statuses: list[dict[str, Any]] = []
    with RunDir(out, "overwrite" if overwrite else "resume") as root:
        if root.resuming and options is not None and root.file("config.json").exists():
            check_reuse(out, dict(zip(names, points)), read_json(root.file("config.json")).get("config", {}), config,
                        options)
        root.write_config({"grid": {k: list(v) for k, v in grid.items()}, **config})
        for point, name in zip(points, names):
            d = out / name
            if is_finished(d):
                statuses.append({"run": name, "point": point, "status": "skipped (finished)"})
                continue
            mode = "resume" if non_empty(d) else "new"
            run_point(point, d, mode)
            statuses.append({"run": name, "point": point, "status": "resumed" if mode == "resume" else "trained"})
        root.finish({"runs": statuses})
    write_summary(out)
    return statuses


def check_reuse(out: Path, points: dict[str, dict[str, str]], prev: dict[str, Any], config: dict[str, Any],
                options: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]]) -> None:
    """Refuse the runs of ``points`` (by run-dir name) already in ``out`` whose options, from the command
    and base of the search that started them (``prev``, its config.json) and their point, differ from
    those of ``config``'s: a finished run would be kept, an interrupted one resumed, under the new
    options' name. The options of :data:`training.config.RESUME_FREE` may differ."""
    if "base" not in prev:
        return
    free = {k for keys in RESUME_FREE.values() for k in keys}
    stale = []
    for name, point in points.items():
        if not non_empty(out / name):
            continue
        if prev.get("command") != config.get("command"):
            diffs = [f"command: {prev.get('command')!r} -> {config.get('command')!r}"]
        else:
            diffs = changed_settings(options(prev["base"], point), options(config.get("base", {}), point), free)
        if diffs:
            stale.append(f"{out / name} ({'; '.join(diffs)})")
    if stale:
        raise UserError(f"{len(stale)} run(s) of the grid in {out} were started with other settings: "
                        f"{', '.join(stale)}. search keeps finished runs and resumes interrupted ones only when their "
                        f"options are unchanged ({resume_note()}); pass --overwrite to start every run of the grid "
                        f"again, or use a new --out_dir")


# =========================================================================== summarize

def find_runs(root: str | Path) -> list[dict[str, Any]]:
    """Training run dirs under ``root`` (itself included): config.json + metrics.json with test_top1."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory")
    runs = []
    for cfg_path in sorted(root.rglob("config.json")):
        d = cfg_path.parent
        if not (d / "metrics.json").is_file():
            continue
        metrics = read_json(d / "metrics.json")
        if not isinstance(metrics, dict) or not isinstance(metrics.get("test_top1"), (int, float)):
            continue
        rel = d.relative_to(root).as_posix()
        runs.append({"run": "." if rel == "." else rel, "config": read_json(cfg_path).get("config", {}),
                     "metrics": metrics})
    return runs


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> dotted keys; lists become JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


METRIC_COLUMNS = (("best_test_top1", "best_test_top1"), ("last_test_top1", "test_top1"), ("test_loss", "test_loss"))


def summary_table(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: run, every option with two or more distinct values among the runs that record it,
    best/last top-1, test loss.

    Options recorded twice with the same values (``kd.alpha`` and ``loss.alpha``) appear once, under
    their last name component where that is unambiguous.
    """
    flat = [flatten(r["config"]) for r in runs]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys  # two or more distinct recorded values (absent in some runs does not count)
               if len({json.dumps(f[k], sort_keys=True, default=str) for f in flat if k in f}) > 1]
    kept, signatures = [], set()
    for k in varying:
        sig = (k.rsplit(".", 1)[-1], json.dumps([f.get(k) for f in flat], sort_keys=True, default=str))
        if sig not in signatures:
            signatures.add(sig)
            kept.append(k)
    shorts = [k.rsplit(".", 1)[-1] for k in kept]
    names = [s if shorts.count(s) == 1 else k for s, k in zip(shorts, kept)]
    header = ["run"] + names + [c for c, _ in METRIC_COLUMNS]
    rows = []
    for r, f in zip(runs, flat):
        rows.append([r["run"]] + [f.get(k) for k in kept] + [r["metrics"].get(m) for _, m in METRIC_COLUMNS])
    return header, rows


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"
    return str(v).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(root: str | Path, out_dir: str | Path | None = None) -> tuple[Path, Path, str]:
    """Write summary.md and summary.csv of every run under ``root``; return their paths and the table."""
    runs = find_runs(root)
    if not runs:
        raise UserError(f"no finished training runs (config.json + metrics.json with test_top1) under {root}")
    header, rows = summary_table(runs)
    text = markdown_table(header, rows)
    out = Path(out_dir) if out_dir else Path(root)
    out.mkdir(parents=True, exist_ok=True)
    md, csv_path = out / "summary.md", out / "summary.csv"
    md.write_text(f"# Runs under {Path(root).resolve()}\n\n{text}\nAccuracies in percent; best = best test "
                  f"top-1 over the evaluated epochs, last = the final epoch's.\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([["" if v is None else v for v in row] for row in rows])
    csv_path.write_text(buf.getvalue())
    return md, csv_path, text
