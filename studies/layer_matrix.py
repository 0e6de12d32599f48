"""The study's layer x layer section (``baselines.layer_matrix``): the layers of one net against each
other, or of net A against net B, as ``python cli.py similarity --layers`` computes them.

The matrices read a feature file of their own, ``STUDY/layer_matrix/features.h5``, holding only
their nets, their split and their layers (with the study's extract options): the layers of a matrix
are mostly early, large maps that no other stage reads, so they are not extracted for every member
and both splits. Stages: ``layer_matrix/extract``, then ``layer_matrix/<A>__<B>`` per entry.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from analysis.study_layout import LAYER_MATRIX, layer_matrix_dir, layer_matrix_features
from studies.cache import Stage
from studies.spec import LayerMatrixSpec

StudyRunner = Any       # studies.runner.StudyRunner (which imports this module): root, study, log, extract_into,
                        # extracted, member_hashes, done_key

EXTRACT_STAGE = f"{LAYER_MATRIX}/extract"


def matrix_nets(lm: LayerMatrixSpec) -> list[str]:
    """Every net the matrices compare, in order of first appearance."""
    return list(dict.fromkeys(n for entry in lm.nets for n in entry))


def layer_matrix_stages(runner: StudyRunner) -> list[Stage]:
    lm = runner.study.layer_matrix
    if lm is None:
        return []
    return [_extract_stage(runner, lm), *(_matrix_stage(runner, lm, nets) for nets in lm.nets)]


def _extract_stage(runner: StudyRunner, lm: LayerMatrixSpec) -> Stage:
    path, names = layer_matrix_features(runner.root), matrix_nets(lm)

    def key() -> dict[str, Any]:
        return {"extract": asdict(runner.study.extract), "data": asdict(runner.study.data),
                "members": runner.member_hashes(names), "layers": list(lm.layers), "split": lm.split}

    def run(mode: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        runner.extract_into(path, names, lm.layers, (lm.split,), mode, logits=False)

    return Stage(EXTRACT_STAGE, key, run, lambda: runner.extracted(path, names, lm.layers, (lm.split,)), (path,),
                 reads_outputs=True, reads_data=True)


def _matrix_stage(runner: StudyRunner, lm: LayerMatrixSpec, nets: tuple[str, ...]) -> Stage:
    out = layer_matrix_dir(runner.root, nets)

    def key() -> dict[str, Any]:
        return {"extract": runner.done_key(EXTRACT_STAGE), **asdict(lm), "nets": list(nets)}

    def run(mode: str) -> None:
        from analysis.similarity_layers import write_layer_similarity
        from analysis.similarity_run import SimilarityConfig

        cfg = SimilarityConfig(layers=",".join(lm.layers), nets=",".join(nets), split=lm.split,
                               metric=",".join(lm.metrics), permutations=lm.permutations)
        runner.log(f"  {', '.join(lm.metrics)} between the layers {', '.join(lm.layers)} of {' and '.join(nets)}")
        write_layer_similarity(layer_matrix_features(runner.root), cfg, out, "resume" if mode == "resume" else "new")

    return Stage(f"{LAYER_MATRIX}/{out.name}", key, run, lambda: (out / "similarity.json").exists(), (out,))
