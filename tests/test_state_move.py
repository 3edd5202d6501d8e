"""Moving the state: `batchspec state migrate --to URL|PATH` and `batchspec state export FILE.db`.

Against a real PostgreSQL cluster (tests/postgres.py) and a real `batchspec serve` process:
a round trip SQLite -> PostgreSQL -> SQLite keeps every row, the migrated state is usable (a
re-apply creates nothing), and every refusal or fault is one line, exit 1, nothing written,
the source untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from postgres import PASSWORD, Cluster
from probes import ServeProcess, start_serve_process
from servers import stop_after_test
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, Workspace, run_cli, served

from batchspec.errors import StateError
from batchspec.state.lock import acquire_lock
from batchspec.state.runinfo import RunInfo
from batchspec.state.store import StateStore
from batchspec.state.transfer import COPIED_TABLES, copy_state, referenced_blobs, table_columns

FAST = ["--poll-interval", "0.05"]
INFO = RunInfo("alice", "build-1", 1, None, None, None, None, None, "0.1.0")
ALL_TABLES = [*(t for t, _ in COPIED_TABLES), "state_serial", "resource_locks"]


def dump(location: Path | str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the state at ``location`` (the migrations table aside),
    sorted, as plain tuples: what must survive a move unchanged."""
    columns = {
        **table_columns(),
        "state_serial": ["id", "value"],
        "resource_locks": ["resource", "holder_id"],
    }
    with StateStore.open(location) as store:
        return {
            table: sorted(
                (
                    tuple(row.values())
                    for row in store.db.query(
                        f"SELECT {', '.join(repr_column(c) for c in columns[table])} FROM {table}"
                    )
                ),
                key=repr,
            )
            for table in ALL_TABLES
        }


def repr_column(column: str) -> str:
    return f'"{column}"' if column in ("user", "offset") else column


def file_hash(path: Path) -> str:
    """The SQLite file and its side files, hashed: unchanged means untouched."""
    digest = hashlib.sha256()
    for part in sorted(path.parent.glob(path.name + "*")):
        digest.update(part.name.encode() + part.read_bytes())
    return digest.hexdigest()


def one_line_without_password(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert PASSWORD not in err
    return lines[0]


def postgres_tables(url: str, cluster: Cluster) -> list[str]:
    """The tables in the URL's schema, read without batchspec (which would create some)."""
    schema = url.rsplit("search_path%3D", 1)[-1]
    rows = (
        cluster.tests_db()
        .execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        )
        .fetchall()
    )
    return sorted(r[0] for r in rows)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[ServeProcess]:
    proc = start_serve_process(tmp_path / "engine", api_key=SENTINEL_KEY)
    yield proc
    stop_after_test([proc])


@pytest.fixture
def applied(
    tmp_path: Path,
    serve: ServeProcess,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> Workspace:
    """A workspace whose state holds a real `apply --wait` against `batchspec serve`."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    monkeypatch.chdir(tmp_path)
    ws = served(tmp_path / "ws", serve, ResourceSpec("triage", count=4), ResourceSpec("tags"))
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    monkeypatch.chdir(ws.root)
    return ws


def cli_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    code, out, err = run_cli([*argv, "--json"], capsys)
    assert code == 0, err
    return json.loads(out)


# -- the round trip ------------------------------------------------------------------------------


def test_round_trip_through_postgres_keeps_every_row_and_the_state_usable(
    tmp_path: Path,
    applied: Workspace,
    serve: ServeProcess,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SQLite -> PostgreSQL -> SQLite after a real apply: every table's rows (ids, serial,
    audit log) identical at each step, status and history --json the same read from any of
    the three, the source file untouched; a re-apply on the migrated state creates no batch
    and records its run under the next id (the identity sequences moved past the copy)."""
    ws = applied
    source = dump(ws.state_path)
    assert source["events"] and source["requests"] and source["state_serial"][0][1] > 0
    status = cli_json(["status"], capsys)
    history = cli_json(["history"], capsys)
    before = file_hash(ws.state_path)

    report = cli_json(["state", "migrate", "--to", postgres_url], capsys)
    assert report["tables"] == {t: len(source[t]) for t, _ in COPIED_TABLES}
    assert report["state_serial"] == source["state_serial"][0][1]
    assert report["blobs"]["verified"] == report["blobs"]["referenced"] > 0
    assert report["blobs"]["missing"] == [] and PASSWORD not in json.dumps(report)
    assert dump(postgres_url) == source
    assert file_hash(ws.state_path) == before  # nothing of the source changed
    with StateStore.open(postgres_url) as store, ws.store() as original:
        assert referenced_blobs(store.db) == referenced_blobs(original.db)

    back = tmp_path / "back" / "batchspec.db"
    argv = ["state", "migrate", "--state", postgres_url, "--to", str(back)]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "Migrated the state" in out and f"state: {{path: {back}}}" in out
    assert dump(back) == source
    copied = {p.name for p in (back.parent / "store").rglob("*") if p.is_file()}
    with StateStore.open(back) as store:  # the blobs went beside the new file
        assert copied >= set(referenced_blobs(store.db)) != set()

    for where in (postgres_url, str(back)):
        assert cli_json(["status", "--state", where], capsys) == status
        assert cli_json(["history", "--state", where], capsys) == history

    batches = len(serve.client().batches.list().data)
    code, _, err = run_cli(
        ["apply", str(ws.root), "--wait", "--yes", "--state", postgres_url, *FAST], capsys
    )
    assert code == 0, err
    assert len(serve.client().batches.list().data) == batches  # nothing created again
    with StateStore.open(postgres_url) as store:
        runs = [r.id for r in store.runs()]
    assert sorted(runs) == sorted([r[0] for r in source["runs"]] + [max(runs)])
    assert max(runs) == max(r[0] for r in source["runs"]) + 1


def test_migrate_text_says_how_to_switch_and_never_shows_the_password(
    applied: Workspace, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The human output: the row counts, the urlEnv to set, the URL without its password;
    batchspec.yaml is left as it was."""
    project_file = (applied.root / "batchspec.yaml").read_text()
    code, out, err = run_cli(["state", "migrate", "--to", postgres_url], capsys)
    assert code == 0, err
    assert "events" in out and "state_serial" in out and "checked by sha256" in out
    assert "state: {urlEnv: BATCHSPEC_STATE_URL}" in out
    assert PASSWORD not in out + err and ":***@" in out
    assert (applied.root / "batchspec.yaml").read_text() == project_file


# -- refusals and faults -------------------------------------------------------------------------


def test_a_non_empty_target_is_refused_and_nothing_is_written(
    applied: Workspace, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A PostgreSQL state with a row, or an existing SQLite file: one line, exit 1, the
    target and the source exactly as they were."""
    with StateStore.open(postgres_url) as store:
        store.upsert_resource("other", provider="p", manifest="m.yaml", labels={}, run_id=None)
    target_before = dump(postgres_url)
    source_before = file_hash(applied.state_path)
    code, _, err = run_cli(["state", "migrate", "--to", postgres_url], capsys)
    assert code == 1
    assert "is not empty" in one_line_without_password(err)
    assert dump(postgres_url) == target_before

    existing = applied.root / "elsewhere.db"
    existing.write_bytes(b"precious")
    code, _, err = run_cli(["state", "migrate", "--to", str(existing)], capsys)
    assert code == 1
    assert "exists already" in one_line_without_password(err)
    assert existing.read_bytes() == b"precious"
    assert file_hash(applied.state_path) == source_before


def test_connection_faults_are_one_line_without_the_password(
    applied: Workspace, postgres_cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    """Wrong password, refused connection, a bad URL, another scheme: exit 1, one line
    each, no password, and the source file untouched."""
    before = file_hash(applied.state_path)
    cases = {
        "refused the user name or password": postgres_cluster.url(password="wrong-" + PASSWORD),
        "connection was refused": f"postgresql://batchspec:{PASSWORD}@127.0.0.1:1/tests",
        "not valid": postgres_cluster.url() + "?bogus=1",
        "mysql:// URL": f"mysql://batchspec:{PASSWORD}@127.0.0.1/x",
    }
    for expected, url in cases.items():
        code, _, err = run_cli(["state", "migrate", "--to", url], capsys)
        assert code == 1, (expected, err)
        assert expected in one_line_without_password(err), err
    assert file_hash(applied.state_path) == before


def test_a_newer_schema_is_refused_on_either_side(
    tmp_path: Path, applied: Workspace, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target or a source written by a newer batchspec: one line naming it, exit 1."""
    with StateStore.open(postgres_url) as store:
        store.db.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
            "VALUES ('batchspec', 'm999_future', 'x')"
        )
    code, _, err = run_cli(["state", "migrate", "--to", postgres_url], capsys)
    assert code == 1
    assert "newer batchspec" in one_line_without_password(err)

    code, _, err = run_cli(
        ["state", "migrate", "--state", postgres_url, "--to", str(tmp_path / "x.db")], capsys
    )
    assert code == 1
    assert "newer batchspec" in one_line_without_password(err)
    assert not (tmp_path / "x.db").exists()


def test_a_failure_after_the_rows_are_in_leaves_the_target_empty(
    applied: Workspace,
    postgres_url: str,
    postgres_cluster: Cluster,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A damaged result blob is found after every row was inserted: the whole transaction,
    schema included, rolls back (the schema has no table), and the source is untouched."""
    with applied.store() as store:
        sha = referenced_blobs(store.db)[0]
    blob = applied.state_path.parent / "store" / sha[:2] / sha
    blob.write_bytes(blob.read_bytes() + b"tampered")
    before = file_hash(applied.state_path)
    code, _, err = run_cli(["state", "migrate", "--to", postgres_url], capsys)
    assert code == 1
    assert "is damaged" in one_line_without_password(err)
    assert postgres_tables(postgres_url, postgres_cluster) == []
    assert file_hash(applied.state_path) == before

    target = applied.root / "new" / "batchspec.db"
    code, _, err = run_cli(["state", "migrate", "--to", str(target)], capsys)
    assert code == 1 and "is damaged" in err
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_a_run_holding_the_lock_makes_migrate_exit_3(
    applied: Workspace, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """While another run holds the source's lock, migrate waits --lock-timeout, then exits
    3 naming the holder; the target stays empty."""
    with applied.store() as store, acquire_lock(store, command="apply", info=INFO):
        code, _, err = run_cli(
            ["state", "migrate", "--to", postgres_url, "--lock-timeout", "0.2"], capsys
        )
    assert code == 3, err
    assert "locked" in err and "apply" in err
    assert dump(postgres_url)["runs"] == []


def test_a_busy_sqlite_source_makes_migrate_exit_3_at_its_lock_timeout(
    tmp_path: Path,
    applied: Workspace,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another connection inside a write transaction on the SQLite source: `state migrate
    --lock-timeout 2` exits 3 once that is over (the busy timeout made 1 s here, 30 s in
    use: the longer of the two is waited), naming the wait (it exited 1); nothing is
    written."""
    import batchspec.state.connection as connection

    monkeypatch.setattr(connection, "BUSY_TIMEOUT_SECONDS", 1.0)
    target = tmp_path / "copy.db"
    holder = sqlite3.connect(applied.state_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        began = time.monotonic()
        code, _, err = run_cli(
            ["state", "migrate", "--to", str(target), "--lock-timeout", "2"], capsys
        )
        took = time.monotonic() - began
    finally:
        holder.close()
    assert code == 3, err
    assert 2 <= took < 10, took
    assert "stayed busy for 2 s" in err and "--lock-timeout" in err
    assert not target.exists()


# -- export --------------------------------------------------------------------------------------


def test_export_writes_one_sqlite_file_with_the_same_events(
    tmp_path: Path, applied: Workspace, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`state export` from SQLite and from PostgreSQL: a single file (no WAL) that sqlite3
    opens read-only, whose events (and every table) equal the source's; the source file is
    untouched; an existing file is refused unless --force."""
    before = file_hash(applied.state_path)
    out_file = tmp_path / "audit" / "copy.db"
    report = cli_json(["state", "export", str(out_file)], capsys)
    assert report["tables"]["events"] > 0
    assert file_hash(applied.state_path) == before
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["copy.db"]

    def events(path: Path | str) -> list[tuple[Any, ...]]:
        if path == out_file:  # plain sqlite3, read-only: no batchspec in between
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
                return conn.execute("SELECT * FROM events ORDER BY id").fetchall()
            finally:
                conn.close()
        with StateStore.open(path) as store:
            return [tuple(r.values()) for r in store.db.query("SELECT * FROM events ORDER BY id")]

    assert events(out_file) == events(applied.state_path)
    assert dump(out_file) == dump(applied.state_path)

    code, _, err = run_cli(["state", "export", str(out_file)], capsys)
    line = one_line_without_password(err)
    assert code == 1 and "exists already" in line and "--force" in line

    cli_json(["state", "migrate", "--to", postgres_url], capsys)
    with StateStore.open(postgres_url) as store:
        store.record_event(None, "only in postgres")
    code, out, err = run_cli(
        ["state", "export", str(out_file), "--state", postgres_url, "--force"], capsys
    )
    assert code == 0, err
    assert "Exported the state" in out and PASSWORD not in out + err
    assert events(out_file) == events(postgres_url)
    assert events(out_file)[-1][6] == "only in postgres"


def test_export_refuses_to_write_over_the_state_itself(
    applied: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    """`state export state/batchspec.db --force` would replace the state: refused, untouched."""
    before = file_hash(applied.state_path)
    code, _, err = run_cli(["state", "export", str(applied.state_path), "--force"], capsys)
    assert code == 1
    assert "the state itself" in one_line_without_password(err)
    assert file_hash(applied.state_path) == before


@pytest.mark.parametrize(
    "args",
    [["state", "export", "--force"], ["state", "export"], ["state", "migrate", "--to"]],
    ids=["export-force", "export", "migrate"],
)
def test_a_device_or_fifo_is_never_replaced_by_the_state_s_copy(
    applied: Workspace, capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str]
) -> None:
    """`state export /dev/null --force` (here a FIFO, as a device needs root) replaced the
    node with an SQLite file and said "Exported" (as root, /dev/null gone for the machine);
    without --force it offered --force. Refused in one line, exit 1, the node left as it was."""
    import os
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code, _, err = run_cli([*args, str(fifo)], capsys)
    line = one_line_without_password(err)
    assert code == 1 and "is not a regular file" in line and "--force" not in line, line
    assert stat.S_ISFIFO(fifo.lstat().st_mode)


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
@pytest.mark.parametrize("via_symlink", [False, True], ids=["direct", "symlink"])
def test_export_refuses_to_write_over_the_states_companion_files(
    applied: Workspace,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    suffix: str,
    via_symlink: bool,
) -> None:
    """`state export state/batchspec.db-wal --force` (or -shm, -journal, or a symlink to one)
    would replace the live state's companion file: refused in one line, exit 1, untouched."""
    companion = applied.state_path.with_name(applied.state_path.name + suffix)
    with StateStore.open(applied.state_path) as live:  # a reader keeps -wal and -shm there
        live.events(limit=1)
        if not companion.exists():
            companion.write_bytes(b"")
        target = companion
        if via_symlink:
            target = tmp_path / "elsewhere.db"
            target.symlink_to(companion)
        before = file_hash(companion)
        code, out, err = run_cli(["state", "export", str(target), "--force"], capsys)
        assert code == 1, out
        line = one_line_without_password(err)
        assert f"{suffix[1:]} file" in line and "choose another file" in line
        assert file_hash(companion) == before
        assert companion.exists() and not companion.is_symlink()


def test_copy_state_itself_refuses_a_non_empty_target_inside_its_transaction(
    tmp_path: Path, postgres_url: str
) -> None:
    """The early check aside, copy_state refuses a target that holds a row (one that filled
    up after the check) inside its own transaction: nothing of the source is added to it."""
    source_path = tmp_path / "state" / "batchspec.db"
    with StateStore.open(source_path) as source:
        source.upsert_resource("mine", provider="p", manifest="m.yaml", labels={}, run_id=None)
        with StateStore.open(postgres_url) as target:
            target.record_event(None, "theirs")
        before = dump(postgres_url)
        with pytest.raises(StateError, match="is not empty"):
            copy_state(source.db, postgres_url)
    assert dump(postgres_url) == before


def test_results_migrated_to_postgres_restore_on_a_fresh_runner_with_the_provider_gone(
    tmp_path: Path,
    applied: Workspace,
    serve: ServeProcess,
    postgres_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The result blobs travel with the rows: after SQLite -> PostgreSQL, a fresh checkout
    (no state/, no results/) pointed at the database rebuilds results/ byte for byte with the
    provider stopped, so a team moving to a shared state loses nothing it collected."""
    ws = applied
    expected = {p.name: p.read_bytes() for p in (ws.root / "results").iterdir()}
    report = cli_json(["state", "migrate", "--to", postgres_url], capsys)
    assert report["blobs"]["copied"] == report["blobs"]["referenced"] > 0
    serve.stop()

    fresh = tmp_path / "fresh"
    shutil.copytree(ws.root, fresh, ignore=shutil.ignore_patterns("state", "results"))
    code, out, err = run_cli(
        ["apply", str(fresh), "--wait", "--yes", "--state", postgres_url, *FAST], capsys
    )

    assert code == 0, (out, err)
    assert {p.name: p.read_bytes() for p in (fresh / "results").iterdir()} == expected


def test_a_batch_in_flight_on_its_whole_input_is_not_a_missing_blob(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A one-shard batch not collected yet was sent the manifest's input file itself (in the
    checkout, not in state/): migrate does not list it as a missing result blob."""
    from workspaces import local_provider, make_workspace

    ws = make_workspace(
        tmp_path / "ws", providers={"srv": local_provider()}, resources=[ResourceSpec("triage")]
    )
    code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)  # local: stays in flight
    assert code == 0, err
    with ws.store() as store:
        [batch] = store.db.query("SELECT output_sha256 FROM batches")
        assert batch["output_sha256"] is None
    argv = ["state", "migrate", "--state", str(ws.state_path)]
    report = cli_json([*argv, "--to", postgres_url], capsys)
    assert report["blobs"]["missing"] == []
    code, out, err = run_cli([*argv, "--to", str(tmp_path / "x.db")], capsys)
    assert code == 0 and "not in this machine's result store" not in out + err
