"""Usage per request and cost in dollars: read from each answer, kept in the ledger, priced.

The end-to-end tests apply against the engine's OpenAI API over loopback (its builtin
upstream reports usage in every answer) and read the figures back with `status`, `history`
and `show` in `--json`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from probes import ProbedServer
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, make_workspace, run_cli, served

from batchspec.core.spend import Usage, price_for, price_table
from batchspec.state.ledger import CollectedLine
from batchspec.state.store import StateStore
from batchspec.wire.outcomes import Outcome
from batchspec.wire.usage import LineUsage, usage_of_line
from batchspec.workspace.project import ProviderConfig

FAST = ["--poll-interval", "0.05"]


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def ok(body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": "a", "response": {"status_code": 200, "body": body}}


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param(
            ok({"usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}}),
            LineUsage(12, 5),
            id="openai-chat",
        ),
        pytest.param(
            ok({"usage": {"prompt_tokens": 8, "total_tokens": 8}}), LineUsage(8, 0), id="embedding"
        ),
        pytest.param(
            ok(
                {
                    "usage": {
                        "input_tokens": 10,
                        "cache_creation_input_tokens": 100,
                        "cache_read_input_tokens": 1000,
                        "output_tokens": 7,
                    }
                }
            ),
            LineUsage(1110, 7),
            id="anthropic-with-cache",
        ),
        pytest.param(
            ok(
                {
                    "usageMetadata": {
                        "promptTokenCount": 9,
                        "candidatesTokenCount": 4,
                        "thoughtsTokenCount": 3,
                    }
                }
            ),
            LineUsage(9, 7),
            id="gemini",
        ),
        pytest.param(
            {"custom_id": "a", "error": {"code": "batch_expired", "message": "x"}},
            None,
            id="error-line",
        ),
        pytest.param(ok({"choices": []}), None, id="no-usage"),
        pytest.param(
            ok({"usage": {"prompt_tokens": "12", "completion_tokens": -3}}),
            LineUsage(0, 0),
            id="garbage-counts",
        ),
    ],
)
def test_usage_of_line_reads_each_dialect(line: dict[str, Any], expected: LineUsage | None) -> None:
    """Usage is read from OpenAI, Anthropic and Gemini answers; no usage is None, never 0."""
    assert usage_of_line(line) == expected


def test_ledger_keeps_usage_per_request_and_sums_it(state_location: Path | str) -> None:
    """On SQLite and PostgreSQL: the usage of each collected answer lands on its ledger row,
    an ``ok`` row is never overwritten by a later answer, and the totals sum the rows."""
    with StateStore.open(state_location) as store:
        store.upsert_resource("r", provider="p", manifest="m.yaml", labels={}, run_id=None)
        gen = store.create_generation(
            "r",
            spec_hash="h",
            spec={"provider": "p"},
            input_sha256="s",
            requests=3,
            input_bytes=30,
            output_path=None,
            errors_path=None,
            run_id=None,
        )
        ledger = store.ledger()
        with store.atomic():
            ledger.record_requests(gen.id, [(f"c{i}", i, 0, 10, f"sha{i}") for i in range(3)])

        def line(cid: str, state: str, usage: LineUsage | None) -> CollectedLine:
            return CollectedLine(cid, 0, 1, Outcome(state, None), usage)  # type: ignore[arg-type]

        with store.atomic():
            ledger.record_outcomes(
                gen.id,
                1,
                "blob1",
                [
                    line("c0", "ok", LineUsage(100, 20)),
                    line("c1", "ok", LineUsage(50, 5)),
                    line("c2", "retryable", None),
                ],
            )
        with store.atomic():  # a second answer for c0 (a duplicate) must not count twice
            ledger.record_outcomes(
                gen.id, 2, "blob2", [line("c0", "ok", LineUsage(999, 999)), line("c2", "ok", None)]
            )
        totals = ledger.usage_totals(gen.id)
    assert (totals.requests, totals.input_tokens, totals.output_tokens) == (2, 150, 25)


def provider(kind: str, base_url: str | None = None, **kw: Any) -> ProviderConfig:
    return ProviderConfig(
        "p", kind, base_url, None, kw.get("options", {}), pricing=kw.get("pricing", {})
    )


def test_prices_come_from_the_bundled_table_less_the_batch_discount() -> None:
    """A listed model (or its dated snapshot) costs half its standard price on a Batch API;
    the table names its source and date."""
    table = price_table()
    assert table["source"].startswith("genai-prices") and table["extracted"]
    listed = table["prices"]["openai"]["gpt-4o-mini"]
    for kind, base in (("openai", "https://api.openai.com/v1"), ("azure", "https://x.azure")):
        price = price_for(provider(kind, base), "gpt-4o-mini-2024-07-18")
        assert price is not None
        assert (price.input, price.output) == (listed["input"] / 2, listed["output"] / 2)
    claude = table["prices"]["anthropic"]["claude-haiku-4-5"]
    price = price_for(provider("anthropic", "https://api.anthropic.com"), "claude-haiku-4-5")
    assert price is not None and price.input == claude["input"] / 2


@pytest.mark.parametrize(
    ("config", "model", "expected"),
    [
        pytest.param(
            provider("openai", "https://api.openai.com/v1"),
            "no-such-model",
            None,
            id="unknown-model",
        ),
        pytest.param(provider("openai", "https://api.openai.com/v1"), None, None, id="no-model"),
        pytest.param(provider("local"), "anything", (0.0, 0.0), id="local-is-free"),
        pytest.param(
            provider("local", options={"upstream": "http://127.0.0.1:8000/v1"}),
            "anything",
            (0.0, 0.0),
            id="local-on-a-loopback-model-server-is-free",
        ),
        pytest.param(
            provider("local", options={"upstreams": ["http://0.0.0.0:8000/v1", "http://[::1]:9"]}),
            "anything",
            (0.0, 0.0),
            id="local-on-0.0.0.0-and-ipv6-loopback-is-free",
        ),
        # an engine forwarding to a hosted API (or another host's GPUs) is paid: unknown
        pytest.param(
            provider("local", options={"upstream": "https://api.openai.com/v1"}),
            "gpt-4o",
            None,
            id="local-forwarding-to-a-hosted-api-is-not-free",
        ),
        pytest.param(
            provider(
                "local",
                options={"upstreams": ["builtin", {"url": "http://10.0.0.5:8000/v1"}]},
            ),
            "m",
            None,
            id="local-with-a-remote-upstream-is-not-free",
        ),
        pytest.param(
            provider("openai", "http://127.0.0.1:8000/v1"), "x", (0.0, 0.0), id="serve-is-free"
        ),
        pytest.param(
            provider("openai", "http://127.0.0.1:4000/v1", options={"litellmProvider": "openai"}),
            "no-such-model",
            None,
            id="litellm-on-loopback-is-not-free",
        ),
        pytest.param(
            provider("local", pricing={"m": {"input": 2.0, "output": 4.0}}),
            "m",
            (2.0, 4.0),
            id="override-on-local",
        ),
        pytest.param(
            provider(
                "openai", "https://api.openai.com/v1", pricing={"*": {"input": 1, "output": 3}}
            ),
            "gpt-4o-mini",
            (1.0, 3.0),
            id="wildcard-override-wins-over-the-table",
        ),
    ],
)
def test_price_rules(
    config: ProviderConfig, model: str | None, expected: tuple[float, float] | None
) -> None:
    """First match wins: overrides, then self-hosted (0), then the table; else unknown (None)."""
    price = price_for(config, model)
    assert (None if price is None else (price.input, price.output)) == expected


def test_an_unknown_price_is_never_zero() -> None:
    """Summing a priced and an unpriced usage gives an unknown cost, not a partial one."""
    assert (Usage(10, 1, 11, 0.5) + Usage(3, 0, 3, None)).cost_usd is None
    assert (Usage(10, 1, 11, 0.5) + Usage()).cost_usd == 0.5


def set_pricing(root: Path, pricing: dict[str, Any]) -> None:
    path = root / "batchspec.yaml"
    project = yaml.safe_load(path.read_text())
    project["providers"]["srv"]["pricing"] = pricing
    path.write_text(yaml.safe_dump(project, sort_keys=False))


def answered_usage(root: Path) -> tuple[int, int]:
    lines = [json.loads(x) for x in (root / "results" / "triage.jsonl").read_text().splitlines()]
    usage = [line["response"]["body"]["usage"] for line in lines]
    return sum(u["prompt_tokens"] for u in usage), sum(u["completion_tokens"] for u in usage)


def test_apply_over_serve_records_usage_and_cost_shown_by_status_history_show(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """After apply against `batchspec serve`, status, history and show (--json) report the
    tokens the answers reported and their cost under the provider's `pricing`."""
    ws = served(tmp_path / "ws", server(), count=4)
    set_pricing(ws.root, {"test-model": {"input": 2.0, "output": 10.0}})
    code, summary, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    inp, out = answered_usage(ws.root)
    assert inp > 0 and out > 0
    cost = (inp * 2.0 + out * 10.0) / 1_000_000
    # apply's own summary prices with the project's providers too, as status does
    assert f"{inp:,} in + {out:,} out tokens, $" in summary and "unknown price" not in summary

    code, text, err = run_cli(["status", str(ws.root), "--json"], capsys)
    assert code == 0, err
    [status] = [s for s in json.loads(text)["resources"] if s["name"] == "triage"]
    assert status["usage"]["input_tokens"] == inp
    assert status["usage"]["output_tokens"] == out
    assert status["usage"]["cost_usd"] == pytest.approx(cost)

    code, text, err = run_cli(["history", str(ws.root), "--json"], capsys)
    assert code == 0, err
    [apply_run] = [r for r in json.loads(text)["runs"] if r["run"]["command"] == "apply"]
    assert apply_run["usage"]["input_tokens"] == inp
    assert apply_run["usage"]["cost_usd"] == pytest.approx(cost)

    code, text, err = run_cli(["show", "triage", str(ws.root), "--json"], capsys)
    assert code == 0, err
    assert json.loads(text)["usage"]["cost_usd"] == pytest.approx(cost)

    code, text, err = run_cli(["status", str(ws.root)], capsys)
    assert f"{inp:,} in + {out:,} out tokens, $" in text


def test_unknown_price_is_shown_as_unknown(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A model neither the table nor an override prices, on a provider that is not
    self-hosted, is "unknown price" with a null cost_usd, never $0 (status reads the state
    only, so the provider's URL can be moved off loopback after the apply)."""
    ws = served(tmp_path / "ws", server(), count=2)
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    path = ws.root / "batchspec.yaml"
    project = yaml.safe_load(path.read_text())
    project["providers"]["srv"]["baseUrl"] = "https://batch.example.com/v1"
    path.write_text(yaml.safe_dump(project, sort_keys=False))

    code, text, err = run_cli(["status", str(ws.root), "--json"], capsys)
    assert code == 0, err
    [status] = json.loads(text)["resources"]
    assert status["usage"]["input_tokens"] > 0
    assert status["usage"]["cost_usd"] is None
    code, text, err = run_cli(["status", str(ws.root)], capsys)
    assert "unknown price" in text and "$0" not in text


def test_negative_price_override_is_refused(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A price override below zero, not a number, NaN or infinite is a project error
    (exit 1) at its file:line naming the key, for plan and for apply (nothing submitted)."""
    srv = server()
    ws = served(tmp_path / "ws", srv, count=1)
    for bad in (-1, "cheap", float("nan"), float("inf")):
        set_pricing(ws.root, {"test-model": {"input": bad, "output": 1}})
        for argv in (["plan", str(ws.root)], ["apply", str(ws.root), "--yes"]):
            code, _, err = run_cli(argv, capsys)
            assert code == 1, (bad, err)
            assert "batchspec.yaml:" in err and "/pricing/test-model/input: " in err, err
    assert srv.batch_count() == 0


def test_anthropic_message_usage_is_recorded_and_priced(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """Through an `anthropic` provider (Message Batches over loopback), the usage of each
    message answer is what status sums and prices."""
    srv = server()
    provider = {
        "type": "anthropic",
        "baseUrl": srv.base_url,
        "apiKeyEnv": KEY_ENV,
        "pricing": {"*": {"input": 3.0, "output": 15.0}},
    }
    ws = make_workspace(
        tmp_path / "ws", providers={"claude": provider}, resources=[ResourceSpec("t", 3, "claude")]
    )
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes", *FAST], capsys)
    assert code == 0, err
    usage = [line["response"]["body"]["usage"] for line in ws.outputs("t")]
    inp = sum(u["input_tokens"] for u in usage)
    out = sum(u["output_tokens"] for u in usage)
    assert inp > 0 and out > 0

    code, text, err = run_cli(["status", str(ws.root), "--json"], capsys)
    [status] = json.loads(text)["resources"]
    assert (status["usage"]["input_tokens"], status["usage"]["output_tokens"]) == (inp, out)
    assert status["usage"]["cost_usd"] == pytest.approx((inp * 3.0 + out * 15.0) / 1_000_000)


def test_consent_is_asked_for_a_local_engine_forwarding_elsewhere_unless_priced_free() -> None:
    """A `local` engine on loopback upstreams spends nothing (no consent); one forwarding to
    another host is paid (consent) unless its pricing declares every model free."""
    from types import SimpleNamespace

    from batchspec.core.apply import _is_free

    remote = {"upstream": "http://10.0.0.5:8000/v1"}
    free = {"*": {"input": 0, "output": 0}}
    cases = {
        "here": (provider("local", options={"upstream": "http://localhost:8000/v1"}), True),
        "gpus": (provider("local", options=remote), False),
        "own-gpus": (provider("local", options=remote, pricing=free), True),
        "api": (provider("openai", "http://127.0.0.1:9/v1"), False),  # consent as before
    }
    ws: Any = SimpleNamespace(
        project=SimpleNamespace(providers={k: c for k, (c, _) in cases.items()})
    )
    for name, (_, expected) in cases.items():
        assert _is_free(ws, SimpleNamespace(provider=name)) is expected, name  # type: ignore[arg-type]
