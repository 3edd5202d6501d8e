"""Tests for `batchspec unlock ID`: the CLI face of batchspec.core.lifecycle.unlock_state."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from batchspec.cli.main import main
from batchspec.state.lock import acquire_lock, current_lock
from batchspec.state.runinfo import RunInfo
from batchspec.state.store import StateStore

INFO = RunInfo("alice", socket.gethostname(), os.getpid(), None, None, None, None, None, "0")


def run(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        main(argv)
    return int(done.value.code or 0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def test_unlock_releases_the_named_holder(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`unlock ID` with the holder's id exits 0, says whose lock it released, frees it."""
    monkeypatch.setenv("BATCHSPEC_STATE", str(db_path))
    with StateStore.open(db_path) as store:
        handle = acquire_lock(store, command="apply", info=INFO)
        assert run(["unlock", handle.holder_id]) == 0
        assert current_lock(store) is None
    out = capsys.readouterr().out
    assert f"released the lock of {handle.holder_id} (alice@" in out


def test_unlock_with_a_wrong_id_exits_1_naming_the_holder(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong id releases nothing, exits 1 and tells the real holder's id."""
    with StateStore.open(db_path) as store:
        handle = acquire_lock(store, command="apply", info=INFO)
        assert run(["unlock", "not-it", "--state", str(db_path)]) == 1
        assert current_lock(store) == handle.holder
    err = capsys.readouterr().err
    assert f"batchspec unlock {handle.holder_id}" in err and "Traceback" not in err


def test_unlock_without_a_lock_or_database_exits_1(
    db_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No database, or no lock held: exit 1 with a message, and no database is created."""
    assert run(["unlock", "abc", "--state", str(db_path)]) == 1
    assert "no state database" in capsys.readouterr().err and not db_path.exists()
    StateStore.open(db_path).close()
    assert run(["unlock", "abc", "--state", str(db_path)]) == 1
    assert "no lock is held" in capsys.readouterr().err
