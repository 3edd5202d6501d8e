"""The ``batchspec`` process around a command: what it imports and how it ends.

When ``main`` is the process's entry point (no ``argv``: the console script, ``python -m
batchspec``) httpx's own command-line client and HTTP/2 support are never imported (rich,
pygments, h2: ~55 ms of every command that reaches a provider), and the heap is frozen before
the exit so the last collections do not walk it again. A caller of ``main(argv)`` in its own
process (the tests) keeps its modules and collector untouched. Each process check runs a
real interpreter.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from workspaces import ResourceSpec, batchspec_cmd, local_provider, make_workspace

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


def test_the_process_never_imports_the_httpx_command_line_client_nor_http2() -> None:
    """httpx imported after the batchspec entry point ran, and a client of it built, has no
    ``httpx._main`` and brought neither rich nor h2 (it did whenever they were installed, as
    in the test environment)."""
    out = run_python(
        """
        import atexit, sys
        def report():
            import httpx
            httpx.Client().close()
            loaded = [sys.modules.get(m) is not None for m in ("httpx._main", "rich", "h2")]
            print(*loaded)
        atexit.register(report)
        sys.argv = ["batchspec", "--version"]
        from batchspec.cli.main import main
        main()
        """
    )
    assert out.splitlines()[-1] == "False False False"


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


def test_main_with_arguments_leaves_the_callers_process_alone() -> None:
    """``main(argv)``, as the tests call it in their own process, freezes nothing and marks
    no module absent."""
    before = gc.get_freeze_count()
    with pytest.raises(SystemExit):
        main(["--version"])
    assert gc.get_freeze_count() == before
    assert "h2" not in sys.modules or sys.modules["h2"] is not None


def test_apply_whose_stdout_reader_has_gone_runs_to_the_end(tmp_path: Path) -> None:
    """``apply --json | head`` with the reader gone before the first line: the run goes on
    and converges (every result written, exit 0), saying so once on stderr. It stopped at
    the first line it could not write (exit 1, nothing submitted)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", count=3, provider="here")],
    )
    proc = subprocess.Popen(
        batchspec_cmd("apply", str(ws.root), "--yes", "--wait", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone: the first line written meets a closed pipe
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err.count("stdout was closed by its reader") == 1, err
    assert [r["custom_id"] for r in ws.outputs("a")] == ws.input_ids("a")
