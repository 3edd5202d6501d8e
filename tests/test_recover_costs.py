"""What looking for answers a lost state forgot (``recover.recover_ahead``) costs an apply
that spends nothing: no provider call it did not make before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from probes import ProbedServer
from servers import request_lines
from workspaces import KEY_ENV, SENTINEL_KEY, ResourceSpec, run_cli, served

from batchspec.engine.upstreams import BuiltinUpstream

FAST = ["--poll-interval", "0.05"]
#: batches stay in flight
SLOW = {"upstream": BuiltinUpstream(latency=5.0), "drain_timeout": 0.0}


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)


def test_a_replace_skipped_for_want_of_allow_replace_lists_no_batches_at_any_poll(
    tmp_path: Path, server: Callable[..., ProbedServer], capsys: pytest.CaptureFixture[str]
) -> None:
    """A spec changed while its batch runs, beside another resource in flight: `apply
    --wait` without --allow-replace spends nothing and only polls. The pass looked for a
    lost state's answers for the skipped replace all the same, and paged the provider's
    batch listing back over the whole window at every poll (a lost state's earlier
    batches downloaded at every poll too), where it listed nothing before."""
    srv = server(**SLOW)
    ws = served(tmp_path / "ws", srv, ResourceSpec("triage"), ResourceSpec("other"))
    assert run_cli(["apply", str(ws.root), "--yes"], capsys)[0] == 0
    ws.write_input("triage", request_lines(4))
    lists = srv.probe.counts["GET /batches"]
    argv = ["apply", str(ws.root), "--yes", "--wait", "--timeout", "0.6", *FAST]

    code, out, _ = run_cli(argv, capsys)

    assert code == 5, out
    assert "not replacing" in out, out
    assert srv.probe.counts["POST /batches"] == 2
    assert srv.probe.counts["GET /batches"] == lists
