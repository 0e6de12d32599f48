"""Features from any framework into a ``kc-features`` v1 file (``import-features``).

    python cli.py import-features --net clip=clip_feats.npz --net dino:blocks.11=dino_b11.npy \\
        --ids ids.npy --labels labels.npy --split test --tokens grid --prefix_tokens 1 --out features.h5

Sources (one ``--net`` item each):
- ``NAME=FILE`` with FILE a ``.npz``, ``.pt`` (a dict of tensors/arrays, loaded ``weights_only``) or
  ``.safetensors`` file: every key is a layer of net NAME except the sample ids (``--ids_key``, default
  ``index``) and labels (``--labels_key``, default ``label``); a key ``logits`` becomes the net's logits.
- ``NAME:LAYER=FILE``: one layer; FILE a ``.npy`` array, or a dict file holding key LAYER.

Arrays per sample: (C, H, W) maps are stored as they are; (D,) vectors as (D, 1, 1); (T, C) token
sequences need ``--tokens`` (``grid``: the patch tokens as a (C, H, W) grid with ``--prefix_tokens`` P
leading tokens dropped, ``grid+prefix``: also ``<layer>.prefix``, ``sequence``: (C, T, 1)), through the
same :class:`features.tokens.TokenMap` as ``extract``. Sample ids and labels come from each net's file
or from ``--ids`` / ``--labels`` (``.npy``). Every net must hold the same ids in the same order (the
first mismatch is named); the rows are written in that order.

Each dataset records ``source: "import-features"``, the source file, its key and sha256, and the
command; ``checkpoint`` is empty, so ``inspect``, ``fit-transnet``, ``similarity`` and the analysis read
the file like an extracted one.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.checkpoints import unpickling_detail
from common.errors import UserError, require_choice
from common.provenance import code_version, now_utc, sha256_file
from features import store
from features.config import DTYPES, TOKEN_MODES, ImportConfig  # re-exported: their old home
from features.nets import check_net_name
from features.nonfinite import check_storable, count_array, write_counts
from features.tokens import PREFIX_SUFFIX, TokenMap

SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class Source:
    net: str
    layer: str | None                # None: every array of the file
    path: Path


@dataclass
class NetArrays:
    """One net's arrays as found in its sources."""

    name: str
    ids: np.ndarray | None = None
    labels: np.ndarray | None = None
    layers: dict[str, tuple[np.ndarray, Path, str]] = field(default_factory=dict)   # layer -> (array, file, key)


# --------------------------------------------------------------------------- reading

def parse_source(item: str) -> Source:
    """``NAME=FILE`` or ``NAME:LAYER=FILE``."""
    head, sep, path = item.partition("=")
    if not sep or not head or not path:
        raise UserError(f"--net expects NAME=FILE or NAME:LAYER=FILE, got {item!r}")
    net, _, layer = head.partition(":")
    check_net_name(net)
    p = Path(path).expanduser()
    if p.suffix.lower() not in SUFFIXES:
        raise UserError(f"--net {item!r}: {p.name} is not one of {', '.join(SUFFIXES)}")
    if not p.is_file():
        raise UserError(f"--net {item!r}: {p} does not exist")
    if p.suffix.lower() == ".npy" and not layer:
        raise UserError(f"--net {item!r}: a .npy file holds one array; name its layer as {net}:LAYER={path}")
    return Source(net, layer or None, p)


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.npy`` (key ""), ``.npz``, ``.pt``/``.pth`` or ``.safetensors`` file as numpy."""
    suf = path.suffix.lower()
    try:
        if suf == ".npy":
            return {"": np.load(path, mmap_mode="r", allow_pickle=False)}
        if suf == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        if suf == ".safetensors":
            from safetensors.torch import load_file

            return {k: _np(v) for k, v in load_file(str(path)).items()}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # truncated, a pickle of objects, ...
        raise UserError(f"{path} cannot be read as arrays ({unpickling_detail(e)})") from e
    if isinstance(obj, torch.Tensor):
        return {"": _np(obj)}
    if not isinstance(obj, dict) or not all(isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values()):
        raise UserError(f"{path} holds a {type(obj).__name__}; import-features reads a tensor or a dict of tensors")
    return {str(k): _np(v) for k, v in obj.items()}


def _np(v: Any) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return np.asarray(v)


def gather(sources: Sequence[Source], cfg: ImportConfig, ids: np.ndarray | None = None,
           labels: np.ndarray | None = None) -> dict[str, NetArrays]:
    """The arrays of every net, its ids and labels (a file's own, else ``ids`` / ``labels``)."""
    nets: dict[str, NetArrays] = {}
    for s in sources:
        arrays = read_arrays(s.path)
        n = nets.setdefault(s.net, NetArrays(s.net))
        for key, target in ((cfg.ids_key, "ids"), (cfg.labels_key, "labels")):
            if key in arrays:
                _set_once(n, target, np.asarray(arrays.pop(key)).astype(np.int64), s.path)
        if s.layer is not None:
            key = "" if "" in arrays else s.layer
            if key not in arrays:
                raise UserError(f"--net {s.net}:{s.layer}: {s.path} has no array {s.layer!r}; it holds "
                                f"{', '.join(sorted(arrays)) or 'none'}")
            picked = {s.layer: (arrays[key], key)}
        else:
            picked = {k: (v, k) for k, v in arrays.items() if k}
            if not picked:
                raise UserError(f"{s.path} holds no layer arrays (only ids/labels)")
        for layer, (arr, key) in picked.items():
            if layer in n.layers:
                raise UserError(f"net {s.net!r} layer {layer!r} given twice ({n.layers[layer][1]} and {s.path})")
            n.layers[layer] = (arr, s.path, key)
    for n in nets.values():
        n.ids = n.ids if n.ids is not None else (None if ids is None else np.asarray(ids, dtype=np.int64))
        n.labels = n.labels if n.labels is not None else (None if labels is None else np.asarray(labels, np.int64))
        if n.ids is None:
            raise UserError(f"net {n.name!r}: no sample ids; put them in its file as {cfg.ids_key!r} or pass "
                            f"--ids FILE")
        if n.labels is None:
            raise UserError(f"net {n.name!r}: no labels; put them in its file as {cfg.labels_key!r} or pass "
                            f"--labels FILE")
    return nets


def _set_once(n: NetArrays, attr: str, value: np.ndarray, path: Path) -> None:
    old = getattr(n, attr)
    if old is not None and not np.array_equal(old, value):
        raise UserError(f"net {n.name!r}: its files disagree on the {attr} ({path} differs from an earlier file)")
    setattr(n, attr, value)


# --------------------------------------------------------------------------- checking

def check_aligned(nets: dict[str, NetArrays]) -> tuple[np.ndarray, np.ndarray]:
    """Every net holds the same sample ids in the same order (and the same labels); returns them."""
    first = next(iter(nets.values()))
    ids, labels = first.ids, first.labels
    if ids.ndim != 1 or len(ids) == 0:
        raise UserError(f"net {first.name!r}: the sample ids must be a non-empty 1-D array, got shape {ids.shape}")
    if len(np.unique(ids)) != len(ids):
        raise UserError(f"net {first.name!r}: sample ids repeat (e.g. {_first_repeat(ids)}); each row is one sample")
    for n in nets.values():
        for what, mine, ref in (("sample ids", n.ids, ids), ("labels", n.labels, labels)):
            if mine.shape != ref.shape:
                raise UserError(f"net {n.name!r} holds {len(mine)} {what}, net {first.name!r} {len(ref)}; every net "
                                f"needs the same samples in the same order")
            bad = np.flatnonzero(mine != ref)
            if len(bad):
                i = int(bad[0])
                raise UserError(f"net {n.name!r} is misaligned with net {first.name!r}: row {i} holds {what[:-1]} "
                                f"{mine[i]} where {first.name!r} holds {ref[i]} ({len(bad)} rows differ); reorder "
                                f"its rows to the same sample order")
        for layer, (arr, path, _key) in n.layers.items():
            if arr.shape[0] != len(ids):
                raise UserError(f"net {n.name!r} layer {layer!r} ({path}) has {arr.shape[0]} rows, its sample ids "
                                f"{len(ids)}")
    return ids, labels


def _first_repeat(ids: np.ndarray) -> int:
    vals, counts = np.unique(ids, return_counts=True)
    return int(vals[counts > 1][0])


def token_map(layer: str, shape: tuple[int, ...], cfg: ImportConfig) -> TokenMap | None:
    """The conversion of one array's per-sample ``shape`` to (C, H, W) (None: already a map, or logits)."""
    if layer == store.LOGITS:
        if len(shape) != 1:
            raise UserError(f"logits must be (N, num_classes), got per-sample shape {shape}")
        return None
    if len(shape) == 3:
        return None
    if len(shape) == 1:
        return TokenMap("vector->1x1")
    if len(shape) != 2:
        raise UserError(f"layer {layer!r}: per-sample shape {shape} is none of (C, H, W), (T, C), (D,)")
    t, p = int(shape[0]), int(cfg.prefix_tokens)
    if cfg.tokens == "none":
        raise UserError(f"layer {layer!r} is a token sequence ({t} tokens of {shape[1]} channels); pass --tokens "
                        f"grid (with --prefix_tokens and --grid), grid+prefix or sequence")
    if cfg.tokens == "sequence":
        return TokenMap("tokens->grid", (t, 1), 0)
    if cfg.grid:
        try:
            h, w = (int(v) for v in cfg.grid.lower().split("x"))
        except ValueError:
            raise UserError(f"--grid {cfg.grid!r} is not HxW (e.g. 14x14)") from None
    else:
        h = w = math.isqrt(max(t - p, 0))
    if p < 0 or h * w != t - p or h * w == 0:
        raise UserError(f"layer {layer!r}: {t} tokens minus {p} prefix tokens is not a {h}x{w} grid; set "
                        f"--prefix_tokens and --grid HxW")
    return TokenMap("tokens->grid", (h, w), p)


# --------------------------------------------------------------------------- writing

@dataclass
class ImportResult:
    out: Path
    rows: int
    datasets: list[str]


def import_features(sources: Sequence[Source], out: str | os.PathLike, cfg: ImportConfig = ImportConfig(),
                    ids: np.ndarray | None = None, labels: np.ndarray | None = None, overwrite: bool = False,
                    command: str = "") -> ImportResult:
    """Write the arrays of ``sources`` as one split of a new kc-features v1 file ``out`` (module doc)."""
    _validate(cfg)
    if not sources:
        raise UserError("no arrays to import: pass --net NAME=FILE (or NAME:LAYER=FILE) at least once")
    nets = gather(sources, cfg, ids, labels)
    row_ids, row_labels = check_aligned(nets)
    plan = []
    for n in nets.values():
        for layer, (arr, path, key) in n.layers.items():
            m = token_map(layer, tuple(arr.shape[1:]), cfg)
            plan.append((n.name, layer, arr, path, key, m))
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it, or another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    sha = {p: sha256_file(p) for p in {s.path for s in sources}}
    written: list[str] = []
    with store.open_features(tmp, "w") as f:
        store.init_root(f, cfg.dataset, {"preset": "imported"}, cfg.image_size, command)
        f.attrs["source"] = "import-features"
        store.init_split(f, cfg.split, row_ids, row_labels)
        for net, layer, arr, path, key, m in plan:
            prov = {"source": "import-features", "source_file": str(path.resolve()), "source_key": key,
                    "source_sha256": sha[path], "checkpoint": "", "checkpoint_sha256": "", "arch": "imported",
                    "net": net, "layer": layer, "node": layer, "command": command, "code_version": code_version(),
                    "created_utc": now_utc(), "point": "output" if layer != store.LOGITS else "logits"}
            if m is not None:
                prov.update(m.attrs())
            written += _write(f, cfg, net, layer, arr, m, prov)
    os.replace(tmp, out)
    return ImportResult(out, len(row_ids), written)


def _write(f, cfg: ImportConfig, net: str, layer: str, arr: np.ndarray, m: TokenMap | None,
           prov: dict[str, Any]) -> list[str]:
    """One layer (and with ``grid+prefix`` its prefix tokens) in blocks of rows."""
    n = arr.shape[0]
    dtype = "float32" if layer == store.LOGITS else cfg.dtype
    parts = [(layer, lambda b: m.apply(b) if m is not None else b, prov)]
    if m is not None and m.kind == "tokens->grid" and m.prefix > 0 and cfg.tokens == "grid+prefix":
        parts.append((layer + PREFIX_SUFFIX, m.prefix_tokens,
                      {**prov, "point": "tokens->prefix", "grid": [m.prefix, 1], "tokens_of": layer}))
    names = []
    for name, conv, attrs in parts:
        sample = conv(torch.from_numpy(np.array(arr[:1], dtype=np.float32))).numpy()
        ds = store.create_features(f, cfg.split, net, name, (n,) + sample.shape[1:], dtype, attrs)
        total = None
        for s in range(0, n, cfg.block_rows):
            block = conv(torch.from_numpy(np.array(arr[s:s + cfg.block_rows], dtype=np.float32))).numpy()
            lo, hi = float(block.min()), float(block.max())              # NaN when the block holds one
            block = np.ascontiguousarray(block.astype(dtype))
            counts = count_array(block)
            check_storable(f"{cfg.split}/{net}/{name}", (s, s + len(block)), lo, hi, counts, dtype, str(f.filename))
            ds.write_direct(block, dest_sel=np.s_[s:s + len(block)])
            total = counts if total is None else total.add(counts)
        write_counts(ds, total)
        store.mark_complete(ds)
        names.append(f"{cfg.split}/{net}/{name}")
    return names


def _validate(cfg: ImportConfig) -> None:
    require_choice("--tokens", cfg.tokens, TOKEN_MODES)
    require_choice("--dtype", cfg.dtype, DTYPES)
    if cfg.block_rows < 1:
        raise UserError(f"--block_rows must be >= 1, got {cfg.block_rows}")
    if cfg.prefix_tokens < 0:
        raise UserError(f"--prefix_tokens must be >= 0, got {cfg.prefix_tokens}")
    if cfg.split not in ("train", "test", "val"):
        raise UserError(f"unknown --split {cfg.split!r}; valid: train, test, val")
