"""Extraction throughput as a ratio to its two ceilings, all measured in the same run.

(a) forward: the nets' extractors up to the layer on one device-resident batch, repeated (no data
    loading, no copies back, no writes);
(b) disk: the same bytes (same datasets, dtype, one sample per chunk, pre-allocated) written with h5py
    from host memory into the same folder, timed until the file is closed and synced (``fsync``, as the
    extraction syncs before it marks a dataset complete); (b') the same with HDF5's fletcher32 checksum
    on every row (chunks allocated as written), as ``extract`` writes by default: the checksum's cost is
    reported as (b') / (b);
(c) extraction: ``features.extract.extract_features`` over ``--n`` images (loading, host<->device
    copies, the non-finite checks, the writer thread, flushes and the progress bookkeeping): a synthetic
    data set of ready tensors (``--data synthetic``), or the real Animal-MNIST training images resized to
    ``--image_size`` (``--data animal-mnist``), read through the DataLoader (``--data_on loader``: decoded
    and resized every run), from the decoded-once uint8 cache held on the device (``device``; the cache
    is built before the timed runs, its seconds reported as ``decode_once_s``), or both in turn (``both``:
    (c) is the faster, each path's figure kept);
(d) the non-finite check alone (``features.nonfinite.value_range`` on the device-resident outputs of (a)),
    reported as its time relative to the forward pass of (a).
(a), (b) and (c) are repeated ``--repeats`` times, interleaved, and the best of each is kept (the load
of a shared machine changes during a run). Prints (c) / min(a, b) in images (= net pairs for two nets) per second, and the peak RSS of an
extraction of N and of 4N images in fresh child processes (it must not grow with N). Writes
``bench/results/extract.json`` (one entry per device type, merged with earlier runs).

    python bench/extract.py                                  # CPU default: vgg16_bn features.30 at 32 px
    python bench/extract.py --device cuda --image_size 224 --n 8192 --batch_size 256 --precision bf16 \\
        --channels_last --num_workers 8                      # the GPU setting of design.md
    python bench/extract.py --data animal-mnist --data_on both   # real images: the loader vs the device cache
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.device import PRECISIONS, cudnn_autotune, float32_math, precision_autocast, use_device  # noqa: E402
from common.files import read_json, write_json  # noqa: E402
from common.provenance import provenance  # noqa: E402
from features import store  # noqa: E402
from features.extract import ExtractConfig, extract_features  # noqa: E402
from features.layers import build_extractor, output_shapes, resolve_layer  # noqa: E402
from features.nets import FeatureData, Net, build_feature_data  # noqa: E402
from features.nonfinite import value_range  # noqa: E402
from training.data import build_dataset, transform_spec  # noqa: E402
from training.datasets import DataSpec  # noqa: E402
from training.device_data import cached_images  # noqa: E402
from training.models import build_model  # noqa: E402

SPLIT = {"synthetic": "test", "animal-mnist": "train"}       # the split each --data extracts


class SyntheticImages(Dataset):
    """``n`` normalised random images (a pool of 32 reused by index), labels ``i % classes``; O(1) memory in n
    apart from the label array."""

    def __init__(self, n: int, channels: int, size: int, classes: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(32, channels, size, size, generator=g)
        self.labels = np.arange(n, dtype=np.int64) % classes
        self.num_classes = classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.pool[i % len(self.pool)], int(self.labels[i]), i


def make_nets(args) -> list[Net]:
    nets = []
    for k in range(args.nets):
        torch.manual_seed(k)
        model = build_model(args.arch, args.classes, 3, args.image_size).eval()
        nets.append(Net(name=f"net{k}", model=model, arch=args.arch, num_classes=args.classes,
                        checkpoint="", sha256=f"in-memory-seed{k}", input_size=args.image_size, in_channels=3))
    return nets


def make_data(args, n: int) -> FeatureData:
    if args.data == "animal-mnist":
        return build_feature_data(real_spec(args), ["train"], n)
    spec = {"name": "synthetic", "n": n, "image_size": args.image_size}
    tf = {"preset": "synthetic", "image_size": args.image_size, "channels": 3}
    return FeatureData("synthetic", spec, tf, args.image_size, 3, args.classes,
                       {"test": SyntheticImages(n, 3, args.image_size, args.classes)},
                       {"test": np.arange(n, dtype=np.int64) % args.classes})


def real_spec(args) -> DataSpec:
    return DataSpec(name="animal-mnist", transform="plain", image_size=args.image_size, channels=3)


def warm_cache(args) -> float:
    """Seconds to decode the whole real training split once into the image cache (0 when it exists)."""
    spec = real_spec(args)
    ds = build_dataset(spec, "train", train_transform=False)
    if ds.name != "animal-mnist" or len(ds) < args.n:
        raise SystemExit(f"--data animal-mnist has {len(ds)} training images; --n {args.n} is more")
    t0 = time.perf_counter()
    cached_images(ds, spec, transform_spec(spec), False, num_workers=args.num_workers)
    return time.perf_counter() - t0


def config(args, data_on: str = "loader") -> ExtractConfig:
    return ExtractConfig(split=SPLIT[args.data], dtype=args.dtype, batch_size=args.batch_size, device=args.device,
                         num_workers=args.num_workers, precision=args.precision, channels_last=args.channels_last,
                         checksum=args.checksum, data_on=data_on)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def forward_ceiling(args, nets: list[Net], device: torch.device, images: int) -> tuple[float, float]:
    """(a) images/s through every net's extractor, one resident batch, nothing else; and (d) images/s of
    the non-finite check on those outputs. With cuDNN's algorithm search, as the extraction has it."""
    with cudnn_autotune(device):
        return _forward_ceiling(args, nets, device, images)


@torch.no_grad()
def _forward_ceiling(args, nets: list[Net], device: torch.device, images: int) -> tuple[float, float]:
    exs = []
    for n in nets:
        ex = build_extractor(n.model, [resolve_layer(n.model, args.layer)]).to(device)
        if device.type == "cuda" and args.channels_last:
            ex = ex.to(memory_format=torch.channels_last)
        exs.append(ex)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if device.type == "cuda" and args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    steps = max(2, images // args.batch_size)

    def step():
        with float32_math(device, args.precision), precision_autocast(device, args.precision):
            for ex in exs:
                ex(x)

    for _ in range(2):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    forward = steps * args.batch_size / (time.perf_counter() - t0)
    with float32_math(device, args.precision), precision_autocast(device, args.precision):
        outs = [ex(x)[args.layer] for ex in exs]
    for _ in range(2):
        torch.stack([value_range(o) for o in outs])
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        torch.stack([value_range(o) for o in outs])
    sync(device)
    return forward, steps * args.batch_size / (time.perf_counter() - t0)


def write_ceiling(args, nets: list[Net], workdir: Path, n: int, checksum: bool = False) -> tuple[float, int]:
    """(b) images/s writing the same bytes as the extraction, one batch of host memory per write
    (``checksum``: with the fletcher32 filter, (b'))."""
    shape = output_shapes(build_extractor(nets[0].model, [resolve_layer(nets[0].model, args.layer)]),
                          (3, args.image_size, args.image_size))[args.layer]
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((args.batch_size,) + shape).astype(args.dtype)
    path = workdir / "write_ceiling.h5"
    t0 = time.perf_counter()
    with store.open_features(path, "w") as f:
        dss = [store.create_features(f, "test", n_.name, args.layer, (n,) + shape, args.dtype, {}, preallocate=True,
                                     checksum=checksum) for n_ in nets]
        for s in range(0, n, args.batch_size):
            e = min(n, s + args.batch_size)
            for ds in dss:
                ds.write_direct(batch[: e - s], dest_sel=np.s_[s:e])
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    seconds = time.perf_counter() - t0
    nbytes = n * len(nets) * int(np.prod(shape)) * np.dtype(args.dtype).itemsize
    path.unlink()
    return n / seconds, nbytes


def run_extraction(args, n: int, workdir: Path, nets: list[Net] | None = None, data_on: str = "loader") -> dict:
    nets = nets or make_nets(args)
    out = workdir / "extract.h5"
    res = extract_features(nets, make_data(args, n), [(args.layer, None)], out, config(args, data_on), "overwrite",
                           command="bench/extract.py")
    with store.open_features(out) as f:
        assert all(store.dataset_progress(f[f"{SPLIT[args.data]}/{x.name}/{args.layer}"]).complete for x in nets)
    out.unlink()
    return {"images_per_s": res.images_per_s, "seconds": res.seconds, "bytes": res.bytes_written,
            "data_on": res.data_on}


def child_rss(args, n: int, workdir: Path) -> dict:
    """Run one extraction of n images in a fresh process; its peak RSS from wait4's rusage."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--n", str(n), "--workdir", str(workdir)]
    for k in ("arch", "layer", "nets", "image_size", "batch_size", "dtype", "device", "num_workers", "classes",
              "precision", "data"):
        cmd += [f"--{k}", str(getattr(args, k))]
    cmd += [] if args.checksum else ["--no-checksum"]
    cmd += ["--channels_last"] if args.channels_last else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    text = proc.stdout.read()
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child extraction of {n} images failed: {text}")
    # ru_maxrss is in KiB on Linux; worker processes of the loader are not included (--num_workers 0 on CPU).
    return {"n": n, "peak_rss_mb": usage.ru_maxrss / 1024, **json.loads(text.strip().splitlines()[-1])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vgg16_bn")
    p.add_argument("--layer", default="features.30")
    p.add_argument("--nets", type=int, default=2, help="nets extracted together (a pair by default)")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--n", type=int, default=384, help="images of the extraction (c)")
    p.add_argument("--data", default="synthetic", choices=list(SPLIT),
                   help="synthetic tensors, or the real Animal-MNIST training images resized to --image_size")
    p.add_argument("--data_on", default="loader", choices=["loader", "device", "both"],
                   help="real images: read through the DataLoader, from the device-held cache, or both in turn")
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=ExtractConfig.precision, choices=list(PRECISIONS),
                   help="arithmetic on CUDA (as extract --precision)")
    p.add_argument("--amp", action="store_const", dest="precision", const="bf16", help="alias of --precision bf16")
    p.add_argument("--channels_last", action="store_true", help="channels_last (CUDA)")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=True,
                   help="the extraction (c) writes fletcher32 checksums (extract's default)")
    p.add_argument("--workdir", default=None, help="folder on the disk to measure (default: bench/results/scratch)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of (a), (b), (c); best of each")
    p.add_argument("--no_rss", action="store_true", help="skip the N / 4N peak-RSS runs")
    p.add_argument("--out_json", default=str(ROOT / "bench" / "results" / "extract.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.data == "synthetic" and args.data_on != "loader":
        raise SystemExit("--data_on device|both needs --data animal-mnist (synthetic tensors have no image cache)")
    workdir = Path(args.workdir or ROOT / "bench" / "results" / "scratch")
    workdir.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(run_extraction(args, args.n, workdir)))
        return
    device = use_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    nets = make_nets(args)
    paths = ["loader", "device"] if args.data_on == "both" else [args.data_on]
    decode_once_s = warm_cache(args) if "device" in paths else None
    fwds, disks, sums, checks = [], [], [], []
    exts: dict[str, list[dict]] = {p: [] for p in paths}
    try:
        for _ in range(args.repeats):  # interleaved, best of each: a shared machine's load varies over a run
            fwd, check = forward_ceiling(args, nets, device, args.n)
            fwds.append(fwd)
            checks.append(check)
            disk, nbytes = write_ceiling(args, nets, workdir, args.n)
            disks.append(disk)
            sums.append(write_ceiling(args, nets, workdir, args.n, checksum=True)[0])
            for path in paths:
                exts[path].append(run_extraction(args, args.n, workdir, nets, path))
        fwd, disk, check, summed = max(fwds), max(disks), max(checks), max(sums)
        best = {p: max(e, key=lambda r: r["images_per_s"]) for p, e in exts.items()}
        ext = max(best.values(), key=lambda r: r["images_per_s"])
        rss = [] if args.no_rss else [child_rss(args, args.n, workdir), child_rss(args, 4 * args.n, workdir)]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    ceiling = min(fwd, summed if args.checksum else disk)    # the disk ceiling of what (c) writes
    ratio = ext["images_per_s"] / ceiling
    result = {
        "setting": {k: getattr(args, k) for k in ("arch", "layer", "nets", "image_size", "n", "batch_size", "dtype",
                                                  "precision", "channels_last", "num_workers", "checksum", "data",
                                                  "data_on")},
        "device": str(device), "cpu_threads": torch.get_num_threads(), "provenance": provenance(device),
        "forward_images_per_s": fwd, "write_images_per_s": disk, "write_gb_per_s": nbytes / 1e9 * disk / args.n,
        "bytes_per_image": nbytes / args.n, "extract_images_per_s": ext["images_per_s"],
        "extract_seconds": ext["seconds"], "extract_data_on": ext["data_on"],
        "extract_images_per_s_by_data_on": {p: r["images_per_s"] for p, r in best.items()},
        "decode_once_s": decode_once_s, "bound": "forward" if fwd < (summed if args.checksum else disk) else "disk",
        "ratio_to_ceiling": ratio, "ratio_to_min_forward_plain_write": ext["images_per_s"] / min(fwd, disk),
        "write_checksum_images_per_s": summed, "checksum_write_cost": summed / disk, "check_images_per_s": check,
        "check_time_over_forward": fwd / check,
        # peak GPU memory of (a), (b), (c) in this process, MiB (None on the CPU)
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "rss": rss, "repeats": {"forward": fwds, "write": disks, "write_checksum": sums,
                                **{f"extract_{p}": [r["images_per_s"] for r in e] for p, e in exts.items()},
                                "check": checks},
    }
    if rss:
        result["rss_growth_4n_over_n"] = rss[1]["peak_rss_mb"] / rss[0]["peak_rss_mb"]
    out = Path(args.out_json)
    body = read_json(out) if out.exists() else {}
    body.setdefault("runs", {})[device.type] = result
    body["note"] = ("images/s; for two nets one image = one net pair. ratio_to_ceiling = extraction / min(forward, "
                    "write of what the extraction writes: with fletcher32 checksums unless --no-checksum), all "
                    "measured in the same run on the same device and disk; writes timed until synced.")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, body)
    print(f"{args.arch} {args.layer} x{args.nets} nets, {args.image_size} px, {args.n} images, {args.dtype}, {device}:")
    print(f"  (a) forward   {fwd:9.1f} images/s")
    print(f"  (b) write     {disk:9.1f} images/s ({result['write_gb_per_s']:.2f} GB/s, "
          f"{result['bytes_per_image'] / 1e6:.3f} MB/image)")
    print(f"  (b') write with fletcher32 {summed:9.1f} images/s: (b')/(b) = {summed / disk:.3f}")
    for p, r in best.items():
        print(f"  (c) extract   {r['images_per_s']:9.1f} images/s ({'with' if args.checksum else 'without'} checksums, "
              f"{args.data} inputs from the {p})")
    if decode_once_s is not None:
        print(f"  the image cache: {decode_once_s:.1f} s to decode the training split once (0: it existed)")
    print(f"  extraction / min(a, {'b' + chr(39) if args.checksum else 'b'}) = {ratio:.2f} ({result['bound']}-bound); "
          f"/ min(a, b) = {result['ratio_to_min_forward_plain_write']:.2f}")
    print(f"  (d) non-finite check {check:9.1f} images/s: {fwd / check:.4f} of the forward time")
    if result["peak_gpu_memory_mb"] is not None:
        print(f"  peak GPU memory {result['peak_gpu_memory_mb']:.0f} MiB")
    for r in rss:
        print(f"  peak RSS, {r['n']:6d} images: {r['peak_rss_mb']:.0f} MB")
    if rss:
        print(f"  RSS(4N) / RSS(N) = {result['rss_growth_4n_over_n']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
