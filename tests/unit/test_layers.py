"""The import graph of ``dicom_ai/`` and ``storage/``: no cycle, a layered model stack, and the
package boundaries around the heavy third-party libraries.

The model stack, bottom to top (README "Layout")::

    dicom_ai.values  <  dicom_ai.pipeline (loading, preprocessing, preview)  <  dicom_ai.inference
        <  dicom_ai.reporting  <  dicom_ai.runner (the job runner)

A module may import its own layer or a lower one, never a higher one. Imports are read with
:mod:`ast` (nothing is imported), at module level and inside functions; imports under
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("dicom_ai", "storage")

#: The model stack's layers, lowest first.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("dicom_ai.values",),
    ("dicom_ai.pipeline",),
    ("dicom_ai.inference",),
    ("dicom_ai.reporting",),
    ("dicom_ai.runner",),
)
#: What sits above the model stack and drives it: no module of the stack imports these.
ABOVE_STACK = ("dicom_ai.runner", "dicom_ai.api", "dicom_ai.cli", "dicom_ai.service",
               "dicom_ai.dispatch")
#: The model stack below the runner, plus training (which builds on it).
STACK = ("dicom_ai.values", "dicom_ai.pipeline", "dicom_ai.inference", "dicom_ai.reporting",
         "dicom_ai.training")

#: Third-party top-level packages and the only modules (or packages) that may import them.
BOUNDARIES: dict[str, tuple[str, ...]] = {
    "pynetdicom": ("dicom_ai.network",),
    "sqlalchemy": ("storage",),
    "alembic": ("storage",),
    "tensorflow": ("dicom_ai.inference.keras_backend", "dicom_ai.inference.explain",
                   "dicom_ai.training"),
    "keras": ("dicom_ai.inference.keras_backend", "dicom_ai.inference.explain",
              "dicom_ai.training"),
    "onnxruntime": ("dicom_ai.inference.onnx_backend",),
    "celery": ("dicom_ai.dispatch.celery_backend",),
    "fastapi": ("dicom_ai.api",),
    "highdicom": ("dicom_ai.reporting",),
}


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def modules(root: Path = REPO) -> dict[str, Path]:
    """Every module of the scanned packages by dotted name (migrations excluded)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imported_names(module: str, path: Path) -> set[str]:
    """The dotted names `module` imports (relative imports resolved), outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = _type_checking_nodes(tree)
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            # `from package import module` imports the submodule
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@lru_cache(maxsize=4)  # parsed once per run
def graph(root: Path = REPO) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(edges between our modules, third-party top-level packages) per module."""
    known = modules(root)
    edges: dict[str, set[str]] = defaultdict(set)
    external: dict[str, set[str]] = defaultdict(set)
    for module, path in known.items():
        for name in imported_names(module, path):
            target = name
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target:
                if target != module:
                    edges[module].add(target)
            elif name.split(".")[0] not in PACKAGES:
                external[module].add(name.split(".")[0])
    return edges, external


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if _within(module, prefixes):
            return rank
    return None


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Imports from a lower layer of the stack to a higher one."""
    bad = []
    for source, targets in sorted(edges.items()):
        low = _layer(source)
        for target in sorted(targets):
            high = _layer(target)
            if low is not None and high is not None and high > low:
                bad.append(f"{source} -> {target}")
    return bad


def stack_imports_of(edges: dict[str, set[str]], forbidden: tuple[str, ...],
                     sources: tuple[str, ...]) -> list[str]:
    """Imports by a module within `sources` of a module within `forbidden`."""
    return [f"{source} -> {target}" for source, targets in sorted(edges.items())
            if _within(source, sources)
            for target in sorted(targets) if _within(target, forbidden)]


def boundary_breaches(external: dict[str, set[str]]) -> list[str]:
    """Imports of a bounded third-party package outside the modules allowed to."""
    return [f"{module} imports {package}" for module, packages in sorted(external.items())
            for package in sorted(packages)
            if package in BOUNDARIES and not _within(module, BOUNDARIES[package])]


# -- the tests ------------------------------------------------------------------------------------
def test_the_scan_sees_the_packages_and_their_imports() -> None:
    edges, external = graph()
    assert {"dicom_ai.values", "dicom_ai.runner.run", "storage.jobs"} <= set(modules())
    # A function-level import counts (runtime finds its backends by name, so none is listed).
    assert "dicom_ai.inference.explain" in edges["dicom_ai.runner.run"]
    assert "dicom_ai.runner.warmup" in edges["dicom_ai.runner.run"]
    assert any("pynetdicom" in packages for module, packages in external.items()
               if module.startswith("dicom_ai.network."))


def test_no_import_cycle() -> None:
    edges, _ = graph()
    assert cycles(edges) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_model_stack_imports_only_downward() -> None:
    edges, _ = graph()
    assert upward_imports(edges) == []
    # The bottom imports nothing of ours.
    assert edges.get("dicom_ai.values", set()) == set()


def test_nothing_in_the_stack_imports_what_drives_it() -> None:
    edges, _ = graph()
    below_runner = tuple(s for s in STACK if s != "dicom_ai.runner")
    assert stack_imports_of(edges, ABOVE_STACK, below_runner) == []
    assert stack_imports_of(edges, ("dicom_ai.api", "dicom_ai.cli", "dicom_ai.service",
                                    "dicom_ai.dispatch"), ("dicom_ai.runner",)) == []


def test_serving_never_imports_training() -> None:
    edges, _ = graph()
    assert stack_imports_of(edges, ("dicom_ai.training",), ("dicom_ai.inference",)) == []


def test_third_party_packages_stay_behind_their_boundaries() -> None:
    _, external = graph()
    assert boundary_breaches(external) == []
