"""The command line: each command parses options, calls one library function, renders.

Business logic lives in the library modules; this file only turns arguments into calls and
results into text or JSON. Known failures are ``BatchspecError``s and exit with their own
code and a one-paragraph message on stderr, never a traceback. Usage errors exit 64.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from batchspec import __version__
from batchspec.errors import BatchspecError

F = TypeVar("F", bound=Callable[..., Any])

USAGE_EXIT_CODE = 64


# ---------------------------------------------------------------------------------------------
# Shared options: defined once, each with an environment variable.


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, envvar="BATCHSPEC_JSON",
        help="Write machine-readable JSON to stdout (and nothing else).",
    )(f)


def state_option(f: F) -> F:
    return click.option(
        "--state", "state_path", type=click.Path(dir_okay=False), envvar="BATCHSPEC_STATE",
        help="State database (default: the project's, or state/batchspec.db).",
    )(f)


def select_option(f: F) -> F:
    return click.option(
        "--select", "-s", "select", multiple=True, envvar="BATCHSPEC_SELECT",
        help="Only these resources (repeatable).",
    )(f)


def lock_timeout_option(f: F) -> F:
    return click.option(
        "--lock-timeout", type=float, default=0.0, show_default=True,
        envvar="BATCHSPEC_LOCK_TIMEOUT",
        help="Seconds to wait for another run's lock before exiting 3.",
    )(f)


def paths_argument(f: F) -> F:
    return click.argument("paths", nargs=-1, type=click.Path())(f)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


# ---------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="batchspec")
def cli() -> None:
    """Run LLM batch jobs the GitOps way.

    Commit YAML manifests that say which requests to run where; `batchspec apply` uploads,
    creates, polls, collects and retries batches until the results on disk match, recording
    every step in a SQLite state store that doubles as an audit log.
    """


def report_error(err: BatchspecError) -> None:
    click.echo(f"Error: {err.message}", err=True)
    for line in err.details:
        click.echo(f"  {line}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and turn known failures into exit codes, never tracebacks."""
    try:
        rv = cli.main(args=argv, prog_name="batchspec", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.UsageError as err:  # includes BadParameter, NoSuchOption, ...
        err.show()
        sys.exit(USAGE_EXIT_CODE)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except BatchspecError as err:
        report_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
