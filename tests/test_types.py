"""``batchspec/`` type-checks under ``mypy --strict`` (``[tool.mypy]`` in pyproject.toml).

The README's test command is pytest, so this is where CI runs the type checker: a new error
anywhere in the package fails the suite with mypy's own list of errors.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_mypy(*targets: str) -> subprocess.CompletedProcess[str]:
    """mypy from this interpreter, with the project's config (pyproject.toml) and cache."""
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_package_is_clean_under_mypy_strict() -> None:
    """`mypy batchspec` with the project config reports no error (the errors are the message)."""
    result = run_mypy("batchspec")
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"


def test_project_config_is_strict(tmp_path: Path) -> None:
    """The project config rejects an unannotated function: the check above is really strict."""
    loose = tmp_path / "loose.py"
    loose.write_text("def double(x):\n    return x * 2\n", encoding="utf-8")
    result = run_mypy(str(loose))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Function is missing a type annotation" in result.stdout
