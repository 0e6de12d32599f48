"""The study folder's layout: the one place that names its parts, used by its writer
(``studies/runner.py``) and its reader (``analysis/study_folder.py``).

    STUDY/study.json                         what was compared (written by the study runner: name,
                                             description, data, members, extract, transnet, pairs,
                                             pair_layers, baselines, layer_matrix, diagnose; any other
                                             keys are shown as given)
    STUDY/state.json                         stage keys, status, times, outputs and (stages that read
                                             images) the data files' fingerprint (the runner's cache);
                                             the study it holds; the stages dropped from its file
    STUDY/aliases.json                       member -> member trained with the same recipe (trained
                                             once, its run directory reused), e.g. ban_g0 -> seed0
    STUDY/families/<family>/family.json      kc-family manifests (training/manifest.py); each member's
                                             checkpoint lies in its run directory (config.json,
                                             metrics.json, log.jsonl, TensorBoard events)
    STUDY/features.h5                        the kc-features file (every member, every layer)
    STUDY/consistency/<layer>/               ``python cli.py consistency`` folders: table.json,
                                             table.csv, matrices.json, config.json, pairs/<A>__<B>/
    STUDY/similarity/<layer>/similarity.json ``python cli.py similarity`` output
    STUDY/layer_matrix/features.h5           a kc-features file of the layer matrices' own: only their
                                             nets, split and layers
    STUDY/layer_matrix/<A>__<B>/             ``python cli.py similarity --layers ... --nets A,B`` output
                                             (similarity.json with a ``layers`` key, layers_<metric>.png/.svg,
                                             config.json), one folder per entry of baselines.layer_matrix.nets;
                                             one net against itself is <A>__<A>
    STUDY/diagnosis/<layer>/                 ``python cli.py diagnose`` folders (diagnosis.json, figures/),
                                             one per layer, or several as diagnosis/<layer>/<A>__<B>/
    STUDY/figures/                           figures made by the report / ``visualize`` (PNG + SVG)
    STUDY/report.html, STUDY/report.md       the report
    STUDY/removed/<path>                     outputs of stages the study file no longer has (kept, not
                                             read by the report; studies/folder.py)
"""
from __future__ import annotations

from pathlib import Path

STUDY_FILE = "study.json"
STATE_FILE = "state.json"
REMOVED = "removed"
ALIASES_FILE = "aliases.json"
FAMILIES = "families"
FEATURES = "features.h5"
CONSISTENCY = "consistency"
SIMILARITY = "similarity"
DIAGNOSIS = "diagnosis"
LAYER_MATRIX = "layer_matrix"
FIGURES = "figures"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
# What makes a folder a study folder (any one of them).
STUDY_PARTS = (STUDY_FILE, STATE_FILE, FAMILIES, FEATURES, CONSISTENCY, SIMILARITY, DIAGNOSIS, LAYER_MATRIX)


def family_dir(root: Path, kind: str) -> Path:
    return Path(root) / FAMILIES / kind


def layer_dir(root: Path, part: str, layer: str) -> Path:
    """``STUDY/<part>/<layer>`` for part ``consistency``, ``similarity`` or ``diagnosis``."""
    if part not in (CONSISTENCY, SIMILARITY, DIAGNOSIS):
        raise ValueError(f"unknown study part {part!r}; valid: {CONSISTENCY}, {SIMILARITY}, {DIAGNOSIS}")
    return Path(root) / part / layer


def layer_matrix_features(root: Path) -> Path:
    """``STUDY/layer_matrix/features.h5``: the features the layer matrices read."""
    return Path(root) / LAYER_MATRIX / FEATURES


def layer_matrix_dir(root: Path, nets: tuple[str, ...] | list[str]) -> Path:
    """``STUDY/layer_matrix/<A>__<B>``: the layer x layer run of nets A and B (one net: ``<A>__<A>``)."""
    if not 1 <= len(nets) <= 2:
        raise ValueError(f"a layer matrix compares one or two nets, got {list(nets)}")
    return Path(root) / LAYER_MATRIX / f"{nets[0]}__{nets[-1]}"
