"""batchspec.workspace.manifest: loading manifests, located problems, normalisation, spec hash."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from batchspec.errors import ManifestError
from batchspec.workspace.manifest import (
    RETRYABLE_FAILURES,
    Budget,
    Limits,
    RetryPolicy,
    Workspace,
    load_workspace,
    spec_hash,
)
from batchspec.workspace.yamldoc import InvalidManifestError, Problem

PROJECT = "apiVersion: batchspec/v1\nkind: Project\n"
REQUEST = {
    "custom_id": "r1",
    "method": "POST",
    "url": "/v1/chat/completions",
    "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
}
# Line numbers in the cases below refer to this text.
BASE = """\
apiVersion: batchspec/v1
kind: Batch
metadata:
  name: triage
spec:
  provider: local
  endpoint: /v1/chat/completions
  input: data.jsonl
"""


def make_workspace(root: Path, files: dict[str, str], project: str | None = PROJECT) -> Path:
    """A workspace with a project file, data.jsonl and the given files (relative path -> text)."""
    root.mkdir(parents=True, exist_ok=True)
    if project is not None:
        (root / "batchspec.yaml").write_text(project, encoding="utf-8")
    (root / "data.jsonl").write_text(json.dumps(REQUEST) + "\n", encoding="utf-8")
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def load(root: Path, *paths: str | Path) -> Workspace:
    return load_workspace([root / p for p in paths] or [root])


def problems(root: Path, *paths: str | Path) -> list[Problem]:
    with pytest.raises(InvalidManifestError) as caught:
        load(root, *paths)
    return list(caught.value.problems)


# ---------------------------------------------------------------------------------------------
# Valid manifests


def test_minimal_manifest_gets_its_defaults(tmp_path: Path) -> None:
    """Omitted fields take their documented defaults; paths become absolute."""
    ws = make_workspace(tmp_path / "ws", {"triage.yaml": BASE})
    [res] = load(ws).resources
    root = ws.resolve()
    assert res.name == "triage"
    assert (res.provider, res.endpoint, res.completion_window) == (
        "local",
        "/v1/chat/completions",
        "24h",
    )
    assert res.input_path == root / "data.jsonl"
    assert res.output_path == root / "results" / "triage.jsonl"
    assert res.errors_path == root / "results" / "triage.errors.jsonl"
    assert res.retry == RetryPolicy(max_attempts=3, on=RETRYABLE_FAILURES)
    assert res.limits == Limits(None, None, None)
    assert (res.model, res.metadata, res.labels, res.budget, res.suspend) == (
        None,
        {},
        {},
        None,
        False,
    )
    assert (res.source.file, res.source.line, res.source.column) == (root / "triage.yaml", 1, 1)
    assert res.input_sha256 == hashlib.sha256((root / "data.jsonl").read_bytes()).hexdigest()


def test_full_manifest_is_normalised_to_snake_case(tmp_path: Path) -> None:
    """Every camelCase key lands in its snake_case field, relative to the manifest's folder."""
    text = BASE.replace("input: data.jsonl", "input: ../data.jsonl").replace(
        "  name: triage\n", "  name: triage\n  labels: {team: support}\n"
    ).replace("provider: local", "provider: fast") + (  # groq: windows of 24h to 7d
        "  completionWindow: 48h\n"
        "  model: gpt-4o-mini\n"
        "  metadata: {project: triage}\n"
        "  output: out/r.jsonl\n"
        "  errors: out/e.jsonl\n"
        "  retry: {maxAttempts: 5, on: [timeout, expired]}\n"
        "  limits: {maxRequestsPerBatch: 100, maxBytesPerBatch: 1000000,"
        " maxEmbeddingInputsPerBatch: 50}\n"
        "  budget: {maxRequests: 10}\n"
        "  suspend: true\n"
    )
    ws = make_workspace(
        tmp_path / "ws",
        {"jobs/triage.yaml": text},
        project=PROJECT
        + "defaults: {budget: {maxRequests: 99, maxInputTokens: 5000}}\n"
        + "providers: {fast: {type: groq}}\n",
    )
    [res] = load(ws).resources
    jobs = ws.resolve() / "jobs"
    assert res.input_path == ws.resolve() / "data.jsonl"
    assert (res.output_path, res.errors_path) == (jobs / "out/r.jsonl", jobs / "out/e.jsonl")
    assert (res.completion_window, res.model, res.metadata) == (
        "48h",
        "gpt-4o-mini",
        {"project": "triage"},
    )
    assert res.labels == {"team": "support"}
    assert res.retry == RetryPolicy(max_attempts=5, on=("timeout", "expired"))
    assert res.limits == Limits(100, 1_000_000, 50)
    assert res.budget == Budget(max_requests=10, max_input_tokens=5000)  # falls back per field
    assert res.suspend is True


def test_multi_document_files_and_empty_documents(tmp_path: Path) -> None:
    """A file may hold several Batch documents; stray `---` separators are ignored."""
    second = BASE.replace("name: triage", "name: second")
    ws = make_workspace(tmp_path / "ws", {"m.yaml": "---\n" + BASE + "---\n---\n" + second})
    resources = load(ws).resources
    assert [r.name for r in resources] == ["triage", "second"]
    assert [r.source.line for r in resources] == [2, 12]


def test_defaults_provider_fills_an_omitted_provider(tmp_path: Path) -> None:
    """spec.provider may be omitted when batchspec.yaml sets defaults.provider."""
    ws = make_workspace(
        tmp_path / "ws",
        {"m.yaml": BASE.replace("  provider: local\n", "")},
        project=PROJECT + "defaults: {provider: openai}\n",
    )
    assert load(ws).resources[0].provider == "openai"


def test_yaml_1_1_surprises_are_avoided(tmp_path: Path) -> None:
    """`on:` stays a key, and yes/no and dates stay strings (YAML 1.2 booleans only)."""
    text = BASE.replace(
        "  name: triage\n", "  name: triage\n  labels: {ok: yes, day: 2024-05-01}\n"
    )
    ws = make_workspace(tmp_path / "ws", {"m.yaml": text + "  retry:\n    on: [timeout]\n"})
    [res] = load(ws).resources
    assert res.retry.on == ("timeout",)
    assert res.labels == {"ok": "yes", "day": "2024-05-01"}


def test_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    """`<<` merges an anchored mapping; keys written next to it override, without a duplicate."""
    text = BASE.replace(
        "  name: triage\n",
        "  name: triage\n  annotations: &common {team: support, tier: gold}\n"
        "  labels:\n    <<: *common\n    tier: silver\n",
    )
    ws = make_workspace(tmp_path / "ws", {"m.yaml": text})
    assert load(ws).resources[0].labels == {"team": "support", "tier": "silver"}


# ---------------------------------------------------------------------------------------------
# Finding manifests


def test_folder_search_skips_state_hidden_project_and_nested_workspaces(tmp_path: Path) -> None:
    """Only real manifests are loaded from a folder, recursively, sorted by path."""
    other = BASE.replace("triage", "other")
    ws = make_workspace(
        tmp_path / "ws",
        {
            "b/deep/one.yml": BASE.replace("triage", "one").replace(
                "data.jsonl", "../../data.jsonl"
            ),
            "a.yaml": other,
            "state/snapshot.yaml": "not: a manifest\n",
            ".github/workflows/ci.yaml": "on: push\n",
            ".hidden.yaml": "x: 1\n",
            "nested/batchspec.yaml": PROJECT,
            "nested/m.yaml": "anything: [\n",
            "notes.txt": "not yaml\n",
        },
    )
    workspace = load(ws)
    assert [r.name for r in workspace.resources] == ["other", "one"]
    assert workspace.manifest_files == (ws.resolve() / "a.yaml", ws.resolve() / "b/deep/one.yml")


def test_project_globs_are_relative_to_the_root(tmp_path: Path) -> None:
    """`manifests:` globs apply from the project root, whichever folder is given."""
    ws = make_workspace(
        tmp_path / "ws",
        {
            "jobs/a.yaml": BASE.replace("triage", "a").replace("data.jsonl", "../data.jsonl"),
            "jobs/skip.yml": "not: matched\n",
            "other/b.yaml": "not: matched\n",
        },
        project=PROJECT + "manifests: ['jobs/*.yaml']\n",
    )
    assert [r.name for r in load(ws).resources] == ["a"]
    assert [r.name for r in load(ws, "jobs").resources] == ["a"]


def test_files_and_globs_are_loaded_as_given(tmp_path: Path) -> None:
    """Explicit files and glob patterns load exactly what they name, each once."""
    ws = make_workspace(
        tmp_path / "ws",
        {"x/a.yaml": BASE.replace("triage", "a").replace("data.jsonl", "../data.jsonl")},
    )
    ws.joinpath("b.yaml").write_text(BASE.replace("triage", "b"), encoding="utf-8")
    pattern = str(ws / "**" / "*.yaml")
    workspace = load_workspace([pattern, ws / "b.yaml"])
    assert [r.name for r in workspace.resources] == ["b", "a"]  # b.yaml sorts before x/a.yaml


def test_missing_paths_and_empty_globs_are_problems(tmp_path: Path) -> None:
    """A path that does not exist, or a glob that matches nothing, is reported."""
    ws = make_workspace(tmp_path / "ws", {})
    found = problems(ws, "nope.yaml", "*.yml")
    assert [(p.code, p.message) for p in found] == [
        ("not-found", f"{ws / 'nope.yaml'}: no such file or folder"),
        ("not-found", f"{ws / '*.yml'}: no files match"),
    ]


def test_paths_from_two_workspaces_are_refused(tmp_path: Path) -> None:
    """One run works on one workspace: mixing two would mix their state and providers."""
    a = make_workspace(tmp_path / "a", {"m.yaml": BASE})
    b = make_workspace(tmp_path / "b", {"m.yaml": BASE})
    with pytest.raises(InvalidManifestError) as caught:
        load_workspace([a, b])
    [problem] = caught.value.problems
    assert problem.code == "other-workspace"
    assert str(b / "batchspec.yaml") in problem.message


# ---------------------------------------------------------------------------------------------
# Located problems


def _with(replace: tuple[str, str] | None = None, append: str = "") -> str:
    text = BASE if replace is None else BASE.replace(*replace)
    return text + append


CASES = [
    pytest.param(
        _with(append="  completionWindw: 24h\n"),
        (9, 3, "/spec/completionWindw", "unknown-key"),
        "unknown key 'completionWindw' (did you mean 'completionWindow'?)",
        id="unknown-key-did-you-mean",
    ),
    pytest.param(
        _with(append="  completion_window: 24h\n"),
        (9, 3, "/spec/completion_window", "unknown-key"),
        "did you mean 'completionWindow'?",
        id="snake-case-key",
    ),
    pytest.param(
        _with(append="  priority: high\n"),
        (9, 3, "/spec/priority", "unknown-key"),
        "unknown key 'priority' (allowed here: provider, endpoint",
        id="unknown-key-no-suggestion",
    ),
    pytest.param(
        _with(("spec:\n", "model: gpt-4o-mini\nspec:\n")),
        (5, 1, "/model", "unknown-key"),
        "unknown key 'model' here: it goes under 'spec'",
        id="spec-key-at-the-top",
    ),
    pytest.param(
        _with(("  name: triage\n", "  name: triage\n  lables: {a: b}\n")),
        (5, 3, "/metadata/lables", "unknown-key"),
        "did you mean 'labels'?",
        id="unknown-metadata-key",
    ),
    pytest.param(
        _with(("name: triage", "name: Ticket_Triage")),
        (4, 9, "/metadata/name", "invalid-value"),
        "'Ticket_Triage' does not match ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        id="bad-name-pattern",
    ),
    pytest.param(
        _with(("name: triage", "name: " + "a" * 64)),
        (4, 9, "/metadata/name", "invalid-value"),
        "is 64 characters long, at most 63 allowed",
        id="name-too-long",
    ),
    pytest.param(
        _with(("endpoint: /v1/chat/completions", "endpoint: /v1/chat")),
        (7, 13, "/spec/endpoint", "invalid-value"),
        "'/v1/chat' is not one of '/v1/responses', '/v1/chat/completions'",
        id="bad-endpoint",
    ),
    pytest.param(
        _with(append="  metadata: {" + ", ".join(f"k{i}: v" for i in range(13)) + "}\n"),
        (9, 3, "/spec/metadata", "invalid-value"),
        "has 13 entries, at most 12 allowed (providers allow 16 metadata pairs",
        id="metadata-too-many",
    ),
    pytest.param(
        _with(append="  metadata: {" + "k" * 65 + ": v}\n"),
        (9, 14, "/spec/metadata/" + "k" * 65, "invalid-key"),
        "is 65 characters long, at most 64 allowed",
        id="metadata-key-too-long",
    ),
    pytest.param(
        _with(append="  metadata: {k: " + "v" * 513 + "}\n"),
        (9, 17, "/spec/metadata/k", "invalid-value"),
        "is 513 characters long, at most 512 allowed",
        id="metadata-value-too-long",
    ),
    pytest.param(
        _with(append="  metadata: {batchspec_spec: x}\n"),
        (9, 14, "/spec/metadata/batchspec_spec", "invalid-key"),
        "key 'batchspec_spec' is reserved",
        id="metadata-reserved-prefix",
    ),
    pytest.param(
        _with(append="  metadata:\n    run: 7\n"),
        (10, 10, "/spec/metadata/run", "wrong-type"),
        "expected string, got integer 7 (quote it to make it a string)",
        id="metadata-value-not-string",
    ),
    pytest.param(  # quoting it would only trade this for "'24' does not match ^[0-9]+[hd]$"
        _with(append="  completionWindow: 24\n"),
        (9, 21, "/spec/completionWindow", "wrong-type"),
        "expected string, got integer 24 (How long the provider may take, as hours or days "
        "(`24h`, `7d`))",
        id="number-for-a-patterned-string",
    ),
    pytest.param(
        _with(append="  suspend: 'yes'\n"),
        (9, 12, "/spec/suspend", "wrong-type"),
        "expected boolean, got string 'yes'",
        id="wrong-type-bool",
    ),
    pytest.param(
        _with(append="  retry:\n    maxAttempts: 21\n"),
        (10, 18, "/spec/retry/maxAttempts", "invalid-value"),
        "21 is greater than the maximum of 20",
        id="retry-out-of-range",
    ),
    pytest.param(
        _with(append="  retry: {on: [timeout, flaky]}\n"),
        (9, 25, "/spec/retry/on/1", "invalid-value"),
        "'flaky' is not one of 'server_error'",
        id="retry-on-unknown",
    ),
    pytest.param(
        _with(append="  limits: 100\n"),
        (9, 11, "/spec/limits", "wrong-type"),
        "expected object, got integer 100",
        id="wrong-type-object",
    ),
    pytest.param(
        _with(append="  completionWindow: 1 week\n"),
        (9, 21, "/spec/completionWindow", "invalid-value"),
        "'1 week' does not match ^[0-9]+[hd]$",
        id="bad-completion-window",
    ),
    pytest.param(
        _with(("  endpoint: /v1/chat/completions\n", "")),
        (5, 1, "/spec", "missing-key"),
        "missing required key 'endpoint'",
        id="missing-required",
    ),
    pytest.param(
        _with(("  name: triage\n", "  labels: {a: b}\n")),
        (3, 1, "/metadata", "missing-key"),
        "missing required key 'name'",
        id="missing-name",
    ),
    pytest.param(
        _with(append="  endpoint: /v1/embeddings\n"),
        (9, 3, "/spec/endpoint", "duplicate-key"),
        "duplicate key 'endpoint' (first defined at line 7)",
        id="duplicate-yaml-key",
    ),
    pytest.param(
        _with(append="  model: [gpt-4o\n"),
        (10, 1, "", "yaml-syntax"),
        "YAML syntax error: expected ',' or ']'",
        id="yaml-syntax-error",
    ),
    pytest.param(
        _with(append="    model: gpt-4o\n"),
        (9, 10, "", "yaml-syntax"),
        "YAML syntax error: mapping values are not allowed here; likely a key indented deeper",
        id="yaml-over-indented-key-is-named-as-such",
    ),
    pytest.param(
        _with(append="model: gpt-4o  # every line\n  output: x.jsonl\n"),
        (10, 3, "", "yaml-syntax"),
        "; likely a line indented less or more than the keys beside it",
        id="yaml-under-indented-key-is-named-as-such",
    ),
    pytest.param(
        _with(append="\tmodel: gpt-4o\n"),
        (9, 1, "", "yaml-syntax"),
        "YAML indents with spaces, never tabs",
        id="yaml-tab-is-named-as-such",
    ),
    pytest.param(
        _with(("  name: triage\n", "  name: triage\n  labels: {1: a}\n")),
        (5, 12, "/metadata/labels/1", "invalid-key"),
        "key 1 is not a string: quote it ('1')",
        id="non-string-key",
    ),
    pytest.param(
        _with(("apiVersion: batchspec/v1", "apiVersion: batchspec/v2")),
        (1, 13, "/apiVersion", "invalid-value"),
        "expected 'batchspec/v1', got 'batchspec/v2'",
        id="wrong-api-version",
    ),
    pytest.param(
        _with(("kind: Batch", "kind: Project")),
        (2, 7, "/kind", "unknown-kind"),
        "belongs in the project file batchspec.yaml",
        id="project-kind-in-a-manifest",
    ),
    pytest.param(
        "name: ci\non: [push]\n",
        (1, 1, "", "unknown-kind"),
        "not a batchspec manifest",
        id="not-a-manifest",
    ),
    pytest.param(
        "- a\n- b\n",
        (1, 1, "", "not-a-mapping"),
        "must be a mapping",
        id="not-a-mapping",
    ),
    pytest.param(
        _with(("provider: local", "provider: opena")),
        (6, 13, "/spec/provider", "unknown-provider"),
        "unknown provider 'opena' (did you mean 'openai'?)",
        id="unknown-provider",
    ),
    pytest.param(
        _with(("  provider: local\n", "")),
        (5, 1, "/spec", "missing-key"),
        "missing required key 'provider' (or set `defaults.provider`",
        id="no-provider-and-no-default",
    ),
    pytest.param(
        _with(("input: data.jsonl", "input: data/missing.jsonl")),
        (8, 10, "/spec/input", "missing-input"),
        "input file not found: ",
        id="missing-input-file",
    ),
    pytest.param(
        _with(append="  output: data.jsonl\n"),
        (9, 11, "/spec/output", "path-conflict"),
        "output file is the input file",
        id="output-overwrites-input",
    ),
    pytest.param(  # no shell reads a manifest: it was manifests/~/... (not found)
        _with(("input: data.jsonl", "input: ~/data.jsonl")),
        (8, 10, "/spec/input", "missing-input"),
        "('~' is not expanded in a manifest (no shell reads it): give the path relative to",
        id="input-from-home",
    ),
    pytest.param(  # ... or, for a result, silently a folder named '~' beside the manifest
        _with(append="  output: ~/out.jsonl\n"),
        (9, 11, "/spec/output", "path-conflict"),
        "output path '~/out.jsonl' would be written under a folder named '~' beside the "
        "manifest: '~' is not expanded in a manifest",
        id="output-from-home",
    ),
]


@pytest.mark.parametrize(("text", "where", "message"), CASES)
def test_each_problem_names_file_line_column_and_pointer(
    tmp_path: Path, text: str, where: tuple[int, int, str, str], message: str
) -> None:
    """One bad manifest, one problem, at the offending node, with a helpful message."""
    ws = make_workspace(tmp_path / "ws", {"m.yaml": text})
    [problem] = problems(ws, "m.yaml")  # named: a file that is not a manifest is reported
    assert problem.file == ws.resolve() / "m.yaml"
    assert (problem.line, problem.column, problem.pointer, problem.code) == where
    assert message in problem.message
    line, column, pointer, _ = where
    assert str(problem).startswith(f"{ws.resolve() / 'm.yaml'}:{line}:{column}: ")
    assert (f": {pointer}: " in str(problem)) is bool(pointer)


def test_all_problems_across_files_are_reported_at_once(tmp_path: Path) -> None:
    """Loading does not stop at the first problem: every file and every error is listed."""
    ws = make_workspace(
        tmp_path / "ws",
        {
            "a.yaml": _with(("endpoint: /v1/chat/completions", "endpoint: /v1/chat"))
            + "  retri: {}\n",
            "b.yaml": _with(("name: triage", "name: B")),
        },
    )
    with pytest.raises(ManifestError) as caught:
        load(ws)
    err = caught.value
    assert isinstance(err, InvalidManifestError)
    assert [(p.file.name, p.line, p.code) for p in err.problems if p.file] == [
        ("a.yaml", 7, "invalid-value"),
        ("a.yaml", 9, "unknown-key"),
        ("b.yaml", 4, "invalid-value"),
    ]
    assert err.message.startswith("3 problems in the workspace")
    assert len(err.details) == 3 and all(":" in line for line in err.details)


def test_duplicate_resource_name_names_both_places(tmp_path: Path) -> None:
    """A name used twice in the workspace is an error that points at both documents."""
    ws = make_workspace(
        tmp_path / "ws",
        {
            "a.yaml": BASE,
            "b.yaml": "# the same name again\n" + BASE.replace("data.jsonl", "./data.jsonl"),
        },
    )
    [problem] = problems(ws)
    root = ws.resolve()
    assert (problem.file, problem.line, problem.column, problem.code) == (
        root / "b.yaml",
        5,
        9,
        "duplicate-name",
    )
    assert problem.pointer == "/metadata/name"
    assert f"{root / 'a.yaml'}:4:9" in problem.message
    assert f"{root / 'b.yaml'}:5:9" in problem.message


def test_a_result_file_whose_name_starts_with_a_tilde_is_written_beside_the_manifest(
    tmp_path: Path,
) -> None:
    """``output: ~draft.jsonl`` names a file beside the manifest, no folder and no home: it
    is taken as written, not refused as 'written under a folder named ~'."""
    ws = make_workspace(tmp_path / "ws", {"triage.yaml": _with(append="  output: ~draft.jsonl\n")})
    [res] = load(ws).resources
    assert res.output_path == ws.resolve() / "~draft.jsonl"


def test_two_resources_writing_one_output_file_is_an_error(tmp_path: Path) -> None:
    """Results would overwrite each other: the second writer is refused, naming both places."""
    second = (
        BASE.replace("name: triage", "name: other")
        + "  output: results/triage.jsonl\n  errors: results/other.errors.jsonl\n"
    )
    ws = make_workspace(tmp_path / "ws", {"a.yaml": BASE, "b.yaml": second})
    [problem] = problems(ws)
    assert (problem.file.name, problem.line, problem.pointer, problem.code) == (
        "b.yaml",
        9,
        "/spec/output",
        "path-conflict",
    )
    assert "is written by two resources: 'triage' (its output, at " in problem.message
    assert f"{ws / 'a.yaml'}:5:1" in problem.message  # a.yaml names no output: its spec
    assert f"'other' (its output, at {ws / 'b.yaml'}:9:11)" in problem.message


def test_bad_utf8_in_a_manifest_is_located(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are a problem at their line, not a crash."""
    ws = make_workspace(tmp_path / "ws", {})
    (ws / "m.yaml").write_bytes(BASE.encode() + b"  model: caf\xe9\n")
    [problem] = problems(ws)
    assert (problem.line, problem.column, problem.code) == (9, 13, "encoding")


def test_a_bad_project_file_stops_loading_with_its_own_problems(tmp_path: Path) -> None:
    """Manifests are not read against a project file that is itself invalid."""
    ws = make_workspace(tmp_path / "ws", {"m.yaml": BASE}, project=PROJECT + "stat: {}\n")
    [problem] = problems(ws)
    assert (problem.file, problem.line, problem.code) == (
        ws.resolve() / "batchspec.yaml",
        3,
        "unknown-key",
    )


# ---------------------------------------------------------------------------------------------
# Spec hash


def spec_of(
    tmp_path: Path, name: str, text: str, data: bytes | None = None, project: str = PROJECT
) -> str:
    ws = make_workspace(tmp_path / name, {"m.yaml": text}, project=project)
    if data is not None:
        (ws / "data.jsonl").write_bytes(data)
    return load(ws).resources[0].spec_hash


def test_semantic_spec_holds_exactly_the_semantic_fields(tmp_path: Path) -> None:
    """The hashed dict is documented: these keys, defaults applied, the input by content."""
    ws = make_workspace(tmp_path / "ws", {"m.yaml": BASE + "  metadata: {b: '2', a: '1'}\n"})
    [res] = load(ws).resources
    semantic = res.semantic_spec()
    assert semantic == {
        "apiVersion": "batchspec/v1",
        "name": "triage",
        "provider": "local",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "model": None,
        "metadata": {"a": "1", "b": "2"},
        "input_sha256": hashlib.sha256((ws / "data.jsonl").read_bytes()).hexdigest(),
        "answers": "stand-in",  # the built-in `local` provider: the offline stand-in
    }
    canonical = json.dumps(semantic, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert res.spec_hash == hashlib.sha256(canonical.encode()).hexdigest() == spec_hash(semantic)


@pytest.mark.parametrize(
    ("providers", "stand_in"),
    [
        pytest.param("", True, id="the built-in local provider"),
        pytest.param(
            "providers:\n  local: {type: local, options: {upstream: 'http://127.0.0.1:8000/v1'}}\n",
            False,
            id="a local provider with a model server",
        ),
        pytest.param(
            "providers:\n  local: {type: local, options: {upstreams: ['http://h/v1', builtin]}}\n",
            True,
            id="a rotation with the stand-in in it",
        ),
        pytest.param(
            "providers:\n  local: {type: openai, baseUrl: 'http://127.0.0.1:8000/v1'}\n",
            False,
            id="an openai-type provider",
        ),
    ],
)
def test_only_a_resource_the_stand_in_answers_says_so_in_its_spec(
    tmp_path: Path, providers: str, stand_in: bool
) -> None:
    """``"answers": "stand-in"`` is in the spec (and its hash) only when the built-in offline
    stand-in answers the resource: every other resource's spec hash is as it was."""
    ws = make_workspace(tmp_path / "ws", {"m.yaml": BASE}, project=PROJECT + providers)
    [res] = load(ws).resources
    assert res.stand_in is stand_in
    assert ("answers" in res.semantic_spec()) is stand_in


def test_spec_hash_ignores_key_order_and_path_spelling(tmp_path: Path) -> None:
    """Reordered keys and ./x, x or an absolute path to the same input hash the same."""
    reordered = (
        "kind: Batch\napiVersion: batchspec/v1\nspec:\n  input: ./data.jsonl\n"
        "  endpoint: /v1/chat/completions\n  provider: local\nmetadata:\n  name: triage\n"
    )
    absolute = BASE.replace(
        "input: data.jsonl", f"input: {(tmp_path / 'd' / 'data.jsonl').resolve()}"
    )
    hashes = {
        spec_of(tmp_path, "a", BASE),
        spec_of(tmp_path, "b", reordered),
        spec_of(tmp_path, "c", BASE.replace("input: data.jsonl", "input: sub/../data.jsonl")),
        spec_of(tmp_path, "d", absolute),
    }
    assert len(hashes) == 1


def test_spec_hash_is_the_same_on_another_machine(tmp_path: Path) -> None:
    """A workspace copied elsewhere (another checkout, another CI runner) hashes the same."""
    ws = make_workspace(
        tmp_path / "here", {"jobs/m.yaml": BASE.replace("data.jsonl", "../data.jsonl")}
    )
    copy = tmp_path / "there" / "deeper" / "checkout"
    shutil.copytree(ws, copy)
    assert load(ws).resources[0].spec_hash == load(copy).resources[0].spec_hash


def test_spec_hash_ignores_non_semantic_fields(tmp_path: Path) -> None:
    """Labels, output paths, retry, limits, budget and suspend never cause a resubmission."""
    cosmetic = BASE.replace("  name: triage\n", "  name: triage\n  labels: {x: y}\n") + (
        "  output: elsewhere/out.jsonl\n  errors: elsewhere/err.jsonl\n"
        "  retry: {maxAttempts: 7}\n  limits: {maxRequestsPerBatch: 5}\n"
        "  budget: {maxRequests: 3}\n  suspend: true\n"
    )
    assert spec_of(tmp_path, "a", BASE) == spec_of(tmp_path, "b", cosmetic)


@pytest.mark.parametrize(
    ("change", "data"),
    [
        pytest.param(
            ("endpoint: /v1/chat/completions", "endpoint: /v1/responses"), None, id="endpoint"
        ),
        pytest.param(("provider: local", "provider: openai"), None, id="provider"),
        pytest.param(("input: data.jsonl", "input: data.jsonl\n  model: gpt-4o"), None, id="model"),
        pytest.param(
            ("input: data.jsonl", "input: data.jsonl\n  metadata: {a: b}"), None, id="metadata"
        ),
        pytest.param(("name: triage", "name: triage2"), None, id="name"),
        pytest.param(None, b'{"custom_id": "r2"}\n', id="input-content"),
    ],
)
def test_spec_hash_changes_with_each_semantic_field(
    tmp_path: Path, change: tuple[str, str] | None, data: bytes | None
) -> None:
    """Each semantic field (and the input's bytes) makes a new generation."""
    changed = BASE if change is None else BASE.replace(*change)
    assert spec_of(tmp_path, "a", BASE) != spec_of(tmp_path, "b", changed, data)


def test_spec_hash_changes_with_the_completion_window(tmp_path: Path) -> None:
    """completionWindow is semantic (on a provider type that takes more than 24h)."""
    fast = PROJECT + "providers: {fast: {type: groq}}\n"
    base = BASE.replace("provider: local", "provider: fast")
    wide = base.replace("input: data.jsonl", "input: data.jsonl\n  completionWindow: 48h")
    assert spec_of(tmp_path, "a", base, project=fast) != spec_of(tmp_path, "b", wide, project=fast)


@pytest.mark.parametrize(
    ("provider", "window", "refused"),
    [
        pytest.param("local", "48h", "it takes only 24h", id="local-48h"),
        pytest.param("openai", "7d", "it takes only 24h", id="openai-7d"),
        pytest.param("fast", "8d", "it takes 24h to 7d", id="groq-8d"),
        pytest.param("fast", "7d", None, id="groq-7d"),
        pytest.param("claude", "48h", None, id="anthropic-own-window"),
        pytest.param("le", "30d", "it takes 1h to 7d", id="mistral-30d"),
        pytest.param("le", "169h", "it takes 1h to 7d", id="mistral-169h"),
        pytest.param("le", "168h", None, id="mistral-168h"),
        pytest.param("le", "1h", None, id="mistral-1h"),
        # a single window is matched as written: the create refuses "1d" for "24h"
        pytest.param("local", "1d", "it takes only 24h", id="local-1d"),
        # type openai elsewhere than OpenAI is any compatible API (Groq's, a gateway): its own
        pytest.param("gateway", "7d", None, id="openai-compatible-elsewhere"),
        pytest.param("routed", "48h", None, id="litellm-model-route"),
    ],
)
def test_a_completion_window_the_provider_refuses_is_a_manifest_problem(
    tmp_path: Path, provider: str, window: str, refused: str | None
) -> None:
    """A window the provider's type does not take fails with its file:line before anything is
    uploaded (the provider refused it at the create, after the upload); types with a window
    of their own (Anthropic) are not checked."""
    project = PROJECT + (
        "providers: {fast: {type: groq}, claude: {type: anthropic}, le: {type: mistral},\n"
        "  gateway: {type: openai, baseUrl: 'http://127.0.0.1:9/openai/v1'},\n"
        "  routed: {type: openai, options: {litellmModel: m}}}\n"
    )
    text = BASE.replace("provider: local", f"provider: {provider}") + (
        f"  completionWindow: {window}\n"
    )
    ws = make_workspace(tmp_path / "ws", {"m.yaml": text}, project=project)
    if refused is None:
        assert load(ws).resources[0].completion_window == window
        return
    with pytest.raises(InvalidManifestError) as caught:
        load(ws)
    [problem] = caught.value.problems
    assert (problem.line, problem.pointer, problem.code) == (
        9,
        "/spec/completionWindow",
        "completion-window",
    )
    assert refused in problem.message


def test_hash_input_is_injectable(tmp_path: Path) -> None:
    """Callers that hash inputs themselves pass hash_input; the loader uses what it returns."""
    ws = make_workspace(tmp_path / "ws", {"m.yaml": BASE})
    seen: list[Path] = []

    def fake_hash(path: Path) -> str:
        seen.append(path)
        return "f" * 64

    [res] = load_workspace([ws], hash_input=fake_hash).resources
    assert seen == [ws.resolve() / "data.jsonl"]
    assert res.input_sha256 == "f" * 64


def test_nan_and_infinity_are_refused_where_a_schema_bound_cannot_see_them(tmp_path: Path) -> None:
    """`maxCostUSD: .nan` passes `exclusiveMinimum` (NaN compares false) and would never
    refuse a spend; an infinity is no count either (nor valid JSON to send). Both are
    problems at their file:line:column."""
    text = BASE + "  budget:\n    maxCostUSD: .nan\n  metadata:\n    note: ok\n  limits:\n"
    text += "    maxRequests: -.inf\n"
    root = make_workspace(tmp_path, {"m.yaml": text})
    with pytest.raises(InvalidManifestError) as caught:
        load(root)
    shown = [str(p) for p in caught.value.problems]
    assert "m.yaml:10:17: /spec/budget/maxCostUSD: .nan is not a number batchspec accepts" in (
        " ".join(shown)
    )
    assert any("/spec/limits/maxRequests: -.inf is not a number" in p for p in shown)


def test_explicit_yaml_tags_that_build_no_json_value_are_problems(tmp_path: Path) -> None:
    """`!!binary` (bytes) and `!!timestamp` (a date) in a request body, which the schema
    leaves open, are problems at their place; they went through to the template's JSON
    encoder and ended validate/plan/apply in a TypeError traceback. `!!str 1` is a string."""
    text = BASE.replace(
        "  input: data.jsonl\n",
        "  input:\n    rows: data.jsonl\n    body:\n      model: m\n      a: !!binary aGk=\n"
        "      b: !!timestamp 2024-01-01\n      c: !!str 1\n",
    )
    found = problems(make_workspace(tmp_path, {"m.yaml": text}))
    assert [(p.pointer, p.code, p.line) for p in found] == [
        ("/spec/input/body/a", "invalid-value", 12),
        ("/spec/input/body/b", "invalid-value", 13),
    ]
    assert "!!binary values are not JSON" in found[0].message


def test_the_builtin_local_provider_beside_a_declared_one_on_its_folder_is_refused(
    tmp_path: Path,
) -> None:
    """A manifest on the built-in `local` while a declared local provider uses the same
    engine folder (state/local): refused at its provider key; one on the declared is fine."""
    from workspaces import ResourceSpec, local_provider, make_workspace

    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here"), ResourceSpec("b", provider="local")],
    )
    with pytest.raises(InvalidManifestError) as caught:
        load_workspace([ws.root])
    [problem] = caught.value.problems
    assert (problem.code, problem.pointer) == ("shared-engine", "/spec/provider")
    assert problem.file is not None and problem.file.name == "b.yaml"
    assert "in the data folder of provider 'here'" in problem.message
    assert [r.name for r in load_workspace([ws.root / "manifests" / "a.yaml"]).resources] == ["a"]


def test_a_run_reads_and_checks_the_project_file_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_workspace finds the project (for its caches) and hands it to load_workspace,
    which does not read and schema-check batchspec.yaml again; the workspace is the same."""
    from batchspec.core.session import open_workspace
    from batchspec.workspace import project as project_module

    root = make_workspace(tmp_path / "ws", {"m.yaml": BASE})
    read: list[Path] = []
    real = project_module.read_yaml_documents

    def counted(path: Path, **kwargs: object) -> object:
        read.append(path)
        return real(path)

    monkeypatch.setattr(project_module, "read_yaml_documents", counted)
    with open_workspace([str(root)]) as (ws, _):
        assert [r.name for r in ws.resources] == ["triage"]
        assert ws.project.file == root / "batchspec.yaml"
    assert read == [root / "batchspec.yaml"]
