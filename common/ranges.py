"""What each option may hold: the range of every numeric option and the rules of names, in one place.

The types here are argparse ``type=`` callables that convert a command-line string *or* a value read
from a config or study file (an int, a float), check it and say what was wrong
(``argparse.ArgumentTypeError``, which argparse prints as ``argument --lr: expects a finite number > 0,
got 'nan'``). Their ``text`` is added to the option's ``--help``.

:data:`OPTION_TYPES` gives the type of an option by its name, so a dataclass field, a ``--config`` value,
a study-file entry and a command-line flag of that name are checked alike; a command that means
something else by a name passes its own ``type=``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any


class OptionType:
    """Base of the checked option types: ``__call__`` converts and checks, ``text`` is the --help note."""

    kind: type = str
    text: str = ""

    @property
    def __name__(self) -> str:  # argparse names the type in its own messages
        return self.text or type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.text})"

    def bad(self, value: Any, what: str) -> argparse.ArgumentTypeError:
        return argparse.ArgumentTypeError(f"expects {what}, got {value!r}")


def _fmt(x: float) -> str:
    return format(x, "g")


class Number(OptionType):
    """An int or a finite float in a range (``lo``/``hi`` inclusive unless ``*_open``); ``odd`` ints only
    when asked; ``values``: the only allowed numbers; ``words``: strings also taken as they are (``auto``)."""

    def __init__(self, kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, odd: bool = False, values: Sequence[int] | None = None,
                 words: Sequence[str] = ()):
        assert kind in (int, float)
        self.kind, self.lo, self.hi, self.lo_open, self.hi_open = kind, lo, hi, lo_open, hi_open
        self.odd, self.values, self.words = odd, tuple(values) if values is not None else None, tuple(words)
        self.text = self._range_text() + "".join(f" or {w}" for w in self.words)

    def _range_text(self) -> str:
        if self.values is not None:
            return "one of " + ", ".join(map(str, self.values))
        parts = ["odd"] if self.odd else []
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            parts.append(f"in {'(' if self.lo_open else '['}{_fmt(lo)}, {_fmt(hi)}{')' if self.hi_open else ']'}")
        elif lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {_fmt(lo)}")
        elif hi is not None:
            parts.append(f"{'<' if self.hi_open else '<='} {_fmt(hi)}")
        return ", ".join(parts) or "any finite value"

    def describe(self) -> str:
        if self.values is not None:
            return self.text
        what = ("an odd integer" if self.odd else "an integer") if self.kind is int else "a finite number"
        text = self._range_text().removeprefix("odd").lstrip(", ")
        words = "".join(f" or {w!r}" for w in self.words)
        return (f"{what} {text}" if text and text != "any finite value" else what) + words

    def _number(self, value: Any) -> int | float:
        if isinstance(value, bool):
            raise self.bad(value, self.describe())
        if isinstance(value, str):
            try:
                return self.kind(value.strip())
            except ValueError:
                raise self.bad(value, self.describe()) from None
        if self.kind is int and isinstance(value, int):
            return int(value)
        if self.kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if self.kind is float and isinstance(value, (int, float)):
            return float(value)
        raise self.bad(value, self.describe())

    def check(self, v: int | float) -> bool:
        if self.kind is float and not math.isfinite(v):
            return False
        if self.values is not None:
            return v in self.values
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return False
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return False
        return not (self.odd and v % 2 == 0)

    def __call__(self, value: Any) -> int | float | str:
        if isinstance(value, str) and value.strip() in self.words:
            return value.strip()
        v = self._number(value)
        if not self.check(v):
            raise self.bad(value, self.describe())
        return v


def positive_int() -> Number:
    return Number(int, 1)


def positive_int_or(*words: str) -> Number:
    """A positive int or one of ``words`` (``positive_int_or("auto")`` for ``--epochs auto``)."""
    return Number(int, 1, words=words)


def nonneg_int() -> Number:
    return Number(int, 0)


def int_range(lo: int, hi: int) -> Number:
    return Number(int, lo, hi)


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False) -> Number:
    return Number(float, lo, hi, lo_open=lo_open, hi_open=hi_open)


def positive_float() -> Number:
    return finite_float(0.0, lo_open=True)


def nonneg_float() -> Number:
    return finite_float(0.0)


def probability() -> Number:
    return finite_float(0.0, 1.0)


# --------------------------------------------------------------------------- names and lists

def name_problem(value: Any) -> str | None:
    """Why ``value`` cannot be a member/net name (it becomes a folder and an HDF5 group), or None."""
    if not isinstance(value, str) or not value.strip():
        return "must be a non-empty name"
    if "/" in value or "\\" in value:
        return "must not contain '/' or '\\' (names become folders and HDF5 groups)"
    if ".." in value or value.startswith("."):
        return "must not contain '..' or start with '.'"
    if any(ord(c) < 32 or c.isspace() for c in value):
        return "must not contain spaces or control characters"
    return None


class Name(OptionType):
    """A member or net name (or the prefix of generated names): not empty, no '/', '\\', '..', spaces."""

    text = "a name: no '/', '..' or spaces"

    def __call__(self, value: Any) -> str:
        why = name_problem(value)
        if why:
            raise argparse.ArgumentTypeError(f"{value!r} {why}")
        return value


def member_name() -> Name:
    return Name()


class CsvList(OptionType):
    """A non-empty comma list (no empty items, no repeats), optionally of fixed ``choices``; returns
    the list normalised as one string (``"train,test"``)."""

    def __init__(self, choices: Iterable[str] | None = None):
        self.choices = tuple(choices) if choices is not None else None
        self.text = "comma list" + (f" of {', '.join(self.choices)}" if self.choices else "")

    def __call__(self, value: Any) -> str:
        if not isinstance(value, str):
            raise self.bad(value, f"a {self.text}")
        items = [v.strip() for v in value.split(",")]
        if not value.strip() or any(not v for v in items):
            raise argparse.ArgumentTypeError(f"expects a {self.text} without empty items, got {value!r}")
        dup = sorted({v for v in items if items.count(v) > 1})
        if dup:
            raise argparse.ArgumentTypeError(f"{value!r} names {', '.join(dup)} twice")
        bad = [v for v in items if self.choices is not None and v not in self.choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{value!r}: unknown {', '.join(map(repr, bad))}; valid: "
                                             f"{', '.join(self.choices or ())}")
        return ",".join(items)


def csv_nonempty(choices: Iterable[str] | None = None) -> CsvList:
    return CsvList(choices)


# --------------------------------------------------------------------------- the options by name

_UNIT = dict(lo_open=False, hi_open=True)   # [0, 1)
OPTION_TYPES: dict[str, OptionType] = {
    # data (DataSpec)
    "image_size": positive_int(), "channels": Number(int, values=(1, 3)), "split_seed": nonneg_int(),
    "train_images": nonneg_int(),
    # training (TrainConfig), fine-tuning and refinement
    "epochs": positive_int(), "batch_size": positive_int(), "lr": positive_float(),
    "momentum": finite_float(0.0, 1.0, **_UNIT), "weight_decay": nonneg_float(), "warmup_epochs": nonneg_float(),
    "step_size": positive_int(), "gamma": finite_float(0.0, 1.0, lo_open=True), "final_lr": nonneg_float(),
    "label_smoothing": finite_float(0.0, 1.0, **_UNIT), "seed": nonneg_int(), "num_workers": nonneg_int(),
    "eval_every": positive_int(), "grad_clip": nonneg_float(), "save_every": positive_int(),
    "patience": nonneg_int(), "max_epochs": positive_int(), "val_fraction": finite_float(0.0, 1.0, **_UNIT),
    # families
    "alpha": probability(), "temperature": positive_float(), "generations": positive_int(), "lam": nonneg_float(),
    "split_rate": finite_float(0.0, 1.0, lo_open=True, hi_open=True), "prune": finite_float(0.0, 1.0, **_UNIT),
    "quantize_bits": int_range(0, 16), "finetune_epochs": nonneg_int(),
    "name_prefix": member_name(), "teacher_name": member_name(), "student_name": member_name(),
    "original_name": member_name(), "compressed_name": member_name(),
    # features
    "limit": nonneg_int(), "queue_batches": positive_int(), "flush_s": nonneg_float(), "conv_layer": nonneg_int(),
    "max_batches": nonneg_int(), "verify_rows": positive_int(), "num_classes": positive_int(),
    "in_channels": positive_int(), "input_size": positive_int(), "prefix_tokens": nonneg_int(),
    # Trans-Nets
    "train_rows": nonneg_int(), "orders": nonneg_int(), "kernel": Number(int, 1, odd=True),
    "std_correction": int_range(0, 1), "std_floor": probability(),
    "gate_init": probability(), "block_rows": positive_int(),
    # analysis
    "permutations": nonneg_int(), "memory_gb": positive_float(),
    # a fraction in (0, 1] or a whole count of directions (the CCA code refuses a count that is not whole)
    "svcca_keep": positive_float(),
    "rank_tol": finite_float(0.0, 1.0, lo_open=False, hi_open=True), "rbf_sigma": positive_float(),
    "shape_alpha": finite_float(0.0, 1.0),
    "top": positive_int(), "panels": nonneg_int(), "panel_channels": positive_int(),
}


def base_kind(tp: Any) -> Any:
    """``int | None`` -> int; a union of several types -> str (as the command line gives it)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return base_kind(args[0]) if len(args) == 1 else str
    return tp


def type_for(name: str, kind: Any) -> OptionType | None:
    """The checked type of option ``name`` holding values of ``kind`` (None when none is declared)."""
    t = OPTION_TYPES.get(name)
    return t if t is not None and t.kind is kind else None


def field_problems(obj: Any, section: str) -> list[str]:
    """Every field of dataclass ``obj`` outside its declared range, as ``section.field: why``."""
    hints = typing.get_type_hints(type(obj))
    out = []
    for f in dataclasses.fields(obj):
        t = type_for(f.name, base_kind(hints[f.name]))
        value = getattr(obj, f.name)
        if t is None or value is None:
            continue
        try:
            t(value)
        except argparse.ArgumentTypeError as e:
            out.append(f"{section}.{f.name}: {e}")
    return out
