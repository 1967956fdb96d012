"""The package's dependency direction, checked on the source (an AST walk, no extra tool).

Groups, lowest first; a module may import its own group and any group of a lower layer, never a
group of its own layer or a higher one:

    kernel (errors, faults) <- config <- store | runtime <- data <- models <- robustness
    <- training <- orchestration <- perf | report <- api (paper_repro/__init__, api, export)
    <- cli <- plug-ins (baselines/, slurm/)

paper_repro/results.py, the store's public face, belongs to the store.

`store` and `runtime`, `perf` and `report` are siblings: neither imports
the other. Plug-ins import core; core reaches them only through the entry lists that are data
(`training.methods.PLUGINS`, `cli.parser.SLURM_LAUNCHER`), imported with importlib by name.

Every `import` counts, at module level or inside a function, `if TYPE_CHECKING:` included.
Exempt: a package's parent packages, which Python imports before it (paper_repro/__init__.py,
the public API, is imported by every module of the package), and importlib calls by name.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("paper_repro", "baselines", "slurm")
LAYERS: tuple[tuple[str, ...], ...] = (
    ("kernel",), ("config",), ("store", "runtime"), ("data",), ("models",), ("robustness",),
    ("training",), ("orchestration",), ("perf", "report"), ("api",), ("cli",), ("plugins",))
TOP_LEVEL = {  # paper_repro's own top-level modules; a subpackage is its own group
    "paper_repro": "api", "paper_repro.api": "api", "paper_repro.export": "api",
    "paper_repro.model_card": "api",
    "paper_repro.results": "store", "paper_repro.errors": "kernel", "paper_repro.faults": "kernel",
    "paper_repro.config": "config", "paper_repro.experiment": "config", "paper_repro.cli": "cli",
    "paper_repro.__main__": "cli"}
RANK = {group: i for i, layer in enumerate(LAYERS) for group in layer}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def group(module: str) -> str:
    if module.split(".")[0] in ("baselines", "slurm"):
        return "plugins"
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    return module.split(".")[1]


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported module, line) for every import of a project module in `path`."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod; `from mod import name`, mod
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source
                       for a in node.names]
        else:
            continue
        out += [(t, node.lineno) for t in targets if t.split(".")[0] in PACKAGES]
    return out


def graph(root: Path = ROOT) -> dict[str, list[tuple[str, int]]]:
    known = modules(root)
    return {name: imports(name, path, known) for name, path in known.items()}


def wrong_way(edges: dict[str, list[tuple[str, int]]]) -> list[str]:
    out = []
    for module, targets in edges.items():
        for target, line in targets:
            mine, theirs = group(module), group(target)
            if mine != theirs and RANK[theirs] >= RANK[mine]:
                out.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
    return out


def circles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """The import circles: strongly connected components of two or more modules, or one
    module that imports itself (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in edges.get(v, []):
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
            if len(component) > 1 or any(t == v for t, _ in edges.get(v, [])):
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_group():
    assert sorted({group(m) for m in modules()} - set(RANK)) == []


def test_no_import_points_the_wrong_way():
    assert wrong_way(graph()) == []


def test_no_import_circle():
    assert circles(graph()) == []


def test_core_never_imports_a_plug_in():
    edges = graph()
    assert [f"{m} imports {t}" for m, ts in edges.items() if group(m) != "plugins"
            for t, _ in ts if group(t) == "plugins"] == []


@pytest.mark.parametrize("planted, expected", [
    ("from paper_repro.training.runner import train_one\n", "wrong_way"),
    ("import baselines.pgd_at\n", "wrong_way"),
])
def test_the_checks_catch_a_planted_import(tmp_path, planted, expected):
    """A copy of the tree with one wrong-way import added to the store fails the check."""
    import shutil
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "cluster"))
    store = tmp_path / "paper_repro" / "store" / "layout.py"
    store.write_text(store.read_text() + "\n\ndef _planted():\n    " + planted)
    assert any("paper_repro.store.layout" in line for line in wrong_way(graph(tmp_path)))


def test_a_planted_circle_is_found():
    edges = {"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}
    assert circles(edges) == [["a", "b", "c"]]


def test_training_does_not_import_pandas():
    """Only the store's query (and report, perf) read the store as a DataFrame."""
    code = "import sys, paper_repro.training.runner; sys.exit('pandas' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
