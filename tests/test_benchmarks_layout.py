"""The benchmark scripts import one another one way only.

The scripts in benchmarks/ (and scripts/, which some of them put on ``sys.path``) import each other as top-level
modules. A circle among them works only as long as every name happens to be defined before the module that needs it
is half-imported, so one reordered line can break a script that nobody touched; and a script that imports another
script that imports it back cannot be read on its own. So the imports between them must form no cycle: shared pieces
live in base modules (``load.py``, ``server_process.py``, ...) that the scripts import, never the other way round.

Every import counts, not only those at the top of a file: one inside a function or under ``if TYPE_CHECKING:``
closes a circle just the same when it runs (or when mypy reads it).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from genai_server.settings import Settings
from tests.harness.imports import find_cycle

REPO = Path(__file__).resolve().parents[1]
# The folders whose files are imported as top-level modules by the benchmarks (each is put on sys.path).
FOLDERS = (REPO / "benchmarks", REPO / "scripts")


def modules(folders: tuple[Path, ...] = FOLDERS) -> dict[str, Path]:
    """Module name -> file, for every ``*.py`` directly in ``folders``; a name in two folders is an error, as which
    one an import finds would depend on the order of sys.path."""
    found: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.py")):
            assert path.stem not in found, f"{path} and {found[path.stem]} are both importable as {path.stem!r}"
            found[path.stem] = path
    return found


def imported_names(source: str) -> set[str]:
    """The top-level module names that ``source`` imports anywhere: at module level, in functions, under
    ``TYPE_CHECKING``. Relative imports are left out: these folders are not packages."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names.add(node.module.partition(".")[0])
    return names


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules among ``files`` that it imports."""
    return {name: (imported_names(path.read_text()) & files.keys()) - {name} for name, path in files.items()}


def test_find_cycle_reports_the_circle() -> None:
    """The checker itself: it sees imports inside functions and under TYPE_CHECKING, finds a circle, and passes a
    one-way graph."""
    source = "import b.sub\nif TYPE_CHECKING:\n    import d\ndef f() -> None:\n    from c import x\n"
    assert imported_names(source) == {"b", "c", "d"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_benchmark_imports_form_no_cycle() -> None:
    """No benchmark script imports another that imports it back, directly or through others."""
    cycle = find_cycle(import_graph(modules()))
    assert cycle is None, "benchmark modules import each other in a circle: " + " -> ".join(cycle or [])


def test_a_benchmark_server_is_configured_by_the_benchmark_alone() -> None:
    """``server_process.start`` leaves out the caller's server settings by prefix: every setting the server reads
    must fall under one, or a developer's shell would change what a benchmark measures."""
    spec = importlib.util.spec_from_file_location("server_process", REPO / "benchmarks" / "server_process.py")
    assert spec is not None and spec.loader is not None
    server_process = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server_process)
    names = [name.upper() for name in Settings.model_fields]
    assert [name for name in names if not name.startswith(server_process.SETTING_PREFIXES)] == []
