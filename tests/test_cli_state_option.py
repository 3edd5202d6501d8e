"""Read commands given ``--state`` for an SQLite file that does not exist refuse it (a
mistyped path otherwise shows every resource as never applied), create nothing, and say
nothing for a state that exists; `plan` warns (a plan for a state apply will start is
legitimate). A folder or another file named as the state is refused, nothing made beside it.
Runs on the embedded engine (``local``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from workspaces import ResourceSpec, local_provider, make_workspace, run_cli

READ_COMMANDS = [
    ["status"],
    ["history"],
    ["report", "--json"],
    ["show", "job"],
    ["results", "job"],
]


@pytest.mark.parametrize("command", READ_COMMANDS, ids=lambda c: c[0])
def test_a_read_command_refuses_a_missing_state_file_and_creates_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """`CMD --state typo/x.db` fails (exit 1, as any StateError) saying no state database is
    there, with the error document on stdout under --json, and leaves no file or folder; the
    same command on the workspace's own state, once applied, succeeds."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("job", count=3, provider="here"),),
    )
    assert run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)[0] == 0
    typo = tmp_path / "typo" / "batchspec.db"

    code, _, err = run_cli([*command, str(ws.root), "--state", str(typo)], capsys)

    assert code == 1, err
    assert f"Error: no state database at {typo}: nothing has been recorded there" in err
    assert "--state or BATCHSPEC_STATE" in err
    assert not typo.parent.exists()
    if command[0] in ("status", "show", "history"):  # --state first: checked all the same
        code, out, _ = run_cli([*command, "--state", str(typo), str(ws.root), "--json"], capsys)
        assert code == 1 and json.loads(out)["error"] == "StateError", out
    code, _, err = run_cli([*command, str(ws.root), "--state", str(ws.state_path)], capsys)
    assert code == 0 and "no state database" not in err, err


@pytest.mark.parametrize("command", [*READ_COMMANDS, ["plan"]], ids=lambda c: c[0])
def test_a_folder_or_another_file_named_as_the_state_is_refused_leaving_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    """`--state FOLDER` ("cannot create the state database ...: Is a directory", and plan
    left an input cache beside it) and `--state notes.txt` (plan left an input cache beside
    it) are refused, exit 1, naming what is there; nothing is made beside them."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("job", count=3, provider="here"),),
    )
    folder = tmp_path / "elsewhere" / "states"
    folder.mkdir(parents=True)
    notes = tmp_path / "elsewhere" / "notes.txt"
    notes.write_text("not a state\n")

    code, _, err = run_cli([*command, str(ws.root), "--state", str(folder)], capsys)
    assert code == 1 and f"{folder} is a folder, not a state database" in err, err
    assert f"name the SQLite file (e.g. {folder / 'batchspec.db'})" in err, err
    code, _, err = run_cli([*command, str(ws.root), "--state", str(notes)], capsys)
    assert code == 1 and f"{notes} is not an SQLite database" in err, err

    assert sorted(p.name for p in folder.parent.rglob("*")) == ["notes.txt", "states"]
    assert notes.read_text() == "not a state\n"


@pytest.mark.parametrize("command", [["plan"], ["apply", "--yes"], ["status"]], ids=lambda c: c[0])
def test_a_state_url_batchspec_does_not_open_is_refused_not_made_a_folder(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    """`--state sqlite:///x.db` (SQLAlchemy's form) was read as a relative file name: a folder
    `sqlite:` in the working directory and a new, empty state there, plan showing every
    resource as new. Refused, exit 1, saying which forms it opens; nothing created."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("job", count=3, provider="here"),),
    )
    monkeypatch.chdir(ws.root)
    code, _, err = run_cli([*command, "--state", f"sqlite:///{tmp_path}/x.db"], capsys)
    assert code == 1, err
    assert "is a sqlite:// URL, which batchspec does not open" in err, err
    assert "postgresql://" in err and "as a path" in err, err
    assert not (ws.root / "sqlite:").exists()
    # SQLAlchemy's driver form, the one most PostgreSQL users paste (a '+' in the scheme)
    code, _, err = run_cli([*command, "--state", "postgresql+psycopg://u@h/db"], capsys)
    assert code == 1 and "without SQLAlchemy's +driver part" in err, err
    assert not (ws.root / "postgresql+psycopg:").exists()


def test_plan_warns_of_a_state_that_records_nothing_as_apply_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan --state typo.db` showed every resource as new with no word (apply warns): the
    same warning now, on stderr and in --json's warnings; none for the workspace's state."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("job", count=3, provider="here"),),
    )
    assert run_cli(["apply", str(ws.root), "--yes", "--wait"], capsys)[0] == 0
    typo = tmp_path / "typo.db"
    code, _, err = run_cli(["plan", str(ws.root), "--state", str(typo)], capsys)
    assert code == 0 and f"the state at {typo} records nothing yet" in err, err
    assert "every resource as new" in err, err
    _, out, _ = run_cli(["plan", str(ws.root), "--state", str(typo), "--json"], capsys)
    assert any("records nothing yet" in w for w in json.loads(out)["warnings"]), out
    _, _, err = run_cli(["plan", str(ws.root), "--state", str(ws.state_path)], capsys)
    assert "records nothing yet" not in err


def test_plan_creates_no_state_and_no_folder_where_none_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan --state typo/x.db` created the folder, an empty state and the input caches
    there: it now plans against an empty state in memory, says so, and leaves no folder; a
    plan saved that way still applies to the state the apply starts (nothing recorded yet)."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("job", count=3, provider="here"),),
    )
    typo = tmp_path / "typo" / "batchspec.db"
    saved = tmp_path / "plan.json"

    code, out, err = run_cli(
        ["plan", str(ws.root), "--state", str(typo), "--out", str(saved)], capsys
    )

    assert code == 0, err
    assert not typo.parent.exists()
    assert f"the state at {typo} records nothing yet: no state database is there" in err
    code, out, err = run_cli(["apply", str(saved), "--state", str(typo)], capsys)
    assert code == 0, err
    assert typo.exists()


@pytest.mark.parametrize("command", ["cancel", "forget"])
def test_cancel_and_forget_where_no_state_exists_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """`cancel NAME` / `forget NAME` with `--state typo/x.db`, or in a workspace never
    applied, created the folder and an empty state only to fail that NAME is not recorded:
    they now fail (exit 1) saying no state database is there, and create nothing."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("job", count=3, provider="here"),),
    )
    typo = tmp_path / "typo" / "x.db"

    code, _, err = run_cli([command, "job", str(ws.root), "--state", str(typo)], capsys)

    assert code == 1, err
    assert not typo.parent.exists()
    assert f"no state database at {typo}" in err and "nothing to " + command in err, err
    code, _, err = run_cli([command, "job", str(ws.root)], capsys)
    assert code == 1, err
    assert not ws.state_path.parent.exists()
    assert "no state database at" in err, err


def test_plan_of_some_manifests_creates_no_folder_for_a_missing_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan manifests/job.yaml --state typo/x.db` (PATHS narrower than the workspace, so
    the whole workspace's names are read for orphans) made the folder `typo/` and a manifest
    cache in it; it now makes nothing there, as `plan` of the whole workspace does."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("job", count=1, provider="here"),),
    )
    typo = tmp_path / "typo" / "batchspec.db"

    code, _, err = run_cli(["plan", str(ws.manifest_path("job")), "--state", str(typo)], capsys)

    assert code == 0, err
    assert not typo.parent.exists()
