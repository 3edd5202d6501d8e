"""A workspace opened for one run: manifests through the caches, validated inputs, providers
built on first use, and the run recorded in the state store around the use case.

Every use case (plan, apply, cancel, import, forget) starts here, so they open, validate and
record in one way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchspec.core.recorded import DEFAULT_REQUEUE_BACKOFF
from batchspec.core.replacements import RequestFacts
from batchspec.core.reporting import Progress, Reporter
from batchspec.core.selection import select_from_workspace
from batchspec.core.sharding import first_line_over, shard_limits
from batchspec.errors import BatchspecError, InputError, ManifestError, Terminated
from batchspec.providers.base import Provider
from batchspec.providers.flavours import flavour_of, local_upstream_urls
from batchspec.state.connection import busy_wait_for, check_state_file
from batchspec.state.lock import busy_as_locked
from batchspec.state.runinfo import RunInfo, collect_run_info, with_untracked_reads
from batchspec.state.store import StateStore
from batchspec.storage.sql import DatabaseBusyError, DatabaseUnavailableError
from batchspec.wire.inputs import (
    InputReport,
    naming_the_resource,
    problem_lines,
    rules_for_provider,
)
from batchspec.wire.request_index import RequestFact
from batchspec.workspace.inputcache import InputCache, index_dir_beside
from batchspec.workspace.manifest import (
    ProviderConfig,
    Resource,
    Workspace,
    load_workspace,
    project_for,
    workspace_resource_names,
)
from batchspec.workspace.manifestcache import ManifestCache
from batchspec.workspace.yamldoc import display_path


@contextmanager
def open_workspace(
    paths: Sequence[str], state_path: str | None = None, *, read_only: bool = False
) -> Iterator[tuple[Workspace, InputCache]]:
    """Load manifests through the caches beside the state database (inputs and manifests).

    An input is hashed by the scan that validates it by its resource's rules
    (``validate_inputs`` then finds that scan in the cache): one read of it, whatever its
    provider. ``read_only`` (``plan --state PATH``): where that state does not exist (a
    mistyped path), the caches stay in memory and nothing is made there. A state path that
    holds no state (a folder, another file) is refused before anything is made beside it."""
    project = project_for(paths, state_path=state_path)
    if not project.shared_state and project.has_state():
        check_state_file(project.state_path)  # not a state (a typo): make nothing beside it
    cached = not read_only or project.has_state()
    cache_db = project.state_path.parent / "input-cache.db" if cached else None
    index_dir = index_dir_beside(project.state_path) if cached else None
    with InputCache(cache_db, index_dir=index_dir) as cache:

        def hash_checked(path: Path, provider: str, endpoint: str, model: str | None) -> str:
            rules = input_rules(project.providers, provider, endpoint, model)
            return cache.facts_for(path, **rules).sha256

        with ManifestCache(cache_db, project) as manifests:
            ws = load_workspace(
                paths,
                hash_input=cache.sha256,
                manifest_cache=manifests,
                state_path=state_path,
                hash_checked_input=hash_checked,
                project=project,  # read once a run
            )
        yield ws, cache


def input_rules(
    providers: Mapping[str, ProviderConfig], provider: str, endpoint: str, model: str | None
) -> dict[str, Any]:
    """The ``InputCache.facts_for`` rules of an input sent to ``provider`` (its type's
    dialect and custom_id pattern) on ``endpoint`` with ``model``."""
    config = providers.get(provider)
    kind = config.type if config is not None else None
    return {
        "endpoint": endpoint,
        "model": model,
        **rules_for_provider(
            kind,
            custom_id_pattern=flavour_of(kind).custom_id_pattern,
            options=config.options if config is not None else None,
        ),
    }


def workspace_names(ws: Workspace, paths: Sequence[str]) -> frozenset[str]:
    """Every resource name declared by the *whole* workspace (and every ``moved.from``).

    A resource recorded in the state is orphaned only when no manifest of the whole
    workspace declares it: PATHS and ``--select`` narrow what a command acts on, never what
    counts as gone. Raises ``InvalidManifestError`` when a manifest outside PATHS cannot be
    parsed.
    """
    loaded = {r.name for r in ws.resources} | {r.moved_from for r in ws.resources if r.moved_from}
    root = ws.project.root.resolve()
    if any(Path(p).is_dir() and Path(p).resolve() == root for p in (paths or ["."])):
        return frozenset(loaded)  # the whole workspace is loaded already
    cache_db = ws.project.state_path.parent / "input-cache.db"
    # the cache ``open_workspace`` made, or none: a plan on a state that does not exist
    # (``--state`` a typo) makes nothing there, not even the folder
    with ManifestCache(cache_db if cache_db.is_file() else None, ws.project) as manifests:
        return workspace_resource_names(ws.project, manifest_cache=manifests) | loaded


def missing_api_keys(ws: Workspace, providers: Iterable[str], env: Mapping[str, str]) -> list[str]:
    """A warning per provider that needs an API key whose variable is unset (no network)."""
    warnings = []
    for name in sorted(set(providers)):
        config = ws.project.providers.get(name)
        options = (config.options or {}) if config is not None else {}
        if config is not None and config.type == "local":
            variable = options.get("upstreamApiKeyEnv")
            if variable and local_upstream_urls(options) and not env.get(variable, "").strip():
                warnings.append(
                    f"provider {name!r} needs its upstream API key, but {variable} is not set "
                    "here: apply would fail before submitting anything"
                )
            continue
        if config is None or not config.api_key_env:
            continue
        if not env.get(config.api_key_env, "").strip():
            found = "is set but empty" if config.api_key_env in env else "is not set"
            warnings.append(
                f"provider {name!r} needs an API key, but {config.api_key_env} {found} "
                "here: apply would fail before submitting anything"
            )
    return warnings


def select_resources(ws: Workspace, select: Sequence[str]) -> list[Resource]:
    """``--select`` NAME / KEY=VALUE / state:modified, as a union (see batchspec.core.selection)."""
    return select_from_workspace(ws, select, requeue_backoff=requeue_backoff(ws))


def validate_inputs(
    ws: Workspace,
    resources: Sequence[Resource],
    cache: InputCache,
    outcome: str = "nothing was uploaded",
) -> dict[str, InputReport]:
    """Validate every selected input before anything else happens; fail listing them all,
    saying ``outcome`` (what the failure means for the command)."""
    facts: dict[str, InputReport] = {}
    failures: list[BatchspecError] = []
    for res in resources:
        try:
            report = cache.facts_for(
                res.input_path,
                **input_rules(ws.project.providers, res.provider, res.endpoint, res.model),
            )
        except BatchspecError as err:
            failures.append(err)
            continue
        # a line no batch holds: sharding would give it one of its own, over the limit
        limit = shard_limits(ws, res).max_bytes
        # the validated content's size settles the common case (first_line_over's stat)
        too_large = (
            report.ok and report.bytes + 1 > limit and first_line_over(res.input_path, limit)
        )
        if too_large:
            from batchspec.core.validate import batch_size_problems  # as below

            failures.append(
                InputError(
                    f"{display_path(res.input_source or res.input_path)}: a request of "
                    f"{res.name} fits no batch",
                    details=[str(p) for p in batch_size_problems(res, shard_limits(ws, res))],
                )
            )
        elif report.ok:
            facts[res.name] = report
        else:
            # imported here: it brings in the templates and Jinja2, which `plan` rarely needs
            from batchspec.core.validate import rows_problem_lines

            failures.append(
                InputError(
                    f"{display_path(res.input_source or res.input_path)}: "
                    f"{report.problem_count} problem(s) in the input of {res.name}",
                    details=rows_problem_lines(report, res)
                    if res.input_source
                    else problem_lines(
                        naming_the_resource(report, res.declared_where),
                        shown_path=display_path(res.input_path),
                    ),
                )
            )
    if len(failures) == 1:
        [only] = failures
        if type(only) is InputError:  # one of the above: said once, here (several: below)
            raise InputError(f"{only.message}; {outcome}", details=only.details)
        raise only
    if failures:
        raise type(failures[0])(
            f"{len(failures)} batch inputs are invalid; {outcome}",
            details=[line for err in failures for line in [err.message, *err.details]],
        )
    return facts


def indexed_requests(cache: InputCache, facts: Mapping[str, InputReport]) -> RequestFacts:
    """Each validated resource's requests from its input's request index (no re-parse)."""

    def requests(res: Resource) -> Iterator[RequestFact]:
        return cache.request_facts(res.input_path, facts[res.name].sha256)

    return requests


def provider_option(ws: Workspace, name: str, key: str) -> Any:
    config = ws.project.providers.get(name)
    return config.options.get(key) if config is not None else None


def requeue_backoff(ws: Workspace) -> float:
    """The project's requeue backoff (the smallest any provider sets), else the default."""
    values = [
        float(p.options["requeueBackoffSeconds"])
        for p in ws.project.providers.values()
        if p.options.get("requeueBackoffSeconds") is not None
    ]
    return min(values) if values else DEFAULT_REQUEUE_BACKOFF


class ProviderPool:
    """Builds each provider on first use (so a missing key only matters when it is needed)."""

    def __init__(
        self,
        ws: Workspace,
        env: Mapping[str, str],
        *,
        lock_timeout: float = 0.0,
        report: Reporter | None = None,
        run_local_batches: bool = True,
    ) -> None:
        self.ws = ws
        self.env = env
        self.lock_timeout = lock_timeout  # a local engine's folder in use: wait this long
        #: False (``batchspec cancel``): a local engine runs none of its batches meanwhile
        self.run_local_batches = run_local_batches
        self.built: dict[str, Provider] = {}
        #: told, before a local engine's close waits for the requests it has sent, that it
        #: does (up to its drain timeout): a run that had ended would otherwise sit silent
        self.report = report

    def get(self, name: str) -> Provider:
        if name not in self.built:
            config = self.ws.project.providers.get(name)
            if config is None:
                where = self.ws.project.file or "batchspec.yaml"
                raise ManifestError(f"provider {name!r} is not defined in {where}")
            # imported here: it loads httpx (and rich), ~0.15 s that `plan` never needs
            from batchspec.providers.registry import build_provider

            self.built[name] = build_provider(
                config,
                project_root=self.ws.project.root,
                env=self.env,
                lock_timeout=self.lock_timeout,
                run_local_batches=self.run_local_batches,
            )
        return self.built[name]

    def claim(self, name: str) -> Provider:
        """``get``, with what the provider needs for itself taken now: a local engine's data
        folder (its lock; exit 3 while a `batchspec serve` or another run holds it), so that
        a run finds it in use before recording anything it would create there."""
        provider = self.get(name)
        claim = getattr(provider, "claim", None)  # the local provider's
        if claim is not None:
            claim()
        return provider

    def __enter__(self) -> ProviderPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        """Close every provider, also past a Ctrl-C during one's close (a local engine's
        drain): the others' engines would stop with their answers uncommitted. The first
        interruption goes on once all are closed."""
        interrupted: BaseException | None = None
        for name, provider in self.built.items():
            try:
                # after a Ctrl-C, its own line has said what the close waits for
                stopping = isinstance(exc_type, type) and issubclass(exc_type, KeyboardInterrupt)
                if not stopping and interrupted is None and self.report is not None:
                    self._say_drain(name, provider, self.report)
                provider.close()
            except KeyboardInterrupt as err:  # Terminated too; the close itself ran whole
                interrupted = interrupted or err
        if interrupted is not None:
            raise interrupted

    @staticmethod
    def _say_drain(name: str, provider: Provider, report: Reporter) -> None:
        in_flight = getattr(provider, "requests_in_flight", None)  # the local provider's
        if in_flight is None:
            return
        count, drain = in_flight()
        if count:
            requests = "1 request" if count == 1 else f"{count} requests"
            report(
                Progress(
                    "engine_drain",
                    None,
                    f"local engine {name!r}: waiting for the {requests} it has sent upstream "
                    f"to finish (up to {drain:g} s; Ctrl-C does not wait for them, and they "
                    "are sent again next time)",
                    {"provider": name, "requests_in_flight": count, "drain_timeout": drain},
                )
            )


def files_read(ws: Workspace) -> list[Path]:
    """The files a run over ``ws`` reads: its project file, manifests and inputs (a rows
    input's rows file, not the requests rendered from it)."""
    project = [ws.project.file] if ws.project.file is not None else []
    inputs = [r.input_source or r.input_path for r in ws.resources]
    return [*project, *ws.manifest_files, *inputs]


@dataclass
class RunHandle:
    id: int
    exit_code: int = 1


@contextmanager
def recorded_run(
    store: StateStore,
    ws: Workspace,
    command: str,
    args: Mapping[str, Any],
    info: RunInfo | None = None,
    *,
    lock_timeout: float | None = None,
) -> Iterator[RunHandle]:
    """Record a run around a use case; its exit code is the failure's when one escapes;
    ``info``: its provenance, if the caller has it (else collected here). ``lock_timeout``:
    the command's ``--lock-timeout``, which bounds the wait for a database another process
    keeps busy at this first write too (None: a command without one, 30 s)."""
    info = collect_run_info(ws.project.root) if info is None else info
    info = with_untracked_reads(info, ws.project.root, files_read(ws))
    wait: AbstractContextManager[None] = nullcontext()
    if lock_timeout is not None:
        wait = store.busy_wait(busy_wait_for(lock_timeout))
    try:
        with wait:
            run = RunHandle(store.start_run(command, args, info))
    except DatabaseBusyError as err:  # its first write: nothing recorded, nothing changed
        raise busy_as_locked(err) from err
    interrupted = unrecordable = False
    try:
        yield run
    except BatchspecError as err:
        run.exit_code = err.exit_code
        if isinstance(err.__cause__, DatabaseBusyError):
            # another process holds the database's write lock: recording the end would wait
            # the busy timeout again and then fail, hiding the exit 3 this is; the run's row
            # stays open, as a killed run's (`history` shows it ended when its pid is gone)
            unrecordable = True
            raise
        store.record_event(
            run.id,
            "error",
            resource=err.resource,  # `show NAME` lists why the run stopped at NAME
            detail={"error": type(err).__name__, "message": err.message},
        )
        raise
    except KeyboardInterrupt as err:
        # Ctrl-C: 130; SIGTERM (``Terminated``): 143, recorded as such
        run.exit_code = getattr(err, "exit_code", 130)
        detail = {"signal": "SIGTERM"} if isinstance(err, Terminated) else {}
        interrupted = True
        # the interruption is what happened: a state server gone meanwhile (psycopg closes
        # a connection whose query it could not cancel) must not replace it
        with suppress(DatabaseUnavailableError):
            store.record_event(run.id, "interrupted", detail=detail)
        raise
    except Exception as err:  # an unexpected failure is still recorded, then re-raised
        store.record_event(
            run.id, "error", detail={"error": type(err).__name__, "message": str(err)}
        )
        raise
    finally:
        if not unrecordable:
            with suppress(*((DatabaseUnavailableError,) if interrupted else ())):
                store.finish_run(run.id, run.exit_code)
