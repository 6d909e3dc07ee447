"""Structure rules of the package (see the README's "Adding a method"): short functions,
no method module importing another, no reference to files users do not have."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_optax"
MAX_BODY_LINES = 120
# One module per method; the shared pieces are pairs, pairwise (the kit), linalg, base.
METHOD_MODULES = ("riemannian", "lora_rite", "ilora", "lora_one", "lora_plus", "lora_pro", "solora")


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function's body, its docstring excluded."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            body = body[1:]
    if not body:
        return 0
    end = max(getattr(node, "end_lineno", node.lineno) for node in body)
    return end - body[0].lineno + 1


def test_no_function_body_longer_than_120_lines():
    long = []
    for path in _sources():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                if n > MAX_BODY_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, f"function bodies over {MAX_BODY_LINES} lines: {long}"


def test_body_length_counts_what_it_should():
    tree = ast.parse('def f():\n    """doc\n\n    more"""\n    x = 1\n    return x\n')
    assert _body_lines(tree.body[0]) == 2  # type: ignore[arg-type]


@pytest.mark.parametrize("module", METHOD_MODULES)
def test_method_modules_do_not_import_each_other(module):
    tree = ast.parse((PACKAGE / "_src" / f"{module}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    siblings = {f"lora_optax._src.{m}" for m in METHOD_MODULES if m != module}
    assert not imported & siblings, sorted(imported & siblings)


def test_no_reference_to_developer_only_files():
    """Docstrings and the README must be self-contained: users have no SPEC or shared/."""
    pattern = re.compile(r"\bSPEC\b|shared/papers|\.\./shared|shared/SPEC")
    hits = []
    for path in [*_sources(), ROOT / "README.md"]:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, hits
