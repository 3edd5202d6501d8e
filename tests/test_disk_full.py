"""A disk that fills up under `apply`: one folder of the workspace on a small filesystem.

Each test mounts a small tmpfs over one folder of a workspace (the result store, the shard
folder, ...) in a mount namespace of its own (``unshare``, as in test_state_file.py), fills
it, runs `apply --wait` there, then frees the room and applies again. The promises: the
failed apply says what failed in one ``Error:`` line naming the full folder (no traceback),
leaves no partial file behind on the full disk, and the next apply converges with every
result and creates no batch twice.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from workspaces import ResourceSpec, Workspace, local_provider, make_workspace

from batchspec.engine import Engine

#: run in the namespace: fill the mount at MOUNT to FREE kB, apply WS, free the room, apply
#: again; print each apply's exit code, stderr and the files left on the mount (as JSON)
APPLY_ON_A_FULL_MOUNT = """
import contextlib, io, json, os, sys
from batchspec.cli.main import main
ws, mount, free_kb = sys.argv[1], sys.argv[2], int(sys.argv[3])
filler = os.path.join(mount, "filler")
with open(filler, "wb") as fh:
    stats = os.statvfs(mount)
    fh.write(bytes(max(0, stats.f_bavail * stats.f_frsize - free_kb * 1024)))

def apply():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["apply", ws, "--wait", "--yes", "--poll-interval", "0.05"])
        except SystemExit as exited:
            code = exited.code
    left = sorted(
        os.path.relpath(os.path.join(top, name), mount)
        for top, _, names in os.walk(mount) for name in names if name != "filler"
    )
    return {"code": code, "err": err.getvalue(), "left": left}

full = apply()
os.remove(filler)
print(json.dumps([full, apply()]))
"""


def apply_with_a_full_mount(ws: Workspace, folder: str, free_kb: int = 0) -> list[dict]:
    """APPLY_ON_A_FULL_MOUNT with a 256 kB tmpfs over ``ws.root / folder``."""
    mount = ws.root / folder
    mount.mkdir(parents=True, exist_ok=True)
    flags = "-m" if os.geteuid() == 0 else "-rm"
    place = f"mount -t tmpfs -o size=256k tmpfs {shlex.quote(str(mount))}"
    child = f"{shlex.quote(sys.executable)} -c {shlex.quote(APPLY_ON_A_FULL_MOUNT)}"
    args = f"{shlex.quote(str(ws.root))} {shlex.quote(str(mount))} {free_kb}"
    argv = ["unshare", flags, "sh", "-c", f"{place} && exec {child} {args}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    runs: list[dict] = json.loads(done.stdout)
    return runs


def two_resources(root: Path) -> Workspace:
    """Two resources of 3 requests; one is written in 2 shards (the shard folder is used)."""
    return make_workspace(
        root,
        providers={"here": local_provider()},
        resources=(
            ResourceSpec("triage", count=3, provider="here"),
            ResourceSpec(
                "summaries", count=3, provider="here", spec={"limits": {"maxRequestsPerBatch": 2}}
            ),
        ),
    )


def created_batches(ws: Workspace) -> int:
    engine = Engine(ws.root / "state" / "local")
    try:
        return len(engine.list_batches(None, 100)["data"])
    finally:
        engine.close()


def assert_converged(ws: Workspace, second: dict, batches: int) -> None:
    assert second["code"] == 0, second
    assert "Traceback" not in second["err"], second["err"]
    for name in ("triage", "summaries"):
        lines = (ws.root / "results" / f"{name}.jsonl").read_text().splitlines()
        assert [json.loads(line)["custom_id"] for line in lines] == [
            f"req-{i}" for i in range(3)
        ], (name, lines)
    assert created_batches(ws) == batches  # none created twice


def test_a_full_result_store_names_its_folder_and_leaves_no_partial_download(
    tmp_path: Path,
) -> None:
    """A download into a full result store (local engine) was reported as a failure of the
    engine's own file ("No space left on device: state/local/files/..", a disk with room),
    and left its partial copy (``.part``) in the store's tmp folder, taking room the full
    disk needed. Now the error names the store's file and nothing is left; with room, the
    next apply collects every result and creates nothing again."""
    ws = two_resources(tmp_path / "ws")
    full, second = apply_with_a_full_mount(ws, "state/store", free_kb=8)
    assert full["code"] == 1, full
    errors = [line for line in full["err"].splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in full["err"], full["err"]
    assert "No space left on device" in errors[0], errors
    assert str(ws.root / "state" / "store") in errors[0], errors
    assert "state/local" not in errors[0], errors
    assert not [name for name in full["left"] if name.endswith(".part")], full["left"]
    assert_converged(ws, second, batches=3)


def test_a_full_shard_folder_names_it_and_leaves_no_partial_shard(tmp_path: Path) -> None:
    """A shard file that could not be written on a full disk failed apply with a bare
    "Error: No space left on device" (a buffered write's error names no file) and left an
    empty ``.part`` file in the shard folder for ever. Now the error names the shard folder
    and no part is left; with room, the next apply submits and collects it once."""
    ws = two_resources(tmp_path / "ws")
    full, second = apply_with_a_full_mount(ws, "state/shards")
    assert full["code"] == 1, full
    errors = [line for line in full["err"].splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in full["err"], full["err"]
    assert errors[0] == f"Error: No space left on device: {ws.root / 'state' / 'shards'}", errors
    assert full["left"] == [], full["left"]
    assert_converged(ws, second, batches=3)
