"""Tests for batchspec.wire.inputs: the streaming validator of OpenAI batch JSONL input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from batchspec.errors import InputError
from batchspec.wire.inputs import (
    MAX_SHOWN,
    READ_CHUNK_BYTES,
    InputReport,
    RequestLine,
    file_sha256,
    iter_requests,
    require_valid_input,
    scan_batch_input,
)

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
ANTHROPIC_ID = r"^[a-zA-Z0-9_-]{1,64}$"


def req(custom_id: Any = "req-1", *, drop: tuple[str, ...] = (), **fields: Any) -> bytes:
    """One request line (no line ending); ``fields`` override, ``drop`` removes top-level keys."""
    line: dict[str, Any] = {
        "custom_id": custom_id,
        "method": "POST",
        "url": CHAT,
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    }
    line.update(fields)
    for key in drop:
        del line[key]
    return json.dumps(line, ensure_ascii=False).encode()


def body(**fields: Any) -> dict[str, Any]:
    """A chat body with ``fields`` overriding (``model=None`` keeps an explicit null)."""
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **fields}


def no_model_body() -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}]}


def jsonl(*lines: bytes, end: bytes = b"\n") -> bytes:
    return b"".join(line + end for line in lines)


def write(tmp_path: Path, data: bytes, name: str = "input.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def found(report: InputReport) -> list[tuple[int | None, str]]:
    return [(p.line, p.code) for p in report.problems]


GOOD = req("req-0")

# (file bytes, scan kwargs, expected line, expected code, fragment of the message)
BAD_INPUTS = [
    pytest.param(
        jsonl(GOOD, b'{"custom_id": "req-1", "method": '),
        {},
        2,
        "invalid_json_line",
        "invalid JSON",
        id="truncated-json",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1") + b" x"),
        {},
        2,
        "invalid_json_line",
        "invalid JSON",
        id="trailing-garbage",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1") + req("req-2")),
        {},
        2,
        "invalid_json_line",
        "invalid JSON",
        id="two-objects-on-one-line",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(temperature="NaN")).replace(b'"NaN"', b"NaN")),
        {},
        2,
        "invalid_json_line",
        "invalid JSON",
        id="nan-literal",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(top_p="I")).replace(b'"I"', b"-Infinity")),
        {},
        2,
        "invalid_json_line",
        "invalid JSON",
        id="infinity-literal",
    ),
    pytest.param(
        jsonl(GOOD, b'{"custom_id": "req-\\ud800", "method": "POST"}'),
        {},
        2,
        "invalid_json_line",
        "surrogate",
        id="lone-surrogate-escape",
    ),
    pytest.param(
        jsonl(GOOD, b'{"custom_id": "x", "body": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        {},
        2,
        "invalid_json_line",
        "invalid JSON",
        id="nested-too-deeply",
    ),
    pytest.param(
        jsonl(GOOD, b" \x0c "),
        {},
        2,
        "invalid_json_line",
        "invalid JSON",
        id="form-feed-is-not-blank",
    ),
    pytest.param(
        jsonl(GOOD, b"[1, 2]"),
        {},
        2,
        "not_an_object",
        "JSON array",
        id="array-line",
    ),
    pytest.param(
        jsonl(GOOD, b'"hello"'),
        {},
        2,
        "not_an_object",
        "JSON string",
        id="string-line",
    ),
    pytest.param(jsonl(GOOD, b"null"), {}, 2, "not_an_object", "JSON null", id="null-line"),
    pytest.param(
        jsonl(GOOD, req("req-1").replace(b"req-1", b"req-\xff")),
        {},
        2,
        "invalid_utf8",
        "0xff",
        id="invalid-utf8-byte",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1").replace(b"hi", b"\xe6\x9d")),
        {},
        2,
        "invalid_utf8",
        "not valid UTF-8",
        id="truncated-utf8-sequence",
    ),
    pytest.param(
        jsonl(b"\xef\xbb\xbf" + GOOD),
        {},
        1,
        "byte_order_mark",
        "byte-order mark",
        id="utf8-bom",
    ),
    pytest.param(
        jsonl(GOOD, req(drop=("custom_id",))),
        {},
        2,
        "missing_custom_id",
        "custom_id is missing",
        id="custom-id-missing",
    ),
    pytest.param(
        jsonl(GOOD, req(None)),
        {},
        2,
        "missing_custom_id",
        "custom_id is missing",
        id="custom-id-null",
    ),
    pytest.param(
        jsonl(GOOD, req(7)),
        {},
        2,
        "invalid_custom_id",
        "not a number",
        id="custom-id-number",
    ),
    pytest.param(
        jsonl(GOOD, req(["a"])),
        {},
        2,
        "invalid_custom_id",
        "not a array",
        id="custom-id-array",
    ),
    pytest.param(
        jsonl(GOOD, req("")),
        {},
        2,
        "invalid_custom_id",
        "custom_id is empty",
        id="custom-id-empty",
    ),
    pytest.param(
        jsonl(GOOD, req("has space")),
        {"custom_id_pattern": ANTHROPIC_ID},
        2,
        "invalid_custom_id",
        "'has space' does not match",
        id="custom-id-pattern",
    ),
    pytest.param(
        jsonl(GOOD, req("x" * 65)),
        {"custom_id_pattern": ANTHROPIC_ID},
        2,
        "invalid_custom_id",
        "does not match",
        id="custom-id-too-long-for-pattern",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1"), req("req-0")),
        {},
        3,
        "duplicate_custom_id",
        "duplicate custom_id 'req-0' (first seen on line 1)",
        id="duplicate-custom-id",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", method="GET")),
        {},
        2,
        "invalid_method",
        "method is 'GET'",
        id="method-get",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", method="post")),
        {},
        2,
        "invalid_method",
        "must be 'POST'",
        id="method-lower-case",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", drop=("method",))),
        {},
        2,
        "invalid_method",
        "method is missing",
        id="method-missing",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", method=1)),
        {},
        2,
        "invalid_method",
        "a number",
        id="method-number",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", drop=("url",))),
        {"endpoint": CHAT},
        2,
        "missing_url",
        "url is missing; it must be '/v1/chat/completions'",
        id="url-missing",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", url=42)),
        {},
        2,
        "invalid_url",
        "not a number",
        id="url-number",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", url="/v1/embeddings")),
        {"endpoint": CHAT},
        2,
        "url_mismatch",
        "differs from the endpoint '/v1/chat/completions'",
        id="url-differs-from-endpoint",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", url="/v1/completions")),
        {},
        2,
        "url_mismatch",
        "differs from '/v1/chat/completions' on line 1",
        id="url-differs-from-first-line",
    ),
    pytest.param(
        jsonl(req("req-0", url="/chat/completions")),
        {"endpoint": CHAT},
        1,
        "url_mismatch",
        "'/chat/completions' differs",
        id="unversioned-url-is-strict-by-default",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", drop=("body",))),
        {},
        2,
        "missing_body",
        "body is missing",
        id="body-missing",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=None)),
        {},
        2,
        "missing_body",
        "body is missing",
        id="body-null",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body="hello")),
        {},
        2,
        "invalid_body",
        "not a string",
        id="body-string",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=no_model_body())),
        {},
        2,
        "missing_model",
        "body.model is missing",
        id="model-missing",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(model=None))),
        {},
        2,
        "missing_model",
        "body.model is missing",
        id="model-null",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(model=4))),
        {},
        2,
        "invalid_model",
        "not a number",
        id="model-number",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(model=""))),
        {},
        2,
        "invalid_model",
        "not empty",
        id="model-empty",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(messages=[]))),
        {},
        2,
        "invalid_messages",
        "body.messages of custom_id 'req-1' is empty; a chat line needs a message",
        id="messages-empty",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body={"model": MODEL})),
        {},
        2,
        "missing_messages",
        "body.messages of custom_id 'req-1' is missing",
        id="messages-missing",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(messages="hi"))),
        {},
        2,
        "invalid_messages",
        "must be a list, not a string",
        id="messages-string",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(messages=[{"role": "usr", "content": "hi"}]))),
        {},
        2,
        "invalid_role",
        'body.messages[0].role "usr" is not one of system, developer, user, assistant, tool, '
        "function (custom_id 'req-1')",
        id="message-role-unknown",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(messages=[{"role": "user", "content": "a"}, "b"]))),
        {},
        2,
        "invalid_message",
        "body.messages[1] must be an object, not a string (custom_id 'req-1')",
        id="message-not-an-object",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(messages=[{"content": "hi"}]))),
        {},
        2,
        "missing_role",
        "body.messages[0].role is missing; it must be one of system, developer, user, "
        "assistant, tool, function (custom_id 'req-1')",
        id="message-role-missing",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(messages=[{"role": ["user"], "content": "hi"}]))),
        {},
        2,
        "invalid_role",
        'body.messages[0].role ["user"] is not one of',
        id="message-role-a-list",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(messages=[{"role": "User", "content": "hi"}]))),
        {},
        2,
        "invalid_role",
        'role "User" is not one of',
        id="message-role-case",
    ),
    *(
        pytest.param(
            jsonl(GOOD, req("req-1", body=body(max_tokens=bad))),
            {},
            2,
            "invalid_max_tokens",
            f"body.max_tokens {shown} is not an integer >= 1",
            id=f"max-tokens-{name}",
        )
        for name, bad, shown in [
            ("negative", -5, "-5"),
            ("zero", 0, "0"),
            ("string", "100", '"100"'),
            ("fraction", 1.5, "1.5"),
            ("integral-float", 100.0, "100.0"),
            ("boolean", True, "true"),
            ("object", {"value": 5}, '{"value": 5}'),
        ]
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(max_completion_tokens=0))),
        {},
        2,
        "invalid_max_tokens",
        "body.max_completion_tokens 0 is not an integer >= 1 (custom_id 'req-1')",
        id="max-completion-tokens-zero",
    ),
    pytest.param(
        jsonl(
            req(
                "r-1",
                url="/v1/responses",
                body={"model": MODEL, "input": "hi", "max_output_tokens": -1},
            )
        ),
        {"endpoint": "/v1/responses"},
        1,
        "invalid_max_tokens",
        "body.max_output_tokens -1 is not an integer >= 1",
        id="responses-max-output-tokens-negative",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(max_tokens="1" * 5000))),
        {},
        2,
        "invalid_max_tokens",
        'body.max_tokens "11111',
        id="max-tokens-5000-digit-string",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(model="gpt-4o"))),
        {},
        2,
        "model_mismatch",
        "'gpt-4o' differs from 'gpt-4o-mini' on line 1",
        id="model-differs-from-first-line",
    ),
    pytest.param(
        jsonl(GOOD),
        {"model": "gpt-4.1"},
        1,
        "model_mismatch",
        "differs from the manifest's model 'gpt-4.1'",
        id="model-differs-from-manifest",
    ),
    pytest.param(
        jsonl(req("m-1", url="/v1/moderations", body={"input": "x"})),
        {"endpoint": "/v1/moderations", "model": "omni-moderation-latest"},
        1,
        "missing_model",
        "body.model is missing",
        id="moderation-without-model-when-manifest-names-one",
    ),
    pytest.param(
        jsonl(req("e-1", url="/v1/embeddings", body={"input": "x"})),
        {"endpoint": "/v1/embeddings"},
        1,
        "missing_model",
        "body.model is missing",
        id="embeddings-without-model",
    ),
    pytest.param(
        jsonl(GOOD, req("req-1", body=body(pad="x" * 200))),
        {"max_line_bytes": 200},
        2,
        "line_too_large",
        "longer than 200 bytes",
        id="line-too-large",
    ),
    pytest.param(
        jsonl(GOOD) + req("req-1", body=body(pad="x" * 200)),
        {"max_line_bytes": 200},
        2,
        "line_too_large",
        "longer than 200 bytes",
        id="last-line-too-large-no-newline",
    ),
    pytest.param(b"", {}, None, "empty_file", "no requests", id="zero-bytes"),
    pytest.param(b"\n  \r\n\t\n", {}, None, "empty_file", "no requests", id="only-blank-lines"),
    pytest.param(
        jsonl(GOOD, req("req-1"), req("req-2")),
        {"max_requests": 2},
        None,
        "too_many_tasks",
        "3 requests, more than the limit of 2",
        id="too-many-requests",
    ),
]


@pytest.mark.parametrize(("data", "kwargs", "line", "code", "fragment"), BAD_INPUTS)
def test_bad_input_reports_exactly_its_problem(
    tmp_path: Path,
    data: bytes,
    kwargs: dict[str, Any],
    line: int | None,
    code: str,
    fragment: str,
) -> None:
    """Each bad input yields exactly one problem: its code, its line and a clear message."""
    report = scan_batch_input(write(tmp_path, data), **kwargs)
    assert found(report) == [(line, code)]
    assert fragment in report.problems[0].message
    assert report.problem_count == 1
    assert not report.ok


def test_corpus_has_at_least_25_distinct_bad_inputs() -> None:
    """The bad-input corpus keeps its promised breadth: 25+ cases, every id distinct."""
    ids = [p.id for p in BAD_INPUTS]
    assert len(ids) >= 25
    assert len(set(ids)) == len(ids)


def test_one_line_can_have_several_problems_in_rule_order(tmp_path: Path) -> None:
    """A line breaking several rules reports each, in the documented order."""
    bad = req("req-0", method="GET", url="/v1/embeddings", body=body(model="other"))
    report = scan_batch_input(write(tmp_path, jsonl(GOOD, bad)), endpoint=CHAT)
    assert found(report) == [
        (2, "duplicate_custom_id"),
        (2, "invalid_method"),
        (2, "url_mismatch"),
        (2, "model_mismatch"),
    ]


def test_lone_low_surrogate_is_rejected_and_valid_pair_accepted(tmp_path: Path) -> None:
    """Surrogate escapes: a proper pair (an emoji) is fine, a lone low surrogate is not."""
    pair = req("req-0", body=body(note="x")).replace(b'"x"', b'"\\ud83d\\ude42"')
    lone = req("req-1", body=body(note="x")).replace(b'"x"', b'"\\uDC00"')
    report = scan_batch_input(write(tmp_path, jsonl(pair, lone)))
    assert found(report) == [(2, "invalid_json_line")]


# ---------------------------------------------------------------------------------------------
# Good inputs


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(jsonl(req("a"), req("b")), id="trailing-newline"),
        pytest.param(jsonl(req("a"), req("b"), end=b"\r\n"), id="crlf"),
        pytest.param(jsonl(req("a"), req("b"))[:-1], id="no-trailing-newline"),
        pytest.param(jsonl(req("a"), req("b"), end=b"\r\n")[:-2], id="crlf-no-trailing-newline"),
        pytest.param(b"\n \t\r\n" + jsonl(req("a"), b"", b"   ", req("b"), b"\t"), id="blanks"),
        pytest.param(jsonl(b"  " + req("a") + b" ", req("b")), id="padded-lines"),
    ],
)
def test_good_inputs_are_ok(tmp_path: Path, data: bytes) -> None:
    """Line endings, a missing final newline and blank lines all give two valid requests."""
    report = scan_batch_input(write(tmp_path, data), endpoint=CHAT, model=MODEL)
    assert report.ok, report.problems
    assert report.requests == 2
    assert report.problems == ()
    assert report.models == (MODEL,)


ALL_ROLES = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": "Answer in English."},
    {"role": "user", "content": [{"type": "text", "text": "Look it up."}]},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
    {"role": "tool", "tool_call_id": "c1", "content": "found"},
    {"role": "function", "name": "look", "content": "found"},
]


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({"messages": ALL_ROLES}, id="all-six-roles-any-content"),
        pytest.param({"max_tokens": 1}, id="max-tokens-1"),
        pytest.param({"max_tokens": None}, id="max-tokens-null"),
        pytest.param({"max_completion_tokens": 1, "max_tokens": None}, id="max-completion-1"),
        pytest.param({"max_tokens": 10**12}, id="max-tokens-huge"),
        pytest.param({"max_output_tokens": None}, id="max-output-null"),
    ],
)
def test_good_roles_and_output_limits_are_ok(tmp_path: Path, fields: dict[str, Any]) -> None:
    """Every role OpenAI knows, with any content shape, and output limits of 1, null or
    huge are accepted: the chat rules refuse only what every provider refuses."""
    data = jsonl(GOOD, req("req-1", body=body(**fields)))
    report = scan_batch_input(write(tmp_path, data), endpoint=CHAT, model=MODEL)
    assert report.ok, report.problems


@pytest.mark.parametrize("dialect", ["openai", "mistral", "anthropic", "gemini"])
@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        pytest.param(
            {"messages": [{"role": "usr", "content": "hi"}]},
            "invalid_role",
            'body.messages[0].role "usr" is not one of system,',
            id="role",
        ),
        pytest.param(
            {"messages": [7]}, "invalid_message", "body.messages[0] must be an object", id="msg"
        ),
        pytest.param(
            {"max_tokens": -5}, "invalid_max_tokens", "body.max_tokens -5 is not", id="neg"
        ),
        pytest.param(
            {"max_completion_tokens": True},
            "invalid_max_tokens",
            "body.max_completion_tokens true is not",
            id="bool",
        ),
        pytest.param(
            {"temperature": "hot"},
            "invalid_parameter",
            'body.temperature "hot" is not a number >= 0',
            id="temperature-string",
        ),
        pytest.param(
            {"temperature": -0.5},
            "invalid_parameter",
            "body.temperature -0.5 is not a number >= 0",
            id="temperature-negative",
        ),
        pytest.param(
            {"top_p": 2}, "invalid_parameter", "body.top_p 2 is not a number from 0 to 1", id="p"
        ),
        pytest.param({"n": 0}, "invalid_parameter", "body.n 0 is not an integer >= 1", id="n"),
        pytest.param({"seed": 1.5}, "invalid_parameter", "body.seed 1.5 is not an integer", id="s"),
        pytest.param(
            {"frequency_penalty": True},
            "invalid_parameter",
            "body.frequency_penalty true is not a number from -2 to 2",
            id="penalty-bool",
        ),
    ],
)
def test_every_dialect_refuses_a_bad_chat_line_the_same_way(
    tmp_path: Path, dialect: str, fields: dict[str, Any], code: str, fragment: str
) -> None:
    """A message of no OpenAI role, a message that is not an object and an output limit
    below 1 are one problem with one code, whichever provider the line is for (Anthropic and
    Gemini convert the line with the same helper that checks OpenAI's), naming the line's
    custom_id."""
    data = jsonl(req("req-1", body=body(**fields)))
    report = scan_batch_input(write(tmp_path, data), endpoint=CHAT, dialect=dialect)
    if dialect == "anthropic" and set(fields) <= {"n", "seed", "frequency_penalty"}:
        # n, seed and the penalties have no Anthropic equivalent at all: refused as such
        code, fragment = "unmappable_parameter", "cannot be sent to Anthropic"
    assert found(report) == [(1, code)]
    assert fragment in report.problems[0].message
    assert report.problems[0].message.endswith("(custom_id 'req-1')")  # whichever dialect


@pytest.mark.parametrize(
    ("max_tokens", "problems"),
    [
        pytest.param(0, [(1, "invalid_max_tokens")], id="zero"),
        pytest.param("9", [(1, "invalid_max_tokens")], id="string"),
        pytest.param(None, [(1, "missing_max_tokens")], id="null"),
        pytest.param(9, [], id="ok"),
    ],
)
def test_anthropic_params_max_tokens_is_an_integer_of_at_least_1(
    tmp_path: Path, max_tokens: Any, problems: list[tuple[int, str]]
) -> None:
    """Anthropic's own {custom_id, params} line: max_tokens absent is missing_max_tokens, set
    to what no provider takes is invalid_max_tokens, as on a chat line."""
    params = {"model": "claude-x", "max_tokens": max_tokens, "messages": [{"role": "user"}]}
    data = jsonl(json.dumps({"custom_id": "a", "params": params}).encode())
    report = scan_batch_input(write(tmp_path, data), dialect="anthropic")
    assert found(report) == problems


@pytest.mark.parametrize("dialect", ["openai", "mistral", "anthropic", "gemini"])
def test_a_streamed_request_is_refused_in_every_dialect(tmp_path: Path, dialect: str) -> None:
    """`stream: true` asks for an answer no Batch API gives (it is written whole to the output
    file): refused at its line, for every dialect (Anthropic's and Gemini's conversions as a
    parameter they cannot map); false or null are fine."""
    data = jsonl(
        req("a", body=body(stream=True)),
        req("b", body=body(stream=False)),
        req("c", body=body(stream=None)),
        req("d", body=body(stream="yes")),
    )
    report = scan_batch_input(write(tmp_path, data), endpoint=CHAT, dialect=dialect)
    code = "unmappable_parameter" if dialect in ("anthropic", "gemini") else "streamed_request"
    assert found(report) == [(1, code), (4, code)]
    if code == "streamed_request":
        assert "body.stream true: a batched request is not streamed" in (report.problems[0].message)


@pytest.mark.parametrize("dialect", ["openai", "mistral", "anthropic", "gemini"])
def test_sampling_parameters_any_provider_takes_pass(tmp_path: Path, dialect: str) -> None:
    """The edges of each range, and null (not set), are not problems (Anthropic maps only
    temperature and top_p)."""
    more = {} if dialect == "anthropic" else {"n": 1, "seed": -7, "presence_penalty": -2}
    data = jsonl(
        req("a", body=body(temperature=0, top_p=1, **more)),
        req("b", body=body(temperature=1.0, top_p=0.0, **({} if more else {"seed": None}))),
        req("c", body=body(temperature=None, top_p=None)),
    )
    report = scan_batch_input(write(tmp_path, data), endpoint=CHAT, dialect=dialect)
    assert report.ok, report.problems


def test_the_local_providers_servers_judge_sampling_but_never_stream(tmp_path: Path) -> None:
    """strict_params=False (the `local` provider): a model server of the user's own judges
    `temperature: 2.5`, `top_p: "0.9"` (some read it); `stream: true` is still refused: the
    engine writes each answer whole."""
    ok = jsonl(req("a", body=body(temperature=2.5, top_p="0.9", n=0)))
    assert scan_batch_input(write(tmp_path, ok), endpoint=CHAT, strict_params=False).ok
    streamed = jsonl(req("a", body=body(stream=True)))
    report = scan_batch_input(write(tmp_path, streamed), endpoint=CHAT, strict_params=False)
    assert found(report) == [(1, "streamed_request")]


def test_the_engine_leaves_roles_and_output_limits_to_each_request(tmp_path: Path) -> None:
    """check_messages=False (the engine's own scan, as OpenAI's batch validation) accepts a
    file whose lines have an unknown role or a bad limit: each is answered per line."""
    data = jsonl(
        req("a", body=body(messages=[{"role": "usr", "content": "hi"}])),
        req("b", body=body(messages=["hi"], max_tokens=-5)),
    )
    assert scan_batch_input(write(tmp_path, data), check_messages=False).ok
    assert not scan_batch_input(write(tmp_path, data)).ok


def test_blank_lines_keep_physical_line_numbers(tmp_path: Path) -> None:
    """Blank lines are not requests but still count when numbering lines."""
    data = jsonl(req("a"), b"", b"  \r", req("b", method="GET"))
    report = scan_batch_input(write(tmp_path, data))
    assert report.requests == 2
    assert report.blank_lines == 2
    assert found(report) == [(4, "invalid_method")]


def test_embeddings_lines_are_ok(tmp_path: Path) -> None:
    """Embeddings requests validate against their own endpoint and model."""
    lines = [
        req(f"e-{i}", url="/v1/embeddings", body={"model": "text-embedding-3-small", "input": "x"})
        for i in range(3)
    ]
    report = scan_batch_input(
        write(tmp_path, jsonl(*lines)), endpoint="/v1/embeddings", model="text-embedding-3-small"
    )
    assert report.ok, report.problems
    assert report.models == ("text-embedding-3-small",)


def test_moderation_lines_may_omit_the_model(tmp_path: Path) -> None:
    """/v1/moderations lines may omit body.model when the manifest names none."""
    lines = [req(f"m-{i}", url="/v1/moderations", body={"input": "x"}) for i in range(2)]
    report = scan_batch_input(write(tmp_path, jsonl(*lines)), endpoint="/v1/moderations")
    assert report.ok, report.problems
    assert report.models == ()


def test_unversioned_url_accepted_when_allowed(tmp_path: Path) -> None:
    """allow_unversioned_url (Azure's older form) treats /chat/completions as /v1/…."""
    data = jsonl(req("a", url="/chat/completions"), req("b"))
    report = scan_batch_input(write(tmp_path, data), endpoint=CHAT, allow_unversioned_url=True)
    assert report.ok, report.problems


def test_custom_id_pattern_accepts_matching_ids(tmp_path: Path) -> None:
    """A custom_id that fully matches the pattern passes."""
    report = scan_batch_input(
        write(tmp_path, jsonl(req("ok_id-1"), req("x" * 64))), custom_id_pattern=ANTHROPIC_ID
    )
    assert report.ok, report.problems


def test_max_requests_at_the_limit_is_ok(tmp_path: Path) -> None:
    """Exactly max_requests request lines is allowed; blank lines do not count."""
    report = scan_batch_input(write(tmp_path, jsonl(req("a"), b"", req("b"))), max_requests=2)
    assert report.ok, report.problems


# ---------------------------------------------------------------------------------------------
# Long lines and chunk boundaries


def test_line_longer_than_a_read_chunk_is_joined_whole(tmp_path: Path) -> None:
    """A valid line spanning several read chunks is parsed whole and numbered right."""
    big = req("big", body=body(pad="y" * (READ_CHUNK_BYTES * 2 + 123)))
    data = jsonl(req("a"), big, req("b", method="GET"), end=b"\r\n")
    report = scan_batch_input(write(tmp_path, data))
    assert report.requests == 3
    assert found(report) == [(3, "invalid_method")]
    assert [r.raw for r in iter_requests(tmp_path / "input.jsonl")] == [
        req("a"),
        big,
        req("b", method="GET"),
    ]


def test_over_long_line_spanning_chunks_is_skipped_and_counted(tmp_path: Path) -> None:
    """An over-long multi-chunk line is one problem; the lines after it keep their numbers."""
    big = req("big", body=body(pad="y" * (READ_CHUNK_BYTES * 3)))
    data = jsonl(req("a"), big, req("a"))
    report = scan_batch_input(write(tmp_path, data), max_line_bytes=READ_CHUNK_BYTES)
    assert report.requests == 3
    assert found(report) == [(2, "line_too_large"), (3, "duplicate_custom_id")]


def test_line_exactly_at_the_limit_is_ok_even_with_crlf(tmp_path: Path) -> None:
    """The limit counts the line's bytes without its CRLF ending."""
    line = req("a")
    report = scan_batch_input(write(tmp_path, line + b"\r\n"), max_line_bytes=len(line))
    assert report.ok, report.problems
    report = scan_batch_input(write(tmp_path, line + b"\r\n"), max_line_bytes=len(line) - 1)
    assert found(report) == [(1, "line_too_large")]


def test_memory_stays_flat_with_an_enormous_line(tmp_path: Path) -> None:
    """A 24 MB single line over the limit is streamed past, never held whole."""
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as f:
        f.write(b'{"custom_id": "x", "pad": "')
        for _ in range(24):
            f.write(b"z" * (1 << 20))
        f.write(b'"}\n')
    tracemalloc.start()
    try:
        report = scan_batch_input(path, max_line_bytes=1 << 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found(report) == [(1, "line_too_large")]
    assert peak < 6 * (1 << 20)


def test_memory_stays_flat_over_many_lines(tmp_path: Path) -> None:
    """Scanning ~24 MB of ordinary lines peaks at a few MB, not the file's size."""
    line = req("x", body=body(pad="p" * 4000))
    path = tmp_path / "many.jsonl"
    with path.open("wb") as f:
        for i in range(6000):
            f.write(line.replace(b'"x"', f'"id-{i}"'.encode()) + b"\n")
    tracemalloc.start()
    try:
        report = scan_batch_input(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.requests == 6000
    assert path.stat().st_size > 20 * (1 << 20)
    assert peak < 8 * (1 << 20)


# ---------------------------------------------------------------------------------------------
# Reporting: shown vs counted, hash, size, models


def test_first_20_problems_shown_and_the_rest_counted(tmp_path: Path) -> None:
    """Only MAX_SHOWN problems are kept, in file order; problem_count counts them all."""
    data = jsonl(*(req(f"r{i}", method="GET") for i in range(30)))
    report = scan_batch_input(write(tmp_path, data))
    assert MAX_SHOWN == 20
    assert len(report.problems) == 20
    assert [p.line for p in report.problems] == list(range(1, 21))
    assert report.problem_count == 30


def test_file_level_problem_is_shown_first(tmp_path: Path) -> None:
    """A file-level problem is never hidden behind 20 line problems."""
    data = jsonl(*(req(f"r{i}", method="GET") for i in range(25)))
    report = scan_batch_input(write(tmp_path, data), max_requests=10)
    assert report.problems[0].code == "too_many_tasks"
    assert report.problems[0].line is None
    assert len(report.problems) == 20
    assert report.problem_count == 26


def test_sha256_and_bytes_match_the_file(tmp_path: Path) -> None:
    """sha256 and bytes describe the raw file, CRLF and blank lines included."""
    data = jsonl(req("a"), b"  ", req("b"), end=b"\r\n") + b"\n\n"
    path = write(tmp_path, data)
    report = scan_batch_input(path)
    assert report.sha256 == hashlib.sha256(data).hexdigest()
    assert report.bytes == len(data)
    assert file_sha256(path) == report.sha256


def test_sha256_of_a_multi_chunk_file(tmp_path: Path) -> None:
    """The streamed hash is right across read-chunk boundaries, bad lines included."""
    data = jsonl(*(req(f"r{i}", body=body(pad="q" * 3000)) for i in range(800)), b"oops")
    path = write(tmp_path, data)
    assert len(data) > 2 * READ_CHUNK_BYTES
    report = scan_batch_input(path)
    assert report.sha256 == hashlib.sha256(data).hexdigest() == file_sha256(path)
    assert found(report) == [(801, "invalid_json_line")]


def test_models_are_reported_in_first_seen_order(tmp_path: Path) -> None:
    """models lists each distinct body.model once, in the order first seen."""
    data = jsonl(*(req(f"r{i}", body=body(model=m)) for i, m in enumerate("bacab")))
    report = scan_batch_input(write(tmp_path, data))
    assert report.models == ("b", "a", "c")
    assert [p.line for p in report.problems] == [2, 3, 4]
    assert all("differs from 'b' on line 1" in p.message for p in report.problems)


def test_long_values_are_cut_short_in_messages(tmp_path: Path) -> None:
    """A huge custom_id does not flood the message."""
    data = jsonl(req("k" * 5000), req("k" * 5000))
    report = scan_batch_input(write(tmp_path, data))
    assert found(report) == [(2, "duplicate_custom_id")]
    assert len(report.problems[0].message) < 200


def test_unreadable_path_raises_input_error(tmp_path: Path) -> None:
    """A missing file is an InputError naming the path, not an OSError."""
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match="nope.jsonl: cannot read the batch input"):
        scan_batch_input(missing)


# ---------------------------------------------------------------------------------------------
# require_valid_input


def test_require_valid_input_returns_the_report_when_ok(tmp_path: Path) -> None:
    """A valid file returns its report."""
    report = require_valid_input(write(tmp_path, jsonl(req("a"))), endpoint=CHAT, model=MODEL)
    assert report.ok and report.requests == 1


def test_require_valid_input_error_names_path_and_line(tmp_path: Path) -> None:
    """The InputError says how many problems and lists them as path:line: message."""
    path = write(tmp_path, jsonl(req("a"), b"", req("a")))
    with pytest.raises(InputError) as caught:
        require_valid_input(path)
    err = caught.value
    assert err.message == f"{path}: 1 problem(s) in the batch input"
    assert err.details == [f"{path}:3: duplicate custom_id 'a' (first seen on line 1)"]


def test_a_custom_id_used_three_times_names_its_first_line_each_time(tmp_path: Path) -> None:
    """An id on lines 1, 3 and 4: both repeats point at line 1, where it was first seen, not
    at the latest earlier use."""
    path = write(tmp_path, jsonl(req("a"), req("b"), req("a"), req("a")))
    with pytest.raises(InputError) as caught:
        require_valid_input(path)
    assert caught.value.details == [
        f"{path}:3: duplicate custom_id 'a' (first seen on line 1)",
        f"{path}:4: duplicate custom_id 'a' (first seen on line 1)",
    ]


def test_require_valid_input_lists_20_then_the_rest(tmp_path: Path) -> None:
    """Details show the first 20 problems and then '... and N more'."""
    path = write(tmp_path, jsonl(*(b"[]" for _ in range(23))))
    with pytest.raises(InputError) as caught:
        require_valid_input(path)
    details = caught.value.details
    assert len(details) == 21
    assert details[0] == f"{path}:1: the line is a JSON array, not an object"
    assert details[-1] == "... and 3 more"
    assert caught.value.message == f"{path}: 23 problem(s) in the batch input"


def test_require_valid_input_file_level_detail_has_no_line(tmp_path: Path) -> None:
    """A file-level problem is listed as path: message."""
    path = write(tmp_path, b"\n")
    with pytest.raises(InputError) as caught:
        require_valid_input(path)
    assert caught.value.details == [
        f"{path}: the file has no requests (it is empty or only blank lines)"
    ]


def test_require_valid_input_refuses_unversioned_urls_unless_asked(tmp_path: Path) -> None:
    """Only Azure's checks accept ``/chat/completions``: by default a line whose url is not the
    endpoint's is refused before upload, not sent to a provider that fails the whole batch."""
    path = write(tmp_path, jsonl(req("a", url="/chat/completions"), req("b")))
    with pytest.raises(InputError) as caught:
        require_valid_input(path, endpoint=CHAT)
    assert [d.split(": ", 1)[0] for d in caught.value.details] == [f"{path}:1"]
    assert require_valid_input(path, endpoint=CHAT, allow_unversioned_url=True).ok


def test_an_unparseable_line_does_not_stop_the_scan(tmp_path: Path) -> None:
    """A malformed line is reported and the scan goes on: a duplicate custom_id after it (two
    answers joined to one id) is still caught, every request is counted, and the sha256 (the
    spec hash's input) covers the whole file, not the part before the bad line."""
    data = jsonl(req("a"), b"{not json", req("b"), req("a"))
    report = scan_batch_input(write(tmp_path, data))
    assert found(report) == [(2, "invalid_json_line"), (4, "duplicate_custom_id")]
    assert report.requests == 4
    assert report.sha256 == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# iter_requests


def test_iter_requests_yields_request_lines_in_file_order(tmp_path: Path) -> None:
    """Request lines come back in order with physical line numbers and raw bytes."""
    lines = [req("c"), req("a"), req("b")]
    data = b"\n" + lines[0] + b"\r\n  \n" + lines[1] + b"\n" + lines[2]
    got = list(iter_requests(write(tmp_path, data)))
    assert got == [
        RequestLine(line=2, custom_id="c", raw=lines[0]),
        RequestLine(line=4, custom_id="a", raw=lines[1]),
        RequestLine(line=5, custom_id="b", raw=lines[2]),
    ]


def test_iter_requests_is_lazy(tmp_path: Path) -> None:
    """iter_requests streams: the first line is available before a bad later line is read."""
    path = write(tmp_path, jsonl(req("a"), b"not json"))
    it = iter_requests(path)
    assert next(it).custom_id == "a"
    with pytest.raises(InputError, match=r"input\.jsonl:2: invalid JSON"):
        next(it)


def test_iter_requests_rejects_a_line_without_custom_id(tmp_path: Path) -> None:
    """An unvalidated line without a custom_id raises InputError naming path:line."""
    path = write(tmp_path, jsonl(req("a"), req(drop=("custom_id",))))
    with pytest.raises(InputError, match=r"input\.jsonl:2: no custom_id"):
        list(iter_requests(path))


# ---------------------------------------------------------------------------------------------
# The standard-library backend behaves like orjson


PARITY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["orjson"] = None  # hide orjson: the standard-library backend must run
    from batchspec.wire.inputs import JSON_BACKEND, scan_batch_input
    assert JSON_BACKEND == "json", JSON_BACKEND
    out = {}
    for path in sys.argv[1:]:
        r = scan_batch_input(path)
        out[path] = [[p.line, p.code] for p in r.problems]
    print(json.dumps(out))
    """
)


def test_json_backend_reports_the_same_problems(tmp_path: Path) -> None:
    """Without orjson, every corpus input yields the same (line, code) problems."""
    paths = []
    for i, case in enumerate(BAD_INPUTS):
        data, kwargs = case.values[0], case.values[1]
        if kwargs:  # the script scans with defaults; kwargs-driven cases are covered above
            continue
        paths.append(str(write(tmp_path, data, f"case-{i}.jsonl")))
    proc = subprocess.run(
        [sys.executable, "-c", PARITY_SCRIPT, *paths], capture_output=True, text=True, check=True
    )
    without_orjson = json.loads(proc.stdout)
    assert len(paths) >= 25
    for path in paths:
        expected = [[p.line, p.code] for p in scan_batch_input(path).problems]
        assert without_orjson[path] == expected, path


@pytest.mark.parametrize(
    ("line", "code"),
    [
        pytest.param(b'{"a": NaN}', "invalid_json_line", id="nan"),
        pytest.param(b'{"a": -Infinity}', "invalid_json_line", id="infinity"),
        pytest.param(b"[" * 5000 + b"]" * 5000, "invalid_json_line", id="nested-too-deep"),
        pytest.param(b'{"t": "\\udc00"}', "invalid_json_line", id="lone-surrogate"),
        pytest.param(b'{"t": "\\ud83d\\ude42"}', "ok", id="surrogate-pair"),
        pytest.param(b"\xef\xbb\xbf{}", "byte_order_mark", id="bom"),
        pytest.param(b'{"a": 1', "invalid_json_line", id="truncated"),
        pytest.param(b"\xff{}", "invalid_utf8", id="not-utf8"),
        pytest.param(b'{"x": [1, true, null, "s", {}]}', "ok", id="plain"),
    ],
)
def test_the_standard_library_parser_is_as_strict_as_orjson(line: bytes, code: str) -> None:
    """Without the optional orjson, lines are accepted and refused exactly as with it (same
    problem code): what validate passes must not depend on an extra, or a line the provider
    refuses (NaN, a lone surrogate) would be uploaded and paid for as a failed request."""
    from batchspec.wire import inputs

    def verdict(parse: Any) -> tuple[str, Any]:
        try:
            return ("ok", parse(line))
        except inputs._LineError as err:
            return (err.code, None)

    fallback = verdict(inputs._parse_json)
    assert fallback[0] == code
    if inputs.orjson is not None:
        assert fallback == verdict(inputs._parse_orjson)


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "gemini", "mistral"])
def test_a_request_line_problem_names_its_custom_id_in_every_dialect(
    tmp_path: Path, dialect: str
) -> None:
    """A line without a model, and a chat line whose messages are not a list, say which
    request they are (its custom_id), whatever provider the input is for: a line number
    alone is hard to find again in a generated file."""
    data = jsonl(
        req("needs-a-model", body=no_model_body()),
        req("bare-text", body=body(messages="hi")),
    )
    report = scan_batch_input(write(tmp_path, data), dialect=dialect)
    messages = {p.line: p.message for p in report.problems}
    assert "custom_id 'needs-a-model'" in messages[1]
    assert "custom_id 'bare-text'" in messages[2]
