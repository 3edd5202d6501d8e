"""The ``batchspec`` process around a command: what it imports and how it ends.

When ``main`` is the process's entry point (no ``argv``: the console script, ``python -m
batchspec``) httpx's own command-line client is never imported (rich and pygments, ~40 ms of
every command that reaches a provider), and the heap is frozen before the exit so the last
collections do not walk it again. A caller of ``main(argv)`` in its own process (the tests)
keeps its collector untouched. Each process check runs a real interpreter.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import pytest

from batchspec.cli.main import main


def run_python(code: str) -> str:
    """The stdout of a fresh interpreter running ``code`` (whatever its exit code)."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout


def test_the_process_never_imports_the_httpx_command_line_client() -> None:
    """httpx imported after the batchspec entry point ran has no ``httpx._main`` and brought
    no rich (it did whenever rich was installed, as in the test environment)."""
    out = run_python(
        """
        import atexit, sys
        def report():
            import httpx
            print(sys.modules.get("httpx._main") is not None, "rich" in sys.modules)
        atexit.register(report)
        sys.argv = ["batchspec", "--version"]
        from batchspec.cli.main import main
        main()
        """
    )
    assert out.splitlines()[-1] == "False False"


def test_the_process_freezes_its_heap_before_it_exits() -> None:
    """By the time the interpreter runs its exit handlers, the entry point has moved the
    heap to the permanent generation (gc.freeze), even when the command failed."""
    out = run_python(
        """
        import atexit, gc, sys
        atexit.register(lambda: print(gc.get_freeze_count() > 0))
        sys.argv = ["batchspec", "no-such-command"]
        from batchspec.cli.main import main
        main()
        """
    )
    assert out.splitlines()[-1] == "True"


def test_main_with_arguments_leaves_the_callers_collector_alone() -> None:
    """``main(argv)``, as the tests call it in their own process, freezes nothing."""
    before = gc.get_freeze_count()
    with pytest.raises(SystemExit):
        main(["--version"])
    assert gc.get_freeze_count() == before
