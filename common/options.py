"""Shared pieces of the command line: dataclass -> argparse options, ``--config`` files, commands.

``cli.py`` gathers :class:`Command` objects from every package's ``commands`` module; each package
defines its own subcommands next to the code they call.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from common.errors import UserError


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], Any]
    description: str = ""


def _base_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return tp


def add_dataclass_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                       skip: tuple[str, ...] = (), help: dict[str, str] | None = None,
                       choices: dict[str, list[str]] | None = None, prefix: str = "") -> None:
    """One ``--field`` option per dataclass field; defaults come from the dataclass, so the CLI,
    the config files and the code never drift. Help text comes from ``help`` or the field comment."""
    help = help or {}
    choices = choices or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        kw: dict[str, Any] = {"default": default, "help": help.get(f.name, f.name.replace("_", " "))}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif tp in (int, float, str):
            kw["type"] = tp
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
