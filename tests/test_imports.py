"""The package imports without cycles: every module alone, and no cycle between modules or concerns.

Imports inside functions count too: a lazy import that closes a cycle only hides it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "peftlab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(module_name(p) for p in PACKAGE.rglob("*.py") if "metrics" not in p.parts)


def imported_modules(path: Path) -> set[str]:
    """peftlab modules a file imports anywhere in it (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("peftlab"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("peftlab") and node.level == 0:
            for alias in node.names:  # `from peftlab.x import y`: y may be a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
    return {m for m in found if m in MODULES}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py") if "metrics" not in p.parts}
    return {name: imported_modules(path) - {name} for name, path in paths.items()}


def concern(module: str) -> str:
    """peftlab.methods.lora -> methods; peftlab.cli -> cli (top-level modules are their own concern)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "peftlab"


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():  # the checker itself can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_cycle():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


# The package and the shim modules at the top (cli, runs) may import any concern; below them,
# concerns form a DAG.
TOP = {"peftlab", "cli", "runs"}


def test_no_cycle_between_concerns():
    edges: dict[str, set[str]] = {}
    for module, imports in graph().items():
        if concern(module) in TOP:
            continue
        edges.setdefault(concern(module), set()).update(concern(m) for m in imports if concern(m) != concern(module))
    cycle = find_cycle(edges)
    assert cycle is None, f"concerns import each other: {' -> '.join(cycle)}"


CHILD = """
import importlib, os, sys
third_party, modules = sys.argv[1].split(","), sys.argv[2:]
for name in third_party:  # loaded once before the forks, so each child pays only for peftlab's own code
    try:
        importlib.import_module(name)
    except Exception:
        pass
failures = []
for name in modules:
    pid = os.fork()
    if pid == 0:  # the child imports one peftlab module into an interpreter that holds none
        try:
            importlib.import_module(name)
        except BaseException as err:
            print(f"{name}: {type(err).__name__}: {err}", flush=True)
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    failures += [name] if status else []
sys.exit(1 if failures else 0)
"""


def third_party_imports() -> list[str]:
    """The modules outside peftlab that the package imports at module level (dotted, as written):
    what every child would otherwise load again (imports inside functions run only when called)."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return sorted(m for m in found if m.split(".")[0] not in ("peftlab", "__future__"))


def test_every_module_imports_alone():
    """Each module in its own forked child of a process that has loaded no peftlab module, so an
    import that works only after another module happened to load first fails here."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CHILD, ",".join(third_party_imports()), *MODULES],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
