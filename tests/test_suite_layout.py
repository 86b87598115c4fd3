"""The suite's own layout: what a test module shares lives in ``tests/harness`` (and its fixtures in conftest.py),
and every wait polls through ``tests.harness.waiting``. A module that imports another test module (or conftest)
breaks when that one is moved or deleted, and a private deadline loop is one more wait to get wrong."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.harness.process import REPO

TESTS = REPO / "tests"
# Every Python file of the suite and of the benchmarks (which reuse the harness), the harness itself included.
CHECKED = sorted([*TESTS.rglob("*.py"), *(REPO / "benchmarks").glob("*.py")])


def _forbidden(module: str) -> bool:
    """``tests.conftest`` or a test module: ``tests.test_x`` (or anything inside one)."""
    parts = module.split(".")
    return parts[0] == "tests" and len(parts) > 1 and (parts[1] == "conftest" or parts[1].startswith("test_"))


def offending_imports(source: str, package: str = "tests") -> list[str]:
    """The imports of ``source`` that reach into conftest or another test module, as written. ``package`` is the
    package the file is in, against which a relative import is resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {alias.name}" for alias in node.names if _forbidden(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its package (one level up per dot beyond the first)
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] if base != "tests" else [f"tests.{alias.name}" for alias in node.names]
            if any(_forbidden(target) for target in targets):
                found.append(
                    f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
                )
    return found


def _package(path: Path) -> str:
    return ".".join(path.parent.relative_to(REPO).parts)


def test_the_checker_catches_each_way_of_importing_a_test_module() -> None:
    """The check below can fail: each spelling of a forbidden import is found, and the harness's are not."""
    assert offending_imports("from tests.test_process import running_server") == [
        "from tests.test_process import running_server"
    ]
    assert offending_imports("from tests.conftest import chat_body") == ["from tests.conftest import chat_body"]
    assert offending_imports("import tests.test_hostile") == ["import tests.test_hostile"]
    assert offending_imports("from tests import test_ollama, harness") == ["from tests import test_ollama, harness"]
    assert offending_imports("from .conftest import MODEL_ID") == ["from .conftest import MODEL_ID"]
    assert offending_imports("from ..test_x import y", package="tests.harness") == ["from ..test_x import y"]
    assert offending_imports("from tests.harness.bodies import chat_body\nfrom tests import harness") == []


def test_no_module_imports_conftest_or_another_test_module() -> None:
    offenders = {
        str(path.relative_to(REPO)): found
        for path in CHECKED
        if (found := offending_imports(path.read_text(), _package(path)))
    }
    assert offenders == {}, f"import from tests/harness instead: {offenders}"


def test_no_test_module_keeps_a_deadline_of_its_own() -> None:
    """A ``deadline`` variable is an inline polling loop: ``eventually`` (tests/harness/waiting.py) is the one."""
    offenders = sorted(
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in sorted(TESTS.rglob("*.py"))
        if path != TESTS / "harness" / "waiting.py"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Name) and node.id == "deadline"
    )
    assert offenders == [], f"wait with tests.harness.waiting.eventually instead: {offenders}"


# Loops that sleep on purpose, each for a reason of its own: not a wait for a condition to hold.
_PACING_LOOPS = {
    "tests/test_hostile.py::test_work_beyond_the_memory_budget_waits_and_completes",  # samples the KV gauge's peak
    "tests/test_hostile.py::test_a_short_sequence_holds_a_cache_for_its_request_not_the_context",  # the same peak
    "tests/test_hostile.py::test_a_static_batch_is_reserved_at_its_longest_sequence",  # the same peak
    "tests/test_request_clock.py::test_a_slow_senders_wait_is_in_its_ttft_and_e2e",  # paces a slow client's parts
}


def test_no_test_module_polls_in_a_sleeping_loop_of_its_own() -> None:
    """A ``for``/``while`` loop that sleeps is a wait written by hand (``for _ in range(500): ... sleep``): the one
    is ``eventually``. The loops that sleep to pace or sample are named above."""
    offenders = sorted(
        f"{path.relative_to(REPO)}::{function.name}"  # by name: a line number moves with every edit above it
        for path in sorted(TESTS.glob("test_*.py"))
        for function in ast.walk(ast.parse(path.read_text()))
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for loop in ast.walk(function)
        if isinstance(loop, ast.For | ast.AsyncFor | ast.While) and _sleeps(loop)
    )
    assert [place for place in offenders if place not in _PACING_LOOPS] == []


def _sleeps(node: ast.AST) -> bool:
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
            if name == "sleep":
                return True
    return False
