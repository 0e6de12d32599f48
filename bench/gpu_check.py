#!/usr/bin/env python
"""The GPU check (``make gpu-check``): does the workbench hold on a CUDA machine, and how close to its
ceilings does it run there? Every step runs in its own process group under a timeout; the whole check
stays within ``--budget_s`` (default 470 s: under 8 minutes on one H200).

    python bench/gpu_check.py                     # on a CUDA machine (refuses to run without one)
    python bench/gpu_check.py --tiny --skip_tests # a dry run of every step at tiny sizes, on the CPU
    GPU_CHECK_TINY=1 make gpu-check               # the same dry run through make

Steps, in order (later steps are reported as skipped when the budget is spent), so that the issue's
figures are measured first, each benchmark alone on the GPU:

1. ``bench-transnet`` (CUB size of vgg16_bn ``features.30``: 5,994 x 512x28x28, bf16) and
   ``bench-transnet-compiled`` (the same fit with ``--compile default``): the fit's speed as a fraction
   of its convolutions' alone (the 3x3 convolution ceiling of that machine) and its 1000 epochs;
   ``bench-group-fit`` (the demo's 12 Trans-Nets of 64 x 4x4, 25 epochs: separate vs together, eager
   and under ``cudagraphs``); ``bench-train`` (resnet18 at 224 px, Animal-MNIST resized, batch 128);
   ``bench-extract`` (a vgg16_bn pair to ``features.30`` at 224 px, bf16, channels_last, float16 file;
   Animal-MNIST resized, read through the DataLoader and from the device-held image cache). Their
   JSON files are kept.
2. ``tests``: the whole suite with CUDA visible (``pytest -n 8 --dist loadfile tests``, plus the
   notebooks when nbmake is installed; ``--timeout 120`` a test where pytest-timeout is installed);
   nothing deselected but the tests marked ``browser`` where the machine has no headless Chromium
   (the summary says so). ``--skip_tests`` only with ``--tiny``.
3. ``fit-fp32``, ``fit-tf32``, ``fit-bf16`` (beside the suite: they check R², not speed):
   ``cli.py fit-transnet --precision P`` with its default device on planted features: B = a random
   2-order Trans-Net (gates 0.8) applied to A, plus noise of 0.3 x its std (held-out R² ceiling about
   1 / (1 + 0.09) = 0.92). ``fits-agree`` then requires the three held-out R² within :data:`R2_SPREAD`.
4. ``demo-study``: ``cli.py study studies/demo.yaml`` (``--tiny``: a shrunken copy of it), alone.

Writes ``summary.txt`` (one line per step: name, exit status, seconds, key figure), each step's log and
the JSON files into ``--out_dir`` (default runs/gpu-check) and, when ``$OUT`` is set, copies
``summary.txt`` there after every step and packs the folder as ``$OUT/gpu-check.tar.gz`` at the end,
also when a step raised. Packages the device machine may
lack (animal-mnist, pytest-xdist, execnet) are installed from wheels in ``.whl/`` (no network needed):
``pip download --no-deps animal-mnist==0.4 pytest-xdist==3.8.0 execnet==2.1.2 -d .whl``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
R2_SPREAD = 0.02          # the three precisions' held-out R² must agree within this (max - min)
PRECISIONS = ("fp32", "tf32", "bf16")
WHEELS = (("animal_mnist", "animal_mnist-0.4-*.whl"), ("execnet", "execnet-*.whl"), ("xdist", "pytest_xdist-*.whl"))
FIT_LAYER = "conv"
SITE = Path(tempfile.gettempdir()) / "kc-gpu-check-site"    # wheels go here when pip may not install them in place


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    key: Callable[[str], str] = lambda log: ""     # the key figure, from the step's log and its files
    cwd: Path = ROOT


@dataclass
class Outcome:
    name: str
    rc: int | None            # None: skipped
    seconds: float
    key: str
    extra: dict = field(default_factory=dict)

    def line(self) -> str:
        rc = "skip" if self.rc is None else str(self.rc)
        return f"{self.name:<15} rc={rc:<4} {self.seconds:7.1f}s  {self.key}"


# --------------------------------------------------------------------------- set-up

def install_wheels() -> str:
    """Install from ``.whl/`` what is not importable (``pip install --no-deps``); what was done, in words."""
    done = []
    for module, pattern in WHEELS:
        if importlib.util.find_spec(module) is not None:
            continue
        wheels = sorted((ROOT / ".whl").glob(pattern))
        if not wheels:
            done.append(f"{module} MISSING (no .whl/{pattern})")
            continue
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheels[-1])]
        rc = subprocess.run(pip).returncode
        where = ""
        if rc != 0:            # an interpreter pip may not install into: a folder of its own on the path
            rc = subprocess.run([*pip, "--target", str(SITE), "--upgrade"]).returncode
            if rc == 0:
                sys.path.insert(0, str(SITE))
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
                where = f" into {SITE}"
        done.append(f"{module} installed from {wheels[-1].name}{where}" + ("" if rc == 0 else f" (pip rc {rc})"))
    importlib.invalidate_caches()
    return "; ".join(done) or "animal_mnist, xdist, execnet importable"


def has_chromium() -> bool:
    """Whether tests/browser.py can load a page here (CI installs Debian's chromium)."""
    return bool(shutil.which("chromium")) or Path("/usr/bin/chromium").is_file()


def machine() -> str:
    """torch, CUDA and the device's name, asked in a child process (this one never touches CUDA, so the
    benchmarks have the GPU to themselves)."""
    code = ("import os, torch; c = torch.cuda.is_available(); print(f'torch {torch.__version__}, CUDA "
            "{torch.version.cuda}, ' + (torch.cuda.get_device_name(0) if c else 'no CUDA device') + "
            "f', {os.cpu_count()} CPUs')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return res.stdout.strip() or f"unknown ({res.stderr.strip()[-200:]})"


# --------------------------------------------------------------------------- planted features

def write_planted(path: Path, n_train: int, n_test: int, channels: int, hw: int, seed: int = 0) -> float:
    """A kc-features file (float32, splits train and test) of nets A and B at layer ``conv``: A standard
    normal with per-channel scales in [0.5, 2], B = a random 2-order Trans-Net (3x3, instance norm, gates
    0.8) applied to A plus independent noise of 0.3 x the std of that signal. Returns the R² ceiling
    Var(signal) / (Var(signal) + Var(noise)) on the test split."""
    import h5py
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    from features.store import create_features, init_root, init_split, mark_complete
    from transnet.model import TransNet, TransNetConfig

    torch.manual_seed(seed)
    teacher = TransNet(TransNetConfig(channels, 2, 3, "instance")).eval()
    teacher.set_gates([0.8, 0.8])
    g = torch.Generator().manual_seed(seed + 1)
    scale = 0.5 + 1.5 * torch.rand(1, channels, 1, 1, generator=g)
    ceiling = 0.0
    with h5py.File(path, "w") as f:
        init_root(f, "planted", {"preset": "planted"}, hw, "bench/gpu_check.py")
        for split, n in (("train", n_train), ("test", n_test)):
            a = torch.randn(n, channels, hw, hw, generator=g) * scale
            with torch.no_grad():
                signal = torch.cat([teacher(a[i:i + 256]) for i in range(0, n, 256)])
            noise = 0.3 * signal.std() * torch.randn(signal.shape, generator=g)
            if split == "test":
                ceiling = float(signal.var() / (signal.var() + noise.var()))
            init_split(f, split, np.arange(n), np.zeros(n, dtype=np.int64))
            for net, x in (("A", a), ("B", signal + noise)):
                ds = create_features(f, split, net, FIT_LAYER, tuple(x.shape), "float32",
                                     {"arch": "planted", "layer": FIT_LAYER})
                ds[...] = x.numpy()
                mark_complete(ds)
    return ceiling


# --------------------------------------------------------------------------- key figures

def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _mib(v) -> str:
    return f"{v:.0f} MiB" if isinstance(v, (int, float)) else "-"


def pytest_key(log: str) -> str:
    lines = [ln.strip("= ") for ln in log.splitlines() if (" passed" in ln or " failed" in ln or " error" in ln)]
    return lines[-1] if lines else "no pytest summary line (see tests.log)"


def demo_key(folder: Path, demo_out: Path) -> Callable[[str], str]:
    def key(_log: str) -> str:
        for src, dst in ((demo_out / "state.json", "demo_state.json"),
                         (demo_out / "consistency" / "features.8" / "table.json", "demo_consistency.json")):
            if src.is_file():
                shutil.copy(src, folder / dst)
        state = _json(folder / "demo_state.json")
        rows = _json(folder / "demo_consistency.json").get("rows", [])
        r2 = [r["r2"] for r in rows if isinstance(r.get("r2"), (int, float))]
        cons = next((s.get("time_s") for s in state.get("last_run", []) if s.get("stage", "").startswith("consistency")),
                    None)
        return (f"{len(rows)} Trans-Nets, held-out R² {min(r2):.3f}..{max(r2):.3f}; " if r2 else "no consistency table; ") \
            + (f"consistency stage {cons:.1f} s; " if cons is not None else "") \
            + f"study {state.get('total_time_s', float('nan')):.1f} s"
    return key


def fit_key(out: Path) -> Callable[[str], str]:
    def key(_log: str) -> str:
        m = _json(out / "metrics.json")
        if not m:
            return "no metrics.json"
        return (f"held-out R² {m.get('r2'):.4f} (precision {m.get('precision')}, effective "
                f"{m.get('precision_effective')}), training {m.get('train_time_s', float('nan')):.1f} s"
                if isinstance(m.get("r2"), (int, float)) else f"R² {m.get('r2')}")
    return key


def transnet_key(js: Path) -> Callable[[str], str]:
    def key(_log: str) -> str:
        r = _json(js)
        if not r:
            return "no transnet.json"
        return (f"compute/real {r['compute_over_real']:.2f} ({r['real']['placement']}), fit at "
                f"{r['conv_over_real']:.2f} of its convolutions' speed (--compile {r['settings']['compile']}), 1000 epochs "
                f"{r['minutes_for_1000_epochs']:.1f} min, set-up {r['setup_s']:.1f} s "
                f"({r['write_mb_per_s']:.0f} MB/s), peak GPU {_mib(r.get('peak_gpu_memory_mb'))}")
    return key


def group_fit_key(js: Path) -> Callable[[str], str]:
    def key(_log: str) -> str:
        r = _json(js)
        if not r:
            return "no group_fit.json"
        graphs = (f", together under --compile {r['also_compile']} {r['together_compiled_s']:.1f} s (epochs after "
                  f"the first {r.get('compiled_epochs_after_the_first_s') or 0:.1f} s)"
                  if r.get("together_compiled_s") is not None else "")
        if r.get("compiled_error"):
            graphs = f", --compile {r['also_compile']} FAILED: {r['compiled_error'][:160]}"
        return (f"{r['pairs']} fits of {r['channels']}x{r['size']}x{r['size']}, {r['epochs']} epochs: together "
                f"{r['together_s']:.1f} s (epochs after the first {r.get('together_epochs_after_the_first_s') or 0:.1f} s) "
                f"vs separate {r['separate_s']:.1f} s (x{r['speedup']:.1f}), grouped step "
                f"alone {r['ceiling_s']:.1f} s{graphs}, peak GPU {_mib(r.get('peak_gpu_memory_mb'))}")
    return key


def extract_key(js: Path) -> Callable[[str], str]:
    def key(_log: str) -> str:
        runs = _json(js).get("runs", {})
        r = next(iter(runs.values()), None)
        if not r:
            return "no extract.json"
        by = r.get("extract_images_per_s_by_data_on") or {}
        paths = ", ".join(f"{p} {v:.0f}" for p, v in by.items())
        return (f"extract/min(forward, checksummed write) {r['ratio_to_ceiling']:.2f} ({r['bound']}-bound; "
                f"/min(forward, plain write) {r['ratio_to_min_forward_plain_write']:.2f}): "
                f"{r['extract_images_per_s']:.0f} pairs/s (inputs: {paths or 'loader'}) vs forward "
                f"{r['forward_images_per_s']:.0f}, write {r['write_checksum_images_per_s']:.0f} checksummed, "
                f"{r['write_images_per_s']:.0f} plain ({r['write_gb_per_s']:.2f} GB/s), peak GPU "
                f"{_mib(r.get('peak_gpu_memory_mb'))}")
    return key


def train_key(js: Path) -> Callable[[str], str]:
    def key(_log: str) -> str:
        r = _json(js)
        if not r:
            return "no train_throughput.json"
        return (f"loop/pure {r['ratio']:.2f} (data on {r.get('data_on')}): {r['loop_images_per_s']:.0f} vs "
                f"{r['pure_images_per_s']:.0f} img/s (last of {r.get('epochs', 1)} epochs; first "
                f"{r.get('loop_first_epoch_images_per_s', float('nan')):.0f}), peak GPU {_mib(r.get('peak_gpu_memory_mb'))}")
    return key


# --------------------------------------------------------------------------- the steps

def tiny_demo(folder: Path) -> Path:
    """studies/demo.yaml shrunk for a CPU dry run: its two seeds only (1 epoch on 256 images), 2-epoch fits
    on 128 rows, every stage kept (train, extract, consistency, similarity, diagnosis, report)."""
    import yaml

    d = yaml.safe_load((ROOT / "studies" / "demo.yaml").read_text())
    d["data"]["train_images"] = 256
    d["train"]["epochs"] = 1
    d["members"] = {"seeds": d["members"]["seeds"]}
    d["pairs"] = [{"family": "seeds", "plan": "all"}]
    d["extract"]["limit"] = 256
    d["transnet"].update(epochs=2, eval_every=2, train_rows=128)
    d["baselines"].update(metrics=["cka"], permutations=2)
    path = folder / "demo_tiny.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def build_steps(args, folder: Path, scratch: Path) -> list[Step]:
    """The benchmarks first, each alone on the GPU (the issue's figures, measured before anything can use
    the budget up), then the suite with the three fits beside it, then the demo study."""
    py = sys.executable
    tiny = args.tiny
    dev = "auto" if tiny else "cuda"
    steps: list[Step] = []
    tn = (["--n", "128", "--channels", "16", "--size", "8", "--epochs", "1", "--pickle_n", "32", "--workers", "0"]
          if tiny else ["--n", "5994", "--channels", "512", "--size", "28", "--epochs", "2", "--pickle_n", "64",
                        "--workers", "8"])
    steps.append(Step("bench-transnet", [py, "bench/transnet.py", "--device", dev, *tn, "--no-disk", "--out",
                                         str(folder / "transnet.json")], 100, transnet_key(folder / "transnet.json")))
    tc = folder / "transnet_compiled.json"          # the CUB-size fit again under torch.compile
    steps.append(Step("bench-transnet-compiled", [py, "bench/transnet.py", "--device", dev, *tn, "--compile",
                                                  "default", "--no-disk", "--out", str(tc)], 150, transnet_key(tc)))
    gf = ["--pairs", "2", "--epochs", "1", "--n", "128", "--n_test", "32"] if tiny else ["--also_compile", "cudagraphs"]
    steps.append(Step("bench-group-fit", [py, "bench/group_fit.py", "--device", dev, *gf, "--out",
                                          str(folder / "group_fit.json")], 100, group_fit_key(folder / "group_fit.json")))
    tr = (["--arch", "vgg_tiny", "--image_size", "32", "--n", "128", "--batch_size", "32"] if tiny else
          ["--arch", "resnet18", "--image_size", "224", "--n", "8192", "--batch_size", "128", "--num_workers", "8"])
    steps.append(Step("bench-train", [py, "bench/train_throughput.py", "--device", dev, *tr,
                                      "--out", str(folder / "train_throughput.json")], 80,
                      train_key(folder / "train_throughput.json")))
    ex = (["--arch", "vgg_tiny", "--layer", "features.8", "--image_size", "32", "--n", "64", "--batch_size", "32",
           "--repeats", "1"] if tiny else
          ["--image_size", "224", "--n", "2048", "--batch_size", "256", "--repeats", "2", "--channels_last",
           "--num_workers", "8"]) + ["--data", "animal-mnist", "--data_on", "both"]
    steps.append(Step("bench-extract", [py, "bench/extract.py", "--device", dev, *ex, "--precision", "bf16",
                                        "--no_rss", "--workdir", str(scratch / "extract"), "--out_json",
                                        str(folder / "extract.json")], 100, extract_key(folder / "extract.json")))
    if not args.skip_tests:
        cmd = [py, "-m", "pytest", "-q", "-n", str(args.workers), "--dist", "loadfile", "-rfE", "--durations=15",
               *args.tests]
        if importlib.util.find_spec("pytest_timeout") is not None:
            cmd += ["--timeout", "120"]             # one hung test fails alone instead of eating the step
        if not args.tiny and importlib.util.find_spec("nbmake") is not None and importlib.util.find_spec("ipykernel"):
            cmd += ["--nbmake", "notebooks"]
        left_out = ""
        if not has_chromium():          # the GPU machine has no browser: its 3 report-in-a-browser tests are CI's
            cmd += ["-m", "not browser"]
            left_out = " (tests marked browser left out: no headless Chromium here)"
        steps.append(Step("tests", cmd, 200, lambda log, note=left_out: pytest_key(log) + note))
    fit = ["--orders", "2", "--kernel", "3", "--epochs", "4" if tiny else "60", "--lr", "1e-3", "--final_lr", "1e-5",
           "--schedule", "cosine", "--batch_size", "64", "--eval_every", "1000", "--save_every", "1000"]
    for p in PRECISIONS:
        out = scratch / f"fit-{p}"
        steps.append(Step(f"fit-{p}", [py, "cli.py", "fit-transnet", "--features", str(scratch / "planted.h5"),
                                        "--source", "A", "--target", "B", "--layer", FIT_LAYER, *fit,
                                        "--precision", p, "--out_dir", str(out)], 90, fit_key(out)))
    demo_out = scratch / "demo"
    study = tiny_demo(folder) if tiny else ROOT / "studies" / "demo.yaml"
    steps.append(Step("demo-study", [py, "cli.py", "study", str(study), "--out_dir", str(demo_out)], 150,
                      demo_key(folder, demo_out)))
    return steps


def run_step(step: Step, folder: Path, timeout_s: float) -> Outcome:
    """Run one step in its own process group (killed whole on timeout: rc 124), its output in <name>.log."""
    log = folder / f"{step.name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(step.argv) + "\n")
        fh.flush()
        proc = subprocess.Popen(step.argv, cwd=step.cwd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = 124
    seconds = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    try:
        key = step.key(text)
    except Exception as e:  # noqa: BLE001 - a missing figure is reported, the check goes on
        key = f"no key figure ({type(e).__name__}: {e})"
    if rc == 124:
        key = f"TIMEOUT after {timeout_s:.0f} s; " + key
    elif rc != 0:
        tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or [""]
        key = f"FAILED: {tail[0][:160]}; " + key
    return Outcome(step.name, rc, seconds, key)


def agreement(outcomes: list[Outcome], scratch: Path) -> Outcome:
    r2 = {}
    for p in PRECISIONS:
        m = _json(scratch / f"fit-{p}" / "metrics.json")
        if isinstance(m.get("r2"), (int, float)) and math.isfinite(m["r2"]):
            r2[p] = m["r2"]
    if len(r2) < len(PRECISIONS):
        return Outcome("fits-agree", 1, 0.0, f"missing R² for {', '.join(p for p in PRECISIONS if p not in r2)}")
    spread = max(r2.values()) - min(r2.values())
    text = ", ".join(f"{p} {v:.4f}" for p, v in r2.items())
    return Outcome("fits-agree", 0 if spread <= R2_SPREAD else 1, 0.0,
                   f"held-out R² spread {spread:.4f} (must be <= {R2_SPREAD}): {text}")


# --------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", default=os.environ.get("GPU_CHECK_TINY", "") not in ("", "0"),
                   help="dry-run every step at tiny sizes on whatever device there is (env GPU_CHECK_TINY=1)")
    p.add_argument("--skip_tests", action="store_true", help="leave out the test suite (only with --tiny)")
    p.add_argument("--out_dir", default=str(ROOT / "runs" / "gpu-check"), help="folder of the summary and JSON files")
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds for all steps together (default 470: under 8 minutes; --tiny: 1800, a busy CPU)")
    p.add_argument("--workers", type=int, default=8, help="pytest-xdist workers of the test step")
    p.add_argument("--tests", nargs="+", default=["tests"],
                   help="what the test step runs (anything but the whole suite only with --tiny)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.skip_tests and not args.tiny:
        print("--skip_tests is for the CPU dry run (--tiny) only: the GPU check runs the whole suite", file=sys.stderr)
        return 2
    if args.tests != ["tests"] and not args.tiny:
        print("--tests is for the CPU dry run (--tiny) only: the GPU check runs the whole suite", file=sys.stderr)
        return 2
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.tiny else 470.0
    t_start = time.perf_counter()
    folder = Path(args.out_dir)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    wheels = install_wheels()
    if not args.tiny and importlib.util.find_spec("animal_mnist") is None:
        print(f"animal_mnist cannot be imported ({wheels}): the demo study and two benchmarks need it. Carry the "
              f"wheels: pip download --no-deps animal-mnist==0.4 pytest-xdist==3.8.0 execnet==2.1.2 -d .whl, and "
              f"name .whl in the device call's carry", file=sys.stderr)
        return 2
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device here: run `python bench/gpu_check.py --tiny --skip_tests` (or GPU_CHECK_TINY=1 make "
              "gpu-check) for a dry run on the CPU", file=sys.stderr)
        return 2
    torch.set_num_threads(os.cpu_count() or 1)
    header = [f"gpu-check ({'tiny dry run' if args.tiny else 'real sizes'}), {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
              f"machine: {machine()}", f"set-up: {wheels}", f"budget {args.budget_s:.0f} s; steps in order:"]
    outcomes: list[Outcome] = []
    scratch = Path(tempfile.mkdtemp(prefix="kc-gpu-check-"))
    summary = folder / "summary.txt"

    out = os.environ.get("OUT")

    def write_summary(total: float | None = None) -> None:
        """summary.txt, and its copy in $OUT after every step: what was measured comes back even if the
        run is cut off later."""
        lines = header + [o.line() for o in outcomes]
        if total is not None:
            bad = [o.name for o in outcomes if o.rc not in (0,)]
            lines.append(f"total {total:.1f} s; " + (f"NOT OK: {', '.join(bad)}" if bad else "all steps OK"))
        summary.write_text("\n".join(lines) + "\n")
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            shutil.copy(summary, Path(out) / "summary.txt")

    try:
        t0 = time.perf_counter()
        sizes = (128, 64, 8, 8) if args.tiny else (4096, 1024, 64, 14)
        ceiling = write_planted(scratch / "planted.h5", *sizes)
        outcomes.append(Outcome("planted", 0, time.perf_counter() - t0,
                                f"{sizes[0]}+{sizes[1]} rows of {sizes[2]}x{sizes[3]}x{sizes[3]}, R² ceiling {ceiling:.3f}"))
        def budgeted(step: Step) -> Outcome:
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 10:
                return Outcome(step.name, None, 0.0, "skipped: the budget is spent")
            timeout = step.timeout_s * (4 if args.tiny else 1)            # a shared CPU is slow to start
            return run_step(step, folder, min(timeout, left))

        # The benchmarks run first, alone; then the suite beside the three fits (they check R², not
        # speed); then the demo study.
        suite: dict[str, Outcome] = {}
        beside = None
        for step in build_steps(args, folder, scratch):
            if step.name == "tests":
                outcomes.append(Outcome("tests", None, 0.0, "running"))
                beside = threading.Thread(target=lambda st=step: suite.__setitem__("tests", budgeted(st)))
                beside.start()
                continue
            if beside is not None and not step.name.startswith("fit-"):
                beside.join()
                beside = None
                outcomes[next(i for i, o in enumerate(outcomes) if o.name == "tests")] = suite["tests"]
                print(suite["tests"].line(), flush=True)
            outcomes.append(budgeted(step))
            print(outcomes[-1].line(), flush=True)
            if step.name == "fit-bf16":
                outcomes.append(agreement(outcomes, scratch))
                print(outcomes[-1].line(), flush=True)
            write_summary()
        if beside is not None:
            beside.join()
            outcomes[next(i for i, o in enumerate(outcomes) if o.name == "tests")] = suite["tests"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        write_summary(time.perf_counter() - t_start)
        print(summary.read_text())
        if out:                     # the logs and JSON files, whatever happened above
            with tarfile.open(Path(out) / "gpu-check.tar.gz", "w:gz") as tar:
                tar.add(folder, arcname=folder.name)
    return 0 if all(o.rc == 0 for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
