#!/usr/bin/env python
"""The knowledge-consistency workbench command line.

    python cli.py train --dataset animal-mnist --arch vgg_small --epochs 3 --out_dir runs/seed0
    python cli.py <command> --help

Every command takes ``--config FILE`` (YAML or JSON, option: value; the command line wins) and
``--debug`` (full tracebacks). Errors in the input are reported in one paragraph.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
import warnings

# The modules that contribute subcommands, in the order of the data flow, with the commands each
# defines (tests/test_layout.py checks this index against every module's COMMANDS). Running one command
# imports its module only; ``--help`` and an unknown name import them all. Building a parser imports no
# torch (docs/internals.md, "Arguments before torch"): a bad option is refused before torch loads.
COMMAND_MODULES = {
    "training.commands": ("train",),
    "training.family_commands": ("distill", "born-again", "search", "summarize", "compress"),
    "training.ke_commands": ("evolve",),
    "features.commands": ("extract", "inspect", "list-layers"),
    "features.import_commands": ("import-features",),
    "transnet.commands": ("fit-transnet", "variance", "import-transnet", "refine"),
    "analysis.similarity_commands": ("similarity",),
    "analysis.commands": ("consistency", "visualize", "diagnose", "report"),
    "studies.commands": ("study",),
}


def module_of(command: str) -> str | None:
    """The module that defines ``command``, or None for an unknown name."""
    return next((m for m, names in COMMAND_MODULES.items() if command in names), None)


def _commands(modules: list[str] | None = None):
    out = []
    for mod_name in modules or list(COMMAND_MODULES):
        out.extend(importlib.import_module(mod_name).COMMANDS)
    return out


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser of every command, or of ``command`` alone (its module is the only one imported)."""
    parser = argparse.ArgumentParser(
        prog="cli.py", description="Knowledge-consistency workbench: train network families, cache their "
        "activations, fit Trans-Nets between pairs and explain what knowledge they share.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from common.options import DefaultsHelpFormatter, describe_types

    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs = {}
    module = module_of(command) if command else None
    for cmd in _commands([module] if module else None):
        if module and cmd.name != command:
            continue
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help,
                           formatter_class=DefaultsHelpFormatter)
        cmd.add_args(p)
        p.add_argument("--config", default=None, help="YAML or JSON file of option: value (the command line wins)")
        p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        p.set_defaults(_run=cmd.run, _torchrun=cmd.torchrun)
        describe_types(p)
        subs[cmd.name] = p
    return parser, subs


def _apply_config(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse once to find --config, set its values as defaults (unknown keys rejected, each value checked
    against its option's type, range and choices), parse again."""
    from common.errors import UserError
    from common.files import load_config_file
    from common.options import convert_value

    args = p.parse_args(argv)
    if not args.config:
        return args
    values = load_config_file(args.config)
    known = {a.dest for a in p._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"config file {args.config} sets unknown option(s) {', '.join(unknown)}; "
                        f"valid: {', '.join(sorted(k for k in known if not k.startswith('_') and k != 'help'))}")
    actions = {a.dest: a for a in p._actions}
    p.set_defaults(**{k: convert_value(actions[k], v, f"config file {args.config}") for k, v in values.items()})
    return p.parse_args(argv)


def _refuse_torchrun(command: str, runs_distributed: bool) -> None:
    """Under torchrun only the commands that run as one job across the ranks are taken: every rank of
    another would do the same work into the same folder (refused by its lock, or racing)."""
    from common.distributed import dist_from_env
    from common.errors import UserError

    info = dist_from_env()
    if info.active and not runs_distributed:
        able = sorted(name for name, p in build_parser(None)[1].items() if p.get_default("_torchrun"))
        raise UserError(f"{command} runs in one process, but this is rank {info.rank} of a {info.world}-process "
                        f"torchrun job; run it without torchrun. Under torchrun: {', '.join(able)} (a study shares "
                        f"its members, rows and pairs out across the ranks)")


def _out_of_memory(e: BaseException) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)


def _fail(msg: str, code: int = 1) -> int:
    text = " ".join(str(msg).split())
    print(textwrap.fill(f"error: {text}", width=100), file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """The workbench's own warnings as one ``warning:`` paragraph on stderr; others as Python prints them."""
    if category.__module__.split(".")[0] in ("common", "training", "features", "transnet", "analysis", "studies"):
        print(textwrap.fill(" ".join(f"warning: {message}".split()), width=100), file=file or sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning
    debug = "--debug" in argv
    parser, subs = build_parser(argv[0] if argv else None)
    if not argv or argv[0] not in subs:
        if argv and not argv[0].startswith("-"):
            from common.registry import unknown_choice_message

            parser.print_usage(sys.stderr)
            return _fail(unknown_choice_message("command", argv[0], sorted(subs)), 2)
        parser.parse_args(argv)  # prints help / usage
        parser.print_help()
        return 0
    from common.errors import UserError, user_message
    from common.signals import TERMINATED_EXIT_CODE, Terminated, sigterm_as_interrupt

    try:
        args = _apply_config(subs[argv[0]], argv[1:])
        _refuse_torchrun(argv[0], args._torchrun)
        with sigterm_as_interrupt():            # SIGTERM stops like Ctrl-C (common/signals.py)
            return int(args._run(args) or 0)
    except Terminated:
        return _fail("terminated (SIGTERM): what was saved is kept; re-run the same command with --resume to "
                     "continue", TERMINATED_EXIT_CODE)
    except KeyboardInterrupt:
        return _fail("interrupted; re-run the same command with --resume to continue", 130)
    except UserError as e:
        if debug:
            raise
        return _fail(user_message(e))
    except Exception as e:  # a bug or an environment problem: one paragraph unless --debug
        if debug:
            raise
        if _out_of_memory(e):
            return _fail(f"the device ran out of memory ({str(e).splitlines()[0]}). What was saved is kept: lower "
                         f"--batch_size, or keep the data off the GPU (train and extract: --data_on loader; "
                         f"fit-transnet and consistency: --data_on ram or disk), and re-run the same command "
                         f"with --resume")
        return _fail(f"{type(e).__name__}: {e} (re-run with --debug for the traceback)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
