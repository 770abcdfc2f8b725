"""Static checks as part of the suite: undefined names, unused imports and syntax that the oldest
supported Python lacks (ruff), and the package's type annotations (mypy). Both are test extras."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

CHECKED = ["CaLIDCore", "CaLIDSlicer", "Testing", "Resources"]


def _tool(name: str) -> list[str]:
    """The tool installed beside this Python (the test environment's own), else on PATH."""
    beside = REPO_ROOT / ".venv" / "bin" / name
    for candidate in (str(beside), shutil.which(name, path=str(REPO_ROOT / ".venv" / "bin")), shutil.which(name)):
        if candidate and shutil.which(candidate):
            return [candidate]
    pytest.skip(f"{name} is not installed: install the test extras (pip install -e './CaLIDCore[test]')")


def test_ruff_finds_no_errors_in_any_python_of_the_project():
    result = subprocess.run(
        [*_tool("ruff"), "check", "--select", "F,E9", "--target-version", "py310", "--no-cache", *CHECKED],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_mypy_finds_no_type_errors_in_the_package():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--no-incremental", "CaLIDCore/calid"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    if "No module named mypy" in result.stderr:
        pytest.skip("mypy is not installed: install the test extras (pip install -e './CaLIDCore[test]')")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
