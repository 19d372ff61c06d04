"""Imports go one way: every negstudy module imports in a fresh interpreter, and the graph of
first-party imports (top-level and inside functions, read with ast) has no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "negstudy"


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file of every module of ``package`` found below ``root``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the first-party modules it imports, anywhere in its body (functions included).
    ``from a import b`` is an edge to ``a.b`` when that is a module, else to ``a``. Imports by a
    computed name (importlib) are not seen."""
    files = module_names(root, package)

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in files}
    for module, path in files.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                resolved = resolve(target)
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_negstudy_has_no_import_cycle():
    graph = import_graph(PACKAGE.parent, "negstudy")
    assert len(graph) > 30 and "negstudy.tables" in graph["negstudy.report"]  # edges are seen
    assert "negstudy.attention" in graph["negstudy.critical"]  # ... inside functions too
    assert cycles(graph) == [], "import cycles (make one side import the other, or move the shared piece down)"


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(module_names(PACKAGE.parent, "negstudy"))
    code = ("import importlib, sys\nbad = []\n"
            f"for name in {names!r}:\n"
            "    try:\n        importlib.import_module(name)\n"
            "    except Exception as err:\n        bad.append(f'{name}: {type(err).__name__}: {err}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_planted_cycle_is_found_even_inside_a_function(tmp_path):
    write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/config.py": "from pkg.models import load\n",
        "pkg/models.py": "import numpy\n\ndef load():\n    from pkg import config  # the cycle, hidden in a function\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/leaf.py": "from ..config import load\nfrom . import other\n",
        "pkg/sub/other.py": "",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.config"] == {"pkg.models"} and graph["pkg.models"] == {"pkg.config"}
    assert graph["pkg.sub.leaf"] == {"pkg.config", "pkg.sub.other"}  # relative imports resolved
    assert cycles(graph) == [["pkg.config", "pkg.models"]]
    write(tmp_path, {"pkg/models.py": "import numpy\n\ndef load():\n    return numpy.zeros(1)\n"})
    assert cycles(import_graph(tmp_path, "pkg")) == []


def test_a_three_module_cycle_is_one_component(tmp_path):
    write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "from pkg import c\n",
                     "pkg/c.py": "def f():\n    import pkg.a\n", "pkg/d.py": "import pkg.a\n"})
    assert cycles(import_graph(tmp_path, "pkg")) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_a_job_starts_without_the_metrics_library():
    """torchmetrics costs ~2.7 s of CPU to import (it loads every domain's functions): a job, its report
    and the removal study's module start without it; the removal scores import it when they first run."""
    code = ("import sys; import negstudy.__main__; from negstudy import generate, report; from negstudy.studies import removal; "
            "print('torchmetrics' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
