"""Row-level incremental apply: a changed input resubmits only new or changed requests."""

from __future__ import annotations

import json

import pytest
import yaml
from servers import request_lines
from workspaces import (
    KEY_ENV,
    SENTINEL_KEY,
    ResourceSpec,
    local_provider,
    make_workspace,
    openai_provider,
    run_cli,
    served,
)

from batchspec.engine.upstreams import BuiltinUpstream

FAST = ["--poll-interval", "0.05"]


@pytest.fixture
def ws(tmp_path):
    return make_workspace(
        tmp_path / "ws",
        providers={"local": local_provider()},
        resources=[ResourceSpec("triage", count=6, provider="local")],
    )


def apply(ws, capsys) -> None:
    code, out, err = run_cli(
        ["apply", str(ws.root), "--wait", "--yes", "--poll-interval", "0.05"], capsys
    )
    assert code == 0, out + err


def submitted_ids(ws) -> list[list[str]]:
    """custom_ids of each batch file batchspec uploaded, per batch, in submission order."""
    with ws.store() as store:
        rows = store.db.execute(
            "select b.id, r.custom_id from batches b join requests r "
            "on r.generation_id = b.generation_id and r.shard = b.shard "
            "and r.sent_attempt = b.attempt order by b.id, r.line"
        ).fetchall()
    batches: dict[int, list[str]] = {}
    for batch_id, custom_id in rows:
        batches.setdefault(batch_id, []).append(custom_id)
    return list(batches.values())


def test_changed_and_added_rows_are_the_only_ones_resubmitted(ws, capsys) -> None:
    """Editing one request and appending one submits exactly those two; the rest keep results."""
    apply(ws, capsys)
    first = {o["custom_id"]: o for o in ws.outputs("triage")}
    lines = request_lines(6)
    lines[2]["body"]["messages"][0]["content"] += " (edited)"
    lines.append({**lines[0], "custom_id": "req-new"})
    ws.write_input("triage", lines)

    apply(ws, capsys)

    assert submitted_ids(ws)[-1] == [lines[2]["custom_id"], "req-new"]
    outputs = ws.outputs("triage")
    assert [o["custom_id"] for o in outputs] == [line["custom_id"] for line in lines]
    for o in outputs:  # unchanged requests keep the very answer they had
        if o["custom_id"] not in (lines[2]["custom_id"], "req-new"):
            assert o == first[o["custom_id"]]


def test_an_input_reordered_only_resubmits_nothing_and_follows_the_new_order(ws, capsys) -> None:
    """Reordering rows makes a new generation whose every answer is reused; output follows it."""
    apply(ws, capsys)
    batches_before = len(submitted_ids(ws))
    lines = list(reversed(request_lines(6)))
    ws.write_input("triage", lines)

    apply(ws, capsys)

    assert len(submitted_ids(ws)) == batches_before
    assert [o["custom_id"] for o in ws.outputs("triage")] == [line["custom_id"] for line in lines]
    with ws.store() as store:
        gens = store.generations("triage")
    assert [g.status for g in gens] == ["complete", "complete"]


def test_a_request_whose_body_changed_under_the_same_id_is_not_reused(ws, capsys) -> None:
    """Same custom_id, different request bytes: the old answer must not be carried over."""
    apply(ws, capsys)
    lines = request_lines(6)
    for line in lines:
        line["body"]["temperature"] = 0.5
    ws.write_input("triage", lines)

    apply(ws, capsys)

    assert sorted(submitted_ids(ws)[-1]) == sorted(line["custom_id"] for line in lines)


def test_plan_counts_exactly_what_apply_submits_with_reused_answers_apart(ws, capsys) -> None:
    """After an edit and an addition, plan says 2 requests to submit and 5 reused (not 7 to
    submit), and apply then submits exactly those 2."""
    apply(ws, capsys)
    lines = request_lines(6)
    lines[2]["body"]["messages"][0]["content"] += " (edited)"
    lines.append({**lines[0], "custom_id": "req-new"})
    ws.write_input("triage", lines)

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, err
    plan = json.loads(out)
    [action] = plan["actions"]
    assert (action["requests"], action["reused"], action["shards"]) == (2, 5, 1)
    assert (plan["requests_to_submit"], plan["requests_reused"]) == (2, 5)
    code, text, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "2 requests to submit," in text and "5 keep a recorded answer" in text

    apply(ws, capsys)

    assert len(submitted_ids(ws)[-1]) == action["requests"]


def test_status_counts_answers_carried_over_from_an_earlier_generation(
    tmp_path, server, capsys, monkeypatch
) -> None:
    """While a changed input's new generation is in flight, status counts the answers it
    kept from the earlier generation as succeeded (3/4, not 0/4)."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    ws = served(tmp_path / "ws", server(), ResourceSpec("triage", count=3))
    assert run_cli(["apply", str(ws.root), "--yes", "--wait", *FAST], capsys)[0] == 0
    slow = server(upstream=BuiltinUpstream(latency=5.0), drain_timeout=0.1)
    project = yaml.safe_load((ws.root / "batchspec.yaml").read_text())
    project["providers"]["srv"]["baseUrl"] = slow.v1  # not part of the spec
    (ws.root / "batchspec.yaml").write_text(yaml.safe_dump(project))
    ws.write_input("triage", request_lines(4))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0

    code, out, _ = run_cli(["status", str(ws.root), "--json"], capsys)

    [status] = json.loads(out)["resources"]
    assert status["generation_status"] == "in_progress"
    assert (status["succeeded"], status["requests"]) == (3, 4)
    assert "3/4 succeeded" in run_cli(["status", str(ws.root)], capsys)[1]


def test_plan_says_the_shard_split_apply_makes(tmp_path, capsys) -> None:
    """An input over maxRequestsPerBatch: plan says "N shards" (text and --json) and apply
    creates that many batches; after an addition, only the requests it submits are split."""
    limits = {"limits": {"maxRequestsPerBatch": 2}}
    ws = make_workspace(
        tmp_path / "ws",
        providers={"local": local_provider()},
        resources=[ResourceSpec("triage", count=5, provider="local", spec=limits)],
    )
    for requests, shards, new in ((5, 3, 5), (8, 2, 3)):
        ws.write_input("triage", request_lines(requests))
        [action] = json.loads(run_cli(["plan", str(ws.root), "--json"], capsys)[1])["actions"]
        assert (action["requests"], action["shards"]) == (new, shards)
        text = run_cli(["plan", str(ws.root)], capsys)[1]
        assert f"{new} requests to submit in {shards} shards," in text
        before = len(submitted_ids(ws))
        apply(ws, capsys)
        assert len(submitted_ids(ws)) - before == shards


def stand_in_and_model(tmp_path, server, monkeypatch, res: ResourceSpec):
    """A workspace with the built-in stand-in (``local``) and a model (``srv``: an engine
    server as an openai provider), and one resource on either: ``(workspace, server)``."""
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    srv = server()
    ws = make_workspace(
        tmp_path / "ws",
        providers={"local": local_provider(), "srv": openai_provider(srv.v1, KEY_ENV)},
        resources=[res],
    )
    return ws, srv


def switch_provider(ws, name: str, old: str, new: str) -> None:
    manifest = ws.manifest_path(name)
    manifest.write_text(manifest.read_text().replace(f"provider: {old}", f"provider: {new}"))


@pytest.mark.parametrize("to", ["another provider", "a model server upstream"])
def test_the_stand_ins_answers_are_not_kept_once_a_model_answers(
    tmp_path, server, capsys, monkeypatch, to
) -> None:
    """The built-in stand-in's answers are fake: moving a resource from it to another
    provider, or pointing its local provider at a model server, resends every request
    (they were kept as the new generation's answers, "0 requests to submit", and written
    as its results); between two generations a model answers, answers are kept as ever."""
    ws, srv = stand_in_and_model(
        tmp_path, server, monkeypatch, ResourceSpec("triage", count=3, provider="local")
    )
    apply(ws, capsys)
    assert all("[builtin stand-in]" in json.dumps(o) for o in ws.outputs("triage"))
    if to == "another provider":
        switch_provider(ws, "triage", "local", "srv")
    else:
        project = ws.root / "batchspec.yaml"
        doc = yaml.safe_load(project.read_text())
        doc["providers"]["local"]["options"]["upstream"] = srv.v1
        project.write_text(yaml.safe_dump(doc))

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 0, err
    [action] = json.loads(out)["actions"]
    assert (action["action"], action["requests"], action["reused"]) == ("create", 3, 0)
    if to == "another provider":  # the model's answers are the results
        apply(ws, capsys)
        assert srv.probe.counts["POST /batches"] == 1
        assert len(submitted_ids(ws)[-1]) == 3
        # and a later edit keeps the model's answers of the unchanged requests, as ever
        lines = request_lines(3)
        lines.append({**lines[0], "custom_id": "req-new"})
        ws.write_input("triage", lines)
        apply(ws, capsys)
        assert submitted_ids(ws)[-1] == ["req-new"]


def test_the_dollar_bound_counts_the_stand_ins_answers_as_sent_once_a_model_answers(
    tmp_path, server, capsys, monkeypatch
) -> None:
    """A model answered two requests; the stand-in then answered a third (of max_tokens
    100,000); back on the model, that third is sent again (only the model's two are kept),
    and the plan's dollar bound counts its 100,000 output tokens as apply does (it counted
    the stand-in's answer as kept: 0 tokens, a bound under what apply sends)."""
    ws, _ = stand_in_and_model(
        tmp_path, server, monkeypatch, ResourceSpec("grown", count=2, provider="srv")
    )
    project = ws.root / "batchspec.yaml"
    doc = yaml.safe_load(project.read_text())
    doc["providers"]["srv"]["pricing"] = {"*": {"input": 0.0, "output": 1.0}}
    project.write_text(yaml.safe_dump(doc))
    apply(ws, capsys)
    lines = request_lines(2)
    big = {**lines[0], "custom_id": "big"}
    big["body"] = {**big["body"], "max_tokens": 100_000}
    ws.write_input("grown", [*lines, big])
    manifest = ws.manifest_path("grown")
    manifest.write_text(manifest.read_text().replace("provider: srv", "provider: local"))
    apply(ws, capsys)  # the stand-in answers "big"
    budgeted = manifest.read_text().replace("provider: local", "provider: srv")
    manifest.write_text(budgeted.replace("spec:\n", "spec:\n  budget: {maxCostUSD: 10}\n", 1))

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 0, err
    plan = json.loads(out)
    [action] = plan["actions"]
    assert (action["action"], action["requests"], action["reused"]) == ("create", 1, 2)
    assert plan["estimates"]["grown"]["max_output_tokens"] == 100_000


def test_a_replace_does_not_wait_for_the_stand_in_to_stop(
    tmp_path, server, capsys, monkeypatch
) -> None:
    """A resource moved from the stand-in to a model while the stand-in's batch is in
    flight is replaced without waiting for that batch to stop: a generation a model answers
    keeps none of the stand-in's answers, so there is nothing to wait for (plan said it
    'waits for generation 1 to stop first (its answers are reused)')."""
    ws, _ = stand_in_and_model(
        tmp_path, server, monkeypatch, ResourceSpec("triage", count=3, provider="local")
    )
    code, out, err = run_cli(["apply", str(ws.root), "--yes"], capsys)
    assert code == 0, out + err
    switch_provider(ws, "triage", "local", "srv")

    code, out, err = run_cli(["plan", str(ws.root), "--replace", "triage", "--json"], capsys)

    assert code == 0, err
    [action] = json.loads(out)["actions"]
    assert action["action"] == "replace" and "cancels generation 1" in action["reason"]
    assert "waits for generation" not in action["reason"]
