"""Static types: pyright (basic mode, configured in pyproject.toml's [tool.pyright]) finds no error in
runtime/, provisioning/, infra/ and bench/.

Pulumi's mocks echo whatever inputs a resource gets, so a misspelled or mistyped property passes every
test in tests/infra and fails only in a real `pulumi up`; infra/ passes nested inputs as the providers'
typed ...Args classes, which this check reads. Pyright is the dev extra's pinned wrapper, which bundles
the npm package and runs it with the machine's Node.js (`make system` installs it).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

CHECKED = ("runtime", "provisioning", "infra", "bench")


def pinned_pyright() -> str:
    """The version the dev extra pins (==)."""
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    (spec,) = [Requirement(r).specifier for r in dev if Requirement(r).name == "pyright"]
    (pin,) = [s.version for s in spec if s.operator == "=="]
    return pin


def format_finding(d: dict) -> str:
    start = d["range"]["start"]
    where = f"{d['file'].removeprefix(str(ROOT) + '/')}:{start['line'] + 1}:{start['character'] + 1}"
    return f"{where}: {d['message']} ({d.get('rule', 'error')})"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_pyright_finds_no_error():
    # The interpreter running the tests is the one whose packages the checker resolves imports against.
    done = subprocess.run([sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert done.returncode in (0, 1), (f"pyright did not run (exit {done.returncode}; `pip install -e "
                                       f"'.[dev]'` installs it, `make system` Node.js):\n"
                                       f"{done.stderr[-3000:]}{done.stdout[-3000:]}")
    report = json.loads(done.stdout)
    assert report["version"] == pinned_pyright(), "a pyright other than the dev extra's pin ran"
    sources = sum(1 for d in CHECKED for _ in (ROOT / d).rglob("*.py"))
    assert report["summary"]["filesAnalyzed"] == sources, "pyright did not read every file of " + ", ".join(CHECKED)
    errors = [d for d in report["generalDiagnostics"] if d["severity"] == "error"]
    assert not errors, f"{len(errors)} type errors:\n" + "\n".join(map(format_finding, errors))


def transformers_index_imports(path) -> list[int]:
    """Lines that import from transformers' top-level package (`import transformers`, `from transformers
    import X`) rather than from the module that defines X."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name == "transformers" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "transformers" and node.level == 0:
            lines.append(node.lineno)
    return lines


def test_transformers_names_come_from_their_own_modules():
    """transformers' top-level package declares every model it has for type checkers: importing a name
    from it makes pyright read some 2,700 files (about 30 s of the check). Import from the defining
    module instead (transformers.cache_utils, transformers.models.auto, ...): the same objects."""
    found = {str(p.relative_to(ROOT)): lines for d in CHECKED for p in sorted((ROOT / d).rglob("*.py"))
             if (lines := transformers_index_imports(p))}
    assert found == {}
