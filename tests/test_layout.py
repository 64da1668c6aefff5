"""The source tree's layering: no import cycles among compressor's modules (lazy imports inside functions
count: they are a dependency all the same; imports under `if TYPE_CHECKING:` do not)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("compressor", "plugins", "export")  # plugins/ and export/ install as compressor.plugins, .export


def module_files() -> dict[str, Path]:
    """Dotted module name (as installed) → file."""
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            parts = parts if package == "compressor" else ("compressor", *parts)
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside `if TYPE_CHECKING:` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: list[str] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets += [base, *(f"{base}.{a.name}" for a in node.names)]
    found = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        # a module importing its own package's __init__ is not a dependency between layers
        if target and target != name and not name.startswith(target + "."):
            found.add(target)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    known = module_files()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert graph["compressor.run.pipeline"] & {"compressor.recipe.plan", "compressor.run.cache"}, "the graph builder lost its way"
    found = cycles(graph)
    detail = "; ".join(" ↔ ".join(c) + " (" + ", ".join(f"{m} → {sorted(graph[m] & set(c))}" for m in c) + ")"
                       for c in found)
    assert not found, f"import cycles: {detail}"


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_tests_import_no_other_test_module():
    """Shared test helpers live in compressor.testing or tests/conftest.py, never in another test module."""
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[-1].startswith("test_")
                          or n.startswith("tests.test_")]
    assert not offenders, offenders


def test_modules_and_functions_stay_small():
    """compressor/ modules stay under 500 lines and functions under 60, unless a comment on the line above
    the function's `def` (or its decorators) says why it cannot be split."""
    too_long = []
    for path in sorted((REPO / "compressor").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        if len(lines) > 500:
            too_long.append(f"{path.relative_to(REPO)}: {len(lines)} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                explained = first >= 2 and lines[first - 2].strip().startswith("#")
                if length > 60 and not explained:
                    too_long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, too_long


def test_the_old_import_paths_warn_and_still_work():
    """Plugin API 1.0's module paths still give the same objects for one release, each with a DeprecationWarning."""
    import subprocess
    import sys

    probe = """
import importlib, warnings
old = {"compressor.artifact": ("compressor.models.artifact", "Artifact"),
       "compressor.data": ("compressor.models.data", "DataSource"),
       "compressor.evaluators.base": ("compressor.evaluate.base", "Evaluator"),
       "compressor.evaluators.runtime": ("compressor.models.loading", "load_runner")}
for path, (new, name) in old.items():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(path)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), path
    assert getattr(module, name) is getattr(importlib.import_module(new), name), path
from compressor.evaluators.runtime import Runner
from compressor.models.loading import LoadedModel
assert Runner is LoadedModel
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


#: Where the core may spell a built-in's name: the list of built-in plugins, the module that defines the
#: core's own formats, and compressor.testing (ready-made tiny models of the built-in tasks for plugin tests).
NAMES_ALLOWED_IN = {"compressor/host.py", "compressor/models/formats.py", "compressor/testing.py"}
#: String constants that equal a built-in name but mean something else there.
NAMES_MEANING_ELSE = {("compressor/run/record.py", "onnx"): "the onnx library's distribution name"}


def builtin_names() -> set[str]:
    """The names of the built-in steps, tasks and formats (every plugin's registrations, by the real host)."""
    from compressor.host import build_host

    host = build_host(entry_points=[])
    return set(host.steps) | set(host.tasks) | set(host.formats)


def test_the_core_names_no_builtin_step_task_or_format():
    names = builtin_names()
    assert {"quantize-onnx", "text-generation", "ort", "hf"} <= names  # the walk below would find something
    hits = []
    for path in sorted((REPO / "compressor").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in NAMES_ALLOWED_IN or rel.startswith("compressor/tasks/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                    and (rel, node.value) not in NAMES_MEANING_ELSE):
                hits.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not hits, "the core names built-ins (ask the registered step, task or format instead): " + ", ".join(hits)
