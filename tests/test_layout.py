"""The package's shape: each folder is one stage of the data flow and imports only the folders
below it, nothing imports in a cycle, the runtime needs no torch, `--help` never imports torch,
and no module grows past a readable size.

The folders, lowest first (docs/architecture.md says what each holds):

    core < data < teachers < extract < students < train < evaluate < plan < report < runtime
    < export < serve < flows < cli < __main__

A module may import its own folder and any folder before it, never one after it.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "microdistill"
MAX_LINES = 400

LAYERS = [
    "core",  # errors, atomic files, options, console, the task and its grammar
    "data",  # corpora, shard folders, vocabularies, the packaged samples
    "teachers",  # what labels the inputs: one interface, every spec, decoding, the labeller
    "extract",  # corpus -> shards, for any teacher
    "students",  # the student kinds: model, folder, prediction, calibrated confidence
    "train",  # shards -> a student folder: the loop, losses, one module per kind
    "evaluate",  # measures: agreement, consistency, peers, speed; returns dicts
    "plan",  # cost and learning-curve forecasts: pure
    "report",  # renders measured dicts: Markdown and PNG
    "runtime",  # an export folder answered by onnxruntime: no torch, nothing of students/
    "export",  # a student -> an export folder, checked against the runtime
    "serve",  # the cascade behind HTTP
    "flows",  # orchestrations over the stages: run, eval, compare, cost
    "cli",  # the command line
    "__main__",  # `python -m microdistill`, as torchrun starts it
]
LAYER = {name: i for i, name in enumerate(LAYERS)}
NO_TORCH = ("runtime",)  # folders the base install (no torch) imports
NEVER = {"runtime": {"students", "train", "export"}}  # what a folder must not import, whatever the order


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def stage_of(module: str) -> str | None:
    """`microdistill.X.Y` -> X; the bare package `microdistill` has no stage."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports_of(path: Path, module: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported microdistill module, line) for every import in the file, at any depth
    (top level, inside functions, under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "microdistill" or alias.name.startswith("microdistill."):
                    found.append((alias.name, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == "microdistill" or target.startswith("microdistill.")):
                continue
            # `from microdistill.x import y` imports the submodule x.y when there is one
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
            if subs:
                found += [(s, node.lineno) for s in subs]
            if len(subs) < len(node.names):
                found.append((target, node.lineno))
    return found


def import_graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int]]]]:
    mods = modules()
    known = set(mods)
    return mods, {m: imports_of(p, m, known) for m, p in mods.items()}


def test_every_module_has_a_stage():
    """A new top-level folder or module must be given a place in LAYERS above."""
    missing = sorted({stage_of(m) for m in modules() if stage_of(m)} - set(LAYER))
    assert not missing, f"modules outside every layer of tests/test_layout.py LAYERS: {missing}"


def violations(graph: dict[str, list[tuple[str, int]]], where: dict[str, str]) -> list[str]:
    """`file:line: ...` for each import of a later folder, or of a folder NEVER forbids."""
    bad = []
    for m, imports in graph.items():
        src = stage_of(m)
        if src is None:
            continue
        for target, line in imports:
            dst = stage_of(target)
            if dst is None or dst == src:
                continue  # the package root, or a module of the same folder
            if LAYER[dst] > LAYER[src] or dst in NEVER.get(src, ()):
                bad.append(f"{where[m]}:{line}: {m} (layer {src}) imports {target} (layer {dst})")
    return bad


def find_cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """Each cycle found by a depth-first search, as [a, b, ..., a]."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges.get(m, []):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return cycles


def test_no_stage_imports_a_later_stage():
    mods, graph = import_graph()
    bad = violations(graph, {m: str(p.relative_to(ROOT)) for m, p in mods.items()})
    assert not bad, "imports against the stage order:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods, graph = import_graph()
    edges = {m: sorted({t for t, _ in imps if t in mods and t != m}) for m, imps in graph.items()}
    lines = {(m, t): line for m, imps in graph.items() for t, line in imps}
    cycles = find_cycles(edges)
    described = [
        " -> ".join(c) + "  (" + ", ".join(f"{mods[a].relative_to(ROOT)}:{lines[a, b]}" for a, b in zip(c, c[1:])) + ")"
        for c in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_checks_catch_what_they_are_for():
    """The checkers themselves: a backward import, a forbidden one and a cycle are reported,
    allowed imports are not."""
    graph = {
        "microdistill.data.shards": [("microdistill.extract.local", 7), ("microdistill.core.task", 3)],
        "microdistill.runtime.heads": [("microdistill.students.folder", 5), ("microdistill.data.vocab", 6)],
        "microdistill.core.files": [("microdistill.core.errors", 1)],
        "microdistill.train.loop": [("microdistill.train.config", 2), ("microdistill.students.decoder", 4)],
        "microdistill.teachers": [("microdistill.teachers.hf", 9)],
    }
    where = {m: m.replace(".", "/") + ".py" for m in graph}
    bad = violations(graph, where)
    assert len(bad) == 2
    assert bad[0].startswith("microdistill/data/shards.py:7: ") and "microdistill.extract" in bad[0]
    assert bad[1].startswith("microdistill/runtime/heads.py:5: ")
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_the_graph_sees_function_level_and_relative_imports():
    """Guard against a parser that finds nothing: known imports of each kind are in the graph."""
    _, graph = import_graph()
    targets = {m: {t for t, _ in imps} for m, imps in graph.items()}
    assert "microdistill.data.shards" in targets["microdistill.extract.local"]  # top level
    assert "microdistill.teachers.decoding" in targets["microdistill.extract.local"]  # inside a method
    assert "microdistill.core.task" in targets["microdistill.data.shards"]  # inside a method
    assert "microdistill.train.loop" in targets["microdistill.train"]  # package __init__
    assert "microdistill.flows.run" in targets["microdistill.cli.distil"]  # inside a typer command


def test_relative_imports_resolve(tmp_path):
    pkg = tmp_path / "microdistill" / "sub"
    pkg.mkdir(parents=True)
    init = pkg / "__init__.py"
    init.write_text("from .a import x\nfrom .. import store\n")
    mod = pkg / "a.py"
    mod.write_text("from . import b\nfrom ..store import Record\n")
    known = {"microdistill.sub.a", "microdistill.sub.b", "microdistill.store"}
    assert imports_of(init, "microdistill.sub", known) == [("microdistill.sub.a", 1), ("microdistill.store", 2)]
    assert imports_of(mod, "microdistill.sub.a", known) == [("microdistill.sub.b", 1), ("microdistill.store", 2)]


def test_no_module_is_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in sorted(PACKAGE.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_torch_free_folders_import_no_torch():
    """Every module of the folders the base install runs (no torch) imports without torch."""
    names = sorted(m for m in modules() if stage_of(m) in NO_TORCH)
    assert "microdistill.runtime" in names
    code = ("import importlib, sys\n"
            f"for m in {names!r}: importlib.import_module(m)\n"
            "print(','.join(sorted(m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules)))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "", f"importing {NO_TORCH} imported {p.stdout.strip()}"


# ---- the CLI's help imports no torch ---------------------------------------------------------------
def _help_imports(args: list[str]) -> tuple[int, str, list[str]]:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import microdistill.cli\n"
        f"r = CliRunner().invoke(microdistill.cli.app, {args!r})\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'xgrammar', 'matplotlib') if m in sys.modules)\n"
        "print(r.exit_code)\n"
        "print(','.join(heavy))\n"
        "sys.stderr.write(r.output)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    exit_code, heavy = p.stdout.splitlines()[-2:]
    return int(exit_code), p.stderr, [h for h in heavy.split(",") if h]


def _verbs() -> list[str]:
    import typer.main

    from microdistill.cli import app

    return sorted(typer.main.get_command(app).commands)


def test_help_imports_no_torch():
    code, output, heavy = _help_imports(["--help"])
    assert code == 0
    for verb in _verbs():
        assert verb in output  # the help really was rendered
    assert heavy == [], f"`microdistill --help` imported {heavy}"


def test_every_verb_help_imports_no_torch():
    verbs = _verbs()
    assert {"extract", "train", "eval", "run", "cost"} <= set(verbs)
    # one process for all verbs keeps this fast; each `--help` is checked on its own below
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import microdistill.cli\n"
        "for verb in sys.argv[1:]:\n"
        "    r = CliRunner().invoke(microdistill.cli.app, [verb, '--help'])\n"
        "    heavy = sorted(m for m in ('torch', 'transformers', 'xgrammar') if m in sys.modules)\n"
        "    ok = r.exit_code == 0 and 'Usage:' in r.output and verb in r.output\n"
        "    print(verb, int(ok), ','.join(heavy) or '-')\n"
    )
    p = subprocess.run([sys.executable, "-c", code, *verbs], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.strip()]
    assert [r[0] for r in rows] == verbs
    failed = [r[0] for r in rows if r[1] != "1"]
    heavy = {r[0]: r[2] for r in rows if r[2] != "-"}
    assert not failed, f"`--help` failed for {failed}"
    assert not heavy, f"`VERB --help` imported heavy libraries: {heavy}"


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"]])
def test_console_script_help_imports_no_torch(args):
    """The installed entry point, with Python's own import log: no torch module is ever imported."""
    exe = Path(sys.executable).parent / "microdistill"
    if not exe.is_file():
        pytest.fail(f"{exe}: the console script is not installed (pip install -e .)")
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    p = subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=ROOT, timeout=60, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Usage:" in p.stdout
    imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
    assert "microdistill.cli" in imported  # the log is really there
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
