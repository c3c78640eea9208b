"""The dependency rules of DESIGN.md section 3, read from every import (lazy ones inside functions too)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# folder -> package name (pyproject installs each folder under its own name)
ROOTS = {"triton_adder": "triton_adder", "tuning": "tuning", "reports": "reports"}
KERNEL_MAY_IMPORT = ("triton_adder.kernels", "triton_adder.contract", "triton_adder.geometry")


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in ROOTS.items():
        for path in (REPO_ROOT / folder).rglob("*.py"):
            parts = path.relative_to(REPO_ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (relative imports resolved; `from pkg import mod` counts mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in out if t in known and t != name}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module. A package's __init__ importing its
    own submodules is not a cycle (the submodule reaches the package only through its parent)."""

    def counts(a: str, b: str) -> bool:
        return not (a.startswith(b + ".") or b.startswith(a + "."))

    edges = {a: {b for b in bs if counts(a, b)} for a, bs in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def kernel_violations(graph: dict[str, set[str]]) -> list[str]:
    """kernels/ may import only contract, geometry and kernels.* (it receives its launch config)."""
    return [
        f"{m} imports {t}"
        for m, ts in sorted(graph.items())
        if m.startswith("triton_adder.kernels")
        for t in sorted(ts)
        if not t.startswith(KERNEL_MAY_IMPORT)
    ]


def generic_violations(graph: dict[str, set[str]], absolute: dict[str, set[str]]) -> list[str]:
    """tuning/ and reports/ import nothing of triton_adder, and each other only relatively."""
    generic = ("tuning", "reports")
    wrong = [
        f"{m} imports {t}"
        for m, ts in sorted(graph.items())
        if m.startswith(generic)
        for t in sorted(ts)
        if not t.startswith(generic)
    ]
    wrong += [
        f"{m} imports {t} by an absolute name (use a relative import)"
        for m, ts in sorted(absolute.items())
        if m.startswith(generic)
        for t in sorted(ts)
        if t.split(".")[0] in ROOTS
    ]
    return wrong


def absolute_imports() -> dict[str, set[str]]:
    """Module -> the absolute names it imports that start with one of the project's folder names."""
    found = {}
    for name, path in modules().items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module)
        found[name] = {t for t in names if t.split(".")[0] in ROOTS}
    return found


def describe(cycle: list[str], graph: dict[str, set[str]]) -> str:
    members = set(cycle)
    return "; ".join(f"{m} imports {t}" for m in cycle for t in sorted(graph[m] & members))


def test_the_checkers_can_fail():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p": {"p.a"}, "p.d": set()}
    assert cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert cycles({"p": {"p.a"}, "p.a": {"p"}}) == []  # package <-> own submodule
    assert kernel_violations({"triton_adder.kernels.forward": {"triton_adder.autotune.lookup"}}) == [
        "triton_adder.kernels.forward imports triton_adder.autotune.lookup"
    ]
    assert kernel_violations({"triton_adder.kernels.forward": {"triton_adder.contract"}}) == []
    assert generic_violations({"tuning.cache": {"triton_adder.contract"}}, {}) == [
        "tuning.cache imports triton_adder.contract"
    ]
    assert generic_violations({}, {"reports.page": {"reports.tables"}}) != []


def test_the_graph_reads_lazy_and_relative_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from . import b\n    from .c import thing\n")
    known = {"pkg": package / "__init__.py", **{f"pkg.{m}": package / f"{m}.py" for m in "abc"}}
    assert imports_of("pkg.a", package / "a.py", known) == {"pkg", "pkg.b", "pkg.c"}
    graph = import_graph()
    assert "tuning.space" in graph["tuning.cache"]  # relative, top of file
    assert any(t.startswith("triton_adder.backends") for t in graph["triton_adder.ops"])


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert found == [], "import cycles: " + " | ".join(describe(cycle, graph) for cycle in found)


def test_kernels_import_no_backend_op_tuner_or_job():
    wrong = kernel_violations(import_graph())
    assert wrong == [], "a kernel receives its config and knows no backend: " + "; ".join(wrong)


def test_generic_packages_import_nothing_of_triton_adder():
    wrong = generic_violations(import_graph(), absolute_imports())
    assert wrong == [], "tuning/ and reports/ must stay generic: " + "; ".join(wrong)
