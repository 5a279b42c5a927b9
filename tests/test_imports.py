"""No import circle among the modules of mla_moe, pallas_kernels and launch.

Every import statement counts: module level, inside functions, under `if TYPE_CHECKING:`. An
import names the deepest module it reaches (`from mla_moe import sharding` is an edge to
`mla_moe.sharding`, `from mla_moe import DeepSeekModel` one to the package `mla_moe`); the
parent packages Python runs on the way are not edges (every package's `__init__` re-exports
its modules, which import each other through it by full name).
"""

import ast
import functools
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {
    "mla_moe": ROOT / "src" / "mla_moe",
    "pallas_kernels": ROOT / "pallas_kernels",
    "launch": ROOT / "launch",
}


def _modules() -> dict[str, pathlib.Path]:
    """{dotted name: file} of every module of the three packages."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _targets(node: ast.AST, module: str, is_package: bool, modules) -> list[str]:
    """The modules of ours that one import statement in `module` names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative: resolved against the importing module's package
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module
        names = [f"{prefix}.{alias.name}" for alias in node.names]
        names = [n if n in modules else prefix for n in names]
    out = []
    for name in names:
        while name and name not in modules:  # `import a.b.c` of a non-module tail: its package
            name = name.rpartition(".")[0]
        if name and name != module:
            out.append(name)
    return out


@functools.cache
def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[module] = {
            t
            for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))
            for t in _targets(node, module, is_package, modules)
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_graph_sees_every_kind_of_import():
    graph = import_graph()
    assert "mla_moe.sharding" in graph["mla_moe.mla"]  # from mla_moe import sharding
    assert "pallas_kernels" in graph["mla_moe.mla"]  # function-local `import pallas_kernels`
    assert "mla_moe.config" in graph["mla_moe.sharding.mesh"]  # under TYPE_CHECKING


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)
