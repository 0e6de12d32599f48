"""The torch-free name lists of training/names.py list exactly what the registries hold."""
from __future__ import annotations

from training import names
from training.datasets import DATASETS
from training.models import ARCHS
from training.timm_models import is_timm
from training.transforms import TRANSFORMS
from training.user_models import is_user_model


def test_static_names_are_the_registries_names():
    import training.data  # noqa: F401  (registers the data sets that live in training/data.py)

    assert list(names.ARCHS) == ARCHS.names(), "update training/names.py ARCHS"
    assert list(names.DATASETS) == DATASETS.names(), "update training/names.py DATASETS"
    assert list(names.TRANSFORMS) == TRANSFORMS.names(), "update training/names.py TRANSFORMS"


def test_prefixes_are_the_ones_the_builders_recognise():
    assert is_timm(names.TIMM_PREFIX + "resnet18") and not is_timm("resnet18")
    assert is_user_model(names.MODEL_PREFIX + "pkg.mod:fn") and not is_user_model("pkg.mod:fn")
    assert names.arch_names()[-2:] == list(names.EXTERNAL_ARCHS)
    assert "imagefolder:DIR" in names.dataset_names() and "imagefolder" not in names.dataset_names()
