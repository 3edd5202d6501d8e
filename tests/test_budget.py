"""Budgets: `spec.budget` and the project's `defaults.budget` bound what a generation may
submit, first attempt and retries together; a step over budget is refused before anything is
uploaded. Checked against a `batchspec serve` process: refusals are proven by the files and
batches the server holds, not by batchspec's word.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from serve_faults import (
    FAST_POLL,
    apply_wait,
    received_batches,
    serve_processes,
    served_workspace,
)
from workspaces import KEY_ENV, ResourceSpec, Workspace, run_cli, write_manifest

from batchspec.core.plan import estimate_input_tokens
from batchspec.wire.usage import DEFAULT_MAX_OUTPUT_TOKENS, max_output_of_request


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-not-checked")


def set_default_budget(ws: Workspace, **budget: int) -> None:
    path = ws.root / "batchspec.yaml"
    project = yaml.safe_load(path.read_text())
    project["defaults"] = {"budget": budget}
    path.write_text(yaml.safe_dump(project, sort_keys=False))


def server_is_empty(client: Any) -> bool:
    return list(client.files.list()) == [] and list(client.batches.list()) == []


def test_plan_shows_requests_and_an_input_token_estimate(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """plan --json reports, per action and in total, the requests it would submit and an
    input-token estimate of about a token per four bytes of input; the text's estimate line
    says what a request without max_tokens is bounded at."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("est", count=12))
    nbytes = ws.input_path("est").stat().st_size

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 0, err
    plan = json.loads(out)
    [action] = plan["actions"]
    assert action["requests"] == 12
    assert action["estimated_input_tokens"] == estimate_input_tokens(nbytes)
    assert nbytes // 5 < action["estimated_input_tokens"] < nbytes // 3
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "12 requests" in out and f"~{estimate_input_tokens(nbytes):,} input tokens" in out
    # its `≤ 4,096 output tokens` a request that sets no max_tokens says where it comes from,
    # as the markdown plan does
    assert "output at each request's max_tokens, its model's most where unset" in out


def test_a_request_budget_refusal_uploads_nothing(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """10 requests against maxRequests 5: apply exits 1 naming the budget, the server holds
    no file and no batch, and the state records no batch."""
    srv = serve()
    spec = {"budget": {"maxRequests": 5}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("capped", count=10, spec=spec))

    code, out, err = apply_wait(ws, capsys)

    assert code == 1
    assert "maxRequests 5" in err and "nothing was uploaded" in err
    assert server_is_empty(srv.client())
    with ws.store() as store:
        assert store.batches() == []
        assert store.runs()[-1].exit_code == 1


def test_the_project_default_budget_applies_and_a_manifest_overrides_it(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """defaults.budget.maxInputTokens too small for the input refuses it (nothing uploaded);
    a manifest raising maxInputTokens overrides that one field and the job runs."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("tokens", count=8))
    set_default_budget(ws, maxInputTokens=20)

    code, out, err = apply_wait(ws, capsys)

    assert code == 1
    assert "maxInputTokens 20" in err
    assert server_is_empty(srv.client())

    write_manifest(
        ws, ResourceSpec("tokens", count=8, spec={"budget": {"maxInputTokens": 1_000_000}})
    )
    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    assert [r["custom_id"] for r in ws.outputs("tokens")] == ws.input_ids("tokens")


def test_a_retry_over_budget_is_refused_and_uploads_nothing(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Budget 12 requests, 10 submitted, all of them fail with 500: resubmitting the 10 would
    make 20, so the retry is refused (exit 1) and the server still holds one input file and
    one batch."""
    srv = serve("--fault-500", "1.0", "--max-attempts", "1")
    spec = {"budget": {"maxRequests": 12}, "retry": {"maxAttempts": 3}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("retry", count=10, spec=spec))

    code, out, err = apply_wait(ws, capsys)

    assert code == 1, out + err
    assert "20 requests" in err and "maxRequests 12" in err
    client = srv.client()
    assert len(list(client.files.list(purpose="batch"))) == 1
    [batch] = received_batches(client)
    assert (batch.attempt, len(batch.error_ids)) == (1, 10)
    with ws.store() as store:
        assert [b.attempt for b in store.batches()] == [1]

    code, out, err = apply_wait(ws, capsys)  # a re-run is refused the same way
    assert code == 1 and "maxRequests 12" in err
    assert len(received_batches(client)) == 1


# -- dollars -----------------------------------------------------------------------------------

PRICING = {"*": {"input": 1.0, "output": 2.0}}  # USD per million tokens, as charged


def set_pricing(ws: Workspace, pricing: dict[str, Any]) -> None:
    path = ws.root / "batchspec.yaml"
    project = yaml.safe_load(path.read_text())
    project["providers"]["srv"]["pricing"] = pricing
    path.write_text(yaml.safe_dump(project, sort_keys=False))


def upper_bound(ws: Workspace, name: str, requests: int, max_tokens: int = 4096) -> float:
    tokens = estimate_input_tokens(ws.input_path(name).stat().st_size)
    return (tokens * 1.0 + requests * max_tokens * 2.0) / 1_000_000


def test_plan_refuses_a_dollar_budget_and_apply_uploads_nothing(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """10 requests without max_tokens (4096 output tokens each at most) priced $1/$2 per
    million: an upper bound over maxCostUSD 0.05. plan says so and exits 1 (with
    --detailed-exitcode too), its JSON shows the estimate, and apply uploads nothing."""
    srv = serve()
    spec = {"budget": {"maxCostUSD": 0.05}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("dear", count=10, spec=spec))
    set_pricing(ws, PRICING)
    bound = upper_bound(ws, "dear", 10)
    assert bound > 0.05

    code, out, err = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 1
    # plan uploads nothing in any case: it says what apply would do
    assert "maxCostUSD 0.05" in err and "; apply would upload nothing" in err
    assert "nothing was uploaded" not in err
    assert f"≤ ${bound:,.4f}" in out and "total:" in out

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 1
    doc = json.loads(out)
    estimate = doc["estimates"]["dear"]
    assert estimate["max_output_tokens"] == 10 * 4096
    assert estimate["max_cost_usd"] == pytest.approx(bound)
    assert doc["estimated_max_cost_usd"] == pytest.approx(bound)
    assert any("maxCostUSD" in r for r in doc["refusals"])

    code, out, err = apply_wait(ws, capsys)
    assert code == 1 and "maxCostUSD 0.05" in err
    assert server_is_empty(srv.client())


def test_a_request_without_a_limit_is_bounded_at_its_models_most(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reasoning model thinks for up to its whole output limit unasked: 10 requests to o3
    without max_tokens are bounded at 100,000 output tokens each, not 4,096, so a dollar
    budget the 4,096 bound fits (it used to pass, and the batch could cost 24x that) is
    refused by plan and apply, and nothing is uploaded. A limit the request sets still
    bounds it."""
    srv = serve()
    spec = {"budget": {"maxCostUSD": 0.5}, "model": "o3-2025-04-16"}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("think", count=10, spec=spec))
    set_pricing(ws, PRICING)
    path = ws.input_path("think")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for line in lines:
        line["body"]["model"] = "o3-2025-04-16"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert upper_bound(ws, "think", 10) < 0.5 < upper_bound(ws, "think", 10, 100_000)

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 1, err
    estimate = json.loads(out)["estimates"]["think"]
    assert estimate["max_output_tokens"] == 10 * 100_000
    assert estimate["max_cost_usd"] == pytest.approx(upper_bound(ws, "think", 10, 100_000))
    code, out, err = apply_wait(ws, capsys)
    assert code == 1 and "maxCostUSD 0.5" in err
    # the refusal says where the bound comes from, and what lowers it
    assert "a request that sets none counts 100,000 (what o3-2025-04-16 may answer)" in err
    assert server_is_empty(srv.client())

    for line in lines:
        line["body"]["max_completion_tokens"] = 2_000
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["estimates"]["think"]["max_output_tokens"] == 10 * 2_000


def test_the_output_bounds_and_the_input_scan_cache_change_together() -> None:
    """Cached input scans hold sums of these bounds: a change of the table that kept the
    cache's table would reuse sums of the old bounds for every unchanged input. On a change,
    rename the table in workspace/inputcache.py (input_scansN+1) and record both here."""
    import hashlib

    from batchspec.wire.usage import UNSET_OUTPUT_BOUNDS
    from batchspec.workspace import inputcache

    table = json.dumps(sorted(UNSET_OUTPUT_BOUNDS.items())).encode()
    assert hashlib.sha256(table).hexdigest()[:16] == "65377ddb913225d2"
    assert "create table if not exists input_scans7 " in inputcache._SCHEMA


@pytest.mark.parametrize(
    ("model", "bound"),
    [
        ("gpt-4o", 16_384),
        ("gpt-4o-mini-2024-07-18", 16_384),
        ("ft:gpt-4o-mini:acme::abc123", 16_384),
        ("openai/gpt-4.1-nano", 32_768),
        ("gpt-4", 8_192),
        ("gpt-4-turbo-2024-04-09", 4_096),
        ("o1-mini", 65_536),
        ("o4-mini", 100_000),
        ("GPT-5.4-pro", 128_000),
        ("models/gemini-2.5-flash", 65_536),
        ("gemini-2.0-flash", 8_192),
        ("gemini-flash-latest", 65_536),
        ("gpt-40", DEFAULT_MAX_OUTPUT_TOKENS),  # not gpt-4's family: a prefix ends at - . :
        ("o10", DEFAULT_MAX_OUTPUT_TOKENS),
        ("claude-sonnet-4-5", DEFAULT_MAX_OUTPUT_TOKENS),  # Anthropic requires a limit
        ("my-vllm-model", DEFAULT_MAX_OUTPUT_TOKENS),
    ],
)
def test_the_output_bound_of_a_request_without_a_limit_follows_its_model_family(
    model: str, bound: int
) -> None:
    """The longest family prefix the name starts with, at a boundary, after a route's or a
    fine-tune's prefix; the default for any other model; times the choices asked for."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    assert max_output_of_request("/v1/chat/completions", chat) == bound
    assert max_output_of_request("/v1/chat/completions", {**chat, "n": 3}) == 3 * bound
    # a Mistral line names no model: the job's
    assert max_output_of_request("/v1/chat/completions", {"messages": []}, model) == bound


def test_a_dollar_budget_on_an_unknown_price_refuses(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model no table or override prices (here through a LiteLLM-routed provider, which is
    never taken for self-hosted) cannot be checked against maxCostUSD: plan and apply refuse,
    naming the model and where to give its price, and nothing is uploaded."""
    srv = serve()
    ws = served_workspace(
        tmp_path / "ws",
        srv,
        ResourceSpec("unpriced", count=2, spec={"budget": {"maxCostUSD": 100}}),
        litellmProvider="openai",
    )
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 1
    assert "price of test-model" in err and "pricing" in err
    assert "unknown price" in out
    code, out, err = apply_wait(ws, capsys)
    assert code == 1 and "price of test-model" in err
    assert server_is_empty(srv.client())


def test_the_plan_bound_holds_for_what_apply_spends(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests that set max_tokens are bounded by it: the plan's dollar bound fits under
    maxCostUSD, apply runs, and the cost recorded from the answers is within the bound."""
    srv = serve()
    ws = served_workspace(
        tmp_path / "ws",
        srv,
        ResourceSpec("bounded", count=6, spec={"budget": {"maxCostUSD": 0.01}}),
    )
    lines = [json.loads(x) for x in ws.input_path("bounded").read_text().splitlines()]
    for line in lines:
        line["body"]["max_tokens"] = 16
    ws.write_input("bounded", lines)
    set_pricing(ws, PRICING)
    bound = upper_bound(ws, "bounded", 6, max_tokens=16)

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 2 or code == 0, err
    assert json.loads(out)["estimates"]["bounded"]["max_cost_usd"] == pytest.approx(bound)
    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    code, out, err = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(out)["resources"]
    assert 0 < status["usage"]["cost_usd"] <= bound


def test_a_retry_over_the_dollar_budget_is_refused(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first attempt of 10 requests fits maxCostUSD; all fail with 500, and retrying the
    10 would double the bound past it: the retry is refused (exit 1) and the server holds
    one batch."""
    srv = serve("--fault-500", "1.0", "--max-attempts", "1")
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("again", count=10))
    set_pricing(ws, PRICING)
    budget = round(upper_bound(ws, "again", 10) * 1.5, 4)
    write_manifest(
        ws,
        ResourceSpec(
            "again",
            count=10,
            spec={"budget": {"maxCostUSD": budget}, "retry": {"maxAttempts": 3}},
        ),
    )

    code, out, err = apply_wait(ws, capsys)

    assert code == 1, out + err
    assert f"maxCostUSD {budget:g}" in err
    assert len(received_batches(srv.client())) == 1


# -- requests of another size than the input's average ------------------------------------------


def chat_line(custom_id: str, content: str) -> dict[str, Any]:
    body = {"model": "test-model", "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def test_a_long_request_added_to_kept_answers_is_measured_not_averaged(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """9 short requests answered; a 12,000-character one is added (the 9 keep their answers):
    sending it alone is ~3,000 input tokens, over maxInputTokens 2,000, though the input's
    average request is ~300. plan and apply refuse it and the server gets no second batch."""
    srv = serve()
    spec = {"budget": {"maxInputTokens": 2000}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("grow", count=9, spec=spec))
    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    lines = [json.loads(x) for x in ws.input_path("grow").read_text().splitlines()]
    ws.write_input("grow", [*lines, chat_line("long", "x" * 12_000)])

    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 1 and "maxInputTokens 2,000" in err, out + err
    code, out, err = apply_wait(ws, capsys)
    assert code == 1 and "maxInputTokens 2,000" in err, out + err
    assert len(received_batches(srv.client())) == 1


def test_a_queued_shard_counts_its_own_size_not_the_average(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two shards, three long requests then three short ones, one batch in flight at a time,
    maxInputTokens just over the whole input: the first apply records both intents (within
    budget) and sends the long shard. The short shard, still queued, is ~75 tokens: counted
    at the input's average (~1,600) on top of the long one's measured bytes, the next plan
    and apply refused it, and the whole workspace stalled until the budget was raised."""
    srv = serve()
    lines = [chat_line(f"big-{i}", "x" * 4000) for i in range(3)]
    lines += [chat_line(f"small-{i}", "hi") for i in range(3)]
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("r"), maxInFlightBatches=1)
    ws.write_input("r", lines)
    budget = estimate_input_tokens(ws.input_path("r").stat().st_size) + 50
    spec = {"budget": {"maxInputTokens": budget}, "limits": {"maxRequestsPerBatch": 3}}
    write_manifest(ws, ResourceSpec("r", spec=spec))
    code, out, err = run_cli(["apply", str(ws.root), "--yes", *FAST_POLL], capsys)
    assert code == 0, out + err
    assert len(received_batches(srv.client())) == 1  # the second shard waits its turn

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, out + err
    plan = json.loads(out)
    small = estimate_input_tokens(ws.input_path("r").stat().st_size) // 10  # ~75 of ~1,600
    # the plan's totals, its action and its spend estimate all count the queued shard itself
    assert 0 < plan["estimated_input_tokens"] < small, plan
    assert plan["actions"][0]["estimated_input_tokens"] == plan["estimated_input_tokens"]
    assert plan["estimates"]["r"]["input_tokens"] == plan["estimated_input_tokens"]
    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    assert len(received_batches(srv.client())) == 2


#: under ``serve --fault-500 0.5`` (seed 0) the first send of each of these succeeds, and the
#: first three sends of LONG_FAILING fail (``engine.upstreams.FaultyUpstream.draw``)
SHORT_SUCCEEDING = ["small-0", "small-4", "small-5", "small-6", "small-8", "small-9"]
LONG_FAILING = "big-1"


def test_retries_of_a_long_request_count_its_own_size(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Six short requests and a long one (~2,000 tokens) that fails every time, against
    maxInputTokens 5,000: the first attempt (~2,250) and one retry (~4,250) fit; a second
    retry would make ~6,300, and is refused, though the input's average request size would
    put it under 3,000."""
    srv = serve("--fault-500", "0.5", "--max-attempts", "1")
    spec = {"budget": {"maxInputTokens": 5000}, "retry": {"maxAttempts": 3}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("long", spec=spec))
    short = [chat_line(cid, f"Say something about {cid}.") for cid in SHORT_SUCCEEDING]
    ws.write_input("long", [*short, chat_line(LONG_FAILING, "x" * 8_000)])

    code, out, err = apply_wait(ws, capsys)

    assert code == 1 and "maxInputTokens 5,000" in err, out + err
    batches = received_batches(srv.client())
    assert [(b.attempt, b.error_ids) for b in batches] == [(1, [LONG_FAILING]), (2, [LONG_FAILING])]
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 1 and "maxInputTokens 5,000" in err, out + err


def test_every_choice_a_request_asks_for_counts_in_the_dollar_bound(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A request asking for n=8 choices of at most 100 tokens may be billed 800 output
    tokens: plan bounds 4 such requests at 3,200, and maxCostUSD a little above the bound
    of one choice each refuses them (nothing is uploaded)."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("many", count=4))
    lines = [json.loads(x) for x in ws.input_path("many").read_text().splitlines()]
    for line in lines:
        line["body"].update(n=8, max_tokens=100)
    ws.write_input("many", lines)
    set_pricing(ws, PRICING)
    budget = round(upper_bound(ws, "many", 4, max_tokens=100) * 2, 6)
    write_manifest(ws, ResourceSpec("many", count=4, spec={"budget": {"maxCostUSD": budget}}))

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 1 and f"maxCostUSD {budget:g}" in err, out + err
    estimate = json.loads(out)["estimates"]["many"]
    assert estimate["max_output_tokens"] == 4 * 8 * 100
    assert estimate["max_cost_usd"] == pytest.approx(upper_bound(ws, "many", 4, max_tokens=800))
    code, out, err = apply_wait(ws, capsys)
    assert code == 1 and f"maxCostUSD {budget:g}" in err, out + err
    assert server_is_empty(srv.client())


@pytest.mark.parametrize(
    "limit",
    [
        pytest.param(100_000.0, id="integral-float"),
        pytest.param("100000", id="digit-string"),
    ],
)
def test_an_output_limit_that_is_not_an_integer_of_at_least_1_is_refused_before_the_budget(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str], limit: Any
) -> None:
    """max_tokens 100000.0 or "100000" (served as 100,000 by lax validators: pydantic,
    protobuf JSON; refused by strict ones, as -5 is by all): what such a request may cost
    depends on the server, so plan and apply refuse the line itself, naming it, under a
    maxCostUSD that the 4,096 bound of a request setting none would pass; nothing is
    uploaded."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("lax", count=2))
    lines = [json.loads(x) for x in ws.input_path("lax").read_text().splitlines()]
    for line in lines:
        line["body"]["max_tokens"] = limit
    ws.write_input("lax", lines)
    set_pricing(ws, PRICING)
    budget = round(upper_bound(ws, "lax", 2) * 2, 6)  # twice the bound at 4,096 a request
    write_manifest(ws, ResourceSpec("lax", count=2, spec={"budget": {"maxCostUSD": budget}}))

    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 1 and "lax.jsonl:1: body.max_tokens" in err, out + err
    assert "is not an integer >= 1" in err
    code, out, err = apply_wait(ws, capsys)
    assert code == 1 and "nothing was uploaded" in err, out + err
    assert server_is_empty(srv.client())


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(-5, id="negative"),
        pytest.param(0, id="zero"),
        pytest.param(True, id="boolean"),
        pytest.param(1.5, id="fraction"),
        pytest.param("-5", id="negative-string"),
        pytest.param([4], id="list"),
        pytest.param("9" * 5000, id="5000-digit-string"),
    ],
)
def test_an_output_limit_no_server_takes_never_lowers_the_bound_nor_raises(bad: Any) -> None:
    """wire.usage reads an output limit no server takes as not set, in a chat body and in
    Gemini's generationConfig (which the scan does not check): the bound of a request that
    sets none, never lower, and never an exception (a 5,000-digit string raised ValueError
    out of the scan: a traceback from validate)."""
    chat = {"model": "m", "max_tokens": bad}
    assert max_output_of_request("/v1/chat/completions", chat) == DEFAULT_MAX_OUTPUT_TOKENS
    gemini = {"generationConfig": {"maxOutputTokens": bad}}
    assert max_output_of_request("/v1beta/generateContent", gemini) == DEFAULT_MAX_OUTPUT_TOKENS
    # a bad limit before a good one does not hide it
    both = {"max_completion_tokens": bad, "max_tokens": 10_000}
    assert max_output_of_request("/v1/chat/completions", both) == 10_000


@pytest.mark.parametrize("limit", [pytest.param(100_000.0), pytest.param("100000")])
def test_gemini_generation_config_limits_are_read_as_protobuf_json_reads_them(limit: Any) -> None:
    """generationConfig.maxOutputTokens 100000.0 or "100000" is 100,000 to Gemini (protobuf
    JSON): the scan does not refuse it there, so the bound is 100,000, not the default."""
    body = {"generationConfig": {"maxOutputTokens": limit}}
    assert max_output_of_request("/v1beta/generateContent", body) == 100_000


#: output tokens alone are priced, at $1 a million: a bound of N output tokens is $N/1e6
OUTPUT_ONLY = {"*": {"input": 0.0, "output": 1.0}}


def limited_line(custom_id: str, max_tokens: int) -> dict[str, Any]:
    line = chat_line(custom_id, f"Say something about {custom_id}.")
    line["body"]["max_tokens"] = max_tokens
    return line


def test_retries_of_a_request_with_a_large_output_limit_count_its_own_limit(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Six requests of max_tokens 10 and one of 100,000 that fails every time, against
    maxCostUSD 0.15 with output at $1 a million: the first attempt (≤ $0.10006) fits, and
    resending the long one (≤ $0.1 more) is refused, though at the input's average output
    limit (~14,300 a request) it would seem to cost $0.014."""
    srv = serve("--fault-500", "0.5", "--max-attempts", "1")
    spec = {"budget": {"maxCostUSD": 0.15}, "retry": {"maxAttempts": 3}}
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("dear", spec=spec))
    set_pricing(ws, OUTPUT_ONLY)
    short = [limited_line(cid, 10) for cid in SHORT_SUCCEEDING]
    ws.write_input("dear", [*short, limited_line(LONG_FAILING, 100_000)])

    code, out, err = apply_wait(ws, capsys)

    assert code == 1 and "maxCostUSD 0.15" in err, out + err
    assert [(b.attempt, b.error_ids) for b in received_batches(srv.client())] == [
        (1, [LONG_FAILING])
    ]
    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 1 and "maxCostUSD 0.15" in err, out + err
    assert json.loads(out)["estimates"]["dear"]["max_output_tokens"] == 100_000


def grown_after_nine_answers(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str], spec: dict[str, Any]
) -> tuple[Workspace, Any]:
    """Nine requests of max_tokens 10 applied and answered, then one of max_tokens 100,000
    added: the next generation keeps the nine answers and sends the one."""
    srv = serve()
    ws = served_workspace(tmp_path / "ws", srv, ResourceSpec("grown", spec=spec))
    set_pricing(ws, OUTPUT_ONLY)
    short = [limited_line(f"short-{i}", 10) for i in range(9)]
    ws.write_input("grown", short)
    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    ws.write_input("grown", [*short, limited_line("long", 100_000)])
    return ws, srv


def test_a_request_with_a_large_output_limit_added_to_kept_answers_counts_its_own_limit(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one request of max_tokens 100,000 added to nine answered (grown_after_nine_answers)
    may cost $0.1 at $1 a million output tokens, over maxCostUSD 0.05, though the input's
    average output limit would make it $0.01. plan and apply refuse it; the server gets no
    second batch."""
    ws, srv = grown_after_nine_answers(tmp_path, serve, capsys, {"budget": {"maxCostUSD": 0.05}})

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 1 and "maxCostUSD 0.05" in err, out + err
    assert json.loads(out)["estimates"]["grown"]["max_output_tokens"] == 100_000
    code, out, err = apply_wait(ws, capsys)
    assert code == 1 and "maxCostUSD 0.05" in err, out + err
    assert len(received_batches(srv.client())) == 1


def test_the_plans_output_bound_is_of_the_requests_sent_even_without_a_budget(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without any budget, the plan's "≤ N output tokens" of a new generation that keeps
    answers is still the bound of the requests it sends: 100,000 for the one added request,
    not the input's average share (an understated bound in the consent prompt)."""
    ws, _ = grown_after_nine_answers(tmp_path, serve, capsys, {})

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 0, out + err
    assert json.loads(out)["estimates"]["grown"]["max_output_tokens"] == 100_000
    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert "≤ 100,000 output tokens" in out, out
