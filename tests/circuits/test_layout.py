"""The reading order promised by `circuits/__init__.py`: each module imports only modules listed above it."""

import ast
import re
from pathlib import Path

import circuits

PACKAGE = Path(circuits.__file__).parent


def _reading_order() -> list[str]:
    """Module names in the order the package docstring lists them (`a.py, b.py   text` lines too)."""
    names: list[str] = []
    for line in circuits.__doc__.splitlines():
        listed = re.split(r"\s{2,}", line.strip())[0]  # the names before the description
        for name in re.findall(r"(\w+)\.py", listed):
            if name not in names:
                names.append(name)
    return names


def _internal_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.startswith("circuits."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("circuits."))
    return found


def test_docstring_lists_every_module_once():
    on_disk = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert set(_reading_order()) == on_disk


def test_each_module_imports_only_modules_above_it():
    order = _reading_order()
    for i, module in enumerate(order):
        later = _internal_imports(module) - set(order[:i])
        assert not later, f"circuits/{module}.py imports {sorted(later)}, listed below it in circuits/__init__.py"
