"""The layers' boundaries, read from the source with ``ast`` (no import runs): every ``import`` anywhere in a
module counts, at the top or inside a function, and a module reaches what the project's modules it imports reach.

- The engine, losses, models, evaluation and data layers reach neither Ray nor MLflow (the GPU check runs them
  on a machine that has neither).
- Only the tracking modules import MLflow; only the Ray Train glue imports ``ray.train`` (the sweep modules may
  import ``ray.tune``, whose Ray Train integration included).
- No cycle among the project's top-level imports.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "tune")
ENGINE_LAYERS = ("pipeline.engine", "pipeline.losses", "pipeline.models", "pipeline.evaluation", "pipeline.probes",
                 "pipeline.evaluator", "pipeline.distributed", "pipeline.schedules", "pipeline.data")
TRACKING_MODULES = {"pipeline.tracking", "pipeline.tracking_check", "pipeline.metric_forwarding",
                    "pipeline.system_metrics"}
RAY_TRAIN_GLUE = {"pipeline.ray_train", "pipeline.ray_callbacks"}


def module_sources(root: Path = ROOT) -> dict[str, str]:
    """``{dotted module name: source}`` of every module of the project's packages (a package as its
    ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return found


def imports_of(name: str, source: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """The names ``name`` imports: (all, top level). A project name resolves to the module it names (``from
    pipeline import engine``: ``pipeline.engine``) and brings its parent packages (not, at the top level, the
    importer's own: they run first); an outside name stays whole (``ray.train``)."""
    everywhere, top = set(), set()
    tree = ast.parse(source)
    top_nodes = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = name.split(".")[: len(name.split(".")) - node.level + (name in PACKAGES)]
                base = ".".join([*package, base] if base else package)
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        resolved = set()
        for imported in names:
            if imported.split(".")[0] in PACKAGES:
                parts = imported.split(".")
                resolved |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules
            else:
                resolved.add(imported)
        everywhere |= resolved
        if id(node) in top_nodes:
            top |= resolved
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return everywhere - {name}, top - {name} - own_packages  # a package's __init__ may import its modules


def import_graph(sources: dict[str, str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    modules = set(sources)
    both = {name: imports_of(name, source, modules) for name, source in sources.items()}
    return {name: found[0] for name, found in both.items()}, {name: found[1] for name, found in both.items()}


def reached(graph: dict[str, set[str]], start: str) -> dict[str, list[str]]:
    """Every name ``start`` reaches through the project's modules, with one path to it."""
    paths, todo = {start: [start]}, [start]
    while todo:
        current = todo.pop()
        for imported in sorted(graph.get(current, ())):
            if imported not in paths:
                paths[imported] = paths[current] + [imported]
                if imported in graph:
                    todo.append(imported)
    return paths


def is_outside(imported: str, package: str) -> bool:
    return imported == package or imported.startswith(package + ".")


def violations(sources: dict[str, str]) -> list[str]:
    """Every boundary the sources cross, one line each."""
    graph, top = import_graph(sources)
    found = []
    for name in sorted(sources):
        if any(is_outside(name, layer) for layer in ENGINE_LAYERS):
            for imported, path in reached(graph, name).items():
                if is_outside(imported, "ray") or is_outside(imported, "mlflow"):
                    found.append(f"{name} reaches {imported}: {' -> '.join(path)}")
        for imported in sorted(graph[name]):
            if is_outside(imported, "mlflow") and name not in TRACKING_MODULES:
                found.append(f"{name} imports {imported}: only {sorted(TRACKING_MODULES)} import MLflow")
            if is_outside(imported, "ray.train") and name not in RAY_TRAIN_GLUE:
                found.append(f"{name} imports {imported}: only {sorted(RAY_TRAIN_GLUE)} import Ray Train")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(top)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module (or a module importing itself)."""
    found, state = [], {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph.get(name, ())):
            if imported not in graph:
                continue
            if state.get(imported) == "open":
                found.append(stack[stack.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, stack + [imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_the_layers_keep_their_boundaries():
    assert violations(module_sources()) == []


@pytest.mark.parametrize("module, line, expected", [
    ("pipeline.engine", "import ray", "pipeline.engine reaches ray"),
    ("pipeline.losses", "from pipeline.tracking import resolve_tracking_uri", "pipeline.losses reaches mlflow"),
    ("pipeline.train_job", "import mlflow", "pipeline.train_job imports mlflow"),
    ("tune.sweep", "from ray.train import Checkpoint", "tune.sweep imports ray.train"),
    ("pipeline.config", "from pipeline import tracking", "import cycle: pipeline.config -> pipeline.tracking"),
])
def test_a_crossed_boundary_is_found(module, line, expected):
    """The check fails on the crossing it exists for: one line added to today's sources."""
    sources = module_sources()
    sources[module] = f"{line}\n{sources[module]}"
    found = violations(sources)
    assert any(v.startswith(expected) for v in found), found


def test_lazy_imports_count_and_packages_resolve_to_modules():
    sources = {"pipeline": "", "pipeline.a": "def f():\n    from pipeline import b\n", "pipeline.b": "import mlflow\n"}
    graph, top = import_graph(sources)
    assert graph["pipeline.a"] == {"pipeline", "pipeline.b"} and top["pipeline.a"] == set()
    assert "mlflow" in reached(graph, "pipeline.a")
