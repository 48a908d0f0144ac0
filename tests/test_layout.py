"""The package's layout holds: sub-packages in one order of use, no import cycle, no package import hidden in a
function, each sub-package's public API named, and no module beyond the line guide."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "maps_utils"
# each sub-package may import only those before it (relations.py and cli.py are single modules)
ORDER = ["core", "heads", "models", "relations", "static", "dynamic", "ablation", "describe", "human", "qk", "report",
         "cli"]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function) for every relative import of the module ``name``."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.append((full if full in _modules() else target, node.col_offset > 0))
    return out


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_sub_packages_import_only_those_before_them():
    wrong = []
    for name, path in _modules().items():
        stage = _stage(name)
        if stage == "__init__":
            continue
        for target, _ in _imports(name, path):
            other = _stage(target)
            if other not in ("__init__", stage) and ORDER.index(other) > ORDER.index(stage):
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_no_import_cycle_between_modules():
    graph = {name: {t for t, _ in _imports(name, path) if t != name} for name, path in _modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_package_import_inside_a_function():
    hidden = [f"{name} -> {target}" for name, path in _modules().items() for target, inner in _imports(name, path)
              if inner]
    assert not hidden, hidden


def test_each_sub_package_names_its_public_api():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        module = importlib.import_module(f"maps_utils.{init.parent.name}")
        assert module.__doc__ and len(module.__doc__) > 80, init
        assert module.__all__, init
        missing = [n for n in module.__all__ if not hasattr(module, n)]
        assert not missing, (init, missing)
        # a name that is also a module of the package would hide it: `from maps_utils.static import ranks` must be
        # the module
        hiding = [n for n in module.__all__ if (init.parent / f"{n}.py").is_file()]
        assert not hiding, (init, hiding)


def test_modules_keep_to_the_line_guide():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_the_old_flat_names_still_import_with_a_warning():
    import warnings

    import maps_utils

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from maps_utils import scores

    assert scores.static_scores is importlib.import_module("maps_utils.static.scores").static_scores
    assert any("maps_utils.static.scores" in str(w.message) for w in caught)
    for old, new in maps_utils.MOVED.items():
        assert (PACKAGE / Path(*new.split("."))).with_suffix(".py").is_file(), (old, new)
