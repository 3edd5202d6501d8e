"""`batchspec results NAME --format jsonl|csv|parquet [--join]`: results as a dataset.

Every workspace runs on the local engine's builtin stand-in (deterministic answers and usage),
through the real CLI; rows are checked against the result files the run wrote.
"""

from __future__ import annotations

import csv
import io
import json
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from servers import request_lines
from workspaces import (
    ResourceSpec,
    Workspace,
    batchspec_cmd,
    local_provider,
    make_workspace,
    run_cli,
    write_manifest,
)

from batchspec.core.export import ExportSource, export_rows
from batchspec.workspace.manifest import load_workspace

SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "triage",
        "schema": {
            "type": "object",
            "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
        },
    },
}


def applied(tmp_path: Path, capsys: pytest.CaptureFixture[str], lines: list[Any]) -> Workspace:
    """A workspace whose one resource ``triage`` (local builtin, priced $1/$2 per M tokens)
    ran ``lines`` to the end."""
    provider = {**local_provider(), "pricing": {"*": {"input": 1.0, "output": 2.0}}}
    ws = make_workspace(tmp_path / "ws", providers={"srv": provider}, resources=[])
    ws.write_input("triage", lines)

    write_manifest(ws, ResourceSpec("triage"))
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 0, err
    return ws


def with_failure(count: int = 3) -> list[dict[str, Any]]:
    """``count`` chat requests; the middle one has no messages, so the stand-in answers 400."""
    lines = request_lines(count)
    lines[1]["body"]["temperature"] = 3  # out of range: the stand-in answers 400, for good
    return lines


def test_csv_has_one_row_per_request_in_input_order_with_answer_usage_cost_and_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format csv: a header, then every request in input order (a failed one between two
    answers), the chat text, tokens as the answer reports them, cost at the provider's
    price, and the failed request's status and message."""
    ws = applied(tmp_path, capsys, with_failure())
    code, out, err = run_cli(["results", "triage", str(ws.root), "--format", "csv"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["custom_id"] for r in rows] == ["req-0", "req-1", "req-2"]
    assert [r["status"] for r in rows] == ["succeeded", "failed", "succeeded"]
    answers = {o["custom_id"]: o for o in ws.outputs("triage")}
    body = answers["req-0"]["response"]["body"]
    assert rows[0]["answer"] == body["choices"][0]["message"]["content"]
    usage = body["usage"]
    assert (rows[0]["input_tokens"], rows[0]["output_tokens"]) == (
        str(usage["prompt_tokens"]),
        str(usage["completion_tokens"]),
    )
    expected = (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1e6
    assert float(rows[0]["cost_usd"]) == pytest.approx(expected)
    assert rows[1]["answer"] == "" and "temperature" in rows[1]["error_message"]


def test_jsonl_format_is_rows_and_the_default_stays_the_raw_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --format `results` prints the result file byte for byte (as before);
    --format jsonl prints one row object per request, failures included."""
    ws = applied(tmp_path, capsys, with_failure())
    code, out, _ = run_cli(["results", "triage", str(ws.root)], capsys)
    assert code == 0 and out == ws.output_path("triage").read_text()
    code, out, _ = run_cli(["results", "triage", str(ws.root), "--format", "jsonl"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["status"] for r in rows] == ["succeeded", "failed", "succeeded"]
    assert isinstance(rows[0]["input_tokens"], int) and rows[1]["answer"] is None


def test_embeddings_export_the_vector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An embeddings resource's answer is the vector itself (a list in JSONL)."""
    provider = local_provider()
    ws = make_workspace(tmp_path / "ws", providers={"srv": provider}, resources=[])
    ws.write_input("emb", request_lines(2, endpoint="/v1/embeddings"))

    write_manifest(ws, ResourceSpec("emb", spec={"endpoint": "/v1/embeddings"}))
    assert run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)[0] == 0
    code, out, err = run_cli(["results", "emb", str(ws.root), "--format", "jsonl"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    vector = ws.outputs("emb")[0]["response"]["body"]["data"][0]["embedding"]
    assert rows[0]["answer"] == vector and len(vector) > 8


def test_an_answer_asked_as_json_that_does_not_parse_is_kept_and_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request with response_format json_schema whose answer is not JSON (the stand-in
    answers prose) keeps its text, with parse_error set; the row is not dropped."""
    lines = request_lines(2)
    for line in lines:
        line["body"]["response_format"] = SCHEMA
    ws = applied(tmp_path, capsys, lines)
    code, out, _ = run_cli(["results", "triage", str(ws.root), "--format", "csv"], capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 2 and rows[0]["answer"].startswith("[builtin stand-in]")
    assert rows[0]["parse_error"].startswith("the answer is not JSON")
    assert "parsed.label" in rows[0] and rows[0]["parsed.label"] == ""


def test_an_unparsable_json_answer_is_kept_in_jsonl_parquet_and_spec_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same answer asked for as JSON that does not parse keeps its row, text and
    parse_error in JSONL, in Parquet and in a `spec.export` file written by apply."""
    pq = pytest.importorskip("pyarrow.parquet")
    lines = request_lines(3)
    for line in lines:
        line["body"]["response_format"] = SCHEMA
    ws = applied(tmp_path, capsys, lines)
    code, out, err = run_cli(["results", "triage", str(ws.root), "--format", "jsonl"], capsys)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["custom_id"] for r in rows] == ["req-0", "req-1", "req-2"]
    assert all(r["answer"].startswith("[builtin stand-in]") and r["parsed"] is None for r in rows)
    assert all(r["parse_error"].startswith("the answer is not JSON") for r in rows)

    argv = batchspec_cmd("results", "triage", str(ws.root), "--format", "parquet")
    done = subprocess.run(argv, capture_output=True, check=False, env=_env())
    assert done.returncode == 0, done.stderr
    table = pq.read_table(io.BytesIO(done.stdout)).to_pylist()
    assert [(r["custom_id"], r["answer"], r["parse_error"]) for r in table] == [
        (r["custom_id"], r["answer"], r["parse_error"]) for r in rows
    ]

    export = {"path": "../results/triage.export.jsonl", "format": "jsonl"}
    write_manifest(ws, ResourceSpec("triage", spec={"export": [export]}))
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 0, err
    written = (ws.root / "results" / "triage.export.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in written] == rows


def test_json_answers_are_parsed_and_a_flat_schema_becomes_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Answers that are JSON (asked for with a flat json_schema) come back parsed: an object
    in JSONL, one `parsed.NAME` column per property in CSV; a non-JSON answer among them is
    flagged and kept."""
    lines = request_lines(3)
    for line in lines:
        line["body"]["response_format"] = SCHEMA
    ws = applied(tmp_path, capsys, lines)
    out_path = ws.output_path("triage")
    answers = ['{"label": "bug", "score": 0.9}', "not json", '{"label": "ask", "score": 1}']
    edited = []
    for result, text in zip(ws.outputs("triage"), answers, strict=True):
        result["response"]["body"]["choices"][0]["message"]["content"] = text
        edited.append(json.dumps(result))
    (tmp_path / "edited.jsonl").write_text("\n".join(edited) + "\n")
    [res] = load_workspace([str(ws.root)]).resources
    source = ExportSource(res, tmp_path / "edited.jsonl", ws.errors_path("triage"), None)
    rows = list(export_rows(source))
    assert [r["parsed"] for r in rows] == [
        {"label": "bug", "score": 0.9},
        None,
        {"label": "ask", "score": 1},
    ]
    assert rows[1]["parse_error"] and rows[1]["answer"] == "not json"
    assert out_path.exists()

    out_path.write_text((tmp_path / "edited.jsonl").read_text())  # now stale: edited by hand
    argv = ["results", "triage", str(ws.root), "--format", "csv", "--allow-stale"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0 and "Warning" in err
    table = list(csv.DictReader(io.StringIO(out)))
    assert [(r["parsed.label"], r["parsed.score"]) for r in table] == [
        ("bug", "0.9"),
        ("", ""),
        ("ask", "1"),
    ]
    assert "parsed" not in table[0]


def test_join_adds_the_request_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--join on a JSONL input adds each request's messages (as JSON text in CSV)."""
    ws = applied(tmp_path, capsys, request_lines(2))
    argv = ["results", "triage", str(ws.root), "--format", "csv", "--join"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert json.loads(rows[1]["request"]) == request_lines(2)[1]["body"]["messages"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        pytest.param(["--format", "xml"], "'xml' is not one of", id="unknown-format"),
        pytest.param(["--join"], "--join needs --format", id="join-without-format"),
        pytest.param(["--format", "csv", "--json"], "exclude each other", id="format-and-json"),
        pytest.param(["--format", "csv", "--errors"], "takes no --errors", id="format-errors"),
    ],
)
def test_bad_flags_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], says: str
) -> None:
    """An unknown --format, --join without --format, --format with --json or --errors: exit
    64, no rows, and a message about the flags given (not about the others)."""
    ws = applied(tmp_path, capsys, request_lines(1))
    code, out, err = run_cli(["results", "triage", str(ws.root), *extra], capsys)
    assert code == 64 and out == ""
    assert says in err and ("--join" in err) == ("--join" in extra), err


def test_parquet_is_not_written_onto_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format parquet with stdout on a terminal exits 64 saying to redirect it; no bytes."""
    ws = applied(tmp_path, capsys, request_lines(2))
    master, slave = pty.openpty()
    try:
        done = subprocess.run(
            batchspec_cmd("results", "triage", str(ws.root), "--format", "parquet"),
            stdout=slave,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=_env(),
            check=False,
            timeout=60,
        )
        os.set_blocking(master, False)
        try:
            shown = os.read(master, 65536)
        except BlockingIOError:
            shown = b""
    finally:
        os.close(slave)
        os.close(master)
    assert done.returncode == 64, done.stderr
    assert b"redirect it to a file" in done.stderr and b"PAR1" not in shown


def test_join_on_a_rows_input_adds_each_rows_fields_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--join on a rows (CSV) input adds `input.FIELD` columns from the row each request was
    rendered from, multi-line fields included."""
    ws = make_workspace(tmp_path / "ws", providers={"srv": local_provider()}, resources=[])
    rows = ws.root / "data" / "tickets.csv"
    rows.parent.mkdir(parents=True, exist_ok=True)
    rows.write_text('ticket_id,text\n7,"printer on fire"\n9,"two\nlines"\n')
    body = {"model": "test-model", "messages": [{"role": "user", "content": "{{ text }}"}]}
    source = {"rows": "../data/tickets.csv", "id": "t-{{ ticket_id }}", "body": body}

    write_manifest(ws, ResourceSpec("triage", spec={"input": source}))
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 0, err
    argv = ["results", "triage", str(ws.root), "--format", "csv", "--join"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert [(r["custom_id"], r["input.ticket_id"], r["input.text"]) for r in table] == [
        ("t-7", "7", "printer on fire"),
        ("t-9", "9", "two\nlines"),
    ]


def test_join_on_parquet_rows_adds_typed_fields_in_row_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --wait` on a Parquet rows input (three row groups), then --join: JSONL keeps
    each field's type (int, null, list, object), CSV has them as text, and Parquet keeps the
    rows file's int and double columns typed; every format in row order."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    ws = make_workspace(tmp_path / "ws", providers={"srv": local_provider()}, resources=[])
    rows = ws.root / "data" / "tickets.parquet"
    rows.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "ticket_id": [9, 2, 5, 1, 7],
            "text": ["printer on fire", "two\nlines", "ok", None, "last"],
            "tags": [["hw"], [], None, ["a", "b"], ["x"]],
            "meta": [{"p": 1}, {"p": 2}, {"p": 3}, {"p": 4}, {"p": 5}],
            "score": [0.5, 1.5, None, 2.5, 3.0],
        }
    )
    pq.write_table(table, rows, row_group_size=2)
    body = {"model": "test-model", "messages": [{"role": "user", "content": "{{ text }}"}]}
    source = {"rows": "../data/tickets.parquet", "id": "t-{{ ticket_id }}", "body": body}

    write_manifest(ws, ResourceSpec("triage", spec={"input": source}))
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 0, err
    ids = ["t-9", "t-2", "t-5", "t-1", "t-7"]
    assert [r["custom_id"] for r in ws.outputs("triage")] == ids

    argv = ["results", "triage", str(ws.root), "--join", "--format"]
    code, out, err = run_cli([*argv, "jsonl"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["custom_id"] for r in lines] == ids
    assert [r["status"] for r in lines] == ["succeeded"] * 5
    fields = ("input.ticket_id", "input.text", "input.tags", "input.meta", "input.score")
    assert [tuple(r[f] for f in fields) for r in lines] == [
        tuple(row[f.removeprefix("input.")] for f in fields) for row in table.to_pylist()
    ]

    code, out, err = run_cli([*argv, "csv"], capsys)
    assert code == 0, err
    got = list(csv.DictReader(io.StringIO(out)))
    assert [(r["custom_id"], r["input.ticket_id"], r["input.tags"]) for r in got][:2] == [
        ("t-9", "9", '["hw"]'),
        ("t-2", "2", "[]"),
    ]

    done = subprocess.run(
        batchspec_cmd(*argv[:-1], "--format", "parquet"), capture_output=True, env=_env()
    )
    assert done.returncode == 0, done.stderr
    exported = pq.read_table(io.BytesIO(done.stdout))
    assert str(exported.schema.field("input.ticket_id").type) == "int64"
    assert str(exported.schema.field("input.score").type) == "double"
    assert exported.column("input.ticket_id").to_pylist() == [9, 2, 5, 1, 7]
    assert exported.column("input.score").to_pylist() == [0.5, 1.5, None, 2.5, 3.0]
    assert exported.column("input.tags").to_pylist()[0] == '["hw"]'


def test_parquet_through_a_pipe_has_typed_columns_and_the_rows_in_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--format parquet written to a pipe (no tell()) reads back with pyarrow: rows in input
    order, tokens as integers, cost as a float, a failed row's error, in row groups."""
    pq = pytest.importorskip("pyarrow.parquet")
    ws = applied(tmp_path, capsys, with_failure(5))
    argv = batchspec_cmd("results", "triage", str(ws.root), "--format", "parquet")
    done = subprocess.run(argv, capture_output=True, check=False, env=_env())
    assert done.returncode == 0, done.stderr
    table = pq.read_table(io.BytesIO(done.stdout))
    rows = table.to_pylist()
    assert [r["custom_id"] for r in rows] == [f"req-{i}" for i in range(5)]
    assert [r["status"] for r in rows][:2] == ["succeeded", "failed"]
    assert str(table.schema.field("input_tokens").type) == "int64"
    assert str(table.schema.field("cost_usd").type) == "double"
    assert isinstance(rows[0]["cost_usd"], float) and rows[1]["error_message"]


def test_parquet_row_groups_and_typed_flat_schema_and_embedding_vectors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parquet is written in row groups of PARQUET_ROW_GROUP rows; a flat schema's number
    property is a double column (null where the answer did not parse); an embeddings
    answer is a list of doubles."""
    pq = pytest.importorskip("pyarrow.parquet")
    from batchspec.core import export

    monkeypatch.setattr(export, "PARQUET_ROW_GROUP", 2)
    lines = request_lines(3)
    for line in lines:
        line["body"]["response_format"] = SCHEMA
    ws = applied(tmp_path, capsys, lines)
    answers = ['{"label": "bug", "score": 0.9}', "not json", '{"label": "ask", "score": 1}']
    edited = []
    for result, text in zip(ws.outputs("triage"), answers, strict=True):
        result["response"]["body"]["choices"][0]["message"]["content"] = text
        edited.append(json.dumps(result) + "\n")
    ws.output_path("triage").write_text("".join(edited))
    [res] = load_workspace([str(ws.root)]).resources
    source = ExportSource(res, ws.output_path("triage"), ws.errors_path("triage"), None)
    sink = io.BytesIO()
    export.write_export(export.export_rows(source), export.layout_of(source, join=False),
                        "parquet", sink)  # fmt: skip
    parquet = pq.ParquetFile(io.BytesIO(sink.getvalue()))
    assert parquet.metadata.num_row_groups == 2
    table = parquet.read()
    assert str(table.schema.field("parsed.score").type) == "double"
    assert table.column("parsed.score").to_pylist() == [0.9, None, 1.0]
    assert table.column("parse_error").to_pylist()[1].startswith("the answer is not JSON")

    emb = make_workspace(tmp_path / "emb", providers={"srv": local_provider()}, resources=[])
    emb.write_input("emb", request_lines(2, endpoint="/v1/embeddings"))
    write_manifest(emb, ResourceSpec("emb", spec={"endpoint": "/v1/embeddings"}))
    assert run_cli(["apply", str(emb.root), "--yes", "--wait"], capsys)[0] == 0
    [res] = load_workspace([str(emb.root)]).resources
    source = ExportSource(res, emb.output_path("emb"), emb.errors_path("emb"), None)
    sink = io.BytesIO()
    export.write_export(export.export_rows(source), export.layout_of(source, join=False),
                        "parquet", sink)  # fmt: skip
    table = pq.read_table(io.BytesIO(sink.getvalue()))
    assert str(table.schema.field("answer").type) == "list<element: double>"
    vector = emb.outputs("emb")[0]["response"]["body"]["data"][0]["embedding"]
    assert table.column("answer").to_pylist()[0] == vector


def test_parquet_without_pyarrow_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without pyarrow installed, --format parquet exits 1 with one line naming the extra."""
    ws = applied(tmp_path, capsys, request_lines(1))
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, out, err = run_cli(["results", "triage", str(ws.root), "--format", "parquet"], capsys)
    assert code == 1 and out == ""
    assert "pip install 'batchspec[parquet]'" in err and "Traceback" not in err


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("BATCHSPEC_")}


# ---------------------------------------------------------------------------------------------
# spec.export: written by apply


def test_apply_writes_spec_export_with_the_results_and_restores_a_missing_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`spec.export` files are written by apply with the results, byte for byte what
    `results --format` prints; a deleted export is planned as a restore (no network) and
    written again by the next apply."""
    ws = make_workspace(tmp_path / "ws", providers={"srv": local_provider()}, resources=[])
    ws.write_input("triage", with_failure())
    exports = [{"path": "../exports/triage.csv"}, {"path": "../exports/t.jsonl", "join": True}]
    write_manifest(ws, ResourceSpec("triage", spec={"export": exports}))
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 0, err
    csv_path, jsonl_path = ws.root / "exports" / "triage.csv", ws.root / "exports" / "t.jsonl"
    code, out, _ = run_cli(["results", "triage", str(ws.root), "--format", "csv"], capsys)
    assert csv_path.read_text() == out
    rows = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["succeeded", "failed", "succeeded"]
    assert rows[0]["request"] == request_lines(3)[0]["body"]["messages"]

    csv_path.unlink()
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "restore (export file " in out and "exports/triage.csv is missing" in out
    code, _, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 0, err
    assert (
        csv_path.read_text()
        == run_cli(["results", "triage", str(ws.root), "--format", "csv"], capsys)[1]
    )


@pytest.mark.parametrize(
    ("path", "says"),
    [
        pytest.param("../state/x.csv", "inside the state folder", id="state-folder"),
        pytest.param("../state/batchspec.db", "inside the state folder", id="state-db"),
        pytest.param("../data/triage.jsonl", "input", id="own-input"),
        pytest.param("../results/triage.jsonl", "output", id="own-output"),
        pytest.param("triage.yaml", "manifest", id="the-manifest"),
        pytest.param("../batchspec.yaml", "project file", id="project-file"),
        pytest.param("../../outside.csv", "outside the workspace", id="outside"),
        pytest.param("../exports/t.txt", "set `format`", id="unknown-extension"),
    ],
)
def test_an_export_path_that_would_overwrite_what_it_must_not_is_refused_before_upload(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str, says: str
) -> None:
    """spec.export is confined like output: into the state, onto an input, the resource's
    output, a manifest, the project file or outside the workspace is a path-conflict at
    /spec/export/0/path; apply exits 1 and creates no state."""
    ws = make_workspace(tmp_path / "ws", providers={"srv": local_provider()}, resources=[])
    ws.write_input("triage", request_lines(1))
    write_manifest(ws, ResourceSpec("triage", spec={"export": [{"path": path}]}))
    before = ws.manifest_path("triage").read_bytes()
    code, out, err = run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)
    assert code == 1
    assert "/spec/export/0/path" in err and says in err
    assert not ws.state_path.exists() and ws.manifest_path("triage").read_bytes() == before


def test_two_resources_exporting_to_one_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An export file written by two resources (or onto another's output) is refused,
    naming both places."""
    ws = make_workspace(tmp_path / "ws", providers={"srv": local_provider()}, resources=[])
    for name in ("alpha", "beta"):
        ws.write_input(name, request_lines(1))
    write_manifest(ws, ResourceSpec("alpha", spec={"export": [{"path": "../exports/x.csv"}]}))
    write_manifest(ws, ResourceSpec("beta", spec={"export": [{"path": "../results/alpha.jsonl"}]}))
    code, _, err = run_cli(["validate", str(ws.root)], capsys)
    assert code == 1 and "written by two resources" in err
    assert "'alpha'" in err and "'beta'" in err


def test_a_result_file_edited_into_non_json_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output file edited by hand into a line that is not JSON: --format (with
    --allow-stale) exits 1 naming file:line, without a traceback."""
    ws = applied(tmp_path, capsys, request_lines(2))
    lines = ws.output_path("triage").read_text().splitlines()
    ws.output_path("triage").write_text(lines[0] + "\n{broken\n")
    argv = ["results", "triage", str(ws.root), "--format", "csv", "--allow-stale"]
    code, _, err = run_cli(argv, capsys)
    assert code == 1 and "triage.jsonl:2: not a JSON result line" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("export", "says"),
    [
        pytest.param(
            {"path": "../results/t.jsonl", "format": "xml"}, "/spec/export/0/format", id="format"
        ),
        pytest.param({"path": "../results/t.xlsx"}, "/spec/export/0", id="extension"),
        pytest.param({"path": "../results/t.csv", "join": "yes"}, "/spec/export/0/join", id="join"),
    ],
)
def test_a_bad_spec_export_is_refused_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], export: dict[str, Any], says: str
) -> None:
    """An unknown export format, a path whose extension names none (and no format), a
    `join` that is not a boolean: validate and apply exit 1 at the manifest's key; apply
    creates no state and writes no result."""
    ws = make_workspace(tmp_path / "ws", providers={"srv": local_provider()}, resources=[])
    ws.write_input("triage", request_lines(1))
    write_manifest(ws, ResourceSpec("triage", spec={"export": [export]}))
    for argv in (["validate", str(ws.root)], ["apply", str(ws.root), "--yes", "--wait"]):
        code, out, err = run_cli(argv, capsys)
        assert code == 1, out + err
        assert "triage.yaml:" in err and says in err, err
    assert not ws.state_path.exists() and not ws.output_path("triage").exists()


@pytest.mark.parametrize(
    ("body", "answer"),
    [
        pytest.param({"choices": [{"message": {"content": "hi"}}]}, "hi", id="chat-completions"),
        pytest.param({"choices": [{"text": "old"}]}, "old", id="completions"),
        pytest.param({"data": [{"embedding": [0.5, 1.0]}]}, [0.5, 1.0], id="embeddings"),
        pytest.param(
            {
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "tool_use"},
                    {"type": "text", "text": "b"},
                ]
            },
            "ab",
            id="anthropic",
        ),
        pytest.param(
            {
                "output": [
                    {"type": "reasoning", "content": None},
                    {"content": [{"type": "output_text", "text": "r"}, {"type": "refusal"}]},
                ]
            },
            "r",
            id="responses",
        ),
        pytest.param(
            {"candidates": [{"content": {"parts": [{"text": "g"}, {"functionCall": {}}]}}]},
            "g",
            id="gemini",
        ),
        pytest.param({"candidates": [{"content": None}]}, None, id="gemini-empty"),
        pytest.param({"content": [{"type": "tool_use"}]}, None, id="no-text"),
        pytest.param({"choices": [{"message": {"content": 5}}]}, None, id="odd-content"),
        pytest.param({"unknown": 1}, None, id="unknown-shape"),
    ],
)
def test_the_answer_is_read_from_every_endpoint_shape(body: dict[str, Any], answer: Any) -> None:
    """The exported ``answer`` column holds the text (or vector) each endpoint returned,
    joining text parts and leaving out tool calls and reasoning; a shape with no text gives
    None rather than a wrong answer in the user's dataset."""
    from batchspec.core.export import answer_of

    assert answer_of(body) == answer


@pytest.mark.parametrize(
    ("body", "asks"),
    [
        pytest.param({"response_format": {"type": "json_object"}}, True, id="chat-json"),
        pytest.param({"text": {"format": {"type": "json_schema"}}}, True, id="responses-json"),
        pytest.param(
            {"generationConfig": {"responseMimeType": "application/json"}}, True, id="gemini-json"
        ),
        pytest.param({"text": {"format": {"type": "text"}}}, False, id="responses-text"),
        pytest.param({"generation_config": {}}, False, id="gemini-text"),
    ],
)
def test_which_requests_ask_for_json(body: dict[str, Any], asks: bool) -> None:
    """Requests asking for JSON in any provider's dialect are recognised (their answers are
    parsed into columns); others are kept as text."""
    from batchspec.core.export import _asks_json

    assert _asks_json(body) is asks
