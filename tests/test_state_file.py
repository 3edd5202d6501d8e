"""What sits at the state path: only a missing file starts fresh; anything else not ours is refused.

An empty, truncated or foreign file taken for a fresh state would make ``apply`` submit (and
pay for) everything again. These tests put each such file where the state belongs and check
that the store and the CLI refuse it with a StateError that points at a backup, leave the
file as it was, and spend nothing. A database with a column we do not know is read as usual.
"""

from __future__ import annotations

import os
import random
import shlex
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from workspaces import ResourceSpec, Workspace, local_provider, make_workspace, run_cli

from batchspec.engine import Engine
from batchspec.errors import StateError
from batchspec.state import connection
from batchspec.state.runinfo import RunInfo
from batchspec.state.store import StateStore
from batchspec.storage.migrations import Migrations

FAST = ["--poll-interval", "0.05"]


def real_state_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "real" / "batchspec.db"
    with StateStore.open(path) as store:
        store.record_event(None, "probe")
    return path.read_bytes()


def empty(path: Path) -> None:
    path.write_bytes(b"")


def random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(8192))


def other_apps_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        db.execute("INSERT INTO notes (body) VALUES ('keep me')")
    db.close()


def other_sqlite_utils_app(path: Path) -> None:
    """Another app that tracks its migrations the way we do, under its own set name."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE _sqlite_migrations (id INTEGER PRIMARY KEY, migration_set TEXT, "
            "name TEXT, applied_at TEXT)"
        )
        db.execute("INSERT INTO _sqlite_migrations VALUES (1, 'llm', 'm001_initial', 'x')")
    db.close()


def empty_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 1")  # a valid database with no tables at all
    db.close()


def truncated(path: Path) -> None:
    path.write_bytes(real_state_bytes(path.parent.parent)[:100])


HOSTILE: list[object] = [
    pytest.param(empty, "empty", id="zero-bytes"),
    pytest.param(random_bytes, "not an SQLite database", id="random-bytes"),
    pytest.param(other_apps_sqlite, "without batchspec's tables.*notes", id="other-app"),
    pytest.param(other_sqlite_utils_app, "without batchspec's tables", id="other-migrations"),
    pytest.param(empty_sqlite, "without batchspec's tables", id="empty-sqlite"),
    pytest.param(truncated, "damaged or truncated", id="truncated"),
]


def put(tmp_path: Path, make: Callable[[Path], None]) -> Path:
    path = tmp_path / "state" / "batchspec.db"
    path.parent.mkdir(parents=True)
    make(path)
    return path


@pytest.mark.parametrize(("make", "says"), HOSTILE)
def test_store_refuses_what_is_not_a_batchspec_state(
    tmp_path: Path, make: Callable[[Path], None], says: str
) -> None:
    """Opening refuses the file with a StateError that names it, points at a backup, and
    leaves its bytes as they were (no schema written into someone else's database)."""
    path = put(tmp_path, make)
    before = path.read_bytes()
    with pytest.raises(StateError, match=says) as refused:
        StateStore.open(path)
    message = str(refused.value)
    assert str(path) in message
    assert "restore it from a backup" in message
    assert "paid" in message  # says what starting fresh would cost
    assert path.read_bytes() == before


def test_a_missing_file_starts_a_fresh_store(tmp_path: Path) -> None:
    """Only a missing file is a fresh state: it appears migrated, mode 0600, and opens again."""
    path = tmp_path / "state" / "batchspec.db"
    with StateStore.open(path) as store:
        assert store.applied_migrations()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with StateStore.open(path) as store:
        assert store.events() == []
    leftovers = [p.name for p in path.parent.iterdir() if not p.name.startswith(path.name)]
    assert leftovers == []


def test_a_fresh_store_that_fails_to_build_leaves_nothing_at_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh store is built beside the path and linked in whole: a failure while building
    it leaves no (empty) file behind that the next run would have to refuse."""
    path = tmp_path / "state" / "batchspec.db"
    failing = Migrations("batchspec")

    @failing
    def m001_initial(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY)")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(connection, "MIGRATIONS", failing)
    with pytest.raises(StateError, match="No space left"):
        StateStore.open(path)
    assert list(path.parent.iterdir()) == []
    monkeypatch.undo()
    with StateStore.open(path) as store:
        assert store.applied_migrations()


#: run by the tests below on a small filesystem of its own: fill it to FREE kB, then either
#: create a state there, or copy the state at SOURCE there (as `state migrate` to a file
#: does); free the room, and open what is at the path; print what each step gave
FULL_DISK_SCRIPT = """
import os, sqlite3, sys
from batchspec.errors import StateError
from batchspec.state.store import StateStore
from batchspec.state.transfer import copy_state
folder, free_kb, source = sys.argv[1], int(sys.argv[2]), sys.argv[3]
filler = os.path.join(folder, "filler")
stats = os.statvfs(folder)
with open(filler, "wb") as fh:
    fh.write(bytes(max(0, stats.f_bavail * stats.f_frsize - free_kb * 1024)))
path = os.path.join(folder, "state", "batchspec.db")
try:
    if source == "-":
        StateStore.open(path).close()
    else:
        os.makedirs(os.path.dirname(path))
        with StateStore.open(source) as store:
            copy_state(store.db, path)
    print("written")
except StateError as err:
    print("refused:", err.message)
except sqlite3.Error as err:  # the CLI says "a database operation failed (...)"
    print("refused:", err)
os.remove(filler)
if os.path.exists(path) or source == "-":
    with StateStore.open(path) as store:
        print("opened", len(store.applied_migrations()), len(store.events()))
else:
    print("nothing at the path")
"""


def run_on_a_small_filesystem(
    folder: Path, free_kb: int, source: Path | None = None, script: str = FULL_DISK_SCRIPT
) -> list[str]:
    """``script`` on a 1 MiB tmpfs mounted at ``folder`` in a mount namespace of its
    own (``unshare``: as root, or as a user through a user namespace), so nothing outside
    the child sees it; the lines it printed."""
    folder.mkdir(parents=True)
    flags = "-m" if os.geteuid() == 0 else "-rm"
    mount = f"mount -t tmpfs -o size=1m tmpfs {shlex.quote(str(folder))}"
    child = f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}"
    args = f"{folder} {free_kb} {shlex.quote(str(source or '-'))}"
    argv = ["unshare", flags, "sh", "-c", f"{mount} && exec {child} {args}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


FREE_KB = [40, 160, 200, 240]  # none; room for the log only (~130 kB), not the file too; both


@pytest.mark.parametrize("free_kb", FREE_KB)
def test_a_disk_that_fills_while_a_fresh_state_is_built_leaves_no_damaged_state(
    tmp_path: Path, free_kb: int
) -> None:
    """A fresh state is built in its write-ahead log, then copied into the file by a
    checkpoint. On a disk with room for the log and not for both, the checkpoint of the
    connection's close failed without a word, and the file linked into place lacked every
    table: "damaged or truncated", refused by every later run until deleted by hand. Now the
    creation fails with a StateError naming the full disk, leaves nothing at the path, and
    the next run, with room, starts the state."""
    first, second = run_on_a_small_filesystem(tmp_path / "small", free_kb)
    assert first == "written" or (
        first.startswith("refused: cannot create the state database")
        and "disk is full" in first
        and "has room" in first
    ), first
    assert second == f"opened {len(connection.MIGRATIONS.names)} 0", second


@pytest.mark.parametrize("free_kb", FREE_KB)
def test_a_disk_that_fills_while_the_state_is_copied_to_a_file_places_no_partial_copy(
    tmp_path: Path, free_kb: int
) -> None:
    """`state migrate` to an SQLite file copies the rows in the new file's log, checks them,
    then links the file into place. A checkpoint that failed silently on a full disk placed
    a file without the rows: a state that forgot every batch paid for, for the next apply to
    submit again. Now the copy fails and nothing is placed."""
    source = tmp_path / "source" / "batchspec.db"
    with StateStore.open(source) as store:
        for i in range(20):
            store.record_event(None, "probe", detail={"n": i})
    lines = run_on_a_small_filesystem(tmp_path / "small", free_kb, source)
    assert lines[0] == "written" or "disk is full" in lines[0], lines
    wanted = f"opened {len(connection.MIGRATIONS.names)} 20"
    assert lines[1] == (wanted if lines[0] == "written" else "nothing at the path"), lines


#: a state made with room, then opened (and written) on the same disk filled to FREE kB; then
#: opened again once there is room
OPEN_ON_A_FULL_DISK_SCRIPT = """
import os, sys
from batchspec.errors import StateError
from batchspec.state.store import StateStore
folder, free_kb = sys.argv[1], int(sys.argv[2])
path = os.path.join(folder, "state", "batchspec.db")
with StateStore.open(path) as store:
    store.record_event(None, "probe")
filler = os.path.join(folder, "filler")
with open(filler, "wb") as fh:
    stats = os.statvfs(folder)
    fh.write(bytes(max(0, stats.f_bavail * stats.f_frsize - free_kb * 1024)))
try:
    with StateStore.open(path) as store:
        store.record_event(None, "probe")
    print("written")
except StateError as err:
    print("refused:", err.message)
os.remove(filler)
with StateStore.open(path) as store:
    print("opened", len(store.events()))
"""


@pytest.mark.parametrize("free_kb", [0, 16])
def test_a_state_opened_on_a_full_disk_is_not_called_damaged(tmp_path: Path, free_kb: int) -> None:
    """A sound state on a disk with no room for SQLite's -shm file failed its first read with
    "disk I/O error", and was refused as "damaged or truncated ... restore it from a backup
    ... Delete the file only if nothing was ever applied": a user who believed it deleted
    the record of what was paid for. Now the error names the full disk and leaves the file
    as it was; with room, the state opens with its events."""
    lines = run_on_a_small_filesystem(
        tmp_path / "small", free_kb, script=OPEN_ON_A_FULL_DISK_SCRIPT
    )
    assert lines[0].startswith("refused: cannot read the state database"), lines
    assert "disk I/O error" in lines[0] and "has room" in lines[0], lines
    assert "damaged" not in lines[0] and "backup" not in lines[0], lines
    assert lines[1] == "opened 1", lines


# -- an extra column ---------------------------------------------------------------------------


EXTRA_COLUMN_TABLES = [
    "runs",
    "resources",
    "generations",
    "batches",
    "events",
    "files",
    "resource_locks",
]


def test_unknown_columns_are_ignored_when_reading_rows(tmp_path: Path) -> None:
    """A column added to each of our tables (by hand, or a tool) does not break any read."""
    path = tmp_path / "batchspec.db"
    with StateStore.open(path) as store:
        run_id = store.start_run("apply", {}, _info())
        store.upsert_resource("triage", provider="p", manifest="m.yaml", labels={}, run_id=run_id)
        gen = store.create_generation(
            "triage",
            spec_hash="h",
            spec={},
            input_sha256="s",
            requests=1,
            input_bytes=1,
            output_path=None,
            errors_path=None,
            run_id=run_id,
        )
        batch = store.record_batch_intent(
            gen.id,
            shard=0,
            attempt=1,
            provider="p",
            key="k",
            input_sha256="s",
            requests=1,
            reason=None,
        )
        store.record_file("p", "s", "file-1", 1, None)
        store.record_event(run_id, "create", resource="triage")
    with sqlite3.connect(path) as db:
        for table in EXTRA_COLUMN_TABLES:
            db.execute(f"ALTER TABLE {table} ADD COLUMN note TEXT DEFAULT 'x'")
    db.close()
    with StateStore.open(path) as store:
        assert store.get_run(run_id).command == "apply"
        assert store.get_resource("triage") is not None
        assert store.get_generation(gen.id).spec_hash == "h"
        assert store.update_batch(batch.id, status="in_progress").status == "in_progress"
        assert store.get_file("p", "s") is not None
        assert [e.action for e in store.events()] == ["create"]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        pytest.param(
            "ALTER TABLE batches DROP COLUMN input_sha256", "batches.input_sha256", id="col"
        ),
        pytest.param(
            "ALTER TABLE generations DROP COLUMN requests", "generations.requests", id="gen"
        ),
        pytest.param("DROP TABLE requests", "requests.", id="table"),
    ],
)
def test_a_state_missing_a_column_or_table_is_refused_on_open(
    tmp_path: Path, change: str, named: str
) -> None:
    """A state whose tables lost a column (or a table) is refused on open with a StateError
    naming it, instead of a TypeError traceback mid-command; the file is left as it was."""
    path = tmp_path / "batchspec.db"
    with StateStore.open(path) as store:
        run_id = store.start_run("apply", {}, _info())
        store.upsert_resource("triage", provider="p", manifest="m.yaml", labels={}, run_id=run_id)
    db = sqlite3.connect(path)
    db.execute(change)
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(StateError, match="missing columns or tables") as caught:
        StateStore.open(path).close()
    assert named in str(caught.value) and "backup" in str(caught.value)
    assert path.read_bytes() == before


def _info() -> RunInfo:
    return RunInfo("alice", "host-1", 1, None, None, None, None, None, "0.1.0")


# -- through the CLI -----------------------------------------------------------------------------


def local_ws(root: Path) -> Workspace:
    return make_workspace(
        root,
        providers={"here": local_provider()},
        resources=(ResourceSpec("triage", count=3, provider="here"),),
    )


def engine_counts(ws: Workspace) -> tuple[int, int]:
    """(files, batches) the workspace's local engine holds."""
    folder = ws.root / "state" / "local"
    if not folder.exists():
        return 0, 0
    engine = Engine(folder)
    try:
        return len(engine.list_files()["data"]), len(engine.list_batches(None, 100)["data"])
    finally:
        engine.close()


@pytest.mark.parametrize(("make", "says"), HOSTILE)
def test_apply_refuses_a_state_file_that_is_not_ours_and_spends_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Callable[[Path], None], says: str
) -> None:
    """`apply` on a hostile state file exits 1 with the refusal on stderr (no traceback),
    uploads and creates nothing, and leaves the file as it was."""
    ws = local_ws(tmp_path / "ws")
    ws.state_path.parent.mkdir(parents=True)
    make(ws.state_path)
    before = ws.state_path.read_bytes()
    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 1, (out, err)
    assert "restore it from a backup" in err
    assert "Traceback" not in err
    assert engine_counts(ws) == (0, 0)
    assert ws.state_path.read_bytes() == before


def test_apply_and_status_work_on_a_state_with_an_extra_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state whose tables gained a column we do not know still applies and reports."""
    ws = local_ws(tmp_path / "ws")
    assert run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)[0] == 0
    with sqlite3.connect(ws.state_path) as db:
        for table in EXTRA_COLUMN_TABLES:
            db.execute(f"ALTER TABLE {table} ADD COLUMN note TEXT")
    db.close()
    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, (out, err)
    code, out, err = run_cli(["status", str(ws.root)], capsys)
    assert code == 0, (out, err)
    assert "triage" in out
    assert engine_counts(ws)[1] == 1  # the second apply created no batch


def test_apply_with_a_state_path_where_no_state_is_says_it_starts_a_new_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --state PATH` (a typo, say) where no state records anything warns that it
    starts that state, naming the path, instead of starting over unnoticed, also when a
    `plan --state PATH` created the file first; once it records a resource, nothing is said;
    without `--state` (a first apply) neither."""
    ws = local_ws(tmp_path / "ws")
    code, out, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    assert "records nothing yet" not in out + err
    typo = tmp_path / "elsewhere" / "batchsepc.db"
    assert run_cli(["plan", str(ws.root), "--state", str(typo)], capsys)[0] in (0, 2)

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--state", str(typo)], capsys)

    assert code == 0, err
    assert f"the state at {typo} records nothing yet: this apply starts it" in out + err
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--state", str(typo)], capsys)
    assert code == 0, err
    assert "records nothing yet" not in out + err
