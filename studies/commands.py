"""``study``: run a whole study from one declarative file, with per-stage caching."""
from __future__ import annotations

import argparse
import time

from common.options import Command


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_file", help="the study file (YAML), e.g. studies/demo.yaml")
    p.add_argument("--out_dir", required=True, help="study folder: every stage writes below it")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the plan (what will run, what is cached) and exit")
    p.add_argument("--resume", action="store_true",
                   help="accepted for symmetry with other commands: a study always resumes its own folder and "
                        "reuses cached stages (a folder holding another study is refused)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete everything in --out_dir and start over (also to run a study into a folder that "
                        "holds another one)")


def _run(args: argparse.Namespace) -> None:
    from studies.runner import run_study

    t0 = time.perf_counter()
    res = run_study(args.study_file, args.out_dir, dry_run=args.dry_run, overwrite=args.overwrite)
    if args.dry_run or res.get("rank", 0) != 0:
        return
    print(f"\nstudy finished in {time.perf_counter() - t0:.0f}s")
    for line in res["summary"]:
        print(f"  {line}")
    if res["report"]:
        print(f"report: {res['report']}")


COMMANDS = [
    Command("study", "run a whole study from a study file", _add, _run,
            "Train the members, extract features, fit Trans-Nets for the pairs, compute baselines and write the "
            "report, as the study file says. Stages whose inputs did not change are cached (content hashes); an "
            "interrupted study resumes where it stopped. A study folder holds one study, known by its name (the "
            "study file's `name`, else the file name without .yaml): the same study, its file edited or not, "
            "resumes there and redoes only the stages whose inputs changed; a stage dropped from the file has its "
            "outputs moved to STUDY/removed/ (out of the report); a study of another name is refused unless "
            "--overwrite.",
            torchrun=True),
]
