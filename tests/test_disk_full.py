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

import pytest
from workspaces import ResourceSpec, Workspace, local_provider, make_workspace

from batchspec.engine import Engine
from batchspec.state.store import StateStore

#: run in the namespace: STEPS (JSON) in order, each "fill" (the mount at MOUNT to FREE kB),
#: "free" (the room back) or a batchspec command line run in this process; print, per
#: command, its exit code, stdout, stderr and the files on the mount with their sizes (JSON)
CLI_ON_A_SMALL_MOUNT = """
import contextlib, io, json, os, sys
from batchspec.cli.main import main
mount, free_kb, steps = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
filler = os.path.join(mount, "filler")

def fill():
    with open(filler, "wb") as fh:
        stats = os.statvfs(mount)
        fh.write(bytes(max(0, stats.f_bavail * stats.f_frsize - free_kb * 1024)))

def run(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exited:
            code = exited.code
    left = {
        os.path.relpath(os.path.join(top, name), mount): os.path.getsize(os.path.join(top, name))
        for top, _, names in os.walk(mount) for name in names if name != "filler"
    }
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(), "left": left}

runs = []
for step in steps:
    if step == "fill":
        fill()
    elif step == "free":
        os.remove(filler)
    else:
        runs.append(run(step))
print(json.dumps(runs))
"""


def run_on_a_small_mount(
    mount: Path, steps: list[object], free_kb: int = 0, size_kb: int = 256
) -> list[dict]:
    """CLI_ON_A_SMALL_MOUNT with a tmpfs of ``size_kb`` over ``mount``, in a mount namespace
    of its own (``unshare``: as root, or as a user through a user namespace)."""
    mount.mkdir(parents=True, exist_ok=True)
    flags = "-m" if os.geteuid() == 0 else "-rm"
    place = f"mount -t tmpfs -o size={size_kb}k tmpfs {shlex.quote(str(mount))}"
    child = f"{shlex.quote(sys.executable)} -c {shlex.quote(CLI_ON_A_SMALL_MOUNT)}"
    args = " ".join(shlex.quote(a) for a in (str(mount), str(free_kb), json.dumps(steps)))
    argv = ["unshare", flags, "sh", "-c", f"{place} && exec {child} {args}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    runs: list[dict] = json.loads(done.stdout)
    return runs


def apply_with_a_full_mount(
    ws: Workspace, folder: str, free_kb: int = 0, size_kb: int = 256
) -> list[dict]:
    """`apply --wait` with ``ws.root / folder`` full, then again with room."""
    apply = ["apply", str(ws.root), "--wait", "--yes", "--poll-interval", "0.05"]
    steps: list[object] = ["fill", apply, "free", apply]
    return run_on_a_small_mount(ws.root / folder, steps, free_kb, size_kb)


def one_error_line(run: dict) -> str:
    """The one ``Error:`` line of a failed command, which shows no traceback."""
    assert run["code"] == 1, run
    errors = [line for line in run["err"].splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in run["err"], run["err"]
    return errors[0]


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
    error = one_error_line(full)
    assert "No space left on device" in error, error
    assert str(ws.root / "state" / "store") in error and "state/local" not in error, error
    assert not [name for name in full["left"] if name.endswith(".part")], full["left"]
    assert_converged(ws, second, batches=3)


def test_a_full_shard_folder_names_it_and_leaves_no_partial_shard(tmp_path: Path) -> None:
    """A shard file that could not be written on a full disk failed apply with a bare
    "Error: No space left on device" (a buffered write's error names no file) and left an
    empty ``.part`` file in the shard folder for ever. Now the error names the shard folder
    and no part is left; with room, the next apply submits and collects it once."""
    ws = two_resources(tmp_path / "ws")
    full, second = apply_with_a_full_mount(ws, "state/shards")
    error = one_error_line(full)
    assert error == f"Error: No space left on device: {ws.root / 'state' / 'shards'}", error
    assert full["left"] == {}, full["left"]
    assert_converged(ws, second, batches=3)


def test_a_report_on_a_full_disk_leaves_no_empty_page_and_keeps_the_old_one(
    tmp_path: Path,
) -> None:
    """`report -o` wrote its page in place: on a full disk a new page was an empty file at
    the path (exit 1, "No space left on device" naming no file), and a page written over
    an old one left it empty if the disk filled in between. Now the page is written
    beside and renamed: the error names the page, an old page is kept as it was, a new one
    is not created; with room, the page is written."""
    ws = two_resources(tmp_path / "ws")
    out = tmp_path / "out"
    old, new = out / "old.html", out / "new.html"
    report = ["report", str(ws.root), "-o"]
    first, to_old, to_new, later = run_on_a_small_mount(
        out,
        [
            [*report, str(old)],
            "fill",
            [*report, str(old)],
            [*report, str(new)],
            "free",
            [*report, str(new)],
        ],
    )
    assert first["code"] == 0, first
    size = first["left"]["old.html"]
    for run, page in ((to_old, old), (to_new, new)):
        assert one_error_line(run) == f"Error: No space left on device: {page}", run
    assert to_old["left"] == {"old.html": size}, to_old["left"]
    assert to_new["left"] == {"old.html": size}, to_new["left"]
    assert later["code"] == 0 and later["left"]["new.html"] > 0, later


@pytest.mark.parametrize("free_kb", [0, 16])
def test_a_state_export_onto_a_full_disk_says_so_and_places_nothing(
    tmp_path: Path, free_kb: int
) -> None:
    """`state export` onto a full disk said the (new, empty) file "stayed busy ...; another
    process is writing to it", or "check the permissions of the state folder": both send
    the user after the wrong thing. Now the error names the export and its full disk, no
    file (nor -wal, -shm) is left, an export replaced with --force is kept as it was; with
    room the export is written."""
    ws = two_resources(tmp_path / "ws")
    with StateStore.open(ws.state_path) as store:
        store.record_event(None, "probe")
    out = tmp_path / "out"
    old, new = out / "old.db", out / "new.db"
    export = ["state", "export", "--state", str(ws.state_path)]
    steps: list[object] = [[*export, str(old)], "fill", [*export, str(new)]]
    first, to_new, to_old, later = run_on_a_small_mount(
        out,
        [*steps, [*export, "--force", str(old)], "free", [*export, str(new)]],
        free_kb,
        size_kb=1024,
    )
    assert first["code"] == 0, first
    for run, target in ((to_new, new), (to_old, old)):
        error = one_error_line(run)
        assert str(target) in error and "disk is full" in error, error
        assert "busy" not in error and "state folder" not in error, error
        assert run["left"] == first["left"], run["left"]
    assert later["code"] == 0 and "new.db" in later["left"], later


#: run in the namespace: stream 64 kB into a blob store on the full mount at MOUNT; print
#: the error and the files left in its tmp folder
BLOB_ON_A_FULL_MOUNT = """
import os, sys
from pathlib import Path
from batchspec.storage.blobstore import BlobStore
mount = Path(sys.argv[1])
with open(mount / "filler", "wb") as fh:
    stats = os.statvfs(mount)
    fh.write(bytes(stats.f_bavail * stats.f_frsize))
blobs = BlobStore(mount / "files", tmp_dir=mount / "tmp")
try:
    with blobs.writer() as writer:
        writer.write(bytes(64 * 1024))
        writer.commit()
except OSError as err:
    print(err.strerror, err.filename, sorted(os.listdir(mount / "tmp")))
"""


def test_a_blob_written_to_a_full_disk_names_its_folder(tmp_path: Path) -> None:
    """A blob streamed into a store on a full disk (an upload into the local engine, a
    download into the result store) failed with a buffered write's error, which names no
    file: apply said a bare "Error: No space left on device". Now the error names the
    folder written to, and the partial blob is gone."""
    mount = tmp_path / "small"
    mount.mkdir()
    flags = "-m" if os.geteuid() == 0 else "-rm"
    place = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(mount))}"
    child = f"{shlex.quote(sys.executable)} -c {shlex.quote(BLOB_ON_A_FULL_MOUNT)}"
    argv = ["unshare", flags, "sh", "-c", f"{place} && exec {child} {shlex.quote(str(mount))}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"No space left on device {mount / 'tmp'} []", done.stdout


def test_a_full_request_index_folder_does_not_fail_apply(tmp_path: Path) -> None:
    """The request index of an input over 64 kB is a cache in state/input-index; with that
    folder's disk full, apply refused the workspace: "1 problem ... cannot read input
    data/big.jsonl: No space left on device", blaming an input that reads fine. Now the run
    indexes in a folder of its own and applies; nothing is left in the full folder."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=(ResourceSpec("big", count=400, provider="here"),),
    )
    assert ws.input_path("big").stat().st_size > 64 * 1024
    full, second = apply_with_a_full_mount(ws, "state/input-index")
    assert full["code"] == 0 and "Traceback" not in full["err"], full
    assert full["left"] == {}, full["left"]
    lines = ws.output_path("big").read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in lines] == [f"req-{i}" for i in range(400)]
    assert second["code"] == 0, second
    assert created_batches(ws) == 1
