"""The study file: one YAML file naming the data, the members to train, the layers, the pairs, the
Trans-Net settings and the baselines, read into a validated :class:`Study`. See ``studies/*.yaml``."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.device import PRECISIONS
from common.errors import UserError
from common.files import load_config_file
from features.extract import DATA_ON, ExtractConfig
from studies.validate import BASELINE_KEYS, LAYER_MATRIX_KEYS, study_problems
from training.datasets import DataSpec
from training.loop import TrainConfig

FAMILY_KINDS = ("seeds", "distill", "born_again", "evolve")
TOP_KEYS = ("name", "description", "data", "train", "members", "extract", "pair_layers", "transnet", "pairs",
            "baselines", "diagnose", "report", "device")
STUDIES_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ExtractSpec:
    """The study's ``extract`` section: its layers and splits, and the options it shares with the
    ``extract`` command, whose defaults (:class:`ExtractConfig`'s) it takes: float16 storage, no
    logits, batch 64, fp32 arithmetic (TF32 off). Those win over a study-only set because they are the
    documented defaults of ``extract`` and the cheaper ones (float16 halves the file; nothing in a study
    reads logits); a study that wants float32, logits or another batch size says so, as the shipped
    studies do."""

    layers: tuple[str, ...] = ()                                    # module paths (features.8) or fx nodes
    splits: tuple[str, ...] = tuple(ExtractConfig.split.split(","))
    dtype: str = ExtractConfig.dtype                                # storage dtype of the layer features
    batch_size: int = ExtractConfig.batch_size                      # images per forward pass
    logits: bool = ExtractConfig.logits                             # also store each net's logits
    limit: int = ExtractConfig.limit                                # only the first N images of every split (0: all)
    precision: str = ExtractConfig.precision                        # CUDA arithmetic: fp32 | tf32 | bf16 (CPU: fp32)
    data_on: str = ExtractConfig.data_on                            # inputs: auto | loader | device (the image cache)

    def config(self, device: str) -> ExtractConfig:
        """The extraction this section asks for, on ``device`` (the fields it shares with ExtractConfig)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(ExtractConfig) if hasattr(self, f.name)}
        return ExtractConfig(split=",".join(self.splits), device=device, **shared)


@dataclass(frozen=True)
class PairGroup:
    """One group of pairs: a plan (all | chain | star:NAME) over nets, or explicit ``A>B`` pairs."""

    plan: str
    nets: tuple[str, ...] = ()
    family: str | None = None


@dataclass(frozen=True)
class LayerMatrixSpec:
    """``baselines.layer_matrix``: every metric between every pair of ``layers`` (extracted layers) for
    each entry of ``nets``: one net (its layers against each other) or two, A and B (A's layers as rows,
    B's as columns), as ``python cli.py similarity --layers L1,L2 --nets A,B`` computes it. No
    permutation null unless asked: a layer matrix is read for its pattern, and each permutation is
    another pass over every pair of layers."""

    layers: tuple[str, ...]
    nets: tuple[tuple[str, ...], ...]
    metrics: tuple[str, ...] = ("cka",)
    split: str = "test"
    permutations: int = 0

    @classmethod
    def from_raw(cls, raw: dict[str, Any], split: str) -> LayerMatrixSpec:
        """The section as the (validated) study file gives it; ``split``: the baselines' split, the default."""
        check_keys("baselines.layer_matrix", raw, LAYER_MATRIX_KEYS)
        as_tuple = lambda v: tuple([v] if isinstance(v, str) else v or ())  # noqa: E731
        return cls(layers=tuple(map(str, as_tuple(raw.get("layers")))),
                   nets=tuple(tuple(map(str, as_tuple(n))) for n in raw.get("nets") or ()),
                   metrics=tuple(map(str, as_tuple(raw.get("metrics", cls.metrics)))),
                   split=str(raw.get("split", split)), permutations=int(raw.get("permutations", cls.permutations)))


@dataclass(frozen=True)
class Study:
    name: str
    data: DataSpec
    train: TrainConfig
    members: dict[str, dict[str, Any]]
    extract: ExtractSpec
    transnet: dict[str, Any]
    pairs: tuple[PairGroup, ...]
    baselines: tuple[str, ...]
    diagnose: tuple[str, str] | None
    report: bool = True
    description: str = ""
    similarity_split: str = "test"
    permutations: int = 20
    pair_layers: tuple[str, ...] = ()             # where pairs are compared (load_study: default every extracted layer)
    layer_matrix: LayerMatrixSpec | None = None   # baselines.layer_matrix


# A study's Trans-Nets stop on a plateau of their validation loss unless the study file fixes ``epochs``.
TRANSNET_DEFAULTS: dict[str, Any] = {"epochs": "auto"}


def fit_config(study: Study):
    """The study's Trans-Net options (``transnet:`` over :data:`TRANSNET_DEFAULTS`; the training device
    unless the section names one) as a ``FitConfig`` without the per-pair fields."""
    from transnet.fit import FitConfig

    t = {**TRANSNET_DEFAULTS, **study.transnet}
    if "alpha" in t and isinstance(t["alpha"], (list, tuple)):
        t["alpha"] = ",".join(str(a) for a in t["alpha"])
    t.setdefault("device", study.train.device)
    return section_dataclass(FitConfig, "transnet", t)


def check_keys(section: str, given: dict[str, Any], valid: Sequence[str]) -> None:
    bad = sorted(set(given) - set(valid))
    if bad:
        raise UserError(f"study file: unknown key(s) {', '.join(repr(b) for b in bad)} in {section}; "
                        f"valid: {', '.join(valid)}")


def section_dataclass(cls: type, section: str, values: dict[str, Any] | None, **fixed: Any):
    values = dict(values or {})
    check_keys(section, values, [f.name for f in dataclasses.fields(cls)])
    try:
        return cls(**{**values, **fixed})
    except TypeError as e:
        raise UserError(f"study file: {section}: {e}") from None


def resolve_pair_layers(raw: Any, extract: ExtractSpec) -> tuple[str, ...]:
    """The layers at which the pairs are compared (Trans-Nets, similarity baselines, diagnosis): the
    study file's ``pair_layers``, else every extracted layer (by the name it is stored under)."""
    from features.layers import layer_name

    if raw is None:
        return tuple(map(layer_name, extract.layers))
    return tuple(map(str, [raw] if isinstance(raw, str) else raw))


def load_study(path: str | os.PathLike) -> Study:
    """Read and validate a study file; unknown keys and bad values fail with the valid choices."""
    if not Path(path).is_file():
        shipped = sorted(str(p.relative_to(STUDIES_DIR.parent)) for p in STUDIES_DIR.glob("*.yaml"))
        raise UserError(f"study file {path} does not exist; shipped studies: {', '.join(shipped) or 'none'}")
    raw = load_config_file(path)
    problems = study_problems(raw, TOP_KEYS, ExtractSpec)
    if problems:
        raise UserError(f"study file {path} has {len(problems)} problem(s), nothing was run: "
                        + " ".join(f"({i}) {m}" for i, m in enumerate(problems, 1)))
    check_keys("the study file", raw, TOP_KEYS)
    data = dict(raw.get("data") or {})
    if "dataset" in data:
        data["name"] = data.pop("dataset")
    data_spec = section_dataclass(DataSpec, "data", data)
    train = section_dataclass(TrainConfig, "train", {**(raw.get("train") or {}),
                                       **({"device": raw["device"]} if raw.get("device") else {})})
    members = raw.get("members") or {}
    if not isinstance(members, dict) or not members:
        raise UserError(f"study file: members must map family kinds to options; valid kinds: {', '.join(FAMILY_KINDS)}")
    check_keys("members", members, FAMILY_KINDS)
    ex = dict(raw.get("extract") or {})
    for k in ("layers", "splits"):
        if k in ex:
            ex[k] = tuple([ex[k]] if isinstance(ex[k], str) else ex[k])
    extract = section_dataclass(ExtractSpec, "extract", ex)
    if extract.precision not in PRECISIONS:
        raise UserError(f"study file: extract.precision {extract.precision!r} is unknown; valid: {', '.join(PRECISIONS)}")
    if extract.data_on not in DATA_ON:
        raise UserError(f"study file: extract.data_on {extract.data_on!r} is unknown; valid: {', '.join(DATA_ON)}")
    if not extract.layers:
        raise UserError("study file: extract.layers must name at least one layer (e.g. features.8); "
                        "python cli.py list-layers --arch ARCH lists them")
    groups = []
    for item in raw.get("pairs") or []:
        if isinstance(item, str):
            groups.append(PairGroup(plan=item))
        elif isinstance(item, dict):
            check_keys("a pairs entry", item, ("plan", "nets", "family"))
            groups.append(PairGroup(plan=str(item.get("plan", "all")), nets=tuple(item.get("nets") or ()),
                                    family=item.get("family")))
        else:
            raise UserError(f"study file: a pairs entry must be a string or a mapping, got {item!r}")
    if not groups:
        raise UserError("study file: pairs is empty; give e.g. [{family: seeds, plan: all}] or ['seed0>seed5']")
    base = raw.get("baselines") or ()
    sim_split, perms, layer_matrix = "test", 20, None
    if isinstance(base, dict):  # {metrics: [...], split: test, permutations: 20, layer_matrix: {...}}
        check_keys("baselines", base, BASELINE_KEYS)
        sim_split, perms = str(base.get("split", sim_split)), int(base.get("permutations", perms))
        if base.get("layer_matrix") is not None:
            layer_matrix = LayerMatrixSpec.from_raw(base["layer_matrix"], sim_split)
        base = base.get("metrics") or ()
    base = tuple([base] if isinstance(base, str) else base)
    if base:
        from analysis.similarity_run import parse_metrics

        parse_metrics(",".join(base))
    diag = raw.get("diagnose")
    if diag is not None:
        if not (isinstance(diag, (list, tuple)) and len(diag) == 2):
            raise UserError(f"study file: diagnose must be a pair [A, B], got {diag!r}")
        diag = (str(diag[0]), str(diag[1]))
    study = Study(name=str(raw.get("name") or Path(path).stem), data=data_spec, train=train, members=members,
                  extract=extract, transnet=dict(raw.get("transnet") or {}), pairs=tuple(groups),
                  baselines=base, diagnose=diag, report=bool(raw.get("report", True)),
                  description=str(raw.get("description") or ""), similarity_split=sim_split, permutations=perms,
                  pair_layers=resolve_pair_layers(raw.get("pair_layers"), extract), layer_matrix=layer_matrix)
    fit_config(study)           # the Trans-Net settings are checked now (epochs: a number or auto)
    return study
