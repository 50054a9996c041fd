"""The package's layers import only downwards, and no import cycle exists, function-level imports
included (README, "Layout"). Imports are read from the source with ast; `if TYPE_CHECKING:` blocks,
which never run, are skipped."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "torchtitan_sp"

# Top-level module or subpackage -> layer; a module may import its own layer or lower ones.
LAYERS = {
    "config": 0,  # the configuration: dataclasses, parsing, single-key checks (no torch)
    "models": 1, "attention": 1,  # one rank's math: the Llama model, attention kernels and strategies
    "parallel_dims": 2, "parallelize": 2, "loss": 2, "optim": 2, "data": 2, "metrics": 2,  # components
    "memory_model": 2, "memory_measure": 2, "checkpoint_files": 2, "hf_checkpoint": 2, "evaluate": 2, "passkey": 2,
    "meaningful": 2, "interrupt": 2, "progress": 2,
    "rules": 3, "memory_report": 3, "host_memory": 3,  # checks of a whole config; the estimator's tables
    "checkpoint": 4,  # CheckpointManager: saves what the trainer hands it
    "train": 5,  # the Trainer and its loop
    "validate": 6, "dry_run": 6, "estimate": 6, "generate": 6,  # entry points: launcher, dry run, estimator, sampling
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _imports(tree: ast.AST, modules: set[str], importer: str = "") -> set[str]:
    """Package modules imported anywhere in `tree`. A submodule import also runs its packages' __init__,
    except the importer's own packages, which Python has always run before the importer."""
    found: set[str] = set()
    own = _ancestors(importer)

    def add(name: str) -> None:
        for mod in {name} | _ancestors(name):
            if mod in modules and mod not in own:
                found.add(mod)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            add(node.module)
            for alias in node.names:  # `from pkg import submodule`
                add(f"{node.module}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(ast.parse(path.read_text()), modules, name) - {name} for name, path in files.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    assert top in LAYERS, f"{module}: no layer in tests/test_layers.py LAYERS; add it there and to the README"
    return LAYERS[top]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_only_downwards():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, deps in sorted(_graph().items()) if a != "torchtitan_sp"
              for b in sorted(deps) if b != "torchtitan_sp" and _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_the_checks_can_fail():
    """The cycle finder finds a cycle through a function-level import, and skips TYPE_CHECKING."""
    modules = {"p.a", "p.b"}
    a = ast.parse("def f():\n    from p.b import x\n")
    b = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import p.a\nimport p.a\n")
    assert find_cycle({"p.a": _imports(a, modules), "p.b": _imports(b, modules)}) == ["p.a", "p.b", "p.a"]
    only_hint = ast.parse("if TYPE_CHECKING:\n    import p.a\n")
    assert _imports(only_hint, modules) == set()
