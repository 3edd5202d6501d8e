"""Attacks on "a failed download stops only its resource" (``reconcile.collect``): a body cut
off mid-stream, the errors file failing while the output file came, one shard of several, a
key that may not read files (401/403: the apply stops at once), and the key never in a
``download-failed`` event or line. A real engine over loopback behind a gateway that refuses
or truncates one file's content; real SQLite; the CLI's own entry point."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from servers import EngineServer, request_lines, wait_for
from slow_gateway import (
    SlowGateway,
    gated_and_slow_workspace,
    gated_workspace,
)
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, Workspace, run_cli

from batchspec.engine.upstreams import BuiltinUpstream
from batchspec.state.store import StateStore

CREATE = "POST /v1/batches"


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def _ended(
    ws: Workspace, srv: EngineServer, capsys: pytest.CaptureFixture[str], *names: str
) -> dict[str, list[tuple[str, str | None]]]:
    """Submit (no wait), wait until the engine ended every batch; each resource's batches'
    (output file id, errors file id), by shard."""
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    client = srv.client()
    files: dict[str, list[tuple[str, str | None]]] = {}
    with ws.store() as store:
        for name in names:
            batches = store.batches(store.generations(name)[0].id)
            for batch in sorted(batches, key=lambda b: b.shard):
                remote = wait_for(
                    lambda rid=batch.remote_id: (
                        b if (b := client.batches.retrieve(rid or "")).completed_at else None
                    )
                )
                files.setdefault(name, []).append((remote.output_file_id, remote.error_file_id))
    return files


def _content(file_id: str | None) -> str:
    return f"GET /v1/files/{file_id}/content"


def _stored_blobs(ws: Workspace) -> dict[str, bytes]:
    """The result store's files (name: bytes), leftovers of unfinished writes included."""
    root = ws.state_path.parent / "store"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_body_cut_off_mid_stream_is_neither_kept_nor_recorded(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """alpha's output file arrives cut off after half its bytes (the whole Content-Length
    announced, then the connection closes), on the first try and the client's retry: no
    partial file is in the result store, nothing of alpha's batch is recorded (no collect, no
    ledger answer), beta is collected, exit 1; the next apply collects alpha whole from the
    same batch and nothing was created or answered twice."""
    upstream = BuiltinUpstream()
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, upstream)
    files = _ended(ws, srv, capsys, "alpha", "beta")
    route = _content(files["alpha"][0][0])
    gw.truncate.add(route)
    before = _stored_blobs(ws)

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1, out + err
    assert gw.received[route] == 2  # a cut-off body is retried once (maxRetries 1)
    assert "could not download the output file" in out
    assert [r["custom_id"] for r in ws.outputs("beta")] == ws.input_ids("beta")
    with ws.store() as store:
        gen = store.generations("alpha")[0]
        [batch] = store.batches(gen.id)
        assert batch.collected_at is None and batch.output_sha256 is None
        actions = [e.action for e in store.events(resource="alpha")]
        assert "collect" not in actions and "download-failed" in actions
        assert store.ledger().usage_totals(gen.id).requests == 0
    full = srv.client().files.content(files["alpha"][0][0]).content
    new = {k: v for k, v in _stored_blobs(ws).items() if k not in before}
    assert all(v != full[: len(full) // 2] for v in new.values())
    assert not any(k.startswith("tmp") or "part" in k for k in new)

    gw.truncate.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")
    assert gw.received[CREATE] == 2
    assert set(upstream.calls.values()) == {1} and len(upstream.calls) == 9


def test_another_files_content_served_for_a_file_is_not_recorded_as_its_batchs(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """alpha's output file is answered with beta's content (a gateway or cache serving the
    wrong object): none of its lines answers a request alpha's batch carried, so nothing of
    it is recorded and the batch stays not collected (exit 1, said) instead of being taken
    as collected with every request unanswered, retried and paid for again while its real
    answers were never fetched; once the right file is served, the next apply collects it,
    with nothing created or answered twice."""
    upstream = BuiltinUpstream()
    ws, srv, gw = gated_workspace(
        tmp_path,
        serve_engine,
        gateways,
        upstream,
        ResourceSpec("alpha", 2, prefix="a"),
        ResourceSpec("beta", 2, prefix="b"),
    )
    files = _ended(ws, srv, capsys, "alpha", "beta")
    alpha, beta = (_content(files[n][0][0]).split(" ")[1] for n in ("alpha", "beta"))
    gw.swap[alpha] = beta

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1, out + err
    assert "served another file's content" in out and "apply --replace alpha" in out
    assert gw.received[CREATE] == 2
    with ws.store() as store:
        [batch] = store.batches(store.generations("alpha")[0].id)
        assert batch.collected_at is None
        assert store.ledger().usage_totals(batch.generation_id).requests == 0

    gw.swap.clear()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ["a-0", "a-1"]
    assert gw.received[CREATE] == 2
    assert set(upstream.calls.values()) == {1}


def test_a_page_or_a_notice_answered_200_for_a_file_is_not_recorded_as_its_results(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """alpha's output file is answered 200 with an HTML page, then with a JSON notice: no
    line of either answers a request, so neither is recorded and the batch stays not
    collected (exit 1, said), instead of being taken as collected with nothing answered and
    every request retried and paid for again; the next apply collects the real file."""
    upstream = BuiltinUpstream()
    ws, srv, gw = gated_workspace(
        tmp_path, serve_engine, gateways, upstream, ResourceSpec("alpha", 2)
    )
    route = _content(_ended(ws, srv, capsys, "alpha")["alpha"][0][0])
    for body in (b"<html><body>Down for maintenance</body></html>\n", b'{"detail": "busy"}\n'):
        gw.answer_200[route] = body
        code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
        assert code == 1, out + err
        assert "not batch results" in out and "apply --replace alpha" in out
        with ws.store() as store:
            [batch] = store.batches(store.generations("alpha")[0].id)
            assert batch.collected_at is None

    gw.answer_200.clear()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")
    assert gw.received[CREATE] == 1
    assert set(upstream.calls.values()) == {1}


def test_an_errors_file_that_fails_after_the_output_file_came_leaves_both_to_the_next_apply(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """alpha's batch has an output file (3 answers) and an errors file (1 request the
    provider refused); the output downloads, the errors file answers 500: nothing of the
    batch is recorded (the answers are not recorded without the errors, nor the refused
    request taken as unanswered and retried), exit 1; the next apply records both, the
    refused request in alpha's errors file, with nothing created again."""
    upstream = BuiltinUpstream()
    ws, srv, gw = gated_workspace(
        tmp_path, serve_engine, gateways, upstream, ResourceSpec("alpha", 4)
    )
    lines = request_lines(4)
    lines[2]["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    ws.write_input("alpha", lines)
    files = _ended(ws, srv, capsys, "alpha")
    [(output, errors)] = files["alpha"]
    assert errors is not None
    gw.refuse[_content(errors)] = 500

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--json"], capsys)

    assert code == 1, out + err
    assert gw.received[_content(output)] == 1 and gw.received[_content(errors)] == 2
    docs = [json.loads(line) for line in out.splitlines()]
    [failed] = [d for d in docs if d["event"] == "download_failed"]
    assert failed["file"] == "errors" and failed["file_id"] == errors
    with ws.store() as store:
        gen = store.generations("alpha")[0]
        [batch] = store.batches(gen.id)
        assert batch.collected_at is None
        assert store.ledger().usage_totals(gen.id).requests == 0

    gw.refuse.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, out + err  # the refused request is final (a 400), never retried
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ["req-0", "req-1", "req-3"]
    assert [r["custom_id"] for r in ws.errors("alpha")] == ["req-2"]
    assert gw.received[CREATE] == 1
    assert set(upstream.calls.values()) == {1}


def test_one_shard_failing_leaves_the_other_collected_and_nothing_resent(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """alpha in three shards (maxRequestsPerBatch 2): shard 2's output answers 500; shards 1
    and 3 are collected, shard 2 stays ended and not collected, no retry batch is created
    for its requests, exit 1; the next apply collects it and writes all six in input order."""
    upstream = BuiltinUpstream()
    spec = ResourceSpec("alpha", 6, spec={"limits": {"maxRequestsPerBatch": 2}})
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, upstream, spec)
    files = _ended(ws, srv, capsys, "alpha")
    assert len(files["alpha"]) == 3
    gw.refuse[_content(files["alpha"][1][0])] = 500

    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 1, out + err
    with ws.store() as store:
        batches = sorted(store.batches(store.generations("alpha")[0].id), key=lambda b: b.shard)
        assert [b.collected_at is not None for b in batches] == [True, False, True]
        assert [b.attempt for b in batches] == [1, 1, 1]
    assert gw.received[CREATE] == 3

    gw.refuse.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")
    assert gw.received[CREATE] == 3
    assert set(upstream.calls.values()) == {1} and len(upstream.calls) == 6


@pytest.mark.parametrize("status", [401, 403])
def test_a_key_that_may_not_read_files_stops_the_apply_at_once(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
    status: int,
) -> None:
    """A 401/403 on alpha's download is the key's, not the file's: `apply --wait --json`
    records the download-failed event and stops at once with the provider's error (exit 1,
    an error document naming the key's variable, not a not_collected result promising the
    next apply collects it, and no pass after it; `status` says to fix the key); nothing is
    resubmitted, and once the key may read files the next apply collects alpha."""
    upstream = BuiltinUpstream()
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, upstream)
    files = _ended(ws, srv, capsys, "alpha", "beta")
    route = _content(files["alpha"][0][0])
    gw.refuse[route] = status

    argv = ["apply", str(ws.root), "--yes", "--wait", "--json", "--poll-interval", "0.05"]
    code, out, err = run_cli([*argv, "--timeout", "30"], capsys)

    assert code == 1, out + err
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs[-1]["event"] == "error", docs[-1]
    assert f"${KEY_ENV}" in docs[-1]["message"] and SENTINEL_KEY not in out + err
    assert not any(d["event"] == "result" for d in docs)
    assert gw.received[route] == 1  # neither retried by the client nor by a later pass
    with ws.store() as store:
        gen = store.generations("alpha")[0]
        [batch] = store.batches(gen.id)
        assert batch.collected_at is None
        events = [e for e in store.events(resource="alpha") if e.action == "download-failed"]
        assert [e.detail["http_status"] for e in events] == [status]
    code, out, err = run_cli(["status", str(ws.root), "--json"], capsys)
    reason = {r["name"]: r["reason"] for r in json.loads(out)["resources"]}["alpha"]
    assert f"the last try failed with HTTP {status} at " in reason
    assert "fix the key, then `batchspec apply` tries again" in reason

    gw.refuse.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)

    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")
    assert [r["custom_id"] for r in ws.outputs("beta")] == ws.input_ids("beta")
    assert gw.received[CREATE] == 2
    assert set(upstream.calls.values()) == {1}


def test_the_key_is_in_no_download_failed_event_or_line(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway whose 500 quotes the request's Authorization header (a key not shaped like
    sk-...): neither the download_failed line, the summary, stderr nor the download-failed
    event holds the key."""
    key = "PLAINKEY0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    monkeypatch.setenv(KEY_ENV, key)
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, BuiltinUpstream())
    files = _ended(ws, srv, capsys, "alpha", "beta")
    gw.echo_auth = True
    gw.refuse[_content(files["alpha"][0][0])] = 500

    for extra in ([], ["--json"]):
        code, out, err = run_cli(["apply", str(ws.root), "--yes", *extra], capsys)
        assert code == 1, out + err
        assert "you sent Bearer" in out and key not in out + err
    with ws.store() as store:
        events = [e for e in store.events(resource="alpha") if e.action == "download-failed"]
    assert len(events) == 2 and all(key not in json.dumps(e.detail) for e in events)


def test_a_failed_download_with_a_postgresql_state_is_left_to_the_next_apply(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
    postgres_url: str,
) -> None:
    """The same promise on a PostgreSQL state: alpha's output answers 500, beta is
    collected, exit 1 with a download-failed event in the database and alpha's batch not
    collected; the next apply collects alpha from the same batch, nothing created again."""
    upstream = BuiltinUpstream()
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, upstream)
    state = ["--state", postgres_url]
    assert run_cli(["apply", str(ws.root), "--yes", *state], capsys)[0] == 0
    client = srv.client()
    with StateStore.open(postgres_url) as store:
        [alpha] = store.batches(store.generations("alpha")[0].id)
        [beta] = store.batches(store.generations("beta")[0].id)
    ended = {
        rid: wait_for(
            lambda rid=rid: b if (b := client.batches.retrieve(rid)).completed_at else None
        )
        for rid in (alpha.remote_id or "", beta.remote_id or "")
    }
    gw.refuse[_content(ended[alpha.remote_id or ""].output_file_id)] = 500

    code, out, err = run_cli(["apply", str(ws.root), "--yes", *state], capsys)

    assert code == 1, out + err
    assert [r["custom_id"] for r in ws.outputs("beta")] == ws.input_ids("beta")
    with StateStore.open(postgres_url) as store:
        assert store.get_batch(alpha.id).collected_at is None
        actions = [e.action for e in store.events(resource="alpha")]
        assert "download-failed" in actions and "collect" not in actions

    gw.refuse.clear()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", *state], capsys)

    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")
    with StateStore.open(postgres_url) as store:
        assert store.get_batch(alpha.id).collected_at is not None
    assert gw.received[CREATE] == 2 and set(upstream.calls.values()) == {1}


@pytest.mark.parametrize("status", [500, 404])
@pytest.mark.parametrize("command", ["replace", "cancel", "prune"])
def test_a_resource_whose_download_failed_keeps_its_answers_through_replace_or_cancel(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
    command: str,
    status: int,
) -> None:
    """alpha's output answers 500 or 404 (its content route only: the file is listed);
    while it still does, `apply --replace alpha`, `cancel alpha` or `apply --prune` of its
    removed manifest runs: the ended batch's answers are not lost nor paid again. Once the
    file is served, applies (the replacement with --wait) end with alpha's results written
    and every request answered by the provider exactly once."""
    upstream = BuiltinUpstream()
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, upstream)
    files = _ended(ws, srv, capsys, "alpha", "beta")
    gw.refuse[_content(files["alpha"][0][0])] = status
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 1

    manifest = ws.manifest_path("alpha").read_text()
    if command == "replace":
        code, out, err = run_cli(["apply", str(ws.root), "--yes", "--replace", "alpha"], capsys)
    elif command == "prune":  # its manifest removed, then added back once served again
        ws.manifest_path("alpha").unlink()
        code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)
        ws.manifest_path("alpha").write_text(manifest)
    else:
        code, out, err = run_cli(["cancel", "alpha", str(ws.root)], capsys)
    assert code in (0, 1), out + err
    assert "Traceback" not in out + err

    gw.refuse.clear()
    argv = ["apply", str(ws.root), "--yes", "--wait", "--poll-interval", "0.05"]
    code, out, err = run_cli([*argv, "--timeout", "60"], capsys)

    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("alpha")] == ws.input_ids("alpha")
    assert set(upstream.calls.values()) == {1} and len(upstream.calls) == 9


def test_a_timeout_with_a_failed_download_exits_5_and_names_it(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`apply --wait --timeout 1 --json` while beta's batch still runs and alpha's output
    answers 500: exit 5 (the timeout, what CI waits on), the result's outcome `timeout` and
    exit_code 5, and its not_collected names alpha's file; nothing is created again."""
    ws, srv, gw = gated_and_slow_workspace(tmp_path, serve_engine, gateways, 5.0)
    files = _ended(ws, srv, capsys, "alpha")
    gw.refuse[_content(files["alpha"][0][0])] = 500

    argv = ["apply", str(ws.root), "--yes", "--wait", "--json", "--poll-interval", "0.2"]
    code, out, err = run_cli([*argv, "--timeout", "1"], capsys)

    assert code == 5, out + err
    result = next(d for line in out.splitlines() if (d := json.loads(line))["event"] == "result")
    assert result["outcome"] == "timeout" and result["exit_code"] == 5
    assert [(f["resource"], f["file"]) for f in result["not_collected"]] == [("alpha", "output")]
    assert gw.received[CREATE] == 1


def test_a_pruned_batchs_failing_download_is_said_once_a_run_and_not_fetched_every_pass(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """alpha's ended batch answers 404 on its content and alpha's manifest is pruned while
    beta keeps an `apply --wait` polling for seconds: the drain's warning is printed once,
    not once a pass, and the file is asked for once, not on every poll (a pause that
    doubles from 5 s); beta is collected and the run exits 0."""
    ws, srv, gw = gated_and_slow_workspace(tmp_path, serve_engine, gateways, 3.0, beta=1)
    files = _ended(ws, srv, capsys, "alpha")
    content = _content(files["alpha"][0][0])
    gw.refuse[content] = 404
    ws.manifest_path("alpha").unlink()

    argv = ["apply", str(ws.root), "--yes", "--prune", "--wait", "--poll-interval", "0.05"]
    code, out, err = run_cli([*argv, "--timeout", "60"], capsys)

    assert code == 0, out + err
    assert (out + err).count("could not be polled, looked up or collected") == 1, out + err
    assert gw.received[content] == 1
    assert len(ws.outputs("beta")) == 1


def test_a_key_that_may_not_read_a_pruned_batchs_file_stops_before_any_create(
    tmp_path: Path,
    serve_engine: Callable[..., EngineServer],
    gateways: list[SlowGateway],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 401 on the file of a pruned resource's ended batch (the drain's download) stops
    the apply as it does for a current batch: beta, new, is not created with a key whose
    results could not be downloaded either (the drain took it for a passing failure, warned,
    and the same pass went on to spend), and the key stays out of what is printed."""
    upstream = BuiltinUpstream()
    ws, srv, gw = gated_workspace(tmp_path, serve_engine, gateways, upstream)
    assert run_cli(["apply", str(ws.root), "--yes", "-s", "alpha"], capsys)[0] == 0
    with ws.store() as store:
        [batch] = store.batches(store.generations("alpha")[0].id)
    done = wait_for(
        lambda: (b := srv.client().batches.retrieve(batch.remote_id or "")).completed_at and b
    )
    gw.refuse[_content(done.output_file_id)] = 401
    ws.manifest_path("alpha").unlink()

    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--prune"], capsys)

    assert code == 1, out + err
    assert f"${KEY_ENV}" in out + err and SENTINEL_KEY not in out + err
    assert gw.received[CREATE] == 1  # alpha's only: beta was not created
