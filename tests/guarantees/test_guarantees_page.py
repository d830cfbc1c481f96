"""The guarantees page names real tests: every row of its table names at least one test, and every
``tests/<path>.py::name`` it cites is a file holding a test function or class of that name.

The page (``docs/guide/guarantees.md``) is where a reader goes from a promise to the test that would fail without it,
so a renamed or deleted test must fail here rather than leave the page pointing at nothing. In the test column a
reference is a backticked ``tests/<path>.py`` (the whole file), ``tests/<path>.py::name``, or the shorthand
``::name`` for another name in the file cited last in the same cell. ``name`` may be ``Class::method`` and may carry
a parametrisation id (``name[param]``, which is dropped). Any other backticked path (``.ci/floor``) must exist.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "guide" / "guarantees.md"

_BACKTICKED = re.compile(r"`([^`]+)`")


@dataclass(frozen=True)
class Reference:
    """One test cited in a row: a file, and a name in it (``""`` for the whole file)."""

    row: str
    path: str
    name: str


def _rows(text: str) -> list[tuple[str, str]]:
    """``(guarantee, test cell)`` for each body row of the page's first table whose header ends with ``test``."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("|") and line.rstrip(" |").endswith("test"))
    rows = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        body = line.strip().removeprefix("|").removesuffix("|")
        guarantee, _, rest = body.partition(" | ")
        rows.append((guarantee.strip(), rest.rsplit(" | ", 1)[-1].strip()))
    return rows


def references(text: str) -> tuple[list[Reference], list[str]]:
    """The tests each row cites, and the problems found while reading them (rows citing none, unknown paths)."""
    found: list[Reference] = []
    problems: list[str] = []
    for guarantee, cell in _rows(text):
        current = ""
        cited = 0
        for token in _BACKTICKED.findall(cell):
            if token.startswith("tests/"):
                current, _, name = token.partition("::")
            elif token.startswith("::"):
                if not current:
                    problems.append(f"{guarantee}: `{token}` continues no file cited before it in the cell")
                    continue
                name = token.removeprefix("::")
            else:
                if "/" in token and not (ROOT / token).exists():
                    problems.append(f"{guarantee}: `{token}` does not exist")
                continue
            found.append(Reference(guarantee, current, re.sub(r"\[.*\]$", "", name)))
            cited += 1
        if not cited:
            problems.append(f"{guarantee}: the row names no test (`tests/<path>.py::name`)")
    return found, problems


def _tests_in(source: str) -> dict[str, set[str]]:
    """Top-level test functions and classes of a module; a class maps to its methods."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            names[node.name] = {
                item.name for item in node.body if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
            }
    return names


def unresolved(found: list[Reference], root: Path) -> list[str]:
    """The references that name no test file, or no test in their file."""
    problems = []
    for ref in found:
        path = root / ref.path
        if not ref.path.endswith(".py") or not path.is_file():
            problems.append(f"{ref.row}: `{ref.path}` is not a test file")
            continue
        tests = _tests_in(path.read_text(encoding="utf-8"))
        top, _, method = ref.name.partition("::")
        ok = top in tests and (not method or method in tests[top]) if ref.name else bool(tests)
        if not ok:
            problems.append(f"{ref.row}: `{ref.path}::{ref.name}` is no test in that file")
    return problems


def test_every_row_of_the_guarantees_page_names_its_tests() -> None:
    found, problems = references(PAGE.read_text(encoding="utf-8"))
    assert not problems, "\n".join(problems)
    assert len({ref.row for ref in found}) >= 10  # the table was read at all


def test_every_test_the_guarantees_page_names_exists() -> None:
    found, _ = references(PAGE.read_text(encoding="utf-8"))
    problems = unresolved(found, ROOT)
    assert not problems, "\n".join(problems)


_PLANTED = """\
| guarantee | what it covers | test |
|---|---|---|
| **Real** | it | `tests/t/test_a.py::test_one`, `::test_two[cpu]`, `::TestGroup::test_three`, `tests/t/test_a.py` |
| **Wrong name** | covered | `tests/t/test_a.py::test_one`, `::test_zwei` |
| **Wrong method** | covered | `tests/t/test_a.py::TestGroup::test_four` |
| **Wrong file** | covered | `tests/t/test_b.py::test_one` |
| **No test** | covered | `.ci/floor` |
| **Dangling shorthand** | covered | `::test_one` |
| **Missing path** | covered | `.ci/nowhere`, `tests/t/test_a.py::test_one` |

After the table.
"""


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("Wrong name", "`tests/t/test_a.py::test_zwei` is no test in that file"),
        ("Wrong method", "`tests/t/test_a.py::TestGroup::test_four` is no test in that file"),
        ("Wrong file", "`tests/t/test_b.py` is not a test file"),
        ("No test", "the row names no test"),
        ("Dangling shorthand", "`::test_one` continues no file"),
        ("Missing path", "`.ci/nowhere` does not exist"),
    ],
)
def test_the_check_catches_a_planted_wrong_reference(tmp_path: Path, row: str, message: str) -> None:
    (tmp_path / "tests" / "t").mkdir(parents=True)
    (tmp_path / "tests" / "t" / "test_a.py").write_text(
        "def test_one():\n    pass\n\n\ndef test_two():\n    pass\n\n\n"
        "class TestGroup:\n    def test_three(self):\n        pass\n",
        encoding="utf-8",
    )
    found, problems = references(_PLANTED)
    problems += unresolved(found, tmp_path)
    assert not [p for p in problems if p.startswith("**Real**")], problems
    assert [p for p in problems if p.startswith(f"**{row}**") and message in p], problems
