"""The package's layer rule, as its docstring writes it: imports point down the layers, and no import circle
anywhere (imports inside functions and under ``TYPE_CHECKING`` included). Read from the source with ``ast``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import genai_server
from tests.harness.imports import find_cycle

PACKAGE = Path(genai_server.__file__).resolve().parent
# Each room and its floor, top first; a module may import its own floor or any lower one, never a higher one.
FLOORS = {
    "genai_server.__main__": 7,
    "genai_server.app": 7,
    "genai_server.http": 6,
    "genai_server.serving": 5,
    "genai_server.apis": 5,
    "genai_server.backends": 4,
    "genai_server.telemetry": 3,
    "genai_server.embedded": 2,
    "genai_server.protocol": 1,
    "genai_server.errors": 1,
    "genai_server.settings": 1,
    "genai_server.logs": 1,
    "genai_server.exit_status": 1,
    "genai_server": 0,  # the package itself: its version
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path, known: set[str]) -> set[str]:
    """The package's modules ``path`` imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            # The package imports absolutely, which this walk relies on: a relative one would be read wrongly.
            assert node.level == 0 and node.module, f"{path}:{node.lineno}: a relative import"
            # ``from genai_server.http import app_keys`` imports a module; ``from x import name`` imports x.
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
            found.add(node.module)
    return {name for name in found if name in known}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def _room(module: str) -> str:
    """The room a module lives in: the longest entry of FLOORS it falls under."""
    rooms = [room for room in FLOORS if module == room or module.startswith(room + ".")]
    assert rooms, f"{module} is in no room: add its folder or file to FLOORS and to the package docstring"
    return max(rooms, key=len)


def test_imports_point_down_the_layers() -> None:
    upward = [
        f"{module} (floor {FLOORS[_room(module)]}) imports {target} (floor {FLOORS[_room(target)]})"
        for module, targets in _graph().items()
        for target in targets
        if FLOORS[_room(target)] > FLOORS[_room(module)]
    ]
    assert upward == []


def test_no_import_circle_in_the_package() -> None:
    """(The circle finder is shown to find a circle in test_benchmarks_layout.py.)"""
    found = find_cycle(_graph())
    assert found is None, "an import circle: " + " -> ".join(found or [])


def test_every_room_is_named_in_the_package_docstring() -> None:
    doc = genai_server.__doc__ or ""
    missing = [room for room in FLOORS if room != "genai_server" and room.removeprefix("genai_server.") not in doc]
    assert missing == []


def test_the_readme_design_map_names_every_module() -> None:
    """A newcomer finds any behaviour by the name of its file: the README's map lists every module."""
    readme = (PACKAGE.parent / "README.md").read_text()
    start = readme.index("## Design")
    design = readme[start : readme.index("\n## ", start + 1)]
    listed = set(re.findall(r"[a-z_]+\.py", design))
    missing = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py" and path.name not in listed
    )
    assert missing == []
