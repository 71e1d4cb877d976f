"""Every test marked `slow` (real processes, real weights) declares its own `@pytest.mark.timeout(N)`,
sized to it: the global 600 s in pyproject.toml is a backstop, not a budget. Read from the test
modules' source (AST), so a new slow test without a timeout fails here before it ever hangs.

A slow test's marks come from its decorators, its class's decorators and its module's `pytestmark`,
through module-level aliases such as `slow = pytest.mark.slow`.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

TESTS = ROOT / "tests"

# Slow tests in modules other engineers own that had no timeout when this check was written
# (issue 18, item 8). Each owner adds `@pytest.mark.timeout(N)` sized to the test and deletes its line
# here; an entry that has gained a timeout, or no longer exists, fails below so the list only shrinks.
PENDING: set[str] = set()


@dataclass(frozen=True)
class Marks:
    names: frozenset[str]
    timeouts: tuple  # the timeout marks' first arguments, as AST nodes


def _mark_name(node: ast.expr) -> tuple[str, ast.expr | None] | None:
    """`pytest.mark.X` / `pytest.mark.X(...)` / `mark.X(...)` -> (X, first argument or timeout= value)."""
    call = node if isinstance(node, ast.Call) else None
    target = call.func if call else node
    if not (isinstance(target, ast.Attribute) and isinstance(target.value, (ast.Attribute, ast.Name))):
        return None
    owner = target.value
    owner_name = owner.attr if isinstance(owner, ast.Attribute) else owner.id
    if owner_name != "mark":
        return None
    arg = None
    if call is not None:
        arg = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "timeout"), None)
    return target.attr, arg


def _marks(node: ast.expr, aliases: dict[str, Marks]) -> Marks:
    """The marks an expression applies: one mark, a list or tuple of them, or an alias of either."""
    if isinstance(node, (ast.List, ast.Tuple)):
        parts = [_marks(e, aliases) for e in node.elts]
        return Marks(frozenset().union(*(p.names for p in parts)), sum((p.timeouts for p in parts), ()))
    if isinstance(node, ast.Name) and node.id in aliases:
        return aliases[node.id]
    found = _mark_name(node)
    if found is None:
        return Marks(frozenset(), ())
    name, arg = found
    return Marks(frozenset({name}), (arg,) if name == "timeout" else ())


def _merge(*marks: Marks) -> Marks:
    return Marks(frozenset().union(*(m.names for m in marks)), sum((m.timeouts for m in marks), ()))


def collected_tests(path: Path) -> dict[str, Marks]:
    """test id (path::[Class::]name) -> the marks that apply to it."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, Marks] = {}
    module = Marks(frozenset(), ())
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = _marks(stmt.value, aliases)
            if stmt.targets[0].id == "pytestmark":
                module = value
            elif value.names:
                aliases[stmt.targets[0].id] = value
    rel = path.relative_to(ROOT).as_posix()
    tests: dict[str, Marks] = {}

    def decorated(fn, *outer: Marks) -> Marks:
        return _merge(*outer, *(_marks(d, aliases) for d in fn.decorator_list))

    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name.startswith("test"):
            tests[f"{rel}::{stmt.name}"] = decorated(stmt, module)
        elif isinstance(stmt, ast.ClassDef) and stmt.name.startswith("Test"):
            klass = decorated(stmt, module)
            for fn in stmt.body:
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.name.startswith("test"):
                    tests[f"{rel}::{stmt.name}::{fn.name}"] = decorated(fn, klass)
    return tests


def all_tests() -> dict[str, Marks]:
    found: dict[str, Marks] = {}
    for path in sorted(TESTS.rglob("test_*.py")):
        found.update(collected_tests(path))
    return found


def slow_without_timeout(tests: dict[str, Marks]) -> set[str]:
    return {t for t, m in tests.items() if "slow" in m.names and not m.timeouts}


def test_every_slow_test_declares_its_own_timeout():
    tests = all_tests()
    assert any("slow" in m.names for m in tests.values()), "no slow test found: the walk is broken"
    missing = slow_without_timeout(tests) - PENDING
    assert not missing, ("slow tests without @pytest.mark.timeout(N) sized to them:\n  "
                         + "\n  ".join(sorted(missing)))


def test_the_pending_list_only_shrinks():
    tests = all_tests()
    gone = {t for t in PENDING if t not in tests}
    assert not gone, f"no longer exist (delete from PENDING): {sorted(gone)}"
    done = PENDING - slow_without_timeout(tests)
    assert not done, f"now declare a timeout or are no longer slow (delete from PENDING): {sorted(done)}"


def test_every_declared_timeout_is_a_positive_number_of_seconds():
    for test, marks in all_tests().items():
        for arg in marks.timeouts:
            assert isinstance(arg, ast.Constant) and isinstance(arg.value, (int, float)) and arg.value > 0, \
                f"{test}: timeout must be a positive literal number of seconds, got {ast.unparse(arg) if arg else None}"


SAMPLE = '''
import pytest
slow = pytest.mark.slow
pytestmark = [slow]

def test_bare(): pass

@pytest.mark.timeout(90)
def test_sized(): pass

@pytest.mark.timeout(timeout=30)
def test_keyword(): pass

@pytest.mark.timeout(120)
class TestGroup:
    def test_inherits(self): pass
'''


def test_the_walk_sees_module_class_and_alias_marks(tmp_path, monkeypatch):
    """The check can fail: a module whose pytestmark (through an alias) makes every test slow."""
    module = tmp_path / "test_sample.py"
    module.write_text(SAMPLE)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    tests = collected_tests(module)
    assert slow_without_timeout(tests) == {"test_sample.py::test_bare"}
    assert all("slow" in m.names for m in tests.values())
    assert [a.value for a in tests["test_sample.py::TestGroup::test_inherits"].timeouts] == [120]
    assert [a.value for a in tests["test_sample.py::test_keyword"].timeouts] == [30]


@pytest.mark.parametrize("source, slow", [
    ("import pytest\n@pytest.mark.slow\ndef test_a(): pass\n", True),
    ("from pytest import mark\n@mark.slow\ndef test_a(): pass\n", True),
    ("import pytest\n@pytest.mark.gpu\ndef test_a(): pass\n", False),
])
def test_decorator_forms(tmp_path, monkeypatch, source, slow):
    module = tmp_path / "test_form.py"
    module.write_text(source)
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert slow_without_timeout(collected_tests(module)) == ({"test_form.py::test_a"} if slow else set())
