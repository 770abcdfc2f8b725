"""Static checks as part of the suite: undefined names, unused imports and syntax that the oldest
supported Python lacks (ruff), and the package's type annotations (mypy). Both are test extras."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CHECKED = ["CaLIDCore", "CaLIDSlicer", "Testing", "Resources"]


def _run_module(module: str, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``python -m module ...`` in the test environment, skipped with the reason when the module is not installed."""
    result = subprocess.run([sys.executable, "-m", module, *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    if f"No module named {module}" in result.stderr:
        pytest.skip(f"{module} is not installed: install the test extras (pip install -e './CaLIDCore[test]')")
    return result


def test_ruff_finds_no_errors_in_any_python_of_the_project():
    result = _run_module("ruff", "check", "--select", "F,E9", "--target-version", "py310", "--no-cache", *CHECKED)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_finds_no_type_errors_in_the_package():
    result = _run_module("mypy", "--ignore-missing-imports", "--no-incremental", "CaLIDCore/calid")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
