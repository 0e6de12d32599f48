"""The code's shape: imports follow the data flow and never run back, no two modules import each
other (directly or round a cycle), no module grows into a drawer of several jobs, every command
of ``cli.py`` lives in one ``commands`` module of its stage, and only ``cli.py`` imports a
``commands`` module (the library API lives outside them)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The data flow, upstream first: a package may import only packages at its own level or before it.
FLOW = ("common", "training", "features", "transnet", "analysis", "studies")
MAX_LINES = 650


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in FLOW:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts)
            out[name.removesuffix(".__init__")] = p
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every project module ``path`` imports, at module level or inside functions."""
    return _imports_in(path.read_text(), known)


def _imports_in(source: str, known: set[str]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n:
                found.add(n)
    return found


MODULES = _modules()
GRAPH = {m: _imports(p, set(MODULES)) - {m} for m, p in MODULES.items()}


def test_imports_follow_the_data_flow_and_never_run_back():
    back = [f"{m} imports {d}" for m, deps in GRAPH.items() for d in deps
            if FLOW.index(d.split(".")[0]) > FLOW.index(m.split(".")[0])]
    assert not back, "imports against the data flow " + " -> ".join(FLOW) + ": " + "; ".join(sorted(back))


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes (empty for a DAG)."""
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_cycles_between_modules():
    cycles = find_cycles(GRAPH)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_stay_small(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {n} lines; split it along its seams"


# --------------------------------------------------------------------------- command modules

# Imports of command modules that other branches are moving into library modules in parallel, as
# (importer, command module): the rule below tolerates exactly these, and fails once one of them is
# gone so that the entry is deleted. The integrator empties this after merging those branches.
PENDING_MOVES: set[tuple[str, str]] = set()


def is_command_module(name: str) -> bool:
    return name.rpartition(".")[2].endswith("commands")


def command_module_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Every (importer, command module) edge of ``graph`` whose importer is not ``cli``."""
    return {(m, d) for m, deps in graph.items() if m != "cli" for d in deps if is_command_module(d)}


def _notebook_source(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


def _importers() -> dict[str, set[str]]:
    """The package modules, the benchmarks and the notebooks, each with the project modules it imports."""
    known = set(MODULES)
    out = dict(GRAPH)
    out.update({str(p.relative_to(ROOT)): _imports(p, known) for p in sorted((ROOT / "bench").glob("*.py"))})
    out.update({str(p.relative_to(ROOT)): _imports_in(_notebook_source(p), known)
                for p in sorted((ROOT / "notebooks").glob("*.ipynb"))})
    return out


def test_command_import_finder_finds_planted_imports():
    graph = {"cli": {"training.commands"}, "training.commands": {"training.options", "common.options"},
             "training.family_commands": {"training.commands", "training.options"},
             "analysis.consistency": {"transnet.commands", "transnet.fit"},
             "notebooks/x.ipynb": {"analysis.similarity_commands"}}
    assert command_module_imports(graph) == {("training.family_commands", "training.commands"),
                                             ("analysis.consistency", "transnet.commands"),
                                             ("notebooks/x.ipynb", "analysis.similarity_commands")}
    assert command_module_imports({"cli": {"training.commands"}, "training.commands": {"training.options"}}) == set()


def test_only_cli_imports_command_modules():
    """A command module parses, calls the library and prints: library modules, other command modules,
    benchmarks and notebooks import the library, never a command module."""
    found = command_module_imports(_importers())
    new = sorted(f"{m} imports {d}" for m, d in found - PENDING_MOVES)
    assert not new, "move what these import out of the command module into a library module: " + "; ".join(new)
    done = sorted(f"{m} -> {d}" for m, d in PENDING_MOVES - found)
    assert not done, "no longer imported; delete from PENDING_MOVES: " + "; ".join(done)


def test_every_command_is_declared_by_one_commands_module_of_its_stage():
    import cli

    owners: dict[str, str] = {}
    for mod_name in cli.COMMAND_MODULES:
        assert mod_name.split(".")[0] in FLOW and mod_name.split(".")[-1].endswith("commands"), mod_name
        for cmd in __import__(mod_name, fromlist=["COMMANDS"]).COMMANDS:
            assert cmd.name not in owners, f"{cmd.name} declared by {owners.get(cmd.name)} and {mod_name}"
            owners[cmd.name] = mod_name
    assert set(owners) == set(cli.build_parser()[1])
    for mod_name, names in cli.COMMAND_MODULES.items():
        declared = [c.name for c in __import__(mod_name, fromlist=["COMMANDS"]).COMMANDS]
        assert list(names) == declared, f"cli.COMMAND_MODULES lists {names} for {mod_name}, which declares {declared}"


def test_one_command_imports_its_own_module_only():
    """``cli.py similarity ...`` must not pay for importing torchvision and the training code."""
    import subprocess
    import sys

    code = ("import sys, cli; cli.build_parser('similarity'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('training', 'transnet', 'studies', "
            "'torchvision', 'torch')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
    import cli

    parser, subs = cli.build_parser("similarity")
    assert list(subs) == ["similarity"]


def test_the_readme_command_table_names_every_command_and_its_module():
    import re

    import cli

    table = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.fullmatch(r"\| (`[^|]+`) \| `([\w/]+)\.py` \|", line.strip())
        if m:
            for name in re.findall(r"`([\w-]+)`", m.group(1)):
                table[name] = m.group(2).replace("/", ".")
    want = {name: mod for mod, names in cli.COMMAND_MODULES.items() for name in names}
    assert table == want


def test_every_command_line_of_the_readme_parses():
    """Each `python cli.py ...` line of the README (continuation lines joined, `[optional]` parts and
    comments dropped) is accepted by its command's parser: no renamed or removed option lingers there."""
    import contextlib
    import io
    import re
    import shlex

    import cli

    lines, buf = [], ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        lines.append(buf + line)
        buf = ""
    bad, seen = [], 0
    for line in lines:
        m = re.match(r"(?:torchrun .*?)?python3? cli\.py (.*)", line.strip())
        if not m:
            continue
        text = re.sub(r"\[[^\]]*\]", "", re.split(r"\s#\s", m.group(1))[0])
        argv = shlex.split(text)
        if not argv or argv[0].startswith("-"):
            continue
        seen += 1
        _, subs = cli.build_parser(argv[0])
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                subs[argv[0]].parse_args(argv[1:])
        except SystemExit:
            bad.append(f"{line.strip()}: {err.getvalue().strip().splitlines()[-1]}")
    assert seen >= 20 and not bad, bad


# --------------------------------------------------------------------------- parsers before torch

# Libraries a command needs only to run: its parser (options, choices, help) must not import them, so
# that --help and a mistyped option answer at once (docs/internals.md, "Arguments before torch").
HEAVY_LIBS = ("torch", "torchvision", "timm", "h5py", "matplotlib", "scipy", "safetensors", "sklearn", "PIL")


def _module_level_imports(source: str) -> set[str]:
    """What a module imports when it is imported: its top-level import statements (also inside a
    top-level ``try``), not those in functions or under ``if TYPE_CHECKING``."""
    names: set[str] = set()
    stack = list(ast.parse(source).body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            stack += node.body + node.orelse
    return names


def heavy_import_chain(start: str, imports: dict[str, set[str]]) -> list[str] | None:
    """The first chain of module-level imports from ``start`` to a heavy library (the library last),
    or None; ``imports`` maps each module to what it imports at module level."""
    seen, queue = {start}, [[start]]
    while queue:
        path = queue.pop(0)
        for name in sorted(imports.get(path[-1], ())):
            if name.split(".")[0] in HEAVY_LIBS:
                return path + [name.split(".")[0]]
            owner = next((m for m in (name, name.rpartition(".")[0]) if m in imports), None)
            for m in [owner.split(".")[0]] + [owner] if owner else []:   # a package's __init__ runs first
                if m in imports and m not in seen:
                    seen.add(m)
                    queue.append(path + [m])
    return None


def test_heavy_import_chain_finder_finds_a_planted_chain():
    imports = {"a.commands": {"a.options", "argparse"}, "a.options": {"a.config", "a.loop.train"},
               "a.config": {"dataclasses"}, "a.loop": {"torch.nn"}, "a": set()}
    assert heavy_import_chain("a.commands", imports) == ["a.commands", "a.options", "a.loop", "torch"]
    assert heavy_import_chain("a.config", imports) is None


def test_command_parsers_import_no_heavy_library_at_module_level():
    """Every command module, and all it imports at module level, is free of the heavy libraries; the
    command's run function imports them (tests/test_cli_imports.py checks the same by running)."""
    import cli

    imports = {m: _module_level_imports(p.read_text()) for m, p in MODULES.items()}
    chains = [heavy_import_chain(m, imports) for m in cli.COMMAND_MODULES]
    bad = [" -> ".join(c) for c in chains if c]
    assert not bad, "move what these import into torch-free modules or into the run functions: " + "; ".join(bad)
