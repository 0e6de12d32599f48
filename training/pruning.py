"""Deep-Compression-style copies of a network: magnitude pruning plus weight sharing.

1. Pruning (``torch.nn.utils.prune``): the smallest-|w| fraction of every conv/linear weight
   (per layer, or one global threshold) is set to zero; the binary masks are kept.
2. Weight sharing: per layer, 1-D k-means (scikit-learn, linear initialisation between the
   smallest and largest kept weight, as Han et al. 2016 found best) over the kept weights with
   k = 2**bits clusters; every kept weight is replaced by its cluster centre.
3. Fine-tuning projects after every optimiser step (:func:`project_`): pruned weights back to zero,
   every cluster back to one shared value (the mean of its members after the step). With plain SGD
   this moves each centre by the mean of its members' gradients (Deep Compression uses the sum,
   i.e. a per-cluster learning-rate scale).

Biases and BatchNorm parameters are left as they are (the paper compresses weights). The state dict
stays that of the plain architecture, so a compressed copy is a normal checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import prune

from common.errors import UserError, require_choice
from training.family_config import PRUNE_SCOPES  # re-exported: its old home


@dataclass
class LayerCode:
    """How one layer's weight is compressed: kept positions and the cluster id of each weight."""

    mask: torch.Tensor                   # bool, weight.shape: True = kept
    assign: torch.Tensor | None = None   # int64, weight.shape: cluster id (pruned positions: 0, unused)
    k: int = 0                           # clusters in use (0: not quantised)


def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every conv and linear layer, by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))}


def prune_magnitude(model: nn.Module, amount: float, scope: str = "layer") -> dict[str, LayerCode]:
    """Zero the ``amount`` fraction of smallest-magnitude weights (in place); return the masks."""
    if not 0 <= amount < 1:
        raise UserError(f"--prune must be in [0, 1), got {amount}")
    require_choice("--prune_scope", scope, PRUNE_SCOPES)
    layers = compressible_layers(model)
    if not layers:
        raise UserError("the model has no conv or linear layer to compress")
    if scope == "global":
        prune.global_unstructured([(m, "weight") for m in layers.values()], prune.L1Unstructured, amount=amount)
    else:
        for m in layers.values():
            prune.l1_unstructured(m, "weight", amount=amount)
    codes = {}
    for name, m in layers.items():
        mask = m.weight_mask.detach().bool().clone()
        prune.remove(m, "weight")  # fold the mask into a plain `weight` parameter
        codes[name] = LayerCode(mask)
    return codes


def kmeans_1d(values: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cluster scalars: (n,) -> (centres (k',), labels (n,)), centres ascending, every cluster used."""
    from sklearn.cluster import KMeans

    x = np.asarray(values, dtype=np.float64).reshape(-1, 1)  # (n, 1)
    init = np.linspace(x.min(), x.max(), k).reshape(-1, 1)   # (k, 1) linear initialisation
    km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=300, tol=0.0, random_state=seed).fit(x)
    centres, labels = km.cluster_centers_[:, 0], km.labels_
    used = np.unique(labels)                                   # drop clusters left empty, if any
    order = used[np.argsort(centres[used])]
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(len(order))
    return centres[order], remap[labels]


@torch.no_grad()
def quantize_shared(model: nn.Module, codes: dict[str, LayerCode], bits: int) -> dict[str, LayerCode]:
    """Replace each layer's kept weights by 2**bits shared values (k-means); in place.

    A layer with at most 2**bits distinct kept weights keeps its values (each one a shared value).
    """
    if bits < 0 or bits > 16:
        raise UserError(f"--quantize_bits must be in 0..16 (0: no weight sharing), got {bits}")
    if bits == 0:
        return codes
    layers = compressible_layers(model)
    for name, code in codes.items():
        w = layers[name].weight
        kept = w[code.mask].double().cpu().numpy()  # (n_kept,)
        if len(kept) == 0:
            continue
        uniq, inverse = np.unique(kept, return_inverse=True)
        if len(uniq) <= 2 ** bits:  # already within budget: share the values it has
            centres, labels = uniq, inverse.reshape(-1)
        else:
            centres, labels = kmeans_1d(kept, 2 ** bits)
        assign = torch.zeros(w.shape, dtype=torch.int64, device=w.device)
        assign[code.mask] = torch.from_numpy(labels).to(w.device)
        code.assign, code.k = assign, len(centres)
        new = torch.from_numpy(centres).to(w.device, w.dtype)[assign] * code.mask
        w.copy_(new)
    return codes


@torch.no_grad()
def project_(model: nn.Module, codes: dict[str, LayerCode]) -> None:
    """Re-impose the compression (in place): pruned weights 0, each cluster one value (its mean)."""
    layers = compressible_layers(model)
    for name, code in codes.items():
        w = layers[name].weight
        mask = code.mask.to(w.device)
        if code.assign is None:
            w.mul_(mask)
            continue
        assign = code.assign.to(w.device)
        sel = assign[mask]                                                       # (n_kept,)
        sums = torch.zeros(code.k, dtype=torch.float64, device=w.device).index_add_(0, sel, w[mask].double())
        counts = torch.bincount(sel, minlength=code.k).clamp_min(1)
        centres = (sums / counts).to(w.dtype)                                    # (k,)
        w.copy_(centres[assign] * mask)


def move_codes(codes: dict[str, LayerCode], device: torch.device | str) -> dict[str, LayerCode]:
    return {n: LayerCode(c.mask.to(device), None if c.assign is None else c.assign.to(device), c.k)
            for n, c in codes.items()}


@torch.no_grad()
def compression_stats(model: nn.Module, codes: dict[str, LayerCode] | None = None) -> dict[str, Any]:
    """Sparsity (fraction of exactly-zero weights over all conv/linear weights and per layer) and the
    number of distinct values among each layer's kept (non-pruned) weights."""
    total = zeros = 0
    per_layer_sparsity, distinct = {}, {}
    for name, m in compressible_layers(model).items():
        w = m.weight.detach()
        n, z = w.numel(), int((w == 0).sum())
        total, zeros = total + n, zeros + z
        per_layer_sparsity[name] = z / n
        kept = w[codes[name].mask.to(w.device)] if codes is not None and name in codes else w[w != 0]
        distinct[name] = int(torch.unique(kept).numel())
    return {"sparsity": zeros / max(total, 1), "weights_total": total, "weights_nonzero": total - zeros,
            "sparsity_per_layer": per_layer_sparsity, "distinct_values_per_layer": distinct}


def storage_bits(stats: dict[str, Any], bits: int, float_bits: int = 32) -> dict[str, float]:
    """Weight storage estimate: dense float32 vs one ``bits``-bit index per kept weight plus a float32
    codebook per layer. Sparse-index overhead (Deep Compression's relative indices) is not counted."""
    dense = stats["weights_total"] * float_bits
    if bits == 0:
        packed = stats["weights_nonzero"] * float_bits
    else:
        packed = stats["weights_nonzero"] * bits + len(stats["distinct_values_per_layer"]) * (2 ** bits) * float_bits
    return {"dense_bits": float(dense), "compressed_bits": float(packed),
            "ratio_without_index_overhead": dense / max(packed, 1)}
