"""``evolve``: the command line of Knowledge-Evolution generations (``training/evolution.py``).

    python cli.py evolve --dataset animal-mnist --arch vgg_small --generations 3 --epochs 5 \\
        --split kels --split_rate 0.5 --out_dir runs/ke
    python cli.py evolve --preset ke --dataset flower102 --data_root DATA --out_dir runs/ke_flower

``out_dir`` holds ``g1 .. gG`` (normal run directories; every checkpoint carries the family fields
generation, split, split_rate and the fit-hypothesis ``masks``), ``g{g}/slim.pt`` (KELS: the slim
network as a real smaller model, ``arch_kwargs={"width": k}``), ``g{g}/generation.json``,
``generations.json`` + ``generations.md`` (the per-generation table), ``family.json`` and the
family's own ``config.json``/``metrics.json``.

Presets (``--preset ke``) fill only the options the user did not give (on the command line or in
``--config``): each flag overrides its own value and nothing else (the original switched every
default as soon as any flag was given).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from common.errors import UserError
from common.options import Command, add_dataclass_args, add_run_args, dataclass_from_args
from common.registry import unknown_choice_message
from common.rundir import run_mode
from training.config import TrainConfig
from training.family_config import SPLIT_MODES, EvolveConfig
from training.options import add_data_args, add_model_args, add_train_args, data_from_args, model_spec_from_args

KE_HELP = {
    "generations": "number of generations (>= 1); --resume may raise it to continue evolving",
    "split": "split mode: " + ", ".join(SPLIT_MODES) + " (kels: first ceil(k*out) x ceil(k*in) kernels, "
             "has a slim net; wels: i.i.d. Bernoulli(k) weights)",
    "split_rate": "k, the fraction of each layer kept in the fit hypothesis, in (0, 1)",
}

# Knowledge Evolution's published defaults (methods.md section 2): ResNet18, split 0.5, 200 epochs
# per generation, SGD lr 0.256, momentum 0.9, wd 1e-4, batch 32, cosine with 5 warm-up epochs,
# label smoothing 0.1, RandomResizedCrop/flip transform.
PRESETS: dict[str, dict[str, Any]] = {
    "ke": {"arch": "resnet18", "split": "kels", "split_rate": 0.5, "epochs": 200, "optimizer": "sgd",
           "lr": 0.256, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 32, "schedule": "cosine",
           "warmup_epochs": 5.0, "label_smoothing": 0.1, "transform": "ke"},
}

# --------------------------------------------------------------------------- presets

class Unset:
    """Default of an option the user did not give: the preset's value wins, else ``value``."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)

    def __str__(self) -> str:
        return str(self.value)


_NEVER_PRESET = ("help", "out_dir", "resume", "overwrite", "preset")


def mark_unset(p: argparse.ArgumentParser) -> None:
    """Wrap every option default in :class:`Unset` so explicitly given values can be told apart
    (``--config`` files set real defaults through ``set_defaults`` and so count as given)."""
    for action in p._actions:
        if action.dest in _NEVER_PRESET or action.default is argparse.SUPPRESS:
            continue
        p.set_defaults(**{action.dest: Unset(action.default)})


def resolve_options(args: argparse.Namespace) -> tuple[argparse.Namespace, list[str]]:
    """Options with the preset applied to the ones not given; also the names the preset set."""
    name = getattr(args, "preset", None)
    if name is not None and name not in PRESETS:
        raise UserError(unknown_choice_message("preset", name, sorted(PRESETS)))
    preset = PRESETS.get(name, {}) if name else {}
    out, from_preset = {}, []
    for key, value in vars(args).items():
        if isinstance(value, Unset):
            if key in preset:
                out[key] = preset[key]
                from_preset.append(key)
            else:
                out[key] = value.value
        else:
            out[key] = value
    unknown = sorted(set(preset) - set(out))
    assert not unknown, f"preset {name!r} names options the command lacks: {unknown}"
    return argparse.Namespace(**out), sorted(from_preset)


# --------------------------------------------------------------------------- generations

def _add_evolve(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
    add_model_args(p)
    add_train_args(p)
    g = p.add_argument_group("knowledge evolution")
    add_dataclass_args(g, EvolveConfig, help=KE_HELP)
    g.add_argument("--preset", default=None,
                   help="defaults of a published set-up, for the options not given: " +
                        "; ".join(f"{k}: " + ", ".join(f"{o}={v}" for o, v in sorted(d.items()))
                                  for k, d in PRESETS.items()))
    add_run_args(p)
    mark_unset(p)


def _run_evolve(args: argparse.Namespace) -> None:
    from training.evolution import evolve

    a, from_preset = resolve_options(args)
    data = data_from_args(a)
    cfg = dataclass_from_args(TrainConfig, a)
    ke = dataclass_from_args(EvolveConfig, a)
    out = Path(a.out_dir)
    evolve(data, model_spec_from_args(a), cfg, ke, out, run_mode(a.resume, a.overwrite),
           preset=a.preset, preset_keys=from_preset)
    print((out / "generations.md").read_text(), end="")
    print(f"generations: {out / 'generations.json'}; family manifest: {out / 'family.json'}")


COMMANDS = [
    Command("evolve", "Knowledge Evolution: train generations with split, re-initialised layers", _add_evolve,
            _run_evolve,
            "Knowledge Evolution (Taha et al. 2021): generation 1 trains the dense net; each later generation "
            "keeps the fit hypothesis (KELS: the first ceil(k*out) x ceil(k*in) kernels, WELS: random weights), "
            "re-draws the other weights, keeps BN and the classifier bias, and retrains with a fresh optimiser "
            "and schedule. After every generation the dense net (and the KELS slim net, saved as its own "
            "checkpoint) is evaluated. Writes g1..gG run directories, generations.json/.md and family.json "
            "into --out_dir. --preset ke gives the paper's defaults; every flag still overrides its own value."),
]
