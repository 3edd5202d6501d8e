"""batchspec.workspace.project: finding batchspec.yaml, its defaults, providers, its problems."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchspec.errors import ManifestError
from batchspec.workspace.project import (
    DEFAULT_MANIFEST_GLOBS,
    Budget,
    find_project_file,
    load_project,
)
from batchspec.workspace.yamldoc import InvalidManifestError

HEADER = "apiVersion: batchspec/v1\nkind: Project\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(path: Path) -> list[tuple[int | None, int | None, str, str, str]]:
    with pytest.raises(InvalidManifestError) as caught:
        load_project(path)
    return [(p.line, p.column, p.pointer, p.code, p.message) for p in caught.value.problems]


def test_without_a_project_file_defaults_are_rooted_at_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No batchspec.yaml: state in <root>/state, default globs, the two built-in providers."""
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    project = load_project(tmp_path)
    assert project.file is None
    assert project.root == tmp_path.resolve()
    assert project.state_path == tmp_path.resolve() / "state" / "batchspec.db"
    assert project.manifest_globs == DEFAULT_MANIFEST_GLOBS
    assert sorted(project.providers) == ["local", "openai"]
    openai = project.providers["openai"]
    assert (openai.type, openai.base_url, openai.api_key_env) == (
        "openai",
        "https://api.openai.com/v1",
        "OPENAI_API_KEY",
    )
    local = project.providers["local"]
    assert local.type == "local" and local.api_key_env is None
    assert local.options["upstream"] == "builtin"
    assert Path(local.options["dataDir"]) == tmp_path.resolve() / "state" / "local"


def test_builtin_openai_takes_its_base_url_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OPENAI_BASE_URL points the built-in openai provider elsewhere (e.g. a proxy)."""
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:4000/v1/")
    assert load_project(tmp_path).providers["openai"].base_url == "http://127.0.0.1:4000/v1"


def test_discovery_walks_up_from_a_folder_or_a_file(tmp_path: Path) -> None:
    """Like git: the nearest batchspec.yaml in the start folder or above it wins."""
    file = write(tmp_path / "batchspec.yaml", HEADER)
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    manifest = write(nested / "m.yaml", "")
    assert find_project_file(nested) == file
    assert load_project(nested).file == file.resolve()
    assert load_project(manifest).root == tmp_path.resolve()


def test_the_nearest_project_file_wins(tmp_path: Path) -> None:
    """A nested workspace is its own project, not its parent's."""
    write(tmp_path / "batchspec.yaml", HEADER)
    inner = write(tmp_path / "inner" / "batchspec.yaml", HEADER)
    assert load_project(tmp_path / "inner").file == inner.resolve()


def test_relative_paths_resolve_against_the_project_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """state.path and a local dataDir do not depend on the working directory."""
    write(
        tmp_path / "ws" / "batchspec.yaml",
        HEADER + "state: {path: .db/state.sqlite}\n"
        "providers:\n  engine:\n    type: local\n    options: {dataDir: engine-data}\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    project = load_project(tmp_path / "ws")
    root = (tmp_path / "ws").resolve()
    assert project.state_path == root / ".db" / "state.sqlite"
    assert Path(project.providers["engine"].options["dataDir"]) == root / "engine-data"


def test_declared_providers_get_type_defaults(tmp_path: Path) -> None:
    """Omitted apiKeyEnv, baseUrl and options take the defaults of the provider's type."""
    write(
        tmp_path / "batchspec.yaml",
        HEADER + "providers:\n"
        "  claude: {type: anthropic}\n"
        "  az: {type: azure, baseUrl: 'https://x.openai.azure.com/openai/v1/'}\n"
        "  groq: {type: openai, baseUrl: 'https://api.groq.com/openai/v1', apiKeyEnv: GROQ_KEY,"
        " options: {maxInFlightBatches: 2}}\n",
    )
    providers = load_project(tmp_path).providers
    assert sorted(providers) == ["az", "claude", "groq", "local", "openai"]
    claude = providers["claude"]
    assert (claude.base_url, claude.api_key_env) == (
        "https://api.anthropic.com",
        "ANTHROPIC_API_KEY",
    )
    assert claude.options == {"anthropicVersion": "2023-06-01"}
    az = providers["az"]
    assert (az.base_url, az.api_key_env) == (
        "https://x.openai.azure.com/openai/v1",
        "AZURE_OPENAI_API_KEY",
    )
    assert az.options == {"apiStyle": "v1"}
    groq = providers["groq"]
    assert (groq.api_key_env, groq.options) == ("GROQ_KEY", {"maxInFlightBatches": 2})


@pytest.mark.parametrize(
    "kind", ["openai", "azure", "groq", "together", "anthropic", "gemini", "mistral"]
)
def test_every_remote_provider_takes_create_confirm_seconds(tmp_path: Path, kind: str) -> None:
    """`createConfirmSeconds`, which the reconciler's wait after a lost create names as the
    window to set, is an option of every remote provider type (groq, together and gemini
    refused it as an unknown key)."""
    base = ", baseUrl: 'https://x.openai.azure.com/openai/v1/'" if kind == "azure" else ""
    write(
        tmp_path / "batchspec.yaml",
        HEADER + f"providers:\n  p: {{type: {kind}{base}, options: {{createConfirmSeconds: 5}}}}\n",
    )
    assert load_project(tmp_path).providers["p"].options["createConfirmSeconds"] == 5


def test_declaring_a_builtin_name_replaces_it(tmp_path: Path) -> None:
    """`openai:` in providers overrides the built-in openai provider."""
    write(
        tmp_path / "batchspec.yaml",
        HEADER + "providers:\n  openai: {type: openai, baseUrl: 'http://127.0.0.1:9/v1', "
        "apiKeyEnv: MY_KEY}\n",
    )
    openai = load_project(tmp_path).providers["openai"]
    assert (openai.base_url, openai.api_key_env) == ("http://127.0.0.1:9/v1", "MY_KEY")


def test_defaults_are_read(tmp_path: Path) -> None:
    """defaults.provider and defaults.budget reach the Project."""
    write(
        tmp_path / "batchspec.yaml",
        HEADER + "manifests: [jobs/*.yaml]\n"
        "defaults: {provider: local, budget: {maxRequests: 1000}}\n",
    )
    project = load_project(tmp_path)
    assert project.manifest_globs == ("jobs/*.yaml",)
    assert project.default_provider == "local"
    assert project.default_budget == Budget(max_requests=1000, max_input_tokens=None)


def test_budget_overlay_falls_back_field_by_field() -> None:
    """A resource budget keeps its own fields and takes the rest from the default."""
    own = Budget(max_requests=10)
    assert own.overlay(Budget(max_requests=99, max_input_tokens=500)) == Budget(10, 500)
    assert own.overlay(None) == own


def test_unknown_provider_lookup_names_the_known_ones(tmp_path: Path) -> None:
    """Project.provider() explains which providers exist when a name is unknown."""
    with pytest.raises(ManifestError, match="unknown provider 'nope' \\(known: local, openai\\)"):
        load_project(tmp_path).provider("nope")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            HEADER + "stat: {path: x.db}\n",
            (3, 1, "/stat", "unknown-key", "unknown key 'stat' (did you mean 'state'?)"),
            id="unknown-key",
        ),
        pytest.param(
            HEADER + "providers:\n  gpt:\n    type: openia\n",
            (5, 11, "/providers/gpt/type", "invalid-value", "did you mean 'openai'?"),
            id="bad-type",
        ),
        pytest.param(
            HEADER + "providers:\n  gpt:\n    type: openai\n    apiKeyEnv: sk-live-123\n",
            (6, 16, "/providers/gpt/apiKeyEnv", "invalid-value", "environment variable"),
            id="key-instead-of-variable-name",
        ),
        pytest.param(
            HEADER + "providers:\n  gpt:\n    type: openai\n    options: {apiStyle: v1}\n",
            (6, 15, "/providers/gpt/options/apiStyle", "unknown-key", "allowed here: organization"),
            id="option-of-another-type",
        ),
        pytest.param(
            HEADER
            + "providers:\n  gw:\n    type: openai\n    options: {litellmProvider: vertex}\n",
            (
                6,
                32,
                "/providers/gw/options/litellmProvider",
                "invalid-value",
                "'vertex' is not one of 'openai', 'azure', 'vertex_ai'",
            ),
            id="unknown-litellm-provider",
        ),
        pytest.param(
            HEADER + "providers:\n  gw:\n    type: openai\n    options: {litellmProvider: Azure}\n",
            (
                6,
                32,
                "/providers/gw/options/litellmProvider",
                "invalid-value",
                "(did you mean 'azure'?)",
            ),
            id="litellm-provider-did-you-mean",
        ),
        pytest.param(
            HEADER + "providers:\n  tg:\n    type: togther\n",
            (5, 11, "/providers/tg/type", "invalid-value", "did you mean 'together'?"),
            id="together-did-you-mean",
        ),
        pytest.param(
            HEADER
            + "providers:\n  gpus:\n    type: local\n"
            + "    options: {upstreams: ['http://gpu1:8000/v1#rpm=600,tpm=9000']}\n",
            (
                6,
                27,
                "/providers/gpus/options/upstreams/0",
                "invalid-value",
                "{url: http://gpu1:8000/v1, rpm: 600, tpm: 9000}",
            ),
            id="upstreams-limits-in-the-command-line-form",
        ),
        pytest.param(
            HEADER + "providers:\n  gw:\n    type: openai\n    maxConcurrency: 4\n",
            (
                6,
                5,
                "/providers/gw/maxConcurrency",
                "unknown-key",
                "unknown key 'maxConcurrency' here: it goes under 'options'",
            ),
            id="option-beside-type-goes-under-options",
        ),
        pytest.param(
            HEADER
            + "providers:\n  gpus:\n    type: local\n"
            + "    upstreams: [http://gpu1:8000/v1, http://gpu2:8000/v1]\n",
            (
                6,
                5,
                "/providers/gpus/upstreams",
                "unknown-key",
                "options: {upstreams: ...}",
            ),
            id="local-option-beside-type-goes-under-options",
        ),
        pytest.param(
            HEADER + "providers:\n  gw:\n    type: openai\n    baseUrl: http://127.0.0.1:/v1\n",
            (6, 14, "/providers/gw/baseUrl", "malformed-url", "has an empty port"),
            id="base-url-empty-port",
        ),
        pytest.param(
            HEADER
            + "providers:\n  gw:\n    type: openai\n    baseUrl: http://127.0.0.1:99999/v1\n",
            (6, 14, "/providers/gw/baseUrl", "malformed-url", "port '99999', which is no number"),
            id="base-url-port-out-of-range",
        ),
        pytest.param(
            HEADER + "providers:\n  gw:\n    type: openai\n    baseUrl: http://gw:8x/v1\n",
            (6, 14, "/providers/gw/baseUrl", "malformed-url", "port '8x'"),
            id="base-url-port-not-a-number",
        ),
        pytest.param(
            HEADER + "providers:\n  gw:\n    type: openai\n    baseUrl: http://:8000/v1\n",
            (6, 14, "/providers/gw/baseUrl", "malformed-url", "names no host"),
            id="base-url-no-host",
        ),
        pytest.param(
            HEADER + 'providers:\n  gw:\n    type: openai\n    baseUrl: "http://[::1/v1"\n',
            (6, 14, "/providers/gw/baseUrl", "malformed-url", "is no URL (Invalid IPv6 URL)"),
            id="base-url-unclosed-bracket",
        ),
        pytest.param(
            HEADER + "providers:\n  az:\n    type: azure\n",
            (4, 3, "/providers/az", "missing-key", "missing required key 'baseUrl'"),
            id="azure-needs-base-url",
        ),
        pytest.param(
            HEADER + "defaults: {provider: opena}\n",
            (3, 22, "/defaults/provider", "unknown-provider", "did you mean 'openai'?"),
            id="unknown-default-provider",
        ),
        pytest.param(
            "apiVersion: batchspec/v1\nkind: Batch\n",
            (2, 7, "/kind", "invalid-value", "expected 'Project', got 'Batch'"),
            id="wrong-kind",
        ),
        pytest.param(
            HEADER + "---\n" + HEADER,
            (4, 1, "", "extra-document", "one document"),
            id="two-documents",
        ),
        pytest.param(
            HEADER + "state: {path: [x}\n",
            (3, 17, "", "yaml-syntax", "YAML syntax error"),
            id="yaml-syntax",
        ),
        pytest.param(
            "kind: Project\n",
            (1, 1, "", "missing-key", "missing required key 'apiVersion'"),
            id="missing-api-version",
        ),
    ],
)
def test_bad_project_files_are_located(
    tmp_path: Path, text: str, expected: tuple[int, int, str, str, str]
) -> None:
    """Each problem in batchspec.yaml names its line, column and JSON pointer."""
    write(tmp_path / "batchspec.yaml", text)
    [(line, column, pointer, code, message)] = problems_of(tmp_path)
    assert (line, column, pointer, code) == expected[:4]
    assert expected[4] in message


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        pytest.param("apiKeyEnv", "sk-proj-Abc123Def456Ghi789", id="openai-key"),
        pytest.param("options: {upstreamApiKeyEnv", "sk-proj-Abc123Def456Ghi789", id="upstream"),
        # an Azure key is 32 hex characters: it can look like a variable name
        pytest.param("apiKeyEnv", "f3a9c1e5b2d4f60a8e7c3b1d9f2a6e4b", id="azure-hex-key"),
    ],
)
def test_a_key_given_as_its_variable_name_is_never_echoed(
    tmp_path: Path, key: str, secret: str
) -> None:
    """An API key written where its variable's name belongs is refused without quoting it:
    the message (shown in CI logs) says what is wrong and where, not the value."""
    close = "}" if key.startswith("options") else ""
    kind = "local" if close else "openai"
    write(
        tmp_path / "batchspec.yaml",
        HEADER + f"providers:\n  p:\n    type: {kind}\n    {key}: {secret}{close}\n",
    )
    with pytest.raises(InvalidManifestError) as caught:
        load_project(tmp_path)
    text = "\n".join([caught.value.message, *caught.value.details])
    assert "environment variable name" in text and "batchspec.yaml:6:" in text
    assert secret not in text and secret[:10] not in text


def test_every_problem_of_a_project_file_is_reported(tmp_path: Path) -> None:
    """Validation does not stop at the first problem; the error lists one line each."""
    write(
        tmp_path / "batchspec.yaml",
        HEADER + "stat: {}\nproviders:\n  x: {type: nope}\ndefaults: {provider: y}\n",
    )
    with pytest.raises(InvalidManifestError) as caught:
        load_project(tmp_path)
    err = caught.value
    assert [p.code for p in err.problems] == ["unknown-key", "invalid-value", "unknown-provider"]
    assert "3 problems in the project file" in err.message
    assert err.details[0].endswith(
        "batchspec.yaml:3:1: /stat: unknown key 'stat' (did you mean 'state'?)"
    )


@pytest.mark.parametrize(
    ("options", "where", "base"),
    [
        pytest.param(
            "upstream: http://gpu1:8000/v1/chat/completions",
            "/providers/gpus/options/upstream",
            "http://gpu1:8000/v1",
            id="upstream",
        ),
        pytest.param(
            "upstreams: [http://gpu1:8000/v1, 'http://gpu2:8000/v1/embeddings/']",
            "/providers/gpus/options/upstreams/1",
            "http://gpu2:8000/v1",
            id="upstreams-item",
        ),
        pytest.param(
            "upstreams: [{url: 'http://gpu3:8000/chat/completions', rpm: 600}]",
            "/providers/gpus/options/upstreams/0/url",
            "http://gpu3:8000",
            id="upstreams-object",
        ),
    ],
)
def test_an_upstream_that_names_an_endpoint_fails_validation_with_its_base_url(
    tmp_path: Path, options: str, where: str, base: str
) -> None:
    """`batchspec validate` refuses a local provider's upstream URL that ends in an endpoint
    (every line would go to .../chat/completions/chat/completions), at its line, naming the
    base URL meant, as `batchspec serve --upstream` does; base URLs still validate."""
    providers = f"providers:\n  gpus:\n    type: local\n    options:\n      {options}\n"
    write(tmp_path / "batchspec.yaml", HEADER + providers)
    [(line, _, pointer, _, message)] = problems_of(tmp_path)
    assert (line, pointer) == (7, where)
    assert "names an endpoint" in message and message.endswith(f"use '{base}'")

    fixed = options.replace("/chat/completions", "").replace("/embeddings/", "")
    write(tmp_path / "batchspec.yaml", HEADER + providers.replace(options, fixed))
    assert load_project(tmp_path).providers["gpus"].type == "local"


@pytest.mark.parametrize(
    ("options", "where", "meant"),
    [
        pytest.param(
            "upstream: 'gpu1:8000/v1'", "/providers/gpus/options/upstream", "gpu1:8000/v1", id="one"
        ),
        pytest.param(
            "upstreams: [http://gpu1:8000/v1, '127.0.0.1:8001/v1']",
            "/providers/gpus/options/upstreams/1",
            "127.0.0.1:8001/v1",
            id="upstreams-item",
        ),
        pytest.param(
            "upstreams: [{url: 'u:secret@gpu3:8000/v1', rpm: 60}]",
            "/providers/gpus/options/upstreams/0/url",
            "gpu3:8000/v1",
            id="object-with-credentials",
        ),
    ],
)
def test_an_upstream_without_its_scheme_is_told_the_url_meant(
    tmp_path: Path, options: str, where: str, meant: str
) -> None:
    """An upstream written without `http://` fails at its line with the URL it should be (as
    `batchspec serve --upstream` says), not the schema's regular expression; a password
    before '@' is never shown."""
    providers = f"providers:\n  gpus:\n    type: local\n    options:\n      {options}\n"
    write(tmp_path / "batchspec.yaml", HEADER + providers)
    [(line, _, pointer, _, message)] = problems_of(tmp_path)
    assert (line, pointer) == (7, where)
    assert f"did you mean 'http://{meant}'?" in message
    assert "does not match" not in message and "secret" not in message


@pytest.mark.parametrize("written", ["bultin", "Builtin", "built-in"])
def test_a_misspelt_builtin_upstream_is_told_builtin(tmp_path: Path, written: str) -> None:
    """`upstream: bultin` is the offline stand-in mistyped, not a host without its scheme:
    it was told "did you mean 'http://bultin'?", a server that is not there."""
    providers = f"providers:\n  gpus:\n    type: local\n    options:\n      upstream: {written}\n"
    write(tmp_path / "batchspec.yaml", HEADER + providers)
    [(line, _, pointer, _, message)] = problems_of(tmp_path)
    assert (line, pointer) == (7, "/providers/gpus/options/upstream")
    assert "did you mean 'builtin' (the offline stand-in)?" in message and "http://" not in message


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        pytest.param("127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1", id="loopback"),
        pytest.param("localhost:8000/v1", "http://localhost:8000/v1", id="localhost"),
        pytest.param("u:secret@gw.example.com/v1", "https://gw.example.com/v1", id="remote"),
    ],
)
def test_a_base_url_without_its_scheme_is_told_the_url_meant(
    tmp_path: Path, written: str, meant: str
) -> None:
    """A baseUrl written without its scheme fails at its line with the URL it should be (http
    on this machine, https elsewhere), as an upstream's does, not the schema's regular
    expression; a password before '@' is never shown."""
    provider = f"providers:\n  gw:\n    type: openai\n    baseUrl: '{written}'\n"
    write(tmp_path / "batchspec.yaml", HEADER + provider)
    [(line, _, pointer, _, message)] = problems_of(tmp_path)
    assert (line, pointer) == (6, "/providers/gw/baseUrl")
    assert f"did you mean '{meant}'?" in message
    assert "does not match" not in message and "secret" not in message


def test_a_base_url_without_its_scheme_is_hinted_with_a_whole_example(tmp_path: Path) -> None:
    """A baseUrl that does not match ^https?:// is hinted with its description's whole first
    sentence, the example URL included, not cut at the "e.g." inside it."""
    provider = "providers:\n  gw:\n    type: openai\n    baseUrl: htp:/127.0.0.1:8000/v1\n"
    write(tmp_path / "batchspec.yaml", HEADER + provider)
    [(line, _, pointer, _, message)] = problems_of(tmp_path)
    assert (line, pointer) == (6, "/providers/gw/baseUrl")
    assert message.endswith("(API base URL, e.g. https://api.openai.com/v1)")


@pytest.mark.parametrize(
    ("value", "tail"),
    [
        pytest.param('"8"', "got string '8' (drop the quotes: 8)", id="quoted-number"),
        pytest.param("' 8 '", "got string ' 8 ' (drop the quotes: 8)", id="padded"),
        pytest.param('"eight"', "got string 'eight'", id="a-word"),
        pytest.param('"8.5"', "got string '8.5'", id="not-an-integer"),
    ],
)
def test_a_quoted_number_is_told_to_drop_its_quotes(tmp_path: Path, value: str, tail: str) -> None:
    """`maxConcurrency: "8"` fails at its line with what to write instead (8, unquoted);
    a word or a fraction where an integer belongs gets no such advice."""
    provider = "providers:\n  gw:\n    type: openai\n    apiKeyEnv: GW_KEY\n    options:\n"
    write(tmp_path / "batchspec.yaml", HEADER + provider + f"      maxConcurrency: {value}\n")
    [(line, _, pointer, _, message)] = problems_of(tmp_path)
    assert (line, pointer) == (8, "/providers/gw/options/maxConcurrency")
    assert message == f"expected integer, {tail}"


def test_max_concurrency_above_the_cap_is_refused_at_its_line(tmp_path: Path) -> None:
    """`maxConcurrency: 100000` (a thread per call) fails at its line naming the cap, 256,
    the most `--parallelism` takes too; 256 itself is valid."""
    provider = "providers:\n  gw:\n    type: openai\n    apiKeyEnv: GW_KEY\n    options:\n"
    write(tmp_path / "batchspec.yaml", HEADER + provider + "      maxConcurrency: 100000\n")
    [(line, _, pointer, _, message)] = problems_of(tmp_path)
    assert (line, pointer) == (8, "/providers/gw/options/maxConcurrency")
    assert message == "100000 is greater than the maximum of 256"
    write(tmp_path / "batchspec.yaml", HEADER + provider + "      maxConcurrency: 256\n")
    assert load_project(tmp_path).file is not None


def test_two_local_providers_on_one_engine_folder_are_a_problem(tmp_path: Path) -> None:
    """Two `type: local` providers with the default dataDir share one engine, whose batches
    run on one upstream and which one process cannot open twice: the second is refused at
    its line, naming both; a dataDir of its own makes the file valid."""
    shared = (
        HEADER + "providers:\n"
        "  local: {type: local, options: {upstream: builtin}}\n"
        "  gpu: {type: local, options: {upstream: 'http://127.0.0.1:9/v1'}}\n"
    )
    write(tmp_path / "batchspec.yaml", shared)
    [(line, _, pointer, code, message)] = problems_of(tmp_path)
    assert (line, pointer, code) == (5, "/providers/gpu", "shared-engine-folder")
    assert "'gpu' and 'local' share the engine data folder state/local" in message
    own = shared.replace("'http://127.0.0.1:9/v1'}", "'http://127.0.0.1:9/v1', dataDir: x}")
    write(tmp_path / "batchspec.yaml", own)
    assert load_project(tmp_path).providers["gpu"].options["dataDir"] == str(tmp_path / "x")


@pytest.mark.parametrize(
    "second",
    [
        pytest.param("http://gpu1:8000/v1/", id="trailing-slash"),
        pytest.param("{url: 'http://GPU1:8000/v1', rpm: 60}", id="object-other-case"),
    ],
)
def test_a_local_provider_naming_one_upstream_twice_fails_validation(
    tmp_path: Path, second: str
) -> None:
    """`upstreams:` naming one server twice (however spelt) is a problem of the project file
    at the second one's line, found by `validate`, as `serve --upstream` refuses it; before,
    validate and plan passed and only apply failed, with no file or line."""
    options = f"upstreams: [http://gpu1:8000/v1, http://gpu2:8000/v1, {second}]"
    providers = f"providers:\n  gpus:\n    type: local\n    options:\n      {options}\n"
    write(tmp_path / "batchspec.yaml", HEADER + providers)
    [(line, _, pointer, code, message)] = problems_of(tmp_path)
    assert (line, pointer, code) == (7, "/providers/gpus/options/upstreams/2", "repeated-upstream")
    assert "same server as item 0" in message


def test_a_password_in_a_providers_url_is_refused_at_its_line_and_never_shown(
    tmp_path: Path,
) -> None:
    """A committed baseUrl or upstream URL with user:password@ is a problem at its line (its
    password never shown), as state.url's is: httpx would send it as Basic auth in place of
    the API key, whose 401 then blamed the key. A user name alone is no secret."""
    providers = (
        "providers:\n"
        "  gw:\n    type: openai\n    baseUrl: http://bob:s3cretpw@gw.example/v1\n"
        "  gpus:\n    type: local\n    options:\n"
        "      upstreams: [http://alice@gpu1:8000/v1, {url: 'http://u:pw2@gpu2:8000/v1'}]\n"
    )
    write(tmp_path / "batchspec.yaml", HEADER + providers)
    found = problems_of(tmp_path)
    assert [(line, pointer, code) for line, _, pointer, code, _ in found] == [
        (6, "/providers/gw/baseUrl", "password-in-url"),
        (10, "/providers/gpus/options/upstreams/1/url", "password-in-url"),
    ]
    assert "http://bob:***@gw.example/v1" in found[0][4] and "apiKeyEnv" in found[0][4]
    assert "options.upstreamApiKeyEnv" in found[1][4]
    assert not any("s3cretpw" in p[4] or "pw2@" in p[4] for p in found)
