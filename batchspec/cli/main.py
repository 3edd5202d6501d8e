"""The command line: each command parses options, calls one library function, renders.

Business logic lives in the library modules; this file only turns arguments into calls and
results into text or JSON. Known failures are ``BatchspecError``s and exit with their own
code and a one-paragraph message on stderr, never a traceback. Usage errors exit 64.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import re
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click
from click.core import ParameterSource

from batchspec import __version__
from batchspec.errors import BatchspecError, StateError, Terminated

if TYPE_CHECKING:  # imported where used: a command loads only what it runs
    from batchspec.core.plan import Action
    from batchspec.core.reporting import Progress

F = TypeVar("F", bound=Callable[..., Any])

USAGE_EXIT_CODE = 64
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report it
#: the cap on ``--parallelism``: ``MAX_PARALLELISM`` of core/reconcile/prefetch.py (a test keeps
#: them equal), written out so that parsing options imports nothing of the library
MAX_PARALLELISM = 256


# ---------------------------------------------------------------------------------------------
# Shared options: defined once, each with an environment variable.


#: ``ctx.meta`` key: the format (``json``, ``yaml``) a command's failure is written in on
#: stdout, as its document would have been; absent for text (the message on stderr only)
ERROR_FORMAT = "batchspec.error_format"


def _remember_format(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is True or value in ("json", "yaml"):
        ctx.meta[ERROR_FORMAT] = "json" if value is True else value
    return value


class Commands(click.Group):
    """The root group: a known failure of a command asked for JSON (or YAML) also writes an
    error document on stdout, so a reader of stdout (``status --json | jq``) reads why it
    failed instead of nothing; the message still goes to stderr and the exit code is the
    failure's."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BatchspecError as err:
            fmt = ctx.meta.pop(ERROR_FORMAT, None)
            if fmt is not None:
                from batchspec.cli import render

                emit_document(render.error_json(err), fmt)
            raise


def json_option(f: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        envvar="BATCHSPEC_JSON",
        callback=_remember_format,
        help="Write machine-readable JSON to stdout (and nothing else).",
    )(f)


def complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of resource names (imported on use: keeps startup fast)."""
    from batchspec.cli.completion import complete_resource_names

    return complete_resource_names(ctx, param, incomplete)


def state_option(f: F) -> F:
    return _state_option(f, None)


def _a_number(param: click.Parameter, value: float | None, *, finite: bool) -> float | None:
    """``value``, refused if it is NaN (every comparison with it is false: a ``--timeout
    nan`` never came), or infinite where ``finite`` (an endless pause between polls)."""
    if value is not None and (math.isnan(value) or (finite and math.isinf(value))):
        raise click.BadParameter(f"{value} is not a number of seconds", param=param)
    return value


def _require_state(state_path: str | None) -> None:
    """A read command given an SQLite state file that does not exist (a mistyped --state or
    BATCHSPEC_STATE) would show every resource as never applied: refuse it, creating nothing."""
    if state_path and "://" not in state_path and not os.path.exists(state_path):
        raise StateError(
            f"no state database at {state_path}: nothing has been recorded there, and a "
            "command that only reads creates none",
            details=[
                "check the path given by --state or BATCHSPEC_STATE (a typo?); "
                "`batchspec apply` creates the state where it first records a run"
            ],
        )


def read_state_option(f: F) -> F:
    """``--state`` of a command that only reads the state (refuses a missing SQLite file
    when the command runs: an error document for --json too, whatever the options' order)."""

    @functools.wraps(f)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _require_state(kwargs.get("state_path"))
        return f(*args, **kwargs)

    return _state_option(cast(F, checked), None)


def _state_option(f: F, callback: Any) -> F:
    return click.option(
        "--state",
        "state_path",
        metavar="PATH|URL",
        envvar="BATCHSPEC_STATE",
        callback=callback,
        help="State database: an SQLite file, or a postgresql:// URL (default: the project's "
        "state, or state/batchspec.db).",
    )(f)


def select_option(f: F) -> F:
    return click.option(
        "--select",
        "-s",
        "select",
        multiple=True,
        envvar="BATCHSPEC_SELECT",
        metavar="SELECTOR",
        shell_complete=complete_names,
        help="Only these resources: NAME, KEY=VALUE (a label) or state:modified "
        "(repeatable; a resource matching any is selected).",
    )(f)


def lock_timeout_option(f: F) -> F:
    return click.option(
        "--lock-timeout",
        type=float,
        default=0.0,
        show_default=True,
        envvar="BATCHSPEC_LOCK_TIMEOUT",
        show_envvar=True,  # the CI examples set it once for every command
        callback=lambda ctx, param, value: _a_number(param, value, finite=False),
        help="Seconds to wait for another run's lock (or a state database another process "
        "keeps busy: at least 30 s) before exiting 3.",
    )(f)


def parallelism_option(f: F) -> F:
    return click.option(
        "--parallelism",
        type=click.IntRange(min=1, max=MAX_PARALLELISM),
        default=16,
        show_default=True,
        envvar="BATCHSPEC_PARALLELISM",
        show_envvar=True,  # the FAQ's advice for CI: set it once for every command
        help="Provider calls (uploads, creates, polls, downloads, cancels) in flight at once, "
        f"at most {MAX_PARALLELISM} (each is a thread); fewer while a provider answers 429 "
        "(halved, then grown back); a provider's maxConcurrency option caps it for that "
        "provider.",
    )(f)


def no_color_option(f: F) -> F:
    """``--no-color``: also honoured through ``NO_COLOR`` and ``TERM=dumb`` (cli/colour.py)."""
    return click.option(
        "--no-color",
        is_flag=True,
        expose_value=False,
        callback=_remember_no_color,
        help="No colour, even on a terminal (also: NO_COLOR=1, TERM=dumb).",
    )(f)


def _remember_no_color(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["batchspec.no_color"] = True


def stdout_style() -> Any:
    """The colours for stdout: none unless a terminal, and none if anybody said so."""
    from batchspec.cli.colour import style_for

    ctx = click.get_current_context(silent=True)
    no_color = bool(ctx and ctx.meta.get("batchspec.no_color"))
    return style_for(sys.stdout, no_color=no_color)


def replace_options(f: F) -> F:
    f = click.option(
        "--no-reuse",
        "no_reuse",
        is_flag=True,
        help="With --replace: send every request again, keeping no recorded answer.",
    )(f)
    return click.option(
        "--replace",
        "replace",
        multiple=True,
        metavar="NAME",
        help="Run NAME again as a new generation of the same spec (repeatable), keeping the "
        "answers that succeeded unless --no-reuse; cancels what it has in flight.",
    )(f)


def paths_argument(f: F) -> F:
    return click.argument("paths", nargs=-1, type=click.Path())(f)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def output_option(f: F) -> F:
    return click.option(
        "--output",
        "-o",
        "output",
        type=click.Choice(["text", "json", "yaml"]),
        default=None,
        envvar="BATCHSPEC_OUTPUT",
        callback=_remember_format,
        help="text (default), json (as --json) or yaml: the JSON document as YAML.",
    )(f)


def output_format(as_json: bool, output: str | None) -> str:
    """``text``, ``json`` or ``yaml`` from ``--json`` and ``--output`` (which must agree)."""
    if as_json and output not in (None, "json"):
        raise click.UsageError(f"--json and --output {output} contradict each other")
    return "json" if as_json else output or "text"


def emit_document(data: Any, fmt: str) -> None:
    """``data`` (a JSON document) as indented JSON, or as the same document in YAML."""
    if fmt == "yaml":
        import yaml

        click.echo(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=False))
    else:
        emit_json(data)


# ---------------------------------------------------------------------------------------------


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="batchspec")
@no_color_option
def cli() -> None:
    """Run LLM batch jobs the GitOps way.

    Commit YAML manifests that say which requests to run where; `batchspec apply` uploads,
    creates, polls, collects and retries batches until the results on disk match, recording
    every step in a state store (SQLite, or PostgreSQL) that doubles as an audit log.
    """


#: an environment variable's name; 20+ hex digits is a key pasted where its name belongs
_VARIABLE_NAME = re.compile(r"(?![0-9A-Fa-f]{20,}$)[A-Za-z_][A-Za-z0-9_]*")


def _variable_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A ``--*-key-env`` option takes a variable's name; anything else (the usual mistake is
    the key itself, ``--api-key-env $KEY``) is refused without showing it."""
    if value is None or _VARIABLE_NAME.fullmatch(value):
        return value
    raise click.BadParameter(
        "give the NAME of the environment variable that holds the key (e.g. BATCH_KEY), "
        "never the key itself (the value given is not shown)",
        ctx=ctx,
        param=param,
    )


def _say_where_a_subfolders_engine_folder_lands(data_dir: str) -> None:
    """Serve's default --data-dir is relative to the working directory: in a workspace's
    subfolder (manifests/) it makes a state folder there, beside the manifests, where no
    other command looks. Said, not refused: serve needs no workspace."""
    from batchspec.workspace.project import find_project_file

    found = find_project_file()
    if found is None or found.parent.resolve() == Path.cwd().resolve():
        return
    click.echo(
        f"Warning: serve keeps its files in {Path(data_dir).resolve()} (--data-dir {data_dir} "
        f"is relative to this folder), inside the workspace at {found.parent} but not at the "
        "workspace's root, outside its state folder; run serve from the root, or give "
        "--data-dir a folder of its own (e.g. the root's state/serve)",
        err=True,
    )


@cli.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="BATCHSPEC_SERVE_HOST",
    help="Address to listen on; anything but loopback needs --api-key-env.",
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(0, 65535),
    envvar="BATCHSPEC_SERVE_PORT",
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--data-dir",
    default="state/local",
    show_default=True,
    type=click.Path(),
    envvar="BATCHSPEC_ENGINE_DIR",
    help="Where the engine keeps files and batches. At a workspace's root the default is "
    "the built-in `local` provider's engine folder (serve says so): give serve one of its own "
    "(e.g. state/serve) unless it is meant to run that provider's batches.",
)
@click.option(
    "--upstream",
    default=["builtin"],
    show_default=True,
    multiple=True,
    envvar="BATCHSPEC_UPSTREAM",
    help="An OpenAI-compatible base URL (e.g. http://localhost:11434/v1), or "
    "'builtin' (an offline stand-in, not a model). Repeat it to spread requests over "
    "several (least in flight first; a failing one rests until it answers again); "
    "URL#rpm=N,tpm=N limits one. BATCHSPEC_UPSTREAM takes several, space-separated.",
)
@click.option(
    "--api-key-env",
    default=None,
    metavar="NAME",
    callback=_variable_name,
    help="Require 'Authorization: Bearer <key>' with the key in this env var.",
)
@click.option(
    "--upstream-api-key-env",
    default=None,
    metavar="NAME",
    callback=_variable_name,
    help="Env var holding the API key sent to the upstream.",
)
@click.option(
    "--concurrency",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests in flight at once, to all upstreams together (several --upstream share "
    "it: give the sum of what each server takes). Twice the `local` provider's default "
    "`concurrency` (4): one server that several runners share.",
)
@click.option(
    "--request-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds one upstream request may take.",
)
@click.option(
    "--max-attempts",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Attempts per request line on 429/5xx/timeouts.",
)
@click.option(
    "--max-upload-bytes",
    default=512 * 1024 * 1024,
    show_default=True,
    type=click.IntRange(min=1),
    help="Largest accepted upload (413 beyond).",
)
@click.option(
    "--completion-window-seconds",
    type=float,
    default=None,
    hidden=True,
    help="Real expiry deadline (tests); the wire value stays 24h.",
)
@click.option("--poll-interval", type=float, default=0.5, hidden=True)
@click.option(
    "--upstream-latency",
    type=float,
    default=0.0,
    hidden=True,
    help="Delay every builtin answer by this many seconds (tests).",
)
@click.option(
    "--fault-500",
    type=click.FloatRange(0, 1),
    default=0.0,
    metavar="FRACTION",
    help="Fault injection: this fraction of the upstream calls answer 500 instead (the "
    "engine's own retries then run; seeded, reproducible).",
)
@click.option(
    "--fault-429",
    type=click.FloatRange(0, 1),
    default=0.0,
    metavar="FRACTION",
    help="Fault injection: this fraction of the upstream calls answer 429 (rate limited).",
)
@click.option(
    "--fault-timeout",
    type=click.FloatRange(0, 1),
    default=0.0,
    metavar="FRACTION",
    help="Fault injection: this fraction of the upstream calls never answer "
    "(--request-timeout ends them).",
)
@click.option(
    "--fault-seed",
    type=int,
    default=0,
    help="Seed of --fault-500/--fault-429/--fault-timeout: which lines fail.",
)
@click.option(
    "--fault-token-limit",
    type=click.IntRange(min=0),
    default=0,
    hidden=True,
    help="Fail the first N batches' validation with token_limit_exceeded (tests).",
)
@click.option(
    "--fault-cancel-delay",
    type=click.FloatRange(min=0),
    default=0.0,
    hidden=True,
    help="Keep a cancelled batch cancelling this many seconds, its lines still running (tests).",
)
@click.option(
    "--fault-api-429-from",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Fault injection, to play a rate-limited gateway: answer the API's own requests "
    "(uploads, creates, polls, downloads), from the Nth one this server receives, with 429 "
    "rate_limit_exceeded and Retry-After. Needs --fault-api-429-count.",
)
@click.option(
    "--fault-api-429-count",
    type=click.IntRange(min=1),
    default=None,
    metavar="COUNT",
    help="How many API requests in a row --fault-api-429-from refuses.",
)
@click.option(
    "--fault-api-retry-after",
    type=click.FloatRange(min=0),
    default=0.05,
    show_default=True,
    metavar="SECONDS",
    help="The Retry-After those 429s ask for.",
)
@click.option(
    "--max-line-bytes",
    type=click.IntRange(min=1),
    default=10 * 1024 * 1024,
    hidden=True,
    help="Longest request line a batch may hold; validation fails beyond it (tests).",
)
def serve(**opts: Any) -> None:
    """Serve the local batch engine as an OpenAI-compatible Files + Batches API.

    Runs until Ctrl-C or SIGTERM, which it says at once: it takes no new requests and lets
    those in flight finish (upstream, up to 30 s); Ctrl-C again stops without waiting (they
    are sent again at the next start). Unfinished batches resume at the next start. Exits
    130 after Ctrl-C, 0 after SIGTERM (a supervisor's stop: `docker stop`, systemd).
    """
    from batchspec.engine.server import Stopping, serve_from_cli_options
    from batchspec.workspace.project import local_engine_in

    # the process's Ctrl-C line is this one: said once, at once (from the signal handler)
    interruption = click.get_current_context().find_object(Interruption) or Interruption([])

    def stopping(notice: Stopping) -> None:
        err = Terminated() if notice.signal == "SIGTERM" else KeyboardInterrupt()
        interruption.say(err, in_handler=True, text=serve_stopping_text(notice))

    shared = local_engine_in(opts["data_dir"])
    if shared is not None:  # said first: a folder in use stops serve right after (exit 3)
        click.echo(
            f"Warning: {opts['data_dir']} is the engine data folder of provider '{shared}' of "
            "the workspace here: while serve holds it, `batchspec apply` on that provider's "
            "resources waits for it (exit 3); give serve a folder of its own (--data-dir "
            "state/serve) unless it is meant to run that provider's batches",
            err=True,
        )
    elif click.get_current_context().get_parameter_source("data_dir") is ParameterSource.DEFAULT:
        _say_where_a_subfolders_engine_folder_lands(opts["data_dir"])
    with engine_log_shown():
        serve_from_cli_options(
            opts,
            on_listening=lambda url, upstream: click.echo(
                f"serving on {url} (data: {opts['data_dir']}, upstream: {upstream})", err=True
            ),
            on_stopping=stopping,
        )


class _EchoToStderr(logging.Handler):
    """A log record as one line on stderr, wherever stderr is at the time (a test's too)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


@contextlib.contextmanager
def engine_log_shown() -> Iterator[None]:
    """While ``serve`` runs, its engine's log from INFO up goes to stderr: an upstream taken
    out of rotation and the same one back in it, a worker's error. Without a handler, Python
    shows only warnings, so an operator saw "out of rotation" and never "back in rotation"."""
    log = logging.getLogger("batchspec.engine")
    handler, level = _EchoToStderr(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@cli.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
def init(directory: str) -> None:
    """Create a workspace in DIRECTORY (default: here) that validates and runs as is.

    Writes batchspec.yaml (the local provider, with an OpenAI example commented out), one
    manifest, a three-request data file, state/.gitignore and state/README.md. Refuses to
    overwrite any existing file, or to make a workspace of a folder holding manifests of the
    workspace it lies in (they would drop out of it), and then writes nothing.
    """
    from batchspec.workspace.scaffold import (
        scaffold_workspace,  # imported on use: keeps startup fast
    )
    from batchspec.workspace.yamldoc import display_path

    result = scaffold_workspace(directory)
    for path in result.created:
        click.echo(f"created {display_path(path)}")
    if result.inside is not None:
        click.echo(
            f"\nNote: this workspace lies in the workspace of {display_path(result.inside)}, "
            "which from now on skips this folder (a folder with its own batchspec.yaml is "
            "another workspace)."
        )
    click.echo(f"\nNext: {result.next_command}")


@cli.command()
@paths_argument
@json_option
def validate(paths: tuple[str, ...], as_json: bool) -> None:
    """Check manifests and batch inputs; change nothing.

    PATHS are manifest files, folders or glob patterns (default: the current folder), or
    batch input files (.jsonl), each checked line by line without a manifest. Exits 0 when
    all is valid, else 1 listing every problem as file:line:column. With --json, stdout
    holds only JSON, on failure too.
    """
    from batchspec.cli import render  # imported on use: keeps startup fast
    from batchspec.core.validate import problems_of, validate_paths

    try:
        report = validate_paths(paths)
    except BatchspecError as err:
        if not as_json:
            raise
        emit_json(render.problems_json(problems_of(err)))
        click.get_current_context().exit(err.exit_code)
    for warning in getattr(report, "warnings", ()):
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        emit_json(render.validation_json(report))
    else:
        click.echo(render.validation_text(report))


def _plan_file_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.endswith(".json"):
        raise click.BadParameter("the file name must end in .json", ctx=ctx, param=param)
    return value


@cli.command()
@paths_argument
@select_option
@json_option
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["text", "json", "markdown"]),
    default=None,
    help="text (default), json (as --json), or markdown: a pull-request comment.",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False),
    callback=_plan_file_path,
    default=None,
    metavar="FILE.json",
    help="Also save the plan to FILE.json; `batchspec apply FILE.json` applies exactly it.",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Plan what `apply --prune` does: resources no manifest of the workspace declares "
    "become prune (cancel, forget).",
)
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 0 when nothing would change, 2 when changes are pending, 1 on error.",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="List every resource, also those in sync with nothing to do (by default the text "
    "and markdown plans count them in one line, as apply does), and the spend estimate of "
    "each (by default the 10 costliest, then the rest summed).",
)
@no_color_option
@replace_options
@state_option
def plan(
    paths: tuple[str, ...],
    select: tuple[str, ...],
    as_json: bool,
    output_format: str | None,
    out_path: str | None,
    prune: bool,
    detailed_exitcode: bool,
    verbose: bool,
    replace: tuple[str, ...],
    no_reuse: bool,
    state_path: str | None,
) -> int:
    """Show what apply would do, resource by resource. Contacts no provider.

    Validates every selected input first; a bad input fails here, as it would in apply.
    Request and token counts are what apply would submit (answers kept from an earlier
    generation are counted apart). A plan that apply would refuse (a budget it exceeds, or
    a new resource whose result files hold what an orphan wrote) is shown, then exits 1
    (with --detailed-exitcode too); a provider whose API key variable is unset is a warning.
    Resources recorded in the state whose manifests are gone from the whole workspace are
    shown as orphaned. Batches of generations no longer active (superseded, cancelled,
    pruned) that the next apply polls or collects are listed after the plan (`drains` in
    --json); they spend nothing and are not changes.
    """
    from batchspec.cli import render
    from batchspec.core.apply import plan_workspace

    if as_json and output_format not in (None, "json"):
        raise click.UsageError(f"--json and --format {output_format} contradict each other")
    if no_reuse and not replace:
        raise click.UsageError("--no-reuse only applies with --replace NAME")
    result = plan_workspace(
        paths,
        select=select,
        prune=prune,
        state_path=state_path,
        replace=replace,
        reuse=not no_reuse,
        detailed_exitcode=detailed_exitcode,
        out=out_path,
    )
    if out_path:
        click.echo(f"Saved the plan to {out_path}: `batchspec apply {out_path}`", err=True)
    if as_json or output_format == "json":
        emit_json(render.plan_result_json(result))
    elif output_format == "markdown":
        click.echo(render.plan_markdown(result, unchanged=verbose), nl=False)
    else:
        click.echo(
            render.plan_text(
                result.plan,
                stdout_style(),
                result.selection,
                unchanged=verbose,
                unlisted_hint="`plan --verbose` lists every one",
            )
            + render.plan_costs(result, every=verbose)
            + render.plan_consent(result)
            + render.plan_drains(result)
        )
    for note in render.plan_notes(result):
        click.echo(note, err=True)
    return result.exit_code(detailed=detailed_exitcode)


@cli.command()
@paths_argument
@select_option
@json_option
@lock_timeout_option
@click.option(
    "--yes",
    "-y",
    is_flag=True,
    envvar="BATCHSPEC_YES",
    help="Approve creating batches without asking (needed with no terminal, or in CI).",
)
@click.option(
    "--wait", is_flag=True, help="Keep polling until every resource is in sync or Degraded."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    default=None,
    callback=lambda ctx, param, value: _a_number(param, value, finite=False),
    help="With --wait: give up after this many seconds (exit 5, or 4 if a resource is "
    "Degraded); a wait for another run's lock counts (it ends at this bound: exit 3).",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    callback=lambda ctx, param, value: _a_number(param, value, finite=True),
    default=30.0,
    show_default=True,
    help="Longest pause between polls; polls come every 0.25 s for 2 s after a create (at "
    "most one such stretch per 2 s plus this interval), then start at 0.5 s and back off.",
)
@parallelism_option
@click.option(
    "--allow-replace",
    is_flag=True,
    help="Cancel a changed resource's in-flight batches and submit the new spec.",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Cancel the batches of resources whose manifests are gone from the whole workspace, "
    "and forget them (with --select: only the selected ones).",
)
@click.option(
    "--quiet",
    "-q",
    is_flag=True,
    envvar="BATCHSPEC_QUIET",
    help="No plan, progress or summary (errors still go to stderr; the exit code tells). "
    "With --json: only the final result object.",
)
@click.option(
    "--verbose",
    "-v",
    is_flag=True,
    help="List every resource in the plan and the summary, also those in sync that the run "
    "left alone (by default they are counted, not listed).",
)
@no_color_option
@replace_options
@state_option
def apply(
    paths: tuple[str, ...],
    select: tuple[str, ...],
    as_json: bool,
    lock_timeout: float,
    yes: bool,
    wait: bool,
    timeout: float | None,
    poll_interval: float,
    parallelism: int,
    allow_replace: bool,
    prune: bool,
    quiet: bool,
    verbose: bool,
    replace: tuple[str, ...],
    no_reuse: bool,
    state_path: str | None,
) -> int:
    """Make the results on disk match the manifests: upload, create, poll, collect, retry.

    One pass takes the next safe step for each resource; with --wait it loops until done.

    Exit codes:

    \b
      0  every selected resource is in sync; without --wait, also when batches
         are still in flight (every step that could be taken now was taken)
      1  an error; or a replace skipped for want of --allow-replace; or a
         finished batch's file that could not be downloaded (the other
         resources are still applied; the next apply collects it)
      3  another run holds a lock this run needs
      4  a resource ended Degraded: some of its requests failed for good (not
         retryable, or out of attempts); without --wait, only once no other
         resource has a step left (until then: 0). It wins over 5: waiting
         longer would not fix it
      5  --wait reached --timeout with resources still in flight, none of
         them Degraded
    130  interrupted (Ctrl-C); 143 terminated (SIGTERM): batches already
         created are kept, and the next apply picks them up

    With --wait, a failed download is tried again on later polls (after 5 s, doubling to
    5 min) while other resources keep the run waiting, never waited for alone.

    A PATH ending in .json is a saved plan (`batchspec plan --out FILE.json`): exactly that
    plan is applied, with no prompt, or nothing at all (exit 1) if the state or the
    manifests changed since. With --json, stdout is NDJSON: one object per line per event
    (each with "at", a UTC timestamp), then a final {"event": "result"} (or
    {"event": "error"}) object. Spending or cancelling on a paid provider asks first on a
    terminal; with no terminal, or in CI (CI set), it needs --yes. The local provider's
    batches advance only while a batchspec command runs.

    On a terminal it shows one live bar per resource (requests answered of total, failures,
    shards, attempt, ETA), collapsed to the summary at the end; piped, in CI (CI set) or
    with TERM=dumb it writes plain lines instead.
    """
    from batchspec.cli import render
    from batchspec.cli.applyview import ApplyOutput
    from batchspec.core.apply import ApplyOptions, apply_saved_plan, apply_workspace
    from batchspec.core.planfile import is_plan_path

    if timeout is not None and not wait:
        raise click.UsageError("--timeout only applies with --wait")
    saved = [p for p in paths if is_plan_path(p)]
    if len(saved) > 1:
        raise click.UsageError(f"give at most one saved plan, not {len(saved)}")
    if no_reuse and not replace:
        raise click.UsageError("--no-reuse only applies with --replace NAME")
    style = stdout_style()
    selection = tuple(select) or _saved_selection(saved)
    view = ApplyOutput.for_stream(
        sys.stdout,
        as_json=as_json,
        quiet=quiet,
        style=style,
        selection=selection,
        verbose=verbose,
    )

    def confirm(plan: Any, estimates: Mapping[str, Any]) -> bool:
        if estimates:  # what a yes may cost, as `plan` shows it (Terraform shows the plan)
            click.echo("\n".join(render.estimate_lines(estimates, every=verbose)), err=True)
        try:
            return click.confirm("Apply this plan?", default=False, err=True)
        except click.exceptions.Abort as err:  # stdin closed, or Ctrl-C, before an answer
            if isinstance(err.__context__, KeyboardInterrupt):  # Ctrl-C, or SIGTERM
                raise err.__context__ from None  # interrupted, as anywhere else: exit 130
            click.echo(err=True)
            return False  # a no

    # in CI nobody answers a prompt, even on a pseudo-terminal: refuse, saying --yes and why
    no_prompt = _why_no_prompt(as_json)
    options = ApplyOptions(
        select=select,
        yes=yes,
        wait=wait,
        timeout=timeout,
        poll_interval=poll_interval,
        parallelism=parallelism,
        lock_timeout=lock_timeout,
        allow_replace=allow_replace,
        prune=prune,
        state_path=state_path,
        replace=replace,
        reuse=not no_reuse,
        no_prompt=no_prompt or ApplyOptions.no_prompt,
    )
    interactive = no_prompt is None
    interruption = click.get_current_context().find_object(Interruption)
    if interruption is not None:  # Ctrl-C's line goes above the bars, not under them
        interruption.above_bars = view.say_above
        interruption.batches_may_exist = False  # until the run sends one, or finds one sent

    def report(event: Progress) -> None:
        if interruption is not None:
            interruption.saw(event)
        view.show(event)

    try:
        if saved:
            manifests = [p for p in paths if p != saved[0]]
            result = apply_saved_plan(saved[0], manifests, options, report=report)
        else:
            result = apply_workspace(
                paths, options, confirm=confirm if interactive else None, report=report
            )
    except BatchspecError as err:
        view.close()  # the bars go before the error object (or the message on stderr)
        if as_json:
            click.echo(json.dumps({**render.error_event_json(err), "at": _now()}))
            click.get_current_context().meta.pop(ERROR_FORMAT, None)  # written: not twice
        raise
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: the events end as a failure's do
        view.close()
        if as_json:
            with contextlib.suppress(OSError):  # a reader gone must not replace the signal
                click.echo(json.dumps(interrupted_event_json(err, interruption)))
        raise
    finally:
        if interruption is not None:
            interruption.above_bars = None
        view.close()
    if as_json:
        doc = {
            "event": "result",
            "at": _now(),
            "resource": None,
            "message": render.apply_headline(result, selection),
            **render.apply_json(result),
        }
        click.echo(json.dumps(doc, default=str))
    elif not quiet:
        click.echo(render.apply_text(result, style, selection, verbose=verbose))
    if quiet or as_json:  # an exit 1 with no word on stderr would be a riddle in a CI log
        if result.outcome == "replace_refused":
            click.echo(f"Error: {render.replace_refused_text(result)}", err=True)
        elif result.outcome == "not_collected":
            click.echo(f"Error: {render.not_collected_text(result)}", err=True)
    return result.exit_code


@cli.command()
@paths_argument
@select_option
@json_option
@output_option
@no_color_option
@read_state_option
def status(
    paths: tuple[str, ...],
    select: tuple[str, ...],
    as_json: bool,
    output: str | None,
    state_path: str | None,
) -> None:
    """Show each resource's sync and health, its batches and where its results are.

    Reads the state only: no lock, no network. A broken manifest does not stop it: the
    others are shown, with a warning on stderr. Locks held by running commands are listed
    per resource, with their holder (id, user, host, pid, command, CI run, since).
    """
    from batchspec.cli import render
    from batchspec.core.status import workspace_status

    fmt = output_format(as_json, output)
    report = workspace_status(paths, select=select, state_path=state_path)
    warn_skipped(report.skipped)
    if fmt != "text":
        # what the text says beside the resources: a program reading stdout sees it too
        document = report.to_json()
        document["problems"] = [render.problem_json(p) for p in report.skipped]
        document["declared_elsewhere"] = report.declared_elsewhere
        emit_document(document, fmt)
    else:
        click.echo(
            render.status_text(
                report.resources,
                stdout_style(),
                locks=report.locks,
                declared_elsewhere=report.declared_elsewhere,
            )
        )


@cli.command()
@click.argument("name", shell_complete=complete_names)
@paths_argument
@json_option
@output_option
@click.option(
    "--events",
    "last_events",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="How many of its last events to show.",
)
@no_color_option
@read_state_option
def show(
    name: str,
    paths: tuple[str, ...],
    as_json: bool,
    output: str | None,
    last_events: int,
    state_path: str | None,
) -> None:
    """Everything about one resource: manifest, spec hash, sync and health, generations and
    their batches (ids, status, counts, attempts, timestamps), usage, result files and the
    batches they came from, and its last events.

    Reads the manifests and the state only: no lock, no network. A resource whose manifest
    is gone is described from the state.
    """
    from batchspec.cli.show import show_text
    from batchspec.core.show import describe_resource

    fmt = output_format(as_json, output)
    detail = describe_resource(paths, name, state_path=state_path, events=last_events)
    if fmt != "text":
        emit_document(detail.to_json(), fmt)
    else:
        click.echo(show_text(detail, stdout_style()))


@cli.command()
@paths_argument
@click.option(
    "--output",
    "-o",
    "output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="report.html",
    show_default=True,
    help="Where to write the page; - for stdout.",
)
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="How many of the last runs to show.",
)
@json_option
@read_state_option
def report(
    paths: tuple[str, ...], output: str, runs: int, as_json: bool, state_path: str | None
) -> None:
    """Write one self-contained HTML page: each resource's sync, health and progress, tokens
    and dollars per resource and per run, and the audit trail with its git commits.

    The page loads nothing from the network (inline CSS and SVG). Reads the manifests and the
    state only: no lock, no network. With --json, the page's data goes to stdout as JSON
    instead: no page is written, so --output is refused.
    """
    from batchspec.cli import render
    from batchspec.cli.report_html import report_html
    from batchspec.core.report import require_report_target, workspace_report, write_report_page

    source = click.get_current_context().get_parameter_source("output")
    if as_json and source != ParameterSource.DEFAULT:
        # --json writes no page: a silently ignored -o would leave the user an old page
        raise click.UsageError(
            f"--json writes the report's data to stdout and no page, so --output {output} "
            "would be ignored: give one of them (`batchspec report --json > report.json`)"
        )
    if not as_json and output != "-":
        require_report_target(paths, Path(output), state_path=state_path)
    data = workspace_report(paths, runs=runs, state_path=state_path)
    warn_skipped(data.skipped)
    if as_json:
        emit_json(data.to_json())
        return
    page = report_html(data)
    if output == "-":
        click.echo(page, nl=False)
        return
    write_report_page(Path(output), page)
    click.echo(render.report_written_text(output, len(data.resources), len(data.runs)))


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the script that completes batchspec commands, options and resource names.

    \b
    bash:  eval "$(batchspec completion bash)"     (in ~/.bashrc)
    zsh:   eval "$(batchspec completion zsh)"      (in ~/.zshrc)
    fish:  batchspec completion fish > ~/.config/fish/completions/batchspec.fish
    """
    from batchspec.cli.completion import completion_script

    click.echo(completion_script(cli, shell))


def _event_count(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """``--events``: a count of events (0 or more), ``all``, or None when not given."""
    if value is None or value == "all":
        return value
    if not (value.isascii() and value.isdigit()):
        raise click.BadParameter(f"{value!r} is not a count of events (0 or more) nor 'all'")
    return int(value)


@cli.command()
@paths_argument
@click.option(
    "--resource",
    "-r",
    "resource",
    default=None,
    metavar="NAME",
    help="Only the runs that touched resource NAME, and only its events.",
)
@click.option("--project", "project_dir", type=click.Path(), default=None, hidden=True)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="How many runs (with --by commit: commits), newest first.",
)
@click.option(
    "--by",
    "group_by",
    type=click.Choice(["run", "commit"]),
    default="run",
    show_default=True,
    help="commit: tokens and dollars per git commit (of the run that created each "
    "generation) instead of the runs.",
)
@click.option(
    "--events",
    "last_events",
    default=None,
    metavar="N|all",
    callback=_event_count,
    help="List each run's last N events (0: the runs alone), or all of them. Default: the "
    "text counts each run's events by action (a run over hundreds of resources records "
    "thousands), listing them only with --resource; --json lists all of them.",
)
@json_option
@read_state_option
def history(
    paths: tuple[str, ...],
    resource: str | None,
    project_dir: str | None,
    limit: int,
    group_by: str,
    last_events: int | str | None,
    as_json: bool,
    state_path: str | None,
) -> None:
    """Show recorded runs (who, where, git commit, exit code) and each run's events.

    By default, newest first, the last 20 runs, one line each with their usage and their
    events counted by action; --events lists the events themselves.

    PATHS find the workspace as for every command (default: the current folder). With
    --resource NAME, only the runs that touched NAME; a NAME never recorded exits 1.

    With --by commit, the spend per git commit instead: each generation's tokens and dollars
    go to the commit its creating run was on; runs from a tree with uncommitted changes, and
    runs outside git, are groups of their own.
    """
    import re
    from pathlib import Path

    from batchspec.cli import render
    from batchspec.core.history import read_history_page, spend_by_commit

    for path in paths:  # `history NAME` (before PATHS): say how to ask for it now
        if not Path(path).exists() and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", path):
            raise click.UsageError(
                f"{path!r} is not a folder or file; history takes PATHS: for one resource's "
                f"runs use `batchspec history --resource {path}`"
            )
    where = list(paths) or ([project_dir] if project_dir else [])
    if group_by == "commit":
        commits = spend_by_commit(where, resource=resource, limit=limit, state_path=state_path)
        if as_json:
            emit_json({"commits": [c.to_json() for c in commits]})
        else:
            click.echo(render.commits_text(commits))
        return
    page = read_history_page(where, resource=resource, limit=limit, state_path=state_path)
    events = last_events if isinstance(last_events, int) else None  # None: all of them
    if as_json:
        emit_json({"runs": [e.to_json(events=events) for e in page.entries]})
    else:
        summary = last_events is None and resource is None
        text = render.history_text(page.entries, events=events, summary=summary, older=page.older)
        click.echo(text)


@cli.command()
@click.argument("name", required=False, shell_complete=complete_names)
@paths_argument
@select_option
@click.option("--errors", "show_errors", is_flag=True, help="Print the errors file instead.")
@click.option(
    "--allow-stale",
    is_flag=True,
    help="Print results that are not the current spec's (an older generation's, a cancelled "
    "or unfinished one's) instead of exiting 1; stderr says whose they are.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "parquet"]),
    help="One row per request (answer, parsed JSON, usage, cost, error) instead of the raw "
    "result lines; parquet needs batchspec[parquet].",
)
@click.option(
    "--join",
    is_flag=True,
    help="With --format: add the input row's fields (input.NAME; CSV, JSONL or Parquet rows), "
    "or each request's messages for a batch JSONL input.",
)
@json_option
@read_state_option
def results(
    name: str | None,
    paths: tuple[str, ...],
    select: tuple[str, ...],
    show_errors: bool,
    allow_stale: bool,
    fmt: str | None,
    join: bool,
    as_json: bool,
    state_path: str | None,
) -> None:
    """Print the merged results of NAME (JSONL, in input order) to stdout.

    `results NAME [PATHS]`, or `results --select SELECTOR [PATHS]` (then every argument is a
    PATH) for several resources, one after another. Results that are not what the current
    spec's finished generation wrote exit 1 unless --allow-stale. With --json, one JSON
    document: per resource, the generation that wrote the file and its result lines.
    """
    from batchspec.core.result_view import copy_results, result_files, write_results_json

    if select and name is not None:
        paths, name = (name, *paths), None
    if name is None and not select:
        raise click.UsageError("give the resource NAME, or --select SELECTOR")
    if join and not fmt:
        raise click.UsageError("--join needs --format jsonl, csv or parquet")
    if fmt and as_json:
        raise click.UsageError("--format and --json exclude each other: keep one of them")
    if fmt and show_errors:
        raise click.UsageError(
            "--format takes no --errors: its rows already hold each failed request's "
            "status, error_code and error_message"
        )
    if fmt == "parquet" and sys.stdout.isatty():
        raise click.UsageError(
            "--format parquet is binary, not for a terminal: redirect it to a file "
            "(> results.parquet) or a pipe"
        )
    view = result_files(
        paths,
        select=(name,) if name else select,
        errors=show_errors,
        allow_stale=allow_stale,
        state_path=state_path,
    )
    warn_skipped(view.skipped)
    files = view.files
    for f in files:
        if not f.current:
            click.echo(f"Warning: {f.stale_reason}", err=True)
        elif f.note:
            click.echo(f"Note: {f.note}", err=True)
    stdout = sys.stdout.buffer  # bytes as they are: result lines are not re-encoded
    if fmt is not None:
        from batchspec.core.result_view import export_results

        export_results(files, view.providers, fmt, stdout, join=join)
    elif as_json:
        write_results_json(files, stdout)
    else:
        copy_results(files, stdout)
    stdout.flush()


@cli.command()
@click.argument("name", shell_complete=complete_names)
@paths_argument
@lock_timeout_option
@parallelism_option
@json_option
@state_option
def cancel(
    name: str,
    paths: tuple[str, ...],
    lock_timeout: float,
    parallelism: int,
    as_json: bool,
    state_path: str | None,
) -> None:
    """Cancel NAME's in-flight batches. Recorded in history.

    Answers that finished before the cancel took effect are kept: the next apply polls the
    cancelling batches to their end, collects what finished and writes it. A create whose
    answer was lost and that is not found yet is looked up by every later apply that selects
    NAME (state:modified does), and cancelled if it shows.
    """
    from batchspec.core.apply import cancel_resource

    def warn(progress: Any) -> None:  # a batch the provider no longer has, recorded gone;
        if progress.event == "warning":  # the local engine's own warnings (no resource)
            where = f"[{progress.resource}] " if progress.resource else ""
            click.echo(f"Warning: {where}{progress.message}", err=True)
        elif progress.event == "engine_drain":  # said before the wait, not after it
            click.echo(progress.message, err=True)

    result = cancel_resource(
        paths,
        name,
        lock_timeout=lock_timeout,
        state_path=state_path,
        parallelism=parallelism,
        report=warn,
    )
    n = result.cancelled
    if as_json:
        emit_json(
            {
                "resource": name,
                "cancelled_batches": n,
                "stopping_batches": result.stopping,
                "unconfirmed_creates": result.unconfirmed,
                "ended_batches": result.ended,
            }
        )
        return
    stopping = (
        f" ({result.stopping} earlier batch{'' if result.stopping == 1 else 'es'} still "
        "stopping: `batchspec apply` collects what finishes)"
        if result.stopping
        else ""
    )
    if n == 0 and result.generations and result.unconfirmed:  # none found yet: none sent
        click.echo(
            f"cancelled {name}: {result.unconfirmed} create(s) whose answer was lost not found "
            f"yet{stopping}; they may still land: every `batchspec apply` that selects {name} "
            "looks them up, cancels one found and keeps what it finished; "
            f"`batchspec apply --replace {name}` runs it again"
        )
    elif n == 0 and result.generations and result.ended:  # all ended since the last poll
        click.echo(
            f"cancelled {name}: its {result.ended} batch(es) had ended before the cancel "
            f"reached them, so nothing was left to stop{stopping}; `batchspec apply` collects "
            f"what they finished; `batchspec apply --replace {name}` runs it again"
        )
    elif n == 0 and result.generations:  # e.g. a replacement held before its create
        click.echo(
            f"cancelled {name}: nothing of it was created yet{stopping}; "
            f"`batchspec apply --replace {name}` runs it again"
        )
    elif n == 0 and (result.stopping or result.unconfirmed):
        said = []
        if result.stopping:
            said.append(
                f"{result.stopping} batch{'' if result.stopping == 1 else 'es'} still stopping "
                "(no cancel sent again); `batchspec apply` collects what finishes"
            )
        if result.unconfirmed:
            said.append(
                f"{result.unconfirmed} create(s) whose answer was lost not found yet; every "
                f"`batchspec apply` that selects {name} looks them up, cancels one found and "
                "keeps what it finished"
            )
        click.echo(f"{name} is already cancelled: " + "; ".join(said))
    elif n == 0:
        click.echo(f"{name} has no batch in flight: nothing to cancel")
    else:
        unconfirmed = (
            f"; {result.unconfirmed} create(s) whose answer was lost, not found yet, are looked "
            f"up by every `batchspec apply` that selects {name} (cancelled if found)"
            if result.unconfirmed
            else ""
        )
        click.echo(
            f"cancelling {n} batch{'' if n == 1 else 'es'} of {name}: answers that finish "
            f"before the provider stops them are kept; `batchspec apply` collects them{unconfirmed}"
        )


@cli.command("import")
@click.argument("name")
@click.argument("batch_id")
@paths_argument
@lock_timeout_option
@json_option
@click.option(
    "--force",
    is_flag=True,
    help="Import even if the provider cannot give back the batch's input file to verify it "
    "(an input file that differs is refused anyway).",
)
@state_option
def import_(
    name: str,
    batch_id: str,
    paths: tuple[str, ...],
    lock_timeout: float,
    as_json: bool,
    force: bool,
    state_path: str | None,
) -> None:
    """Adopt BATCH_ID, a batch created outside batchspec, as NAME's current generation.

    NAME's input must fit one batch. The batch's input file is downloaded and its sha256
    compared with NAME's input first. Creates nothing remotely; the next `batchspec apply`
    polls and collects the batch. Recorded in history as an import.
    """
    from batchspec.cli import render
    from batchspec.core.lifecycle import import_batch

    result = import_batch(
        paths, name, batch_id, force=force, lock_timeout=lock_timeout, state_path=state_path
    )
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(render.import_text(result))


@cli.command()
@click.argument("name", shell_complete=complete_names)
@paths_argument
@lock_timeout_option
@json_option
@state_option
def forget(
    name: str, paths: tuple[str, ...], lock_timeout: float, as_json: bool, state_path: str | None
) -> None:
    """Stop tracking NAME without contacting the provider.

    Its batches keep running and its result files stay on disk; its history is kept. If
    NAME's manifest is still there, the next apply tracks it again and resumes what is
    recorded for it (nothing is paid twice); `apply --replace NAME` runs it afresh.
    """
    from batchspec.cli import render
    from batchspec.core.lifecycle import forget_resource

    result = forget_resource(paths, name, lock_timeout=lock_timeout, state_path=state_path)
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(render.forget_text(result))


@cli.command()
@click.argument("holder_id", metavar="ID")
@click.option(
    "--force",
    is_flag=True,
    help="Release it even though its heartbeat is fresh (the run may still be spending).",
)
@state_option
def unlock(holder_id: str, force: bool, state_path: str | None) -> None:
    """Release every lock held by ID (the id named in the 'locked' error, exit 3).

    Only for a run that is gone: ID must hold a lock, or nothing is released.
    A holder whose heartbeat is fresh (under 10 minutes) and whose process is not known to
    be gone is refused (exit 3) unless --force. With a PostgreSQL state, a holder whose
    database session has ended is released whatever its heartbeat, and one whose session is
    open and whose heartbeat is fresh is refused unless --force (which also ends that session).
    A run that loses its lock stops at its next step. Recorded in history as an unlock run.
    """
    from batchspec.core.lifecycle import unlock_state
    from batchspec.state.lock import describe_holder

    holder = unlock_state(holder_id, state_path=state_path, force=force)
    click.echo(f"released the locks of {describe_holder(holder)}")


@cli.group()
def state() -> None:
    """Move the state: to PostgreSQL and back, or into an SQLite file for audits."""


@state.command("migrate")
@click.option(
    "--to",
    "to",
    required=True,
    metavar="URL|PATH",
    help="The new state: a postgresql:// URL of an empty database (or schema), or the path "
    "of a new SQLite file.",
)
@lock_timeout_option
@json_option
@state_option
def state_migrate(to: str, lock_timeout: float, as_json: bool, state_path: str | None) -> None:
    """Copy the whole state into an empty PostgreSQL database or a new SQLite file.

    Holds the state's run lock while it copies, in one transaction on the target (all or
    nothing); then checks every table's rows, the state serial and the sha256 of every
    result blob the state references, and prints the counts. A target that is not empty is
    refused and nothing is written. The source is left as it was, and batchspec.yaml is not
    edited: the output says how to point the project at the new state.
    """
    from batchspec.cli import render
    from batchspec.core.state_move import migrate_state

    result = migrate_state(to, state_path=state_path, lock_timeout=lock_timeout)
    if result.lock_warning:
        click.echo(f"Warning: {result.lock_warning}", err=True)
    if as_json:
        emit_json(result.to_json())
    else:
        click.echo(render.migrate_text(result))


@state.command("export")
@click.argument("file", metavar="FILE.db", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace FILE.db if it exists.")
@json_option
@state_option
def state_export(file: str, force: bool, as_json: bool, state_path: str | None) -> None:
    """Write the state (SQLite or PostgreSQL) to FILE.db, a single SQLite file.

    For audits, sqlite-utils and Datasette: every table, rows and ids as they are, read in
    one snapshot (no lock taken), checked against the source. Refuses an existing FILE.db
    unless --force; the file appears whole or not at all.
    """
    from batchspec.cli import render
    from batchspec.core.state_move import export_state

    copy = export_state(file, state_path=state_path, force=force)
    if as_json:
        emit_json(copy.to_json())
    else:
        click.echo(render.state_copy_text(copy, "Exported"))


def warn_skipped(problems: Any) -> None:
    """A read command went on past broken manifests: say so on stderr (exit code unchanged)."""
    if problems:
        from batchspec.cli import render

        click.echo(render.skipped_manifests_warning(problems), err=True)


def _why_no_prompt(as_json: bool) -> str | None:
    """Why ``apply`` cannot ask a person to approve here (None: it can)."""
    from batchspec.cli.applyview import in_ci

    if in_ci():
        return "CI is set"
    if as_json:
        return "--json: the output is for a program"
    if not sys.stdin.isatty():
        return "its input is not a terminal"
    return None


def _now() -> str:
    from batchspec.state.store import utc_timestamp

    return utc_timestamp()


def report_error(err: BatchspecError, *, no_color: bool = False) -> None:
    from batchspec.cli.colour import style_for

    label = style_for(sys.stderr, no_color=no_color).error("Error:")
    click.echo(f"{label} {err.message}", err=True)
    for line in err.details:
        click.echo(f"  {line}", err=True)


def name_the_variable(err: click.UsageError) -> click.UsageError:
    """A bad value that came from an option's environment variable names it: the user who
    set ``BATCHSPEC_PARALLELISM=0`` in CI typed no ``--parallelism`` to look for."""
    param, ctx = getattr(err, "param", None), err.ctx
    if not isinstance(err, click.BadParameter) or param is None or ctx is None:
        return err
    if param.name is None:
        return err
    if err.message.endswith(" is not a valid integer range."):  # click's name for IntRange
        message = err.message.replace(" a valid integer range.", " a whole number.")
        err = click.BadParameter(message, ctx=ctx, param=param, param_hint=err.param_hint)
    source = ctx.get_parameter_source(param.name)
    # the option's names alone: click's "(env var: ...)" hint (an option with show_envvar)
    # would send a reader who typed it looking for a variable they never set, and name the
    # variable twice for one who set it, beside the "set by ..." below
    hint = " / ".join(f"'{o}'" for o in param.opts) if param.opts else None
    if source == ParameterSource.COMMANDLINE and param.envvar and hint:
        return click.BadParameter(err.message, ctx=ctx, param_hint=hint)
    if source != ParameterSource.ENVIRONMENT:
        return err
    names = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
    for variable in names:
        if variable in os.environ:
            where = f"set by {variable}={os.environ[variable]} in the environment"
            # click lists a boolean's values starting with the empty one: ", 0, 1, f, ..."
            said = err.message.replace("Recognized values: , ", "Recognized values: (empty), ")
            message = f"{said.rstrip('.')} ({where})."
            return click.BadParameter(message, ctx=ctx, param=param, param_hint=hint)
    return err


#: flags users of Terraform and kubectl type (their single-dash forms too), and what says it
#: here; click's guess by spelling offered --state for --target, --prune (which cancels
#: batches) for --dry-run. Each: (the option the command must have, or None for apply, the hint)
_FLAGS_OF_OTHER_TOOLS = {
    "target": (
        "--select",
        "resources are picked with --select NAME (or KEY=VALUE, state:modified)",
    ),
    "auto-approve": ("--yes", "--yes approves without asking"),
    "dry-run": (None, "`batchspec plan` shows what apply would do, changing nothing"),
}


def flag_of_another_tool(err: click.UsageError, args: Sequence[str]) -> click.UsageError:
    """An unknown flag that another tool's users type (``--target``, ``-auto-approve``)
    named with what batchspec calls it, where the command has it; else ``err`` as it is."""
    if not isinstance(err, click.NoSuchOption) or err.ctx is None:
        return err
    typed = err.option_name
    if not typed.startswith("--"):  # click read Terraform's `-target=x` as `-t`, `-a`, ...
        flags = {f"-{flag}" for flag in _FLAGS_OF_OTHER_TOOLS if flag.startswith(typed[1:])}
        typed = next((a for a in (a.split("=")[0] for a in args) if a in flags), typed)
    entry = _FLAGS_OF_OTHER_TOOLS.get(typed.lstrip("-"))
    if entry is None:
        return err
    needed, hint = entry
    command = err.ctx.command
    has = {opt for param in command.params for opt in param.opts}
    if (needed is None and command.name != "apply") or (needed is not None and needed not in has):
        return err
    return click.UsageError(f"No such option '{typed}': {hint}.", ctx=err.ctx)


def _saved_selection(saved: Sequence[str]) -> tuple[str, ...]:
    """The ``--select`` a saved plan was made with, to say why it selected nothing (a plan
    file that cannot be read says so when it is applied)."""
    from batchspec.core.planfile import load_plan_file

    if not saved:
        return ()
    try:
        return load_plan_file(saved[0]).selection
    except BatchspecError:
        return ()


def interrupted_text(
    args: Sequence[str],
    err: BaseException | None = None,
    *,
    engine_drain: float | None = None,
    batches: bool = True,
) -> str:
    """What Ctrl-C (or SIGTERM: ``err`` is ``Terminated``) prints: for apply, also that what
    it created goes on (README, exit 130; 143 for SIGTERM), and, when a local engine runs in
    this process (``engine_drain``: how long it may take to stop), why the stop may take a
    while (it lets the requests it has sent finish: stopping them would send, and pay for,
    them again). An apply on remote providers alone has no engine to wait for. ``batches``
    False: the apply had created no batch (none uploaded or sent, none found in flight), so
    it says that instead (a Ctrl-C while a provider's errors were retried said batches were
    kept when there were none)."""
    terminated = isinstance(err, Terminated)
    what = "Terminated (SIGTERM)" if terminated else "Interrupted"
    command = next((a for a in args if not a.startswith("-")), None)
    if command != "apply":
        return f"{what}."
    if not batches:  # nothing runs on, and no engine has requests of it to wait for
        return f"{what}: no batch was created; the next `batchspec apply` starts from the plan."
    if engine_drain is None:
        return (
            f"{what}: batches already created are kept (the provider runs them on); "
            "`batchspec apply` picks them up."
        )
    again = "a second SIGTERM" if terminated else "Ctrl-C again"
    return (
        f"{what}: batches already created are kept (a remote provider runs them on; "
        "the local engine's batches wait for the next command); `batchspec apply` picks "
        "them up. A local engine first lets the requests it has sent finish (up to "
        f"{engine_drain:g} s; {again} does not wait for them, and they are sent again next "
        "time)."
    )


def interrupted_event_json(err: BaseException, said: Interruption | None) -> dict[str, Any]:
    """The last NDJSON line of an ``apply --json`` stopped by Ctrl-C or SIGTERM: an
    ``error`` event as a failure's (``error`` ``Interrupted`` or ``Terminated``, exit 130 or
    143), its message the line said on stderr."""
    text = said.text if said is not None else None
    if text is None:
        batches = said.batches_may_exist if said is not None else True
        text = interrupted_text(["apply"], err, batches=batches)
    return {
        "event": "error",
        "error": "Terminated" if isinstance(err, Terminated) else "Interrupted",
        "message": text,
        "details": [],
        "resource": None,
        "exit_code": _interrupted_exit_code(err),
        "at": _now(),
    }


def _has_batches_out(action: Action) -> bool:
    """Whether a plan's action finds batches already sent that an interrupted apply leaves
    out there: in flight or not collected, creates recorded but not confirmed, or another
    generation's batches a replace would cancel (a resource in sync, or one to retry, has
    only batches that ended and were collected)."""
    kind = action.kind.value
    if kind in ("refresh", "collect"):
        return True
    if kind == "create" and action.generation_id is not None:  # queued intents, or unsure
        return True
    return bool(action.cancels_in_flight)


def serve_stopping_text(notice: Any) -> str:
    """What the first Ctrl-C (or SIGTERM) of ``serve`` says at once (``notice``: the engine
    server's ``Stopping``): that it stops, what it waits for and how long at most, and that
    Ctrl-C (again) does not wait, in apply's words."""
    what = "Terminated (SIGTERM)" if notice.signal == "SIGTERM" else "Interrupted"
    resume = "unfinished batches resume at the next start."
    waits = []
    if notice.requests_in_flight:
        waits.append(
            f"the {_count(notice.requests_in_flight, 'request')} the engine has sent upstream "
            f"to finish (up to {notice.drain_timeout:g} s)"
        )
    if notice.answering:
        waits.append(
            f"{_count(notice.answering, 'API request')} being answered "
            f"(up to {notice.answer_timeout:g} s)"
        )
    if not waits:
        return f"{what}: stopping (no request in flight); {resume}"
    again = "Ctrl-C" if notice.signal == "SIGTERM" else "Ctrl-C again"
    return (
        f"{what}: stopping, taking no new requests; waiting for {' and for '.join(waits)}. "
        f"{again} does not wait for them (the engine's are sent again at the next start); "
        f"{resume}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def local_engine_drain() -> float | None:
    """How long the local engines running in this process may take to stop (None: none
    runs). Asked of the engine only once its module is loaded: a process that never loaded it
    runs none, and a signal handler must not spend time importing it."""
    if "batchspec.engine.core" not in sys.modules:
        return None
    from batchspec.engine.core import running_engines_drain

    return running_engines_drain()


def skip_unused_http_modules() -> None:
    """Mark two modules httpx would import absent, before httpx is first imported.

    httpx's ``__init__`` imports its own command-line client (``httpx._main``) whenever rich
    is installed: rich, pygments and friends, ~40 ms; and httpcore imports ``h2`` for
    HTTP/2 whenever it is installed, ~15 ms. This process never runs that client and never
    asks for HTTP/2 (httpx's default), so both are skipped on the path of every command that
    reaches a provider: httpx then defines a stub ``httpx.main``, httpcore an
    ``HTTP2Connection`` that says h2 is missing, and nothing else of theirs changes.
    """
    if "httpx" not in sys.modules and "httpcore" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
        sys.modules.setdefault("h2", None)  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn known failures into exit codes, never tracebacks.

    With no ``argv`` it is the process's own entry point (the ``batchspec`` script, ``python
    -m batchspec``): it skips the HTTP modules it never uses (``skip_unused_http_modules``),
    and the process exits when it returns, its heap frozen first
    (``freeze_heap_before_exit``). A caller in its own process (the tests) gets neither."""
    if argv is None:
        skip_unused_http_modules()
    try:
        _run(argv)
    finally:
        if argv is None:
            freeze_heap_before_exit()


def freeze_heap_before_exit() -> None:
    """Move every object to the collector's permanent generation (``gc.freeze``), so the
    interpreter's last collections at exit do not walk the whole heap again: ~30 ms of a
    command's exit. Called once the command is done (its state closed, its files written
    and closed), in a process about to end; a caller of ``main`` in its own process (the
    tests, giving ``argv``) keeps its collector as it was."""
    gc.freeze()


class Interruption:
    """Ctrl-C and SIGTERM stop a command, and say so on stderr the moment they come.

    The stop itself can take a while (a local engine running in this process lets the
    requests it has sent finish, up to 30 s; the line says so only when one runs): said only
    once the command had unwound, a Ctrl-C looked ignored. SIGTERM (a CI runner cancelling a
    job, ``docker stop``, Kubernetes, ``timeout``) ends a process on the spot by default: no
    ``interrupted`` event, no exit code in the state (``history`` showed the run ``killed``);
    it stops the command as Ctrl-C does (``Terminated``, exit 143). Each is taken so once: a
    second one stops at once (Ctrl-C raises again, a second SIGTERM ends the process, as the
    default would). Handlers live in the main thread only; an ignored SIGINT (a job started
    in the background by a script) stays ignored, and ``serve`` puts its own in place while
    it serves."""

    def __init__(self, args: Sequence[str]) -> None:
        self.args = args
        self.said = False
        #: the line said (``say``), None until then
        self.text: str | None = None
        #: False while an apply has created no batch (``saw``): its line says so
        self.batches_may_exist = True
        #: while apply's live bars are on screen: writes a line above them (``say_above``)
        self.above_bars: Callable[[str, Callable[[str], None]], bool] | None = None

    def say(
        self, err: BaseException | None, *, in_handler: bool = False, text: str | None = None
    ) -> None:
        """Say the interruption, once: ``text``, or apply's (or any command's) own words."""
        if self.said:
            return
        self.said = True
        if text is None:
            text = interrupted_text(
                self.args, err, engine_drain=local_engine_drain(), batches=self.batches_may_exist
            )
        self.text = text
        if in_handler:  # not through sys.stderr: the signal may come while it is written to
            with contextlib.suppress(OSError):  # a closed stderr must not replace the signal
                if not self._said_above_bars(text):
                    _write_stderr(text + "\n")
        else:
            click.echo(text, err=True)

    def saw(self, event: Progress) -> None:
        """An apply's progress ``event``: from an upload on (its create may land, and is
        looked up next time), a create about to be sent (its file perhaps uploaded before:
        no upload then), a create or an adoption, or a plan that finds batches already sent,
        batches may exist that the interruption leaves running."""
        if self.batches_may_exist:
            return
        if event.event in ("upload", "creating", "create", "adopt"):
            self.batches_may_exist = True
        elif event.event == "plan" and event.plan is not None:
            self.batches_may_exist = any(_has_batches_out(a) for a in event.plan.actions)

    def _said_above_bars(self, text: str) -> bool:
        above = self.above_bars
        if above is None:
            return False
        try:
            return above(text, _write_stderr)
        except (OSError, RuntimeError):  # stdout cannot be written now: said on stderr alone
            return False
        except BaseException:  # a second Ctrl-C while it waited for the bars: say it first
            with contextlib.suppress(OSError):
                _write_stderr(text + "\n")
            raise

    @contextlib.contextmanager
    def handled(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def interrupted(signum: int, frame: FrameType | None) -> None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            self.say(KeyboardInterrupt(), in_handler=True)
            raise KeyboardInterrupt

        def terminated(signum: int, frame: FrameType | None) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self.say(Terminated(), in_handler=True)
            raise Terminated

        previous_term = signal.signal(signal.SIGTERM, terminated)
        previous_int = signal.getsignal(signal.SIGINT)
        if previous_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, interrupted)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous_term)
            if previous_int is signal.default_int_handler:
                signal.signal(signal.SIGINT, previous_int)


def _write_stderr(text: str) -> None:
    os.write(2, text.encode())


def _interrupted_exit_code(err: BaseException | None) -> int:
    return int(getattr(err, "exit_code", INTERRUPTED_EXIT_CODE))


def _symlink_loop(err: RuntimeError) -> str | None:
    """The path of the symbolic link loop ``err`` is about (pathlib before Python 3.13 raises
    a RuntimeError, not an OSError, when it resolves one), or None for any other error."""
    prefix = "Symlink loop from "
    text = str(err)
    return text[len(prefix) :].strip("'\"") if text.startswith(prefix) else None


def _run(argv: list[str] | None) -> None:
    args = sys.argv[1:] if argv is None else argv
    interruption = Interruption(args)
    # psycopg logs its own failed cancel of a query on Ctrl-C (a frozen state server): bare
    # lines beside ours; what happened is said once, by the interruption
    logging.getLogger("psycopg").addHandler(logging.NullHandler())
    try:
        with interruption.handled():
            # obj: a command that says its own interruption (serve) says it through this one
            rv = cli.main(args=argv, prog_name="batchspec", standalone_mode=False, obj=interruption)
    except click.exceptions.Abort as err:
        if isinstance(err.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort
            interruption.say(err.__cause__)
            sys.exit(_interrupted_exit_code(err.__cause__))
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.UsageError as err:  # includes BadParameter, NoSuchOption, ...
        name_the_variable(flag_of_another_tool(err, args)).show()
        sys.exit(USAGE_EXIT_CODE)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except BatchspecError as err:
        report_error(err, no_color="--no-color" in args)
        sys.exit(err.exit_code)
    except OSError as err:  # disk full, permission denied, a file where a folder should be
        where = f": {err.filename}" if err.filename else ""
        click.echo(f"Error: {err.strerror or err}{where}", err=True)
        sys.exit(1)
    except RuntimeError as err:
        looped = _symlink_loop(err)
        if looped is None:
            raise
        click.echo(f"Error: a symbolic link loops back to itself: {looped}", err=True)
        sys.exit(1)
    except sqlite3.Error as err:  # a database failed under us: disk full, I/O error
        click.echo(
            f"Error: a database operation failed ({err}); check the free space and the "
            "permissions of the state folder, then run the command again",
            err=True,
        )
        sys.exit(1)
    except KeyboardInterrupt as err:
        interruption.say(err)
        sys.exit(_interrupted_exit_code(err))
    sys.exit(rv if isinstance(rv, int) else 0)
