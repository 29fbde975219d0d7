"""The import structure of ``core`` and ``shell``, read from the code: every ``import`` in the AST of every
module, function-local ones included. No import circle, and no module imports one on a higher layer of the
README's layer table ("Layers")."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "shell")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of ``core`` and ``shell`` (a package by its ``__init__.py``), by dotted name."""
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that ``name`` imports anywhere in its file (top level, in functions, under
    ``TYPE_CHECKING``). ``from pkg import x`` is an import of ``pkg.x`` when that is a module, else of ``pkg``;
    a relative import is resolved against ``name``'s package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``import shell.data.jsonl as j``: the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (``[a, b, …, a]``), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def readme_layers(text: str) -> dict[str, int]:
    """The README's layer table: rows ``| N | `path`, `path` … | … |`` under the heading "Layers" (N: the layer,
    1 the ground). A path is a module file (``shell/x.py``, ``shell/__init__.py``: dotted ``shell.x``, ``shell``)
    or a folder (``shell/x/``: dotted ``shell.x.*``, the package and every module in it)."""
    section = text.split("\n### Layers", 1)[1].split("\n#", 1)[0]
    layers: dict[str, int] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].isdigit():
            continue
        for path in re.findall(r"`([^`]+)`", cells[1]):
            folder = path.endswith("/")
            dotted = path.rstrip("/").removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            key = f"{dotted}.*" if folder else dotted
            if key in layers:
                raise ValueError(f"{path} stands in two rows of the layer table")
            layers[key] = int(cells[0])
    return layers


def row_of(name: str, layers: dict[str, int]) -> str | None:
    """The row that places a module: its own, else that of the nearest folder it is in."""
    if name in layers:
        return name
    while name:
        if f"{name}.*" in layers:
            return f"{name}.*"
        name = name.rpartition(".")[0]
    return None


def layer_of(name: str, layers: dict[str, int]) -> int | None:
    row = row_of(name, layers)
    return None if row is None else layers[row]


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """``a -> b`` wherever ``a`` imports ``b`` and ``b`` is not on a lower layer than ``a``, unless both are in
    the same folder row (a folder's modules may import each other; the circle check still holds for them)."""
    out = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            same_folder = row_of(a, layers) == row_of(b, layers) and str(row_of(a, layers)).endswith(".*")
            if not same_folder and (layer_of(b, layers) or 0) >= (layer_of(a, layers) or 0):
                out.append(f"{a} (layer {layer_of(a, layers)}) -> {b} (layer {layer_of(b, layers)})")
    return out


# ------------------------------------------------------------------------------------------------ the project


def test_no_import_cycle_among_core_and_shell_modules():
    assert find_cycle(import_graph()) is None


def test_every_module_is_on_a_layer_of_the_readme_and_imports_only_downward():
    layers = readme_layers((ROOT / "README.md").read_text(encoding="utf-8"))
    graph = import_graph()
    assert [m for m in graph if layer_of(m, layers) is None] == []  # every module has its row
    assert [m for m in layers if m.removesuffix(".*") not in graph] == []  # and every row names one that exists
    assert upward_imports(graph, layers) == []


def test_core_imports_nothing_from_shell():
    assert {b for a, targets in import_graph().items() if a.startswith("core") for b in targets
            if b.startswith("shell")} == set()


# ------------------------------------------------------------------------------------------------ the checks can fail


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_a_circle_closed_by_a_function_local_import_is_found(tmp_path):
    root = _tree(tmp_path, {
        "shell/__init__.py": "",
        "shell/a.py": "from shell.b import f\n",
        "shell/b.py": "def f():\n    from shell import a\n    return a\n",
        "shell/c.py": "import shell.a as alias\n",
        "core/__init__.py": "",
    })
    graph = import_graph(root)
    assert graph["shell.a"] == {"shell.b"} and graph["shell.b"] == {"shell.a"} and graph["shell.c"] == {"shell.a"}
    assert find_cycle(graph) in (["shell.a", "shell.b", "shell.a"], ["shell.b", "shell.a", "shell.b"])
    assert find_cycle({"shell.a": {"shell.b"}, "shell.b": set()}) is None


def test_relative_imports_and_packages_resolve(tmp_path):
    root = _tree(tmp_path, {
        "shell/__init__.py": "", "core/__init__.py": "", "core/_x.py": "",
        "shell/data/__init__.py": "from .jsonl import read\n",
        "shell/data/jsonl.py": "from ..files import w\nfrom core import _x\nimport torch\n",
        "shell/files.py": "",
    })
    graph = import_graph(root)
    assert graph["shell.data"] == {"shell.data.jsonl"}
    assert graph["shell.data.jsonl"] == {"shell.files", "core._x"}


def test_an_import_of_a_higher_layer_is_reported():
    readme = ("# x\n\n### Layers\n\n| layer | modules |\n| --- | --- |\n| 2 | `shell/loop.py`, `shell/__init__.py` |\n"
              "| 1 | `shell/world.py`, `shell/files.py`, `shell/data/` |\n\n## next\n")
    layers = readme_layers(readme)
    assert layers == {"shell.loop": 2, "shell": 2, "shell.world": 1, "shell.files": 1, "shell.data.*": 1}
    assert layer_of("shell.data.jsonl", layers) == layer_of("shell.data", layers) == 1
    assert layer_of("shell.new", layers) is None  # a module's package face does not place it
    graph = {"shell.world": {"shell.loop"}, "shell.loop": {"shell.world"}, "shell.data.jsonl": {"shell.data"},
             "shell.files": {"shell.world"}}
    assert upward_imports(graph, layers) == ["shell.files (layer 1) -> shell.world (layer 1)",
                                             "shell.world (layer 1) -> shell.loop (layer 2)"]
    with pytest.raises(ValueError, match="two rows"):
        readme_layers(readme.replace("`shell/data/`", "`shell/loop.py`"))
