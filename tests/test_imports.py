"""The package's seams: no import cycle in ``runtime/``, and no private attribute of another library
read outside the adapters that pin them (``runtime/micro.py``, ``running_frame`` in ``runtime/blocking.py``).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "runtime"

# Where reading another library's private attributes is the point: each is pinned by a test.
ADAPTERS = {
    "runtime/micro.py": None,                 # the whole module (tests/test_adapters.py)
    "runtime/fastpub.py": None,               # the whole module (tests/test_fastpub.py)
    "runtime/direct.py": None,                # the whole module (tests/test_direct.py)
    "runtime/blocking.py": "running_frame",   # this one function (tests/test_blocking.py)
}
# Underscored names that are public, documented API.
PUBLIC = {("os", "_exit")}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere: at the top, in functions, under TYPE_CHECKING."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:   # ``from . import headers`` imports a module
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target)
    return {module for module in found if module in known and module != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
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


def test_no_module_imports_another_that_imports_it_back() -> None:
    # Counted even under TYPE_CHECKING or inside a function: a part that needs the module that
    # composes it (app.py) is a seam in the wrong place, whether or not Python notices at import.
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    assert cycles(graph) == []


_IMPORT_EACH = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "runtime" or m.startswith("runtime.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failed[name] = traceback.format_exception_only(type(exc), exc)[-1].strip()
print(json.dumps(failed))
"""


def test_each_module_imports_alone() -> None:
    # One fresh interpreter; the package is forgotten before each module, so each is imported
    # first, as a program that needs only it would import it.
    names = [name for name in modules() if name != "runtime.__main__"]   # that one runs the CLI
    done = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {}


class _PrivateReads(ast.NodeVisitor):
    """``x._name`` where ``x`` is not ``self``/``cls``, and ``self._name`` in a subclass of another
    library's class when the subclass does not define ``_name`` itself."""

    def __init__(self, path: str, foreign: set[str]) -> None:
        self.path = path
        self.foreign = foreign           # names this module imports from outside the package
        self.allowed_function = ADAPTERS.get(path, "")
        self.functions: list[str] = []
        self.inherited: list[set[str] | None] = []   # per class: its own private names, if foreign-based
        self.found: list[str] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        roots = {_root(base) for base in node.bases}
        own = _own_private_names(node) if roots & self.foreign else None
        self.inherited.append(own)
        self.generic_visit(node)
        self.inherited.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.functions.append(node.name)
        self.generic_visit(node)
        self.functions.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.generic_visit(node)
        attr = node.attr
        if not attr.startswith("_") or attr.startswith("__") or self.allowed_function in self.functions:
            return
        receiver = node.value.id if isinstance(node.value, ast.Name) else None
        if (receiver, attr) in PUBLIC:
            return
        if receiver in ("self", "cls"):
            own = self.inherited[-1] if self.inherited else None
            if own is None or attr in own:
                return
        self.found.append(f"{self.path}:{node.lineno}: {ast.unparse(node)}")


def _root(node: ast.expr) -> str:
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.value if not isinstance(node, ast.Call) else node.func
    return node.id if isinstance(node, ast.Name) else ""


def _own_private_names(cls: ast.ClassDef) -> set[str]:
    """Private names a class defines: methods, class attributes, and ``self._x = ...`` assignments."""
    own: set[str] = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            own.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id == "self"):
            own.add(node.attr)
    return {name for name in own if name.startswith("_")}


def _foreign_names(tree: ast.Module) -> set[str]:
    """Names bound by imports from outside the package."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names
                         if not alias.name.startswith("runtime"))
        elif isinstance(node, ast.ImportFrom) and not node.level and not (node.module or "").startswith("runtime"):
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def private_reads(path: Path) -> list[str]:
    relative = path.relative_to(ROOT).as_posix()
    if relative in ADAPTERS and ADAPTERS[relative] is None:
        return []
    tree = ast.parse(path.read_text(), relative)
    visitor = _PrivateReads(relative, _foreign_names(tree))
    visitor.visit(tree)
    return visitor.found


def test_no_private_attribute_of_another_library_outside_the_adapters() -> None:
    # A nats-py or stdlib upgrade may rename any of them; behind an adapter, one test says which.
    found = [line for path in sorted(PACKAGE.rglob("*.py")) for line in private_reads(path)]
    assert found == []


def test_the_check_sees_what_it_must() -> None:
    # The patterns the package used to have: each must be reported.
    source = (
        "from nats.micro.service import Service\n"
        "class S(Service):\n"
        "    def __init__(self):\n"
        "        self._mine = 1\n"
        "    def remove(self, name):\n"
        "        return [e for e in self._endpoints if e._name == name], self._mine\n"
        "def forward(request, pool):\n"
        "    pool._max_workers = 2\n"
        "    return request._msg, sys._current_frames()\n"
    )
    tree = ast.parse(source)
    visitor = _PrivateReads("runtime/example.py", _foreign_names(tree))
    visitor.visit(tree)
    assert [line.split(": ", 1)[1] for line in visitor.found] == [
        "self._endpoints", "e._name", "pool._max_workers", "request._msg", "sys._current_frames"]
