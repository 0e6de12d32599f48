#!/usr/bin/env python
"""A consistency matrix's Trans-Nets fitted one by one vs together (``transnet/group_fit.py``), measured
in one run against the ceiling of the grouped step alone.

    python bench/group_fit.py                      # the demo's size on the CPU: 12 pairs of 64 x 4x4
    python bench/group_fit.py --device cuda        # the same on a GPU (the issue's goal: <= 5 s)

The problem is the demo study's: ``--pairs`` fits at one layer of ``--channels`` x ``--size`` x ``--size``
maps, ``--n`` training rows (``--val_fraction`` of them validation rows), the paper's build (2 orders,
3x3, instance norm), Adam at the demo's schedule for ``--epochs`` epochs, batch ``--batch_size``;
features on the device. The feature file is written here (random maps, one net per pair source and
target).

1. **Separate**: ``fit_transnet`` for every pair (the harness, validation, checkpoints, reports).
2. **Together**: ``fit_group`` over the same pairs (the same outputs; each pair equal to its separate fit).
3. **Ceiling**: the grouped model's forward, backward and Adam step alone on device-resident tensors,
   as many steps as the fits take, no harness, no data path.
4. With ``--also_compile MODE``: the fits together once more under ``--compile MODE`` (``cudagraphs``
   on CUDA: the launch-bound step replayed as CUDA graphs), compilation included.

Prints the seconds of each, separate/together (the speed-up) and ceiling/together (the fraction of
the grouped step's speed that the whole fit keeps); writes ``bench/results/group_fit.json`` with the
peak GPU memory.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.device import cudnn_autotune, float32_math, precision_autocast, use_device  # noqa: E402
from common.files import write_json  # noqa: E402
from common.provenance import now_utc, provenance  # noqa: E402
from common.rundir import read_log  # noqa: E402
from features.store import create_features, init_root, init_split, mark_complete  # noqa: E402
from training.loop import make_scheduler  # noqa: E402
from transnet.config import COMPILE_MODES  # noqa: E402
from transnet.fit import FitConfig, fit_transnet, lr_config, make_optimizer  # noqa: E402
from transnet.group_fit import FitJob, fit_group  # noqa: E402
from transnet.grouped import GroupedTransNet  # noqa: E402
from transnet.model import TransNet, TransNetConfig  # noqa: E402

LAYER = "conv"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--pairs", type=int, default=12, help="Trans-Nets of the matrix (the demo fits 12)")
    p.add_argument("--channels", type=int, default=64, help="channels of both nets' maps")
    p.add_argument("--size", type=int, default=4, help="H = W of the maps")
    p.add_argument("--n", type=int, default=2000, help="training rows (the demo's train_rows)")
    p.add_argument("--n_test", type=int, default=256, help="rows of the held-out split")
    p.add_argument("--epochs", type=int, default=25, help="epochs of every fit (the demo's 25)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"))
    p.add_argument("--also_compile", default="off", choices=COMPILE_MODES,
                   help="also time the fits together under this --compile mode (off: no extra run)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "group_fit.json"), help="JSON result file")
    return p.parse_args(argv)


def write_features(path: Path, nets: int, n: int, n_test: int, c: int, hw: int) -> None:
    g = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        init_root(f, "random", {"preset": "random"}, hw, "bench/group_fit.py")
        for split, rows in (("train", n), ("test", n_test)):
            init_split(f, split, np.arange(rows), np.zeros(rows, dtype=np.int64))
            for k in range(nets):
                ds = create_features(f, split, f"n{k}", LAYER, (rows, c, hw, hw), "float32",
                                     {"arch": "random", "layer": LAYER})
                ds[...] = g.standard_normal((rows, c, hw, hw), dtype=np.float32)
                mark_complete(ds)


def ceiling_s(cfg: FitConfig, k: int, c: int, hw: int, n_fit: int, device: torch.device) -> float:
    """The grouped step alone, as many steps as the fits take, in the fits' arithmetic: their precision
    (TF32 flags, bf16 autocast), channels_last on CUDA and cuDNN's algorithm search."""
    with float32_math(device, cfg.precision), cudnn_autotune(device):
        return _ceiling_s(cfg, k, c, hw, n_fit, device)


def _ceiling_s(cfg: FitConfig, k: int, c: int, hw: int, n_fit: int, device: torch.device) -> float:
    torch.manual_seed(0)
    model = GroupedTransNet([TransNet(TransNetConfig(c, cfg.orders, cfg.kernel, cfg.input_norm))
                             for _ in range(k)]).to(device)
    layout = torch.channels_last if device.type == "cuda" and cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    opt = make_optimizer(model, cfg)
    steps = max(1, n_fit // cfg.batch_size)
    sched = make_scheduler(opt, lr_config(cfg), steps)
    x = torch.randn(steps * cfg.batch_size, k * c, hw, hw, device=device).contiguous(memory_format=layout)
    y = torch.randn_like(x)
    alphas = torch.tensor([0.1] * cfg.orders, device=device)

    def epoch() -> None:
        for s in range(steps):
            sl = slice(s * cfg.batch_size, (s + 1) * cfg.batch_size)
            with precision_autocast(device, cfg.precision):
                yhat = model(x[sl])
            loss = (model.pair_mse(yhat, y[sl]) + model.pair_penalties(alphas)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    epoch()                                   # warm-up (kernels chosen, allocator primed)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        epoch()
    sync(device)
    return time.perf_counter() - t0


def epochs_after_the_first_s(folder: Path) -> float:
    """Training seconds of every epoch but the first (where compilation, CUDA-graph capture and cuDNN's
    algorithm search fall), summed over the pairs' log.jsonl: fits trained together each log their share
    of the group's epoch, so the sum is the group's time."""
    return sum(float(r.get("epoch_time_s", 0.0)) for log in sorted(folder.glob("p*/log.jsonl"))
               for r in read_log(log) if r.get("epoch", 0) >= 2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = use_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    k = args.pairs
    cfg = FitConfig(orders=2, kernel=3, input_norm="instance", alpha="0.1", epochs=args.epochs, lr=0.01,
                    final_lr=1e-4, batch_size=args.batch_size, eval_every=args.epochs, save_every=args.epochs,
                    val_fraction=args.val_fraction, device=str(device), precision=args.precision, data_on="auto")
    n_fit = args.n - round(args.val_fraction * args.n)
    ceiling = ceiling_s(cfg, k, args.channels, args.size, n_fit, device)   # first: it also warms CUDA up
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        path = root / "features.h5"
        write_features(path, k + 1, args.n, args.n_test, args.channels, args.size)
        jobs = [FitJob(replace(cfg, features=str(path), source=f"n{i}", target=f"n{i + 1}", layer=LAYER),
                       root / "together" / f"p{i}") for i in range(k)]
        t0 = time.perf_counter()
        for j in jobs:
            fit_transnet(j.cfg, root / "separate" / j.out_dir.name)
        separate = time.perf_counter() - t0
        t0 = time.perf_counter()
        fit_group(jobs)
        together = time.perf_counter() - t0
        together_later = epochs_after_the_first_s(root / "together")
        compiled_s = compiled_later = compiled_error = None
        if args.also_compile != "off":
            t0 = time.perf_counter()
            try:                                # the eager figures are kept whatever happens here
                fit_group([replace(j, cfg=replace(j.cfg, compile=args.also_compile),
                                   out_dir=root / "compiled" / f"p{i}") for i, j in enumerate(jobs)])
                compiled_s = time.perf_counter() - t0
                compiled_later = epochs_after_the_first_s(root / "compiled")
            except Exception as e:  # noqa: BLE001 - reported in the JSON
                compiled_error = f"{type(e).__name__}: {e}"
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    res = {"pairs": k, "channels": args.channels, "size": args.size, "n": args.n, "epochs": args.epochs,
           "batch_size": args.batch_size, "precision": args.precision, "device": str(device),
           "separate_s": separate, "together_s": together, "ceiling_s": ceiling,
           "speedup": separate / together, "ceiling_over_together": ceiling / together,
           "also_compile": args.also_compile, "together_compiled_s": compiled_s,
           "together_epochs_after_the_first_s": together_later, "compiled_epochs_after_the_first_s": compiled_later,
           "compiled_error": compiled_error,
           "peak_gpu_memory_mb": peak, "machine": platform.node(), "when": now_utc(), "provenance": provenance()}
    print(f"{k} Trans-Nets of {args.channels}x{args.size}x{args.size}, {args.n} rows, {args.epochs} epochs on {device}: "
          f"separate {separate:.1f} s, together {together:.1f} s (x{res['speedup']:.2f}; epochs after the first "
          f"{together_later:.1f} s); the grouped step alone {ceiling:.1f} s, ceiling/together "
          f"{res['ceiling_over_together']:.2f}"
          + (f"; together under --compile {args.also_compile} {compiled_s:.1f} s (epochs after the first "
             f"{compiled_later:.1f} s)" if compiled_s is not None else "")
          + (f"; --compile {args.also_compile} failed: {compiled_error}" if compiled_error else "")
          + (f"; peak GPU memory {peak:.0f} MiB" if peak is not None else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
