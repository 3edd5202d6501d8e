"""Attacks on "every paid token counts exactly once" in `history`, `history --by commit` and
`report`: a generation whose results are written more than once, a resource renamed between a
collect and its generation's results. Real `batchspec serve` processes, real SQLite state."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from serve_faults import apply_wait, serve_processes, served_workspace
from servers import wait_for
from workspaces import KEY_ENV, ResourceSpec, Workspace, run_cli, write_manifest

from batchspec.state.store import StateStore


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    yield from serve_processes(tmp_path)


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test-not-checked")


def ledger_usage(ws: Workspace, name: str, state: Path | str | None = None) -> tuple[int, int]:
    """What the ledgers of ``name``'s generations hold: every token its answers reported."""
    with StateStore.open(state or ws.state_path) as store:
        totals = [store.ledger().usage_totals(g.id) for g in store.generations(name)]
    return sum(t.input_tokens for t in totals), sum(t.output_tokens for t in totals)


def history_usage(
    ws: Workspace, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, int]:
    """The tokens `history --json` counts over every run."""
    code, out, err = run_cli(["history", str(ws.root), "--json", "--limit", "100", *extra], capsys)
    assert code == 0, err
    runs = json.loads(out)["runs"]
    return tuple(sum(r["usage"][k] for r in runs) for k in ("input_tokens", "output_tokens"))  # type: ignore[return-value]


def test_a_generation_finished_twice_counts_its_first_results_once(
    tmp_path: Path,
    serve: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    state_location: Path | str,
) -> None:
    """A generation left Degraded (results written), then retried to the end after
    retry.maxAttempts is raised (results written again, a running total): `history` sums
    every token once, not the first results event's total twice (SQLite and PostgreSQL)."""
    monkeypatch.setenv("BATCHSPEC_STATE", str(state_location))
    srv = serve("--fault-500", "0.5", "--fault-seed", "3", "--max-attempts", "1")
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("flaky", count=20, spec={"retry": {"maxAttempts": 1}})
    )
    assert apply_wait(ws, capsys)[0] == 4
    write_manifest(ws, ResourceSpec("flaky", spec={"retry": {"maxAttempts": 10}}))
    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    with StateStore.open(state_location) as store:
        results = [e for e in store.events(resource="flaky") if e.action == "results"]
    assert len(results) == 2
    want = ledger_usage(ws, "flaky", state_location)
    assert want[0] > 0

    assert history_usage(ws, capsys) == want
    assert history_usage(ws, capsys, "--resource", "flaky") == want
    code, out, err = run_cli(["history", str(ws.root), "--json", "--by", "commit"], capsys)
    [group] = json.loads(out)["commits"]
    assert (group["usage"]["input_tokens"], group["usage"]["output_tokens"]) == want


def test_a_resource_renamed_between_a_collect_and_its_results_counts_once_across_names(
    tmp_path: Path, serve: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attempt 1 collected under the old name, the resource renamed (`moved`), its retry
    collected and its results written under the new name: `history --resource OLD` plus
    `history --resource NEW` (and `--by commit` of each) count every token once: the old
    name's collect is in the new name's running total, not counted again under the old."""
    srv = serve("--fault-500", "0.5", "--fault-seed", "3", "--max-attempts", "1")
    ws = served_workspace(
        tmp_path / "ws", srv, ResourceSpec("old-name", count=20, spec={"retry": {"maxAttempts": 9}})
    )
    client = srv.client()
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    [first] = client.batches.list().data
    wait_for(lambda: client.batches.retrieve(first.id).status == "completed", timeout=30)
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0  # collects, retries
    with ws.store() as store:
        assert [e.action for e in store.events(resource="old-name")].count("collect") == 1
    path = ws.manifest_path("old-name")
    doc = yaml.safe_load(path.read_text())
    doc["metadata"] = {"name": "new-name", "moved": {"from": "old-name"}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    code, out, err = apply_wait(ws, capsys)
    assert code == 0, out + err
    want = ledger_usage(ws, "new-name")
    assert want[0] > 0

    assert history_usage(ws, capsys) == want
    old, new = (history_usage(ws, capsys, "--resource", n) for n in ("old-name", "new-name"))
    assert (old[0] + new[0], old[1] + new[1]) == want
    by_commit = [
        json.loads(
            run_cli(["history", str(ws.root), "--json", "--by", "commit", "--resource", n], capsys)[
                1
            ]
        )["commits"]
        for n in ("old-name", "new-name")
    ]
    counted = [g["usage"]["input_tokens"] for groups in by_commit for g in groups]
    assert sum(counted) == want[0]
