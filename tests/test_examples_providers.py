"""examples/providers/: every workspace validates offline, builds its providers, and the
local-upstream one runs end to end against `batchspec serve` over an HTTP upstream."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from servers import EngineServer
from workspaces import Workspace, run_cli

from batchspec.engine import HttpUpstream
from batchspec.providers.registry import build_provider
from batchspec.workspace.project import load_project

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "providers"
#: folder -> the provider types its project declares
EXPECTED = {
    "openai": {"openai"},
    "azure": {"azure"},
    "anthropic": {"anthropic"},
    "litellm": {"openai"},
    "local-upstream": {"openai"},
}


def copy_example(name: str, tmp_path: Path) -> Path:
    root = tmp_path / name
    shutil.copytree(EXAMPLES / name, root)
    return root


def test_every_example_folder_is_covered() -> None:
    """Each folder of examples/providers is one of the tested workspaces, and none is missing."""
    folders = {p.name for p in EXAMPLES.iterdir() if p.is_dir()}
    assert folders == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_validates_offline(
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`batchspec validate --json` exits 0 with no key in the environment."""
    for variable in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    root = copy_example(name, tmp_path)
    code, out, err = run_cli(["validate", str(root), "--json"], capsys)
    assert code == 0, out + err
    report = json.loads(out)
    assert report["resources"] and all(r["requests"] == 3 for r in report["resources"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_providers_build(name: str, tmp_path: Path) -> None:
    """Every declared provider builds from its options (no network) with a key set."""
    root = copy_example(name, tmp_path)
    project = load_project(root)
    declared = {n: p for n, p in project.providers.items() if n not in ("local", "openai")}
    declared = declared or {"openai": project.providers["openai"]}
    assert {p.type for p in declared.values()} == EXPECTED[name]
    for config in declared.values():
        env = {config.api_key_env or "": "sk-example-key"}
        provider = build_provider(config, project_root=project.root, env=env)
        assert provider.name == config.name
        provider.close()


def test_local_upstream_example_runs_behind_batchspec_serve(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    serve_engine: Callable[..., EngineServer],
    standin_upstream: Callable[..., Any],
) -> None:
    """The local-upstream workspace, pointed at a served engine whose upstream is an
    OpenAI-compatible HTTP server (standing in for Ollama), converges with every result."""
    upstream = standin_upstream()
    server = serve_engine(api_key="dev-key", upstream=HttpUpstream(upstream.v1))
    root = copy_example("local-upstream", tmp_path)
    project_file = root / "batchspec.yaml"
    text = project_file.read_text().replace("http://127.0.0.1:8000/v1", server.v1)
    project_file.write_text(text)
    monkeypatch.setenv("BATCHSPEC_SERVE_KEY", "dev-key")

    code, _, err = run_cli(
        ["apply", str(root), "--wait", "--yes", "--poll-interval", "0.05"], capsys
    )

    assert code == 0, err
    ws = Workspace(root)
    outputs = [json.loads(line) for line in (root / "results" / "ticket-triage.jsonl").open()]
    inputs = [json.loads(line) for line in (root / "data" / "tickets.jsonl").open()]
    assert [o["custom_id"] for o in outputs] == [i["custom_id"] for i in inputs]
    assert sum(upstream.calls.values()) == len(inputs)
    assert ws.state_path.exists()
