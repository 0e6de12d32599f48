"""Reading a study folder: whatever parts of it exist (study.json, family manifests and their run
directories, features.h5, consistency, similarity, layer x layer and diagnosis results), with missing
or broken parts listed rather than fatal.

The layout of a study folder is in ``analysis/study_layout.py`` (its one owner, shared with the
writer, ``studies/runner.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from analysis.consistency import PAIR_SEP, natural_key, pair_report, pair_row
from analysis.convergence import convergence_of, read_history
from analysis.study_layout import (
    ALIASES_FILE,
    CONSISTENCY,
    DIAGNOSIS,
    FAMILIES,
    FEATURES,
    LAYER_MATRIX,
    SIMILARITY,
    STUDY_FILE,
    STUDY_PARTS,
)
from common.errors import UserError
from common.files import read_json
from features.store import INDEX, attrs_dict, dataset_progress, list_layers, list_nets, list_splits, open_features
from training.manifest import read_manifest


@dataclass
class StudyFolder:
    root: Path
    info: dict[str, Any] | None = None
    families: list[dict[str, Any]] = field(default_factory=list)
    features: dict[str, Any] | None = None
    consistency: dict[str, dict[str, Any]] = field(default_factory=dict)
    similarity: dict[str, dict[str, Any]] = field(default_factory=dict)
    layer_matrices: list[dict[str, Any]] = field(default_factory=list)   # similarity.json bodies with "layers"
    diagnosis: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)   # member -> member with the same recipe
    bootstrap: dict[str, Any] | None = None     # replicates, seed, level, unit of the intervals (None: none)

    @property
    def layers(self) -> list[str]:
        return sorted(set(self.consistency) | set(self.similarity) | set(self.diagnosis), key=natural_key)


def read_family(path: Path, study: StudyFolder) -> dict[str, Any] | None:
    try:
        body = read_json(path / "family.json")
        members = read_manifest(path)
    except UserError as e:
        study.warnings.append(f"family {path.name}: {e}")
        return None
    rows = []
    for m in members:
        run_dir = Path(m.checkpoint).parent
        metrics = dict(m.metrics or {})
        if (run_dir / "metrics.json").is_file():
            run_metrics = read_json(run_dir / "metrics.json")
            for k in ("test_top1", "test_top5", "test_loss", "train_loss", "epoch"):
                metrics.setdefault(k, run_metrics.get(k))
        rows.append({"name": m.name, "role": m.role, "generation": m.generation, "teacher": m.teacher,
                     "arch": m.arch, "metrics": metrics, "run_dir": str(run_dir),
                     "history": read_history(run_dir) if m.role != "slim" else []})
    return {"name": path.name, "family": body.get("family", path.name), "dir": str(path), "members": rows,
            "config": body.get("config", {})}


def _read_features(path: Path, study: StudyFolder) -> dict[str, Any] | None:
    try:
        with open_features(path) as f:
            out: dict[str, Any] = {"path": str(path), "root": attrs_dict(f), "splits": {}}
            for split in list_splits(f):
                nets = {}
                for net in list_nets(f, split):
                    layers = {}
                    for layer in list_layers(f, split, net):
                        ds = f[split][net][layer]
                        progress = dataset_progress(ds)
                        layers[layer] = {"shape": list(ds.shape), "dtype": str(ds.dtype), "complete": progress.complete}
                        if not progress.complete:
                            study.warnings.append(f"features.h5: /{split}/{net}/{layer} is incomplete "
                                                  f"({progress.rows_done} of {progress.rows} rows)")
                    nets[net] = layers
                out["splits"][split] = {"n": int(f[split][INDEX].shape[0]), "nets": nets}
            return out
    except UserError as e:
        study.warnings.append(str(e))
        return None


def fit_details(folder: Path, rows: list[dict[str, Any]], warnings: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Complete each consistency row from its pair's run directory: the fit's convergence verdict
    (``convergence``, ``convergence_reasons``; ``unknown`` when the run holds none) and the additive
    shares of its variance report (``additive_shares``, None when absent). Returns the fits' epoch
    logs by pair label ``A→B``."""
    histories = {}
    for r in rows:
        pair_dir = folder / (r.get("transnet_dir") or f"pairs/{r['source']}{PAIR_SEP}{r['target']}")
        metrics: dict[str, Any] = {}
        report: dict[str, Any] = {}
        try:
            metrics = read_json(pair_dir / "metrics.json") if (pair_dir / "metrics.json").is_file() else {}
            report = pair_report(pair_dir, r.get("split") or "test")
        except UserError as e:
            warnings.append(f"{folder.name}: {r['source']}→{r['target']}: {e}")
        conv = convergence_of(metrics if "convergence" in metrics else report)
        r["convergence"], r["convergence_reasons"] = conv["verdict"], conv["reasons"]
        r.setdefault("additive_shares", report.get("additive_shares") or metrics.get("additive_shares"))
        hist = read_history(pair_dir)
        if hist:
            histories[f"{r['source']}→{r['target']}"] = hist
    return histories


def read_study_folder(root: str | os.PathLike) -> StudyFolder:
    """Read whatever parts of a study folder exist; missing or broken parts are listed, not fatal. A
    folder that is not a study folder is read as a folder of results (:func:`read_results_folder`)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"study folder {root} does not exist or is not a directory")
    if not any((root / p).exists() for p in STUDY_PARTS):
        return read_results_folder(root)
    st = StudyFolder(root)
    if (root / STUDY_FILE).is_file():
        try:
            st.info = read_json(root / STUDY_FILE)
        except UserError as e:
            st.warnings.append(str(e))
    else:
        st.missing.append("study.json (what was compared): the report lists what the files hold instead")
    if (root / ALIASES_FILE).is_file():
        try:
            st.aliases = dict(read_json(root / ALIASES_FILE).get("aliases") or {})
        except UserError as e:
            st.warnings.append(str(e))
    fam_root = root / FAMILIES
    fam_dirs = sorted(p for p in fam_root.iterdir() if (p / "family.json").is_file()) if fam_root.is_dir() else []
    for d in fam_dirs:
        fam = read_family(d, st)
        if fam:
            st.families.append(fam)
    if not fam_dirs:
        st.missing.append("families/<family>/family.json: no training results (accuracies, training curves)")
    if (root / FEATURES).is_file():
        st.features = _read_features(root / FEATURES, st)
    else:
        st.missing.append("features.h5: the feature file")
    for part in (CONSISTENCY, SIMILARITY, DIAGNOSIS):
        if not (root / part).is_dir() or not any((root / part).iterdir()):
            st.missing.append(f"{part}/: no {part} results")
    for d in sorted((root / CONSISTENCY).glob("*")) if (root / CONSISTENCY).is_dir() else []:
        if d.is_dir():
            add_consistency(st, d)
    for part in (SIMILARITY, LAYER_MATRIX):
        found = sorted((root / part).glob("*/similarity.json")) if (root / part).is_dir() else []
        for p in _in_study_order(found, st.info) if part == LAYER_MATRIX else found:
            add_similarity(st, p)
    diag_root = root / DIAGNOSIS
    found = sorted(diag_root.glob("*/diagnosis.json")) + sorted(diag_root.glob("*/*/diagnosis.json"))
    for p in found if diag_root.is_dir() else []:
        add_diagnosis(st, p, p.parent.name if p.parent.parent == diag_root else p.parent.parent.name)
    for d in sorted(diag_root.glob("*")) if diag_root.is_dir() else []:
        if d.is_dir() and not (d / "diagnosis.json").is_file() and not any(d.glob("*/diagnosis.json")):
            st.warnings.append(f"{d.relative_to(root)} has no diagnosis.json: the diagnose run did not finish")
    return st


def _in_study_order(paths: list[Path], info: dict[str, Any] | None) -> list[Path]:
    """Layer-matrix runs in the order of the study file's ``layer_matrix.nets`` (others after them)."""
    nets = ((info or {}).get("layer_matrix") or {}).get("nets") or []
    order = {f"{n[0]}__{n[-1]}": i for i, n in enumerate(nets) if isinstance(n, list) and n}
    return sorted(paths, key=lambda p: (order.get(p.parent.name, len(order)), p.parent.name))


def add_consistency(st: StudyFolder, d: Path) -> None:
    """A consistency folder (``table.json``, ``matrices.json``, ``pairs/``) into ``st.consistency``."""
    if not (d / "table.json").is_file():
        st.warnings.append(f"{d.relative_to(st.root)} has no table.json: the consistency run did not finish "
                           f"(re-run it with --resume)")
        return
    try:
        body = read_json(d / "table.json")
        mats = read_json(d / "matrices.json") if (d / "matrices.json").is_file() else None
        cfg = read_json(d / "config.json") if (d / "config.json").is_file() else {}
    except UserError as e:
        st.warnings.append(str(e))
        return
    rows = body.get("rows", []) if isinstance(body, dict) else []
    if not rows:
        st.warnings.append(f"{d.relative_to(st.root)}/table.json holds no pairs")
        return
    nets = (mats or {}).get("nets") or sorted({r["source"] for r in rows} | {r["target"] for r in rows},
                                             key=natural_key)
    histories = fit_details(d, rows, st.warnings)
    st.consistency[rows[0].get("layer") or d.name] = {"dir": str(d), "rows": rows, "matrices": mats,
                                                      "nets": nets, "config": cfg, "histories": histories}


def add_similarity(st: StudyFolder, p: Path) -> None:
    """A ``similarity.json``: one layer's net x net matrices into ``st.similarity``, a layer x layer run
    (``similarity --layers``: a ``layers`` key) into ``st.layer_matrices``."""
    try:
        body = read_json(p)
    except UserError as e:
        st.warnings.append(str(e))
        return
    if isinstance(body.get("layers"), dict):
        st.layer_matrices.append({**body, "dir": str(p.parent)})
    else:
        st.similarity[body.get("layer") or p.parent.name] = {**body, "dir": str(p.parent)}


def add_diagnosis(st: StudyFolder, p: Path, fallback_layer: str) -> None:
    try:
        body = read_json(p)
    except UserError as e:
        st.warnings.append(str(e))
        return
    st.diagnosis.setdefault(body.get("layer") or fallback_layer, []).append({**body, "dir": str(p.parent)})


def read_results_folder(root: Path) -> StudyFolder:
    """Any folder of results the commands wrote, searched recursively: consistency folders
    (``table.json``), ``similarity.json`` files, diagnose folders (``diagnosis.json``), family manifests
    (``family.json``), and fit-transnet run directories not inside a consistency folder (their
    ``metrics.json`` / ``variance.json`` become the rows of one table per layer)."""
    st = StudyFolder(root)
    cons = sorted(p.parent for p in root.rglob("table.json"))
    inside = lambda p: any(c in p.parents for c in cons)  # noqa: E731  (a pair of a consistency folder)
    for d in cons:
        add_consistency(st, d)
    for p in sorted(root.rglob("similarity.json")):
        add_similarity(st, p)
    for p in sorted(root.rglob("diagnosis.json")):
        add_diagnosis(st, p, p.parent.name)
    for p in sorted(root.rglob("family.json")):
        fam = read_family(p.parent, st)
        if fam:
            st.families.append(fam)
    fits: dict[str, list[dict[str, Any]]] = {}
    for p in sorted(root.rglob("transnet.pt")):
        if inside(p) or not (p.parent / "metrics.json").is_file():
            continue
        try:
            rep = read_json(p.parent / "metrics.json")
            fits.setdefault(rep.get("layer") or "?", []).append(pair_row(rep, os.path.relpath(p.parent, root)))
        except UserError as e:
            st.warnings.append(f"{p.parent.relative_to(root)}: {e}")
    for layer, rows in fits.items():
        nets = sorted({r["source"] for r in rows} | {r["target"] for r in rows}, key=natural_key)
        st.consistency.setdefault(layer, {"dir": str(root), "rows": rows, "matrices": None, "nets": nets,
                                          "config": {}, "histories": fit_details(root, rows, st.warnings)})
    if not (st.consistency or st.similarity or st.layer_matrices or st.diagnosis or st.families):
        raise UserError(f"{root} holds no results: no study folder parts ({', '.join(STUDY_PARTS)}; layout in "
                        f"analysis/study_layout.py) and, anywhere below it, no consistency folder (table.json), "
                        f"similarity.json, diagnosis.json, family.json or fit-transnet run (transnet.pt + "
                        f"metrics.json)")
    st.missing.append("study.json: this is a folder of results, not a study; the report lists what it holds")
    return st
