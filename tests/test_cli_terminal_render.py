"""The terminal's renderers, pure: bars from Progress events, the colour switch, coloured plans.

No terminal here: every frame is a string. tests/test_cli_terminal.py drives a real one.
"""

from __future__ import annotations

import io
import re

import pytest

from batchspec.cli.bars import (
    UP_AND_ERASE,
    Board,
    LiveBars,
    advance,
    bar_cells,
    board_lines,
    fit,
    format_duration,
)
from batchspec.cli.colour import ANSI, PLAIN, colour_wanted
from batchspec.cli.render import plan_text, status_text
from batchspec.core.plan import Action, ActionKind, Plan
from batchspec.core.reporting import Progress
from batchspec.core.status import BatchStatus, ResourceStatus

SGR = re.compile(r"\x1b\[[0-9;]*m")


def poll(
    done: int,
    total: int,
    *,
    status: str = "in_progress",
    remote: str = "b1",
    resource: str = "triage",
    failed: int = 0,
    shard: int = 1,
    attempt: int = 1,
) -> Progress:
    data = {
        "remote_id": remote,
        "status": status,
        "total": total,
        "completed": done - failed,
        "failed": failed,
        "shard": shard,
        "attempt": attempt,
    }
    return Progress("poll", resource, f"batch {remote} {status}", data)


def board_of(*events: tuple[float, Progress]) -> Board:
    board = Board()
    for now, event in events:
        board = advance(board, event, now)
    return board


# ---------------------------------------------------------------------------------------------
# bars


def test_a_bar_shows_counts_percent_failures_and_an_eta_from_the_rate_seen() -> None:
    """Requests answered/total and percent; failed in its own words; ETA = left / rate since
    the first counts (4 in 2 s: 2/s, 8 left: 0:04)."""
    board = board_of((10.0, poll(4, 16)), (12.0, poll(8, 16, failed=1)))
    [line] = board_lines(board, now=12.0, width=120)
    assert line == (
        "⠋ triage  " + bar_cells(8, 16) + "  8/16  50%  1 failed  ETA 0:04  in_progress"
    )


def test_shards_are_summed_and_a_retry_replaces_its_shards_first_attempt() -> None:
    """Two shards are one bar over both; attempt 2 of shard 1 (only what is left) replaces
    attempt 1 of it in the sums, and the line says which attempt it is on."""
    board = board_of(
        (0.0, poll(10, 10, status="completed", remote="a", shard=1)),
        (0.0, poll(5, 10, remote="b", shard=2)),
        (1.0, poll(1, 3, remote="c", shard=1, attempt=2)),
    )
    [line] = board_lines(board, now=1.0, width=120)
    assert "6/13" in line and "2 shards" in line and "attempt 2" in line


def test_a_retired_batch_being_drained_is_not_drawn_as_the_resources_progress() -> None:
    """A poll of a superseded generation's batch (``retired``) adds no bar to its resource:
    the line counts only the current generation's batch."""
    data = {"remote_id": "old", "status": "cancelling", "total": 60, "completed": 13}
    retired = Progress("poll", "triage", "", {**data, "failed": 0, "retired": "superseded"})
    board = board_of((0.0, poll(4, 16, remote="new")), (0.1, retired))
    [line] = board_lines(board, now=0.1, width=120)
    assert "4/16" in line and "60" not in line and "cancelling" not in line


def test_a_replace_draws_the_new_generation_not_the_cancelled_one() -> None:
    """A replace cancels the old generation's batches, then creates the new one's: the bar
    follows the new batch, not '✗ cancelled' all the way to '20,000/20,000 100% cancelled'."""
    cancel = Progress("cancel", "triage", "replaced by a new spec: cancel sent to 2 batch(es)")
    create = Progress("create", "triage", "", {"remote_id": "new", "shard": 1, "attempt": 1})
    board = board_of(
        (0.0, poll(3, 10, remote="old1", shard=1)),
        (0.0, poll(2, 10, remote="old2", shard=2)),
        (0.1, cancel),
        (0.2, create),
        (0.3, poll(4, 16, remote="new")),
    )
    [line] = board_lines(board, now=0.3, width=120)
    assert "4/16" in line and "cancelled" not in line and "✗" not in line, line
    assert "shards" not in line, line  # the old generation's second shard is gone
    [line] = board_lines(board_of((0.0, cancel)), now=0.0, width=120)
    assert "cancelled" in line  # a cancel with nothing after it (prune) still says so


def test_validating_shows_a_spinner_and_no_bar() -> None:
    """While the provider validates there are no counts to draw: a spinner and the word."""
    board = board_of(
        (0.0, Progress("create", "triage", "created", {"remote_id": "b1", "requests": 5})),
        (0.1, poll(0, 5, status="validating")),
    )
    frames = {board_lines(board, now=t / 10)[0][0] for t in range(10)}
    assert len(frames) == 10  # the spinner turns with the clock
    [line] = board_lines(board, now=0.0)
    assert line.endswith("validating") and "━" not in line and "0/5" not in line


def test_upload_shows_the_file_size_until_the_batch_exists() -> None:
    """An upload in progress: a spinner and the size of the file being uploaded."""
    board = board_of(
        (0.0, Progress("upload", "big", "uploading", {"file": "x.jsonl", "bytes": 4_300_000}))
    )
    assert board_lines(board, now=0.0) == ["⠋ big  uploading (4.3 MB)"]


def test_upload_with_byte_progress_shows_a_byte_bar_until_the_batch_exists() -> None:
    """Bytes sent during an upload: a bar of sent/size in MB; the created batch replaces it."""
    data = {"file": "x.jsonl", "bytes": 4_300_000}
    board = board_of(
        (0.0, Progress("upload", "big", "uploading", data)),
        (0.1, Progress("upload_progress", "big", "uploaded", {**data, "sent": 1_075_000})),
    )
    assert board_lines(board, now=0.0) == [
        "⠋ big  ━━━━━━╺                   1.1/4.3 MB  25%  uploading"
    ]
    [ascii_line] = board_lines(board, now=0.0, ascii_only=True)
    assert ascii_line == "| big  [######..................]  1.1/4.3 MB  25%  uploading"
    done = advance(board, Progress("upload_progress", "big", "", {**data, "sent": 4_300_000}), 0.2)
    assert board_lines(done, now=0.0)[0].endswith("4.3/4.3 MB 100%  uploading")
    created = advance(done, Progress("create", "big", "", {"remote_id": "b1"}), 0.3)
    assert board_lines(created, now=0.0) == ["⠋ big  created"]


@pytest.mark.parametrize(
    ("sent", "size", "shown"),
    [
        pytest.param(480, 480, "480/480 bytes 100%", id="bytes"),
        pytest.param(12_000, 48_000, "12.0/48.0 KB  25%", id="kilobytes"),
    ],
)
def test_a_small_uploads_byte_bar_counts_in_its_own_unit(sent: int, size: int, shown: str) -> None:
    """A file under 1 MB (300 small manifests upload hundreds) counts its bytes in bytes or
    KB, not as ``0.0/0.0 MB 100%``."""
    data = {"file": "x.jsonl", "bytes": size}
    board = board_of(
        (0.0, Progress("upload", "small", "uploading", data)),
        (0.1, Progress("upload_progress", "small", "uploaded", {**data, "sent": sent})),
    )
    assert f"  {shown}  uploading" in board_lines(board, now=0.0)[0]


def test_done_and_degraded_resources_get_a_mark_instead_of_a_spinner() -> None:
    """Results written: ✓ and no ETA; written Degraded: ✗."""
    board = board_of(
        (0.0, poll(3, 3, status="completed", resource="a")),
        (0.0, Progress("results", "a", "wrote", {"status": "complete"})),
        (0.0, poll(3, 3, status="completed", resource="b", failed=3)),
        (0.0, Progress("results", "b", "wrote", {"status": "degraded"})),
    )
    a, b = board_lines(board, now=5.0)
    assert a.startswith("✓ a") and a.endswith("done") and "ETA" not in a
    assert b.startswith("✗ b") and b.endswith("degraded") and "3 failed" in b


def test_a_failed_download_is_a_red_line_and_its_bar_stops_saying_downloading() -> None:
    """A ``download_failed`` event prints its line in red above the bars, and the bar reads
    "download failed", not "downloading" as if the file were still on its way."""
    screen = LiveBars(width=100, style=ANSI)
    screen.render(poll(3, 3, status="completed"), now=0.0)
    screen.render(Progress("download", "triage", "downloading the output file"), now=0.0)
    text = screen.render(Progress("download_failed", "triage", "could not download"), now=0.0)
    assert "[triage] " + ANSI.paint("could not download", "red") + "\n" in text
    [line] = board_lines(screen.board, now=0.0, width=100)
    assert "download failed" in line and "downloading" not in line


def test_bars_never_wrap_even_with_colour() -> None:
    """Each line is cut to width - 1 visible characters; escape codes do not count."""
    board = board_of((0.0, poll(1, 9, resource="a-rather-long-resource-name")))
    for style in (PLAIN, ANSI):
        [line] = board_lines(board, now=0.0, width=30, style=style)
        assert len(SGR.sub("", line)) == 29


def test_live_screen_prints_milestones_above_the_bars_and_erases_them_at_the_end() -> None:
    """A milestone erases the bars, stands on its own line, and the bars come back below
    it; finish() erases them so the summary takes their place."""
    screen = LiveBars(width=100)
    first = screen.render(poll(1, 4), now=0.0)
    assert first == board_lines(screen.board, now=0.0, width=100)[0] + "\n"
    second = screen.render(Progress("collect", "triage", "collected batch b1"), now=0.0)
    assert second.startswith(UP_AND_ERASE.format(n=1) + "[triage] collected batch b1\n")
    assert second.count("\n") == 2
    assert screen.finish() == UP_AND_ERASE.format(n=1)
    assert screen.finish() == ""


def test_more_bars_than_the_terminal_has_rows_draw_what_fits_and_count_the_rest() -> None:
    """200 resources on a 24-row terminal: a frame is at most 23 lines (the unfinished first,
    in resource order, then one line counting the rest), so "n lines up" never reaches past
    the top of the screen; drawn whole, each redraw left ~180 lines in the scrollback."""
    screen = LiveBars(width=100, height=24)
    for i in range(200):
        screen.render(Progress("upload", f"job-{i:03d}", "uploading"), now=0.0)
    for i in range(3):
        screen.render(Progress("results", f"job-{i:03d}", "wrote 5 results"), now=0.0)
    frame = screen.redraw(now=0.0)
    assert frame.startswith(UP_AND_ERASE.format(n=23))
    lines = frame.removeprefix(UP_AND_ERASE.format(n=23)).splitlines()
    assert len(lines) == 23
    assert lines[0].split()[1] == "job-003"  # the three done are counted, not drawn
    assert lines[-1] == "… and 178 more (3 done)"
    assert screen.finish() == UP_AND_ERASE.format(n=23)


def test_ascii_terminals_get_ascii_bars() -> None:
    """A terminal whose encoding is not UTF-8 gets # and . instead of box drawing."""
    board = board_of((0.0, poll(2, 4)))
    [line] = board_lines(board, now=0.0, ascii_only=True)
    assert line.isascii() and "[############............]" in line


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(4.4, "0:04"), (75.2, "1:15"), (3600 * 2 + 300, "2h05m")],
)
def test_durations_read_like_a_clock(seconds: float, text: str) -> None:
    """ETAs: m:ss below an hour, then hours and minutes."""
    assert format_duration(seconds) == text


def test_fit_keeps_escapes_and_closes_them_when_cutting() -> None:
    """Cutting coloured text keeps its codes and resets, so no colour leaks past the line."""
    text = ANSI.paint("abcdef", "red")
    assert fit(text, 3) == "\x1b[31mabc\x1b[0m"
    assert fit("abc", 3) == "abc"


# ---------------------------------------------------------------------------------------------
# colour


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "env", "flag", "wanted"),
    [
        pytest.param(Tty(), {"TERM": "xterm"}, False, True, id="terminal"),
        pytest.param(io.StringIO(), {"TERM": "xterm"}, False, False, id="pipe"),
        pytest.param(Tty(), {"NO_COLOR": "1"}, False, False, id="NO_COLOR"),
        pytest.param(Tty(), {"NO_COLOR": ""}, False, True, id="NO_COLOR-empty"),
        pytest.param(Tty(), {"TERM": "dumb"}, False, False, id="TERM=dumb"),
        pytest.param(Tty(), {}, True, False, id="--no-color"),
    ],
)
def test_colour_only_on_a_terminal_nobody_asked_to_keep_plain(
    stream: io.StringIO, env: dict[str, str], flag: bool, wanted: bool
) -> None:
    """Colour needs a terminal, no --no-color, NO_COLOR unset or empty, TERM not dumb."""
    assert colour_wanted(stream, no_color=flag, env=env) is wanted


PLAN = Plan(
    (
        Action("new", ActionKind.CREATE, "new resource", "p", requests=3, estimated_input_tokens=9),
        Action("busy", ActionKind.REFRESH, "1 batch(es) in flight", "p"),
        Action("changed", ActionKind.REPLACE, "spec changed", "p", requests=2),
        Action("kept", ActionKind.CREATE, "all answers kept", "p", estimated_input_tokens=1),
        Action("gone", ActionKind.PRUNE, "manifest removed", "p"),
        Action("done", ActionKind.NONE, "in sync", "p"),
    )
)


def test_plan_colours_snapshot() -> None:
    """+ green, ~ yellow, -/+ magenta, - red, = dim; names bold; the summary bold."""
    assert plan_text(PLAN, ANSI).splitlines() == [
        "  \x1b[32m  +\x1b[0m \x1b[1mnew\x1b[0m: \x1b[32mcreate\x1b[0m (new resource): "
        "3 requests to submit, ~9 input tokens on p",
        "  \x1b[33m  ~\x1b[0m \x1b[1mbusy\x1b[0m: \x1b[33mrefresh\x1b[0m (1 batch(es) in flight)",
        "  \x1b[35m-/+\x1b[0m \x1b[1mchanged\x1b[0m: \x1b[35mreplace\x1b[0m (spec changed): "
        "2 requests to submit, ~0 input tokens on p",
        "  \x1b[32m  +\x1b[0m \x1b[1mkept\x1b[0m: \x1b[32mcreate\x1b[0m (all answers kept): "
        "0 requests to submit on p",  # no estimate for nothing
        "  \x1b[31m  -\x1b[0m \x1b[1mgone\x1b[0m: \x1b[31mprune\x1b[0m (manifest removed)",
        "  \x1b[2m  =\x1b[0m \x1b[1mdone\x1b[0m: \x1b[2mnone\x1b[0m (in sync)",
        "",
        "\x1b[1mPlan: 2 to create, 1 to replace, 1 to refresh, 1 to prune. "
        "5 requests to submit (~10 input tokens).\x1b[0m",
    ]


def test_a_plan_that_submits_nothing_gives_no_token_estimate() -> None:
    """0 requests to submit is said without "(~1 input tokens)": an estimate for nothing."""
    kept = Action("kept", ActionKind.CREATE, "kept", "p", reused=3, estimated_input_tokens=1)
    assert plan_text(Plan((kept,)), PLAIN).splitlines()[-1] == (
        "Plan: 1 to create. 0 requests to submit; 3 keep a recorded answer."
    )


def test_plain_style_is_the_uncoloured_text_exactly() -> None:
    """Without colour the plan and status are byte for byte the text with the codes removed."""
    assert plan_text(PLAN, PLAIN) == SGR.sub("", plan_text(PLAN, ANSI))
    assert "\x1b" not in plan_text(PLAN)
    statuses = [
        ResourceStatus(
            "a", "OutOfSync", "Degraded", "retry", "r", "p", None, None, 4, 1, 3, None, None
        )
    ]
    coloured = status_text(statuses, ANSI)
    assert "\x1b[33mOutOfSync\x1b[0m" in coloured and "\x1b[31mDegraded\x1b[0m" in coloured
    assert status_text(statuses) == SGR.sub("", coloured)


def test_status_counts_group_thousands_as_the_totals_line_does() -> None:
    """A resource's and its batch's counts read 1,500/20,000, as the totals line writes them."""
    batch = BatchStatus(1, 1, "batch_1", "in_progress", 20000, 1500, 0)
    statuses = [
        ResourceStatus(
            "big",
            "OutOfSync",
            "Progressing",
            "refresh",
            "r",
            "p",
            None,
            None,
            20000,
            1500,
            0,
            None,
            None,
            (batch,),
        )
    ]
    text = status_text(statuses)
    assert "big: OutOfSync, Progressing — 1,500/20,000 succeeded" in text
    assert "batch_1 in_progress 1,500/20,000" in text


def test_status_counts_what_running_batches_answered_beside_what_is_collected() -> None:
    """Results are collected when a batch ends: '0/20,000 succeeded' beside a batch at
    6,880/20,000 read as no progress, so the running batches' answers are counted too;
    an ended batch's are in the succeeded count already, and add nothing."""
    running = BatchStatus(1, 1, "batch_1", "in_progress", 20000, 6800, 80)
    ended = BatchStatus(2, 1, "batch_2", "completed", 100, 100, 0)
    fields = ("OutOfSync", "Progressing", "refresh", "r", "p", None, None, 20100, 100, 0)
    status = ResourceStatus("big", *fields, None, None, (running, ended))
    text = status_text([status])
    assert (
        "big: OutOfSync, Progressing — 100/20,100 succeeded "
        "(6,880 answered in batches still running, collected as they end)"
    ) in text
    status = ResourceStatus("big", *fields, None, None, (ended,))
    assert "answered in batches" not in status_text([status])


def test_the_live_output_draws_bars_ticks_and_erases_them_on_close() -> None:
    """apply's live output on a terminal: a poll draws the bars, a milestone stands above
    them, the ticker redraws while waiting, and close() stops the ticker and erases the bars
    so the summary takes their place (no stray bar left under it)."""
    import threading
    import time

    from batchspec.cli.applyview import ApplyOutput

    chunks: list[str] = []
    with ApplyOutput(mode="live", write=chunks.append, width=100, clock=lambda: 0.0) as out:
        out.show(poll(1, 4))
        out.show(Progress("collect", "triage", "collected batch b1"))
        deadline = time.monotonic() + 5
        while len(chunks) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)  # the ticker redraws every TICK_SECONDS
    assert "[triage] collected batch b1\n" in chunks[1]
    assert len(chunks) >= 4  # the two shown, at least one tick, the final erase
    assert chunks[-1] == UP_AND_ERASE.format(n=1)
    assert not [t for t in threading.enumerate() if t.name == "batchspec-bars"]


def test_a_line_said_over_live_bars_goes_above_them_or_leaves_them_be() -> None:
    """A signal's line (Ctrl-C) while bars are on screen: the bars are erased, the line
    written, the bars drawn below it. When the frame being written cannot be waited for, the
    line goes below the bars, and the next frame erases nothing (it would wipe the line)."""
    import threading

    from batchspec.cli import applyview
    from batchspec.cli.applyview import ApplyOutput

    chunks: list[str] = []
    said: list[str] = []
    out = ApplyOutput(mode="live", write=chunks.append, width=100, clock=lambda: 0.0)
    assert not out.say_above("stop", said.append)  # no bars yet: said as usual
    out.show(poll(1, 4))
    out._stop.set()  # no ticker frames from here on

    assert out.say_above("Interrupted", said.append)
    assert said == ["Interrupted\n"]
    assert chunks[-2] == UP_AND_ERASE.format(n=1) and "triage" in chunks[-1]

    held = threading.Event()
    release = threading.Event()

    def hold_the_lock() -> None:
        with out._lock:
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    held.wait(5)
    wait = applyview.LOCK_WAIT_SECONDS
    applyview.LOCK_WAIT_SECONDS = 0.01
    try:
        assert out.say_above("Terminated", said.append)
    finally:
        applyview.LOCK_WAIT_SECONDS = wait
        release.set()
        holder.join()
    assert said[-1] == "Terminated\n"
    out.close()
    assert chunks[-1] == ""  # close erases nothing: the bars stay above the line


def test_a_dumb_or_ci_terminal_gets_no_live_bars() -> None:
    """Live bars only where a person watches: a dumb terminal or CI gets plain lines."""
    from batchspec.cli.applyview import live_terminal

    assert live_terminal(Tty(), env={"TERM": "xterm"})
    assert not live_terminal(Tty(), env={"TERM": "dumb"})
    assert not live_terminal(Tty(), env={"TERM": "xterm", "CI": "true"})
    assert not live_terminal(io.StringIO(), env={"TERM": "xterm"})


def test_a_fleet_degraded_by_one_error_lists_a_few_and_counts_the_rest() -> None:
    """300 resources Degraded by one upstream mistake: apply's summary listed each with the
    same advice and first error (1,800 lines); it lists five in full and counts the rest with
    the error, while one that failed otherwise is still listed, and --verbose lists all."""
    from batchspec.cli.render import ALIKE_FAILURES_SHOWN, apply_text
    from batchspec.core.apply import ApplyResult

    def degraded(name: str, error: str) -> ResourceStatus:
        fields = ("OutOfSync", "Degraded", "none", "r", "p", None, None, 3, 0, 3, None, None)
        return ResourceStatus(name, *fields, first_error=f"{name}-0: 404: {error}")

    fleet = [degraded(f"job-{n:03d}", "no such route") for n in range(300)]
    other = degraded("odd", "model not found")
    result = ApplyResult(1, Plan(actions=()), (*fleet[:150], other, *fleet[150:]), "degraded", 4)

    text = apply_text(result)

    listed = [line for line in text.splitlines() if ": OutOfSync, Degraded" in line]
    assert [line.split(":")[0].strip() for line in listed] == [
        *(f"job-{n:03d}" for n in range(ALIKE_FAILURES_SHOWN)),
        "odd",
    ]
    assert (
        f"  … and {300 - ALIKE_FAILURES_SHOWN} more resources Degraded with the same first "
        "error (404: no such route), not listed: `apply --verbose` lists every one"
    ) in text.splitlines()
    assert "300 more" not in text and len(text.splitlines()) < 60
    verbose = apply_text(result, verbose=True)
    assert len([line for line in verbose.splitlines() if ", Degraded" in line]) == 301
