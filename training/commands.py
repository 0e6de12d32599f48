"""``train``: the classifier training subcommand (its options live in :mod:`training.options`)."""
from __future__ import annotations

import argparse

from common.options import Command
from training.config import resume_note
from training.options import add_train_command_args, train_from_args, training_summary


def _run_train(args: argparse.Namespace) -> None:
    print(training_summary(train_from_args(args)))


COMMANDS = [
    Command("train", "train one classifier", add_train_command_args, _run_train,
            "Train a classifier on a registered data set; writes config.json, log.jsonl, TensorBoard events, "
            "metrics.json and best.pt/last.pt checkpoints into --out_dir. --resume continues the run with the "
            f"options it was started with ({resume_note()})."),
]
