"""Nothing outside peftlab/methods/ tells methods apart by name: the trainer, the estimate, analysis
and reporting know a method only through its hooks and declared attributes (peftlab/methods/base.py).

The scan reads every module's syntax tree: a comparison (==, !=, in, not in) against a registered
method's name, or a literal tuple / list / set of two or more method names, is a place where a new
method would need an edit outside its own file.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from peftlab.errors import ConfigError
from peftlab.methods import METHODS, method_class

PACKAGE = Path(__file__).resolve().parents[2] / "peftlab"
# (file, string): the same word meaning something else there
NOT_A_METHOD = {
    ("analysis/spectra.py", "full"): "the SVD kind, full or randomized",
    ("analysis/report.py", "full"): "the SVD kind, full or randomized",
    ("analysis/cli.py", "adapter"): "a run's adapter/ folder",
}


def method_names_compared(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    found = []

    def strings(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [s for elt in node.elts for s in strings(elt)]
        return []

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                found += [(node.lineno, s) for s in strings(side) if s in names]
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            hits = [s for s in strings(node) if s in names]
            if len(hits) >= 2:
                found += [(node.lineno, s) for s in hits]
    return found


def test_the_scan_finds_a_comparison_and_a_list_of_names():  # the scan itself can fail
    source = 'if cfg.method == "lora": pass\nLIKE = ("dora", "vera")\nx = name in {"ia3"}\npath == "other"'
    assert method_names_compared(ast.parse(source), set(METHODS)) == [(1, "lora"), (2, "dora"), (2, "vera"), (3, "ia3")]


def test_no_module_outside_methods_names_a_method():
    names = set(METHODS)
    offending = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("methods/"):
            continue
        for line, name in method_names_compared(ast.parse(path.read_text()), names):
            if (relative, name) not in NOT_A_METHOD:
                offending.append(f"peftlab/{relative}:{line} compares against method {name!r}")
    assert not offending, "\n".join(offending)


def test_unknown_method_names_the_key_and_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        method_class("lorax")
    assert err.value.key == "method" and "lora" in err.value.message


def test_registry_keys_are_the_methods_names():
    assert all(cls.name == name for name, cls in METHODS.items())
