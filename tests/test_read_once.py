"""`apply`, `plan` and `import` read an input once: the scan that validates and hashes it also
indexes its requests.

Sharding, the request ledger and shard files come from that index (``batchspec.wire.
request_index``), so a fresh apply parses every input line exactly once, and opens the input
only to scan it and to hand it to the provider (or to copy requests into shard files, by
offset, checked against what was validated). An input that changes after its validation is
refused before anything is recorded or uploaded. Runs on the embedded engine (``local``).

The same holds under a provider's stricter rules (Anthropic's dialect, a custom_id pattern):
the loader hashes the input with the scan those rules validate it by. ``plan`` counts the
answers a new generation would reuse from the index, and ``import`` records its ledger from
it; an unchanged input whose scan is cached is not read at all. Those run against the
engine's provider APIs over loopback.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from probes import ProbedServer
from servers import request_lines
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    Workspace,
    local_provider,
    make_workspace,
    served,
)

from batchspec.core import lifecycle, sharding
from batchspec.core.apply import ApplyOptions, apply_workspace, plan_workspace
from batchspec.core.lifecycle import import_batch
from batchspec.core.reconcile import Progress, intent
from batchspec.engine import Engine
from batchspec.errors import BudgetError, InputError
from batchspec.state import ledger as ledger_module
from batchspec.wire import inputs, request_index
from batchspec.wire.inputs import iter_requests
from batchspec.wire.request_index import (
    InputChangedError,
    RequestBytes,
    RequestIndexWriter,
    read_request_index,
)
from batchspec.workspace import inputcache
from batchspec.workspace.inputcache import INDEX_KEEP_S, InputCache

WAIT = ApplyOptions(wait=True, poll_interval=0.05)


@pytest.fixture(autouse=True)
def short_racy_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """An input's scan is kept once it has not changed for 0.5 s here, not 2 s (the window
    covers filesystems with coarse timestamps): the tests that wait for it wait less."""
    monkeypatch.setattr(inputcache, "RACY_WINDOW_S", 0.5)


def settle() -> None:
    """Wait until the inputs written so far are past the racy window: their scans are kept."""
    time.sleep(inputcache.RACY_WINDOW_S + 0.1)


@pytest.fixture
def index_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every input's request index in a file of its own, as a large input's is (a small
    input's is kept on its cache entry: ``INLINE_INPUT_MAX_BYTES``)."""
    monkeypatch.setattr(inputcache, "INLINE_INPUT_MAX_BYTES", -1)


def local_ws(root: Path, count: int, *, per_batch: int | None = None) -> Workspace:
    spec = {"limits": {"maxRequestsPerBatch": per_batch}} if per_batch else {}
    return make_workspace(
        root,
        providers={"here": local_provider()},
        resources=(ResourceSpec("job", count=count, provider="here", spec=spec),),
    )


def ledger(ws: Workspace) -> list[tuple[str, int, int, int, str]]:
    with sqlite3.connect(ws.state_path) as db:
        rows = db.execute(
            "select custom_id, line, shard, bytes, request_sha from requests order by line"
        ).fetchall()
    return [tuple(r) for r in rows]


def expected_ledger(path: Path, shard_of: dict[int, int]) -> list[tuple[str, int, int, int, str]]:
    """The ledger rows the input calls for, derived the slow way (parsing every line)."""
    return [
        (
            r.custom_id,
            r.line,
            shard_of.get(r.line, 0),
            len(r.raw) + 1,
            hashlib.sha256(r.raw).hexdigest(),
        )
        for r in iter_requests(path)
    ]


def engine_files(ws: Workspace) -> int:
    """Files uploaded to the workspace's embedded engine (none if it was never opened)."""
    if not (ws.root / "state" / "local").exists():
        return 0
    engine = Engine(ws.root / "state" / "local")
    try:
        return len(engine.list_files()["data"])
    finally:
        engine.close()


def count_parses(
    monkeypatch: pytest.MonkeyPatch, *, besides: tuple[str, ...] = ("batchspec.engine",)
) -> list[bytes]:
    """Every input line batchspec parses from now on (the embedded engine's own parses, the
    provider's side, are not counted; nor those of the modules named in ``besides``)."""
    parsed: list[bytes] = []
    real_parse = inputs._parse

    def counting_parse(line: bytes) -> object:
        frame = sys._getframe(1)
        while frame is not None:
            if frame.f_globals.get("__name__", "").startswith(besides):
                break
            frame = frame.f_back  # type: ignore[assignment]
        else:
            parsed.append(line)
        return real_parse(line)

    monkeypatch.setattr(inputs, "_parse", counting_parse)
    return parsed


@pytest.mark.parametrize("per_batch", [None, 40], ids=["one-shard", "three-shards"])
def test_a_fresh_apply_parses_each_input_line_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, per_batch: int | None
) -> None:
    """Validation, hashing, sharding and the ledger of a 100-request input cost 100 line
    parses in all (they were 200: the ledger and the sharding parsed the input again)."""
    ws = local_ws(tmp_path, 100, per_batch=per_batch)
    parsed = count_parses(monkeypatch)

    result = apply_workspace([str(ws.root)], WAIT)

    assert result.exit_code == 0
    assert len(parsed) == 100
    assert len(ws.outputs("job")) == 100


def test_an_edited_input_is_parsed_once_to_reuse_its_unchanged_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line of a done 100-request input edited: the apply that counts the 99 reusable
    answers, records the ledger and writes the 1-request batch file parses 100 lines (it
    was 400: reuse counting, ledger and sharding each parsed the input again)."""
    ws = local_ws(tmp_path, 100)
    assert apply_workspace([str(ws.root)], WAIT).exit_code == 0
    lines = request_lines(100)
    lines[5] = {**lines[5], "body": {**lines[5]["body"], "temperature": 0.5}}
    ws.write_input("job", lines)
    parsed = count_parses(monkeypatch)

    result = apply_workspace([str(ws.root)], WAIT)

    assert result.exit_code == 0
    assert [(a.requests, a.reused) for a in result.plan.actions] == [(1, 99)]
    assert len(parsed) == 100
    with ws.store() as store:
        [gen] = [g for g in store.generations("job") if g.status == "complete"][-1:]
        assert store.ledger().state_counts(gen.id) == {"ok": 100}


def count_index_opens(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often request indexes are opened from now on: to ``check`` one whole (its digest:
    ``is_complete``) and to ``read`` its records (``read_request_index``)."""
    opened = {"check": 0, "read": 0}

    def counting_open(path: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith(".idx"):
            opened["read" if kwargs.get("buffering") == 0 else "check"] += 1
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(request_index, "open", counting_open, raising=False)
    return opened


@pytest.mark.usefixtures("index_files")
def test_each_use_of_a_request_index_reads_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An apply that uses an edited input's index several times (the plan's reuse count,
    the ledger, the shard file) reads it once per use: the index its own scan wrote is
    never read again only to check it (it was, before every use); a kept one is checked
    once a process."""
    ws = local_ws(tmp_path, 100)
    assert apply_workspace([str(ws.root)], WAIT).exit_code == 0
    lines = request_lines(100)
    lines[5] = {**lines[5], "body": {**lines[5]["body"], "temperature": 0.5}}
    ws.write_input("job", lines)
    opened = count_index_opens(monkeypatch)

    result = apply_workspace([str(ws.root)], WAIT)

    assert result.exit_code == 0
    assert opened["check"] == 0 and opened["read"] >= 3, opened
    sha = hashlib.sha256(ws.input_path("job").read_bytes()).hexdigest()
    index = ws.root / "state" / "input-index" / f"{sha}.idx"
    monkeypatch.setattr(request_index, "_known_complete", set())  # as a new process
    assert all(request_index.is_complete(index, sha) for _ in range(3))
    assert opened["check"] == 1


def test_a_fresh_apply_opens_a_one_shard_input_to_scan_it_and_to_upload_it(
    tmp_path: Path,
) -> None:
    """The input of a one-shard apply is opened twice: the validating scan and the upload
    (it was three times: the ledger read it again). Counted by an audit hook in the child."""
    ws = local_ws(tmp_path, 50)
    child = textwrap.dedent(
        """
        import sys
        target = sys.argv[1]
        opens = []
        def hook(event, args):
            if event == "open" and isinstance(args[0], str) and args[0] == target:
                opens.append(args[1])
        sys.addaudithook(hook)
        from batchspec.cli.main import main
        try:
            main(["apply", sys.argv[2], "--wait", "--yes", "--poll-interval", "0.05"])
        except SystemExit as done:
            print("OPENS", len(opens), "EXIT", done.code, file=sys.stderr)
        """
    )
    target = str(ws.input_path("job").resolve())
    done = subprocess.run(
        [sys.executable, "-c", child, target, str(ws.root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "OPENS 2 EXIT 0" in done.stderr, done.stderr
    assert len(ws.outputs("job")) == 50


def test_a_sharded_input_with_crlf_and_blank_lines_is_indexed_exactly(tmp_path: Path) -> None:
    """CRLF line endings, blank lines and a last line without a newline: the three shard
    files hold exactly the request bytes, and every ledger row (line, shard, size,
    fingerprint) is what parsing the input line by line gives."""
    ws = local_ws(tmp_path, 1, per_batch=4)
    lines = [json.dumps(line).encode() for line in request_lines(10, prefix="c")]
    data = b"\r\n".join(lines[:3]) + b"\r\n\n  \r\n" + b"\n".join(lines[3:7]) + b"\n\n"
    data += b"\n".join(lines[7:])  # no newline at the end
    ws.input_path("job").write_bytes(data)

    result = apply_workspace([str(ws.root)], WAIT)

    assert result.exit_code == 0
    requests = list(iter_requests(ws.input_path("job")))
    shard_of = {r.line: i // 4 for i, r in enumerate(requests)}
    assert ledger(ws) == expected_ledger(ws.input_path("job"), shard_of)
    shard_files = {p.read_bytes() for p in (ws.root / "state" / "shards").glob("*.jsonl")}
    assert shard_files == {b"".join(r.raw + b"\n" for r in requests[k : k + 4]) for k in (0, 4, 8)}
    assert [o["custom_id"] for o in ws.outputs("job")] == [r.custom_id for r in requests]


def test_an_embeddings_input_is_sharded_by_its_indexed_inputs(tmp_path: Path) -> None:
    """/v1/embeddings shards close on the embedding inputs the index counted per request:
    3 + 3 inputs fit a limit of 7, the next 3 open a second shard."""
    body = [{"model": "emb", "input": ["a", "b", "c"]}] * 4
    ws = make_workspace(
        tmp_path,
        providers={"here": local_provider()},
        resources=(
            ResourceSpec(
                "job",
                provider="here",
                spec={
                    "endpoint": "/v1/embeddings",
                    "model": "emb",
                    "limits": {"maxEmbeddingInputsPerBatch": 7},
                },
            ),
        ),
    )
    ws.write_input(
        "job",
        [
            {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": b}
            for i, b in enumerate(body)
        ],
    )

    result = apply_workspace([str(ws.root)], WAIT)

    assert result.exit_code == 0
    assert [row[2] for row in ledger(ws)] == [0, 0, 1, 1]


@pytest.mark.parametrize("per_batch", [None, 20], ids=["as-is", "sharded"])
def test_an_input_changed_after_validation_is_refused_with_nothing_recorded(
    tmp_path: Path, per_batch: int | None
) -> None:
    """An input rewritten between its validation and the submission (here: while the plan
    is reported) is refused: no generation, no upload, no batch (it used to be uploaded, or
    sharded, as it now was, under the hash of what was validated)."""
    ws = local_ws(tmp_path, 40, per_batch=per_batch)
    changed = [dict(line, custom_id=f"new-{i}") for i, line in enumerate(request_lines(40))]

    def rewrite_on_plan(progress: Progress) -> None:
        if progress.event == "plan":
            ws.write_input("job", changed)

    with pytest.raises(InputError, match="changed after it was validated"):
        apply_workspace([str(ws.root)], WAIT, report=rewrite_on_plan)

    with ws.store() as store:
        assert store.generations("job") == []
    assert engine_files(ws) == 0

    result = apply_workspace([str(ws.root)], WAIT)  # validated anew: the new content goes

    assert result.exit_code == 0
    assert [o["custom_id"] for o in ws.outputs("job")] == [f"new-{i}" for i in range(40)]


def test_an_input_changed_while_its_shards_are_copied_leaves_no_generation_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input rewritten after the last check before the copy of its shards (here: as the
    copy starts) is refused with no generation left: one left pending with nothing sent
    made the next run see a spec "still in flight" and refuse to go on without
    --allow-replace, where the refusal said to run the command again."""
    ws = local_ws(tmp_path, 40, per_batch=20)
    changed = [dict(line, custom_id=f"new-{i}") for i, line in enumerate(request_lines(40))]
    copy = intent.copy_shard_spans

    def rewrite_then_copy(*args: Any, **kwargs: Any) -> None:
        ws.write_input("job", changed)
        copy(*args, **kwargs)

    monkeypatch.setattr(intent, "copy_shard_spans", rewrite_then_copy)

    with pytest.raises(InputError, match="changed after it was validated"):
        apply_workspace([str(ws.root)], WAIT)

    monkeypatch.setattr(intent, "copy_shard_spans", copy)
    with ws.store() as store:
        assert store.generations("job") == []
    assert engine_files(ws) == 0

    result = apply_workspace([str(ws.root)], WAIT)  # validated anew: the new content goes

    assert result.exit_code == 0, result.outcome
    assert [o["custom_id"] for o in ws.outputs("job")] == [f"new-{i}" for i in range(40)]


@pytest.mark.parametrize("copied", ["by span", "by line"])
def test_an_input_changed_while_its_shards_are_copied_leaves_no_shard_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copied: str
) -> None:
    """A same-size change to a request of the second shard, made as the shards are copied,
    is refused and leaves no shard file, whole or partial, whether the shards are copied as
    spans or line by line (CRLF: the first shard's file and the second's part were left in
    the shard folder, where nothing removes them)."""
    ws = local_ws(tmp_path, 40, per_batch=20)
    path = ws.input_path("job")
    sep = b"\n" if copied == "by span" else b"\r\n"
    data = path.read_bytes().replace(b"\n", sep)
    path.write_bytes(data)
    at = data.index(b"item 30.")
    changed = data[:at] + b"X" + data[at + 1 :]
    hook = "copy_shard_spans" if copied == "by span" else "shard_and_write"
    copy = getattr(intent, hook)

    def rewrite_then_copy(*args: Any, **kwargs: Any) -> Any:
        path.write_bytes(changed)
        return copy(*args, **kwargs)

    monkeypatch.setattr(intent, hook, rewrite_then_copy)

    with pytest.raises(InputError, match="changed after it was validated"):
        apply_workspace([str(ws.root)], WAIT)

    shards = ws.root / "state" / "shards"
    assert not shards.exists() or list(shards.iterdir()) == []


def test_a_budget_refused_at_its_last_check_leaves_no_shard_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget is checked once more on what the shards measure, as they are written; a
    refusal there leaves no shard file (they were finished, and in a shared state
    published, before that check, where nothing would remove them)."""
    ws = local_ws(tmp_path, 40, per_batch=20)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise BudgetError("over the budget (the test's)")

    monkeypatch.setattr(intent, "check_budget", refuse)

    with pytest.raises(BudgetError):
        apply_workspace([str(ws.root)], WAIT)

    shards = ws.root / "state" / "shards"
    assert not shards.exists() or list(shards.iterdir()) == []
    with ws.store() as store:
        assert store.generations("job") == []


def test_a_request_whose_bytes_changed_since_the_scan_is_not_copied(tmp_path: Path) -> None:
    """Copying an indexed request checks its bytes against the fingerprint the scan took:
    one changed byte (same size, same line) is refused, never written into a batch file."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in request_lines(3)))
    index = tmp_path / "in.idx"
    with index.open("wb") as f:
        writer = RequestIndexWriter(f)
        report = inputs.scan_batch_input(path, index=writer)
        assert report.ok
        writer.finish(report.sha256)
    facts = list(read_request_index(index))
    path.write_bytes(path.read_bytes().replace(b"item 1.", b"item 7."))

    with RequestBytes(path) as source:
        assert source.read(facts[0]) == path.read_bytes().split(b"\n")[0]
        with pytest.raises(InputChangedError):
            source.read(facts[1])


def _indexed(path: Path, tmp: Path) -> tuple[inputs.InputReport, list[request_index.RequestFact]]:
    index = tmp / "in.idx"
    with index.open("wb") as f:
        writer = RequestIndexWriter(f)
        report = inputs.scan_batch_input(path, index=writer)
        assert report.ok, report.problems
        writer.finish(report.sha256)
    return report, list(read_request_index(index))


@pytest.mark.parametrize(
    ("layout", "by_span"),
    [
        ("lf", True),
        ("no final newline", True),
        ("crlf", False),
        ("blank line inside a shard", False),
        ("blank line between shards", True),
    ],
)
def test_shard_files_copied_by_span_are_the_bytes_written_line_by_line(
    tmp_path: Path, layout: str, by_span: bool
) -> None:
    """A shard whose requests lie back to back is copied as one span of the input (no line
    looked at): its file, its requests and bytes are exactly what writing it line by line
    gives; a blank line or a CRLF inside a shard leaves it to the line-by-line copy."""
    lines = [json.dumps(line).encode() for line in request_lines(9)]
    sep = b"\r\n" if layout == "crlf" else b"\n"
    data = sep.join(lines) + (b"" if layout == "no final newline" else sep)
    if layout == "blank line inside a shard":
        data = data.replace(lines[1] + b"\n", lines[1] + b"\n\n")
    if layout == "blank line between shards":
        data = data.replace(lines[3] + b"\n", lines[3] + b"\n \n")
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    report, facts = _indexed(path, tmp_path)
    limits = sharding.ShardLimits(max_requests=4)
    endpoint = "/v1/chat/completions"

    by_line = sharding.ShardWriters(tmp_path / "by-line", enabled=True, source=path)
    lines_per: dict[int, int] = {}
    lines_bytes: dict[int, int] = {}
    for _ in sharding.shard_and_write(facts, limits, endpoint, by_line, lines_per, lines_bytes):
        pass
    expected = by_line.finish()

    per: dict[int, int] = {}
    nbytes: dict[int, int] = {}
    spans = sharding.shard_spans(facts, limits, endpoint, per, nbytes)
    assert (spans is not None) == by_span
    if spans is not None:
        assert (per, nbytes) == (lines_per, lines_bytes)
        writers = sharding.ShardWriters(tmp_path / "by-span", enabled=True)
        sharding.copy_shard_spans(path, spans, writers, report.sha256)
        assert writers.finish() == expected
        for sha in expected.values():
            copied = (tmp_path / "by-span" / f"{sha}.jsonl").read_bytes()
            assert copied == (tmp_path / "by-line" / f"{sha}.jsonl").read_bytes()
            assert hashlib.sha256(copied).hexdigest() == sha


@pytest.mark.parametrize("change", ["a byte of a request", "a byte after the last request"])
def test_a_span_copy_of_a_changed_input_is_refused_and_leaves_no_shard_file(
    tmp_path: Path, change: str
) -> None:
    """The span copy checks the whole input against the content validated (the line-by-line
    copy checks each request's fingerprint): a same-size change anywhere is refused, and no
    shard file, whole or partial, is left."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in request_lines(9)))
    report, facts = _indexed(path, tmp_path)
    spans = sharding.shard_spans(
        facts, sharding.ShardLimits(max_requests=4), "/v1/chat/completions", {}, {}
    )
    assert spans is not None
    data = path.read_bytes()
    at = data.index(b"item 5.") if change == "a byte of a request" else len(data) - 1
    path.write_bytes(data[:at] + (b"X" if data[at : at + 1] != b"X" else b"Y") + data[at + 1 :])
    writers = sharding.ShardWriters(tmp_path / "shards", enabled=True)

    with pytest.raises(InputChangedError, match="changed after it was validated"):
        sharding.copy_shard_spans(path, spans, writers, report.sha256)

    assert list((tmp_path / "shards").iterdir()) == []


def test_a_span_copy_into_a_shard_folder_that_cannot_be_made_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard folder whose parent cannot be made (a read-only workspace) fails as that
    folder's error, not as the input's: it was refused as "cannot read the input again"."""
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in request_lines(4)))
    report, facts = _indexed(path, tmp_path)
    spans = sharding.shard_spans(
        facts, sharding.ShardLimits(max_requests=2), "/v1/chat/completions", {}, {}
    )
    assert spans is not None
    parent = tmp_path / "state"
    mkdir = Path.mkdir

    def read_only_parent(self: Path, *args: Any, **kwargs: Any) -> None:
        if self == parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_parent)
    writers = sharding.ShardWriters(parent / "shards", enabled=True)

    with pytest.raises(PermissionError) as raised:
        sharding.copy_shard_spans(path, spans, writers, report.sha256)

    assert raised.value.filename == str(parent)


@pytest.mark.usefixtures("index_files")
@pytest.mark.parametrize("umask", [0o000, 0o022], ids=["umask-000", "umask-022"])
def test_shard_files_and_request_indexes_are_private_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    """The shard files (state/shards) and request indexes (state/input-index) hold the
    requests as the state and the result store do: their folders are 0700 and their files
    0600 whatever the umask (a world-writable shards folder let another user put their own
    requests under a shard's name, which the next upload sends as they are)."""
    import stat

    ws = local_ws(tmp_path, 30, per_batch=10)
    old = os.umask(umask)
    try:
        assert apply_workspace([str(ws.root)], WAIT).exit_code == 0
    finally:
        os.umask(old)
    for name in ("shards", "input-index"):
        folder = ws.root / "state" / name
        files = [p for p in folder.iterdir() if p.is_file()]
        assert files, name
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, name
        assert {stat.S_IMODE(p.stat().st_mode) & 0o077 for p in files} == {0}, name


@pytest.mark.usefixtures("index_files")
def test_a_lost_index_is_made_again_from_the_unchanged_input(tmp_path: Path) -> None:
    """A run that finds no request index (its folder deleted after the validation) indexes
    the input once more, checks it still hashes to what was validated, and shards it as
    usual."""
    ws = local_ws(tmp_path, 30, per_batch=10)
    index_dir = ws.root / "state" / "input-index"

    def lose_index_on_plan(progress: Progress) -> None:
        if progress.event == "plan":
            for kept in index_dir.iterdir():
                kept.unlink()

    result = apply_workspace([str(ws.root)], WAIT, report=lose_index_on_plan)

    assert result.exit_code == 0
    shard_of = {line: (line - 1) // 10 for line in range(1, 31)}
    assert ledger(ws) == expected_ledger(ws.input_path("job"), shard_of)
    sha = hashlib.sha256(ws.input_path("job").read_bytes()).hexdigest()
    assert [p.name for p in index_dir.iterdir()] == [f"{sha}.idx"]


def test_an_input_only_touched_after_validation_is_not_a_change(tmp_path: Path) -> None:
    """A new mtime with the same bytes is scanned again and found unchanged: the apply
    goes on (the stat only decides when to look again, the content decides)."""
    ws = local_ws(tmp_path, 20)

    def touch_on_plan(progress: Progress) -> None:
        if progress.event == "plan":
            stat = ws.input_path("job").stat()
            os.utime(ws.input_path("job"), ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

    result = apply_workspace([str(ws.root)], WAIT, report=touch_on_plan)

    assert result.exit_code == 0
    assert len(ws.outputs("job")) == 20


def _count_scandir(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every folder ``os.scandir`` lists from now on."""
    listed: list[str] = []
    real = os.scandir

    def counting(path: Any = ".") -> Any:
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    return listed


@pytest.mark.usefixtures("index_files")
def test_indexes_unused_for_the_keep_window_are_pruned_when_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that wrote an index removes, when it ends, those unused for ``INDEX_KEEP_S``
    (a lost index costs one re-read), once for the run, not once per index written (a pass
    over 1,000 new inputs scanned the folder 1,000 times); an index just used by
    ``request_index`` is kept however old it was."""
    folder = tmp_path / "input-index"
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(line) + "\n" for line in request_lines(2)))
    second.write_text("".join(json.dumps(line) + "\n" for line in request_lines(3)))
    stale = folder / ("0" * 64 + ".idx")
    with InputCache(None, index_dir=folder) as cache:
        sha = cache.scan(first).sha256
        folder.joinpath(stale.name).write_bytes(b"old")
        long_ago = time.time() - INDEX_KEEP_S - 60
        for path in (stale, folder / f"{sha}.idx"):
            os.utime(path, (long_ago, long_ago))
        assert len(list(cache.request_facts(first, sha))) == 2  # used: fresh again
        scans = _count_scandir(monkeypatch)
        other = cache.scan(second).sha256
        assert scans == []  # not while the run goes on
    assert len(scans) == 1

    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{sha}.idx", f"{other}.idx"])


def _collect_peak(root: Path, count: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Peak Python memory (tracemalloc) above its start of each collect step of an apply
    of ``count`` requests: downloading into the store, the ledger, the result files."""
    from batchspec.core.reconcile import collect

    peaks = [0]

    def measured(step: Any) -> Any:
        def run(*args: Any, **kwargs: Any) -> Any:
            tracemalloc.reset_peak()
            start = tracemalloc.get_traced_memory()[0]
            try:
                return step(*args, **kwargs)
            finally:
                peaks[0] = max(peaks[0], tracemalloc.get_traced_memory()[1] - start)

        return run

    monkeypatch.setattr(collect, "_collect_batch", measured(collect._collect_batch))
    monkeypatch.setattr(collect, "_finish_generation", measured(collect._finish_generation))
    ws = local_ws(root, count)
    tracemalloc.start()
    try:
        assert apply_workspace([str(ws.root)], WAIT).exit_code == 0
    finally:
        tracemalloc.stop()
    assert len(ws.outputs("job")) == count
    return peaks[0]


def test_collecting_a_large_output_takes_bounded_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The output file streams into the store, the ledger and the result files a chunk of
    lines at a time (here 500): collecting 12,000 answers peaks at about what 3,000 take,
    never at a copy of the file or of its parsed lines."""
    monkeypatch.setattr(ledger_module, "_CHUNK", 500)
    small = _collect_peak(tmp_path / "small", 3_000, monkeypatch)
    large = _collect_peak(tmp_path / "large", 12_000, monkeypatch)

    assert large < 1.5 * small, (small, large)


@pytest.mark.usefixtures("index_files")
def test_a_swapped_or_damaged_index_is_not_trusted(tmp_path: Path) -> None:
    """An index copied over another input's name, or with one byte of a record flipped, is
    not used: the input is scanned again, and the ledger and results are the input's own
    (the swapped index's custom_ids used to fill the ledger of an as-is shard: the batch's
    answers were never collected, and every later run failed)."""
    ws = make_workspace(
        tmp_path,
        providers={"here": local_provider()},
        resources=(
            ResourceSpec("a", count=30, provider="here"),
            ResourceSpec("b", count=20, provider="here"),
            ResourceSpec(
                "c", count=20, provider="here", spec={"limits": {"maxRequestsPerBatch": 8}}
            ),
        ),
    )
    for name in ("b", "c"):
        lines = request_lines(20)
        ws.write_input(name, [dict(line, custom_id=f"{name}-{i}") for i, line in enumerate(lines)])
    settle()  # so the scans below are kept, with their indexes
    plan_workspace([str(ws.root)])
    index_dir = ws.root / "state" / "input-index"
    sha = {n: hashlib.sha256(ws.input_path(n).read_bytes()).hexdigest() for n in "abc"}
    shutil.copy(index_dir / f"{sha['a']}.idx", index_dir / f"{sha['b']}.idx")
    damaged = index_dir / f"{sha['c']}.idx"
    damaged.write_bytes(damaged.read_bytes().replace(b"c-3", b"c-9", 1))

    result = apply_workspace([str(ws.root)], WAIT)

    assert result.exit_code == 0
    assert [o["custom_id"] for o in ws.outputs("b")] == [f"b-{i}" for i in range(20)]
    assert [o["custom_id"] for o in ws.outputs("c")] == [f"c-{i}" for i in range(20)]
    for name in ("b", "c"):
        with sqlite3.connect(ws.state_path) as db:
            ids = db.execute(
                "select r.custom_id from requests r join generations g on g.id = r.generation_id "
                "where g.resource = ? order by r.line",
                (name,),
            ).fetchall()
        assert [i for (i,) in ids] == [f"{name}-{i}" for i in range(20)]


def test_a_custom_id_longer_than_64_kib_is_indexed(tmp_path: Path) -> None:
    """A request whose custom_id takes more than 65,535 UTF-8 bytes is indexed and answered
    like any other (the index held its length in 16 bits: the scan that validates the input
    crashed with a struct.error traceback)."""
    ws = local_ws(tmp_path, 3)
    lines = request_lines(3)
    lines[1] = dict(lines[1], custom_id="é" * 40_000)  # 80,000 bytes
    ws.write_input("job", lines)

    result = apply_workspace([str(ws.root)], WAIT)

    assert result.exit_code == 0
    assert [o["custom_id"] for o in ws.outputs("job")] == [line["custom_id"] for line in lines]


def test_an_input_changed_while_it_is_uploaded_as_is_is_refused(tmp_path: Path) -> None:
    """An input rewritten (same size) after its last check and before the upload read it
    (here: when the upload is reported) is refused before its batch is created, and the
    file is not recorded under the validated content's hash (it was: the batch ran the
    new bytes as the validated ones, and the file was reused as theirs)."""
    ws = local_ws(tmp_path, 20)
    original = ws.input_path("job").read_bytes()
    changed = original.replace(b"item 1.", b"item 7.")
    assert len(changed) == len(original) and changed != original

    def rewrite_on_upload(progress: Progress) -> None:
        if progress.event == "upload":
            ws.input_path("job").write_bytes(changed)

    with pytest.raises(InputError, match="changed after it was validated"):
        apply_workspace([str(ws.root)], WAIT, report=rewrite_on_upload)

    with ws.store() as store:
        gens = store.generations("job")
        assert [b.remote_id for g in gens for b in store.batches(g.id)] == [None]
        sha = hashlib.sha256(original).hexdigest()
        assert store.get_file("here", sha) is None


# ---------------------------------------------------------------------------------------------
# stricter rules (a provider's dialect, a custom_id pattern), plan and import


def ruled_ws(root: Path, kind: str, base_url: str, count: int, **spec: Any) -> Workspace:
    """One resource ``job`` on a provider of type ``kind`` (``anthropic``: its dialect and
    custom_id pattern; ``together``: its custom_id pattern only)."""
    provider = {"type": kind, "baseUrl": base_url, "apiKeyEnv": KEY_ENV}
    return make_workspace(
        root,
        providers={"p": provider},
        resources=(ResourceSpec("job", count=count, provider="p", spec=spec),),
    )


def native_anthropic_lines(count: int) -> list[dict[str, Any]]:
    """Anthropic's own ``{custom_id, params}`` lines (a generic scan finds them invalid)."""
    params = {"model": "claude-x", "max_tokens": 16}
    return [
        {
            "custom_id": f"n{i}",
            "params": {**params, "messages": [{"role": "user", "content": "hi"}]},
        }
        for i in range(count)
    ]


@pytest.mark.parametrize(
    ("kind", "root"),
    [("anthropic", ""), ("together", "/together/v1")],
    ids=["anthropic-dialect", "custom-id-pattern"],
)
def test_an_apply_under_a_providers_stricter_rules_parses_each_input_line_once(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server: Callable[..., ProbedServer],
    kind: str,
    root: str,
) -> None:
    """An Anthropic manifest (its dialect and custom_id pattern) or a Together one (its
    custom_id pattern) over 3 shards: validation, hashing, sharding and the ledger of 60
    requests parse 60 lines (120 before: the loader hashed the input with a generic scan,
    then the provider's rules read it again); the provider converting lines is not counted."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    srv = server()
    limits = {"maxRequestsPerBatch": 25}
    ws = ruled_ws(tmp_path, kind, srv.base_url + root, 60, limits=limits)
    parsed = count_parses(monkeypatch, besides=("batchspec.engine", "batchspec.providers"))

    result = apply_workspace([str(ws.root)], ApplyOptions(wait=True, poll_interval=0.05, yes=True))

    assert result.exit_code == 0
    assert len(parsed) == 60
    assert [o["custom_id"] for o in ws.outputs("job")] == ws.input_ids("job")
    shard_of = {line: (line - 1) // 25 for line in range(1, 61)}
    assert ledger(ws) == expected_ledger(ws.input_path("job"), shard_of)


@pytest.mark.usefixtures("index_files")
def test_a_lost_index_of_lines_only_their_providers_rules_accept_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Callable[..., ProbedServer]
) -> None:
    """Anthropic {custom_id, params} lines whose request index is lost after validation are
    indexed again and submitted (the generic scan that remakes an index found them invalid
    and kept none: the apply failed with "the input has problems")."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    srv = server()
    spec = {"endpoint": "/v1/messages", "model": "claude-x", "limits": {"maxRequestsPerBatch": 4}}
    ws = ruled_ws(tmp_path, "anthropic", srv.base_url, 10, **spec)
    ws.write_input("job", native_anthropic_lines(10))
    index_dir = ws.root / "state" / "input-index"

    def lose_index_on_plan(progress: Progress) -> None:
        if progress.event == "plan":
            for kept in index_dir.iterdir():
                kept.unlink()

    options = ApplyOptions(wait=True, poll_interval=0.05, yes=True)
    result = apply_workspace([str(ws.root)], options, report=lose_index_on_plan)

    assert result.exit_code == 0
    assert [o["custom_id"] for o in ws.outputs("job")] == [f"n{i}" for i in range(10)]


@pytest.mark.parametrize("kind", ["anthropic-native", "together", "local"])
def test_plan_does_not_read_an_unchanged_input_its_cache_describes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """A second `plan` of an unchanged input parses none of it, under any provider's rules
    (Anthropic {custom_id, params} lines were parsed by every plan: the generic scan that
    hashed them found them invalid, so it was never cached)."""
    if kind == "local":
        ws = local_ws(tmp_path, 20)
    else:
        spec = {"endpoint": "/v1/messages", "model": "claude-x"} if kind != "together" else {}
        ws = ruled_ws(tmp_path, kind.split("-")[0], "http://127.0.0.1:9", 20, **spec)
        if kind == "anthropic-native":
            ws.write_input("job", native_anthropic_lines(20))
    settle()  # so the first plan's scan is kept
    assert plan_workspace([str(ws.root)]).plan.actions[0].requests == 20
    parsed = count_parses(monkeypatch)

    result = plan_workspace([str(ws.root)])

    assert result.plan.actions[0].requests == 20
    assert parsed == []


def test_plan_counts_reusable_answers_from_the_request_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One line of a done 60-request input edited: `plan` (which counts the 59 answers the
    new generation keeps) parses the input once, 60 lines (120 before: it parsed it again to
    count them), and a second plan of the unchanged edit parses nothing (60 before)."""
    ws = local_ws(tmp_path, 60)
    assert apply_workspace([str(ws.root)], WAIT).exit_code == 0
    lines = request_lines(60)
    lines[5] = {**lines[5], "body": {**lines[5]["body"], "temperature": 0.5}}
    ws.write_input("job", lines)
    settle()  # so the first plan's scan is kept
    parsed = count_parses(monkeypatch)

    first = plan_workspace([str(ws.root)])
    parses_of_first = len(parsed)
    second = plan_workspace([str(ws.root)])

    for result in (first, second):
        assert [(a.requests, a.reused) for a in result.plan.actions] == [(1, 59)]
    assert (parses_of_first, len(parsed) - parses_of_first) == (60, 0)


@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "cached"])
def test_import_parses_its_input_once_and_not_at_all_when_cached(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server: Callable[..., ProbedServer],
    cached: bool,
) -> None:
    """`import` validates, hashes and records the ledger of a 40-request input from one
    parse of each line (80 before: the ledger parsed it again), and from none when an
    earlier plan's scan of the unchanged input is cached (40 before); the ledger is the
    input's, line by line."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    srv = server()
    ws = served(tmp_path / "ws", srv, count=40)
    client = srv.client()
    uploaded = client.files.create(
        file=("in.jsonl", ws.input_path("triage").read_bytes()), purpose="batch"
    )
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    if cached:
        settle()
        plan_workspace([str(ws.root)])
    parsed = count_parses(monkeypatch)

    result = import_batch([str(ws.root)], "triage", batch.id)

    assert result.requests == 40
    assert len(parsed) == (0 if cached else 40)
    assert ledger(ws) == expected_ledger(ws.input_path("triage"), {})


def test_an_input_changed_before_import_records_it_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Callable[..., ProbedServer]
) -> None:
    """An input rewritten after its validation, while the remote batch is verified, is
    refused with nothing recorded (its new lines were recorded as the ledger of the
    validated content)."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    srv = server()
    ws = served(tmp_path / "ws", srv, count=10)
    original = ws.input_path("triage").read_bytes()
    client = srv.client()
    uploaded = client.files.create(file=("in.jsonl", original), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    real_verify = lifecycle.verify_remote_input

    def rewrite_then_verify(*args: Any, **kwargs: Any) -> bool:
        ws.write_input(
            "triage", [dict(r, custom_id=f"new-{i}") for i, r in enumerate(request_lines(10))]
        )
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "verify_remote_input", rewrite_then_verify)

    with pytest.raises(InputError, match="changed after it was validated"):
        import_batch([str(ws.root)], "triage", batch.id)

    with ws.store() as store:
        assert store.generations("triage") == []


def _cached_indexes(ws: Workspace) -> list[bytes]:
    """The request indexes kept on the entries of the workspace's input cache."""
    with sqlite3.connect(ws.root / "state" / "input-cache.db") as db:
        rows = db.execute("select request_index from input_scans7").fetchall()
    return [r[0] for r in rows if r[0] is not None]


def test_a_small_inputs_index_is_kept_on_its_cache_entry_not_in_a_file(tmp_path: Path) -> None:
    """A fleet of small inputs writes no index file (1,000 of them cost a first pass about a
    second on a slow disk): each index is kept on its scan's cache entry, and a later run
    that needs it (the plan's count of reusable answers) reads it from there, not the input."""
    ws = make_workspace(
        tmp_path,
        providers={"here": local_provider()},
        resources=tuple(ResourceSpec(f"r{i}", count=5, provider="here") for i in range(3)),
    )
    settle()  # so the scans are kept

    assert apply_workspace([str(ws.root)], WAIT).exit_code == 0

    index_dir = ws.root / "state" / "input-index"
    assert not index_dir.exists() or list(index_dir.iterdir()) == []
    assert len(_cached_indexes(ws)) == 3
    for i in range(3):
        assert [o["custom_id"] for o in ws.outputs(f"r{i}")] == ws.input_ids(f"r{i}")


def test_a_damaged_or_missing_cached_index_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small input's cached index with a custom_id changed in the cache database, or gone
    from it, is not used: the input is scanned again (once), and the plan, the ledger and the
    results are the input's own."""
    ws = local_ws(tmp_path, 60)
    assert apply_workspace([str(ws.root)], WAIT).exit_code == 0
    lines = request_lines(60)
    lines[5] = {**lines[5], "body": {**lines[5]["body"], "temperature": 0.5}}
    ws.write_input("job", lines)
    settle()  # so the plan's scan is kept, with its index
    plan_workspace([str(ws.root)])
    [kept] = [i for i in _cached_indexes(ws) if b"req-3" in i]
    damaged = kept.replace(b"req-3", b"req-9", 1)
    with sqlite3.connect(ws.root / "state" / "input-cache.db") as db:
        db.execute(
            "update input_scans7 set request_index = ? where request_index = ?", (damaged, kept)
        )
    parsed = count_parses(monkeypatch)

    assert [(a.requests, a.reused) for a in plan_workspace([str(ws.root)]).plan.actions] == [
        (1, 59)
    ]
    assert len(parsed) == 60  # scanned again: the damaged index was refused
    with sqlite3.connect(ws.root / "state" / "input-cache.db") as db:
        db.execute("update input_scans7 set request_index = null")
    result = apply_workspace([str(ws.root)], WAIT)

    assert result.exit_code == 0
    assert len(parsed) == 120
    assert [o["custom_id"] for o in ws.outputs("job")] == ws.input_ids("job")
    with ws.store() as store:
        [gen] = [g for g in store.generations("job") if g.status == "complete"][-1:]
        assert store.ledger().state_counts(gen.id) == {"ok": 60}


def test_small_indexes_past_the_memory_cap_go_to_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a run holds ``INLINE_TOTAL_MAX_BYTES`` of small inputs' indexes (here: after the
    first), the next ones are written to files as a large input's are: a fleet of many small
    inputs takes bounded memory, and every resource is still answered line for line."""
    monkeypatch.setattr(inputcache, "INLINE_TOTAL_MAX_BYTES", 1)
    ws = make_workspace(
        tmp_path,
        providers={"here": local_provider()},
        resources=tuple(ResourceSpec(f"r{i}", count=5, provider="here") for i in range(3)),
    )
    for i in range(3):  # three contents, three indexes
        ws.write_input(f"r{i}", request_lines(5, prefix=f"r{i}-"))

    assert apply_workspace([str(ws.root)], WAIT).exit_code == 0

    assert len(list((ws.root / "state" / "input-index").glob("*.idx"))) == 2
    for i in range(3):
        assert [o["custom_id"] for o in ws.outputs(f"r{i}")] == ws.input_ids(f"r{i}")
