"""One import direction: no two modules of dermfast/ or benchmarks/ import each other, directly or around a loop.

The graph is read from the source with `ast` (nothing is imported), counting every import statement wherever it
is written: at module level, inside a function (a lazy import is still a dependency), under `if TYPE_CHECKING`.
A cycle means two pieces that cannot be understood, tested or replaced apart; the fix is to move the shared piece
down into a module both sides import, so that every arrow points one way.

Module names: dermfast/a/b.py is `dermfast.a.b`, dermfast/a/__init__.py is `dermfast.a`. benchmarks/ is not a
package: its files import each other as top-level siblings (`import _common`, `from bench_ceilings import ...`,
with benchmarks/ on sys.path), so benchmarks/x.py is the node `benchmarks/x`, reached by the name `x` from a
benchmarks file. Relative imports (`from . import x`, `from ..data import y`) are resolved against the package.

Imports by a computed name (importlib, as dermfast.bench loads the bench files) are not seen.

An import of `a.b.c` depends on module `a.b.c` if that is one of ours, otherwise on the nearest enclosing
package that is (for `from a.b import name` the name may be a submodule, `a.b.name`, or an attribute of `a.b`).
Importing a.b.c also runs a/__init__.py and a/b/__init__.py, so it is an edge to those packages too, except
from a module inside them (child -> its own parents): a package's __init__ re-exporting its submodules is the
ordinary layout, not a cycle of design.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = "benchmarks"


def _py_files(top: Path) -> list[Path]:
    """Every .py under top, through symlinked folders too (dermfast/kernels may be a link to kernels/)."""
    return sorted(Path(d) / f for d, _, files in os.walk(top, followlinks=True) for f in files if f.endswith(".py"))


def _modules() -> dict[str, Path]:
    """Node name -> file, for every .py under dermfast/ and benchmarks/."""
    mods: dict[str, Path] = {}
    for path in _py_files(ROOT / "dermfast"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    for path in sorted((ROOT / BENCH).glob("*.py")):
        mods[f"{BENCH}/{path.stem}"] = path
    return mods


def _package_of(node: str, path: Path) -> str:
    """The package a module's relative imports are resolved against."""
    if node.startswith(f"{BENCH}/"):
        return ""
    return node if path.name == "__init__.py" else node.rpartition(".")[0]


def _imported_names(tree: ast.AST, package: str) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of everything a module imports; `from m import n` yields m.n and m."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(a.name, n.lineno) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = package.split(".") if package else []
                if n.level - 1 > len(base):
                    raise AssertionError(f"relative import above the top package at line {n.lineno}")
                base = base[:len(base) - (n.level - 1)]
                mod = ".".join(base + ([n.module] if n.module else []))
            else:
                mod = n.module or ""
            out += [(f"{mod}.{a.name}" if mod else a.name, n.lineno) for a in n.names if a.name != "*"]
            if mod:
                out.append((mod, n.lineno))
    return out


def _resolve(name: str, importer: str, mods: dict[str, Path]) -> str | None:
    """The node `name` depends on, or None for a module that is not ours (torch, numpy, ...)."""
    if importer.startswith(f"{BENCH}/") and "." not in name and f"{BENCH}/{name}" in mods:
        return f"{BENCH}/{name}"
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in mods:
            return cand
        parts.pop()
    return None


def import_graph(mods: dict[str, Path] | None = None) -> dict[str, dict[str, int]]:
    """node -> {imported node: line of the first import of it}; no self-edges, no child -> own-parent edges."""
    mods = _modules() if mods is None else mods
    graph: dict[str, dict[str, int]] = {}
    for node, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: dict[str, int] = {}
        for name, line in _imported_names(tree, _package_of(node, path)):
            dep = _resolve(name, node, mods)
            if dep is None:
                continue
            parts = dep.split(".")  # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            for dep in (".".join(parts[:i]) for i in range(len(parts), 0, -1)):
                if dep in mods and dep != node and not node.startswith(dep + "."):
                    edges.setdefault(dep, line)
        graph[node] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One concrete shortest loop (first node repeated at the end) through each knot of `components`."""
    return [_loop_in(comp, graph) for comp in components(graph)]


def components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted: the modules of one knot."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (a few hundred)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _loop_in(comp: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest loop start -> ... -> start inside one strongly connected component (breadth-first)."""
    members, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    back = [v]  # v, its predecessor, ..., start
                    while back[-1] != start:
                        back.append(prev[back[-1]])
                    return back[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no loop found in component {comp}")


def _describe(loop: list[str], graph: dict[str, dict[str, int]], mods: dict[str, Path]) -> str:
    steps = [f"{a} ({mods[a].relative_to(ROOT)}:{graph[a][b]}) -> {b}" for a, b in zip(loop, loop[1:])]
    return "\n    ".join(steps)


# ------------------------------------------------------------------------------------------------ the checker


def _graph_of(tmp_path: Path, files: dict[str, str]) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    mods = {}
    for node, text in files.items():
        path = tmp_path / (node.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        mods[node.removesuffix(".__init__")] = path
    return mods, import_graph(mods)


def test_checker_finds_a_function_level_cycle(tmp_path):
    mods, graph = _graph_of(tmp_path, {
        "pkg.__init__": "",
        "pkg.a": "from pkg.b import f\n",
        "pkg.b": "def f():\n    from pkg import a\n    return a\n",  # lazy import: still an edge
        "pkg.c": "import pkg.a\n",
    })
    assert graph["pkg.b"] == {"pkg.a": 2}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_checker_resolves_relative_imports(tmp_path):
    mods, graph = _graph_of(tmp_path, {
        "pkg.__init__": "from .sub import x\n",  # parent -> child: an edge
        "pkg.sub.__init__": "",
        "pkg.sub.x": "from .. import y\nfrom ..sub import z\n",
        "pkg.y": "from .sub.x import thing\n",
        "pkg.sub.z": "import os\nimport torch.nn\n",
    })
    assert set(graph["pkg.sub.x"]) == {"pkg.y", "pkg.sub.z"}  # pkg.sub and pkg (its own parents) left out
    assert set(graph["pkg"]) == {"pkg.sub", "pkg.sub.x"}
    assert set(graph["pkg.y"]) == {"pkg.sub", "pkg.sub.x"}
    assert graph["pkg.sub.z"] == {}
    assert find_cycles(graph) == [["pkg.sub.x", "pkg.y", "pkg.sub.x"]]


def test_checker_counts_the_parent_packages_an_import_runs(tmp_path):
    mods, graph = _graph_of(tmp_path, {
        "pkg.__init__": "from pkg.a import f\n",  # importing anything in pkg runs this
        "pkg.a": "import other.b\n",
        "pkg.c": "",
        "other.__init__": "",
        "other.b": "from pkg.c import g\n",  # -> pkg.c, and -> pkg, whose __init__ imports pkg.a
    })
    assert graph["other.b"] == {"pkg.c": 1, "pkg": 1}
    assert find_cycles(graph) == [["other.b", "pkg", "pkg.a", "other.b"]]


def test_checker_finds_a_longer_loop_and_no_false_one(tmp_path):
    mods, graph = _graph_of(tmp_path, {
        "p.__init__": "from p import a, b, c\n",  # the package importing all its children is no cycle
        "p.a": "from p.b import x\n",
        "p.b": "from p.c import y\n",
        "p.c": "from p import a\n",
    })
    assert find_cycles(graph) == [["p.a", "p.b", "p.c", "p.a"]]
    mods, graph = _graph_of(tmp_path / "ok", {"q.__init__": "from q import a\n", "q.a": "import q.b\n", "q.b": ""})
    assert find_cycles(graph) == []


# ------------------------------------------------------------------------------------------------ the project


@pytest.fixture(scope="module")
def project():
    """(modules, import graph) of this checkout, parsed once for the tests below."""
    mods = _modules()
    return mods, import_graph(mods)


def test_no_import_cycles(project):
    mods, graph = project
    assert "dermfast.data.loader" in mods and f"{BENCH}/_common" in mods  # the walk found the tree
    assert f"{BENCH}/_common" in graph[f"{BENCH}/bench_ceilings"]  # sibling imports in benchmarks/ are seen
    knots = components(graph)
    assert not knots, "import cycles (move the shared piece down into a module both sides import):\n  " + \
        "\n  ".join(f"{len(k)} modules import each other: {', '.join(k)}; for example\n    "
                     + _describe(_loop_in(k, graph), graph, mods) for k in knots)


def _reaches(graph: dict[str, dict[str, int]], start: str) -> dict[str, str]:
    """Every node reachable from start -> the node that first reached it."""
    seen, todo = {start: ""}, [start]
    while todo:
        v = todo.pop()
        for w in graph[v]:
            if w not in seen:
                seen[w] = v
                todo.append(w)
    return seen


# The tools beside training and the layers below it. Training imports them, never the reverse: evaluating,
# exporting or sampling a checkpoint must not need the training package (its config, engine, CLI). The training
# stages that live in dermfast/synth (stage.py, dreambooth.py) are training code and are not listed.
BELOW_TRAINING = ["dermfast.evaluate", "dermfast.export", "dermfast.synthesize", "dermfast.info", "dermfast.bench",
                  "dermfast.eval", "dermfast.data", "dermfast.ops", "dermfast.models", "dermfast.distill",
                  "dermfast.device", "dermfast.errors"]


@pytest.mark.parametrize("tool", BELOW_TRAINING)
def test_tools_do_not_depend_on_training(project, tool):
    """Neither `tool` nor any module inside it reaches dermfast.train by any chain of imports."""
    mods, graph = project
    tools = [m for m in mods if m == tool or m.startswith(tool + ".")]
    assert tools, f"{tool} is not a module of dermfast"
    for m in tools:
        seen = _reaches(graph, m)
        bad = sorted(n for n in seen if n == "dermfast.train" or n.startswith("dermfast.train."))
        if bad:
            path, v = [bad[0]], bad[0]
            while seen[v]:
                v = seen[v]
                path.append(v)
            pytest.fail(f"{m} reaches {bad[0]}: " + " -> ".join(path[::-1]))
