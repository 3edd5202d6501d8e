"""The result store's shared tier: results and shard files reachable from every runner.

A runner that never collected a result (a fresh checkout with an empty ``state/``) rebuilds
``results/`` from a shared state with no provider call: from the PostgreSQL state's own blob
tables, or from the folder ``state.blobs`` names. Damaged remote content is refused before a
line is written; a blob found nowhere is one clear line; large blobs stream in chunks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from postgres import PASSWORD
from probes import ServeProcess, start_serve_process
from servers import stop_after_test
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    make_workspace,
    openai_provider,
    served,
)

from batchspec.errors import ProviderError
from batchspec.state.store import StateStore
from batchspec.storage.blobstore import BlobStore
from batchspec.storage.remote_blobs import (
    CHUNK_BYTES,
    BlobCorruptError,
    BlobMissingError,
    FolderBlobs,
    PostgresBlobs,
    open_blob_location,
)
from batchspec.storage.result_store import Refetch, ResultStore

FAST = ["--poll-interval", "0.05"]
Run = Callable[..., subprocess.CompletedProcess[str]]


def runner(env: dict[str, str]) -> Run:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            batchspec_cmd(*args), env=env, capture_output=True, text=True, timeout=120
        )

    return run


def set_state(ws: Workspace, state: dict[str, Any], **provider_options: Any) -> None:
    project = yaml.safe_load((ws.root / "batchspec.yaml").read_text())
    project["state"] = state
    if provider_options:
        project["providers"]["srv"]["options"] = provider_options
    (ws.root / "batchspec.yaml").write_text(yaml.safe_dump(project, sort_keys=False))


def fresh_checkout(ws: Workspace, dest: Path) -> Workspace:
    """What a clone of the repository holds: the project, manifests and inputs; no state/,
    no results/."""
    shutil.copytree(ws.root, dest, ignore=shutil.ignore_patterns("state", "results"))
    return Workspace(dest)


def result_bytes(ws: Workspace, name: str) -> tuple[bytes, bytes]:
    return ws.output_path(name).read_bytes(), ws.errors_path(name).read_bytes()


@pytest.fixture
def serve_proc(tmp_path: Path) -> Any:
    procs: list[ServeProcess] = []

    def start() -> ServeProcess:
        proc = start_serve_process(tmp_path / "engine", api_key=SENTINEL_KEY)
        procs.append(proc)
        return proc

    yield start
    stop_after_test(procs)


# -- end to end: PostgreSQL ----------------------------------------------------------------------


def test_a_fresh_checkout_submits_queued_shards_and_restores_results_from_postgres(
    tmp_path: Path, postgres_url: str, serve_proc: Any
) -> None:
    """Runner A records 3 shards and submits one (maxInFlightBatches 1); runner B, a fresh
    checkout on the same PostgreSQL state, submits the other two from the shared shard files
    and collects; with `batchspec serve` stopped, runner C (another fresh checkout) rebuilds
    results/ byte for byte, so from the state's blobs alone."""
    proc = serve_proc()
    a = served(tmp_path / "a", proc, ResourceSpec("triage", count=12, spec=shards(4)))
    set_state(a, {"urlEnv": "BATCHSPEC_STATE_URL"}, maxInFlightBatches=1)
    run = runner({**os.environ, KEY_ENV: SENTINEL_KEY, "BATCHSPEC_STATE_URL": postgres_url})

    first = run("apply", str(a.root), "--yes", *FAST)
    assert first.returncode == 0, first.stderr
    with StateStore.open(postgres_url) as store:
        batches = store.batches()
        assert len(batches) == 3 and sum(b.remote_id is not None for b in batches) == 1
        shard_shas = {b.input_sha256 for b in batches}
        # the 3 shard files only: a generation this small writes its ledger with its
        # intents, so no request index is kept (intent.LEDGER_AFTER_CREATE_MIN)
        assert store.db.execute("SELECT count(*) FROM blobs").fetchone()[0] == 3

    b = fresh_checkout(a, tmp_path / "b")
    second = run("apply", str(b.root), "--wait", "--yes", *FAST)
    assert second.returncode == 0, second.stderr
    assert [r["custom_id"] for r in b.outputs("triage")] == b.input_ids("triage")
    assert len(proc.client().batches.list().data) == 3
    with StateStore.open(postgres_url) as store:
        shared = set(PostgresBlobs(postgres_url).iter_hashes())
        collected = {b.output_sha256 for b in store.batches()}
    assert shard_shas | collected <= shared
    proc.stop()

    c = fresh_checkout(a, tmp_path / "c")
    third = run("apply", str(c.root), "--wait", "--yes", *FAST)
    assert third.returncode == 0, third.stderr
    assert result_bytes(c, "triage") == result_bytes(b, "triage")
    with StateStore.open(postgres_url) as store:
        last_run = max(r.id for r in store.runs())
        actions = [e.action for e in store.events() if e.run_id == last_run]
    assert "restore" in actions and not {"create", "collect", "upload"} & set(actions)
    assert PASSWORD not in first.stderr + second.stderr + third.stderr


def shards(per_batch: int) -> dict[str, Any]:
    return {"limits": {"maxRequestsPerBatch": per_batch}}


def test_a_damaged_remote_chunk_is_refused_and_nothing_is_written(
    tmp_path: Path, postgres_url: str, serve_proc: Any
) -> None:
    """A chunk altered in the database: the fresh checkout's restore stops with one clear line
    (exit 1) naming the damaged blob; results/ gets no file, the local cache no blob."""
    proc = serve_proc()
    a = served(tmp_path / "a", proc, ResourceSpec("triage", count=5))
    # the provider is stopped below: its download is refused at once, not retried with backoff
    set_state(a, {"urlEnv": "BATCHSPEC_STATE_URL"}, maxRetries=0)
    run = runner({**os.environ, KEY_ENV: SENTINEL_KEY, "BATCHSPEC_STATE_URL": postgres_url})
    assert run("apply", str(a.root), "--wait", "--yes", *FAST).returncode == 0
    proc.stop()
    with StateStore.open(postgres_url) as store:
        [batch] = store.batches()
        assert batch.output_sha256 is not None
        store.db.execute(
            "UPDATE blob_chunks SET data = overlay(data placing '#'::bytea from 20) "
            "WHERE sha256 = ? AND seq = 0",
            (batch.output_sha256,),
        )

    b = fresh_checkout(a, tmp_path / "b")
    broken = run("apply", str(b.root), "--wait", "--yes", *FAST)
    assert broken.returncode == 1
    lines = [line for line in broken.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "damaged" in lines[0], broken.stderr
    assert batch.output_sha256[:12] in lines[0] and PASSWORD not in broken.stderr
    assert not (b.root / "results").exists() or list((b.root / "results").iterdir()) == []
    stored = [p for p in (b.root / "state" / "store").rglob("*") if p.is_file()]
    assert stored == []


def holds(remote: Any, sha: str) -> bool:
    """Whether the tier has blob ``sha`` whole and good (read back and hashed here)."""
    try:
        return hashlib.sha256(b"".join(remote.chunks(sha))).hexdigest() == sha
    except (BlobCorruptError, BlobMissingError):
        return False


def damage_output_blob(postgres_url: str) -> tuple[str, str]:
    """Overwrite the first chunk of the one batch's output blob; its sha256 and file id."""
    with StateStore.open(postgres_url) as store:
        [batch] = store.batches()
        assert batch.output_sha256 is not None and batch.output_file_id is not None
        store.db.execute(
            "UPDATE blob_chunks SET data = 'x' WHERE sha256 = ? AND seq = 0",
            (batch.output_sha256,),
        )
    return batch.output_sha256, batch.output_file_id


def test_a_damaged_remote_blob_is_downloaded_again_from_the_provider_and_repaired(
    tmp_path: Path, postgres_url: str, serve_proc: Any
) -> None:
    """The shared output blob damaged while the provider still has the file: a fresh
    checkout's apply downloads it again, writes byte-identical results, replaces the remote
    copy (good again, one blobs row) and records a blob.repaired event."""
    proc = serve_proc()
    a = served(tmp_path / "a", proc, ResourceSpec("triage", count=5))
    set_state(a, {"urlEnv": "BATCHSPEC_STATE_URL"})
    run = runner({**os.environ, KEY_ENV: SENTINEL_KEY, "BATCHSPEC_STATE_URL": postgres_url})
    first = run("apply", str(a.root), "--wait", "--yes", *FAST)
    assert first.returncode == 0, first.stderr
    sha, file_id = damage_output_blob(postgres_url)
    remote = PostgresBlobs(postgres_url)
    assert not holds(remote, sha)

    b = fresh_checkout(a, tmp_path / "b")
    again = run("apply", str(b.root), "--wait", "--yes", *FAST)
    assert again.returncode == 0, again.stderr
    assert result_bytes(b, "triage") == result_bytes(a, "triage")
    try:
        assert holds(remote, sha)
        assert hashlib.sha256(b"".join(remote.chunks(sha))).hexdigest() == sha
    finally:
        remote.close()
    with StateStore.open(postgres_url) as store:
        assert (
            store.db.execute("SELECT count(*) FROM blobs WHERE sha256 = ?", (sha,)).fetchone()[0]
            == 1
        )
        [repaired] = [e for e in store.events() if e.action == "blob.repaired"]
    assert repaired.detail["sha256"] == sha and file_id in repaired.detail["from"]
    assert PASSWORD not in again.stderr + again.stdout


def test_a_damaged_remote_blob_the_provider_no_longer_has_stays_a_clear_error(
    tmp_path: Path, postgres_url: str, serve_proc: Any
) -> None:
    """The provider deleted the output file (expired): the fresh checkout's apply exits 1 with
    one line naming the damaged blob and the file that cannot be downloaded again; no result
    file, no local blob, the remote copy left as it was and no repair event."""
    proc = serve_proc()
    a = served(tmp_path / "a", proc, ResourceSpec("triage", count=5))
    set_state(a, {"urlEnv": "BATCHSPEC_STATE_URL"})
    run = runner({**os.environ, KEY_ENV: SENTINEL_KEY, "BATCHSPEC_STATE_URL": postgres_url})
    assert run("apply", str(a.root), "--wait", "--yes", *FAST).returncode == 0
    sha, file_id = damage_output_blob(postgres_url)
    proc.client().files.delete(file_id)

    b = fresh_checkout(a, tmp_path / "b")
    broken = run("apply", str(b.root), "--wait", "--yes", *FAST)
    assert broken.returncode == 1, broken.stderr
    lines = [line for line in broken.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "damaged" in lines[0], broken.stderr
    assert sha[:12] in lines[0] and file_id in lines[0] and "Traceback" not in broken.stderr
    assert not (b.root / "results").exists() or list((b.root / "results").iterdir()) == []
    assert [p for p in (b.root / "state" / "store").rglob("*") if p.is_file()] == []
    remote = PostgresBlobs(postgres_url)
    try:
        assert remote.has(sha) and not holds(remote, sha)
    finally:
        remote.close()
    with StateStore.open(postgres_url) as store:
        assert not [e for e in store.events() if e.action == "blob.repaired"]


def test_a_runner_with_a_good_local_copy_repairs_a_damaged_remote_when_it_publishes(
    tmp_path: Path, postgres_url: str
) -> None:
    """publish of a blob the remote tier holds damaged (PostgreSQL, a folder) replaces it
    from the local copy and tells on_repair; a local copy that is itself wrong is refused and
    the remote copy is left alone."""
    StateStore.open(postgres_url).close()  # the schema, with the blob tables
    content = b"line one\nline two\n" * 1000
    sha = hashlib.sha256(content).hexdigest()
    folder = FolderBlobs(tmp_path / "shared")
    for remote in (PostgresBlobs(postgres_url), folder):
        remote.put(sha, [content])
        if isinstance(remote, PostgresBlobs):
            remote._conn().execute(
                "UPDATE blob_chunks SET data = 'x' WHERE sha256 = ? AND seq = 0", (sha,)
            )
        else:
            folder.store.path(sha).write_bytes(b"x")
        assert not holds(remote, sha)
        repairs: list[tuple[str, str]] = []
        store = ResultStore(BlobStore(tmp_path / f"local-{type(remote).__name__}"), remote)
        store.on_repair = lambda s, where, seen=repairs: seen.append((s, where))
        bad = tmp_path / "bad"
        bad.write_bytes(b"not it")
        with pytest.raises(BlobCorruptError):
            store.publish(sha, bad)
        assert not holds(remote, sha) and remote.has(sha) and repairs == []
        good = tmp_path / "good"
        good.write_bytes(content)
        store.publish(sha, good)
        assert holds(remote, sha) and b"".join(remote.chunks(sha)) == content
        assert [s for s, _ in repairs] == [sha]
        store.publish(sha, good)
        assert len(repairs) == 1
        remote.close()


# -- end to end: a shared folder ------------------------------------------------------------------


def test_state_blobs_folder_lets_another_runner_restore_an_sqlite_state(
    tmp_path: Path, serve_proc: Any
) -> None:
    """state.blobs: a folder (relative to the project file) holds what A collected; B, with a
    copy of A's SQLite file but none of A's state/store/, restores identical results with the
    server stopped."""
    proc = serve_proc()
    a = served(tmp_path / "a", proc, ResourceSpec("triage", count=5))
    set_state(a, {"path": "state/batchspec.db", "blobs": "../shared-blobs"})
    run = runner({**os.environ, KEY_ENV: SENTINEL_KEY})
    done = run("apply", str(a.root), "--wait", "--yes", *FAST)
    assert done.returncode == 0, done.stderr
    proc.stop()
    assert list(FolderBlobs(tmp_path / "shared-blobs").iter_hashes())

    b = fresh_checkout(a, tmp_path / "b")
    b.state_path.parent.mkdir()
    shutil.copyfile(a.state_path, b.state_path)
    again = run("apply", str(b.root), "--wait", "--yes", *FAST)
    assert again.returncode == 0, again.stderr
    assert result_bytes(b, "triage") == result_bytes(a, "triage")


def test_a_blob_found_nowhere_is_one_clear_line(tmp_path: Path, serve_proc: Any) -> None:
    """An SQLite state whose state/store/ was deleted, with no shared tier: restoring is one
    line naming the missing file and what to do (exit 1), not a traceback."""
    proc = serve_proc()
    a = make_workspace(  # the provider, stopped below, refuses the download at once
        tmp_path / "a",
        providers={"srv": openai_provider(proc.v1, KEY_ENV, maxRetries=0)},
        resources=(ResourceSpec("triage", count=3),),
    )
    run = runner({**os.environ, KEY_ENV: SENTINEL_KEY})
    assert run("apply", str(a.root), "--wait", "--yes", *FAST).returncode == 0
    proc.stop()
    shutil.rmtree(a.root / "state" / "store")
    shutil.rmtree(a.root / "results")
    failed = run("apply", str(a.root), "--wait", "--yes", *FAST)
    assert failed.returncode == 1
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "state.blobs" in lines[0], failed.stderr
    assert "Traceback" not in failed.stderr


# -- the tiers themselves --------------------------------------------------------------------------


def test_a_large_blob_round_trips_through_postgres_in_chunks(
    tmp_path: Path, postgres_url: str
) -> None:
    """A 5.5 MB blob fed in odd-sized pieces is stored as 6 chunks of 1 MiB (the last
    shorter) and read back chunk by chunk, never more than one chunk at a time."""
    StateStore.open(postgres_url).close()  # the schema, with the blob tables
    content = os.urandom(5 * CHUNK_BYTES + CHUNK_BYTES // 2)
    sha = hashlib.sha256(content).hexdigest()
    pieces = (content[i : i + 300_001] for i in range(0, len(content), 300_001))
    blobs = PostgresBlobs(postgres_url)
    try:
        blobs.put(sha, pieces)
        blobs.put(sha, [b"ignored: already there"])
        assert blobs.size(sha) == len(content)
        read = list(blobs.chunks(sha))
        assert [len(c) for c in read] == [CHUNK_BYTES] * 5 + [CHUNK_BYTES // 2]
        assert b"".join(read) == content
        assert list(blobs.iter_hashes()) == [sha]
    finally:
        blobs.close()


@pytest.mark.parametrize("tier", ["postgresql", "folder"])
def test_content_that_does_not_match_its_name_is_refused_whole(
    tier: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """put() with content whose sha256 is not the name: BlobCorruptError, and the tier holds
    nothing of it afterwards; chunks() of an absent blob: BlobMissingError."""
    if tier == "postgresql":
        url = str(request.getfixturevalue("postgres_url"))
        StateStore.open(url).close()
        blobs: Any = PostgresBlobs(url)
    else:
        blobs = FolderBlobs(tmp_path / "shared")
    wrong = hashlib.sha256(b"something else").hexdigest()
    try:
        with pytest.raises(BlobCorruptError, match="damaged"):
            blobs.put(wrong, [b"x" * (CHUNK_BYTES + 5)])
        assert not blobs.has(wrong) and list(blobs.iter_hashes()) == []
        with pytest.raises(BlobMissingError):
            blobs.chunks(wrong)
        if tier == "postgresql":
            count = blobs._conn().execute("SELECT count(*) FROM blob_chunks").fetchone()[0]
            assert count == 0
    finally:
        blobs.close()


def test_an_fsspec_url_is_a_tier_like_a_folder() -> None:
    """state.blobs as an fsspec URL (fsspec's memory://): put, has, size, chunks, iter_hashes;
    damaged content is refused and leaves no object behind."""
    blobs = open_blob_location("memory://batchspec-test/blobs")
    content = b"line\n" * 300_000
    sha = hashlib.sha256(content).hexdigest()
    blobs.put(sha, [content[:7], content[7:]])
    assert blobs.has(sha) and blobs.size(sha) == len(content)
    assert b"".join(blobs.chunks(sha)) == content
    wrong = hashlib.sha256(b"other").hexdigest()
    with pytest.raises(BlobCorruptError):
        blobs.put(wrong, [b"not other"])
    assert list(blobs.iter_hashes()) == [sha]


def test_a_shared_folder_gives_its_group_what_it_creates_and_others_nothing(
    tmp_path: Path,
) -> None:
    """Runners of one state may run as different users (self-hosted CI, a mounted share):
    the folders and files a runner creates in state.blobs carry the group bits the folder's
    owner gave it (a 2770 group share), never bits for others. They were 0700/0600: a second
    user got PermissionError reading, or filing anything (its tmp/ was private too)."""
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o2775)
    blobs = FolderBlobs(root)
    content = b"an answer\n"
    sha = hashlib.sha256(content).hexdigest()
    blobs.put(sha, [content])
    blobs.replace(sha, [content])  # a repair files it anew: the same modes
    assert oct(os.stat(root / sha[:2]).st_mode & 0o777) == oct(0o770)
    assert oct(os.stat(root / "tmp").st_mode & 0o777) == oct(0o770)
    assert oct(os.stat(blobs.store.path(sha)).st_mode & 0o777) == oct(0o660)
    # a folder batchspec makes itself, or one its owner keeps private, stays private; so does
    # one that is no group share (no set-group-id): a plain mkdir's 0755 (the umask's group
    # bits are no one's choice), a 0770 whose files would take their creator's group
    private = FolderBlobs(tmp_path / "made-here")
    private.put(sha, [content])
    assert oct(os.stat(tmp_path / "made-here" / sha[:2]).st_mode & 0o777) == oct(0o700)
    assert oct(os.stat(private.store.path(sha)).st_mode & 0o777) == oct(0o600)
    for name, mode in (("plain", 0o755), ("no-setgid", 0o770)):
        folder = tmp_path / name
        folder.mkdir()
        os.chmod(folder, mode)
        FolderBlobs(folder).put(sha, [content])
        assert oct(os.stat(folder / sha[:2]).st_mode & 0o777) == oct(0o700), name
        assert oct(os.stat(folder / sha[:2] / sha).st_mode & 0o777) == oct(0o600), name


# -- the repair rules, in process, over a real folder tier --------------------------------------


def _damaged_folder_copy(tmp_path: Path, content: bytes) -> tuple[FolderBlobs, str]:
    """A shared folder holding blob ``content`` whose file was then damaged in place."""
    shared = FolderBlobs(tmp_path / "shared")
    sha = hashlib.sha256(content).hexdigest()
    shared.put(sha, [content])
    shared.store.path(sha).write_bytes(content[:-1] + b"X")
    return shared, sha


def test_a_damaged_shared_copy_is_replaced_by_the_providers_file_with_the_same_hash(
    tmp_path: Path,
) -> None:
    """The repair keeps only a download that hashes to the recorded sha256, files it on this
    runner, puts it back in the shared tier and says where the good copy came from."""
    content = b'{"custom_id": "a"}\n' * 1000
    shared, sha = _damaged_folder_copy(tmp_path, content)
    repaired: list[tuple[str, str]] = []
    store = ResultStore(
        BlobStore(tmp_path / "local"),
        shared,
        refetch=lambda s: Refetch("file-1 of provider srv", lambda p: p.write_bytes(content)),
        on_repair=lambda s, where: repaired.append((s, where)),
    )

    assert store.ensure_local(sha).read_bytes() == content
    assert b"".join(shared.chunks(sha)) == content
    assert repaired == [(sha, "file-1 of provider srv")]


@pytest.mark.parametrize(
    ("download", "says"),
    [
        pytest.param(lambda p: p.write_bytes(b"other"), "gave other content", id="other-content"),
        pytest.param(None, "cannot be downloaded again", id="provider-error"),
        pytest.param("none", "is damaged", id="no-source"),
    ],
)
def test_a_damaged_shared_copy_that_cannot_be_had_again_is_refused_and_nothing_kept(
    tmp_path: Path, download: Any, says: str
) -> None:
    """A download with other content, a provider that refuses the download, or no recorded
    source: the damaged copy is never used, nothing is filed on this runner, no repair is
    reported, and the message says which of the three it was."""
    content = b"answer\n" * 100
    shared, sha = _damaged_folder_copy(tmp_path, content)

    def refused(path: Path) -> None:
        raise ProviderError("the file has expired")

    def refetch(s: str) -> Refetch | None:
        if download == "none":
            return None
        return Refetch("file-1 of provider srv", refused if download is None else download)

    repaired: list[tuple[str, str]] = []
    local = BlobStore(tmp_path / "local")
    store = ResultStore(local, shared, refetch=refetch, on_repair=lambda *a: repaired.append(a))

    with pytest.raises(BlobCorruptError) as caught:
        store.ensure_local(sha)
    assert says in str(caught.value)
    assert not local.has(sha) and repaired == []


def test_a_blob_in_no_tier_names_both_places_and_how_to_share_them(tmp_path: Path) -> None:
    """A blob neither here nor in the shared tier is a BlobMissingError naming both places and
    the way out (share the state's blobs), never a bare FileNotFoundError."""
    store = ResultStore(BlobStore(tmp_path / "local"), FolderBlobs(tmp_path / "shared"))
    with pytest.raises(BlobMissingError) as caught:
        store.ensure_local("ab" * 32)
    message = str(caught.value)
    assert str(tmp_path / "local") in message and "the blob folder" in message
    assert "state.blobs" in message
    assert not store.has("ab" * 32)
