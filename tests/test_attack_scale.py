"""Attacks on issue 13's "a pass that scales", from the outside (each test says which promise).

Against the engine's API on loopback behind a ``RequestProbe`` (tests/probes.py), which
records when each request was answered, so the tests assert on what the server saw.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from probes import start_probed_server
from servers import wait_for
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, make_workspace, openai_provider, run_cli

from batchspec.engine.upstreams import BuiltinUpstream, Faults, FaultyUpstream

DOWNLOAD = "GET /files/{id}/content"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def overlapping_routes(
    spans: list[tuple[str, float, float]], more_than: float = 0.005
) -> list[tuple[str, str]]:
    """The pairs of routes whose requests the server answered at the same time for more than
    ``more_than`` seconds (a request sent the moment the client has read the last answer
    can arrive a few microseconds before the server has finished with that one)."""
    spans = sorted(spans, key=lambda span: span[1])
    return sorted(
        {
            (a[0], b[0])
            for i, a in enumerate(spans)
            for b in spans[i + 1 :]
            if b[1] < a[2] - more_than
        }
    )


def test_max_concurrency_caps_the_serial_steps_calls_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """maxConcurrency 1: the server never answers two requests at once, though a pass's
    downloads (in the pool) run while a serial step uploads, creates and looks up the
    retries of the resources collected before them."""
    upstream = FaultyUpstream(BuiltinUpstream(), Faults(error_500=0.5, seed=3))
    srv = start_probed_server(tmp_path / "engine", upstream=upstream, max_attempts=1)
    try:
        srv.probe.hold(DOWNLOAD, 0.05)  # downloads last, so the pool still has some running
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(srv.v1, KEY_ENV, maxConcurrency=1)},
            resources=[ResourceSpec(f"r{i:02d}", count=4, prefix=f"p{i}") for i in range(12)],
        )
        argv = ["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"]
        code, _, err = run_cli([*argv, "--timeout", "90", "--parallelism", "8"], capsys)

        assert code in (0, 4), err  # 4: a line failed on every attempt, which is fine here
        assert srv.probe.counts["POST /batches"] > 12  # retries were created
        assert overlapping_routes(srv.probe.spans) == []
    finally:
        srv.stop()


def test_a_listing_that_leaves_out_the_files_of_ended_batches_makes_no_retry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A list endpoint that shows ended batches without their output and error file ids
    (a gateway's trimmed list objects): the pass retrieves those batches by id and collects
    their answers; it does not take them as answerless and pay for the requests again."""
    srv = start_probed_server(tmp_path / "engine", api_key=SENTINEL_KEY)
    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(srv.v1, KEY_ENV)},
            resources=[ResourceSpec(f"r{i:02d}", count=2, prefix=f"p{i}") for i in range(4)],
        )
        assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
        wait_for(
            lambda: all(
                b["status"] == "completed" for b in srv.engine.list_batches(None, 100)["data"]
            )
        )
        page = srv.engine.list_batches(None, 100)
        for batch in page["data"]:
            batch.update(output_file_id=None, error_file_id=None)
        srv.probe.refuse(r"^GET /v1/batches$", 200, page)

        code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

        assert code == 0, err
        assert srv.probe.counts["POST /batches"] == 4  # no retry was created
        assert srv.probe.counts["GET /batches/{id}"] == 4  # each ended batch retrieved
        assert all(len(ws.outputs(f"r{i:02d}")) == 2 for i in range(4))
    finally:
        srv.stop()


def test_a_lost_state_adopts_from_a_trimmed_listing_without_paying_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The state lost, the ended batches are found by key on a listing that leaves out their
    file ids: they are adopted, read back by id and collected; nothing is created again."""
    srv = start_probed_server(tmp_path / "engine", api_key=SENTINEL_KEY)
    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(srv.v1, KEY_ENV)},
            resources=[ResourceSpec(f"r{i:02d}", count=2, prefix=f"p{i}") for i in range(3)],
        )
        assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
        wait_for(
            lambda: all(
                b["status"] == "completed" for b in srv.engine.list_batches(None, 100)["data"]
            )
        )
        page = srv.engine.list_batches(None, 100)
        for batch in page["data"]:
            batch.update(output_file_id=None, error_file_id=None)
        srv.probe.refuse(r"^GET /v1/batches$", 200, page)
        for path in ws.state_path.parent.iterdir():  # the state is lost
            if path.is_file():
                path.unlink()

        argv = ["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"]
        code, _, err = run_cli([*argv, "--timeout", "60"], capsys)

        assert code == 0, err
        assert srv.probe.counts["POST /batches"] == 3  # adopted, none created again
        assert all(len(ws.outputs(f"r{i:02d}")) == 2 for i in range(3))
    finally:
        srv.stop()
