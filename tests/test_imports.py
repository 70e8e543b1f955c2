"""The package's modules import each other one way: no cycles, counting the
imports made inside functions too (a lazy import hides a cycle from Python,
not from the reader)."""

import ast
import os

import ckptio

PACKAGE = os.path.dirname(ckptio.__file__)


def import_graph(package_dir: str) -> dict:
    """{module: the package's modules it imports}, from every import statement."""
    modules = {}
    parent = os.path.dirname(package_dir)
    for root, _, files in os.walk(package_dir):
        for name in files:
            path = os.path.join(root, name)
            if name.endswith(".py"):
                dotted = os.path.relpath(path, parent)[: -len(".py")].replace(os.sep, ".")
                modules[dotted.removesuffix(".__init__")] = path
            elif name.endswith(".so"):  # a compiled module (ckptio._C): imports nothing of the package
                dotted = os.path.relpath(os.path.join(root, name.split(".")[0]), parent).replace(os.sep, ".")
                modules[dotted] = None
    graph = {m: set() for m in modules}
    for module, path in modules.items():
        if path is None:
            continue
        here = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[module].update(t for t in targets if t in modules and t != module)
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def test_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert len(graph) > 20 and "ckptio.remote" in graph["ckptio.api"], "the graph was not read"
    assert cycles(graph) == []


def test_the_check_finds_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import x\n")
    (package / "b.py").write_text("def f():\n    from .a import y\n")  # lazy, still a cycle
    assert cycles(import_graph(str(package))) == [["pkg.a", "pkg.b"]]
