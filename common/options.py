"""Shared pieces of the command line: dataclass -> argparse options, ``--config`` files, commands.

``cli.py`` gathers :class:`Command` objects from every package's ``commands`` module; each package
defines its own subcommands next to the code they call.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import UserError
from common.ranges import OptionType, base_kind, type_for


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, except where the help already states its default in words
    ("(default: the preset's)"), which ``(default: None)`` would contradict."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]
    description: str = ""
    torchrun: bool = False          # runs as one job across torchrun's ranks (else refused under torchrun)


def add_dataclass_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                       skip: tuple[str, ...] = (), help: dict[str, str] | None = None,
                       choices: dict[str, list[str]] | None = None, prefix: str = "",
                       types: dict[str, Callable[[Any], Any]] | None = None) -> None:
    """One ``--field`` option per dataclass field; defaults come from the dataclass, so the CLI,
    the config files and the code never drift. Help text comes from ``help`` or the field comment.
    A numeric field takes its range from ``common.ranges.OPTION_TYPES`` (or ``types``, which wins)."""
    help = help or {}
    choices = choices or {}
    types = types or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = base_kind(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        kw: dict[str, Any] = {"default": default, "help": help.get(f.name, f.name.replace("_", " "))}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name in types:
            kw["type"] = types[f.name]
        elif tp in (int, float, str):
            kw["type"] = type_for(f.name, tp) or tp
        elif typing.get_origin(tp) in (dict, list, tuple) or tp in (dict, list, tuple):
            continue  # structured fields come from --config files only
        if f.name in choices:
            kw["choices"] = choices[f.name]
        p.add_argument(f"--{prefix}{f.name}", **kw)


def dataclass_from_args(cls: type, args: argparse.Namespace, prefix: str = "", **override: Any):
    kw = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key in override:
            kw[f.name] = override[key]
        elif hasattr(args, key):
            kw[f.name] = getattr(args, key)
    return cls(**kw)


def add_run_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--out_dir", required=out_required, help="directory the command writes its results into")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out_dir")
    g.add_argument("--overwrite", action="store_true", help="replace the results already in --out_dir")


def parse_kv_list(items: list[str] | None, what: str) -> dict[str, str]:
    """``["a=1", "b=2"]`` -> ``{"a": "1", "b": "2"}`` with a clear error on a malformed item."""
    out: dict[str, str] = {}
    for item in items or []:
        for part in item.split(",") if "=" in item and item.count("=") > 1 and "," in item else [item]:
            if "=" not in part:
                raise UserError(f"{what} expects NAME=VALUE items, got {part!r}")
            k, v = part.split("=", 1)
            if not k or not v:
                raise UserError(f"{what} expects NAME=VALUE items, got {part!r}")
            if k in out:
                raise UserError(f"{what}: {k!r} given twice")
            out[k] = v
    return out


def parse_csv(value: str | None, cast: Callable[[str], Any] = str) -> list[Any]:
    if value is None or value == "":
        return []
    return [cast(v.strip()) for v in str(value).split(",") if v.strip()]


# --------------------------------------------------------------------------- checked values

def is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction,
                               argparse._StoreFalseAction))


def _takes_list(action: argparse.Action) -> bool:
    return action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)


def _convert_one(action: argparse.Action, value: Any, name: str, where: str) -> Any:
    if isinstance(value, (list, tuple, dict)):
        raise UserError(f"{where}: {name} takes one value, got {value!r}")
    if isinstance(value, bool):
        raise UserError(f"{where}: {name} is not a flag; give a value, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(action.type, OptionType) and action.type not in (int, float):
        value = str(value)                      # a number for a text option (YAML ``alpha: 0.1``)
    if action.type is int and isinstance(value, float) and not value.is_integer():
        raise UserError(f"{where}: {name} expects an integer, got {value!r}")
    if action.type is not None:
        try:
            value = action.type(value)
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{where}: {name} {e}") from None
        except (TypeError, ValueError):
            raise UserError(f"{where}: {name} expects {getattr(action.type, '__name__', action.type)}, "
                            f"got {value!r}") from None
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where}: {name} {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def convert_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A config-file (or grid) value -> what the option holds, checked against its type, range and
    choices (argparse checks none of them for defaults); errors name ``where`` and the option."""
    name = "--" + action.dest
    default = getattr(action.default, "value", action.default)     # ke_commands wraps defaults in Unset
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null") and default is None
                         and not is_flag(action)):
        if default is None and not is_flag(action):
            return None
        raise UserError(f"{where}: {name} cannot be null" + (" (give true or false)" if is_flag(action) else ""))
    if is_flag(action):
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: {name} is a flag; give true or false, got {value!r}")
    if _takes_list(action):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not items:
            raise UserError(f"{where}: {name} takes a list of values, got {value!r}")
        return [_convert_one(action, v, name, where) for v in items]
    return _convert_one(action, value, name, where)


def describe_types(p: argparse.ArgumentParser) -> None:
    """Add each checked option's range (``>= 1``, ``in (0, 1]``) to its --help."""
    for a in p._actions:
        if isinstance(a.type, OptionType) and a.help not in (None, argparse.SUPPRESS) and a.type.text not in a.help:
            a.help = f"{a.help} [{a.type.text}]"
