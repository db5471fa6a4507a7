"""The architecture as rules: the library never imports the application, importing it loads none of
the application's dependencies, no import cycles, and no module or class grows past its size."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "probmask"
APP_DEPENDENCIES = ("omegaconf", "matplotlib", "tqdm", "torchvision", "yaml", "mlxtend")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
LIBRARY = sorted(m for m in MODULES if not m.startswith("probmask.app") and m != "probmask.__main__")
# adapters to optional training frameworks, which bring their own dependencies along
FRAMEWORK_ADAPTERS = ("probmask.integrations.transformers", "probmask.integrations.lightning")


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The probmask modules ``path`` imports (every import, or only those run when it is imported)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # an import under `if TYPE_CHECKING:` does not run
        nodes = [n for n in nodes if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
    found: set[str] = set()
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return {m for m in found if m in MODULES}


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_never_imports_the_application(module):
    app = sorted(m for m in _imports(MODULES[module], top_level_only=False) if m.startswith("probmask.app"))
    assert not app, f"{module} imports {app}: the library must not depend on the application"


def test_importing_the_library_loads_no_application_dependency():
    """Every library module imported together (after torch, which itself imports some packages,
    e.g. torch.hub imports tqdm when it is installed): nothing of the application comes with them.
    The framework adapters are left out: transformers and lightning import matplotlib and more."""
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        f"for name in {[m for m in LIBRARY if m not in FRAMEWORK_ADAPTERS]!r}:\n"
        "    __import__(name)\n"
        "new = sorted(m for m in set(sys.modules) - before if m.split('.')[0] in "
        f"{APP_DEPENDENCIES!r} or m.startswith('probmask.app'))\n"
        "print(new)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_no_import_cycles():
    graph = {m: _imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if dep.startswith(module + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(dep) == 1 and not module.startswith(dep + "."):
                cycle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


MODULE_LINES = 495  # about 450 lines, with 10% leeway
CLASS_LINES = 275  # about 250


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_classes_stay_small(module):
    path = MODULES[module]
    lines = len(path.read_text().splitlines())
    assert lines <= MODULE_LINES, f"{module} has {lines} lines: split it by job"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= CLASS_LINES, f"{module}.{node.name} has {size} lines: split it by job"
