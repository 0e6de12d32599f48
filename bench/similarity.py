"""Exact linear CKA streamed from a kc-features file: throughput as a ratio to the float64
matrix-multiply rate of the machine measured in the same run, and memory independent of N.

    python bench/similarity.py                          # N=10,000 (and N=2,500) of a 512x4x4 layer
    python bench/similarity.py --n 40000 --small_n 10000 --out /tmp/sim.json

For each N a fresh child process (so peak RSS is its own) writes two nets' features into a temporary
kc-features file (float16, one sample per chunk, written block by block): ``a`` standard normal,
``b = a with its channels permuted + equal-variance independent noise`` (population CKA 0.5). It then
measures the float64 GEMM rate (scipy BLAS ``dgemm``, the routine the CKA accumulators call) and
computes CKA of the pair in the feature-space form (``analysis.cka.pair_moments``, form
``features``): three streaming passes over row blocks (x with itself, y with itself, the pair), each
holding one p x p (or p x q) float64 matrix whatever N is. Reported: samples/s, achieved GFLOP/s
(N·p² + N·q² + 2·N·p·q: two symmetric rank-k updates and one GEMM), their ratio to the GEMM rate,
and the peak RSS at both N. At the small N the Gram form (memory O(N²)) is run as a cross-check.
Writes ``bench/results/similarity.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def gemm_gflops(size: int = 2048, repeats: int = 3) -> float:
    """Best-of-``repeats`` float64 GEMM rate (C += A B, the call the CKA accumulators make)."""
    from scipy.linalg import blas

    rng = np.random.default_rng(0)
    a, b = rng.random((size, size)), rng.random((size, size))
    c = np.zeros((size, size), order="F")
    c = blas.dgemm(1.0, a.T, b.T, beta=1.0, c=c, trans_b=1, overwrite_c=1)     # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        c = blas.dgemm(1.0, a.T, b.T, beta=1.0, c=c, trans_b=1, overwrite_c=1)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best / 1e9


def write_pair(path: Path, n: int, shape: tuple[int, int, int], seed: int, block: int = 500) -> None:
    from features.store import create_features, init_root, init_split, mark_complete, open_features

    c = shape[0]
    rng = np.random.default_rng(seed)
    perm = rng.permutation(c)
    with open_features(path, "w") as f:
        init_root(f, "random", {"name": "none"}, shape[-1], "bench/similarity.py")
        init_split(f, "test", np.arange(n), np.zeros(n))
        da = create_features(f, "test", "a", "layer", (n,) + shape, "float16", {"arch": "random"})
        db = create_features(f, "test", "b", "layer", (n,) + shape, "float16", {"arch": "random"})
        for s in range(0, n, block):
            a = rng.standard_normal((min(block, n - s),) + shape, dtype=np.float32)
            da[s:s + len(a)] = a.astype(np.float16)
            db[s:s + len(a)] = (a[:, perm] + rng.standard_normal(a.shape, dtype=np.float32)).astype(np.float16)
        mark_complete(da)
        mark_complete(db)


def worker(n: int, shape: tuple[int, int, int], check_gram: bool, seed: int) -> dict:
    from analysis.cka import cka_from_moments, pair_moments
    from features.store import get_features, open_features

    p = int(np.prod(shape))
    with tempfile.TemporaryDirectory(prefix="kc-bench-sim-") as tmp:
        path = Path(tmp) / "features.h5"
        t0 = time.perf_counter()
        write_pair(path, n, shape, seed)
        write_s = time.perf_counter() - t0
        gemm_before = gemm_gflops()
        rss_before = rss_mb()
        with open_features(path) as f:
            da, db = get_features(f, "test", "a", "layer"), get_features(f, "test", "b", "layer")
            t0 = time.perf_counter()
            xy, xx, yy = pair_moments(da, db, form="features")
            secs = time.perf_counter() - t0
            out = {"n": n, "shape": list(shape), "dims": p, "file_mb": path.stat().st_size / 2 ** 20,
                   "write_s": write_s, "cka_s": secs, "samples_per_s": n / secs,
                   "gflop": (n * p * p + n * p * p + 2 * n * p * p) / 1e9,   # syrk x, syrk y, gemm xy
                   "cka": cka_from_moments(xy, xx, yy), "cka_unbiased": cka_from_moments(xy, xx, yy, unbiased=True),
                   "rss_before_cka_mb": rss_before, "peak_rss_mb": peak_rss_mb()}
            out["working_mb"] = out["peak_rss_mb"] - rss_before
            # the machine is shared: the GEMM rate is measured before and after, the ratio is to the faster
            gemm_after = gemm_gflops()
            out["gemm_gflops_before_after"] = [gemm_before, gemm_after]
            out["gemm_gflops"] = max(gemm_before, gemm_after)
            out["gflops"] = out["gflop"] / secs
            out["ratio_to_gemm"] = out["gflops"] / out["gemm_gflops"]
            if check_gram:
                t0 = time.perf_counter()
                g = pair_moments(da, db, form="gram")
                out["gram_check"] = {"cka": cka_from_moments(*g), "seconds": time.perf_counter() - t0,
                                     "abs_diff": abs(cka_from_moments(*g) - out["cka"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="samples of the measured run")
    ap.add_argument("--small_n", type=int, default=2_500, help="samples of the run compared for memory (0: skip)")
    ap.add_argument("--shape", default="512,4,4", help="C,H,W of the layer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "similarity.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--check_gram", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    if args.worker:
        print(json.dumps(worker(args.n, shape, args.check_gram, args.seed)))
        return

    from common.files import write_json
    from common.provenance import provenance

    runs = []
    for n in [m for m in (args.small_n, args.n) if m]:
        cmd = [sys.executable, __file__, "--worker", "--n", str(n), "--shape", args.shape, "--seed", str(args.seed)]
        if n == args.small_n:
            cmd.append("--check_gram")
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if res.returncode:
            sys.exit(f"worker for N={n} failed:\n{res.stderr}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        runs.append(r)
        print(f"N={n:>6}  {r['cka_s']:6.1f} s  {r['samples_per_s']:7.0f} samples/s  {r['gflops']:5.1f} GFLOP/s = "
              f"{r['ratio_to_gemm']:.2f} x GEMM ({r['gemm_gflops']:.1f} GFLOP/s)  peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(working {r['working_mb']:.0f} MB)  "
              f"CKA {r['cka']:.4f} (unbiased {r['cka_unbiased']:.4f}, population 0.5)"
              + (f"  Gram-form check |diff| {r['gram_check']['abs_diff']:.1e}" if "gram_check" in r else ""))
    big = runs[-1]
    p = big["dims"]
    summary = {
        "what": "exact linear CKA (feature-space form, float64) of two nets streamed from a kc-features file",
        "layer_shape": list(shape), "n": big["n"], "samples_per_s": big["samples_per_s"], "gflops": big["gflops"],
        "gemm_gflops": big["gemm_gflops"], "ratio_to_gemm": big["ratio_to_gemm"],
        "peak_rss_mb": {str(r["n"]): r["peak_rss_mb"] for r in runs},
        "working_mb": {str(r["n"]): r["working_mb"] for r in runs},
        "state_mb": 8 * p * p / 2 ** 20,
        "note": "peak RSS includes the interpreter, torch and h5py (a few hundred MB); working_mb = peak RSS - "
                "RSS before the CKA: one p x p float64 matrix, a few 64 MB row blocks and the feature file's chunk "
                "cache (at most 64 MB), independent of N",
    }
    if len(runs) == 2:
        summary["peak_rss_ratio"] = runs[1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
        summary["n_ratio"] = runs[1]["n"] / runs[0]["n"]
    body = {"benchmark": "similarity", "summary": summary, "runs": runs, "cpu_count": os.cpu_count(),
            "provenance": provenance("cpu")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, body)
    print(f"throughput {summary['ratio_to_gemm']:.2f} x the GEMM rate; peak RSS "
          + ", ".join(f"N={k}: {v:.0f} MB" for k, v in summary["peak_rss_mb"].items()) + f"; wrote {args.out}")


if __name__ == "__main__":
    main()
