"""The package's shape: stages import only earlier stages, nothing imports in a cycle, `--help`
never imports torch, and no module grows past a readable size.

Stage order (an earlier stage may be imported by a later one, never the reverse):

    errors, files, config, console < task < corpus < constrain, vocab < teachers < generation
    < store < parts < extract_api < extract < students < runtime_decode < runtime < losses < predict
    < confidence < cascade < evaluate < export_decoder < export < train < cost < coverage < report
    < forecast < compare < pipeline < serve < api < cli_serve, cli_study < cli < __main__

Modules of one rank may not import each other, except in rank 0 (errors, files, config,
console) and within a package (teachers/, students/, train/).
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
MAX_LINES = 420

RANKS: list[tuple[str, ...]] = [
    ("errors", "files", "config", "console"),
    ("task", "tasks"),  # tasks/: the presets' YAML files, read by task.py
    ("corpus",),
    ("constrain", "vocab"),
    ("teachers",),
    ("generation",),
    ("store",),
    ("inspection",),  # what a shard folder holds (the inspect verb)
    ("agreement",),  # how two labellers agree: pure functions over answers
    ("consistency",),  # the teacher's agreement with itself under meaning-keeping edits
    ("calibrate",),
    ("parts",),  # extraction by several workers: who labels what, the shared calibration
    ("extract_api",),  # extraction through an OpenAI-compatible server (extract.py hands it API teachers)
    ("extract",),
    ("students",),
    ("runtime_decode",),  # an exported decoder's token automaton and greedy decoding (runtime loads it): no torch
    ("runtime",),  # an exported student answered by onnxruntime: imports no torch
    ("losses",),
    ("predict",),
    ("confidence",),  # calibrated confidence per field: temperatures, ECE, the coverage curve
    ("peers",),
    ("speed",),  # speed, size and memory of student and teacher
    ("cascade",),  # the student when it is sure, the teacher otherwise
    ("evaluate",),
    ("export_decoder",),  # a decoder student's two graphs and token automaton, checked against PyTorch and xgrammar
    ("export",),  # a student to ONNX, checked against PyTorch
    ("train",),
    ("cost",),
    ("coverage",),  # the report's confidence section: reliability, agreement against coverage, its cost
    ("report",),
    ("forecast",),
    ("compare",),
    ("pipeline",),
    ("serve",),  # the cascade behind micro-batching workers
    ("api",),  # the HTTP API over it
    ("cli_serve", "cli_study"),  # the serving verbs, and the verbs that study shards and options, added to cli's app
    ("cli",),
    ("__main__",),  # `python -m microdistill`, as torchrun starts it
]
RANK = {stage: i for i, group in enumerate(RANKS) for stage in group}
SAME_RANK_OK = {0}  # ranks whose stages may import each other
PACKAGES = {"teachers", "students", "train", "tasks"}


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
    """A new top-level module must be given a place in the stage order above."""
    missing = sorted({stage_of(m) for m in modules() if stage_of(m)} - set(RANK))
    assert not missing, f"modules without a stage in tests/test_layout.py RANKS: {missing}"


def violations(graph: dict[str, list[tuple[str, int]]], where: dict[str, str]) -> list[str]:
    """`file:line: ...` for each import of a later stage (or of another stage of the same rank)."""
    bad = []
    for m, imports in graph.items():
        src = stage_of(m)
        if src is None:
            continue
        for target, line in imports:
            dst = stage_of(target)
            if dst is None or dst == src:
                continue  # the package root, or a module of the same stage (package)
            rs, rd = RANK[src], RANK[dst]
            if rd > rs or (rd == rs and rs not in SAME_RANK_OK):
                bad.append(f"{where[m]}:{line}: {m} (stage {src}, rank {rs}) imports {target} (stage {dst}, rank {rd})")
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
    """The checkers themselves: a backward import and a cycle are reported, allowed imports are not."""
    graph = {
        "microdistill.store": [("microdistill.extract", 7), ("microdistill.corpus", 3)],
        "microdistill.constrain": [("microdistill.vocab", 5)],  # same rank, not rank 0
        "microdistill.files": [("microdistill.errors", 1)],  # rank 0 may import rank 0
        "microdistill.train.loop": [("microdistill.train.config", 2), ("microdistill.evaluate", 4)],
        "microdistill.teachers": [("microdistill.teachers.hf", 9)],
    }
    where = {m: m.replace(".", "/") + ".py" for m in graph}
    bad = violations(graph, where)
    assert len(bad) == 2
    assert bad[0].startswith("microdistill/store.py:7: ") and "microdistill.extract" in bad[0]
    assert bad[1].startswith("microdistill/constrain.py:5: ")
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_the_graph_sees_function_level_and_relative_imports():
    """Guard against a parser that finds nothing: known imports of each kind are in the graph."""
    _, graph = import_graph()
    targets = {m: {t for t, _ in imps} for m, imps in graph.items()}
    assert "microdistill.store" in targets["microdistill.extract"]  # top level
    assert "microdistill.generation" in targets["microdistill.extract"]  # inside a function
    assert "microdistill.task" in targets["microdistill.store"]  # inside a method
    assert "microdistill.train.loop" in targets["microdistill.train"]  # package __init__
    assert "microdistill.pipeline" in targets["microdistill.cli"]  # inside a typer command


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
