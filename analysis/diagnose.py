"""Network diagnosis (the paper's): what each of two nets knows that the other lacks.

For nets A and B at one layer, with a Trans-Net fitted in each direction:

- **blind spots of A**: the part of x_B that cannot be rebuilt from x_A, i.e. the residual
  Δ_B = x_B − g_AB(x_A) of the A→B Trans-Net: knowledge B holds and A lacks;
- **unreliable features of A**: the part of x_A that cannot be rebuilt from x_B, the residual
  Δ_A = x_A − g_BA(x_B) of the B→A Trans-Net: knowledge A holds and B lacks.

For each direction one streaming float64 pass over the held-out split gives the residual energy
(mean square of Δ) per channel, per position and per image, each also relative to the target's
variance there (per-channel centred, as in the variance report: 0 = rebuilt exactly, 1 = no better
than the channel mean, > 1 = worse), and ranks images, channels and (image, channel) pairs by it.

    python cli.py diagnose --features F --layer L --a A --b B --consistency DIR --out_dir D

writes ``D/diagnosis.json``, ``D/channels.csv``, ``D/figures/residual_energy.{png,svg}`` and the
Fig. 1 panels of the top-ranked images of each direction (``D/figures/panel_*``).
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from analysis import plots
from analysis.config import DiagnoseConfig  # re-exported: its old home
from analysis.consistency import pair_dirname
from analysis.convergence import convergence_of, refusal
from common.device import float32_math, use_device
from common.errors import UserError
from common.files import atomic_write, read_json, write_json
from common.finished import require_finished_result
from common.progress import progress
from common.rundir import RunDir
from features.identity import check_transnet_features
from features.store import get_features, iter_blocks, open_features, read_index, read_labels, read_rows
from transnet.fit import in_sample_warning, load_transnet
from transnet.spatial import require_same_layer

DIRECTIONS = ("blind_spots", "unreliable")


# --------------------------------------------------------------------------- pure math

@torch.no_grad()
def decompose_rows(model: torch.nn.Module, x_a: Tensor, x_b: Tensor) -> dict[str, np.ndarray]:
    """Decompose a few samples: x_a (n, C_A, H, W), x_b (n, C_B, H, W) -> numpy arrays ``x_a``, ``x_b``,
    ``yhat``, ``components`` (K+1, n, C_B, H, W; order 0 first), ``residual`` (x_B − ŷ) and
    ``gates`` (K,; order 1 first)."""
    was = model.training
    model.eval()
    try:
        comps, yhat = model.decompose(x_a.float())
    finally:
        model.train(was)
    x_b = x_b.float()
    if yhat.shape != x_b.shape:
        raise UserError(f"the Trans-Net outputs {tuple(yhat.shape[1:])} maps but the target features are "
                        f"{tuple(x_b.shape[1:])}; is it the Trans-Net of this pair and layer?")
    return {"x_a": x_a.float().cpu().numpy(), "x_b": x_b.cpu().numpy(), "yhat": yhat.cpu().numpy(),
            "components": torch.stack(comps).cpu().numpy(), "residual": (x_b - yhat).cpu().numpy(),
            "gates": model.gates().detach().cpu().numpy()}


class ResidualAccumulator:
    """One pass over (residual, target) blocks, float64: per-channel, per-position, per-image and
    per-(image, channel) residual energy and the matching per-channel-centred target energy.

    The target's channel means are not known until the end, so the per-image and per-position
    target energies keep raw first and second moments and are centred in :meth:`result`."""

    def __init__(self) -> None:
        self.n = 0
        self.res_nc: list[np.ndarray] = []     # (n, C) mean over positions of Δ²
        self.t1_nc: list[np.ndarray] = []      # (n, C) mean over positions of x
        self.t2_nc: list[np.ndarray] = []      # (n, C) mean over positions of x²
        self.res_pos: np.ndarray | None = None  # (C, H, W) sum over samples of Δ²
        self.t1_pos: np.ndarray | None = None   # (C, H, W) sum over samples of x
        self.t2_pos: np.ndarray | None = None   # (C, H, W) sum over samples of x²

    def update(self, residual: np.ndarray, target: np.ndarray) -> None:
        """residual, target: (n, C, H, W)."""
        if residual.shape != target.shape:
            raise ValueError(f"residual {residual.shape} and target {target.shape} differ")
        r = residual.astype(np.float64)
        t = target.astype(np.float64)
        r2, t2 = r * r, t * t
        self.res_nc.append(r2.mean(axis=(2, 3)))
        self.t1_nc.append(t.mean(axis=(2, 3)))
        self.t2_nc.append(t2.mean(axis=(2, 3)))
        if self.res_pos is None:
            self.res_pos, self.t1_pos, self.t2_pos = r2.sum(0), t.sum(0), t2.sum(0)
        else:
            self.res_pos += r2.sum(0)
            self.t1_pos += t.sum(0)
            self.t2_pos += t2.sum(0)
        self.n += r.shape[0]

    def result(self) -> dict[str, np.ndarray | float]:
        """Energies (mean squares of Δ) and the same relative to the centred target energy."""
        if self.n == 0:
            raise ValueError("no samples accumulated")
        res_nc = np.concatenate(self.res_nc)                       # (N, C)
        t1_nc, t2_nc = np.concatenate(self.t1_nc), np.concatenate(self.t2_nc)
        mu = t1_nc.mean(axis=0)                                    # (C,) channel means over samples, positions
        var_c = t2_nc.mean(axis=0) - mu ** 2                       # (C,) centred target energy per channel
        t_nc = t2_nc - 2 * mu * t1_nc + mu ** 2                    # (N, C) centred target energy per image, channel
        res_pos = self.res_pos / self.n                            # (C, H, W)
        t_pos = self.t2_pos / self.n - 2 * mu[:, None, None] * self.t1_pos / self.n + mu[:, None, None] ** 2
        channel_energy = res_nc.mean(axis=0)                       # (C,)
        return {
            "n": self.n,
            "energy": float(res_nc.mean()),
            "relative": _ratio(res_nc.mean(), var_c.mean()),
            "channel_energy": channel_energy,
            "channel_variance": var_c,
            "channel_relative": _ratio(channel_energy, var_c),
            "position_energy": res_pos.mean(axis=0),               # (H, W)
            "position_relative": _ratio(res_pos.mean(axis=0), t_pos.mean(axis=0)),
            "image_energy": res_nc.mean(axis=1),                   # (N,)
            "image_relative": _ratio(res_nc.mean(axis=1), t_nc.mean(axis=1)),
            "image_channel_relative": _ratio(res_nc, var_c[None, :]),  # (N, C): relative to the channel's variance
        }


def _ratio(num: Any, den: Any) -> Any:
    """num / den with 0/0 -> NaN flagged by callers (a constant target has no variance to explain)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def rank_top(values: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` largest finite values, largest first (ties by index)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = np.flatnonzero(np.isfinite(v))
    order = finite[np.lexsort((finite, -v[finite]))]
    return [int(i) for i in order[:k]]


def summarise(stats: Mapping[str, Any], index: np.ndarray, labels: np.ndarray, top: int,
              per_image: int = 3) -> dict[str, Any]:
    """Ranked lists and JSON-ready arrays of one direction's accumulator result; each top image lists
    its ``per_image`` worst channels."""
    ch_rel = np.asarray(stats["channel_relative"])
    img_rel = np.asarray(stats["image_relative"])
    ic = np.asarray(stats["image_channel_relative"])
    n_c = ic.shape[1]
    top_ic = rank_top(ic, top)
    out = {
        "n_samples": int(stats["n"]),
        "energy": stats["energy"],
        "relative": stats["relative"],
        "top_channels": [{"channel": c, "relative": float(ch_rel[c]),
                          "energy": float(stats["channel_energy"][c])} for c in rank_top(ch_rel, top)],
        "top_images": [{"row": r, "index": int(index[r]), "label": int(labels[r]), "relative": float(img_rel[r]),
                        "top_channels": rank_top(ic[r], per_image)} for r in rank_top(img_rel, top)],
        "top_image_channels": [{"row": i // n_c, "index": int(index[i // n_c]), "channel": i % n_c,
                                "relative": float(ic.ravel()[i])} for i in top_ic],
        "channel_energy": stats["channel_energy"],
        "channel_variance": stats["channel_variance"],
        "channel_relative": ch_rel,
        "position_energy": stats["position_energy"],
        "position_relative": stats["position_relative"],
        "image_relative_quantiles": {q: float(np.nanquantile(img_rel, q / 100)) for q in (10, 50, 90)}
        if np.isfinite(img_rel).any() else None,
    }
    dead = np.flatnonzero(~np.isfinite(ch_rel))
    out["warnings"] = ([f"{len(dead)} target channel(s) have zero variance (constant): their relative energy is "
                        f"undefined (null): {dead[:10].tolist()}{'...' if len(dead) > 10 else ''}"] if len(dead) else [])
    return out


# --------------------------------------------------------------------------- I/O

def pair_blocks(features: str, split: str, source: str, target: str, layer: str,
                block_rows: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(start, x_source, x_target) contiguous blocks of one split."""
    with open_features(features) as f:
        ds_a = get_features(f, split, source, layer)
        ds_b = get_features(f, split, target, layer)
        for start, xa in iter_blocks(ds_a, block_rows):
            yield start, xa, read_rows(ds_b, start, start + xa.shape[0])


def residual_stats(model: torch.nn.Module, features: str, split: str, source: str, target: str, layer: str,
                   block_rows: int = 256, device: torch.device | str = "cpu", desc: str = "") -> dict[str, Any]:
    """Run the Trans-Net source→target over a split and accumulate its residual statistics."""
    device = torch.device(device)
    model = model.to(device).eval()
    acc = ResidualAccumulator()
    with open_features(features) as f:
        n = get_features(f, split, source, layer).shape[0]
    with torch.no_grad(), float32_math(device, "fp32"):        # IEEE float32 on CUDA, as the variance report
        for _, xa, xb in progress(pair_blocks(features, split, source, target, layer, block_rows),
                                  (n + block_rows - 1) // block_rows, desc):
            yhat = model(torch.from_numpy(xa).to(device))
            acc.update((torch.from_numpy(xb).to(device) - yhat).cpu().numpy(), xb)
    return acc.result()


def resolve_transnets(cfg: DiagnoseConfig) -> tuple[Path, Path]:
    """The A→B and B→A Trans-Net run directories (explicit, else from the consistency folder)."""
    if cfg.transnet_ab and cfg.transnet_ba:
        return Path(cfg.transnet_ab), Path(cfg.transnet_ba)
    if not cfg.consistency:
        raise UserError("diagnose needs both directions' Trans-Nets: pass --consistency DIR (a consistency "
                        "folder that fitted A>B and B>A) or --transnet_ab and --transnet_ba")
    root = Path(cfg.consistency)
    ab = Path(cfg.transnet_ab) if cfg.transnet_ab else root / "pairs" / pair_dirname(cfg.a, cfg.b)
    ba = Path(cfg.transnet_ba) if cfg.transnet_ba else root / "pairs" / pair_dirname(cfg.b, cfg.a)
    missing = [str(p) for p in (ab, ba) if not p.is_dir()]
    if missing:
        have = sorted(p.name for p in (root / "pairs").iterdir()) if (root / "pairs").is_dir() else []
        raise UserError(f"no Trans-Net run at {', '.join(missing)}; the consistency folder {root} holds pairs "
                        f"{', '.join(have) or 'none'} (fit both directions, e.g. --pairs {cfg.a}>{cfg.b},{cfg.b}>{cfg.a})")
    return ab, ba


def _load_checked(path: Path, source: str, target: str, layer: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    model, info = load_transnet(path)
    require_same_layer(info, "diagnose")
    got = (info.get("source"), info.get("target"), info.get("layer"))
    if got != (source, target, layer):
        raise UserError(f"Trans-Net {path} maps {got[0]} -> {got[1]} at layer {got[2]}, but "
                        f"{source} -> {target} at layer {layer} is needed here")
    return model, info


def in_sample_warnings(split: str, infos: dict[str, dict[str, Any]]) -> list[str]:
    """One warning per Trans-Net (by direction) whose training split is the diagnosed split."""
    out = []
    for key, info in infos.items():
        cfg = info.get("config") or {}
        train_split = cfg.get("train_split", "train")
        if split == train_split:
            out.append(f"{key}: " + in_sample_warning(split, train_split))
    return out


def fit_refusals(runs: Mapping[str, tuple[Path, str, str]]) -> dict[str, str]:
    """direction -> why its Trans-Net (run dir or checkpoint, source, target) may carry no conclusion
    (not converged, or held-out R² < 0; ``analysis.convergence.refusal``), read from its metrics.json;
    a fit without one (not finished) is named too."""
    out = {}
    for key, (path, src, tgt) in runs.items():
        run = path if path.is_dir() else path.parent
        if not (run / "metrics.json").is_file():
            out[key] = f"the Trans-Net {src}->{tgt} did not finish (no metrics.json in {run})"
            continue
        report = read_json(run / "metrics.json")
        conv = convergence_of(report)
        why = refusal({"convergence": conv["verdict"], "convergence_reasons": conv["reasons"], "r2": report.get("r2")})
        if why:
            out[key] = f"the Trans-Net {src}->{tgt}: {why}"
    return out


def load_images(features: str, split: str, rows: Sequence[int]) -> np.ndarray | None:
    """The input images of feature-file rows (n, H, W) or (n, H, W, 3), rebuilt from the data set the
    file records (evaluation transform); None when it cannot be rebuilt (data set folder not here)."""
    from training.data import build_dataset
    from training.datasets import DataSpec

    with open_features(features) as f:
        root = {k: f.attrs.get(k) for k in ("dataset", "data_spec")}
        index = read_index(f, split)
    spec_raw = root.get("data_spec") or root.get("dataset")
    if isinstance(spec_raw, bytes):
        spec_raw = spec_raw.decode()
    try:
        import json

        parsed = json.loads(spec_raw) if isinstance(spec_raw, str) and spec_raw[:1] == "{" else spec_raw
        if isinstance(parsed, dict):
            known = set(DataSpec.__dataclass_fields__)
            spec = DataSpec(**{k: v for k, v in parsed.items() if k in known})
        else:
            spec = DataSpec(name=str(parsed))
        ds = build_dataset(spec, split, train_transform=False)
        imgs = [ds[int(index[r])][0].numpy() for r in rows]       # (C, H, W) each
    except (UserError, KeyError, TypeError, ValueError, IndexError, OSError):
        return None
    arr = np.stack(imgs)
    return arr[:, 0] if arr.shape[1] == 1 else arr.transpose(0, 2, 3, 1)


def panel_for_rows(model: torch.nn.Module, features: str, split: str, source: str, target: str, layer: str,
                   rows: Sequence[int], channels: Sequence[int]) -> dict[str, Any]:
    """Everything ``plots.decomposition_panel`` draws for feature-file ``rows`` and target ``channels``."""
    rows = [int(r) for r in rows]
    with open_features(features) as f:
        ds_a, ds_b = get_features(f, split, source, layer), get_features(f, split, target, layer)
        bad = [r for r in rows if not 0 <= r < ds_a.shape[0]]
        if bad:
            raise UserError(f"rows {bad} are out of range: split {split!r} has {ds_a.shape[0]} rows")
        bad = [c for c in channels if not 0 <= c < ds_b.shape[1]]
        if bad:
            raise UserError(f"channels {bad} are out of range: {target} has {ds_b.shape[1]} channels at {layer}")
        xa = np.stack([read_rows(ds_a, r, r + 1)[0] for r in rows])
        xb = np.stack([read_rows(ds_b, r, r + 1)[0] for r in rows])
    out = decompose_rows(model.cpu(), torch.from_numpy(xa), torch.from_numpy(xb))
    out.update({"rows": rows, "channels": list(channels), "source": source, "target": target,
                "images": load_images(features, split, rows)})
    return out


def channels_csv(diag: Mapping[str, Any]) -> str:
    """One line per channel and direction: residual energy, target variance, relative energy."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["direction", "net_of_channel", "channel", "residual_energy", "target_variance", "relative"])
    for key, net in (("blind_spots", diag["b"]), ("unreliable", diag["a"])):
        d = diag[key]
        for c, (e, v, r) in enumerate(zip(d["channel_energy"], d["channel_variance"], d["channel_relative"])):
            w.writerow([key, net, c, f"{e:.6g}", f"{v:.6g}", "" if not np.isfinite(r) else f"{r:.6g}"])
    return buf.getvalue()


def diagnose_pair(cfg: DiagnoseConfig, out_dir: str | os.PathLike, mode: str = "new") -> dict[str, Any]:
    """Both directions' residual statistics, ranked lists, figures and panels into ``out_dir``;
    returns the ``diagnosis.json`` body plus ``figures`` (written paths). Without ``layer``, a
    consistency folder's own layer is used."""
    if not cfg.layer and cfg.consistency:
        cfg = replace(cfg, layer=consistency_settings(cfg.consistency).get("layer") or "")
    for name in ("features", "layer", "a", "b"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required")
    if cfg.a == cfg.b:
        raise UserError(f"--a and --b are both {cfg.a!r}; diagnose compares two different nets")
    if cfg.top < 1 or cfg.panels < 0 or cfg.panel_channels < 1:
        raise UserError("--top and --panel_channels must be >= 1 and --panels >= 0")
    device = use_device(cfg.device)
    ab_dir, ba_dir = resolve_transnets(cfg)
    for path in (ab_dir, ba_dir):
        require_finished_result(path, "diagnose", cfg.allow_unfinished)
    g_ab, info_ab = _load_checked(ab_dir, cfg.a, cfg.b, cfg.layer)
    g_ba, info_ba = _load_checked(ba_dir, cfg.b, cfg.a, cfg.layer)
    for info in (info_ab, info_ba):         # the features must be those of the nets the Trans-Nets were fitted on
        check_transnet_features(info, cfg.features, cfg.split, allow=cfg.allow_other_checkpoints)
    in_sample = in_sample_warnings(cfg.split, {"blind_spots": info_ab, "unreliable": info_ba})
    refused = fit_refusals({"blind_spots": (ab_dir, cfg.a, cfg.b), "unreliable": (ba_dir, cfg.b, cfg.a)})
    with open_features(cfg.features) as f:
        index, labels = read_index(f, cfg.split), read_labels(f, cfg.split)
    out = Path(out_dir)
    with RunDir(out, mode) as run:
        run.write_config(cfg, device=device, transnet_ab=str(ab_dir), transnet_ba=str(ba_dir))
        diag: dict[str, Any] = {"a": cfg.a, "b": cfg.b, "layer": cfg.layer, "split": cfg.split,
                                "transnet_ab": str(ab_dir), "transnet_ba": str(ba_dir),
                                "meaning": {"blind_spots": f"x_{cfg.b} not rebuilt from x_{cfg.a}: what {cfg.b} "
                                                           f"knows and {cfg.a} lacks (channels of {cfg.b})",
                                            "unreliable": f"x_{cfg.a} not rebuilt from x_{cfg.b}: what {cfg.a} "
                                                          f"knows and {cfg.b} lacks (channels of {cfg.a})",
                                            "relative": "residual mean square / centred target mean square "
                                                        "(0 = rebuilt exactly, 1 = no better than the mean)"},
                                "held_out": not in_sample,
                                # direction -> why its residuals carry no conclusion (empty: both may)
                                "not_conclusive": refused,
                                "warnings": in_sample + [f"{k}: no conclusion: {v}" for k, v in refused.items()]}
        models = {"blind_spots": (g_ab, cfg.a, cfg.b), "unreliable": (g_ba, cfg.b, cfg.a)}
        for key, (model, src, tgt) in models.items():
            stats = residual_stats(model, cfg.features, cfg.split, src, tgt, cfg.layer, cfg.block_rows, device,
                                   f"{key} {src}->{tgt}")
            diag[key] = summarise(stats, index, labels, cfg.top, cfg.panel_channels)
        figures = plots.residual_energy_figure(diag, out / "figures" / "residual_energy")
        for key, (model, src, tgt) in models.items():
            for i, img in enumerate(diag[key]["top_images"][:cfg.panels]):
                panel = panel_for_rows(model, cfg.features, cfg.split, src, tgt, cfg.layer, [img["row"]],
                                       img["top_channels"])
                figures += plots.decomposition_panel(
                    panel, out / "figures" / f"panel_{key}_{i + 1}",
                    f"{key.replace('_', ' ')}: {src} → {tgt}, row {img['row']} "
                    f"(residual {100 * img['relative']:.0f}% of the target's variance)")
        diag["figures"] = [os.path.relpath(p, out) for p in figures]
        write_json(out / "diagnosis.json", diag)
        with atomic_write(out / "channels.csv") as fh:
            fh.write(channels_csv(diag))
        run.finish({k: {"relative": diag[k]["relative"], "energy": diag[k]["energy"]} for k in DIRECTIONS})
    return diag


def consistency_settings(consistency_dir: str | os.PathLike) -> dict[str, Any]:
    """The settings (``layer``, ``split``, ...) a consistency folder's config.json records; {} without it."""
    cfg_path = Path(consistency_dir) / "config.json"
    return read_json(cfg_path).get("config", {}).get("consistency", {}) if cfg_path.is_file() else {}


def run_diagnosis(consistency_dir: str | os.PathLike, a: str, b: str, features: str, out_dir: str | os.PathLike,
                  mode: str = "new", **options: Any) -> dict[str, Any]:
    """Diagnose ``a`` against ``b`` with the two Trans-Nets of a consistency folder (its layer and split
    from the folder's config); ``options`` are further :class:`DiagnoseConfig` fields."""
    cons = consistency_settings(consistency_dir)
    layer = options.pop("layer", None) or cons.get("layer")
    if not layer:
        raise UserError(f"{consistency_dir} has no config.json naming its layer; pass layer=...")
    split = options.pop("split", None) or cons.get("split", DiagnoseConfig.split)
    cfg = DiagnoseConfig(features=str(features), layer=layer, a=a, b=b, consistency=str(consistency_dir),
                         split=split, **options)
    return diagnose_pair(cfg, out_dir, mode)


def read_diagnosis(folder: str | os.PathLike) -> dict[str, Any]:
    return read_json(Path(folder) / "diagnosis.json")
