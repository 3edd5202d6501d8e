"""collect.read_result_lines: every answer line is joined to its request, with its byte span."""

from __future__ import annotations

from pathlib import Path

import pytest
from probes import start_serve_process
from scripted_server import Answer, ScriptedServer
from servers import request_lines, wait_for
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    local_provider,
    make_workspace,
    openai_provider,
    run_cli,
)

from batchspec.core.reconcile.collect import download_to_store, ends_mid_line, read_result_lines
from batchspec.errors import ProviderError
from batchspec.providers.openai import OpenAIProvider
from batchspec.storage.blobstore import BlobStore
from batchspec.storage.result_store import ResultStore

OK = b'{"custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": null}'


WHOLE = OK + b"\n" + OK.replace(b'"a"', b'"b"') + b"\n"


LINE_END = WHOLE.index(b"\n") + 1  # a cut here leaves a shorter file of whole lines


@pytest.mark.parametrize(
    ("answers", "stored"),
    [
        pytest.param([len(WHOLE) - 9, None, None], WHOLE, id="cut-then-whole"),
        pytest.param([None, None], WHOLE, id="whole"),
        pytest.param([len(WHOLE) - 1] * 2, WHOLE[:-1], id="only-the-last-newline-missing"),
        pytest.param([len(WHOLE) - 9] * 6, None, id="cut-every-time"),
        pytest.param([LINE_END, None, None], WHOLE, id="cut-between-two-lines-then-whole"),
        pytest.param([None, LINE_END, None], WHOLE, id="whole-then-cut-between-two-lines"),
    ],
)
def test_a_download_cut_mid_line_without_a_length_is_fetched_again_never_filed(
    scripted: ScriptedServer, tmp_path: Path, answers: list[int | None], stored: bytes | None
) -> None:
    """A file sent without a Content-Length whose connection closed mid-line (to HTTP, a whole
    shorter body) is downloaded again, and never filed: filed, its last answer was skipped
    as unreadable, the batch taken as collected, and that request paid for again. One cut
    between two lines looks whole: a body sent so is kept only once a second download
    brings the same bytes (its missing answers were taken as unanswered and paid again)."""
    scripted.script(*(Answer(200, WHOLE, cut_after=cut, close_delimited=True) for cut in answers))
    provider = OpenAIProvider("srv", base_url=scripted.v1, api_key=None, sleep=lambda _: None)
    blobs = ResultStore(BlobStore(tmp_path / "store"))
    if stored is None:
        with pytest.raises(ProviderError, match="ended in the middle of a line"):
            download_to_store(provider, "file-out", blobs)
        assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []
    else:
        sha = download_to_store(provider, "file-out", blobs)
        assert blobs.ensure_local(sha).read_bytes() == stored
    assert len(scripted.requests) == len(answers)


@pytest.mark.parametrize(
    ("answers", "error"),
    [
        pytest.param([LINE_END, None, LINE_END - 1], "brought different bytes", id="none-alike"),
    ],
)
def test_an_unframed_file_whose_downloads_never_agree_is_not_filed(
    scripted: ScriptedServer, tmp_path: Path, answers: list[int | None], error: str
) -> None:
    """Three downloads of a body sent without a length, no two in a row alike: an error the
    next apply retries, and nothing filed (a cut between lines is not taken for the file)."""
    scripted.script(*(Answer(200, WHOLE, cut_after=cut, close_delimited=True) for cut in answers))
    provider = OpenAIProvider("srv", base_url=scripted.v1, api_key=None, sleep=lambda _: None)
    blobs = ResultStore(BlobStore(tmp_path / "store"))

    with pytest.raises(ProviderError, match=error):
        download_to_store(provider, "file-out", blobs)

    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []
    assert len(scripted.requests) == 3


def test_a_file_sent_with_its_length_is_downloaded_once(
    scripted: ScriptedServer, tmp_path: Path
) -> None:
    """The confirming download is only for a body sent unframed: one with a Content-Length
    (every server batchspec knows, ``serve`` too) is fetched once."""
    scripted.script(Answer(200, WHOLE))
    provider = OpenAIProvider("srv", base_url=scripted.v1, api_key=None, sleep=lambda _: None)
    blobs = ResultStore(BlobStore(tmp_path / "store"))

    sha = download_to_store(provider, "file-out", blobs)

    assert blobs.ensure_local(sha).read_bytes() == WHOLE
    assert len(scripted.requests) == 1


def test_lines_carry_their_byte_spans_and_outcomes(tmp_path: Path) -> None:
    """Offsets and lengths point at each line's JSON (without its newline); blank and
    whitespace-only lines, non-JSON, JSON that is not an object and lines without a string
    custom_id are skipped."""
    failed = b'{"custom_id": "b", "response": {"status_code": 400, "body": {}}, "error": null}'
    skipped = b'not json\n{"no": "id"}\n \t \x0b\n["a"]\n{"custom_id": 5}\n'
    data = OK + b"\n\n" + skipped + failed + b"\r\n"
    path = tmp_path / "out.jsonl"
    path.write_bytes(data)
    lines = list(read_result_lines(path))
    assert [(x.custom_id, x.outcome.state) for x in lines] == [("a", "ok"), ("b", "failed")]
    for x in lines:
        assert data[x.offset : x.offset + x.length].startswith(
            b'{"custom_id": "' + x.custom_id.encode()
        )
        assert data[x.offset + x.length : x.offset + x.length + 1] in (b"\n", b"\r")


def test_lines_the_fast_parser_refuses_are_still_read(tmp_path: Path) -> None:
    """NaN, an escaped lone surrogate and a huge integer are valid to Python's json: such an
    answer must be recorded, not skipped (a skipped answer would be paid for again)."""
    odd = [
        b'{"custom_id": "nan", "response": {"status_code": 200, "body": {"x": NaN}}}',
        b'{"custom_id": "sur", "response": {"status_code": 200, "body": {"t": "\\ud800"}}}',
        b'{"custom_id": "big", "response": {"status_code": 200, "body": {"n": 1'
        + b"0" * 30
        + b"}}}",
    ]
    path = tmp_path / "out.jsonl"
    path.write_bytes(b"\n".join(odd) + b"\n")
    assert [(x.custom_id, x.outcome.state) for x in read_result_lines(path)] == [
        ("nan", "ok"),
        ("sur", "ok"),
        ("big", "ok"),
    ]


def test_a_line_nested_too_deep_to_read_is_skipped_not_a_traceback(tmp_path: Path) -> None:
    """A result line nested deeper than Python's parser goes (a hostile or broken provider)
    is skipped like any unreadable line, and the lines after it are read; as the file's
    last line it reads as cut short. A RecursionError ended the collect with a traceback,
    on every apply."""
    deep = b'{"custom_id": "deep", "response": ' + b"[" * 200_000
    fine = b'{"custom_id": "ok", "response": {"status_code": 200, "body": {}}}'
    path = tmp_path / "out.jsonl"
    path.write_bytes(deep + b"\n" + fine + b"\n")
    assert [x.custom_id for x in read_result_lines(path)] == ["ok"]
    path.write_bytes(fine + b"\n" + deep)
    assert ends_mid_line(path)


@pytest.mark.parametrize(
    ("content", "cut"),
    [
        (b"", False),
        (b"\n", False),
        (b'{"custom_id": "a"}\n{"custom_id": "b"}\n', False),
        (b'{"custom_id": "a"}\n{"custom_id": "b"}', False),  # only its newline missing
        (b'{"custom_id": "a"}\n{"custom_id": "b', True),
        (b'{"custom_id": "a"}\n   ', False),
        (b'{"custom_id": "a', True),
    ],
)
def test_a_file_is_cut_mid_line_only_when_its_last_line_is_not_whole(
    tmp_path: Path, content: bytes, cut: bool
) -> None:
    """``ends_mid_line`` tells a file ending in a newline by its last byte, and reads the
    last line back only when there is none."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    assert ends_mid_line(path) is cut


def test_a_batch_whose_ledger_was_never_written_is_still_collected_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run that died after its create but before writing the request ledger: the next
    apply writes the ledger from the input before collecting, so every paid answer lands in
    the results (without it, the answers would match no request and be bought again)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", count=4, provider="here")],
    )
    code, _, err = run_cli(["apply", str(ws.root)], capsys)
    assert code == 0, err
    with ws.store() as store:
        [batch] = store.batches()
        store.db.execute("delete from requests")  # as if the run died before writing them
    assert batch.remote_id is not None

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--poll-interval", "0.05"], capsys)

    assert code == 0, err
    assert [r["custom_id"] for r in ws.outputs("triage")] == ws.input_ids("triage")
    with ws.store() as store:
        [gen] = store.generations("triage")
        assert [b.remote_id for b in store.batches()] == [batch.remote_id]
    assert (gen.status, gen.succeeded, gen.failed) == ("complete", 4, 0)


def test_without_spec_model_the_generation_records_the_inputs_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest naming no model is priced by the model its input lines name (a batch file
    holds one), recorded on the generation when its results are written; without it the
    spend of the job shows as unknown."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("triage", count=3, provider="here")],
    )
    manifest = ws.manifest_path("triage")
    manifest.write_text(manifest.read_text().replace("  model: test-model\n", ""))
    ws.write_input("triage", request_lines(3, model="gpt-4o-mini"))

    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--poll-interval", "0.05"], capsys)

    assert code == 0, err
    with ws.store() as store:
        [gen] = store.generations("triage")
        [collected] = [e.detail for e in store.events(resource="triage") if e.action == "collect"]
    assert gen.spec.get("model") is None
    assert (gen.status, gen.model) == ("complete", "gpt-4o-mini")
    assert collected["answered"] == 3  # the audit trail counts the answers it recorded


def test_a_rejection_names_its_first_five_input_lines_and_counts_the_rest() -> None:
    """When a provider rejects a whole batch the user is told where, at input lines, five at
    most, then how many more; a line without a code or message still says so."""
    from batchspec.core.reconcile.collect import _rejection_text

    errors = [
        {"input_line": n, "message": f"bad {n}", "code": "line_too_large"} for n in range(1, 8)
    ]
    text = _rejection_text(errors)
    assert text.startswith("; the provider rejected it: input line 1: bad 1 (line_too_large)")
    assert "input line 5: bad 5" in text and "input line 6" not in text
    assert text.endswith(" and 2 more")
    assert _rejection_text(errors[:6]).endswith(" and 1 more")
    assert _rejection_text(errors[:5]).endswith("input line 5: bad 5 (line_too_large)")
    assert _rejection_text([{}]) == "; the provider rejected it: rejected (no code)"
    assert _rejection_text([]) == ""


def test_results_symlinked_out_of_the_workspace_after_the_load_are_refused_at_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A results folder swapped for a symlink to a folder outside the workspace once the batch
    is created: writing the results is refused and nothing lands outside (without the check,
    a job's answers would be written wherever the link points)."""
    from batchspec.core.apply import ApplyOptions, apply_workspace
    from batchspec.core.reconcile import Progress
    from batchspec.errors import BatchspecError

    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here")],
    )
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def swap_in_a_link(progress: Progress) -> None:
        results = ws.root / "results"
        if progress.event == "create" and not results.is_symlink():
            if results.is_dir():
                results.rmdir()
            results.symlink_to(outside, target_is_directory=True)

    with pytest.raises(BatchspecError, match="outside"):
        apply_workspace(
            [str(ws.root)], ApplyOptions(wait=True, poll_interval=0.05), report=swap_in_a_link
        )
    assert list(outside.iterdir()) == []


def test_a_user_cancel_records_the_unanswered_lines_failed_not_retryable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`batchspec cancel` mid-batch: the lines the provider cancelled are recorded failed
    (batch_cancelled is retryable, but not when the user asked for it), so the results count
    them as failed with none unresolved, and nothing is sent again (a cancel that leaves
    them retryable would buy them on a later run)."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    srv = start_serve_process(
        tmp_path / "engine", "--upstream-latency", "0.05", "--concurrency", "1"
    )
    try:
        ws = make_workspace(
            tmp_path / "ws",
            providers={"srv": openai_provider(srv.v1, KEY_ENV)},
            resources=(ResourceSpec("triage", count=40),),
        )
        client = srv.client()
        code, _, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
        assert code == 0, err
        [remote] = client.batches.list().data
        wait_for(lambda: client.batches.retrieve(remote.id).request_counts.completed >= 3)
        code, _, err = run_cli(["cancel", "triage", str(ws.root)], capsys)
        assert code == 0, err
        wait_for(lambda: client.batches.retrieve(remote.id).status == "cancelled", timeout=30)

        code, out, err = run_cli(
            ["apply", str(ws.root), "--wait", "--yes", "--poll-interval", "0.05"], capsys
        )

        assert code == 0, out + err
        answered = len(ws.outputs("triage"))
        assert 0 < answered < 40
        with ws.store() as store:
            [gen] = store.generations("triage")
            [event] = [e.detail for e in store.events(resource="triage") if e.action == "results"]
            states = dict(store.db.execute("select state, count(*) from requests group by 1"))
        assert (gen.status, gen.succeeded, gen.failed) == ("cancelled", answered, 40 - answered)
        assert (event["failed"], event["unresolved"]) == (40 - answered, 0)
        assert states == {"ok": answered, "failed": 40 - answered}
        assert len(client.batches.list().data) == 1
    finally:
        srv.stop()


def test_collect_and_results_lines_group_counts_by_thousands() -> None:
    """The collect and results lines write counts as the poll lines and the summary do
    (``20,000``): a large batch read '20,000/20,000' and then 'wrote 20000 results'."""
    from batchspec.core.reconcile.collect import _lines_text, wrote_text

    assert _lines_text({True: 20000, False: 0}) == "20,000 answers"
    assert _lines_text({True: 1, False: 1500}) == "1 answer, 1,500 errors"
    text = wrote_text(12000, 3400, Path("results/x.jsonl"), Path("results/x.errors.jsonl"))
    assert text.startswith("wrote 12,000 results to ") and ", 3,400 errors to " in text


def test_a_pass_resolves_the_folder_it_writes_results_into_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks before writing result files resolve their folder's symlinks once a pass
    (a fleet writes a thousand resources into one folder), not each file's whole path:
    realpath is asked for the results folder only, never for a result file."""
    import os

    from batchspec.core.apply import ApplyOptions, apply_workspace
    from batchspec.core.reconcile.context import RunContext

    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec(name, provider="here") for name in ("a", "b", "c")],
    )
    results = str((ws.root / "results").resolve())
    asked: list[str] = []
    checking = [False]
    realpath, check = os.path.realpath, RunContext.check_result_paths

    def counted(path: str, *args: object, **kwargs: object) -> str:
        if checking[0] and str(path).startswith(results):
            asked.append(str(path))
        return realpath(path, *args, **kwargs)  # type: ignore[arg-type]

    def checked(self: RunContext, res: object) -> None:
        checking[0] = True
        try:
            check(self, res)  # type: ignore[arg-type]
        finally:
            checking[0] = False

    monkeypatch.setattr(os.path, "realpath", counted)
    monkeypatch.setattr(RunContext, "check_result_paths", checked)
    apply_workspace(
        [str(ws.root)], ApplyOptions(wait=True, poll_interval=0.05), report=lambda _: None
    )
    assert sorted((ws.root / "results").iterdir())  # the three resources' results
    assert asked and set(asked) == {results}, asked
