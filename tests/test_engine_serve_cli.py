"""`batchspec serve`: the real command in a subprocess, its safety refusals, and clean stops."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest
from servers import jsonl_bytes, request_lines, wait_for, wait_for_batch

from batchspec.cli.main import main

KEY_VAR = "BATCHSPEC_TEST_SERVE_KEY"
SECRET = "sk-serve-secret-123"


def start_serve(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    """`batchspec serve` on a free loopback port, once it says where. It takes SIGINT as
    Ctrl-C even when pytest was started with SIGINT ignored (`pytest &` from a script): exec
    keeps an ignored signal ignored but resets a caught one, so SIGINT is caught meanwhile."""
    env = {**os.environ, KEY_VAR: SECRET}
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "batchspec", "serve", "--port", "0", "--data-dir",
             str(data_dir), "--api-key-env", KEY_VAR, "--poll-interval", "0.02", *extra],
            stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, previous)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.fullmatch(
        r"serving on (http://127\.0\.0\.1:\d+) \(data: (.+), upstream: (.+)\)\n", line
    )
    if match is None:
        proc.kill()
        pytest.fail(f"unexpected first line: {line!r}")
    assert match.group(2) == str(data_dir)
    assert match.group(3).startswith("builtin")
    return proc, match.group(1)


def terminate(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return err


def test_serve_runs_until_sigterm_and_resumes_on_the_next_start(tmp_path):
    """The real command serves the SDK, stops cleanly on SIGTERM and resumes the batch later."""
    data_dir = tmp_path / "engine"
    proc, url = start_serve(data_dir, "--upstream-latency", "0.05", "--concurrency", "1")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=SECRET, max_retries=0)
        file_id = client.files.create(
            file=("in.jsonl", jsonl_bytes(request_lines(12))), purpose="batch"
        ).id
        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).files.list()
    finally:
        stderr = terminate(proc)
    assert SECRET not in stderr

    proc, url = start_serve(data_dir)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=SECRET, max_retries=0)
        done = wait_for_batch(client, batch.id)
    finally:
        terminate(proc)
    assert done.status == "completed"
    assert done.request_counts.completed == 12


def test_ctrl_c_says_at_once_what_serve_waits_for_and_a_second_stops_at_once(tmp_path):
    """Ctrl-C while the engine has requests at the upstream: serve says on stderr at once
    that it stops, what it waits for (how many requests, up to how long) and that Ctrl-C
    again does not wait, in apply's words; it then waits, and a second Ctrl-C ends it at
    once (exit 130, no traceback, nothing said twice), the engine closed whole."""
    proc, url = start_serve(tmp_path / "engine", "--upstream-latency", "30", "--concurrency", "2")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=SECRET, max_retries=0)
        file_id = client.files.create(
            file=("in.jsonl", jsonl_bytes(request_lines(4))), purpose="batch"
        ).id
        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_for(lambda: client.batches.retrieve(batch.id).status == "in_progress")
        time.sleep(0.2)  # its first two lines sent
        proc.send_signal(signal.SIGINT)
        said = proc.stderr.readline()
        assert said == (
            "Interrupted: stopping, taking no new requests; waiting for the 2 requests the "
            "engine has sent upstream to finish (up to 30 s). Ctrl-C again does not wait for "
            "them (the engine's are sent again at the next start); unfinished batches resume "
            "at the next start.\n"
        )
        time.sleep(0.2)  # a second press a moment later, as a person's is
        assert proc.poll() is None  # letting them finish
        proc.send_signal(signal.SIGINT)
        # at once: they take 30 s (15 s is the bound of a loaded 2-core CI box with coverage
        # on, where closing the engine's store took over 5 s once)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert "Traceback" not in err and "Interrupted" not in err
    # the close ran whole, not cut by the second Ctrl-C: its last commit made, its store
    # closed (no log left beside it), its data folder unlocked
    assert not list((tmp_path / "engine").rglob("*-wal")), "the engine's close was cut short"


@pytest.mark.parametrize(
    ("notice", "text"),
    [
        pytest.param(
            ("SIGINT", 0, 0),
            "Interrupted: stopping (no request in flight); unfinished batches resume at the "
            "next start.",
            id="idle",
        ),
        pytest.param(
            ("SIGTERM", 1, 2),
            "Terminated (SIGTERM): stopping, taking no new requests; waiting for the 1 request "
            "the engine has sent upstream to finish (up to 30 s) and for 2 API requests being "
            "answered (up to 5 s). Ctrl-C does not wait for them (the engine's are sent again "
            "at the next start); unfinished batches resume at the next start.",
            id="sigterm-both",
        ),
    ],
)
def test_serve_s_stopping_line_says_only_what_it_waits_for(
    notice: tuple[str, int, int], text: str
) -> None:
    """serve's stopping line names only the waits there are (none: it stops at once), and
    after SIGTERM offers Ctrl-C, not "Ctrl-C again"."""
    from batchspec.cli.main import serve_stopping_text
    from batchspec.engine.server import Stopping

    sig, in_flight, answering = notice
    stopping = Stopping(sig, in_flight, 30.0, answering, 5.0)
    assert serve_stopping_text(stopping) == text


def test_serve_refuses_a_public_host_without_a_key(tmp_path, capsys):
    """Binding a non-loopback address without --api-key-env exits 1 with a clear message."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path / "d")])
    assert exited.value.code == 1
    err = capsys.readouterr().err
    assert "Refusing to listen on 0.0.0.0 without an API key" in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("port", ["99999", "-1"])
def test_serve_refuses_a_port_out_of_range_as_a_usage_error(tmp_path, capsys, port):
    """--port 99999 ended in a traceback (socket.bind's OverflowError), exit 1: a usage
    error now, exit 64, naming the range; nothing created."""
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", port, "--data-dir", str(tmp_path / "d")])
    assert exited.value.code == 64
    err = capsys.readouterr().err
    assert "Traceback" not in err and "0<=x<=65535" in err, err
    assert not (tmp_path / "d").exists()


def test_serve_needs_its_key_variable_set(tmp_path, capsys, monkeypatch):
    """--api-key-env naming an unset variable exits 1 and names the variable."""
    monkeypatch.delenv(KEY_VAR, raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "0", "--api-key-env", KEY_VAR, "--data-dir", str(tmp_path)])
    assert exited.value.code == 1
    assert KEY_VAR in capsys.readouterr().err


def test_serve_refuses_a_data_folder_in_use(tmp_path, capsys):
    """A second serve on a folder a running engine holds exits 3 (state locked)."""
    from batchspec.engine import Engine

    with Engine(tmp_path), pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "0", "--data-dir", str(tmp_path)])
    assert exited.value.code == 3
    assert "in use" in capsys.readouterr().err


def test_serve_in_process_answers_with_its_key_and_ends_cleanly_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``serve`` (what `batchspec serve` runs) in this process: it reports the URL once bound,
    refuses a request without the key from --api-key-env, answers one with it, and a SIGTERM
    ends it normally (the engine closed, so the next start finds its data folder free)."""
    import threading

    import httpx

    from batchspec.engine.server import ServeOptions, serve

    monkeypatch.setenv("SERVE_TEST_KEY", "sk-serve-in-process")
    seen: dict[str, object] = {}

    def probe(url: str, upstream: str) -> None:
        def run() -> None:
            try:
                seen["url"], seen["upstream"] = url, upstream
                wait_for(lambda: httpx.get(f"{url}/v1/batches").status_code == 401)
                answer = httpx.get(
                    f"{url}/v1/batches", headers={"Authorization": "Bearer sk-serve-in-process"}
                )
                seen["status"] = answer.status_code
            finally:
                os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=run, daemon=True).start()

    options = ServeOptions(port=0, data_dir=tmp_path / "engine", api_key_env="SERVE_TEST_KEY")
    serve(options, on_listening=probe)

    assert str(seen["url"]).startswith("http://127.0.0.1:")
    assert seen["status"] == 200
    assert "sk-serve-in-process" not in str(seen["upstream"])
    from batchspec.engine import BuiltinUpstream, Engine

    Engine(tmp_path / "engine", BuiltinUpstream()).close()  # the folder is free again


def test_a_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    """Binding a port something else listens on is a BatchspecError naming the port and what
    to do, not an OSError traceback; localhost and ::1 count as loopback, a name does not."""
    import socket

    from batchspec.engine.server import bind_socket, is_loopback
    from batchspec.errors import BatchspecError

    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    try:
        with pytest.raises(BatchspecError, match=f"Cannot listen on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
    finally:
        taken.close()
    assert is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("batch.example.com") and not is_loopback("10.0.0.1")


def test_serve_on_a_port_in_use_leaves_no_data_folder_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The port is bound before the data folder is made: a serve that cannot listen exits 1
    naming the port and leaves no engine folder (engine.db, engine.lock) where it would
    have served from."""
    import socket

    taken = socket.create_server(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    data = tmp_path / "state" / "serve"
    try:
        with pytest.raises(SystemExit) as exited:
            main(["serve", "--port", str(port), "--data-dir", str(data)])
    finally:
        taken.close()
    assert exited.value.code == 1
    assert f"Cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert not data.exists() and not (tmp_path / "state").exists()


def test_serve_refuses_to_be_its_own_upstream(tmp_path: Path) -> None:
    """`serve --port P --upstream http://localhost:P/v1` exits 64 before running any line,
    naming the loop and what to do, instead of failing every line with its own 404/401."""
    import socket

    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    itself = f"http://localhost:{port}/v1#rpm=60"
    proc = subprocess.run(
        [sys.executable, "-m", "batchspec", "serve", "--port", str(port),
         "--data-dir", str(tmp_path / "d"), "--upstream", "builtin", "--upstream", itself],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 64, proc.stderr
    assert f"--upstream http://localhost:{port}/v1 is this server itself" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("upstream", "host", "loops"),
    [
        pytest.param("http://127.0.0.1:8000/v1", "127.0.0.1", True, id="same"),
        pytest.param("http://u:p@localhost:8000", "0.0.0.0", True, id="all-addresses"),
        pytest.param("http://[::1]:8000/v1", "::1", True, id="ipv6"),
        pytest.param("http://gpu1:8000/v1", "gpu1", True, id="named-host"),
        pytest.param("http://127.0.0.1:8001/v1", "127.0.0.1", False, id="other-port"),
        pytest.param("http://gpu1:8000/v1", "127.0.0.1", False, id="other-host"),
        pytest.param("http://127.0.0.1/v1", "127.0.0.1", False, id="default-port-80"),
        pytest.param("builtin", "127.0.0.1", False, id="builtin"),
    ],
)
def test_an_upstream_is_this_server_when_its_port_and_host_are(upstream, host, loops) -> None:
    """The loop check matches the listening port and the host (loopback on loopback or on
    every address), never another port or machine, and never shows a password."""
    from batchspec.engine.server import refuse_itself_as_upstream
    from batchspec.errors import UsageError

    if not loops:
        refuse_itself_as_upstream([upstream], host, 8000)
        return
    with pytest.raises(UsageError, match="is this server itself") as raised:
        refuse_itself_as_upstream([upstream], host, 8000)
    assert "u:p@" not in str(raised.value)


def test_serve_plays_a_rate_limited_gateway_with_the_retry_after_asked(tmp_path: Path) -> None:
    """`serve --fault-api-429-from 2 --fault-api-429-count 2 --fault-api-retry-after 3`
    answers the 2nd and 3rd API requests with OpenAI's 429 envelope and Retry-After 3 s,
    and the others normally: the documented way to watch apply meet a rate limit."""
    import httpx

    proc, url = start_serve(
        tmp_path / "d",
        "--fault-api-429-from", "2", "--fault-api-429-count", "2",
        "--fault-api-retry-after", "3",
    )  # fmt: skip
    try:
        headers = {"Authorization": f"Bearer {SECRET}"}
        answers = [httpx.get(f"{url}/v1/batches", headers=headers) for _ in range(4)]
    finally:
        terminate(proc)
    assert [a.status_code for a in answers] == [200, 429, 429, 200]
    refused = answers[1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert (refused.headers["retry-after"], refused.headers["retry-after-ms"]) == ("3", "3000")


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        pytest.param(["--fault-api-429-from", "3"], "--fault-api-429-count", id="from-alone"),
        pytest.param(["--fault-api-429-count", "3"], "--fault-api-429-from", id="count-alone"),
    ],
)
def test_half_a_rate_limit_fault_is_a_usage_error(tmp_path: Path, given, missing) -> None:
    """One of the two --fault-api-429 flags alone (which would refuse nothing) exits 64
    naming the other, and serves nothing."""
    proc = subprocess.run(
        [sys.executable, "-m", "batchspec", "serve", "--port", "0",
         "--data-dir", str(tmp_path / "d"), *given],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 64, proc.stderr
    assert f"needs {missing} too" in proc.stderr


def test_serve_shows_an_upstream_back_in_rotation(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchspec serve` shows its engine's INFO lines on stderr while it runs, not only
    warnings: an upstream that answers again after a failure says "back in rotation" (before,
    an operator saw "out of rotation" and never that it came back); the handler goes when
    serve ends, so nothing else in the process prints the engine's log."""
    import logging

    from batchspec.cli.main import main
    from batchspec.engine import server

    def serving(opts: object, **_: object) -> None:  # stands in for the server's run
        logging.getLogger("batchspec.engine.balancer").info(
            "upstream %s answers again: back in rotation", "http://gpu1:8000/v1"
        )

    monkeypatch.setattr(server, "serve_from_cli_options", serving)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "0"])
    assert exited.value.code == 0
    assert "http://gpu1:8000/v1 answers again: back in rotation" in capsys.readouterr().err
    assert not logging.getLogger("batchspec.engine").handlers


@pytest.mark.parametrize("seconds", ["0", "-1"])
def test_a_request_timeout_of_zero_or_less_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seconds: str
) -> None:
    """`serve --request-timeout 0` (or less) exits 64 and serves nothing: it was accepted,
    and every line then failed with "did not answer within 0 s" after its attempts."""
    from batchspec.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "0", "--data-dir", str(tmp_path), "--request-timeout", seconds])
    assert exited.value.code == 64
    assert "--request-timeout" in capsys.readouterr().err
    assert not (tmp_path / "engine.db").exists() and not list(tmp_path.iterdir())


def test_concurrency_help_says_several_upstreams_share_it() -> None:
    """`serve --help` says --concurrency counts the requests to all upstreams together (the
    engine has one limit): a team giving each server's share would starve a rotation."""
    from click.testing import CliRunner

    from batchspec.cli.main import cli

    text = " ".join(CliRunner().invoke(cli, ["serve", "--help"]).output.split())
    assert "to all upstreams together" in text


@pytest.mark.parametrize("option", ["--api-key-env", "--upstream-api-key-env"])
@pytest.mark.parametrize(
    "given",
    [
        pytest.param("sk-proj-AbCdEf0123456789xyz", id="openai-style-key"),
        pytest.param("0123456789abcdef0123456789abcdef", id="hex-key"),
        pytest.param("c0ffee0123456789abcdef0123456789", id="hex-key-starting-with-a-letter"),
    ],
)
def test_a_key_given_where_its_variable_name_belongs_is_refused_unseen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, given: str
) -> None:
    """`serve --api-key-env $KEY` (the key itself, not its variable's name) exits 64 without
    showing it: before, the error quoted it twice ("export sk-...=..."), into CI logs."""
    from batchspec.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "0", "--data-dir", str(tmp_path), option, given])
    err = capsys.readouterr().err
    assert exited.value.code == 64
    assert given not in err and "NAME of the environment variable" in err


def test_serve_in_a_workspace_says_when_its_folder_is_the_local_providers(
    tmp_path, capsys, monkeypatch
):
    """`batchspec serve` run at a workspace's root with the default --data-dir (state/local)
    takes the built-in `local` provider's engine folder: it says so, and how to keep them
    apart (a new user's applies of local resources then exited 3 with no clue why); a
    folder of its own is said nothing of."""
    from batchspec.engine import Engine

    (tmp_path / "batchspec.yaml").write_text("apiVersion: batchspec/v1\nkind: Project\n")
    monkeypatch.chdir(tmp_path)
    for data_dir, warned in (("state/local", True), ("state/serve", False)):
        # held by an engine: serve stops at once (exit 3), after what it says first
        with Engine(tmp_path / data_dir), pytest.raises(SystemExit) as exited:
            main(["serve", "--port", "0", "--data-dir", data_dir])
        assert exited.value.code == 3
        err = capsys.readouterr().err
        assert ("engine data folder of provider 'local'" in err) is warned, err
        assert ("--data-dir state/serve" in err) is warned


def test_serve_in_a_workspaces_subfolder_says_where_its_default_folder_lands(
    tmp_path, capsys, monkeypatch
):
    """`batchspec serve` run in a workspace's subfolder (manifests/) with the default
    --data-dir makes state/local there, beside the manifests and outside the state folder
    every other command finds from there: it says so, and how to avoid it; a --data-dir
    given, or serve at the root, is said nothing of."""
    from batchspec.engine import Engine

    (tmp_path / "batchspec.yaml").write_text("apiVersion: batchspec/v1\nkind: Project\n")
    sub = tmp_path / "manifests"
    sub.mkdir()
    monkeypatch.chdir(sub)
    for args, warned in (([], True), (["--data-dir", "state/local"], False)):
        # held by an engine: serve stops at once (exit 3), after what it says first
        with Engine(sub / "state/local"), pytest.raises(SystemExit) as exited:
            main(["serve", "--port", "0", *args])
        assert exited.value.code == 3
        err = capsys.readouterr().err
        assert ("not at the workspace's root" in err) is warned, err
        assert (str(sub / "state/local") in err) is warned, err
