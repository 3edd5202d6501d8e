"""The project file ``batchspec.yaml``: finding it, validating it, and its defaults.

A workspace is the folder holding ``batchspec.yaml``. ``load_project(start)`` looks for the
file in ``start`` (a folder, or a file's folder) and then in each parent, like git looks for
``.git``. Without one, the defaults apply, rooted at ``start``: state at
``<root>/state/batchspec.db``, manifests ``**/*.yaml`` and ``**/*.yml``, and the built-in
providers only. Commands load the project with ``load_workspace_project``, which refuses to
run outside a workspace (``NotAWorkspaceError``, saying how to start one) rather than
treating whatever folder they run in as one.

Promises:

- Relative paths in the project file (``state.path``, a local provider's ``dataDir``) resolve
  against the project file's folder, whatever the working directory.
- The state lives in an SQLite file (``state.path``) or in a PostgreSQL database
  (``state.url``, or ``state.urlEnv``: the name of the variable holding the URL; or a URL given
  as ``--state`` / ``BATCHSPEC_STATE``). ``Project.state`` is what ``StateStore.open`` takes;
  ``Project.state_label`` says where it is without the password. A URL with a password in the
  project file is refused (it would be committed to git); the variable named by ``urlEnv`` is
  read only when the state is opened. ``state_path``'s folder keeps the local caches.
  ``state.blobs`` (a folder or an fsspec URL) shares the result store between runners; a
  PostgreSQL state shares it in its own database when ``state.blobs`` is not given.
- Two providers exist without declaration: ``openai`` (type openai, base URL from
  ``OPENAI_BASE_URL`` or https://api.openai.com/v1, key from ``OPENAI_API_KEY``) and ``local``
  (type local, data in ``state/local``, the built-in offline upstream). Declaring either name
  replaces the built-in.
- ``ProviderConfig.options`` holds the type's options with their YAML (camelCase) keys, as
  the provider schema names them, with the schema's defaults filled in; a local provider's
  ``dataDir`` is an absolute path (a string). API keys are never read here: only the *name*
  of the environment variable is kept.
- Every problem in the file is reported at once (``InvalidManifestError``), each with
  ``file:line:column`` and its JSON pointer.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchspec.errors import ManifestError, StateError
from batchspec.storage.database_url import is_database_url, redact_url, url_password
from batchspec.wire.hosts import unreachable_url
from batchspec.wire.upstream_place import upstream_place
from batchspec.workspace.yamldoc import (
    Problem,
    YamlDocument,
    display_path,
    load_schema,
    pointer_join,
    raise_if_problems,
    read_yaml_documents,
    schema_problems,
    suggest,
)

PROJECT_FILE_NAME = "batchspec.yaml"
DEFAULT_STATE_PATH = "state/batchspec.db"
DEFAULT_MANIFEST_GLOBS: tuple[str, ...] = ("**/*.yaml", "**/*.yml")
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_ANTHROPIC_BASE_URL = "https://api.anthropic.com"
BUILTIN_PROVIDER_NAMES = ("local", "openai")
# Which environment variable holds the key when a provider does not name one.
DEFAULT_API_KEY_ENV: Mapping[str, str | None] = {
    "openai": "OPENAI_API_KEY",
    "azure": "AZURE_OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "groq": "GROQ_API_KEY",
    "together": "TOGETHER_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "local": None,
}


@dataclass(frozen=True)
class Budget:
    """Spending limits per generation; ``None`` means no limit."""

    max_requests: int | None = None
    max_input_tokens: int | None = None
    max_cost_usd: float | None = None

    def overlay(self, fallback: Budget | None) -> Budget:
        """This budget, with fields it leaves unset taken from ``fallback``."""
        if fallback is None:
            return self
        return Budget(
            max_requests=_first(self.max_requests, fallback.max_requests),
            max_input_tokens=_first(self.max_input_tokens, fallback.max_input_tokens),
            max_cost_usd=_first(self.max_cost_usd, fallback.max_cost_usd),
        )


@dataclass(frozen=True)
class ProviderConfig:
    """A provider as declared (or built in). ``api_key_env`` names a variable, never a key."""

    name: str
    type: str
    base_url: str | None
    api_key_env: str | None
    options: Mapping[str, Any]
    #: ``pricing:`` model (or ``"*"``) -> ``{"input", "output"}`` USD per million tokens
    pricing: Mapping[str, Mapping[str, float]] = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class Project:
    """A workspace's settings. ``file`` is None when no ``batchspec.yaml`` was found."""

    root: Path
    file: Path | None
    #: the SQLite state file; with a PostgreSQL state, its folder still holds local caches
    state_path: Path
    manifest_globs: tuple[str, ...]
    providers: Mapping[str, ProviderConfig]
    default_provider: str | None
    default_budget: Budget | None
    #: a PostgreSQL URL (from the file, without a password, or from --state); never printed
    state_url: str | None = dataclasses.field(default=None, repr=False)
    #: the name of the environment variable that holds the PostgreSQL URL
    state_url_env: str | None = None
    #: ``state.blobs``: the result store's shared tier, a folder (absolute) or an fsspec URL
    state_blobs: str | None = None

    @property
    def state(self) -> Path | str:
        """Where the state is, for ``StateStore.open``: the SQLite file or the PostgreSQL URL."""
        if self.state_url is not None:
            return self.state_url
        if self.state_url_env is not None:
            return _url_from_env(self.state_url_env)
        return self.state_path

    @property
    def state_label(self) -> str:
        """Where the state is, fit for messages: the file, or the URL without its password."""
        if self.state_url is None and self.state_url_env is not None:
            return f"the PostgreSQL database in ${self.state_url_env}"
        state = self.state
        return redact_url(state) if isinstance(state, str) else str(state)

    @property
    def shared_state(self) -> bool:
        """True when the state is a database server (PostgreSQL), not a file here."""
        return self.state_url is not None or self.state_url_env is not None

    def has_state(self) -> bool:
        """Whether a state exists to read: the SQLite file does, or the state is a server."""
        return self.shared_state or self.state_path.exists()

    def provider(self, name: str) -> ProviderConfig:
        """The provider called ``name``; ``ManifestError`` naming the known ones if none is."""
        try:
            return self.providers[name]
        except KeyError:
            known = ", ".join(sorted(self.providers))
            raise ManifestError(
                f"unknown provider '{name}' (known: {known}); declare it under `providers:` "
                "in batchspec.yaml"
            ) from None


def find_project_file(start: str | Path | None = None) -> Path | None:
    """The nearest ``batchspec.yaml`` in ``start``'s folder or above it, if any."""
    folder = _start_folder(start)
    for candidate in (folder, *folder.parents):
        path = candidate / PROJECT_FILE_NAME
        # Anything but a folder by that name is the project file; the reader refuses one
        # that is not a regular file (a FIFO, a link to a device) rather than reading it.
        if path.is_file() or (os.path.lexists(path) and not path.is_dir()):
            return path
    return None


def local_engine_in(folder: str | Path, start: str | Path | None = None) -> str | None:
    """The ``type: local`` provider of the workspace around ``start`` (default: the working
    directory) whose engine data folder is ``folder`` (the built-in ``local``'s
    ``state/local`` included), if any: a ``batchspec serve`` holding it makes an apply of
    that provider's resources wait for it (exit 3). None outside a workspace, or when its
    project file does not load (the commands that need it say why)."""
    if find_project_file(start) is None:
        return None
    try:
        project = load_project(start)
    except (ManifestError, StateError):
        return None
    target = os.path.normpath(Path(folder).resolve())
    default = _option_defaults("local")["dataDir"]
    for name, config in sorted(project.providers.items()):
        if config.type != "local":
            continue
        data_dir = str(config.options.get("dataDir", default))
        if os.path.normpath((project.root / data_dir).resolve()) == target:
            return name
    return None


class NotAWorkspaceError(ManifestError):
    """No ``batchspec.yaml`` in the start folder or above it: not a batchspec workspace."""


def load_workspace_project(
    start: str | Path | None = None, *, state_path: str | Path | None = None
) -> Project:
    """``load_project`` for a command: outside any workspace, ``NotAWorkspaceError``.

    Commands never fall back to the defaults rooted at an arbitrary folder: from ``/tmp`` that
    would read every YAML file below it (other projects, virtualenvs) as manifests, and put
    a state folder there.
    """
    if find_project_file(start) is None:
        folder = _start_folder(start)
        if start is not None and not os.path.lexists(start):  # a mistyped path, most likely
            raise NotAWorkspaceError(
                f"{start}: no such file or folder (and no {PROJECT_FILE_NAME} above it)",
                details=[
                    f"check the path (relative to {Path.cwd()}); to start a new workspace in "
                    "a folder, `batchspec init DIR`",
                ],
            )
        raise NotAWorkspaceError(
            f"not a batchspec workspace: no {PROJECT_FILE_NAME} in {folder} or any folder above it",
            details=[
                "start one with `batchspec init` (here) or `batchspec init DIR`, then run "
                "the command inside it, or give a path inside an existing workspace",
            ],
        )
    return load_project(start, state_path=state_path)


def load_project(
    start: str | Path | None = None, *, state_path: str | Path | None = None
) -> Project:
    """The project governing ``start`` (a folder or file; default: the working directory).

    ``state_path`` (the CLI's ``--state`` / ``BATCHSPEC_STATE``: a path, or a PostgreSQL URL)
    overrides the project file's ``state``.
    """
    project = _load_project(start)
    return project if state_path is None else with_state(project, state_path)


#: a URL's scheme (RFC 3986: a letter, then letters, digits, + - .) and its ://
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def with_state(project: Project, state_path: str | Path) -> Project:
    """``project`` with its state moved to ``state_path``: an SQLite file, or a URL."""
    if is_database_url(state_path):
        return dataclasses.replace(project, state_url=str(state_path), state_url_env=None)
    url = _URL_SCHEME.match(str(state_path))
    if url:  # sqlite:///x.db, mysql://, postgresql+psycopg://: a URL, not a file name
        scheme = url.group(1)
        driver = " (without SQLAlchemy's +driver part)" if "+" in scheme else ""
        raise StateError(
            f"the state given by --state or BATCHSPEC_STATE is a {scheme}:// URL, which "
            "batchspec does not open: give an SQLite state as a path (e.g. state/batchspec.db), "
            f"or PostgreSQL as postgresql://user@host:5432/db{driver}"
        )
    return dataclasses.replace(
        project, state_path=Path(state_path).resolve(), state_url=None, state_url_env=None
    )


def _load_project(start: str | Path | None) -> Project:
    file = find_project_file(start)
    if file is None:
        return default_project(_start_folder(start))
    documents, problems = read_yaml_documents(file)
    for extra in documents[1:]:
        problems.append(
            Problem.at(extra.start, "", "extra-document", "the project file holds one document")
        )
    data: Mapping[str, Any] = {}
    if documents:
        doc = documents[0]
        problems.extend(_document_problems(doc))
        problems.extend(_default_provider_problems(doc))
        problems.extend(_state_problems(doc))
        problems.extend(_shared_engine_problems(doc, file.parent))
        problems.extend(_repeated_upstream_problems(doc))
        problems.extend(_provider_url_password_problems(doc))
        problems.extend(_base_url_problems(doc))
        if isinstance(doc.data, Mapping):
            data = doc.data
    raise_if_problems(problems, what=f"the project file {display_path(file)}")
    return _project_from(file, data)


def default_project(root: Path) -> Project:
    """The settings of a workspace without a project file, rooted at ``root``."""
    root = root.resolve()
    return Project(
        root=root,
        file=None,
        state_path=root / DEFAULT_STATE_PATH,
        manifest_globs=DEFAULT_MANIFEST_GLOBS,
        providers=builtin_providers(root),
        default_provider=None,
        default_budget=None,
    )


def builtin_providers(root: Path) -> dict[str, ProviderConfig]:
    """The providers every workspace has without declaring them."""
    return {
        "local": _provider_config(root, "local", {"type": "local"}),
        "openai": _provider_config(root, "openai", {"type": "openai"}),
    }


# ---------------------------------------------------------------------------------------------


def _start_folder(start: str | Path | None) -> Path:
    path = Path(start) if start is not None else Path.cwd()
    try:
        path = path.resolve()
    except RuntimeError:  # a symlink loop (pathlib before 3.13): its folder is the start
        return path.absolute().parent
    # A file's folder is the start; so is the folder of a file that does not exist yet.
    looks_like_file = path.is_file() or (not path.exists() and bool(path.suffix))
    return path.parent if looks_like_file else path


def _document_problems(doc: YamlDocument) -> list[Problem]:
    if not isinstance(doc.data, Mapping):
        message = (
            "the project file must be a mapping with `apiVersion: batchspec/v1`, `kind: Project`"
        )
        return [Problem.at(doc.start, "", "not-a-mapping", message)]
    return schema_problems(doc, "project")


def _project_from(file: Path, data: Mapping[str, Any]) -> Project:
    root = file.parent.resolve()
    state = data.get("state") or {}
    defaults = data.get("defaults") or {}
    providers = builtin_providers(root)
    for name, declared in (data.get("providers") or {}).items():
        providers[name] = _provider_config(root, name, declared)
    budget = defaults.get("budget")
    return Project(
        root=root,
        file=file.resolve(),
        state_path=root / state.get("path", DEFAULT_STATE_PATH),
        manifest_globs=tuple(data.get("manifests") or DEFAULT_MANIFEST_GLOBS),
        providers=providers,
        default_provider=defaults.get("provider"),
        default_budget=budget_from(budget) if budget is not None else None,
        state_url=state.get("url"),
        state_url_env=state.get("urlEnv"),
        state_blobs=_blobs_location(root, state.get("blobs")),
    )


def _blobs_location(root: Path, blobs: str | None) -> str | None:
    """``state.blobs`` as given if it is a URL, else the folder resolved against ``root``."""
    if blobs is None or "://" in blobs:
        return blobs
    return str(root / os.path.expanduser(blobs))


def budget_from(data: Mapping[str, Any]) -> Budget:
    """A ``Budget`` from its (already validated) YAML mapping."""
    cost = data.get("maxCostUSD")
    return Budget(
        max_requests=data.get("maxRequests"),
        max_input_tokens=data.get("maxInputTokens"),
        max_cost_usd=float(cost) if cost is not None else None,
    )


def _provider_config(root: Path, name: str, data: Mapping[str, Any]) -> ProviderConfig:
    kind = data["type"]
    base_url = data.get("baseUrl")
    if base_url is None and kind == "openai":
        base_url = os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL
    elif base_url is None and kind == "anthropic":
        base_url = DEFAULT_ANTHROPIC_BASE_URL
    options = {**_option_defaults(kind), **(data.get("options") or {})}
    if "dataDir" in options:
        options["dataDir"] = str(root / options["dataDir"])
    return ProviderConfig(
        name=name,
        type=kind,
        base_url=base_url.rstrip("/") if base_url else None,
        api_key_env=data.get("apiKeyEnv", DEFAULT_API_KEY_ENV[kind]),
        options=options,
        pricing=dict(data.get("pricing") or {}),
    )


def _option_defaults(kind: str) -> dict[str, Any]:
    """The ``default`` of each option of a provider type, read from the schema itself."""
    options = load_schema("project")["$defs"][f"{kind}Options"]["properties"]
    return {key: prop["default"] for key, prop in options.items() if "default" in prop}


def _default_provider_problems(doc: YamlDocument) -> list[Problem]:
    """``defaults.provider`` must name a declared or built-in provider."""
    data = doc.data if isinstance(doc.data, Mapping) else {}
    defaults = data.get("defaults")
    name = defaults.get("provider") if isinstance(defaults, Mapping) else None
    declared = data.get("providers")
    known = set(BUILTIN_PROVIDER_NAMES) | set(declared if isinstance(declared, Mapping) else ())
    if not isinstance(name, str) or name in known:
        return []
    pointer = pointer_join(pointer_join("", "defaults"), "provider")
    hint = suggest(name, sorted(known))
    tail = f"did you mean '{hint}'?" if hint else f"known: {', '.join(sorted(known))}"
    message = f"unknown provider '{name}' ({tail})"
    return [Problem.at(doc.location(pointer), pointer, "unknown-provider", message)]


def _shared_engine_problems(doc: YamlDocument, root: Path) -> list[Problem]:
    """Each declared ``type: local`` provider has an engine data folder of its own.

    An engine runs every unfinished batch of its folder on *its* upstream, and a process
    opens a folder once: two providers on one folder (both left at the default
    ``state/local``) would run each other's batches on the wrong model server, or stop an
    apply that uses both with "in use". (The built-in ``local`` is not declared: it is
    checked only where a manifest uses it.)
    """
    data = doc.data if isinstance(doc.data, Mapping) else {}
    declared = data.get("providers")
    if not isinstance(declared, Mapping):
        return []
    default = _option_defaults("local")["dataDir"]
    first: dict[str, str] = {}
    problems = []
    for name, provider in declared.items():
        if not isinstance(provider, Mapping) or provider.get("type") != "local":
            continue
        options = provider.get("options")
        folder = options.get("dataDir", default) if isinstance(options, Mapping) else default
        if not isinstance(folder, str):
            continue  # the schema has reported it
        key = os.path.normpath(root.resolve() / folder)
        other = first.setdefault(key, name)
        if other == name:
            continue
        pointer = pointer_join(pointer_join("", "providers"), name)
        message = (
            f"providers '{name}' and '{other}' share the engine data folder {folder}: an "
            "engine runs every batch of its folder on its own upstream, so one's batches "
            f"would run on the other's model server; give '{name}' a folder of its own "
            f"(options: {{dataDir: state/local-{name}}}), or the other if '{name}' has "
            "batches in flight: a batch stays in the folder it was created in"
        )
        problems.append(Problem.at(doc.location(pointer), pointer, "shared-engine-folder", message))
    return problems


def _repeated_upstream_problems(doc: YamlDocument) -> list[Problem]:
    """A local provider's ``upstreams:`` names each server once, however its URL is spelt
    (``upstream_place``), as ``batchspec serve --upstream`` demands: found here, at its line,
    rather than by the apply that opens the engine."""
    data = doc.data if isinstance(doc.data, Mapping) else {}
    declared = data.get("providers")
    problems = []
    for name, provider in (declared if isinstance(declared, Mapping) else {}).items():
        if not isinstance(provider, Mapping) or provider.get("type") != "local":
            continue
        options = provider.get("options")
        upstreams = options.get("upstreams") if isinstance(options, Mapping) else None
        first: dict[str, int] = {}
        for index, item in enumerate(upstreams if isinstance(upstreams, list) else ()):
            url = item.get("url") if isinstance(item, Mapping) else item
            if not isinstance(url, str) or url == "builtin":
                continue
            other = first.setdefault(upstream_place(url), index)
            if other == index:
                continue
            pointer = "/providers"
            for part in (name, "options", "upstreams", str(index)):
                pointer = pointer_join(pointer, part)
            scheme, sep, rest = url.partition("://")
            shown = f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url
            message = (
                f"upstream '{shown}' is the same server as item {other}: named twice, it would "
                "get twice its share of the requests (and of any limits); name each server once"
            )
            problems.append(
                Problem.at(doc.location(pointer), pointer, "repeated-upstream", message)
            )
    return problems


def _provider_url_password_problems(doc: YamlDocument) -> list[Problem]:
    """A provider's ``baseUrl`` and a local provider's upstream URLs hold no password: the file
    is committed (as ``state.url``'s), and a client given ``user:password@`` sends it as Basic
    auth in place of the API key, whose 401 then blames the key."""
    data = doc.data if isinstance(doc.data, Mapping) else {}
    declared = data.get("providers")
    problems = []
    for name, provider in (declared if isinstance(declared, Mapping) else {}).items():
        if not isinstance(provider, Mapping):
            continue
        options = provider.get("options")
        options = options if isinstance(options, Mapping) else {}
        upstreams = options.get("upstreams")
        places: list[tuple[tuple[str, ...], object]] = [
            (("baseUrl",), provider.get("baseUrl")),
            (("options", "upstream"), options.get("upstream")),
        ]
        for index, item in enumerate(upstreams if isinstance(upstreams, list) else ()):
            url = item.get("url") if isinstance(item, Mapping) else item
            where = ("options", "upstreams", str(index)) + (("url",) if url is not item else ())
            places.append((where, url))
        for parts, url in places:
            if not isinstance(url, str) or url_password(url) is None:
                continue
            pointer = pointer_join(pointer_join("", "providers"), name)
            for part in parts:
                pointer = pointer_join(pointer, part)
            key_env = "options.upstreamApiKeyEnv" if parts[0] == "options" else "apiKeyEnv"
            message = (
                f"{'.'.join(('providers', name, *parts))} {redact_url(url)} holds a password, "
                "which must never be committed (and would be sent as Basic auth in place of the "
                f"API key): keep the key in the variable {key_env} names, and reach a gateway "
                "that asks for a password through HTTPS_PROXY=http://USER:PASSWORD@HOST:PORT "
                "set in the environment"
            )
            problems.append(Problem.at(doc.location(pointer), pointer, "password-in-url", message))
    return problems


def _base_url_problems(doc: YamlDocument) -> list[Problem]:
    """A provider's ``baseUrl`` names a host and, if any, a port (``unreachable_url``); the
    schema only asks for ``http(s)://``."""
    data = doc.data if isinstance(doc.data, Mapping) else {}
    declared = data.get("providers")
    problems = []
    for name, provider in (declared if isinstance(declared, Mapping) else {}).items():
        url = provider.get("baseUrl") if isinstance(provider, Mapping) else None
        if not isinstance(url, str) or (why := unreachable_url(url)) is None:
            continue
        pointer = pointer_join(pointer_join(pointer_join("", "providers"), name), "baseUrl")
        message = f"providers.{name}.baseUrl {redact_url(url)} {why}"
        problems.append(Problem.at(doc.location(pointer), pointer, "malformed-url", message))
    return problems


def _state_problems(doc: YamlDocument) -> list[Problem]:
    """``state.url`` holds no password (the file is committed) and excludes ``urlEnv``."""
    data = doc.data if isinstance(doc.data, Mapping) else {}
    state = data.get("state")
    if not isinstance(state, Mapping):
        return []
    url = state.get("url")
    pointer = pointer_join(pointer_join("", "state"), "url")
    problems = []
    if url is not None and "urlEnv" in state:
        message = "give the state's URL once: either `url` or `urlEnv`, not both"
        problems.append(Problem.at(doc.location(pointer), pointer, "url-and-url-env", message))
    if isinstance(url, str) and not is_database_url(url):
        message = (  # the value is not shown: it may hold a password
            "state.url must be a PostgreSQL URL (postgresql://USER@HOST:5432/DB); for an "
            "SQLite file use state.path"
        )
        problems.append(Problem.at(doc.location(pointer), pointer, "not-a-database-url", message))
    elif isinstance(url, str) and url_password(url) is not None:
        message = (
            f"state.url {redact_url(url)} contains a password, which must never be committed: "
            "put the whole URL in an environment variable and name it with `urlEnv: "
            "BATCHSPEC_STATE_URL`, or use PGPASSWORD or ~/.pgpass"
        )
        problems.append(Problem.at(doc.location(pointer), pointer, "password-in-url", message))
    return problems


def _url_from_env(name: str) -> str:
    url = os.environ.get(name, "")
    if not url:
        raise StateError(
            f"batchspec.yaml keeps the state in the PostgreSQL database named by state.urlEnv, "
            f"but ${name} is not set; export {name}=postgresql://USER:PASSWORD@HOST:5432/DB"
        )
    if not is_database_url(url):
        raise StateError(
            f"${name} (state.urlEnv in batchspec.yaml) does not hold a postgresql:// URL"
        )
    return url


def _first(value: Any, fallback: Any) -> Any:
    return value if value is not None else fallback
