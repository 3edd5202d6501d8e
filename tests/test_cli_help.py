"""Every command documents itself: non-empty help, and `--help` exits 0 (new commands too)."""

from __future__ import annotations

import re

import click
import pytest
from click.testing import CliRunner

from batchspec import __version__
from batchspec.cli.main import cli, main

COMMANDS = sorted(cli.commands)
#: every command by its full name, a group's commands too (``state migrate``)
ALL_COMMANDS = sorted(
    [
        *COMMANDS,
        *(
            f"{name} {sub}"
            for name, group in cli.commands.items()
            if isinstance(group, click.Group)
            for sub in group.commands
        ),
    ]
)


def command_named(name: str) -> click.Command:
    command: click.Command = cli
    for part in name.split():
        assert isinstance(command, click.Group)
        command = command.commands[part]
    return command


def test_there_are_commands() -> None:
    """The parametrised tests below are not vacuous: the core commands are registered."""
    assert {"init", "validate"} <= set(COMMANDS)


def test_groups_have_their_commands() -> None:
    """The group commands are listed too: `state migrate` and `state export` have help."""
    assert {"state migrate", "state export"} <= set(ALL_COMMANDS)


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_command_has_help_text(name: str) -> None:
    """Each command has a docstring-derived help text and a one-line summary."""
    command = command_named(name)
    assert (command.help or "").strip(), f"{name} has no help text"
    assert command.get_short_help_str().strip()


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_command_help_exits_0(name: str) -> None:
    """`batchspec NAME --help` prints usage and exits 0."""
    result = CliRunner().invoke(cli, [*name.split(), "--help"], prog_name="batchspec")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: batchspec {name}")
    assert (command_named(name).help or "").split("\n")[0][:30] in result.output


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_command_help_through_main_exits_0(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The real entry point exits 0 for --help too (not a usage error)."""
    with pytest.raises(SystemExit) as exited:
        main([*name.split(), "--help"])
    assert exited.value.code == 0
    assert f"Usage: batchspec {name}" in capsys.readouterr().out


def test_top_level_help_lists_every_command() -> None:
    """`batchspec --help` names every command."""
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert f"  {name} " in result.output


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """`batchspec --version` prints the installed version and exits 0."""
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"batchspec, version {__version__}"


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown command exits 64 without a traceback."""
    with pytest.raises(SystemExit) as exited:
        main(["no-such-command"])
    assert exited.value.code == 64
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        pytest.param(
            ["apply", "--target", "triage"],
            "No such option '--target': resources are picked with --select NAME",
            id="target",
        ),
        pytest.param(
            ["plan", "--target=triage"],
            "No such option '--target': resources are picked with --select NAME",
            id="target=",
        ),
        pytest.param(
            ["apply", "-target=triage"],
            "No such option '-target': resources are picked with --select NAME",
            id="terraform-target",
        ),
        pytest.param(
            ["apply", "--auto-approve"],
            "No such option '--auto-approve': --yes approves without asking",
            id="auto-approve",
        ),
        pytest.param(
            ["apply", "-auto-approve"],
            "No such option '-auto-approve': --yes approves without asking",
            id="terraform-auto-approve",
        ),
        pytest.param(
            ["apply", "--dry-run"],
            "No such option '--dry-run': `batchspec plan` shows what apply would do",
            id="dry-run",
        ),
    ],
)
def test_a_flag_of_terraform_or_kubectl_is_told_its_batchspec_name(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --target X`, `--auto-approve`, `--dry-run` (Terraform's, kubectl's) exit 64
    naming what batchspec calls it: click's guess by spelling offered --state for --target
    and --prune (which cancels batches) for --dry-run."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 64
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("Error:")]
    assert line.startswith(f"Error: {said}"), line
    assert "--state" not in line and "--prune" not in line and "Did you mean" not in line


def test_a_flag_with_no_batchspec_counterpart_keeps_click_s_guess(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`status --auto-approve` (status approves nothing): click's own message stays."""
    with pytest.raises(SystemExit) as exited:
        main(["status", "--auto-approve"])
    assert exited.value.code == 64
    assert "Error: No such option '--auto-approve'." in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "argv"),
    [
        pytest.param("BATCHSPEC_PARALLELISM", "0", ["apply", "--yes"], id="parallelism"),
        pytest.param("BATCHSPEC_PARALLELISM", "100000", ["cancel", "x"], id="parallelism-cap"),
        pytest.param("BATCHSPEC_LOCK_TIMEOUT", "soon", ["cancel", "x"], id="lock-timeout"),
    ],
)
def test_a_bad_value_from_the_environment_names_the_variable(
    variable: str,
    value: str,
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An option's bad value that came from its environment variable (not typed on the
    command line) says which variable set it: exit 64, the variable and its value named."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 64
    err = capsys.readouterr().err
    assert f"set by {variable}={value} in the environment" in err


def test_a_bad_boolean_from_the_environment_lists_its_values_without_a_blank_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """BATCHSPEC_YES=maybe: click's list of a boolean's values began with the empty one
    ("Recognized values: , 0, 1, ..."), read as a typo; it is named."""
    monkeypatch.setenv("BATCHSPEC_YES", "maybe")
    with pytest.raises(SystemExit) as exited:
        main(["apply"])
    assert exited.value.code == 64
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("Error:")]
    assert "Recognized values: (empty), 0, 1," in line and ": , " not in line
    assert line.endswith("(set by BATCHSPEC_YES=maybe in the environment).")


def test_a_bad_parallelism_from_the_environment_names_the_variable_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """BATCHSPEC_PARALLELISM=0 (an option whose help shows its variable) is one error naming
    the option, the value's range and the variable once: click's "(env var: ...)" hint came
    before the "set by ..." and named it twice."""
    monkeypatch.setenv("BATCHSPEC_PARALLELISM", "0")
    with pytest.raises(SystemExit) as exited:
        main(["apply", "--yes"])
    assert exited.value.code == 64
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("Error:")]
    assert line == (
        "Error: Invalid value for '--parallelism': 0 is not in the range 1<=x<=256 "
        "(set by BATCHSPEC_PARALLELISM=0 in the environment)."
    )


@pytest.mark.parametrize(
    "argv", [["apply", "--yes"], ["apply", "--yes", "--parallelism", "many"]], ids=["env", "typed"]
)
def test_a_parallelism_that_is_no_number_is_said_so_plainly(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """BATCHSPEC_PARALLELISM=many (or --parallelism many): "'many' is not a whole number",
    not click's "is not a valid integer range", the variable named once when it set it."""
    monkeypatch.setenv("BATCHSPEC_PARALLELISM", "many")
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 64
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("Error:")]
    said = "Error: Invalid value for '--parallelism': 'many' is not a whole number"
    assert line.startswith(said) and "range" not in line, line
    assert line.count("BATCHSPEC_PARALLELISM") == (1 if argv == ["apply", "--yes"] else 0)


def test_a_bad_value_typed_on_the_command_line_does_not_blame_the_variable(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`apply --parallelism 0` (BATCHSPEC_PARALLELISM unset) exits 64 naming the option alone:
    no "(env var: BATCHSPEC_PARALLELISM)" to send the reader after a variable never set."""
    monkeypatch.delenv("BATCHSPEC_PARALLELISM", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["apply", "--yes", "--parallelism", "0"])
    assert exited.value.code == 64
    err = capsys.readouterr().err
    assert "Invalid value for '--parallelism': 0 is not in the range 1<=x<=256" in err
    assert "BATCHSPEC_PARALLELISM" not in err


def test_apply_help_says_in_plain_words_what_exit_codes_4_and_5_mean() -> None:
    """`apply --help` lists its exit codes one a line, saying what 4 and 5 mean as
    docs/exit-codes.md does: 4 a resource failed for good (Degraded), winning over the
    timeout; 5 the timeout reached with none Degraded. It said "4 Degraded (also when
    --timeout is reached: no longer wait fixes it), 5 --timeout reached"."""
    text = CliRunner().invoke(cli, ["apply", "--help"]).output
    words = " ".join(text.split())
    assert "no longer wait" not in words
    codes = [line.split()[0] for line in text.splitlines() if re.match(r"^ {4}\d ", line)]
    assert codes == ["0", "1", "3", "4", "5"], text
    assert "4 a resource ended Degraded: some of its requests failed for good" in words
    assert "It wins over 5: waiting longer would not fix it" in words
    assert "5 --wait reached --timeout with resources still in flight, none of them" in words


def test_plan_help_names_every_refusal_that_exits_1() -> None:
    """`plan --help` says which plans exit 1 even with --detailed-exitcode: those a budget
    refuses and those with a new resource whose result files an orphan wrote (apply refuses
    both); it named budgets only, and a CI job saw exit 1 on a rename it did not explain."""
    words = " ".join(CliRunner().invoke(cli, ["plan", "--help"]).output.split())
    assert "A plan that apply would refuse (a budget it exceeds, or a new resource whose" in words
    assert "result files hold what an orphan wrote) is shown, then exits 1" in words


@pytest.mark.parametrize("command", ["apply", "cancel"])
def test_parallelism_help_names_its_environment_variable(command: str) -> None:
    """`--parallelism` help names BATCHSPEC_PARALLELISM, the way the FAQ says to set it in CI."""
    result = CliRunner().invoke(cli, [command, "--help"])
    option = " ".join(result.output.split("--parallelism", 1)[1].split("--", 1)[0].split())
    assert "[env var: BATCHSPEC_PARALLELISM; default: 16; 1<=x<=256]" in option
    assert "at most 256" in option


@pytest.mark.parametrize("command", ["apply", "cancel", "forget", "import", "state migrate"])
def test_lock_timeout_help_names_its_environment_variable(command: str) -> None:
    """`--lock-timeout` help names BATCHSPEC_LOCK_TIMEOUT, which both CI examples set once
    for every command (only the reference table named it)."""
    result = CliRunner().invoke(cli, [*command.split(), "--help"])
    option = " ".join(result.output.split("--lock-timeout", 1)[1].split("--", 1)[0].split())
    assert "[env var: BATCHSPEC_LOCK_TIMEOUT; default: 0.0]" in option


@pytest.mark.parametrize(("command", "args"), [("apply", []), ("cancel", ["x"])])
def test_parallelism_above_its_cap_is_a_usage_error_naming_the_cap(
    command: str,
    args: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--parallelism 100000` (a thread per queued call) exits 64 before any work, naming the
    cap; the cap itself is a valid value."""
    monkeypatch.delenv("BATCHSPEC_PARALLELISM", raising=False)
    with pytest.raises(SystemExit) as exited:
        main([command, "--parallelism", "100000", *args])
    assert exited.value.code == 64
    err = capsys.readouterr().err
    assert "Invalid value for '--parallelism': 100000 is not in the range 1<=x<=256" in err
    ctx = command_named(command).make_context(command, ["--parallelism", "256", *args])
    assert ctx.params["parallelism"] == 256


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "nan"],
        ["--poll-interval", "nan"],
        ["--poll-interval", "inf"],
        ["--lock-timeout", "nan"],
    ],
)
def test_apply_refuses_a_timeout_or_poll_interval_that_is_not_a_number_of_seconds(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`--timeout nan` passed the range check (NaN compares false with its bounds) and never
    came: an apply waiting on a batch never ended; an infinite pause between polls neither.
    Both are usage errors (`--timeout inf`, no timeout, is still taken)."""
    with pytest.raises(SystemExit) as exited:
        main(["apply", *args])
    assert exited.value.code == 64
    assert "is not a number of seconds" in capsys.readouterr().err
    ctx = command_named("apply").make_context("apply", ["--timeout", "inf"])
    assert ctx.params["timeout"] == float("inf")


def test_the_cli_cap_on_parallelism_is_the_library_s_and_the_schema_s() -> None:
    """The CLI's cap (written out for a fast start), the pool's and maxConcurrency's maximum
    in the project schema are one number."""
    from batchspec.cli.main import MAX_PARALLELISM
    from batchspec.core.reconcile.prefetch import MAX_PARALLELISM as LIBRARY_CAP
    from batchspec.workspace.yamldoc import load_schema

    defs = load_schema("project")["$defs"]
    assert MAX_PARALLELISM == LIBRARY_CAP == defs["maxConcurrency"]["maximum"]
