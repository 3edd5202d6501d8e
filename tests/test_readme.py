"""The README's set-up commands are the ones CI and users actually run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """.ci/run executes exactly the README's test command (the second set-up block)."""
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    test_command = blocks[1]
    assert "pytest" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_readme_main_job_runs_apply_on_the_quickstart() -> None:
    """The first set-up command installs and applies the quickstart with --wait --yes."""
    main_job = _bash_blocks((ROOT / "README.md").read_text())[0]
    assert "pip install" in main_job
    assert "batchspec apply examples/quickstart --wait --yes" in main_job
    assert (ROOT / "examples" / "quickstart" / "batchspec.yaml").is_file()
