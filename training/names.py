"""The names a user may give to the training registries, known without importing torch: parsers list
them in ``--help`` and offer them as choices before any builder is loaded. The registries stay the
owners of what a name builds (``ARCHS`` in training/models.py, ``DATASETS`` in training/datasets.py and
training/datasets_disk.py, ``TRANSFORMS`` in training/transforms.py); tests/training/test_names.py
checks that every tuple here lists exactly its registry's names, so a new entry fails there first."""
from __future__ import annotations

TIMM_PREFIX = "timm:"       # timm:NAME, any timm model (training/timm_models.py)
MODEL_PREFIX = "model:"     # model:package.module:callable, the user's own builder (training/user_models.py)
EXTERNAL_ARCHS = (f"{TIMM_PREFIX}NAME", f"{MODEL_PREFIX}package.module:callable")

ARCHS = ("alexnet", "cifar_resnet18", "cifar_resnet20", "cifar_resnet56", "densenet121", "googlenet", "kdnet5",
         "resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vgg_small", "vgg_tiny",
         "wrn16_2")
DATASETS = ("aircraft100", "animal-mnist", "cifar10", "cifar100", "cub200", "dogs120", "flower102", "imagefolder",
            "mix320", "voc_animals")
TRANSFORMS = ("ke", "paper", "plain", "small")


def arch_names() -> list[str]:
    """Every arch name a user may give: the registry's plus the two open name spaces."""
    return list(ARCHS) + list(EXTERNAL_ARCHS)


def dataset_names() -> list[str]:
    """Every data-set name a user may give (``imagefolder`` takes its folder: ``imagefolder:DIR``)."""
    return [n for n in DATASETS if n != "imagefolder"] + ["imagefolder:DIR"]
