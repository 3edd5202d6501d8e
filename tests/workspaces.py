"""Test helpers: throwaway batchspec workspaces, and running the CLI on them.

``make_workspace(root, providers=..., resources=...)`` writes ``batchspec.yaml``, one manifest
per resource and its JSONL input below ``root`` and returns a ``Workspace`` that knows where
the state database and the result files are. ``run_cli`` runs the real entry point in this
process (exit code, stdout, stderr); ``batchspec_cmd`` is the argv of a separate
``python -m batchspec`` process, for tests that must kill or race it.

Providers are plain dicts in project-file shape; ``local_provider()`` and
``openai_provider(base_url, key_env)`` build the two kinds the tests use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from servers import request_lines

from batchspec.state.store import StateStore

PROJECT_HEADER = {"apiVersion": "batchspec/v1", "kind": "Project"}

#: an API key that must never be written anywhere (state, history, output, errors)
SENTINEL_KEY = "sk-SENTINEL-7f3a9c1e5b2d4f60a8e7c3b1d9f2a6e4"
#: the variable the test projects name in ``apiKeyEnv``
KEY_ENV = "BATCHSPEC_TEST_API_KEY"


def local_provider() -> dict[str, Any]:
    return {"type": "local", "options": {"upstream": "builtin"}}


def openai_provider(base_url: str, key_env: str, **options: Any) -> dict[str, Any]:
    provider: dict[str, Any] = {"type": "openai", "baseUrl": base_url, "apiKeyEnv": key_env}
    if options:
        provider["options"] = options
    return provider


@dataclass(frozen=True)
class ResourceSpec:
    """One ``kind: Batch`` document and its input (``count`` distinct chat requests)."""

    name: str
    count: int = 3
    provider: str = "srv"
    spec: Mapping[str, Any] = field(default_factory=dict)  # extra spec keys (camelCase)
    prefix: str = "req"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def state_path(self) -> Path:
        return self.root / "state" / "batchspec.db"

    def input_path(self, name: str) -> Path:
        return self.root / "data" / f"{name}.jsonl"

    def output_path(self, name: str) -> Path:
        return self.root / "results" / f"{name}.jsonl"

    def errors_path(self, name: str) -> Path:
        return self.root / "results" / f"{name}.errors.jsonl"

    def manifest_path(self, name: str) -> Path:
        return self.root / "manifests" / f"{name}.yaml"

    def input_ids(self, name: str) -> list[str]:
        return [json.loads(line)["custom_id"] for line in _lines(self.input_path(name))]

    def outputs(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in _lines(self.output_path(name))]

    def errors(self, name: str) -> list[dict[str, Any]]:
        return [json.loads(line) for line in _lines(self.errors_path(name))]

    def write_input(self, name: str, lines: Sequence[Mapping[str, Any]]) -> None:
        path = self.input_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")

    @contextmanager
    def store(self) -> Iterator[StateStore]:
        with StateStore.open(self.state_path) as store:
            yield store

    def state_bytes(self) -> bytes:
        """The state database and its WAL/SHM side files, as raw bytes."""
        parts = sorted(self.state_path.parent.glob(self.state_path.name + "*"))
        return b"".join(p.read_bytes() for p in parts)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def make_workspace(
    root: Path,
    *,
    providers: Mapping[str, Mapping[str, Any]],
    resources: Sequence[ResourceSpec],
) -> Workspace:
    """Write a project with these providers and one manifest + input per resource."""
    ws = Workspace(root)
    root.mkdir(parents=True, exist_ok=True)
    project = {
        **PROJECT_HEADER,
        "state": {"path": "state/batchspec.db"},
        "manifests": ["manifests/*.yaml"],
        "providers": {name: dict(p) for name, p in providers.items()},
    }
    (root / "batchspec.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
    for res in resources:
        ws.write_input(res.name, request_lines(res.count, prefix=res.prefix))
        write_manifest(ws, res)
    return ws


def served(root: Path, srv: Any, *resources: ResourceSpec, count: int = 3) -> Workspace:
    """A workspace whose one provider ``srv`` (type openai, key in ``KEY_ENV``) points at
    ``srv``: a server with a ``.v1`` URL, or the URL itself. Without ``resources``, one
    resource ``triage`` of ``count`` requests."""
    return make_workspace(
        root,
        providers={"srv": openai_provider(getattr(srv, "v1", srv), KEY_ENV)},
        resources=resources or (ResourceSpec("triage", count=count),),
    )


def write_manifest(ws: Workspace, res: ResourceSpec) -> None:
    spec = {
        "provider": res.provider,
        "endpoint": "/v1/chat/completions",
        "input": f"../data/{res.name}.jsonl",
        "model": "test-model",
        "output": f"../results/{res.name}.jsonl",
        "errors": f"../results/{res.name}.errors.jsonl",
        **res.spec,
    }
    doc = {
        "apiVersion": "batchspec/v1",
        "kind": "Batch",
        "metadata": {"name": res.name},
        "spec": spec,
    }
    path = ws.manifest_path(res.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def git_commit_all(root: Path, message: str = "workspace") -> str:
    """Make ``root`` a git repository with everything committed; return the commit."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("-c", "user.name=T", "-c", "user.email=t@example.invalid", "commit", "-qm", message)
    return git("rev-parse", "HEAD")


# ---------------------------------------------------------------------------------------------
# Running the CLI


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """The real entry point in this process; returns exit code, stdout and stderr."""
    from batchspec.cli.main import main

    capsys.readouterr()  # drop anything printed before
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 1), out.out, out.err


def batchspec_cmd(*args: str) -> list[str]:
    """argv of a separate batchspec process (the same interpreter, the installed package)."""
    return [sys.executable, "-m", "batchspec", *args]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Parse NDJSON output (``apply --json``)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]
