"""The code base stays ruff-clean, no module uses another module's underscore names, and the
package's modules import one another without a circle: checked by the same test command as
everything else."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "prefect_raydog"


def test_ruff_finds_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "prefect_raydog", "tests", "flows", "benchmarks"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _imports(tree: ast.AST) -> Iterator[tuple[ast.stmt, str, str | None, str | None]]:
    """Every import in `tree`, at any depth (in functions, under `if TYPE_CHECKING:`): the
    statement, the module, the name taken from it (or None) and what it is bound to."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, None, alias.asname
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                yield node, node.module, alias.name, alias.asname


def _underscore_crossings(path: Path) -> Iterator[str]:
    """Where `path` takes an underscore name of another module of the package: imported by
    name, read as an attribute of an imported module, or passed by name (`setattr`)."""
    tree = ast.parse(path.read_text())
    where = f"{path.relative_to(ROOT)}:"
    own = _module_name(path)
    modules: set[str] = set()  # names bound to modules of the package
    for node, module, name, bound in _imports(tree):
        if not module.startswith(PACKAGE):
            continue
        if name is None:
            modules.add(bound or PACKAGE)
        elif f"{module}.{name}" in MODULES:
            modules.add(bound or name)
        elif _private(name) and module != own:
            yield f"{where}{node.lineno} imports {name} from {module}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules:
                yield f"{where}{node.lineno} uses {ast.unparse(node)}"
        elif (isinstance(node, ast.Call) and len(node.args) > 1
              and isinstance(node.args[0], ast.Name) and node.args[0].id in modules
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and _private(node.args[1].value)):
            yield f"{where}{node.lineno} names {node.args[0].id}.{node.args[1].value}"


def test_no_module_uses_an_underscore_name_of_another_module():
    # runner/, cluster/, local/ and autoscaler/ are internal packages: what another module uses
    # has a plain name there; a leading underscore means the module's own.
    paths = [*MODULES.values(), *sorted(ROOT.glob("tests/*.py")),
             *sorted(ROOT.glob("benchmarks/*.py")), *sorted(ROOT.glob("flows/*.py"))]
    crossings = [crossing for path in paths for crossing in _underscore_crossings(path)]
    assert not crossings, "\n".join(crossings)


def _imported_modules(module: str) -> set[str]:
    """The package's modules that `module` imports, type-only and function-local included."""
    imported = set()
    for _, target, name, _ in _imports(ast.parse(MODULES[module].read_text())):
        if name is not None and f"{target}.{name}" in MODULES:
            imported.add(f"{target}.{name}")
        elif target in MODULES:
            imported.add(target)
    return imported - {module}


def _circle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path of imports from `start` back to it, if there is one."""
    paths, seen = [[start]], set()
    while paths:
        path = paths.pop()
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return None


def test_the_package_modules_import_one_another_without_a_circle():
    graph = {module: _imported_modules(module) for module in MODULES}
    circles = {" -> ".join(circle) for module in graph
               if (circle := _circle_from(module, graph)) is not None}
    assert not circles, "\n".join(sorted(circles))
