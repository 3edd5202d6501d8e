"""The PostgreSQL state backend: choosing it, its faults, and apply end to end on a real server.

The whole state suite (tests/test_state.py, tests/test_lock.py) already runs on both backends;
this file pins what only a database server has: URLs in the project file and on the command
line, passwords never shown, a missing driver, refused or lost connections, a server that
stops answering (frozen with SIGSTOP, or a listener that never speaks), foreign tables, and
`batchspec apply --wait` against `batchspec serve` with the state in PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from postgres import PASSWORD, Cluster
from probes import ProbedServer, start_serve_process
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    run_cli,
    served,
)

from batchspec.errors import StateError
from batchspec.state.runinfo import RunInfo
from batchspec.state.store import StateStore
from batchspec.storage.answer_watch import ANSWER_TIMEOUT_ENV, answer_timeout_from_env
from batchspec.storage.database_url import is_database_url, misencoded, redact_url, scrub
from batchspec.storage.sql import (
    KEEPALIVE_OPTIONS,
    DatabaseUnavailableError,
    IntegrityError,
    to_pyformat,
)

INFO = RunInfo("alice", "build-1", 1, None, None, None, None, None, "0.1.0")
FAST = ["--poll-interval", "0.05"]


@pytest.fixture(autouse=True)
def project_file(tmp_path: Path) -> None:
    """Every command here runs inside a workspace (a test may write its own project file)."""
    (tmp_path / "batchspec.yaml").write_text("apiVersion: batchspec/v1\nkind: Project\n")


def one_line_without_password(err: str) -> str:
    """The error output is one line and never holds the test cluster's password."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert PASSWORD not in err
    return lines[0]


# -- URLs, without a server --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown", "password"),
    [
        pytest.param("postgresql://u:s3cret@h:5432/db", "postgresql://u:***@h:5432/db", "s3cret"),
        pytest.param(
            "postgres://h/db?password=s3cret&x=1", "postgres://h/db?password=***&x=1", "s3cret"
        ),
        pytest.param("postgresql://u@h/db", "postgresql://u@h/db", None),
        pytest.param("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db", "p@ss"),
        # a password left unencoded with a / ? or # in it (as libpq reads it: up to the @)
        pytest.param("postgresql://u:ab/s3cret@h:5/db", "postgresql://u:***@h:5/db", "ab/s3cret"),
        pytest.param("postgresql://u:ab?s3cret@h/db", "postgresql://u:***@h/db", "ab?s3cret"),
        pytest.param("postgresql://u:ab#s3cret@h/db", "postgresql://u:***@h/db", "ab#s3cret"),
        pytest.param(
            "postgres://h/db?PASSWORD=s3cret&x=1", "postgres://h/db?PASSWORD=***&x=1", "s3cret"
        ),
    ],
)
def test_urls_are_shown_without_their_password(url: str, shown: str, password: str | None) -> None:
    """redact_url keeps user, host, database and options, and hides the password; scrub takes
    it (raw or percent-encoded) out of any text, such as a driver's message."""
    assert redact_url(url) == shown
    if password is not None:
        text = scrub(f"failed for {url}: password {password}, or {url.split('@')[0]}", url)
        assert password not in text and "s3cret" not in text and "p%40ss" not in text


def test_only_urls_libpq_would_misread_are_refused_as_misencoded() -> None:
    """An unencoded '@' or '/' in the password is refused; '@' in the query, ? or # in the
    password, encoded characters, IPv6 hosts and several hosts are read as written and pass."""
    assert misencoded("postgresql://u:s3c@ret@h:5/db") and misencoded("postgresql://u:ab/cd@h/db")
    for url in (
        "postgresql://u:p%40s%2Fs@h:5/db",
        "postgresql://u:pa?ss@h/db",
        "postgresql://u:pw@h/db?application_name=a@b",
        "postgresql://u:pw@[::1]:5432/db",
        "postgresql://u:pw@h1:5,h2:6/db?options=-csearch_path%3Dx",
        "postgresql:///db?host=/tmp",
    ):
        assert misencoded(url) is None, url


def test_only_postgres_schemes_are_database_urls() -> None:
    """A path (even one with a colon) stays a path; only postgres(ql):// is a URL."""
    assert is_database_url("postgresql://h/db") and is_database_url("POSTGRES://h/db")
    assert not is_database_url("state/batchspec.db")
    assert not is_database_url("C:/state.db") and not is_database_url("sqlite:///x.db")


def test_placeholders_are_translated_outside_literals_only() -> None:
    """? becomes %s, a literal % is doubled, and a ? inside quotes is left alone."""
    sql = "SELECT '?%' AS \"a?\" FROM t WHERE x = ? AND y LIKE '%z'"
    assert to_pyformat(sql) == "SELECT '?%%' AS \"a?\" FROM t WHERE x = %s AND y LIKE '%%z'"


def test_a_password_in_the_project_file_is_refused_and_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """state.url with a password fails validation at its line, naming urlEnv, password hidden."""
    (tmp_path / "batchspec.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Project\nstate:\n  url: postgresql://ci:hunter2@db/x\n"
    )
    code, out, err = run_cli(["validate", str(tmp_path)], capsys)
    assert code == 1
    assert "batchspec.yaml:4:8" in err and "urlEnv" in err
    assert "hunter2" not in out + err


def test_url_env_that_is_not_set_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """state.urlEnv naming an unset variable: exit 1, naming the variable to export."""
    monkeypatch.delenv("BATCHSPEC_STATE_URL", raising=False)
    (tmp_path / "batchspec.yaml").write_text(
        "apiVersion: batchspec/v1\nkind: Project\nstate:\n  urlEnv: BATCHSPEC_STATE_URL\n"
    )
    code, _, err = run_cli(["status", str(tmp_path)], capsys)
    assert code == 1
    assert "BATCHSPEC_STATE_URL is not set" in one_line_without_password(err)


def test_a_missing_driver_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without psycopg, a PostgreSQL state is one line naming the extra to install."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg -> ImportError
    url = "postgresql://ci:hunter2@127.0.0.1:1/x"
    code, _, err = run_cli(["status", str(tmp_path), "--state", url], capsys)
    assert code == 1
    line = one_line_without_password(err)
    assert "pip install 'batchspec[postgres]'" in line and "hunter2" not in line


# -- faults against a real server ----------------------------------------------------------------


def test_connection_faults_are_one_line_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_cluster: Cluster
) -> None:
    """Refused connection, wrong password, missing database, bad port, a search_path naming
    no schema that exists: exit 1, one line each."""
    cases = {
        "refused": "postgresql://batchspec:" + PASSWORD + "@127.0.0.1:1/tests",
        "refused the user name or password": postgres_cluster.url(password="wrong-" + PASSWORD),
        'database "nope" does not exist': postgres_cluster.url("nope"),
        "not valid": f"postgresql://batchspec:{PASSWORD}@127.0.0.1:{postgres_cluster.port}/x?bogus=1",
        # a password with an unencoded / (base64 ones have them): libpq would misread the URL
        "write '@' as %40 and '/' as %2F": f"postgresql://batchspec:{PASSWORD}/x@127.0.0.1:{postgres_cluster.port}/x",
        "refused the user name": f"postgresql://batchspec:{PASSWORD}?x@127.0.0.1:{postgres_cluster.port}/x",
    }
    missing_schema = postgres_cluster.url("tests") + "?options=-csearch_path%3Dnot_made"
    postgres_cluster.tests_db()  # the database exists; its schema not_made does not
    cases["its search_path (not_made) names none that exists"] = missing_schema
    for expected, url in cases.items():
        code, _, err = run_cli(["status", str(tmp_path), "--state", url], capsys)
        assert code == 1, (expected, err)
        assert expected in one_line_without_password(err), err
    assert not (tmp_path / "state").exists()  # no SQLite file made in its place


def test_a_password_with_an_unencoded_at_sign_is_refused_and_no_piece_of_it_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_cluster: Cluster
) -> None:
    """An '@' left unencoded in the password: libpq would send the rest of the password as the
    host name (and the message would print it); refused, exit 1, saying to write it as %40."""
    url = f"postgresql://batchspec:{PASSWORD}@tailOfSecret@127.0.0.1:{postgres_cluster.port}/x"
    for command in (["status", str(tmp_path)], ["state", "export", str(tmp_path / "a.db")]):
        code, out, err = run_cli([*command, "--state", url], capsys)
        assert code == 1, err
        line = one_line_without_password(err)
        assert "tailOfSecret" not in out + err
        assert "write '@' as %40" in line and "127.0.0.1" in line
    assert not (tmp_path / "state").exists()


def test_a_newer_schema_is_refused_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_url: str
) -> None:
    """A database recording an unknown migration: exit 1, 'newer batchspec', no password."""
    with StateStore.open(postgres_url) as store:
        store.db.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
            "VALUES ('batchspec', 'm999_future', 'x')"
        )
    code, _, err = run_cli(["status", str(tmp_path), "--state", postgres_url], capsys)
    assert code == 1
    assert "newer batchspec" in one_line_without_password(err)


def test_a_database_with_foreign_tables_of_our_names_is_refused(postgres_url: str) -> None:
    """Tables named like ours but no batchspec history: refused, nothing written."""
    with StateStore.open(postgres_url) as store:
        store.db.execute("DROP TABLE _sqlite_migrations")
    with pytest.raises(StateError, match="no batchspec migration history"):
        StateStore.open(postgres_url)


def test_events_cannot_be_truncated(postgres_url: str) -> None:
    """PostgreSQL's TRUNCATE skips row triggers, so events refuse it with a statement trigger."""
    with StateStore.open(postgres_url) as store:
        store.record_event(None, "kept")
        with pytest.raises(IntegrityError, match="append-only: TRUNCATE"):
            store.db.execute("TRUNCATE events")
        assert [e.action for e in store.events()] == ["kept"]


def test_a_connection_lost_mid_run_is_one_line_and_rolls_back(
    postgres_url: str, postgres_cluster: Cluster
) -> None:
    """The server ending the session inside a transaction: a clear error, nothing written."""
    with StateStore.open(postgres_url) as store:
        pid = store.db.execute("SELECT pg_backend_pid()").fetchone()[0]
        lost = pytest.raises(DatabaseUnavailableError, match="lost the connection")
        with lost as caught, store.atomic():
            store.start_run("apply", {}, INFO)
            postgres_cluster.tests_db().execute(f"SELECT pg_terminate_backend({pid})")
            store.record_event(None, "after the server went away")
    assert PASSWORD not in str(caught.value) and "\n" not in str(caught.value)
    with StateStore.open(postgres_url) as store:
        assert store.runs() == [] and store.events() == []


def test_a_session_ended_by_the_server_says_who_ends_sessions_every_time(
    postgres_url: str, postgres_cluster: Cluster
) -> None:
    """A session ended with pg_terminate_backend (what `unlock --force` does to a holder)
    names that cause, on the first statement after it and on later ones (which psycopg only
    reports as "the connection is closed"), never only the bare driver text."""
    with StateStore.open(postgres_url) as store:
        pid = store.db.execute("SELECT pg_backend_pid()").fetchone()[0]
        postgres_cluster.tests_db().execute(f"SELECT pg_terminate_backend({pid}, 5000)")
        for _ in range(2):
            with pytest.raises(DatabaseUnavailableError) as caught:
                store.runs()
            message = str(caught.value)
            assert "the server ended this session" in message, message
            assert "batchspec unlock ID --force" in message and "lost the connection" in message


# -- end to end ----------------------------------------------------------------------------------


def test_apply_wait_against_serve_keeps_the_state_in_postgres(
    tmp_path: Path, postgres_url: str
) -> None:
    """`batchspec apply --wait` (a real process) against `batchspec serve`, with the state in
    PostgreSQL named by state.urlEnv: results complete, batches recorded in the database, no
    SQLite file made; a second apply changes nothing and creates no batch."""
    proc = start_serve_process(tmp_path / "engine", api_key=SENTINEL_KEY)
    try:
        ws = served(tmp_path / "ws", proc, ResourceSpec("triage", count=5))
        project = yaml.safe_load((ws.root / "batchspec.yaml").read_text())
        project["state"] = {"urlEnv": "BATCHSPEC_STATE_URL"}
        (ws.root / "batchspec.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
        env = {**os.environ, KEY_ENV: SENTINEL_KEY, "BATCHSPEC_STATE_URL": postgres_url}
        run = lambda *args: subprocess.run(  # noqa: E731
            batchspec_cmd(*args), env=env, capture_output=True, text=True, timeout=120
        )
        first = run("apply", str(ws.root), "--wait", "--yes", *FAST)
        assert first.returncode == 0, first.stderr
        assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
        assert not ws.state_path.exists()
        with StateStore.open(postgres_url) as store:
            [row] = store.batches()
            assert (row.status, row.completed) == ("completed", 5)
            assert [r.name for r in store.list_resources()] == ["triage"]
        [batch] = proc.client().batches.list().data
        assert batch.id == row.remote_id

        again = run("apply", str(ws.root), "--wait", "--yes", *FAST)
        assert again.returncode == 0, again.stderr
        assert len(proc.client().batches.list().data) == 1
        status = run("status", str(ws.root))
        assert status.returncode == 0 and "triage" in status.stdout
        for out in (first, again, status):
            assert PASSWORD not in out.stdout + out.stderr
    finally:
        proc.stop()


def test_state_url_on_the_command_line_overrides_the_project(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], postgres_url: str
) -> None:
    """--state URL (or BATCHSPEC_STATE) opens PostgreSQL even where the project names a file."""
    ws_root = tmp_path / "ws"
    ws_root.mkdir()
    with StateStore.open(postgres_url) as store:
        store.upsert_resource("recorded", provider="p", manifest="m.yaml", labels={}, run_id=None)
    code, out, err = run_cli(["status", str(ws_root), "--state", postgres_url], capsys)
    assert code == 0, err
    assert "recorded" in out
    assert not (ws_root / "state").exists()


def _tcp_options(store: StateStore) -> dict[str, str]:
    """The libpq options the store's connection was opened with, of the TCP settings."""
    options = {o.keyword.decode(): (o.val or b"").decode() for o in store.db.conn.pgconn.info}
    return {k: options[k] for k in KEEPALIVE_OPTIONS}


def test_a_dropped_network_is_noticed_within_a_minute_unless_the_url_says_otherwise(
    postgres_url: str,
) -> None:
    """The state connection asks for TCP keepalives and a 60 s cap on unacknowledged data (a
    silently dropped network fails the next statement instead of hanging a CI job for the
    kernel's 2 h / 15 min); a URL that sets one of them keeps its own value."""
    with StateStore.open(postgres_url) as store:
        assert _tcp_options(store) == KEEPALIVE_OPTIONS
    separator = "&" if "?" in postgres_url else "?"
    with StateStore.open(f"{postgres_url}{separator}keepalives_idle=5") as store:
        assert _tcp_options(store) == {**KEEPALIVE_OPTIONS, "keepalives_idle": "5"}


def test_the_urls_connect_timeout_is_kept(postgres_url: str) -> None:
    """A URL's own connect_timeout is libpq's, not replaced by batchspec's default (10 s)."""
    separator = "&" if "?" in postgres_url else "?"
    with StateStore.open(f"{postgres_url}{separator}connect_timeout=7") as store:
        options = {o.keyword: o.val for o in store.db.conn.pgconn.info}
        assert options[b"connect_timeout"] == b"7"


# -- a server that stops answering ---------------------------------------------------------------

#: seconds the state database may go without answering, in these tests
ANSWER_SECONDS = "0.3"


def apply_held_at_its_create(
    ws: Workspace, srv: ProbedServer, url: str, env: dict[str, str]
) -> tuple[subprocess.Popen[str], threading.Event]:
    """``apply`` of ``ws`` on the state at ``url``, in a child whose create the server holds
    (answered once ``srv.probe.release_all()``); and the event set when the create arrives.
    The child hears SIGINT as Ctrl-C even where this process ignores it (xdist's workers:
    an ignored signal stays ignored across exec, a caught one is reset)."""
    created = srv.probe.hold("POST /batches", 30, after=True)
    heard = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        apply = subprocess.Popen(
            batchspec_cmd("apply", str(ws.root), "--yes", "--state", url),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        signal.signal(signal.SIGINT, heard)
    return apply, created


def test_a_frozen_server_stops_apply_in_seconds_and_the_next_apply_pays_nothing_twice(
    tmp_path: Path,
    postgres_url: str,
    postgres_cluster: Cluster,
    server: Callable[..., ProbedServer],
) -> None:
    """The server's processes stopped (SIGSTOP: TCP still ACKs, keepalives never fire) while
    apply waits for its create: apply stops within seconds, exit 1, one line naming the server
    and saying it stopped answering; once the server resumes, the next apply adopts the batch
    created meanwhile and creates none."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    env = {**os.environ, KEY_ENV: SENTINEL_KEY, ANSWER_TIMEOUT_ENV: ANSWER_SECONDS}
    apply, created = apply_held_at_its_create(ws, srv, postgres_url, env)
    try:
        assert created.wait(30), "the create never reached the server"
        with postgres_cluster.frozen():
            srv.probe.release_all()  # apply goes on to record the batch it created
            started = time.monotonic()
            try:
                _, err = apply.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail("apply still waits for the frozen server after 10 s")
            elapsed = time.monotonic() - started
    finally:
        if apply.poll() is None:
            apply.kill()
            apply.communicate()
    assert apply.returncode == 1, err
    line = one_line_without_password(err)
    assert "stopped answering" in line and redact_url(postgres_url) in line, line
    assert elapsed < 5, elapsed
    again = subprocess.run(
        batchspec_cmd("apply", str(ws.root), "--yes", "--wait", "--state", postgres_url, *FAST),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr
    assert srv.batch_count() == 1
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")


def test_ctrl_c_while_the_state_server_is_frozen_is_said_once_and_exits_130(
    tmp_path: Path,
    postgres_url: str,
    postgres_cluster: Cluster,
    server: Callable[..., ProbedServer],
) -> None:
    """Ctrl-C while apply waits for a frozen server: psycopg gives up cancelling the query
    and closes the connection; recording the interruption on it failed, and that failure
    replaced the interruption (exit 1, "lost the connection"), beside psycopg's own bare log
    lines. Now: exit 130 and the one "Interrupted" line."""
    srv = server()
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage", count=3))
    env = {**os.environ, KEY_ENV: SENTINEL_KEY, ANSWER_TIMEOUT_ENV: "60"}
    apply, created = apply_held_at_its_create(ws, srv, postgres_url, env)
    try:
        assert created.wait(30), "the create never reached the server"
        with postgres_cluster.frozen():
            srv.probe.release_all()
            time.sleep(0.5)  # apply now waits for the frozen server to record the batch
            apply.send_signal(signal.SIGINT)
            _, err = apply.communicate(timeout=60)
    finally:
        if apply.poll() is None:
            apply.kill()
            apply.communicate()
    lines = [line for line in err.splitlines() if line.strip()]
    assert apply.returncode == 130, err
    assert len(lines) == 1 and lines[0].startswith("Interrupted"), err


def test_a_listener_that_never_answers_fails_the_connect_in_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that accepts TCP and never speaks PostgreSQL: the connect gives up within the
    answer timeout (libpq's minimum, 2 s), not batchspec's default 10 s; one line, exit 1."""
    monkeypatch.setenv(ANSWER_TIMEOUT_ENV, ANSWER_SECONDS)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        url = f"postgresql://ci:{PASSWORD}@127.0.0.1:{port}/x"
        started = time.monotonic()
        code, _, err = run_cli(["status", str(tmp_path), "--state", url], capsys)
        elapsed = time.monotonic() - started
    assert code == 1
    line = one_line_without_password(err)
    assert f"127.0.0.1:{port}" in line and "did not answer within 2 s" in line, line
    # what set the 2 s is named: the URL holds no connect_timeout to look for
    assert f"by default 10, or {ANSWER_TIMEOUT_ENV} when shorter" in line, line
    assert elapsed < 4, elapsed


def test_a_lock_waited_for_longer_than_the_answer_timeout_is_not_cut(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement waiting for a lock on a live server (the writer lock, held by another
    session for 3 answer timeouts) waits on and succeeds: the server still answers."""
    import psycopg

    monkeypatch.setenv(ANSWER_TIMEOUT_ENV, ANSWER_SECONDS)
    with StateStore.open(postgres_url) as store, psycopg.connect(postgres_url) as other:
        key = store.db.advisory_key("writer")  # type: ignore[attr-defined]
        other.execute("SELECT pg_advisory_lock(%s)", (key,))
        hold = 3 * float(ANSWER_SECONDS)
        threading.Timer(hold, other.execute, ("SELECT pg_advisory_unlock_all()",)).start()
        started = time.monotonic()
        store.record_event(None, "after the wait")  # waits for the writer lock
        assert time.monotonic() - started >= hold * 0.9
        assert [e.action for e in store.events()] == ["after the wait"]


def test_a_heartbeat_to_a_frozen_server_says_it_stopped_answering_not_lock_lost(
    postgres_url: str, postgres_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lock heartbeat sent to a frozen server fails within seconds saying the server stopped
    answering, not that the lock was released or taken over (it was neither)."""
    from batchspec.state.lock import acquire_lock

    monkeypatch.setenv(ANSWER_TIMEOUT_ENV, ANSWER_SECONDS)
    with StateStore.open(postgres_url) as store:
        handle = acquire_lock(store, command="apply", info=INFO, resources=["a"])
        with postgres_cluster.frozen(), pytest.raises(StateError) as caught:
            handle.heartbeat()
        assert "stopped answering" in str(caught.value), caught.value
        handle.release()


def test_the_answer_timeout_must_be_a_number_of_seconds() -> None:
    """BATCHSPEC_STATE_ANSWER_TIMEOUT: seconds (fractions too), 0 for no limit; anything else
    is one clear error naming the variable, before any connection."""
    assert answer_timeout_from_env({}) == 60
    assert answer_timeout_from_env({ANSWER_TIMEOUT_ENV: "2.5"}) == 2.5
    assert answer_timeout_from_env({ANSWER_TIMEOUT_ENV: "0"}) == 0
    for bad in ("soon", "-1", "inf", "nan"):
        with pytest.raises(StateError, match=ANSWER_TIMEOUT_ENV):
            answer_timeout_from_env({ANSWER_TIMEOUT_ENV: bad})
