"""The package's shape: no import cycles (module- or function-level), methods and file formats meet only
at the QuantizedTensor seam, GGUF knowledge stays in llmq/gguf/, and the main loop reads on one screen."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "llmq"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str) -> set[str]:
    """The llmq modules ``name`` imports anywhere in its body (function-level imports included)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from llmq.gguf import fit` names a module; `from llmq.grid import Grid` a name in one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:  # importing a.b.c from outside package a.b runs a/__init__ and a/b/__init__ first
            parts = t.split(".")
            found.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                         if p in MODULES and p != name and not name.startswith(p + "."))
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _reach(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_sees_function_level_imports_and_parent_packages(tmp_path):
    """The checker itself: an import inside a function is an edge too, and so is the package a module is in
    (importing llmq.formats.base runs llmq/formats/__init__.py first)."""
    assert "llmq.gguf.fit" in GRAPH["llmq.gguf.types"]
    assert "llmq.methods.gptq" in GRAPH["llmq.methods.awq"]
    assert "llmq.formats" in GRAPH["llmq.pipeline"] and "llmq.formats" not in GRAPH["llmq.formats.gptq"]


def test_no_import_cycles():
    cycles = sorted(name for name in GRAPH if name in _reach(name))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("side,other", [("llmq.methods", ("llmq.formats", "llmq.gguf")),
                                        ("llmq.formats", ("llmq.methods",)), ("llmq.gguf", ("llmq.methods",))])
def test_methods_and_formats_meet_only_at_the_quantized_tensor(side, other):
    """No module of one side reaches the other, directly or through others."""
    for name in MODULES:
        if name == side or name.startswith(side + "."):
            bad = sorted(m for m in _reach(name) if m.startswith(other))
            assert not bad, f"{name} reaches {bad}"


def test_gguf_type_names_live_in_the_gguf_package():
    """No module outside llmq/gguf/ spells a GGUF block type (the CLI lists them from the type records)."""
    pattern = re.compile(r"\b[Qq][2-8]_(?:[01]|[Kk])(?:_[MmSs])?\b")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for name, p in MODULES.items() if not name.startswith("llmq.gguf")
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


def _function(path: Path, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_quantize_model_and_its_steps_fit_on_a_screen():
    """pipeline.quantize_model and every pipeline function it calls are at most 60 lines."""
    path = MODULES["llmq.pipeline"]
    tree = ast.parse(path.read_text())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    todo, checked = ["quantize_model"], set()
    while todo:
        fn = functions[todo.pop()]
        checked.add(fn.name)
        assert fn.end_lineno - fn.lineno + 1 <= 60, f"{fn.name} is {fn.end_lineno - fn.lineno + 1} lines"
        calls = {c.func.id for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        todo += [c for c in calls if c in functions and c not in checked]
    assert {"quantize_model", "_quantize_layer", "_start", "open_sink"} <= checked
