"""Bytecode for the package and the tests, written once by the test run's controller before its workers start.

A clean clone has no `.pyc` anywhere, and CI (like this machine) sets PYTHONDONTWRITEBYTECODE=1, so without this
every interpreter compiles what it imports again: each xdist worker rewrites the asserts of ~100 test modules and
compiles the package (~4 s of CPU each, most of its collection time), and every subprocess a test starts (a served
process, a zygote, a CLI run) compiles the package again (~0.4 s). Here the controller does it once, on every core:
the package and the test helpers as ordinary `__pycache__` files (what `python -m compileall` writes), the test
modules and conftests as the rewritten-assert `.pyc` pytest itself would cache (pytest's own functions, so a worker
loads exactly what it would have made, and a stale or foreign file is ignored: pytest checks the source's hash).
Only bytecode is written, into the `__pycache__` directories .gitignore already lists; nothing is run.
"""

from __future__ import annotations

import compileall
import multiprocessing
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "aims_billing_mcp"
TESTS = ROOT / "tests"

_config: Any = None  # the controller's pytest config, inherited by the forked children that rewrite


def _rewritten_by_pytest(path: Path) -> bool:
    """What pytest's assert rewriting imports: test modules (`python_files`, test_*.py here) and conftests."""
    return path.name == "conftest.py" or bool(re.fullmatch(r"test_.*\.py", path.name))


def _rewrite(paths: list[Path]) -> None:
    from _pytest.assertion import rewrite

    state = _config.stash[rewrite.assertstate_key]
    for path in paths:
        cache = rewrite.get_cache_dir(path)
        pyc = cache / (path.name[:-3] + rewrite.PYC_TAIL)
        if rewrite._read_pyc(path, pyc) is not None:  # already there and current
            continue
        if rewrite.try_makedirs(cache):
            source_hash, code = rewrite._rewrite_test(path, _config)
            rewrite._write_pyc(state, code, source_hash, pyc)


def _compile(paths: list[Path]) -> None:
    for path in paths:
        compileall.compile_file(path, quiet=2)


def precompile(config: Any, *, workers: int) -> None:
    """Write the bytecode of the package, the test helpers and (when `workers` xdist workers will import them)
    the rewritten test modules, split over the machine's cores. A file that cannot be written (a read-only tree) is
    left to be compiled in memory as before; pytest's functions missing (a pytest that renamed them) fail the run,
    so the saving cannot go away unnoticed."""
    global _config
    _config = config
    plain = sorted(PACKAGE.rglob("*.py")) + [path for path in sorted(TESTS.rglob("*.py"))
                                            if not _rewritten_by_pytest(path) and "data" not in path.parts]
    rewritten = [path for path in sorted(TESTS.rglob("*.py")) if _rewritten_by_pytest(path)] if workers else []
    cores = max(1, min(os.cpu_count() or 1, 4))
    jobs = [(_compile, plain[i::cores]) for i in range(cores)] + [(_rewrite, rewritten[i::cores]) for i in range(cores)]
    with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("fork")) as pool:
        for done in [pool.submit(job, paths) for job, paths in jobs if paths]:
            done.result()
