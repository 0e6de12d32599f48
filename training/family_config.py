"""What the family builders are asked to do, without importing torch: the configs of knowledge
distillation (:class:`KDConfig`), Born-Again networks (:class:`BANConfig`), Knowledge Evolution
(:class:`EvolveConfig`) and compression (:class:`CompressConfig`), and the names their options choose
from. Parsers build their options from here; the builders import torch when they run."""
from __future__ import annotations

from dataclasses import dataclass

MEMBER_CHECKPOINTS = ("last", "best")
PRUNE_SCOPES = ("layer", "global")
SPLIT_MODES = ("kels", "wels")


@dataclass(frozen=True)
class KDConfig:
    teacher: str | None = None          # teacher checkpoint (a workbench checkpoint of the same classes)
    alpha: float = 0.9                  # weight of the soft teacher term; 1 - alpha weights the label CE
    temperature: float = 4.0            # softmax temperature T of the soft term (scaled by T^2)
    teacher_name: str = "teacher"       # member names in family.json (the <net> names of feature files)
    student_name: str = "student"
    member_checkpoint: str = "last"     # student checkpoint family.json lists: last (final epoch) | best


@dataclass(frozen=True)
class BANConfig:
    generations: int = 3                # generations trained: g0 (CE only), g1 .. g{G-1} (from the previous one)
    lam: float = 0.5                    # weight λ of the soft term: CE + λ·T²·H(softmax(t/T), softmax(s/T))
    temperature: float = 1.0            # T, applied to teacher and student logits (KC's script never applied it)
    member_checkpoint: str = "last"     # each generation's checkpoint used as teacher and in family.json
    name_prefix: str = "ban_g"          # member names: ban_g0, ban_g1, ...


# Born-Again options that may change on --resume (besides training.config.RESUME_FREE's).
RESUME_FREE_BAN = ("generations", "name_prefix")


@dataclass(frozen=True)
class EvolveConfig:
    generations: int = 3        # KE generations; the first trains the dense net from scratch
    split: str = "kels"         # kels (kernel level, gives a slim net) | wels (weight level)
    split_rate: float = 0.5     # k: fraction of each layer in the fit hypothesis, in (0, 1)


# Knowledge-Evolution options that may change on --resume (besides training.config.RESUME_FREE's).
RESUME_FREE_KE = ("generations",)


@dataclass(frozen=True)
class CompressConfig:
    checkpoint: str | None = None       # the network to compress (a workbench checkpoint)
    prune: float = 0.8                  # fraction of conv/linear weights set to zero (by magnitude)
    prune_scope: str = "layer"          # layer: that fraction in every layer | global: one threshold
    quantize_bits: int = 5              # 2**bits shared weight values per layer (k-means); 0: no sharing
    finetune_epochs: int = 2            # fine-tuning epochs with masks and sharing kept (0: none)
    data_root: str | None = None        # override the data root recorded in the checkpoint
    original_name: str = "original"     # member names in family.json
    compressed_name: str = "compressed"


# Compress options that may change on --resume (besides training.config.RESUME_FREE's): the names in
# family.json and where the original and its data are read (the original's sha256 is compared).
RESUME_FREE_COMPRESS = ("original_name", "compressed_name", "data_root", "checkpoint")
