"""Training throughput of the loop as a ratio to pure compute, measured in the same run.

(a) pure compute: forward + backward + optimiser step of the model on one device-resident batch,
    repeated (no data loading, no logging);
(b) the loop: ``training.loop.train`` over the real data set (loading, transforms, host->device copies,
    loss bookkeeping, progress, checkpoint), timed by the loop itself at its last epoch (``--epochs``, 2
    by default, so that first-use costs of the allocator and the kernels fall in the untimed first
    epoch), with the images where ``--data_on`` says: ``loader`` (a DataLoader decoding on the CPU),
    ``device`` (the uint8 cache of ``training/device_data.py`` held on the device and augmented there)
    or ``auto`` (the training command's rule).
Prints (b) / (a) and writes ``bench/results/train_throughput.json``.

    python bench/train_throughput.py                          # CPU default: vgg_small, animal-mnist, 32 px
    python bench/train_throughput.py --arch resnet18 --image_size 224 --device cuda --n 8192
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from torch.utils.data import Subset  # noqa: E402

from common.device import autocast, use_device  # noqa: E402
from common.provenance import provenance  # noqa: E402
from common.rundir import RunDir  # noqa: E402
from training.data import build_dataset, maybe_cache, transform_spec  # noqa: E402
from training.datasets import DataSpec  # noqa: E402
from training.device_data import DATA_ON, DeviceLoader, cached_images, choose_data_on, estimated_bytes  # noqa: E402
from training.loop import TrainConfig, train  # noqa: E402
from training.models import build_model  # noqa: E402


def pure_compute(model, batch, classes, device, cfg: TrainConfig, steps: int) -> float:
    x = torch.randn(batch.shape, device=device)
    y = torch.randint(0, classes, (batch.shape[0],), device=device)
    if device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step():
        with autocast(device, cfg.amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="animal-mnist")
    p.add_argument("--data_root", default=None)
    p.add_argument("--arch", default="vgg_small")
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--transform", default="plain")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--n", type=int, default=4096, help="training images in the timed epoch")
    p.add_argument("--epochs", type=int, default=2,
                   help="epochs of the loop; the last one is timed (1: the first epoch, warm-up included)")
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--data_on", default="auto", choices=DATA_ON,
                   help="the images: loader (CPU DataLoader), device (uint8 cache on the device), auto")
    p.add_argument("--warm_cache", action=argparse.BooleanOptionalAction, default=True,
                   help="time a steady-state epoch (deterministic transforms are cached after epoch 1)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = p.parse_args()

    device = use_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    spec = DataSpec(args.dataset, args.data_root, args.transform, args.image_size)
    tspec = transform_spec(spec)
    raw_train, raw_test = build_dataset(spec, "train"), build_dataset(spec, "test")
    n = min(args.n, len(raw_train))
    where = choose_data_on(args.data_on, estimated_bytes(n + 256, tspec), device)
    classes = raw_test.num_classes
    if where == "device":
        (tr, tr_aug), (te, te_aug) = (cached_images(d, spec, tspec, t) for d, t in ((raw_train, True), (raw_test, False)))
        train_set = DeviceLoader(tr[:n], raw_train.labels[:n], tr_aug, tspec, args.batch_size, device, shuffle=True,
                                 drop_last=n > args.batch_size)
        test_set = DeviceLoader(te[:256], raw_test.labels[:256], te_aug, tspec, 256, device)
        x0 = next(iter(test_set))[0][0]
    else:
        train_set = Subset(maybe_cache(raw_train, spec, True, args.num_workers), range(n))
        test_set = Subset(raw_test, range(256))
        x0 = train_set[0][0]
    if args.epochs < 1:
        p.error(f"--epochs must be at least 1, got {args.epochs}")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.01, device=str(device),
                      num_workers=args.num_workers, schedule="constant")

    torch.manual_seed(0)
    model = build_model(args.arch, classes, x0.shape[0], args.image_size).to(device)
    steps = max(5, min(50, n // args.batch_size))
    pure = pure_compute(model, torch.empty(args.batch_size, *x0.shape), classes, device, cfg, steps)

    torch.manual_seed(0)
    model = build_model(args.arch, classes, x0.shape[0], args.image_size)
    if args.warm_cache and where == "loader":  # what every epoch after the first sees with a deterministic transform
        for i in range(len(train_set)):
            train_set[i]
    with tempfile.TemporaryDirectory() as tmp, RunDir(Path(tmp) / "run") as run:
        res = train(model, train_set, test_set, cfg, run, {"arch": args.arch, "num_classes": classes,
                    "dataset": {}, "transform": {}, "config": {}})
    rates = [h["train_images_per_s"] for h in res.history if "train_images_per_s" in h]
    loop = rates[-1]
    out = {"bench": "train_throughput", "arch": args.arch, "dataset": args.dataset, "image_size": args.image_size,
           "batch_size": args.batch_size, "n_images": n, "data_on": where, "warm_cache": args.warm_cache, "num_workers": args.num_workers,
           "epochs": args.epochs,
           "pure_images_per_s": pure, "loop_images_per_s": loop, "loop_first_epoch_images_per_s": rates[0], "ratio": loop / pure,
           "overhead_percent": 100 * (pure / loop - 1), "threads": torch.get_num_threads(),
           # peak GPU memory of both measurements, MiB (None on the CPU)
           "peak_gpu_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
           "provenance": provenance(device)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"{args.arch} @ {args.image_size}px on {device} (data on {where}): pure compute {pure:.0f} img/s, loop {loop:.0f} img/s, "
          f"ratio {loop / pure:.3f} (overhead {out['overhead_percent']:.1f}%)"
          + (f", peak GPU memory {out['peak_gpu_memory_mb']:.0f} MiB" if out["peak_gpu_memory_mb"] is not None else "")
          + f" -> {args.out}")


if __name__ == "__main__":
    main()
