"""The test suite mirrors the package (ARCHITECTURE.md, Tests): every test directory is a package of
aims_billing_mcp or one of the suite's own (security, support, data), a test module of the top level, `store/` or
`services/` is named after a module of its package, and no fixture name is defined by two conftest files."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "aims_billing_mcp"
OWN = {"security", "support", "data"}
DOCUMENTS = ("architecture", "docs")  # tests of ARCHITECTURE.md and README.md


def modules_of(package: Path) -> set[str]:
    return {path.stem for path in package.glob("*.py") if path.stem != "__init__"}


def test_every_test_directory_is_a_package_of_the_code_or_of_the_suite() -> None:
    directories = {path.name for path in TESTS.iterdir() if path.is_dir() and path.name != "__pycache__"}
    packages = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").exists()}
    assert sorted(directories - OWN - packages) == []
    assert all((TESTS / name / "__init__.py").exists() for name in directories - {"data"})


def test_every_test_module_is_named_after_a_module_of_the_package_it_mirrors() -> None:
    misplaced = []
    for directory, package in ((TESTS, PACKAGE), (TESTS / "store", PACKAGE / "store"),
                               (TESTS / "services", PACKAGE / "services")):
        names = modules_of(package) | ({*DOCUMENTS} if directory == TESTS else set())
        for test in directory.glob("test_*.py"):
            subject = test.stem.removeprefix("test_")
            if not any(subject == name or subject.startswith(name + "_") for name in names):
                misplaced.append(str(test.relative_to(TESTS)))
    assert misplaced == []


def test_no_fixture_name_is_defined_by_two_conftest_files() -> None:
    defined: dict[str, list[str]] = {}
    for conftest in sorted(TESTS.rglob("conftest.py")):
        for node in ast.parse(conftest.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                    "fixture" in ast.unparse(decorator) for decorator in node.decorator_list):
                defined.setdefault(node.name, []).append(str(conftest.relative_to(TESTS)))
    assert {name: where for name, where in defined.items() if len(where) > 1} == {}
