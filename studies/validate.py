"""Everything wrong with a study file, found before anything runs.

:func:`study_problems` walks the raw study file (as YAML gives it) and returns every problem as one
line: unknown keys, values outside their option's range (``common.ranges``), unknown data sets,
transforms, architectures, optimizers and schedules, layers that do not exist on the members'
architectures (each architecture is built on the ``meta`` device, so nothing is allocated), storage
dtypes, splits, pair plans and the member names they use, the layers pairs are compared at, the
Trans-Net settings and the baselines (the layer x layer matrix's layers among the extracted ones, its
nets among the members). ``load_study`` raises them all at once, so ``study --dry-run`` shows every
problem.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from common.device import PRECISIONS
from common.errors import UserError
from common.ranges import OPTION_TYPES, field_problems, name_problem
from features.config import DATA_ON

# The options of each member family in a study file (studies/runner.py reads them).
MEMBER_KEYS = {
    "seeds": ("arch", "seeds", "train", "prefix", "model", "model_kwargs"),
    "distill": ("arch", "teacher", "alpha", "temperature", "train", "name"),
    "born_again": ("arch", "generations", "lambda", "temperature", "train"),
    "evolve": ("arch", "generations", "split", "split_rate", "train"),
}
DEFAULT_ARCH = "vgg_tiny"
EXTERNAL_PREFIXES = ("timm:", "model:")       # built by timm or the user's entry point, checked when built
SET_BY_STUDY = ("features", "source", "target", "layer")     # Trans-Net options the study fills in itself
BASELINE_KEYS = ("metrics", "split", "permutations", "layer_matrix")
LAYER_MATRIX_KEYS = ("layers", "nets", "metrics", "split", "permutations")   # studies.spec.LayerMatrixSpec


class Problems(list):
    """Problems found so far; ``check`` runs a check and keeps its UserError as one more problem."""

    def check(self, where: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except UserError as e:
            self.append(f"{where}: {e}")
        return None

    def keys(self, where: str, given: Any, valid: Any) -> bool:
        if not isinstance(given, dict):
            self.append(f"{where} must be a mapping, got {given!r}")
            return False
        bad = sorted(set(map(str, given)) - set(valid))
        if bad:
            self.append(f"{where}: unknown key(s) {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
        return True

    def value(self, where: str, option: str, value: Any) -> Any:
        try:
            return OPTION_TYPES[option](value)
        except argparse.ArgumentTypeError as e:
            self.append(f"{where} {e}")
        return None


def _dataclass(p: Problems, cls: type, section: str, values: dict[str, Any], skip: tuple[str, ...] = ()):
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    if not p.keys(section, values, fields):
        return None
    try:
        obj = cls(**{k: v for k, v in values.items() if k in fields})
    except TypeError as e:
        p.append(f"{section}: {e}")
        return None
    p.extend(field_problems(obj, section))
    return obj


def _choice(p: Problems, where: str, value: Any, valid: Any) -> None:
    if value not in valid:
        p.append(f"{where} {value!r} is not one of {', '.join(map(str, valid))}")


def _device(p: Problems, where: str, name: Any) -> None:
    if name == "auto":
        return
    try:
        torch.device(str(name))
    except RuntimeError:
        p.append(f"{where} {name!r} is not a device; valid: auto, cpu, cuda, cuda:N")


# --------------------------------------------------------------------------- sections

def _check_data(p: Problems, raw: Any):
    from training.data import dataset_names
    from training.datasets import DATASETS, DataSpec
    from training.transforms import TRANSFORMS

    data = dict(raw or {}) if isinstance(raw, dict) or raw is None else raw
    if isinstance(data, dict) and "dataset" in data:
        data["name"] = data.pop("dataset")
    spec = _dataclass(p, DataSpec, "data", data)
    if spec is None:
        return None
    base = str(spec.name).split(":", 1)[0] if str(spec.name).startswith("imagefolder:") else spec.name
    if base not in DATASETS.names() or (base == "imagefolder" and ":" not in str(spec.name)):
        p.append(f"data.dataset {spec.name!r} is not a registered data set; valid: {', '.join(dataset_names())}")
    _choice(p, "data.transform", spec.transform, TRANSFORMS.names())
    _choice(p, "data.subset", spec.subset, (None, "A", "B"))
    _choice(p, "data.subset_kind", spec.subset_kind, ("class", "sample"))
    return spec


def _check_train(p: Problems, where: str, values: Any):
    from training.loop import OPTIMIZERS, SCHEDULES, TrainConfig

    cfg = _dataclass(p, TrainConfig, where, dict(values or {}) if isinstance(values, dict) or values is None
                     else values)
    if cfg is not None:
        _choice(p, f"{where}.optimizer", cfg.optimizer, OPTIMIZERS)
        _choice(p, f"{where}.schedule", cfg.schedule, SCHEDULES)
        _device(p, f"{where}.device", cfg.device)
    return cfg


def _member_names(p: Problems, members: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """name -> (family kind, arch) of every member the study will train, checking each family's options."""
    from training.ke import SPLIT_MODES
    from training.models import ARCHS

    names: dict[str, tuple[str, str]] = {}

    def add(name: str, kind: str, arch: str) -> None:
        why = name_problem(name)
        if why:
            p.append(f"members.{kind}: member name {name!r} {why}")
        elif name in names:
            p.append(f"members.{kind}: member name {name!r} is also a member of {names[name][0]}; names must be unique")
        else:
            names[name] = (kind, arch)

    for kind in MEMBER_KEYS:
        given = members.get(kind)
        if given is None:
            continue
        # members.seeds may list several entries (architectures), each with its own prefix
        entries = given if kind == "seeds" and isinstance(given, list) and given else [given]
        for n_entry, opts in enumerate(entries):
            where = f"members.{kind}" + (f"[{n_entry}]" if len(entries) > 1 else "")
            if not p.keys(where, opts, MEMBER_KEYS[kind]):
                continue
            arch = f"model:{opts['model']}" if opts.get("model") else str(opts.get("arch", DEFAULT_ARCH))
            if arch not in ARCHS.names() and not arch.startswith(EXTERNAL_PREFIXES):
                p.append(f"{where}.arch {arch!r} is not a registered architecture; valid: {', '.join(ARCHS.names())}")
            if "train" in opts:
                _check_train(p, f"{where}.train", opts["train"])
            if kind == "seeds":
                seeds = opts.get("seeds", [0, 5])
                seeds = seeds if isinstance(seeds, list) else [seeds]
                ok = [s for s in seeds if p.value(f"{where}.seeds", "seed", s) is not None]
                if not seeds or len(set(map(str, ok))) != len(ok):
                    p.append(f"{where}.seeds must list distinct seeds (integers >= 0), got {seeds!r}")
                prefix = opts.get("prefix", "seed")
                if name_problem(prefix) is None:
                    for s in ok:
                        add(f"{prefix}{int(s)}", kind, arch)
                else:
                    p.append(f"{where}.prefix {prefix!r} {name_problem(prefix)}")
            elif kind == "distill":
                teacher = opts.get("teacher")
                if teacher not in names:
                    p.append(f"{where}.teacher {teacher!r} is not a member trained before the student; "
                             f"members trained before it: {', '.join(names) or 'none'}")
                p.value(f"{where}.alpha", "alpha", opts.get("alpha", 0.9))
                p.value(f"{where}.temperature", "temperature", opts.get("temperature", 4.0))
                add(str(opts.get("name", "kd_student")), kind, arch)
            elif kind == "born_again":
                g = p.value(f"{where}.generations", "generations", opts.get("generations", 3))
                p.value(f"{where}.lambda", "lam", opts.get("lambda", 0.5))
                p.value(f"{where}.temperature", "temperature", opts.get("temperature", 1.0))
                for i in range(g or 0):
                    add(f"ban_g{i}", kind, arch)
            else:
                g = p.value(f"{where}.generations", "generations", opts.get("generations", 3))
                split = str(opts.get("split", "kels")).lower()
                _choice(p, f"{where}.split", split, SPLIT_MODES)
                p.value(f"{where}.split_rate", "split_rate", opts.get("split_rate", 0.5))
                for i in range(1, (g or 0) + 1):
                    add(f"ke_g{i}", kind, arch)
                    if split == "kels":
                        add(f"ke_g{i}_slim", kind, arch)
    return names


def _check_layers(p: Problems, layers: tuple[str, ...], archs: list[str], data) -> None:
    """Resolve every layer on every member architecture, built on the meta device (no memory)."""
    from features.layers import resolve_layer
    from training.data import natural_channels
    from training.models import ARCHS, build_model
    from training.transforms import DEFAULT_SIZE

    size = (data.image_size if data is not None and data.image_size else
            DEFAULT_SIZE.get(getattr(data, "transform", "plain"), 224))
    channels = (data.channels if data is not None and data.channels else
                natural_channels(str(getattr(data, "name", "animal-mnist"))))
    for arch in archs:
        if arch not in ARCHS.names():
            continue
        with torch.device("meta"):
            model = p.check(f"members (arch {arch})", lambda: build_model(arch, 10, channels, size))
        if model is None:
            continue
        for layer in layers:
            if "=" in str(layer):               # a per-net request (NAME=NET:PATH,...): resolved per net at extraction
                continue
            p.check(f"extract.layers {layer!r} on {arch}", lambda: resolve_layer(model, str(layer), arch=arch))


def _check_extract(p: Problems, raw: Any, archs: list[str], data, spec_cls: type):
    from features.extract import DTYPES
    from training.data import SPLITS

    ex = dict(raw or {}) if isinstance(raw, dict) or raw is None else raw
    if isinstance(ex, dict):
        for k in ("layers", "splits"):
            if k in ex:
                ex[k] = tuple([ex[k]] if isinstance(ex[k], str) else ex[k] or ())
    spec = _dataclass(p, spec_cls, "extract", ex)
    if spec is None:
        return None
    if not spec.layers:
        p.append("extract.layers must name at least one layer (e.g. features.8); python cli.py list-layers "
                 "--arch ARCH lists them")
    splits = list(spec.splits)
    if not splits or len(set(splits)) != len(splits) or any(s not in SPLITS for s in splits):
        p.append(f"extract.splits must list distinct splits of {', '.join(SPLITS)}, got {splits!r}")
    _choice(p, "extract.dtype", spec.dtype, DTYPES)
    if not isinstance(spec.logits, bool):
        p.append(f"extract.logits must be true or false, got {spec.logits!r}")
    if getattr(spec, "precision", None) is not None:
        _choice(p, "extract.precision", spec.precision, PRECISIONS)
    _choice(p, "extract.data_on", spec.data_on, DATA_ON)
    _check_layers(p, spec.layers, archs, data)
    return spec


def _check_transnet(p: Problems, raw: Any) -> None:
    from transnet.fit import FitConfig, validate

    if raw is None:
        return
    t = dict(raw) if isinstance(raw, dict) else raw
    if isinstance(t, dict):
        given = sorted(set(t) & set(SET_BY_STUDY))
        if given:
            p.append(f"transnet: {', '.join(given)} are set by the study itself (per pair and layer)")
        if isinstance(t.get("alpha"), (list, tuple)):
            t["alpha"] = ",".join(str(a) for a in t["alpha"])
        auto = t.get("epochs") == "auto"                       # fit-transnet --epochs auto: chosen by validation
        if auto:
            t = {k: v for k, v in t.items() if k != "epochs"}
        t = {k: v for k, v in t.items() if k not in SET_BY_STUDY}
    cfg = _dataclass(p, FitConfig, "transnet", t, skip=SET_BY_STUDY)
    if cfg is None:
        return
    _device(p, "transnet.device", cfg.device)
    if not [x for x in p if x.startswith("transnet.")]:
        p.check("transnet", lambda: validate(dataclasses.replace(cfg, features="f", source="a", target="b",
                                                                 layer="l")))


def _check_pairs(p: Problems, raw: Any, names: dict[str, tuple[str, str]], kinds: list[str]) -> list[tuple[str, str]]:
    from analysis.consistency import plan_pairs

    pairs: list[tuple[str, str]] = []
    if not isinstance(raw, list) or not raw:
        p.append("pairs is empty or not a list; give e.g. [{family: seeds, plan: all}] or ['seed0>seed5']")
        return pairs
    for i, item in enumerate(raw):
        where = f"pairs[{i}]"
        if isinstance(item, str):
            item = {"plan": item}
        if not p.keys(where, item, ("plan", "nets", "family")):
            continue
        fam = item.get("family")
        if fam is not None:
            if fam not in kinds:
                p.append(f"{where}.family {fam!r} is not a family of this study; families: {', '.join(kinds)}")
                continue
            nets = [n for n, (k, _) in names.items() if k == fam]
        else:
            nets = item.get("nets") or list(names)
            if not isinstance(nets, list):
                p.append(f"{where}.nets must be a list of member names, got {nets!r}")
                continue
        unknown = [n for n in nets if n not in names]
        if unknown:
            p.append(f"{where}.nets names unknown member(s) {', '.join(map(repr, unknown))}; members: "
                     f"{', '.join(names)}")
            continue
        got = p.check(where, lambda: plan_pairs([str(n) for n in nets], str(item.get("plan", "all"))))
        pairs += [q for q in got or [] if q not in pairs]
    return pairs


def _check_baselines(p: Problems, raw: Any, splits: tuple[str, ...], names: dict[str, tuple[str, str]]) -> None:
    from analysis.similarity_run import parse_metrics

    if isinstance(raw, dict):
        if not p.keys("baselines", raw, BASELINE_KEYS):
            return
        split = raw.get("split", "test")
        if split not in splits:
            p.append(f"baselines.split {split!r} is not an extracted split; extracted: {', '.join(splits)}")
        p.value("baselines.permutations", "permutations", raw.get("permutations", 20))
        if raw.get("layer_matrix") is not None:
            _check_layer_matrix(p, raw["layer_matrix"], split, splits, names)
        raw = raw.get("metrics") or ()
    metrics = [raw] if isinstance(raw, str) else list(raw or ())
    for m in metrics:
        p.check("baselines", lambda: parse_metrics(str(m)))


def _check_layer_matrix(p: Problems, raw: Any, split: Any, splits: tuple[str, ...],
                        names: dict[str, tuple[str, str]]) -> None:
    """``baselines.layer_matrix``: two or more distinct layers (extracted into the matrices' own file, so
    the extraction names a layer a net lacks), entries of one or two members,
    known metrics, an extracted split, a permutation count."""
    from analysis.similarity_run import parse_metrics

    where = "baselines.layer_matrix"
    if not p.keys(where, raw, LAYER_MATRIX_KEYS):
        return
    want = raw.get("layers")
    want = [want] if isinstance(want, str) else want
    if not isinstance(want, list) or len(want) < 2 or len(set(map(str, want))) != len(want):
        p.append(f"{where}.layers must list two or more distinct layers (module paths of the nets), got {want!r}")
    nets = raw.get("nets")
    if not isinstance(nets, list) or not nets:
        p.append(f"{where}.nets must list entries of one member (its layers with each other) or two (A's layers "
                 f"against B's), e.g. [[seed0, seed5], [seed0]]; got {nets!r}")
        nets = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(nets):
        entry = [entry] if isinstance(entry, str) else entry
        if not isinstance(entry, list) or not 1 <= len(entry) <= 2:
            p.append(f"{where}.nets[{i}] must be one member name or a list of one or two, got {entry!r}")
            continue
        pair = (str(entry[0]), str(entry[-1]))        # [A] and [A, A] are one matrix: A's layers with each other
        if pair in seen:
            p.append(f"{where}.nets[{i}] {entry!r} repeats an earlier entry (each matrix once)")
        seen.add(pair)
        unknown = [n for n in entry if n not in names]
        if unknown:
            p.append(f"{where}.nets[{i}] names unknown member(s) {', '.join(map(repr, unknown))}; members: "
                     f"{', '.join(names)}")
    for m in [raw["metrics"]] if isinstance(raw.get("metrics"), str) else list(raw.get("metrics") or ["cka"]):
        p.check(f"{where}.metrics", lambda: parse_metrics(str(m)))
    own = raw.get("split", split)
    if own not in splits:
        p.append(f"{where}.split {own!r} is not an extracted split; extracted: {', '.join(splits)}")
    p.value(f"{where}.permutations", "permutations", raw.get("permutations", 0))


def _check_pair_layers(p: Problems, raw: Any, layers: list[str]) -> None:
    """``pair_layers``: the extracted layers at which pairs are compared (default: every one)."""
    if raw is None:
        return
    given = [raw] if isinstance(raw, str) else raw
    if not isinstance(given, list) or not given or len(set(map(str, given))) != len(given):
        p.append(f"pair_layers must list distinct extracted layers, got {raw!r}; extracted: {', '.join(layers)}")
        return
    for layer in given:
        if str(layer) not in layers:
            p.append(f"pair_layers {layer!r} is not an extracted layer; extracted: {', '.join(layers)} "
                     f"(add it to extract.layers)")


def _layer_names(requests: tuple[str, ...]) -> list[str]:
    """The names the extracted layers are stored under (NAME of a per-net request NAME=NET:PATH,...)."""
    from features.layers import layer_name

    out = []
    for r in requests:
        with contextlib.suppress(UserError):    # a malformed request: reported by the extract checks
            out.append(layer_name(str(r)))
    return out


def study_problems(raw: dict[str, Any], top_keys: tuple[str, ...], extract_spec: type) -> list[str]:
    """Every problem of a study file (empty when it is valid); ``extract_spec``: the dataclass of the
    extract section (``studies.spec.ExtractSpec``)."""
    p = Problems()
    p.keys("the study file", raw, top_keys)
    data = _check_data(p, raw.get("data"))
    train = dict(raw.get("train") or {}) if isinstance(raw.get("train") or {}, dict) else raw.get("train")
    if raw.get("device") and isinstance(train, dict):
        train["device"] = raw["device"]
    _check_train(p, "train", train)
    members = raw.get("members")
    names: dict[str, tuple[str, str]] = {}
    if not isinstance(members, dict) or not members:
        p.append(f"members must map family kinds to options; valid kinds: {', '.join(MEMBER_KEYS)}")
        members = {}
    elif p.keys("members", members, tuple(MEMBER_KEYS)):
        names = _member_names(p, members)
    archs = sorted({a for _, a in names.values()})
    ex = _check_extract(p, raw.get("extract"), archs, data, extract_spec)
    _check_transnet(p, raw.get("transnet"))
    before = len(p)
    pairs = _check_pairs(p, raw.get("pairs"), names, [k for k in MEMBER_KEYS if k in members])
    pairs_ok = len(p) == before
    extracted = _layer_names(ex.layers) if ex is not None else None      # None: the extract section is broken
    if extracted is not None:
        _check_pair_layers(p, raw.get("pair_layers"), extracted)
    _check_baselines(p, raw.get("baselines"), tuple(ex.splits) if ex is not None else ("train", "test"), names)
    diag = raw.get("diagnose")
    if diag is not None:
        if not (isinstance(diag, list) and len(diag) == 2 and diag[0] != diag[1]):
            p.append(f"diagnose must be a pair [A, B] of two members, got {diag!r}")
        elif any(n not in names for n in diag):
            p.append(f"diagnose names unknown member(s) {', '.join(repr(n) for n in diag if n not in names)}; "
                     f"members: {', '.join(names)}")
        elif pairs_ok and ((diag[0], diag[1]) not in pairs or (diag[1], diag[0]) not in pairs):
            p.append(f"diagnose [{diag[0]}, {diag[1]}] needs both {diag[0]}>{diag[1]} and {diag[1]}>{diag[0]} among "
                     f"the pairs (it reads both Trans-Nets)")
    if not isinstance(raw.get("report", True), bool):
        p.append(f"report must be true or false, got {raw.get('report')!r}")
    if raw.get("device") is not None:
        _device(p, "device", raw["device"])
    return list(p)
