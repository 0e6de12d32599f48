"""Inspection of a feature file: :func:`describe_file` (what it holds: root provenance and, per
split/net/layer, shape, dtype, completeness, progress, non-finite values, provenance) and :func:`verify_file` (re-compute a
few random stored rows from the recorded checkpoints and compare within a tolerance per storage dtype).

The ``nonfinite`` / ``max_abs`` attributes are what the writer counted; a later change of the stored
bytes (a bit flip) does not update them, so :func:`describe_file` reports them as recorded at write,
and :func:`recount_file` (``inspect --verify``) reads every stored row (which also checks each row's
fletcher32 checksum) and compares the counts of the data with the recorded ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from common.device import float32_math, precision_autocast, use_device
from common.errors import UserError
from common.files import jsonable
from features import store
from features.layers import build_extractor, resolve_layer
from features.nets import DATA_FIELDS, BareBuild, Net, load_net
from features.nonfinite import BLOCK_ROWS, ValueCounts, count_array
from features.targets import stored_precision
from features.tokens import map_tokens
from training.data import build_dataset
from training.datasets import DataSpec


def describe_file(path: str | os.PathLike) -> dict[str, Any]:
    """What a feature file holds: root provenance, and per split/net/layer shape, dtype, completeness,
    progress, non-finite count and largest magnitude, and provenance attributes (JSON-able)."""
    with store.open_features(path, "r") as f, store.named_errors(path):
        desc: dict[str, Any] = {"file": str(path), "root": store.attrs_dict(f), "splits": {}}
        for split in store.list_splits(f):
            g = f[split]
            sd: dict[str, Any] = {"rows": int(g[store.INDEX].shape[0]) if store.INDEX in g else None, "nets": {}}
            for net in store.list_nets(f, split):
                nd = {}
                for layer in sorted(g[net].keys()):
                    ds = g[net][layer]
                    a = {k: v for k, v in store.attrs_dict(ds).items() if k not in store.PROGRESS_ATTRS}
                    progress = store.dataset_progress(ds)
                    entry = {"shape": list(ds.shape), "dtype": str(ds.dtype), "complete": progress.complete,
                             "rows_done": progress.rows_done, "virtual": bool(ds.is_virtual),
                             "chunks": list(ds.chunks) if ds.chunks else None, "compression": ds.compression,
                             # NaN/inf values and largest finite magnitude of the rows done (None: not recorded)
                             "nonfinite": a.pop("nonfinite", None), "max_abs": a.pop("max_abs", None),
                             "counts_source": "recorded at write", "checksum": bool(ds.fletcher32), "attrs": a}
                    if ds.is_virtual:
                        try:
                            store.check_virtual_sources(ds)
                            entry["sources_ok"] = True
                        except store.FeatureFileError as e:
                            entry["sources_ok"] = False
                            entry["problem"] = str(e)
                    nd[layer] = entry
                sd["nets"][net] = nd
            desc["splits"][split] = sd
    return jsonable(desc)


# max |diff| / max |stored|, per storage dtype and per effective precision of the stored rows (the
# larger applies): a re-computation in another precision or on another device differs by this much.
VERIFY_TOL = {"float32": 1e-4, "float16": 4e-3, "tf32": 1e-2, "bf16": 3e-2}


@dataclass
class VerifyRow:
    split: str
    net: str
    layer: str
    status: str                  # ok | mismatch | skipped | failed
    rows: list[int] = field(default_factory=list)
    max_abs_diff: float | None = None
    rel_diff: float | None = None
    tolerance: float | None = None
    reason: str = ""


@torch.no_grad()
def verify_file(path: str | os.PathLike, rows: int = 4, seed: int = 0, device: str = "cpu") -> list[VerifyRow]:
    """Re-compute ``rows`` random stored rows of every dataset from its checkpoint and compare.

    The data set comes from the file's ``dataset_spec`` (eval transform); each net is rebuilt from the
    ``checkpoint`` attribute (its sha256 must match ``checkpoint_sha256``) and the layer re-resolved.
    A row passes when ``max|recomputed - stored| <= tol * max|stored|`` (tol per storage dtype and effective
    precision, :data:`VERIFY_TOL`; batch composition changes the last bits of a float32 result). The rows
    are re-computed in the recorded precision (which computes in fp32 off CUDA)."""
    dev = use_device(device)
    rng = np.random.default_rng(seed)
    results: list[VerifyRow] = []
    nets: dict[str, Net | str] = {}
    with store.open_features(path, "r") as f:
        root = store.attrs_dict(f)
        spec = root.get("dataset_spec")
        for split in store.list_splits(f):
            index, labels = store.read_index(f, split), store.read_labels(f, split)
            try:
                if not isinstance(spec, dict):
                    raise UserError("the file records no dataset_spec (written by another tool?)")
                dset = build_dataset(DataSpec(**{k: v for k, v in spec.items() if k in DATA_FIELDS}), split,
                                     train_transform=False)
            except UserError as e:
                for net in store.list_nets(f, split):
                    for layer in sorted(f[split][net].keys()):
                        results.append(VerifyRow(split, net, layer, "skipped", reason=f"data set unavailable: {e}"))
                continue
            for net in store.list_nets(f, split):
                results += _verify_net(f, split, net, dset, index, labels, nets, rng, rows, dev)
                for loaded in nets.values():         # one net on the device at a time; the cache keeps them
                    if not isinstance(loaded, str):
                        loaded.model.cpu()
    return results


def _verify_net(f: h5py.File, split: str, net: str, dset: Dataset, index: np.ndarray, labels: np.ndarray,
                cache: dict[str, Any], rng: np.random.Generator, rows: int, dev: torch.device) -> list[VerifyRow]:
    g = f[split][net]
    layers = sorted(g.keys())
    attrs = {layer: store.attrs_dict(g[layer]) for layer in layers}
    out: list[VerifyRow] = []
    by_ckpt: dict[tuple[str, str], list[str]] = {}
    for layer in layers:
        a = attrs[layer]
        by_ckpt.setdefault((str(a.get("checkpoint") or ""), str(a.get("checkpoint_sha256") or "")), []).append(layer)
    for (ckpt, sha), lays in by_ckpt.items():
        if not ckpt:
            out += [VerifyRow(split, net, l, "skipped", reason="no checkpoint recorded") for l in lays]
            continue
        key = f"{ckpt}|{sha}"
        if key not in cache:
            try:
                cache[key] = load_net(net, ckpt, expect_sha256=sha or None, bare=_bare_build(attrs[lays[0]], f),
                                      recorded_by="the feature file")
            except UserError as e:
                cache[key] = str(e)
        loaded = cache[key]
        if isinstance(loaded, str):
            out += [VerifyRow(split, net, l, "failed", reason=loaded) for l in lays]
            continue
        model = loaded.model.to(dev).eval()
        n_ok = min(store.dataset_progress(g[l]).rows_done for l in lays)
        if n_ok == 0:
            out += [VerifyRow(split, net, l, "skipped", reason="no rows written yet") for l in lays]
            continue
        pick = np.sort(rng.choice(n_ok, size=min(rows, n_ok), replace=False))
        items = [dset[int(index[i])] for i in pick]
        x = torch.stack([it[0] for it in items]).to(dev)
        y = np.array([it[1] for it in items])
        if not np.array_equal(y, labels[pick]):
            out += [VerifyRow(split, net, l, "mismatch", pick.tolist(), reason="labels differ from the data set")
                    for l in lays]
            continue
        # a <layer>.prefix dataset (transformer prefix tokens) is recomputed with the layer it belongs to
        prefix_of = {l: str(attrs[l]["tokens_of"]) for l in lays if attrs[l].get("point") == "tokens->prefix"}
        src = {l: prefix_of.get(l, l) for l in lays}
        requests = {l: _request(attrs.get(src[l], {}), src[l], net) for l in lays}
        try:
            by_name = {r: resolve_layer(model, r) for r in dict.fromkeys(requests.values())}
            ex = map_tokens(model, build_extractor(model, list(by_name.values())).to(dev), tuple(x.shape[1:]),
                            keep_prefix=bool(prefix_of))
        except UserError as e:
            out += [VerifyRow(split, net, l, "failed", reason=str(e)) for l in lays]
            continue
        precs = {stored_precision(attrs[l]) for l in lays}
        prec = next(p for p in ("bf16", "tf32", "fp32") if p in precs)    # the least precise of the group
        with float32_math(dev, prec), precision_autocast(dev, prec):
            rec = ex(x)
        for l in lays:
            p = by_name[requests[l]]
            key = l if l in prefix_of else p.name
            if attrs[l].get("node") not in (None, p.node):
                out.append(VerifyRow(split, net, l, "failed", reason=f"layer {p.name!r} now resolves to {p.node!r}, "
                                     f"the file recorded {attrs[l].get('node')!r}"))
                continue
            stored = torch.from_numpy(np.asarray(g[l][pick.tolist()])).float()
            got = rec[key].to(torch.float16 if g[l].dtype == np.float16 else torch.float32).float().cpu()
            if got.shape != stored.shape:
                out.append(VerifyRow(split, net, l, "mismatch", pick.tolist(),
                                     reason=f"shape {tuple(got.shape)} recomputed, {tuple(stored.shape)} stored"))
                continue
            diff = float((got - stored).abs().max())
            scale = float(stored.abs().max())
            tol = max(VERIFY_TOL[str(g[l].dtype)], VERIFY_TOL.get(stored_precision(attrs[l]), 0.0))
            rel = diff / max(scale, 1e-12)
            ok = bool(torch.isfinite(stored).all()) and rel <= tol
            out.append(VerifyRow(split, net, l, "ok" if ok else "mismatch", pick.tolist(), diff, rel, tol))
    return out


def _request(a: dict[str, Any], dataset: str, net: str) -> str:
    """The layer request that recomputes a dataset: its stored name re-resolved to the recorded node
    (``NAME=NET:NODE``) when the two differ (a per-net request, a negative block index)."""
    layer, node = str(a.get("layer") or dataset), a.get("node")
    return f"{layer}={net}:{node}" if node and node != layer and layer != "logits" else layer


def _bare_build(a: dict[str, Any], f: h5py.File) -> BareBuild | None:
    """How ``extract --arch/--model`` built a net from a weights file without an arch (None: a checkpoint)."""
    if not a.get("weights_sha256") or a.get("weights_sha256") != a.get("checkpoint_sha256"):
        return None
    tf = store.attrs_dict(f).get("transform") or {}
    size = a.get("build_input_size") or None
    return BareBuild(str(a.get("arch")), a.get("arch_kwargs") or {}, a.get("build_num_classes") or None,
                     int(tf.get("channels", 3)) if isinstance(tf, dict) else 3, size)
def recount_file(path: str | os.PathLike) -> list[VerifyRow]:
    """Read every stored row of every dataset (contiguous blocks; each row's fletcher32 checksum is
    checked by the read) and compare the data's non-finite count and largest finite magnitude with the
    recorded ``nonfinite`` / ``max_abs`` attributes: ``ok``, ``mismatch`` (the data changed after it was
    counted) or ``failed`` (a row cannot be read: the error names the file, dataset and rows)."""
    out: list[VerifyRow] = []
    with store.open_features(path, "r") as f, store.named_errors(path):
        for split in store.list_splits(f):
            for net in store.list_nets(f, split):
                for layer in sorted(f[split][net].keys()):
                    out.append(_recount(f, split, net, layer))
    return out


def _recount(f: h5py.File, split: str, net: str, layer: str) -> VerifyRow:
    ds = store.CheckedDataset(f[split][net][layer].id)
    a = store.attrs_dict(ds)
    n = ds.shape[0] if a.get("complete") else int(a.get("rows_done", 0))
    have = ValueCounts()
    try:
        for s in range(0, n, BLOCK_ROWS):
            have = have.add(count_array(store.read_rows(ds, s, min(n, s + BLOCK_ROWS), ds.dtype)))
    except store.FeatureFileError as e:
        return VerifyRow(split, net, layer, "failed", reason=f"stored rows: {e}")
    what = f"stored rows (all {n}): {have.nonfinite} non-finite, max |x| {have.max_abs:.6g}"
    if "nonfinite" not in a or "max_abs" not in a:
        return VerifyRow(split, net, layer, "ok", reason=f"{what} (no counts recorded)")
    want = ValueCounts(int(a["nonfinite"]), float(a["max_abs"]))
    # the writer counts the computed values (float32): compare in the storage dtype
    same = want.nonfinite == have.nonfinite and ds.dtype.type(want.max_abs) == ds.dtype.type(have.max_abs)
    if same:
        return VerifyRow(split, net, layer, "ok", reason=f"{what}, as recorded")
    return VerifyRow(split, net, layer, "mismatch",
                     reason=f"{what}, but recorded at write: {want.nonfinite} non-finite, max |x| {want.max_abs:.6g}; "
                            f"the stored values changed after they were written")
