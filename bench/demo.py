"""The demo study timed as a whole process: ``python cli.py study studies/demo.yaml`` from an empty
folder to report.html, as ``make demo`` runs it (the venv present), with the load of the machine
before and after. Writes ``bench/results/demo.json`` (merged with earlier runs, one entry per host and
study file): wall seconds, the stages and how many members were trained versus reused (aliases.json),
and the one-minute load averages.

    python bench/demo.py                    # into a temporary folder, removed afterwards
    python bench/demo.py --keep runs/demo   # keep the study folder

The target (README): at most 10 minutes of wall time on an idle 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_demo(study: Path, out: Path) -> dict:
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "study", str(study), "--out_dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the demo study failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    state = json.loads((out / "state.json").read_text())
    aliases = json.loads((out / "aliases.json").read_text())["aliases"] if (out / "aliases.json").exists() else {}
    members = sum(len(json.loads(p.read_text())["members"]) for p in (out / "families").glob("*/family.json"))
    return {"wall_s": round(wall, 1), "load_1min_before": load0, "load_1min_after": os.getloadavg()[0],
            "cpus": os.cpu_count(), "stages": {k: v.get("status") for k, v in state.get("stages", {}).items()},
            "members": members, "reused_members": aliases, "report": str(out / "report.html"),
            "host": platform.node(), "python": platform.python_version()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default=str(ROOT / "studies" / "demo.yaml"), help="the study file")
    p.add_argument("--keep", default=None, help="study folder to keep (default: a temporary one, removed)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "demo.json"), help="results JSON")
    args = p.parse_args()
    tmp = None if args.keep else Path(tempfile.mkdtemp(prefix="kc-demo-"))
    out = Path(args.keep) if args.keep else tmp / "demo"
    try:
        res = run_demo(Path(args.study), out)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    res["study"] = str(Path(args.study).resolve().relative_to(ROOT)) if ROOT in Path(args.study).resolve().parents \
        else str(args.study)
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    body = json.loads(dest.read_text()) if dest.exists() else {}
    body[f"{res['host']}:{res['study']}"] = res
    dest.write_text(json.dumps(body, indent=2) + "\n")
    print(f"demo study: {res['wall_s']:.0f} s wall ({res['cpus']} CPUs, load {res['load_1min_before']:.1f} -> "
          f"{res['load_1min_after']:.1f}); {res['members']} members, reused {res['reused_members'] or 'none'}; "
          f"wrote {dest}")


if __name__ == "__main__":
    main()
