"""The study runner: a whole study from one declarative file (``studies/spec.py``): train a family,
extract, fit Trans-Nets, compare, diagnose, report.

    python cli.py study studies/demo.yaml --out_dir runs/demo [--dry-run]

The study file (YAML) names the data set, the members to train (seeds, a KD student, Born-Again
generations, Knowledge-Evolution generations with slim nets), the layers to extract, the pairs to
compare, the Trans-Net settings, the similarity baselines and the report. See ``studies/*.yaml``.

Every stage is cached (``studies/cache.py``). Its *key* is a content hash of its own options and of what it reads (the
sha256 of every checkpoint it uses, the keys of the stages it depends on). ``state.json`` records each
stage's key and status: a stage whose outputs are complete and whose key is unchanged is skipped; an
interrupted stage with the same key resumes; a stage whose key changed is redone from scratch (its
outputs replaced), and so is everything downstream, whose keys change with it.

A study folder holds one study, known by its ``name``; a stage its study file no longer has moves to
``STUDY/removed/`` (``studies/folder.py``).

The study folder's layout (what ``report`` reads) is ``analysis/study_layout.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from analysis.study_layout import (
    ALIASES_FILE,
    CONSISTENCY,
    DIAGNOSIS,
    FAMILIES,
    FEATURES,
    FIGURES,
    REPORT_HTML,
    REPORT_MD,
    SIMILARITY,
    layer_dir,
)
from common.distributed import RANK_WAIT, ControlGroup, DistInfo, local_only
from common.errors import UserError
from common.files import load_config_file, read_json, write_json
from common.provenance import now_utc, sha256_file, sha256_json
from common.registry import unknown_choice_message
from common.rundir import RunDir, is_finished
from studies.cache import (
    REMOVED,
    Stage,
    StudyState,
    data_source,
    outputs_exist,
    remove_outputs,
    seen_before,
    stage_mode,
)
from studies.folder import check_same_study, dropped_stages, record_study, retire_dropped_stages, write_study_json
from studies.layer_matrix import layer_matrix_stages
from studies.spec import FAMILY_KINDS, Study, check_keys, fit_config, load_study
from training.loop import TrainConfig
from training.manifest import Member, read_manifest, write_manifest
from training.models import parse_model_kwargs
from training.runner import ModelSpec, run_training


class StudyRunner:
    """Builds the stages of a study and runs them in order with caching."""

    def __init__(self, study: Study, study_file: str | os.PathLike, out_dir: str | os.PathLike,
                 log: Callable[[str], None] = print, ranks: ControlGroup | None = None):
        self.study, self.study_file, self.root = study, Path(study_file), Path(out_dir)
        self.ranks = ranks or ControlGroup(timeout=RANK_WAIT)   # others wait while rank 0 trains a family
        self.log = log if self.ranks.main else (lambda m: None)
        self.features = self.root / FEATURES
        self.fam_dir = self.root / FAMILIES
        self._keys: dict[str, str] = {}    # stage keys computed so far in this run or plan

    # ------------------------------------------------------------------ members
    def family_members(self, kind: str) -> list[Member]:
        path = self.fam_dir / kind / "family.json"
        return read_manifest(path) if path.exists() else []

    def all_members(self) -> dict[str, Member]:
        """Every member of every trained family, by name (a teacher listed twice is one member)."""
        out: dict[str, Member] = {}
        for kind in self.study.members:
            for m in self.family_members(kind):
                if m.name in out and Path(out[m.name].checkpoint).resolve() != Path(m.checkpoint).resolve():
                    raise UserError(f"member name {m.name!r} names two checkpoints: {out[m.name].checkpoint} "
                                    f"and {m.checkpoint}; rename one in the study file")
                out.setdefault(m.name, m)
        return out

    def data_source(self) -> str | None:
        """:func:`studies.cache.data_source` of the study's data, over the splits it reads (once a run)."""
        if not hasattr(self, "_data_source"):
            self._data_source = data_source(self.study.data, sorted({"train", "test", *self.study.extract.splits}))
        return self._data_source

    def member_hashes(self, names: Sequence[str] | None = None) -> dict[str, str]:
        members = self.all_members()
        names = sorted(members) if names is None else names
        return {n: sha256_file(members[n].checkpoint) for n in names if n in members}

    # ------------------------------------------------------------------ stages
    def stages(self) -> list[Stage]:
        s = self.study
        st: list[Stage] = []
        base_key = {"data": asdict(s.data), "train": asdict(s.train)}
        for kind in FAMILY_KINDS:
            if kind in s.members:
                st.append(self._family_stage(kind, s.members[kind], base_key))
        st.append(Stage("extract", self._extract_key, self._run_extract, self._extract_ok, (self.features,),
                        reads_outputs=True, dist_run=self._run_extract, reads_data=True))
        for layer in s.pair_layers:           # extracted layers by stored name (NAME of NAME=NET:PATH,...)
            st.append(self._consistency_stage(layer))
            if s.baselines:
                st.append(self._similarity_stage(layer))
            if s.diagnose:
                st.append(self._diagnose_stage(layer))
        st += layer_matrix_stages(self)
        if s.report:
            upstream = [x.name for x in st]
            st.append(Stage("report", lambda: {"upstream": [self.done_key(n) for n in upstream]},
                            self._run_report, lambda: (self.root / REPORT_HTML).exists(),
                            (self.root / FIGURES, self.root / REPORT_HTML, self.root / REPORT_MD)))
        return st

    def done_key(self, name: str) -> str | None:
        """The key of an upstream stage: as computed in this run (or plan), else as last recorded."""
        if name in self._keys:
            return self._keys[name]
        return StudyState(self.root).get(name).get("key")

    # -- families
    def _family_stage(self, kind: str, opts: dict[str, Any], base_key: dict[str, Any]) -> Stage:
        out = self.fam_dir / kind

        def key() -> dict[str, Any]:
            k = {**base_key, "kind": kind, "options": opts}
            if kind == "distill":  # the teacher is another member: its content is an input
                teacher = str(opts.get("teacher", ""))
                k["teacher_sha256"] = self.member_hashes([teacher]).get(teacher)
            alias = self.first_alias(kind, opts)
            if alias:              # a reused member's checkpoint is an input too
                k["reuses"] = {alias[0]: self.member_hashes([alias[0]]).get(alias[0])}
            return k

        def ok() -> bool:
            try:
                members = read_manifest(out / "family.json")
            except UserError:
                return False
            return all(Path(m.checkpoint).is_file() and (m.sha256 is None or sha256_file(m.checkpoint) == m.sha256)
                       for m in members)

        run = lambda mode: self._run_family(kind, opts, out, mode)  # noqa: E731
        return Stage(f"train/{kind}", key, run, ok, (out,), reads_outputs=kind == "distill",
                     independent=kind != "distill", dist_run=run if kind == "seeds" else None, reads_data=True)

    # -- members trained once: one recipe, one training
    def seed_recipes(self) -> dict[str, tuple[str, Path]]:
        """Recipe hash -> (member name, run directory) of the seeds family's members trained so far."""
        from training.families import recipe_hash

        opts = self.study.members.get("seeds")
        if not opts:
            return {}
        cfg = self._train_cfg(opts)
        arch, prefix = str(opts.get("arch", "vgg_tiny")), str(opts.get("prefix", "seed"))
        out = {}
        for seed in [int(x) for x in opts.get("seeds", [0, 5])]:
            run_dir = self.fam_dir / "seeds" / f"{prefix}{seed}"
            if is_finished(run_dir):
                out[recipe_hash(arch, self.study.data, replace(cfg, seed=seed))] = (f"{prefix}{seed}", run_dir)
        return out

    def first_alias(self, kind: str, opts: dict[str, Any]) -> tuple[str, Path] | None:
        """(member, run dir) of a trained seed whose recipe equals the first generation of a Born-Again
        (generation 0: cross-entropy, seed ``train.seed``) or Knowledge-Evolution family (generation 1:
        the same, before any split re-initialisation); None when no seed shares it."""
        from training.families import recipe_hash

        if kind not in ("born_again", "evolve"):
            return None
        cfg = self._train_cfg(opts)
        recipe = recipe_hash(str(opts.get("arch", "vgg_tiny")), self.study.data, cfg)
        return self.seed_recipes().get(recipe)

    def record_alias(self, kind: str, first: tuple[str, Path] | None) -> None:
        """Write ``aliases.json``: member -> the member it is a copy of (one recipe, trained once)."""
        path = self.root / ALIASES_FILE
        body = read_json(path) if path.exists() else {"aliases": {}, "note": ""}
        gen = 0 if kind == "born_again" else 1
        for m in self.family_members(kind):
            if m.generation == gen and m.role == "generation":
                if first:
                    body["aliases"][m.name] = first[0]
                else:
                    body["aliases"].pop(m.name, None)
        body["note"] = ("member -> member with the same training recipe (architecture, data, every training "
                        "option and seed, loss, no teacher): trained once, its run directory reused")
        write_json(path, body)

    def _train_cfg(self, opts: dict[str, Any]) -> TrainConfig:
        over = dict(opts.get("train") or {})
        check_keys("members.*.train", over, [f.name for f in dataclasses.fields(TrainConfig)])
        return replace(self.study.train, **over)

    @staticmethod
    def _model_spec(opts: dict[str, Any]) -> tuple[str, ModelSpec]:
        """A member's arch (``arch``, a registry name or timm:NAME, or ``model``, an entry point) and spec."""
        arch = f"model:{opts['model']}" if opts.get("model") else str(opts.get("arch", "vgg_tiny"))
        return arch, ModelSpec(arch, kwargs=parse_model_kwargs(opts.get("model_kwargs")))

    def _run_seeds(self, opts: dict[str, Any] | list[dict[str, Any]], out: Path, mode: str) -> None:
        """``members.seeds``: one entry (arch, seeds, prefix) or a list of them (several architectures, e.g.
        a CNN and a ViT, each with its own prefix); every member of every entry goes into one family."""
        entries = [dict(e) for e in (opts if isinstance(opts, list) else [opts])]
        out.mkdir(parents=True, exist_ok=True)
        members, r = [], self.ranks
        for entry in entries:
            check_keys("members.seeds", entry, ("arch", "seeds", "train", "prefix", "model", "model_kwargs"))
            cfg = self._train_cfg(entry)
            arch, spec = self._model_spec(entry)
            seeds = [int(x) for x in entry.get("seeds", [0, 5])]
            prefix = str(entry.get("prefix", "seed"))
            mine = seeds[r.rank::r.world] if r.world > 1 else seeds     # under torchrun: round-robin over ranks

            def train_mine(mine=mine, spec=spec, cfg=cfg, prefix=prefix) -> None:
                for seed in mine:
                    with local_only():
                        self._train_seed(spec, cfg, seed, out / f"{prefix}{seed}", mode)

            if r.world > 1:          # every rank agrees whether all trained (a failure fails all, none waits)
                r.together("training the seeds", train_mine)
                if not r.main:
                    continue
            else:
                train_mine()
            for seed in seeds:
                run_dir = out / f"{prefix}{seed}"
                self._train_seed(spec, cfg, seed, run_dir, mode)
                m = read_json(run_dir / "metrics.json")
                members.append(Member(f"{prefix}{seed}", str(run_dir / "last.pt"), "seed", arch=arch,
                                      metrics={"test_top1": m.get("test_top1")}))
        if r.main:
            one = len(entries) == 1
            seeds_cfg = [e.get("seeds", [0, 5]) for e in entries]
            train_cfg = [asdict(self._train_cfg(e)) for e in entries]
            write_manifest(out, "seeds", members, config={"data": asdict(self.study.data),
                                                          "train": train_cfg[0] if one else train_cfg,
                                                          "seeds": seeds_cfg[0] if one else seeds_cfg})

    def _train_seed(self, spec: ModelSpec, cfg: TrainConfig, seed: int, run_dir: Path, mode: str) -> None:
        if is_finished(run_dir):
            return
        name = run_dir.name
        self.log(f"  training {name} ({spec.arch}, {cfg.epochs} epochs)")
        has = run_dir.is_dir() and any(run_dir.iterdir())
        res = run_training(self.study.data, spec, replace(cfg, seed=seed), run_dir,
                           "resume" if has and mode != "overwrite" else ("overwrite" if has else "new"), desc=name)
        self.log(f"  {name}: test top-1 {res.metrics['test_top1']:.2f}%")

    def _run_family(self, kind: str, opts: dict[str, Any], out: Path, mode: str) -> None:
        from training.born_again import BANConfig, born_again
        from training.distill import KDConfig, distill
        from training.evolution import EvolveConfig, evolve

        s = self.study
        if kind == "seeds":
            self._run_seeds(opts, out, mode)
            return
        opts = dict(opts)
        cfg = self._train_cfg(opts)
        arch, spec = self._model_spec(opts)
        if kind == "distill":
            check_keys("members.distill", opts, ("arch", "teacher", "alpha", "temperature", "train", "name", "model",
                                                 "model_kwargs"))
            teacher = str(opts.get("teacher", ""))
            members = self.all_members()
            if teacher not in members:
                raise UserError(unknown_choice_message("teacher member", teacher, sorted(members),
                                                       "The teacher must be a member trained earlier in the study."))
            kd = KDConfig(teacher=members[teacher].checkpoint, alpha=float(opts.get("alpha", 0.9)),
                          temperature=float(opts.get("temperature", 4.0)), teacher_name=teacher,
                          student_name=str(opts.get("name", "kd_student")))
            self.log(f"  distilling {kd.student_name} ({arch}) from {teacher}, alpha {kd.alpha}, T {kd.temperature}")
            res = distill(s.data, spec, kd, cfg, out, mode)
            self.log(f"  {kd.student_name}: test top-1 {res.train.metrics['test_top1']:.2f}% "
                     f"(teacher {res.teacher_metrics['test_top1']:.2f}%)")
        elif kind == "born_again":
            check_keys("members.born_again", opts, ("arch", "generations", "lambda", "temperature", "train", "model",
                                                    "model_kwargs"))
            ban = BANConfig(generations=int(opts.get("generations", 3)), lam=float(opts.get("lambda", 0.5)),
                            temperature=float(opts.get("temperature", 1.0)))
            self.log(f"  born-again: {ban.generations} generations of {arch}, lambda {ban.lam}, T {ban.temperature}")
            first = self.first_alias(kind, opts)
            if first:
                self.log(f"  {ban.name_prefix}0 has the recipe of {first[0]}: reusing its run, not training it again")
            res = born_again(s.data, spec, ban, cfg, out, mode, reuse=first[1] if first else None)
            self.record_alias(kind, first)
            for r in res.generations:
                self.log(f"  {r['name']}: test top-1 {r['test_top1']:.2f}%, ensemble {r['ensemble_top1']:.2f}%")
        elif kind == "evolve":
            check_keys("members.evolve", opts, ("arch", "generations", "split", "split_rate", "train", "model",
                                                "model_kwargs"))
            ke = EvolveConfig(generations=int(opts.get("generations", 3)), split=str(opts.get("split", "kels")).lower(),
                              split_rate=float(opts.get("split_rate", 0.5)))
            self.log(f"  knowledge evolution: {ke.generations} generations of {arch}, {ke.split} split {ke.split_rate}")
            first = self.first_alias(kind, opts)
            rows = evolve(s.data, spec, cfg, ke, out, mode, log=lambda m: self.log("  " + m),
                          reuse=first[1] if first else None)
            self.record_alias(kind, first)
            for r in rows:
                slim = f", slim {r['slim_top1']:.2f}%" if r.get("slim_top1") is not None else ""
                self.log(f"  ke_g{r['generation']}: dense {r['dense_top1']:.2f}%{slim}")

    # -- extraction
    def _extract_key(self) -> dict[str, Any]:
        return {"extract": asdict(self.study.extract), "data": asdict(self.study.data),
                "members": self.member_hashes()}

    def _extract_ok(self) -> bool:
        e = self.study.extract
        return self.extracted(self.features, list(self.all_members()), e.layers, e.splits)

    def extracted(self, path: Path, names: Sequence[str], layers: Sequence[str], splits: Sequence[str]) -> bool:
        """Whether ``path`` holds every layer of every named member in every split, complete."""
        from features.layers import layer_name
        from features.store import FeatureFileError, get_features, list_nets, open_features

        try:
            with open_features(path) as f:
                for split in splits:
                    have = list_nets(f, split)
                    for net in names:
                        if net not in have:
                            return False
                        for layer in map(layer_name, layers):
                            get_features(f, split, net, layer)
        except (FeatureFileError, UserError, OSError, KeyError):
            return False
        return True

    def _run_extract(self, mode: str) -> None:
        e = self.study.extract
        self.extract_into(self.features, list(self.all_members()), e.layers, e.splits, mode)

    def extract_into(self, path: Path, names: Sequence[str], layers: Sequence[str], splits: Sequence[str],
                     mode: str, logits: bool | None = None) -> None:
        """``layers`` of the named members for ``splits`` into ``path``, with the study's extract options
        (``logits``: whether to store the logits too; None: as the extract section says)."""
        from features.extract import extract_features
        from features.nets import build_feature_data, data_spec_for, load_net

        members = self.all_members()
        e = self.study.extract
        nets = [load_net(n, members[n].checkpoint, members[n].sha256) for n in names]
        data = build_feature_data(data_spec_for(nets, {}), tuple(splits), e.limit)
        self.log(f"  extracting {', '.join(layers)} of {len(nets)} nets ({', '.join(names)}) "
                 f"for splits {', '.join(splits)}")
        cfg = replace(e.config(self.study.train.device), split=",".join(splits))
        cfg = cfg if logits is None else replace(cfg, logits=logits)
        res = extract_features(nets, data, [(layer, None) for layer in layers], path, cfg,
                               "resume" if mode == "resume" else "auto",
                               command=f"cli.py study {self.study_file} --out_dir {self.root}")
        self.log(f"  {res.images} images in {res.seconds:.1f}s ({res.images_per_s:.0f} images/s)")

    # -- consistency
    def expand_pairs(self) -> tuple[list[str], list[tuple[str, str]]]:
        """The study's pair groups as one ordered list of (source, target) pairs over member names."""
        from analysis.consistency import plan_pairs

        members = self.all_members()
        pairs: list[tuple[str, str]] = []
        for g in self.study.pairs:
            if g.family is not None:
                if g.family not in self.study.members:
                    raise UserError(unknown_choice_message("family", g.family, sorted(self.study.members),
                                                           "(pairs entry)"))
                nets = [m.name for m in self.family_members(g.family)]
            else:
                nets = list(g.nets) or list(members)
            unknown = [n for n in nets if n not in members]
            if unknown:
                raise UserError(f"pairs: unknown member(s) {unknown}; members: {', '.join(members)}")
            for p in plan_pairs(nets, g.plan):
                if p[0] not in members or p[1] not in members:
                    raise UserError(f"pairs: {p[0]}>{p[1]} names an unknown member; members: {', '.join(members)}")
                if p not in pairs:
                    pairs.append(p)
        nets_used = [n for n in members if any(n in p for p in pairs)]
        return nets_used, pairs

    def _fit_config(self):
        return fit_config(self.study)

    def _consistency_stage(self, layer: str) -> Stage:
        out = layer_dir(self.root, CONSISTENCY, layer)

        def key() -> dict[str, Any]:
            nets, pairs = self.expand_pairs()
            return {"extract": self.done_key("extract"), "layer": layer, "fit": asdict(self._fit_config()),
                    "pairs": pairs}

        def run(mode: str) -> None:
            from analysis.consistency import ConsistencyConfig, run_consistency

            nets, pairs = self.expand_pairs()
            cfg = ConsistencyConfig(features=str(self.features), layer=layer,
                                    pairs=",".join(f"{a}>{b}" for a, b in pairs), nets=",".join(nets))
            self.log(f"  fitting {len(pairs)} Trans-Nets at {layer}")
            run_consistency(cfg, self._fit_config(), out, mode, log=lambda m: self.log("  " + m))

        def dist_run(mode: str) -> None:
            """Every rank fits its share of the pairs (one local process each); rank 0 then writes
            the tables, reusing them all."""
            from analysis.consistency import fit_or_reuse, pair_dirname

            nets, pairs = self.expand_pairs()
            fit, r = self._fit_config(), self.ranks
            if r.main:
                self.log(f"  fitting {len(pairs)} Trans-Nets at {layer} on {r.world} processes")

            def fit_mine() -> None:
                for a, b in pairs[r.rank::r.world]:
                    pair_fit = replace(fit, features=str(self.features), source=a, target=b, layer=layer,
                                       eval_split="test")
                    with local_only():
                        fit_or_reuse(pair_fit, out / "pairs" / pair_dirname(a, b), "test")

            r.together(f"fitting the Trans-Nets at {layer}", fit_mine)   # a failure fails every rank
            if r.main:
                with local_only():               # every pair is fitted: rank 0 writes the tables alone
                    run("resume")

        return Stage(f"consistency/{layer}", key, run, lambda: (out / "table.json").exists(), (out,),
                     dist_run=dist_run)

    def _similarity_stage(self, layer: str) -> Stage:
        out = layer_dir(self.root, SIMILARITY, layer)

        def key() -> dict[str, Any]:
            return {"extract": self.done_key("extract"), "layer": layer, "metrics": list(self.study.baselines),
                    "nets": self.expand_pairs()[0], "split": self.study.similarity_split,
                    "permutations": self.study.permutations}

        def run(mode: str) -> None:
            from analysis.similarity_run import SimilarityConfig, write_similarity

            nets = self.expand_pairs()[0]
            cfg = SimilarityConfig(layer=layer, split=self.study.similarity_split, nets=",".join(nets),
                                   metric=",".join(self.study.baselines), permutations=self.study.permutations)
            self.log(f"  {', '.join(self.study.baselines)} over {len(nets)} nets at {layer}")
            write_similarity(self.features, cfg, out, "resume" if mode == "resume" else "new")

        return Stage(f"similarity/{layer}", key, run, lambda: (out / "similarity.json").exists(), (out,))

    def _diagnose_stage(self, layer: str) -> Stage:
        out = layer_dir(self.root, DIAGNOSIS, layer)
        a, b = self.study.diagnose  # type: ignore[misc]

        def key() -> dict[str, Any]:
            return {"consistency": self.done_key(f"consistency/{layer}"), "pair": [a, b]}

        def run(mode: str) -> None:
            from analysis.diagnose import run_diagnosis

            cons = layer_dir(self.root, CONSISTENCY, layer)
            self.log(f"  blind spots and unreliable features of {a} and {b} at {layer}")
            run_diagnosis(cons, a, b, str(self.features), out, mode)

        return Stage(f"diagnosis/{layer}", key, run, lambda: (out / "diagnosis.json").exists(), (out,))

    def _run_report(self, mode: str) -> None:
        from analysis.report import write_report

        paths = write_report(self.root)
        self.log(f"  wrote {', '.join(str(p) for p in paths)}")

    # ------------------------------------------------------------------ running
    def plan(self) -> list[tuple[str, str]]:
        """(stage, what would happen) without running anything. A stage whose key reads the outputs of
        an upstream stage that must run (member checkpoints), or follows a stage whose key cannot be
        known yet, is 'run (after upstream stages)'."""
        state = StudyState(self.root)
        stages = self.stages()
        rows = [(name, f"removed (not in the study file: its outputs move to {REMOVED}/)")
                for name in dropped_stages(state, stages)]
        self._keys = {}
        unknown = False        # a stage's key could not be computed: later keys are unknown too
        outputs_change = False  # a training stage will run: keys that hash member checkpoints will change
        for stage in stages:
            if (unknown and not stage.independent) or (outputs_change and stage.reads_outputs):
                rows.append((stage.name, "run (after upstream stages)"))
                unknown = unknown or not stage.independent
                continue
            try:
                key = sha256_json(stage.key())
            except (UserError, OSError):
                rows.append((stage.name, "run (inputs not ready)"))
                unknown = True
                continue
            self._keys[stage.name] = key
            mode = stage_mode(seen_before(state.get(stage.name), stage, self.data_source()), key, stage.outputs_ok(),
                              outputs_exist(stage.out_paths))
            what = {"skip": "cached", "resume": "resume (interrupted)", "new": "run",
                    "overwrite": "redo (inputs changed)"}[mode]
            rows.append((stage.name, what))
            outputs_change |= mode != "skip" and stage.name.startswith("train/")
        self._keys = {}
        return rows

    def run(self) -> list[dict[str, Any]]:
        """Run every stage in order (under torchrun on every rank: rank 0 decides, all take part)."""
        r = self.ranks
        state = StudyState(self.root) if r.main else None
        stages = self.stages()
        times = []
        t_all = time.perf_counter()
        self._keys = {}
        for i, stage in enumerate(stages, 1):
            def decide() -> tuple[str, str, dict[str, Any]]:
                key = sha256_json(stage.key())
                prev = seen_before(state.get(stage.name), stage, self.data_source())
                return key, stage_mode(prev, key, stage.outputs_ok(), outputs_exist(stage.out_paths)), prev

            key, mode, prev = r.from_main(r.together(f"stage {stage.name}", decide) if r.main
                                          else r.together(f"stage {stage.name}", lambda: None))
            self._keys[stage.name] = key
            if mode == "skip":
                self.log(f"[{i}/{len(stages)}] {stage.name}: cached")
                times.append({"stage": stage.name, "status": "cached", "time_s": prev.get("time_s")})
                continue
            if r.main:
                if mode == "overwrite":
                    remove_outputs(stage.out_paths)
                self.log(f"[{i}/{len(stages)}] {stage.name}: {'resuming' if mode == 'resume' else 'running'}")
                state.set(stage.name, key=key, status="running", started_utc=now_utc(),
                          outputs=[str(p.relative_to(self.root)) for p in stage.out_paths],
                          **({"data_source": self.data_source()} if stage.reads_data else {}))
            mode = "new" if mode == "overwrite" else mode
            r.barrier()
            t0 = time.perf_counter()
            if r.world > 1 and stage.dist_run is not None:
                r.together(stage.name, lambda: stage.dist_run(mode))
            else:
                def on_main() -> None:
                    if r.main:
                        with local_only():
                            stage.run(mode)
                r.together(stage.name, on_main)
            dt = time.perf_counter() - t0

            def mark_done() -> None:
                if not r.main:
                    return
                if not stage.outputs_ok():
                    raise UserError(f"stage {stage.name} finished but its outputs are incomplete in {self.root}")
                state.set(stage.name, key=key, status="done", time_s=round(dt, 2), finished_utc=now_utc())
                self.log(f"[{i}/{len(stages)}] {stage.name}: done in {dt:.1f}s")

            r.together(stage.name, mark_done)
            times.append({"stage": stage.name, "status": "ran", "time_s": round(dt, 2)})
        if r.main:
            state.data["total_time_s"] = round(time.perf_counter() - t_all, 2)
            state.data["last_run"] = times
            state.data["processes"] = r.world
            write_json(state.path, state.data)
        return times


def run_study(study_file: str | os.PathLike, out_dir: str | os.PathLike, dry_run: bool = False,
              overwrite: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or plan) a study; returns ``{"plan"}`` for a dry run, else ``{"stages", "summary", "report"}``.
    Under ``torchrun`` every rank calls this; rank 0 returns the summary, the others an empty one."""
    study = load_study(study_file)
    root = Path(out_dir)
    if not overwrite:
        check_same_study(root, study, study_file)
    if dry_run:
        runner = StudyRunner(study, study_file, root, log, ranks=ControlGroup(DistInfo()))
        fresh = overwrite or not root.is_dir()      # --overwrite empties the folder first
        plan = [(s.name, "run") for s in runner.stages()] if fresh else runner.plan()
        for name, what in plan:
            log(f"  {name:<32} {what}")
        return {"plan": plan}
    ranks = ControlGroup(timeout=RANK_WAIT)   # others wait while rank 0 trains a family
    try:
        runner = StudyRunner(study, study_file, root, log, ranks)
        with contextlib.ExitStack() as stack:
            def open_folder() -> RunDir | None:
                if not ranks.main:
                    return None
                run = stack.enter_context(RunDir(root, "overwrite" if overwrite else "resume"))
                run.write_config({"study_file": str(Path(study_file).resolve()), "study": load_config_file(study_file)},
                                 processes=ranks.world)
                record_study(root, study, study_file, runner.log)
                write_study_json(root, study, study_file)
                retire_dropped_stages(root, runner.stages(), runner.log)
                return run

            run = ranks.together("opening the study folder", open_folder)
            stages = runner.run()
            if not ranks.main:
                return {"stages": stages, "summary": [], "report": None, "rank": ranks.rank}
            summary = study_summary(root)
            run.finish({"stages": stages, "summary": summary})
    finally:
        ranks.close()
    report = root / REPORT_HTML
    return {"stages": stages, "summary": summary, "report": str(report) if report.exists() else None}


def cached_study(study_file: str | os.PathLike, out_dir: str | os.PathLike,
                 log: Callable[[str], None] = print) -> Path:
    """The study folder of ``study_file`` in ``out_dir``, run (or resumed) first if any stage is not
    cached; returns ``out_dir``. For notebooks and tests that share one study: a blocking lock beside
    the folder (``<out_dir>.lock``) lets several processes ask at once; one runs the stages, the others
    wait, then find every stage cached."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_name(out.name + ".lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)          # blocks until another process is done with the study
        try:
            run_study(study_file, out, log=log)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return out


def study_summary(root: Path, max_lines: int = 5) -> list[str]:
    """Short plain-language findings computed from the study's tables (no invented claims)."""
    from analysis.readings import summary_lines

    return summary_lines(root)[:max_lines]
