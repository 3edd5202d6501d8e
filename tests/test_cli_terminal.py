"""`apply --wait` on a real terminal: live bars and colour under a pty and under tmux, and none
of it piped to a file, under TERM=dumb, with NO_COLOR, or in CI.

The batches run on a real engine over loopback, one request at a time with 0.05 s each, so
the bars are on screen for a second or two. tmux (Debian package `tmux`) renders the
screen the way a person sees it; without it the tmux test is skipped on a workstation and
fails under CI=true (.ci/run installs it).
"""

from __future__ import annotations

import os
import pty
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from probes import ProbedServer
from servers import wait_for
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, Workspace, batchspec_cmd, served

from batchspec.cli.bars import UP_AND_ERASE
from batchspec.engine import BuiltinUpstream

FAST = ["--poll-interval", "0.05"]
SGR = re.compile(r"\x1b\[[0-9;]*m")
SGR_COLOUR = re.compile(r"\x1b\[[0-9;]*3[0-7]m")  # a foreground colour
BAR = "━"


def slow_workspace(tmp_path: Path, server: Callable[..., ProbedServer]) -> Workspace:
    """Two resources (one in 2 shards) of 20 requests on an engine answering 20 a second."""
    srv = server(upstream=BuiltinUpstream(latency=0.05), concurrency=1)
    return served(
        tmp_path / "ws",
        srv,
        ResourceSpec("triage", count=20),
        ResourceSpec("summaries", count=20, spec={"limits": {"maxRequestsPerBatch": 10}}),
    )


def terminal_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NO_COLOR", "TERM")}
    return {**env, KEY_ENV: SENTINEL_KEY, "TERM": "xterm-256color", "COLUMNS": "120", **extra}


def run_on_pty(args: list[str], env: Mapping[str, str]) -> tuple[int, str]:
    """Runs batchspec with stdout on a pseudo-terminal; returns its exit code and bytes."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        batchspec_cmd(*args),
        stdout=slave,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    code = proc.wait(timeout=60)
    assert proc.stderr is not None
    assert code == 0, proc.stderr.read()
    return code, b"".join(chunks).decode()


def test_on_a_terminal_apply_draws_coloured_bars_and_collapses_them(
    tmp_path: Path, server: Callable[..., ProbedServer]
) -> None:
    """On a pty: the plan's + in green, bars with counts redrawn in place (cursor up +
    erase), and the last thing before the summary is the bars being erased."""
    ws = slow_workspace(tmp_path, server)
    _, out = run_on_pty(["apply", str(ws.root), "--yes", "--wait", *FAST], terminal_env())

    assert "\x1b[32m  +\x1b[0m" in out  # the plan's create symbol, green
    assert BAR in out and "/20" in out and "2 shards" in out
    assert out.count(UP_AND_ERASE.format(n=2)) > 3  # two bars, redrawn again and again
    head, summary = out.split("Apply complete", 1)
    assert SGR.sub("", head).endswith(UP_AND_ERASE.format(n=2))  # the bars erased first
    assert BAR not in summary


@pytest.mark.parametrize(
    ("extra", "bars", "colour"),
    [
        pytest.param({"NO_COLOR": "1"}, True, False, id="NO_COLOR"),
        pytest.param({"TERM": "dumb"}, False, False, id="TERM=dumb"),
        pytest.param({"CI": "true"}, False, True, id="CI"),
    ],
)
def test_a_terminal_can_ask_for_less(
    tmp_path: Path,
    server: Callable[..., ProbedServer],
    extra: dict[str, str],
    bars: bool,
    colour: bool,
) -> None:
    """NO_COLOR keeps the bars but drops colour; TERM=dumb drops both; a CI job (CI set)
    with a terminal still gets plain lines, not bars."""
    ws = slow_workspace(tmp_path, server)
    _, out = run_on_pty(["apply", str(ws.root), "--yes", "--wait", *FAST], terminal_env(**extra))
    assert (BAR in out) is bars
    assert bool(SGR_COLOUR.search(out)) is colour
    assert "Apply complete" in out


def test_no_color_flag_on_a_terminal(tmp_path: Path, server: Callable[..., ProbedServer]) -> None:
    """--no-color on a terminal: bars yes, colour no (status and plan alike)."""
    ws = slow_workspace(tmp_path, server)
    _, out = run_on_pty(
        ["apply", str(ws.root), "--yes", "--wait", "--no-color", *FAST], terminal_env()
    )
    assert BAR in out and not SGR_COLOUR.search(out)
    _, status = run_on_pty(["status", str(ws.root), "--no-color"], terminal_env())
    assert "Synced" in status and "\x1b" not in status
    _, status = run_on_pty(["status", str(ws.root)], terminal_env())
    assert "\x1b[32mSynced\x1b[0m" in status


def test_piped_to_a_file_the_same_run_has_no_escape_codes(
    tmp_path: Path, server: Callable[..., ProbedServer]
) -> None:
    """stdout to a file: plain lines only: no escapes, no carriage returns, no bar glyphs."""
    ws = slow_workspace(tmp_path, server)
    log = tmp_path / "apply.log"
    with log.open("wb") as f:
        proc = subprocess.run(
            batchspec_cmd("apply", str(ws.root), "--yes", "--wait", *FAST),
            stdout=f,
            stderr=subprocess.PIPE,
            env=terminal_env(),
            timeout=60,
        )
    assert proc.returncode == 0, proc.stderr
    text = log.read_text(encoding="utf-8")
    assert "\x1b" not in text and "\r" not in text and BAR not in text
    assert "[triage] wrote 20 results" in text and "Apply complete" in text


# ---------------------------------------------------------------------------------------------
# tmux: the screen as a person sees it


@pytest.fixture
def tmux(tmp_path: Path) -> Callable[..., str]:
    """Runs a shell command in a detached 120x40 tmux session on a private server; returns
    the session's target. The server is killed at teardown."""
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing: .ci/run installs it (apt-get install -y tmux)")
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    socket = f"batchspec-test-{os.getpid()}"
    sessions: list[str] = []

    def run(command: str) -> str:
        name = f"t{len(sessions)}"
        subprocess.run(
            ["tmux", "-L", socket, "new-session", "-d", "-s", name, "-x", "120", "-y", "40",
             command],
            check=True,
            env=terminal_env(),
        )  # fmt: skip
        sessions.append(name)
        return name

    run.socket = socket  # type: ignore[attr-defined]
    yield run  # type: ignore[misc]
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True)


def capture(socket: str, target: str, *, escapes: bool = False) -> str:
    args = ["tmux", "-L", socket, "capture-pane", "-p", "-t", target] + (["-e"] if escapes else [])
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def test_under_tmux_the_screen_shows_bars_then_only_the_summary(
    tmp_path: Path, server: Callable[..., ProbedServer], tmux: Callable[..., str]
) -> None:
    """Mid-run the screen has a bar line per resource with counts and an ETA, in colour;
    at the end the bars are gone and the summary stands where they were."""
    ws = slow_workspace(tmp_path, server)
    argv = " ".join(
        shlex.quote(a) for a in batchspec_cmd("apply", str(ws.root), "--yes", "--wait", *FAST)
    )
    target = tmux(f"{argv}; echo EXIT=$?; sleep 600")
    socket = tmux.socket  # type: ignore[attr-defined]

    def bars_on_screen() -> str | None:
        screen = capture(socket, target)
        lines = [line for line in screen.splitlines() if BAR in line]
        return screen if len(lines) == 2 and "ETA" in screen else None

    during = wait_for(bars_on_screen, timeout=30, interval=0.05)
    coloured = capture(socket, target, escapes=True)

    def finished() -> str | None:
        screen = capture(socket, target)
        return screen if "EXIT=" in screen else None

    final = wait_for(finished, timeout=60)

    assert re.search(r"triage\s+━+.*\d+/20\s+\d+%", during), during
    assert re.search(r"summaries\s+━*.*/20.*2 shards", during), during
    assert SGR_COLOUR.search(coloured)
    assert "EXIT=0" in final
    assert BAR not in final and "ETA" not in final
    summary = final[final.index("Apply complete") :]
    assert "triage: Synced, Healthy" in summary and "summaries: Synced, Healthy" in summary
    if keep := os.environ.get("BATCHSPEC_KEEP_SCREENS"):  # for a person to look at them
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / "during.txt").write_text(during)
        (Path(keep) / "final.txt").write_text(final)


def test_under_tmux_ctrl_c_is_said_above_the_bars_and_stays_on_screen(
    tmp_path: Path, server: Callable[..., ProbedServer], tmux: Callable[..., str]
) -> None:
    """Ctrl-C while the bars are on screen: the line saying what was interrupted stays on
    screen, with no bar under it. Written under them, it was taken for their last line by
    the next redraw, and wiped off: the screen showed the exit and no word of why."""
    ws = slow_workspace(tmp_path, server)
    argv = " ".join(
        shlex.quote(a) for a in batchspec_cmd("apply", str(ws.root), "--yes", "--wait", *FAST)
    )
    target = tmux(f"{argv}; echo EXIT=$?; sleep 600")
    socket = tmux.socket  # type: ignore[attr-defined]
    wait_for(lambda: BAR in capture(socket, target), timeout=30, interval=0.05)
    subprocess.run(["tmux", "-L", socket, "send-keys", "-t", target, "C-c"], check=True)

    def finished() -> str | None:
        screen = capture(socket, target)
        return screen if "EXIT=" in screen else None

    final = wait_for(finished, timeout=60)

    assert "EXIT=130" in final, final
    said = final.find("Interrupted: batches already created are kept")
    assert said >= 0, final
    # no bar under the line: erased, or (a Ctrl-C landing while a frame was being written
    # on the same thread) left above it, where it no longer redraws
    assert BAR not in final[said:], final
