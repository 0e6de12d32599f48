"""Linear CKA matrices side by side with peer libraries: the project's ``cli.py similarity`` against
ckatorch, pytorch-cka and torch-cka on the same stored features, each a whole timed process.

    python bench/similarity_peers.py                       # 5 nets, N=4,000, 8,192 dims (512x4x4), ~10 min
    python bench/similarity_peers.py --quick               # smoke run: N=400, 1,024 dims, seconds
    python bench/similarity_peers.py --compare_tree ../old-checkout --repeat 2

Installs nothing. The peers are the ones of ``requirements-bench.txt``, installed beside the
runtime requirements with ``python -m pip install --no-deps -r requirements-bench.txt`` (without
their dependencies: pip must not replace the pinned torch); a peer that is not importable is
listed as skipped. Steps, all in one run:

1. One kc-features file in a temporary folder (``features.store``: init_root, init_split,
   create_features, mark_complete; float16 storage, as ``extract`` writes by default) with ``--nets``
   nets of correlated random features at one layer of shape (C, 4, 4), C·16 = ``--dims``: net i is
   ``c_i · relu(z with its dims permuted + s_i · noise + 0.1·i)`` for one shared standard normal z,
   noise levels s_i from 0.3 to 2.5 (at the full size biased CKA 0.68-0.87, unbiased 0.03-0.60),
   scales c_i (CKA is scale-invariant) and non-zero means (the centring matters).
2. The machine's float64 GEMM rate, best of 3 of a 4096x4096 product, with scipy's BLAS ``dgemm``
   (the BLAS the project calls) and torch's ``mm`` (the one the peers call), before and after the
   timed processes (the machine may be shared); the rate used is the fastest of the four.
3. ``--repeat`` rounds (each starting one tool later than the last) of separate child processes,
   each timed by wall clock in this process from its start to its exit (interpreter start,
   imports, reading the HDF5 file, computing, writing); the best of the rounds is reported:
   the project (``python cli.py similarity --features F --layer L --nets ... --metric
   cka,cka_unbiased --permutations 0 --out_dir D`` run in ``--tree``, its default form choice, its
   ``similarity.json`` read back); the same in ``--compare_tree`` when given; and each peer route
   below in a child that reads the file with h5py alone (no project import) into float64 arrays.
   Peak RSS and CPU seconds of each child come from ``wait4``, the 1-min load average at its start
   from ``os.getloadavg`` (a load above the CPU count means another job took part of the machine).
4. Every peer matrix is compared with the project's (max |difference| over the 5x5 entries, per
   estimator); more than ``--tol`` (1e-6) fails the run (exit status 1, after writing the JSON).

Peer routes (float64 throughout: every peer computes float64 inputs in float64; ckatorch casts its
inputs to float64 itself; the model APIs of pytorch-cka and torch-cka need
``torch.set_default_dtype(torch.float64)``, set in their children, because they create buffers in
the default dtype: torch-cka's HSIC builds float32 ``ones`` vectors and then refuses the product
with a float64 Gram):

- ``ckatorch:cka_base``: the documented function, ``ckatorch.cka_base(x_i, x_j, kernel="linear",
  unbiased=False|True)`` per pair i < j and per estimator (20 calls for 5 nets, two n x n Grams
  each; the diagonal is 1 by definition). Biased and unbiased.
- ``ckatorch:grams``: the fastest route through ckatorch's exported functions, one Gram per net
  (``ckatorch.linear_kernel``), centred once per estimator (``ckatorch.center_gram_matrix(K,
  unbiased)``), then ``<Kc_i, Kc_j> / (|Kc_i| |Kc_j|)``, the formula of ``cka_base``'s default
  ``method="fro_norm"``. Biased and unbiased.
- ``pytorch-cka:cka_from_features``: its pre-extracted-features API, ``cka.cka_from_features(xs,
  xs)`` with the list of the nets' (n, d) tensors: the whole matrix in one call (Grams of both
  lists: 10 for 5 nets). Unbiased only (the HSIC estimator of Song et al. / Nguyen et al.; no
  biased CKA in the library); values clamped to [0, 1].
- ``pytorch-cka:compute_cka``: its model API, ``cka.compute_cka(m, m, loader, layers=[...])`` with
  one model whose layers pick each net's features out of the input and a DataLoader of the
  stacked features in one batch of all n samples (exact, not minibatch); the same model on both
  sides takes its shared-Gram path (5 Grams, ``hsic_cross``). Unbiased only. Its HSIC accumulators
  are ``torch.zeros`` in the default dtype: float32 unless ``torch.set_default_dtype(torch.float64)``
  is set (as here), which costs ~1e-8 of agreement.
- ``torch-cka:compare``: its only API, ``torch_cka.CKA(m1, m2, model1_layers=[...],
  model2_layers=[...]).compare(loader, loader)`` with the same picking models and one batch of all
  n samples (minibatch HSIC with one batch is the full unbiased estimator). It forms one Gram per
  (row, column) net and each HSIC as ``trace(K @ L)`` with a full n x n x n product. Unbiased only.

The useful work of the project's computation: one symmetric rank-k Gram per net (``dsyrk``,
n·(n+1)/2·d multiply-adds ~ n²·d flops), so ``flop = nets·n²·d`` (the 15 Frobenius inner products,
2n² each, and the centring are left out: under 0.1% here). Each tool's fraction of the machine is
``flop / wall time / GEMM rate``, with the same flop count for every tool (a tool doing more
arithmetic only reaches a smaller fraction). Writes ``bench/results/similarity_peers.json``
(``similarity_peers_quick.json`` with ``--quick``): machine (cpu count, numpy's BLAS and the BLAS
libraries loaded at run time), versions, the command lines, every child's wall/CPU time, RSS and
matrices, the differences and the ratios.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLIT = "test"
LAYER = "features.30"
ESTIMATORS = ("cka", "cka_unbiased")
NOISE = (0.3, 0.6, 1.0, 1.5, 2.5)          # noise level per net (cycled for more nets)
SCALE = (1.0, 3.0, 0.5, 2.0, 0.25)         # scale per net
# route -> (importable module, distribution, estimators it gives)
PEERS = {
    "ckatorch:cka_base": ("ckatorch", "ckatorch", ESTIMATORS),
    "ckatorch:grams": ("ckatorch", "ckatorch", ESTIMATORS),
    "pytorch-cka:cka_from_features": ("cka", "pytorch-cka", ("cka_unbiased",)),
    "pytorch-cka:compute_cka": ("cka", "pytorch-cka", ("cka_unbiased",)),
    "torch-cka:compare": ("torch_cka", "torch-cka", ("cka_unbiased",)),
}


# --------------------------------------------------------------------------- the features file

def write_features(path: Path, n: int, shape: tuple[int, int, int], k: int, seed: int, block: int = 500) -> list[str]:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from features.store import create_features, init_root, init_split, mark_complete, open_features

    d = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    nets = [f"net{i}" for i in range(k)]
    perms = [rng.permutation(d) for _ in nets]
    with open_features(path, "w") as f:
        init_root(f, "random", {"name": "none"}, shape[-1], "bench/similarity_peers.py")
        init_split(f, SPLIT, np.arange(n), rng.integers(0, 10, n))
        dss = [create_features(f, SPLIT, name, LAYER, (n,) + shape, "float16", {"arch": "random"}) for name in nets]
        for s in range(0, n, block):
            z = rng.standard_normal((min(block, n - s), d), dtype=np.float32)
            for i, ds in enumerate(dss):
                x = z[:, perms[i]] + NOISE[i % len(NOISE)] * rng.standard_normal(z.shape, dtype=np.float32)
                x = SCALE[i % len(SCALE)] * np.maximum(x + 0.1 * i, 0.0)
                ds[s:s + len(z)] = x.reshape((len(z),) + shape).astype(np.float16)
        for ds in dss:
            mark_complete(ds)
    return nets


# --------------------------------------------------------------------------- machine

def gemm_rates(size: int = 4096, repeats: int = 3) -> dict[str, float]:
    """Best-of-``repeats`` float64 GEMM rate (GFLOP/s, 2·size³ flops) of scipy's dgemm and torch's mm."""
    import numpy as np
    import torch
    from scipy.linalg import blas

    rng = np.random.default_rng(0)
    a, b = rng.random((size, size)), rng.random((size, size))
    out = {}
    c = np.zeros((size, size), order="F")
    best = float("inf")
    for r in range(repeats + 1):                                              # the first is a warm-up
        t0 = time.perf_counter()
        c = blas.dgemm(1.0, a.T, b.T, beta=0.0, c=c, trans_b=1, overwrite_c=1)
        if r:
            best = min(best, time.perf_counter() - t0)
    out["scipy_dgemm"] = 2 * size ** 3 / best / 1e9
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    tc = torch.empty(size, size, dtype=torch.float64)
    best = float("inf")
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        torch.mm(ta, tb, out=tc)
        if r:
            best = min(best, time.perf_counter() - t0)
    out["torch_mm"] = 2 * size ** 3 / best / 1e9
    return out


def machine() -> dict:
    import numpy as np
    import scipy  # noqa: F401  (so that threadpoolctl sees its BLAS too)
    import torch

    info = {"cpu_count": os.cpu_count(), "sched_affinity": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(), "torch_mkl": torch.backends.mkl.is_available(),
            "torch_config": torch.__config__.show()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    try:
        info["numpy_config"] = np.show_config(mode="dicts").get("Build Dependencies", {})
    except Exception as e:                               # noqa: BLE001  (older numpy: no mode=)
        info["numpy_config"] = repr(e)
    try:
        from threadpoolctl import threadpool_info

        info["blas_runtime"] = [{k: v for k, v in d.items() if k in ("internal_api", "version", "num_threads",
                                                                     "threading_layer", "architecture", "filepath")}
                                for d in threadpool_info()]
    except ImportError:
        info["blas_runtime"] = "threadpoolctl not installed"
    return info


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "torch", "h5py", "ckatorch", "pytorch-cka", "torch-cka", "safetensors"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def git_version(tree: Path) -> str:
    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *a], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "not a git checkout"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# --------------------------------------------------------------------------- the peers (child side)

def read_nets(features: str, nets: list[str]) -> list:
    """The nets' features at LAYER as (n, d) float64 numpy arrays, read with h5py alone."""
    import h5py
    import numpy as np

    with h5py.File(features, "r") as f:
        dss = [f[f"{SPLIT}/{net}/{LAYER}"] for net in nets]
        return [np.asarray(ds[...], dtype=np.float64).reshape(ds.shape[0], -1) for ds in dss]


def picking_model(k: int):
    """A model whose layer ``n<i>`` outputs net i's (n, d) features from the stacked (n, k, d) input."""
    from torch import nn

    class Pick(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            self.i = i

        def forward(self, x):
            return x[:, self.i]

    class Nets(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for i in range(k):
                self.add_module(f"n{i}", Pick(i))

        def forward(self, x):
            return [getattr(self, f"n{i}")(x) for i in range(k)]

    return Nets().double().eval(), [f"n{i}" for i in range(k)]


def one_batch_loader(xs: list):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    stacked = torch.stack([torch.from_numpy(x) for x in xs], dim=1)            # (n, k, d) float64
    return DataLoader(TensorDataset(stacked), batch_size=stacked.shape[0], shuffle=False)


def setup_worker(what: str, features: str, n: int, shape: tuple[int, int, int], k: int, seed: int, result: str) -> None:
    """``setup``: write the features file, then machine information and the GEMM rates; ``gemm``: the rates."""
    out: dict = {}
    if what == "setup":
        t0 = time.perf_counter()
        out["nets"] = write_features(Path(features), n, shape, k, seed)
        out["write_features_s"] = time.perf_counter() - t0
        out["machine"] = machine()
    out["gemm"] = gemm_rates()
    Path(result).write_text(json.dumps(out, default=str))


def peer_worker(route: str, features: str, nets: list[str], result: str) -> None:
    import numpy as np
    import torch

    t_start = time.perf_counter()
    k = len(nets)
    out: dict = {"route": route, "torch_threads": torch.get_num_threads()}
    mats = {m: np.eye(k) for m in PEERS[route][2]}
    if route.startswith("ckatorch:"):
        import ckatorch

        out["import_s"] = time.perf_counter() - t_start
        xs = [torch.from_numpy(x) for x in read_nets(features, nets)]
        out["read_s"] = time.perf_counter() - t_start - out["import_s"]
        if route == "ckatorch:cka_base":
            for m in ESTIMATORS:
                for i in range(k):
                    for j in range(i + 1, k):
                        v = float(ckatorch.cka_base(xs[i], xs[j], kernel="linear", unbiased=m == "cka_unbiased"))
                        mats[m][i, j] = mats[m][j, i] = v
        else:
            grams = [ckatorch.linear_kernel(x) for x in xs]
            del xs
            for m in ESTIMATORS:
                centred = [ckatorch.center_gram_matrix(g, unbiased=m == "cka_unbiased") for g in grams]
                norms = [torch.linalg.norm(c, ord="fro") for c in centred]
                for i in range(k):
                    for j in range(i + 1, k):
                        v = float(centred[i].ravel().dot(centred[j].ravel()) / (norms[i] * norms[j]))
                        mats[m][i, j] = mats[m][j, i] = v
                del centred
    elif route.startswith("pytorch-cka:"):
        import cka

        if route == "pytorch-cka:compute_cka":
            torch.set_default_dtype(torch.float64)    # its HSIC accumulators are torch.zeros in the default dtype
        out["import_s"] = time.perf_counter() - t_start
        arrays = read_nets(features, nets)
        out["read_s"] = time.perf_counter() - t_start - out["import_s"]
        if route == "pytorch-cka:cka_from_features":
            xs = [torch.from_numpy(x) for x in arrays]
            mats["cka_unbiased"] = cka.cka_from_features(xs, xs).numpy().astype(np.float64)
        else:
            loader = one_batch_loader(arrays)
            del arrays
            model, layers = picking_model(k)
            (m,) = cka.compute_cka(model, model, loader, layers=layers, device="cpu", progress=False)
            mats["cka_unbiased"] = m.numpy().astype(np.float64)
    elif route == "torch-cka:compare":
        import torch_cka

        torch.set_default_dtype(torch.float64)        # its HSIC builds `ones` (and the result) in the default dtype
        out["import_s"] = time.perf_counter() - t_start
        arrays = read_nets(features, nets)
        out["read_s"] = time.perf_counter() - t_start - out["import_s"]
        loader = one_batch_loader(arrays)
        del arrays
        (m1, layers), (m2, _) = picking_model(k), picking_model(k)
        c = torch_cka.CKA(m1, m2, model1_name="nets_a", model2_name="nets_b",
                          model1_layers=layers, model2_layers=layers, device="cpu")
        c.compare(loader, loader)
        mats["cka_unbiased"] = c.export()["CKA"].numpy().astype(np.float64)
    else:
        raise SystemExit(f"unknown peer route {route!r}")
    out["dtype"] = "float64"
    out["compute_s"] = time.perf_counter() - t_start - out["import_s"] - out["read_s"]
    out["matrices"] = {m: a.tolist() for m, a in mats.items()}
    Path(result).write_text(json.dumps(out))


# --------------------------------------------------------------------------- timing children

def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run ``cmd`` as a child process; wall clock from before its start to after its exit, plus its
    peak RSS and CPU seconds (``wait4``). On Linux a child's peak RSS counts this process's RSS at
    the fork, so this process imports no numpy/torch and holds no arrays: the features file, the
    GEMM rates and the machine information come from a child of their own."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    load = os.getloadavg()
    with open(log, "w") as lf:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=cwd, stdout=lf, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace")[-3000:]
    return {"cmd": cmd, "cwd": str(cwd), "wall_s": wall, "returncode": p.returncode, "cpu_s": ru.ru_utime + ru.ru_stime,
            "peak_rss_mb": ru.ru_maxrss / 1024, "loadavg_before_after": [load, os.getloadavg()],
            "log_tail": tail if p.returncode else tail[-500:]}


def run_project(tree: Path, features: Path, nets: list[str], out_dir: Path, log: Path, permutations: int = 0) -> dict:
    cmd = [sys.executable, str(tree / "cli.py"), "similarity", "--features", str(features), "--layer", LAYER,
           "--split", SPLIT, "--nets", ",".join(nets), "--metric", ",".join(ESTIMATORS), "--permutations",
           str(permutations), "--out_dir", str(out_dir)]
    r = timed(cmd, tree, log)
    if r["returncode"] == 0:
        body = json.loads((out_dir / "similarity.json").read_text())
        if body["nets"] != nets:
            raise SystemExit(f"{tree}: similarity.json lists nets {body['nets']}, asked for {nets}")
        r["matrices"] = {m: body["metrics"][m]["matrix"] for m in ESTIMATORS}
        r["form"] = {m: body["metrics"][m].get("form") for m in ESTIMATORS}
        r["warnings"] = body.get("warnings", [])
    return r


def run_peer(route: str, features: Path, nets: list[str], result: Path, log: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer", route, "--features", str(features),
           "--net_names", ",".join(nets), "--result", str(result)]
    r = timed(cmd, ROOT, log)
    if r["returncode"] == 0:
        r.update(json.loads(result.read_text()))
    return r


def max_diff(a: list, b: list) -> float | None:
    """max |a - b| over two matrices (lists of rows); None where either has an undefined value (None,
    NaN) or the shapes differ. Pure Python: this process stays small (see ``timed``)."""
    if len(a) != len(b) or any(len(ra) != len(rb) for ra, rb in zip(a, b)):
        return None
    d = [abs(x - y) if x is not None and y is not None else math.nan for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return None if not all(math.isfinite(v) for v in d) else max(d)


# --------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=None, help="samples (default 4000; --quick: 400)")
    ap.add_argument("--dims", type=int, default=None, help="features per sample, C*4*4 (default 8192; --quick: 1024)")
    ap.add_argument("--nets", type=int, default=5, help="nets in the matrix")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of timed processes (the best wall time is reported)")
    ap.add_argument("--peers", default=",".join(PEERS), help="comma list of peer routes to time (of: %(default)s; "
                    "'none' for none)")
    ap.add_argument("--tree", default=str(ROOT), help="project checkout whose cli.py is timed (default: this one)")
    ap.add_argument("--compare_tree", default="", help="a second project checkout timed in the same run (optional)")
    ap.add_argument("--null", type=int, default=0, help="also time the project with this many permutations of the "
                    "null (its default is 100; the peers compute none), reported beside the like-for-like run")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest |difference| accepted between tools")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", default="", help="copy the features file here (default: it is deleted)")
    ap.add_argument("--out", default=None, help="JSON written (default bench/results/similarity_peers.json, "
                    "similarity_peers_quick.json with --quick)")
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    ap.add_argument("--features", help=argparse.SUPPRESS)
    ap.add_argument("--net_names", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--setup", choices=("setup", "gemm"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        peer_worker(args.peer, args.features, args.net_names.split(","), args.result)
        return
    if args.setup:
        c = args.dims // 16
        setup_worker(args.setup, args.features, args.n, (c, 4, 4), args.nets, args.seed, args.result)
        return

    n = args.n or (400 if args.quick else 4000)
    dims = args.dims or (1024 if args.quick else 8192)
    if dims % 16:
        sys.exit(f"--dims {dims}: must be a multiple of 16 (the layer is C x 4 x 4)")
    if args.nets < 2 or n < 5 or args.repeat < 1:
        sys.exit("--nets must be >= 2, --n >= 5, --repeat >= 1")
    shape = (dims // 16, 4, 4)
    out_path = Path(args.out or ROOT / "bench" / "results" /
                    ("similarity_peers_quick.json" if args.quick else "similarity_peers.json"))
    routes = [] if args.peers == "none" else [r for r in args.peers.split(",") if r]
    unknown = [r for r in routes if r not in PEERS]
    if unknown:
        sys.exit(f"unknown peer route(s) {', '.join(unknown)}; valid: {', '.join(PEERS)}")
    installed = {r for r in routes if importlib.util.find_spec(PEERS[r][0]) is not None}
    skipped = {r: f"{PEERS[r][1]} is not importable (python -m pip install --no-deps -r requirements-bench.txt)"
               for r in routes if r not in installed}
    trees = {"project": Path(args.tree).resolve()}
    if args.compare_tree:
        trees["compare_tree"] = Path(args.compare_tree).resolve()
    null_label = f"project (null {args.null})" if args.null > 0 else ""
    for label, tree in trees.items():
        if not (tree / "cli.py").is_file():
            sys.exit(f"--{'tree' if label == 'project' else 'compare_tree'} {tree}: no cli.py there")
    for r, why in skipped.items():
        print(f"skipping {r}: {why}")

    flop = args.nets * n * n * dims
    body: dict = {"benchmark": "similarity_peers",
                  "command": [sys.executable] + sys.argv,
                  "what": f"{args.nets}x{args.nets} linear CKA matrices (biased and unbiased) over N={n} samples x "
                          f"{dims} dims ({'x'.join(map(str, shape))} layer, float16 storage), each tool a whole "
                          f"child process timed by wall clock from its start to its exit",
                  "sizes": {"n": n, "dims": dims, "layer_shape": list(shape), "nets": args.nets, "repeat": args.repeat,
                            "quick": args.quick, "seed": args.seed},
                  "flop": flop, "flop_formula": "nets * n^2 * d: one symmetric rank-k Gram (dsyrk, n(n+1)/2*d "
                  "multiply-adds) per net; Frobenius products and centring left out",
                  "tolerance": args.tol,
                  "trees": {k: {"path": str(t), "version": git_version(t)} for k, t in trees.items()},
                  "versions": versions(), "skipped": skipped}
    print(f"{args.nets} nets, N={n}, {dims} dims; useful work {flop / 1e9:.1f} GFLOP; timing "
          + ", ".join(list(trees) + [r for r in routes if r in installed]))
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="kc-bench-peers-") as tmp:
        tmp = Path(tmp)
        features = tmp / "features.h5"

        def setup(what: str) -> dict:
            res = tmp / f"{what}.json"
            r = timed([sys.executable, str(Path(__file__).resolve()), "--setup", what, "--features", str(features),
                       "--n", str(n), "--dims", str(dims), "--nets", str(args.nets), "--seed", str(args.seed),
                       "--result", str(res)], ROOT, tmp / f"{what}.log")
            if r["returncode"]:
                sys.exit(f"the {what} child failed (exit {r['returncode']}):\n{r['log_tail']}")
            return json.loads(res.read_text())

        s = setup("setup")
        nets, gemm = s["nets"], [s["gemm"]]
        body["machine"] = s["machine"]
        body["write_features_s"] = s["write_features_s"]
        body["features_file_mb"] = features.stat().st_size / 2 ** 20
        print(f"GEMM float64 (4096^2, best of 3): scipy dgemm {gemm[0]['scipy_dgemm']:.1f} GFLOP/s, "
              f"torch mm {gemm[0]['torch_mm']:.1f} GFLOP/s")
        tools = list(trees) + ([null_label] if null_label else []) + [r for r in routes if r in installed]
        for rnd in range(args.repeat):
            # each round starts one tool later, so that no tool is always the first (or last) to run
            for label in tools[rnd % len(tools):] + tools[:rnd % len(tools)]:
                stem = tmp / f"{label.replace(':', '_')}-{rnd}"
                if label in trees:
                    r = run_project(trees[label], features, nets, stem, stem.with_suffix(".log"))
                elif label == null_label:
                    stem = tmp / f"project-null-{rnd}"
                    r = run_project(trees["project"], features, nets, stem, stem.with_suffix(".log"), args.null)
                else:
                    r = run_peer(label, features, nets, stem.with_suffix(".json"), stem.with_suffix(".log"))
                runs.setdefault(label, []).append(r)
                load = r["loadavg_before_after"][0][0]
                print(f"  round {rnd + 1}: {label:<32} {r['wall_s']:8.1f} s  (load {load:.1f})"
                      + ("" if r["returncode"] == 0 else f"  FAILED (exit {r['returncode']}):\n{r['log_tail']}"))
        runs = {label: runs[label] for label in tools}
        gemm.append(setup("gemm")["gemm"])
        if args.keep:
            import shutil

            shutil.copy(features, args.keep)
    rate = max(max(g.values()) for g in gemm)
    body["gemm_gflops"] = {"before": gemm[0], "after": gemm[1], "used": rate,
                           "note": "4096x4096 float64, 2*4096^3 flops, best of 3 each; the fastest is used"}

    ref = runs["project"][0].get("matrices") if runs["project"][0]["returncode"] == 0 else None
    results: dict[str, dict] = {}
    failures: list[str] = []
    for label, rs in runs.items():
        ok = [r for r in rs if r["returncode"] == 0]
        res: dict = {"runs": rs, "ok": len(ok) == len(rs)}
        if not ok:
            failures.append(f"{label} failed")
            results[label] = res
            continue
        best = min(r["wall_s"] for r in ok)
        res.update({"wall_s": best, "wall_s_all": [r["wall_s"] for r in rs],
                    "fraction_of_gemm": flop / best / 1e9 / rate,
                    "matrices": ok[0]["matrices"]})
        if ref is not None:
            diffs = {m: [max_diff(r["matrices"][m], ref[m]) for r in ok] for m in ok[0]["matrices"]}
            res["max_abs_diff"] = {m: None if None in ds else max(ds) for m, ds in diffs.items()}
            bad = {m: d for m, d in res["max_abs_diff"].items() if d is None or d > args.tol}
            if bad:
                failures.append(f"{label} differs from the project by " + ", ".join(
                    f"{'undefined values' if d is None else f'{d:.2e}'} ({m})" for m, d in bad.items())
                    + f" > {args.tol:g}")
        results[label] = res
    proj = results["project"].get("wall_s")
    for res in results.values():
        if proj and res.get("wall_s"):
            res["ratio_to_project"] = res["wall_s"] / proj
    peer_times = {k: v["wall_s"] for k, v in results.items() if k in PEERS and v.get("wall_s")}
    if peer_times and proj:
        fastest = min(peer_times, key=peer_times.get)
        body["fastest_peer"] = {"route": fastest, "wall_s": peer_times[fastest],
                                "speedup_of_project": peer_times[fastest] / proj}
        if "compare_tree" in results and results["compare_tree"].get("wall_s"):
            body["fastest_peer"]["speedup_of_compare_tree"] = peer_times[fastest] / results["compare_tree"]["wall_s"]
    body["results"] = results
    body["failures"] = failures

    print(f"\n{'tool':<32}{'wall s':>9}{'ratio':>8}{'|diff| cka':>13}{'|diff| unb.':>13}{'of GEMM':>9}"
          f"{'CPU s':>8}{'load':>6}{'RSS MB':>8}")
    for label, res in results.items():
        if not res.get("wall_s"):
            print(f"{label:<32}{'failed':>9}")
            continue
        dif = res.get("max_abs_diff", {})
        best_run = min((r for r in res["runs"] if r["returncode"] == 0), key=lambda r: r["wall_s"])
        def fmt(m: str, dif: dict = dif) -> str:
            return f"{'-':>13}" if m not in dif else f"{'undefined':>13}" if dif[m] is None else f"{dif[m]:13.1e}"

        print(f"{label:<32}{res['wall_s']:9.2f}{res.get('ratio_to_project', float('nan')):8.2f}"
              f"{fmt('cka')}{fmt('cka_unbiased')}{res['fraction_of_gemm']:9.3f}"
              f"{best_run['cpu_s']:8.1f}{best_run['loadavg_before_after'][0][0]:6.1f}"
              f"{max(r['peak_rss_mb'] for r in res['runs']):8.0f}")
    print(f"wall s: best of {args.repeat}; ratio = tool wall time / project wall time; of GEMM = "
          f"{flop / 1e9:.1f} GFLOP / wall time / {rate:.1f} GFLOP/s (float64 GEMM of this machine, measured in "
          f"this run); CPU s, load (1-min load average at its start; {os.cpu_count()} CPUs) of the best run")

    def faster(x: float) -> str:
        return f"{x:.2f}x faster than" if x >= 1 else f"{1 / x:.2f}x slower than"

    if "fastest_peer" in body:
        fp = body["fastest_peer"]
        print(f"fastest peer: {fp['route']} ({fp['wall_s']:.1f} s); the project is {faster(fp['speedup_of_project'])} "
              f"it" + (f", --compare_tree {faster(fp['speedup_of_compare_tree'])} it" if "speedup_of_compare_tree" in fp
                       else ""))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(body, indent=2, allow_nan=False, default=str))
    print(f"wrote {out_path}")
    if failures:
        print("FAILED: " + "; ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
