#!/usr/bin/env python
"""Trans-Net fitting throughput: pure compute vs a real epoch from a feature file vs a per-sample
pickle loader like the original's, measured in one run.

    python bench/transnet.py                                   # CPU-sized default (~1-2 min on 2 cores)
    python bench/transnet.py --device cuda --n 5994 --channels 512 --size 28 --pickle_n 512
                                                               # CUB-size vgg16_bn features.30 on a GPU

1. **Compute ceiling**: forward+backward+Adam step of the Trans-Net on device-resident float32
   random tensors, contiguous slices, no data path at all.
2. **Real epoch**: the fit's own batch source from a kc-features file written here (fp16, one sample
   per chunk, as ``extract`` writes it): features placed by ``--data_on`` (auto: GPU memory when they
   fit, else pinned RAM, else HDF5 blocks), shuffled, gathered on the device. Also the HDF5-block
   (disk) path unless ``--no-disk``.
3. **Per-sample pickles**: one pickle per sample (both nets' maps), read by a shuffling DataLoader
   with ``--workers`` processes, as the original did; timed on ``--pickle_n`` samples and scaled to N.

Every path runs in the fit's arithmetic (``--precision``: TF32 flags and bf16 autocast on CUDA; default
bf16) with cuDNN's algorithm search. Prints compute/real (target >= 0.9 when the features fit in memory)
and the speed-up over pickles; writes ``bench/results/transnet.json`` (``peak_gpu_memory_mb``: the real
fit's peak, features placed and training; ``ceiling_peak_gpu_memory_mb``: the ceilings').
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from common.device import cudnn_autotune, float32_math, precision_autocast, use_device  # noqa: E402
from common.files import write_json  # noqa: E402
from common.provenance import now_utc, provenance  # noqa: E402
from features.store import create_features, init_root, init_split, mark_complete  # noqa: E402
from training.loop import make_scheduler  # noqa: E402
from transnet.data import BlockPairs, choose_placement, make_source, open_pair  # noqa: E402
from transnet.fit import COMPILE_MODES, FitConfig, compiled, lr_config, make_optimizer, train_epoch  # noqa: E402
from transnet.model import TransNet, TransNetConfig, n_parameters  # noqa: E402

LAYER = "features.30"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


POOL_ROWS = 32        # rows drawn once per net when the features are generated on the CPU


def random_blocks(n: int, shape: tuple[int, ...], dtype: str, device: torch.device, block: int,
                  seed: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Standard-normal rows ``(i, j, rows i..j-1)`` in blocks of ``block`` rows, in ``dtype``: drawn on the
    GPU when ``device`` is CUDA (every row its own), else tiled from a pool of :data:`POOL_ROWS` rows drawn
    once (rows repeat with that period: the timings do not depend on the values, and one CPU thread draws
    only ~50 M normals/s, which would take minutes at the CUB size)."""
    if device.type == "cuda":
        g = torch.Generator(device=device).manual_seed(seed)
        tdt = {"float16": torch.float16, "float32": torch.float32}[dtype]
        for i in range(0, n, block):
            j = min(n, i + block)
            yield i, j, torch.randn((j - i,) + shape, generator=g, device=device, dtype=tdt).cpu().numpy()
        return
    pool = np.random.default_rng(seed).standard_normal((min(POOL_ROWS, n),) + shape, dtype=np.float32).astype(dtype)
    tile = pool[np.arange(min(block, n)) % len(pool)]          # one block of rows, reused for every block
    for i in range(0, n, block):
        j = min(n, i + block)
        yield i, j, tile[: j - i]


def write_feature_file(path: Path, n: int, c: int, s: int, dtype: str, device: torch.device,
                       block: int = 256) -> float:
    """Random (N, C, S, S) maps for nets A and B (:func:`random_blocks`), written in blocks of ``block``
    rows into datasets laid out as ``extract`` writes them; returns seconds."""
    t0 = time.perf_counter()
    with h5py.File(path, "w") as f:
        init_root(f, "synthetic", {"preset": "bench"}, s, "bench/transnet.py")
        init_split(f, "train", np.arange(n), np.zeros(n, dtype=np.int64))
        for k, net in enumerate(("A", "B")):
            ds = create_features(f, "train", net, LAYER, (n, c, s, s), dtype, {"arch": "synthetic", "layer": LAYER})
            for i, j, rows in random_blocks(n, (c, s, s), dtype, device, block, seed=k):
                ds.write_direct(np.ascontiguousarray(rows), dest_sel=np.s_[i:j])
            mark_complete(ds)
    return time.perf_counter() - t0


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated since the last reset, in MiB (None off CUDA)."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class Trainer:
    """A Trans-Net, its optimiser and schedule: the fit's own pieces."""

    def __init__(self, args, device: torch.device, steps: int):
        torch.manual_seed(0)
        self.device = device
        self.model = TransNet(TransNetConfig(args.channels, args.orders, args.kernel, "instance")).to(device)
        self.cl = device.type == "cuda" and args.channels_last
        if self.cl:
            self.model = self.model.to(memory_format=torch.channels_last)
        cfg = FitConfig(features="-", source="A", target="B", layer=LAYER, epochs=1000, batch_size=args.batch_size)
        self.opt = make_optimizer(self.model, cfg)
        self.sched = make_scheduler(self.opt, lr_config(cfg), steps)
        self.precision = args.precision
        self.steps = steps
        self.step = compiled(self.model, args.compile)          # the fit's --compile

    def epoch(self, batches) -> tuple[float, int]:
        _sync(self.device)
        t0 = time.perf_counter()
        st = train_epoch(self.model, self.step, self.opt, self.sched, batches, [0.1] * self.model.orders, 1.0,
                         self.device, self.precision, self.cl, self.steps, "bench")
        float(st["loss_sum"])                      # the per-epoch sync the fit does too
        _sync(self.device)
        return time.perf_counter() - t0, st["rows"]


class ConvCeiling(Trainer):
    """The Trans-Net's convolutions alone: ``orders + 1`` bias-free k x k convolutions of C channels in a
    chain, forward, backward and Adam, at the fit's precision and memory format; no normaliser, gates,
    ReLUs or data path. What the fit could reach if everything but its convolutions were free."""

    def __init__(self, args, device: torch.device, steps: int):
        super().__init__(args, device, steps)
        c, k = args.channels, args.kernel
        self.convs = nn.Sequential(*[nn.Conv2d(c, c, k, padding=k // 2, bias=False)
                                     for _ in range(args.orders + 1)]).to(device)
        if self.cl:
            self.convs = self.convs.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.convs.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

    def epoch(self, batches) -> tuple[float, int]:
        _sync(self.device)
        t0 = time.perf_counter()
        rows = 0
        for xa, xb in batches:
            if self.cl:
                xa = xa.contiguous(memory_format=torch.channels_last)
            with precision_autocast(self.device, self.precision):
                y = self.convs(xa)
            loss = F.mse_loss(y.float(), xb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            rows += xa.shape[0]
        _sync(self.device)
        return time.perf_counter() - t0, rows


def timed(trainer: Trainer, make_batches, epochs: int) -> dict:
    trainer.epoch(make_batches(0))                 # warm-up (allocator, cudnn autotuning)
    times, rows = [], 0
    for e in range(epochs):
        dt, rows = trainer.epoch(make_batches(e + 1))
        times.append(dt)
    med = float(np.median(times))
    return {"epoch_s": med, "epoch_s_min": min(times), "epoch_s_all": times, "rows_per_epoch": rows,
            "samples_per_s": rows / med}


class PickleDir(Dataset):
    """The original's layout: one pickle per sample holding both nets' maps."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.n = folder, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        with open(self.folder / f"{i}.pkl", "rb") as f:
            d = pickle.load(f)
        return torch.from_numpy(d["a"]), torch.from_numpy(d["b"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=512, help="samples (CUB train: 5994)")
    p.add_argument("--channels", type=int, default=64, help="channels (vgg16_bn features.30: 512)")
    p.add_argument("--size", type=int, default=8, help="map side (features.30 at 224 px: 28)")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--orders", type=int, default=2)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per measurement (after one warm-up)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="feature file dtype")
    p.add_argument("--device", default="auto")
    p.add_argument("--data_on", default="auto", choices=["auto", "device", "ram", "disk"])
    p.add_argument("--precision", default="bf16", choices=("fp32", "tf32", "bf16"),
                   help="the fit's --precision on CUDA (TF32 flags, bf16 autocast), for every path alike")
    p.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", default="off", choices=COMPILE_MODES, help="the fit's --compile (torch.compile mode)")
    p.add_argument("--disk", action=argparse.BooleanOptionalAction, default=True, help="also time the HDF5-block path")
    p.add_argument("--block_rows", type=int, default=256)
    p.add_argument("--pickle_n", type=int, default=512, help="samples for the pickle baseline (scaled to --n)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the pickle baseline")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--tmp", default=None, help="scratch folder (default: a temp dir on the local disk)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "transnet.json"))
    args = p.parse_args(argv)
    device = use_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    arithmetic = contextlib.ExitStack()            # every path in the fit's arithmetic and cuDNN search
    arithmetic.enter_context(float32_math(device, args.precision))
    arithmetic.enter_context(cudnn_autotune(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scratch = Path(tempfile.mkdtemp(prefix="kc-bench-transnet-", dir=args.tmp))
    n, c, s, b = args.n, args.channels, args.size, args.batch_size
    steps = n // b if n >= b else 1
    result: dict = {"bench": "transnet", "created_utc": now_utc(), "provenance": provenance(device),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "settings": vars(args), "feature_mb": 2 * n * c * s * s * np.dtype(args.dtype).itemsize / 2**20}
    try:
        # ---- the feature file
        path = scratch / "features.h5"
        result["write_s"] = write_feature_file(path, n, c, s, args.dtype, device, args.block_rows)
        result["write_mb_per_s"] = 2 * n * c * s * s * np.dtype(args.dtype).itemsize / 1e6 / max(result["write_s"], 1e-9)
        info = open_pair(path, "A", "B", LAYER, "train")

        # ---- 1. compute ceiling: device-resident float32, contiguous slices
        t0 = time.perf_counter()
        gen = torch.Generator(device=device).manual_seed(1)          # drawn where they are used
        xa = torch.randn(n, c, s, s, generator=gen, device=device)
        xb = torch.randn(n, c, s, s, generator=gen, device=device)
        _sync(device)
        result["setup_s"] = result["write_s"] + time.perf_counter() - t0
        tr = Trainer(args, device, steps)
        result["n_parameters"] = n_parameters(tr.model)

        def pure(_e, xa=xa, xb=xb):
            gb = min(b, n)
            return ((xa[i * gb:(i + 1) * gb], xb[i * gb:(i + 1) * gb]) for i in range(steps))

        result["compute"] = timed(tr, pure, args.epochs)
        result["conv"] = timed(ConvCeiling(args, device, steps), pure, args.epochs)
        del pure, xa, xb, tr                       # (pure's defaults held the tensors too)
        if device.type == "cuda":                  # the real path sees the free memory a fit would
            torch.cuda.empty_cache()
            result["ceiling_peak_gpu_memory_mb"] = peak_gpu_mb(device)
            torch.cuda.reset_peak_memory_stats(device)

        # ---- 2. real epoch from the file (the fit's placement and batch source)
        placement = choose_placement(info.nbytes, device, args.data_on)
        t0 = time.perf_counter()
        src = make_source(info, device, placement, args.block_rows)
        _sync(device)
        result["load_s"] = time.perf_counter() - t0
        tr = Trainer(args, device, src.steps(b))
        result["real"] = {"placement": placement,
                          **timed(tr, lambda e: src.batches(b, 0, e), args.epochs)}
        result["peak_gpu_memory_mb"] = peak_gpu_mb(device)    # the fit's own: features placed, training
        del src
        if args.disk and placement != "disk":
            src = BlockPairs(info, device, args.block_rows)
            tr = Trainer(args, device, src.steps(b))
            result["disk"] = timed(tr, lambda e: src.batches(b, 0, e), args.epochs)

        # ---- 3. per-sample pickles + DataLoader (the original's loader); a failure here (worker start-up,
        # shared memory) keeps the figures above
        pk, pn = None, min(args.pickle_n, n)
        try:
            pdir = scratch / "pickles"
            pdir.mkdir()
            with h5py.File(path) as f:
                a_ds, b_ds = f[f"train/A/{LAYER}"], f[f"train/B/{LAYER}"]
                for i in range(pn):
                    with open(pdir / f"{i}.pkl", "wb") as fh:
                        pickle.dump({"a": a_ds[i].astype(np.float32), "b": b_ds[i].astype(np.float32)}, fh)
            loader = DataLoader(PickleDir(pdir, pn), batch_size=b, shuffle=True, num_workers=args.workers,
                                drop_last=pn > b, pin_memory=device.type == "cuda",
                                persistent_workers=args.workers > 0, generator=torch.Generator().manual_seed(0))
            psteps = len(loader)
            tr = Trainer(args, device, psteps)

            def from_pickles(_e):
                return ((x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in loader)

            pk = timed(tr, from_pickles, args.epochs)
            pk["samples_timed"] = pn
            pk["epoch_s_scaled_to_n"] = pk["epoch_s"] * (n / max(pk["rows_per_epoch"], 1))
            result["pickle"] = pk
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            result["pickle"] = {"error": f"{type(e).__name__}: {e}"}

        # ---- summary
        real_s = result["real"]["epoch_s"]
        result["compute_over_real"] = result["compute"]["epoch_s"] / real_s
        result["conv_over_real"] = result["conv"]["epoch_s"] / real_s     # the fit's fraction of the conv ceiling
        if pk is not None:
            result["speedup_over_pickles"] = pk["epoch_s_scaled_to_n"] / real_s
        if "disk" in result:
            result["compute_over_disk"] = result["compute"]["epoch_s"] / result["disk"]["epoch_s"]
            if pk is not None:
                result["disk_speedup_over_pickles"] = pk["epoch_s_scaled_to_n"] / result["disk"]["epoch_s"]
        result["minutes_for_1000_epochs"] = real_s * 1000 / 60
    finally:
        arithmetic.close()
        shutil.rmtree(scratch, ignore_errors=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    dev = result["provenance"].get("device_name", str(device))
    print(f"Trans-Net K={args.orders} k={args.kernel} on {n} x {c}x{s}x{s} ({args.dtype} file, "
          f"{result['feature_mb']:.0f} MB for both nets), batch {b}, {dev}:")
    print(f"  compute ceiling       {result['compute']['epoch_s']:.3f} s/epoch ({result['compute']['samples_per_s']:.0f} samples/s)")
    print(f"  convolutions alone    {result['conv']['epoch_s']:.3f} s/epoch -> the real epoch runs at "
          f"{result['conv_over_real']:.2f} of the speed of its {args.orders + 1} {args.kernel}x{args.kernel} convolutions alone")
    print(f"  real epoch ({result['real']['placement']:>9}) {real_s:.3f} s/epoch  -> compute/real = "
          f"{result['compute_over_real']:.2f} (target >= 0.9 in memory); load {result['load_s']:.2f} s")
    if "disk" in result:
        print(f"  HDF5 blocks (disk)    {result['disk']['epoch_s']:.3f} s/epoch  -> compute/disk = "
              f"{result['compute_over_disk']:.2f}")
    if pk is not None:
        print(f"  per-sample pickles    {pk['epoch_s_scaled_to_n']:.3f} s/epoch (timed on {pn}, {args.workers} workers) "
              f"-> speed-up {result['speedup_over_pickles']:.1f}x")
    else:
        print(f"  per-sample pickles    failed: {result['pickle']['error']}")
    peak = result["peak_gpu_memory_mb"]
    print(f"  set-up {result['setup_s']:.1f} s (feature file {result['write_s']:.1f} s, "
          f"{result['write_mb_per_s']:.0f} MB/s); peak GPU memory of the real fit "
          + (f"{peak:.0f} MiB" if peak is not None else "- (CPU)"))
    print(f"  1000 epochs: {result['minutes_for_1000_epochs']:.1f} min; wrote {out}")
    return result


if __name__ == "__main__":
    main()
