"""tests/ci_skips.py: with CI=true a skipped test fails the run; without it, it stays a skip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SKIPPING = {
    "test_in_body.py": """
        import pytest

        def test_needs_a_server():
            pytest.skip("the server is not installed")
    """,
    "test_in_fixture.py": """
        import pytest

        @pytest.fixture(scope="session")
        def proxy():
            pytest.skip("the proxy is not installed")

        def test_uses_the_proxy(proxy):
            pass
    """,
    "test_marked.py": """
        import pytest

        @pytest.mark.skipif(True, reason="not on this platform")
        def test_marked():
            pass

        @pytest.mark.xfail(reason="a known bug", strict=True)
        def test_known_bug():
            assert False

        def test_passes():
            pass
    """,
}
MODULE_SKIP = """
    import pytest

    pytest.importorskip("a_module_that_is_not_installed")

    def test_never_collected():
        pass
"""


def run_pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    # CI's own PYTEST_ADDOPTS (coverage with a floor) would fail the inner run on coverage
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "ci_skips", "-p", "no:cacheprovider", "-rA"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def skipping_suite(tmp_path: Path) -> Path:
    for name, source in SKIPPING.items():
        (tmp_path / name).write_text(textwrap.dedent(source))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    return tmp_path


def test_with_ci_true_every_kind_of_skip_fails_and_keeps_its_reason(skipping_suite: Path) -> None:
    """CI=true: a skip in a test body, in a fixture and by a skipif mark is each a failure
    naming the skip's reason; an xfail and a passing test are untouched."""
    run = run_pytest(skipping_suite, "true")
    assert run.returncode == 1, run.stdout
    for test, reason in (
        ("FAILED test_in_body.py::test_needs_a_server", "the server is not installed"),
        ("ERROR test_in_fixture.py::test_uses_the_proxy", "the proxy is not installed"),
        ("ERROR test_marked.py::test_marked", "not on this platform"),
    ):
        expected = f"{test} - skipped with CI=true, which counts as a failure: Skipped: {reason}"
        assert expected in run.stdout, run.stdout
    summary = run.stdout.splitlines()[-1]
    assert "1 failed, 1 passed, 1 xfailed, 2 errors" in summary, run.stdout  # errors: in setup
    assert "skipped" not in summary


def test_with_ci_true_a_module_skipped_at_collection_fails_the_run(tmp_path: Path) -> None:
    """CI=true: a module that skips itself (importorskip) is a collection error naming the
    missing module, so the run fails instead of silently running less."""
    (tmp_path / "test_module.py").write_text(textwrap.dedent(MODULE_SKIP))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    run = run_pytest(tmp_path, "true")
    assert run.returncode != 0, run.stdout
    assert "skipped with CI=true, which counts as a failure" in run.stdout
    assert "a_module_that_is_not_installed" in run.stdout
    assert run_pytest(tmp_path, None).returncode == 5  # outside CI: skipped, nothing ran


@pytest.mark.parametrize("ci", [None, "false", "1"])
def test_outside_ci_a_skip_stays_a_skip(skipping_suite: Path, ci: str | None) -> None:
    """Without CI=true (unset, or another value) the same suite passes with its skips."""
    run = run_pytest(skipping_suite, ci)
    assert run.returncode == 0, run.stdout
    assert "1 passed, 3 skipped, 1 xfailed" in run.stdout.splitlines()[-1], run.stdout
