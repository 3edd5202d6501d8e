"""Where a manifest may write: outputs and errors are confined to the workspace (issue 10, #4, #14).

Nothing a manifest names is written outside the workspace, onto the state, onto a manifest,
the project file or any resource's input, and no two resources write one file. Each refusal
is a located problem, so validate, plan and apply refuse alike, before anything is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from workspaces import ResourceSpec, local_provider, make_workspace, run_cli, write_manifest

from batchspec.workspace.manifest import load_workspace
from batchspec.workspace.yamldoc import InvalidManifestError, Problem


def two_resources(root: Path) -> Path:
    """A workspace with manifests/a.yaml and manifests/b.yaml (inputs in data/), and a rows file."""
    ws = make_workspace(
        root,
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here"), ResourceSpec("b", provider="here")],
    )
    (root / "data" / "rows.csv").write_text("text\nhello\n", encoding="utf-8")
    rows = {
        "apiVersion": "batchspec/v1",
        "kind": "Batch",
        "metadata": {"name": "from-rows"},
        "spec": {
            "provider": "here",
            "endpoint": "/v1/chat/completions",
            "input": {"rows": "../data/rows.csv", "body": {"model": "m", "messages": []}},
            "output": "../results/from-rows.jsonl",
        },
    }
    (root / "manifests" / "rows.yaml").write_text(yaml.safe_dump(rows, sort_keys=False))
    return ws.root


def set_spec(root: Path, name: str, **spec: str) -> None:
    path = root / "manifests" / f"{name}.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"].update(spec)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def problems_of(root: Path) -> list[Problem]:
    with pytest.raises(InvalidManifestError) as caught:
        load_workspace([root])
    return list(caught.value.problems)


OUTSIDE = "__outside__"  # replaced by a path in tmp_path, outside the workspace


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        pytest.param("output", "../state/batchspec.db", "inside the state folder", id="state-db"),
        pytest.param("errors", "../state/x.jsonl", "inside the state folder", id="state-folder"),
        pytest.param("output", "../state/local/x.jsonl", "inside the state folder", id="engine"),
        pytest.param("output", OUTSIDE, "is outside the workspace", id="absolute-outside"),
        pytest.param("output", "../../../../x.jsonl", "is outside the workspace", id="dotdot"),
        pytest.param("output", "../batchspec.yaml", "is the project file", id="project-file"),
        pytest.param("output", "b.yaml", "matches the workspace's manifest globs", id="manifest"),
        pytest.param("errors", "a.yaml", "is this manifest", id="own-manifest"),
        pytest.param("output", "../data/b.jsonl", "is the input of resource 'b'", id="other-input"),
        pytest.param(
            "output", "../data/rows.csv", "is the input of resource 'from-rows'", id="rows"
        ),
        pytest.param(
            "errors", "../results/b.jsonl", "is written by two resources: 'a'", id="other-output"
        ),
        pytest.param("errors", "../.git/config", "version control folder .git", id="git"),
        pytest.param("output", "../sub/.hg/hgrc", "version control folder .hg", id="hg"),
    ],
)
def test_an_output_that_would_overwrite_what_it_must_not_is_refused_at_its_line(
    tmp_path: Path, key: str, value: str, expected: str
) -> None:
    """Each forbidden target is a path-conflict problem at the manifest's key, file:line."""
    root = two_resources(tmp_path / "ws")
    if value == OUTSIDE:
        value = str(tmp_path / "elsewhere" / "x.jsonl")
    set_spec(root, "a", **{key: value})
    found = [p for p in problems_of(root) if p.code == "path-conflict"]
    assert found, "no path-conflict problem"
    mine = [p for p in found if expected in p.message]
    assert mine, [str(p) for p in found]
    problem = mine[0]
    assert problem.file is not None and problem.line is not None
    assert problem.file.name in ("a.yaml", "b.yaml")
    assert problem.pointer in ("/spec/output", "/spec/errors")


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        pytest.param("../batchspec.db", True, id="database"),
        pytest.param("../batchspec.db-wal", True, id="side-file"),
        pytest.param("../store/x.jsonl", True, id="its-data"),
        pytest.param("../results/batchspec.db", False, id="same-name-elsewhere"),
    ],
)
def test_a_state_kept_in_the_workspace_root_is_refused_as_an_output(
    tmp_path: Path, value: str, refused: bool
) -> None:
    """With the state database in the workspace's root (state.path: batchspec.db), an
    output onto it, a side file of it or the data beside it is refused; the same file name
    in another folder is not."""
    root = two_resources(tmp_path / "ws")
    project = yaml.safe_load((root / "batchspec.yaml").read_text())
    project["state"] = {"path": "batchspec.db"}
    (root / "batchspec.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
    set_spec(root, "a", output=value)
    if not refused:
        load_workspace([root])
        return
    messages = [p.message for p in problems_of(root) if p.code == "path-conflict"]
    assert any("the state database" in m or "the state folder's data" in m for m in messages)


def test_a_symlinked_results_folder_pointing_outside_is_refused(tmp_path: Path) -> None:
    """Symlinks are resolved: results/ linked to a folder outside the workspace is outside."""
    root = two_resources(tmp_path / "ws")
    (tmp_path / "elsewhere").mkdir()
    (root / "results").symlink_to(tmp_path / "elsewhere")
    found = problems_of(root)
    assert {p.code for p in found} == {"path-conflict"}
    assert all("is outside the workspace" in p.message for p in found)


def test_an_output_or_errors_path_that_is_a_folder_is_refused_before_anything_is_spent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output (or errors) path naming an existing folder is a problem at its key, so apply
    creates nothing (it used to run the batch and then fail at write, naming a .tmp file)."""
    root = two_resources(tmp_path / "ws")
    (root / "results" / "a.jsonl").mkdir(parents=True)
    (root / "results" / "b.errors.jsonl").mkdir()
    found = problems_of(root)
    assert sorted(p.pointer for p in found) == ["/spec/errors", "/spec/output"]
    assert all(p.code == "path-conflict" and "is a folder" in p.message for p in found)
    code, _, err = run_cli(["apply", str(root), "--yes"], capsys)
    assert code == 1 and "is a folder" in err
    assert not (root / "state" / "local").exists()  # the engine never saw a request


@pytest.mark.parametrize("key", ["output", "errors"])
@pytest.mark.parametrize("written", ["../newdir/", "../newdir/."])
def test_a_result_path_written_as_a_folder_that_does_not_exist_is_refused(
    tmp_path: Path, key: str, written: str
) -> None:
    """`output: ../newdir/` names a folder even before it exists: a problem at its key (it
    used to pass validate, and apply wrote a file `newdir` and `newdir.errors.jsonl`)."""
    root = two_resources(tmp_path / "ws")
    set_spec(root, "a", **{key: written})
    [problem] = problems_of(root)
    assert problem.pointer == f"/spec/{key}" and problem.code == "path-conflict"
    assert "a result path must name a file" in problem.message
    assert f"{written.rstrip('/')}/a.jsonl" in problem.message
    assert not (root / "newdir").exists()


def test_a_result_path_under_a_file_is_refused_before_anything_is_spent(tmp_path: Path) -> None:
    """`results` being a file where the result files' folder should be is a problem at each
    key (it used to fail at write, once the batch had run)."""
    root = two_resources(tmp_path / "ws")
    (root / "results").write_text("not a folder\n")
    found = problems_of(root)
    assert len(found) == 6  # output and errors of three resources
    assert all("results is a file, not a folder" in p.message for p in found)


def test_an_export_path_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    """An export path naming a folder is a problem at its key, as an output's is."""
    root = two_resources(tmp_path / "ws")
    path = root / "manifests" / "a.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["export"] = [{"path": "../exports/a.csv"}]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    (root / "exports" / "a.csv").mkdir(parents=True)
    [problem] = problems_of(root)
    assert problem.pointer == "/spec/export/0/path" and "is a folder" in problem.message


def test_an_export_path_written_as_a_folder_is_refused(tmp_path: Path) -> None:
    """An export path ending in "/" names a folder, existing or not: a problem at its key,
    as an output's is (it would have written a file named after the folder)."""
    root = two_resources(tmp_path / "ws")
    path = root / "manifests" / "a.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["export"] = [{"path": "../exports/", "format": "csv"}]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    [problem] = problems_of(root)
    assert problem.pointer == "/spec/export/0/path"
    assert "a result path must name a file" in problem.message


def test_an_output_name_longer_than_a_filesystem_takes_is_refused(tmp_path: Path) -> None:
    """An output file name over 255 bytes can never be written: a problem at its key."""
    root = two_resources(tmp_path / "ws")
    set_spec(root, "a", output="../results/" + "o" * 250 + ".jsonl", errors="../results/a.err")
    [problem] = problems_of(root)
    assert problem.pointer == "/spec/output" and "longer than 255 bytes" in problem.message


def test_an_output_inside_the_shared_blob_folder_is_refused(tmp_path: Path) -> None:
    """`state.blobs` is the result store every runner restores from: an output written into
    it (onto a blob's name) is refused like one into the state folder."""
    root = two_resources(tmp_path / "ws")
    project = yaml.safe_load((root / "batchspec.yaml").read_text())
    project["state"]["blobs"] = "shared"
    (root / "batchspec.yaml").write_text(yaml.safe_dump(project, sort_keys=False))
    set_spec(root, "a", output="../shared/ab/" + "ab" * 32, errors="../results/a.err")
    [problem] = problems_of(root)
    assert problem.pointer == "/spec/output" and "state.blobs" in problem.message


def test_an_only_output_puts_the_errors_beside_it(tmp_path: Path) -> None:
    """`output: ../out/answers.jsonl` alone gives errors ../out/answers.errors.jsonl (#14)."""
    root = two_resources(tmp_path / "ws")
    path = root / "manifests" / "a.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["output"] = "../out/answers.jsonl"
    del doc["spec"]["errors"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    [res] = [r for r in load_workspace([root]).resources if r.name == "a"]
    assert res.output_path == root.resolve() / "out" / "answers.jsonl"
    assert res.errors_path == root.resolve() / "out" / "answers.errors.jsonl"


def test_validate_refuses_an_output_onto_the_state_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchspec validate` exits 1 naming manifests/a.yaml:LINE for output: ../state/..."""
    root = two_resources(tmp_path / "ws")
    set_spec(root, "a", output="../state/batchspec.db")
    code, out, err = run_cli(["validate", str(root), "--json"], capsys)
    assert code == 1
    [problem] = json.loads(out)["problems"]
    assert problem["file"].endswith("manifests/a.yaml")
    text = (root / "manifests" / "a.yaml").read_text().splitlines()
    line = next(i for i, t in enumerate(text, 1) if t.strip().startswith("output:"))
    assert problem["line"] == line and problem["pointer"] == "/spec/output"


def test_apply_refuses_an_output_onto_the_state_and_leaves_it_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a good apply, pointing an output at the state database changes nothing at all."""
    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here")],
    )
    code, _, err = run_cli(
        ["apply", str(ws.root), "--wait", "--yes", "--poll-interval", "0.05"], capsys
    )
    assert code == 0, err
    before = ws.state_bytes()
    write_manifest(ws, ResourceSpec("a", provider="here", spec={"output": "../state/batchspec.db"}))
    code, _, err = run_cli(["apply", str(ws.root), "--wait", "--yes"], capsys)
    assert code == 1
    assert "manifests/a.yaml:" in err and "inside the state folder" in err
    assert ws.state_bytes() == before


def test_a_state_above_the_workspace_confines_only_its_own_data(tmp_path: Path) -> None:
    """--state ../x.db puts the state folder above the root: outputs in the workspace stay
    allowed, but the state's own data beside its file (store/, shards/, ...) is refused."""
    root = two_resources(tmp_path / "ws")
    state = str(tmp_path / "elsewhere.db")
    ws = load_workspace([root], state_path=state)
    assert {r.name for r in ws.resources} == {"a", "b", "from-rows"}
    (tmp_path / "ws" / "store").mkdir()
    set_spec(root, "a", output="../store/a.jsonl")  # root/store: not the state's
    load_workspace([root], state_path=state)
    state_in_root = str(root / "batchspec.db")
    with pytest.raises(InvalidManifestError) as caught:
        load_workspace([root], state_path=state_in_root)
    [problem] = caught.value.problems
    assert problem.code == "path-conflict" and "state folder's data" in problem.message


def test_a_results_folder_symlinked_onto_the_state_after_the_load_is_refused_at_write(
    tmp_path: Path,
) -> None:
    """A results folder swapped for a symlink into state/ after the manifests were checked
    (here: once apply has created the batch) is refused when the files are written: the state
    database, which an output named like it would replace, survives and still opens."""
    from batchspec.core.apply import ApplyOptions, apply_workspace
    from batchspec.core.reconcile import Progress
    from batchspec.errors import BatchspecError

    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here")],
    )
    spec = {"output": "../results/batchspec.db", "errors": "../results/a.errors.jsonl"}
    write_manifest(ws, ResourceSpec("a", provider="here", spec=spec))
    load_workspace([str(ws.root)])  # valid: results/ is an ordinary folder

    def swap_in_a_link(progress: Progress) -> None:
        results = ws.root / "results"
        if progress.event == "create" and not results.is_symlink():
            if results.is_dir():
                results.rmdir()
            results.symlink_to(ws.root / "state", target_is_directory=True)

    with pytest.raises(BatchspecError, match="state folder"):
        apply_workspace(
            [str(ws.root)],
            ApplyOptions(wait=True, poll_interval=0.05),
            report=swap_in_a_link,
        )
    assert ws.state_path.read_bytes()[:16] == b"SQLite format 3\x00"
    assert not (ws.root / "state" / "a.errors.jsonl").exists()


def test_an_output_onto_a_manifest_loaded_through_a_symbolic_link_is_refused(
    tmp_path: Path,
) -> None:
    """A manifest that is a symbolic link to a file outside the manifest globs is still a
    manifest: an output onto the file it points at is a path-conflict."""
    root = two_resources(tmp_path / "ws")
    real = root / "kept" / "b-real.yaml"
    real.parent.mkdir()
    (root / "manifests" / "b.yaml").rename(real)
    (root / "manifests" / "b.yaml").symlink_to(real)
    set_spec(root, "a", output="../kept/b-real.yaml")

    found = [p.message for p in problems_of(root) if p.code == "path-conflict"]

    assert any("is a manifest: it would be overwritten" in m for m in found), found


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        pytest.param("output", "../data/b.jsonl", "is the input of resource 'b'", id="input"),
        pytest.param(
            "output", "../data/rows.csv", "is the input of resource 'from-rows'", id="rows"
        ),
        pytest.param(
            "errors", "../results/b.jsonl", "written by two resources: 'b' (its output", id="out"
        ),
        pytest.param(
            "output",
            "../results/from-rows.errors.jsonl",
            "written by two resources: 'from-rows' (its errors",
            id="default-errors",
        ),
    ],
)
def test_a_manifest_given_alone_may_not_write_over_what_the_rest_of_the_workspace_owns(
    tmp_path: Path, key: str, value: str, expected: str
) -> None:
    """PATHS narrow what is loaded, not what is protected: a.yaml alone is refused too."""
    root = two_resources(tmp_path / "ws")
    set_spec(root, "a", **{key: value})
    with pytest.raises(InvalidManifestError) as caught:
        load_workspace([root / "manifests" / "a.yaml"])
    messages = [p.message for p in caught.value.problems if p.code == "path-conflict"]
    assert any(expected in m for m in messages), messages


def test_apply_of_one_manifest_leaves_another_resources_input_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`batchspec apply manifests/a.yaml` whose output is b's input exits 1, b's input unchanged."""
    root = two_resources(tmp_path / "ws")
    set_spec(root, "a", output="../data/b.jsonl")
    before = (root / "data" / "b.jsonl").read_bytes()
    code, _, err = run_cli(["apply", str(root / "manifests" / "a.yaml"), "--wait"], capsys)
    assert code == 1 and "is the input of resource 'b'" in err
    assert (root / "data" / "b.jsonl").read_bytes() == before


def test_a_manifest_given_alone_may_not_declare_a_name_another_file_declares(
    tmp_path: Path,
) -> None:
    """`plan manifests/a.yaml` naming its resource 'b' is a duplicate name, not b's new spec."""
    root = two_resources(tmp_path / "ws")
    path = root / "manifests" / "a.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["name"] = "b"
    doc["spec"]["output"] = "../results/other.jsonl"
    doc["spec"].pop("errors", None)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(InvalidManifestError) as caught:
        load_workspace([path])
    [problem] = caught.value.problems
    assert problem.code == "duplicate-name" and "'b' is used twice" in problem.message


def test_the_folder_resolver_answers_as_path_resolve(tmp_path: Path) -> None:
    """FolderResolver (the loader's and RunContext.relative's) gives Path.resolve()'s answer
    through a symlinked folder, onto a symlinked file (also one spelled as a resolved path),
    with `..`, and for a missing file, asked twice (the second answer from the folder it
    remembered)."""
    from batchspec.workspace.resolving import FolderResolver

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "a.jsonl").write_text("x")
    (tmp_path / "linked").symlink_to(real, target_is_directory=True)
    (real / "sub" / "b.jsonl").symlink_to(real / "sub" / "a.jsonl")
    asked = [
        tmp_path / "linked" / "sub" / "a.jsonl",
        tmp_path / "linked" / "sub" / "b.jsonl",
        tmp_path / "linked" / "sub" / ".." / "sub" / "a.jsonl",
        tmp_path / "linked" / "sub" / "missing.jsonl",
        tmp_path / "linked" / "nowhere" / "c.jsonl",
        real.resolve() / "sub" / "b.jsonl",  # spelled resolved, but a symlink itself
    ]
    resolver = FolderResolver()
    for _ in range(2):
        assert [resolver.resolve(p) for p in asked] == [p.resolve() for p in asked]
    resolved = real.resolve() / "sub" / "a.jsonl"
    assert resolver.resolve(resolved) is resolved  # already resolved: given back as it is


@pytest.mark.parametrize("how", ["swapped", "moved"])
def test_a_folder_swapped_for_a_symlink_between_two_writes_of_one_pass_is_refused(
    tmp_path: Path, how: str
) -> None:
    """Two resources write into results/ in one pass; after the first one's files are
    checked (and written), results/ is swapped for a symlink onto state/ (or moved into
    state/, a symlink left in its place: the same directory, elsewhere). The second one's
    check, in the same pass, sees the link: its output is refused (a folder resolution kept
    for the pass let an output named like the state database replace it)."""
    import time

    from batchspec.core.reconcile.context import RunContext
    from batchspec.errors import ManifestError
    from batchspec.state.store import StateStore

    ws = make_workspace(
        tmp_path / "ws",
        providers={"here": local_provider()},
        resources=[ResourceSpec("a", provider="here"), ResourceSpec("b", provider="here")],
    )
    spec = {"output": "../results/batchspec.db", "errors": "../results/b.errors.jsonl"}
    write_manifest(ws, ResourceSpec("b", provider="here", spec=spec))
    loaded = load_workspace([str(ws.root)])  # valid: results/ is an ordinary folder
    a, b = sorted(loaded.resources, key=lambda res: res.name)
    results = ws.root / "results"
    results.mkdir(exist_ok=True)
    with StateStore.open(loaded.project.state_path) as store:
        ctx = RunContext(
            project=loaded.project,
            store=store,
            run_id=0,
            provider_for=lambda name: None,  # type: ignore[arg-type,return-value]
            report=lambda progress: None,
            limits_for=lambda res: None,  # type: ignore[arg-type,return-value]
            max_in_flight=lambda provider: None,
            requeue_backoff=0.0,
            clock=time.time,
            still_holds_lock=lambda: None,
        )
        ctx.new_pass()
        ctx.check_result_paths(a)
        (results / "a.jsonl").write_text("")  # a's results written
        if how == "swapped":
            (results / "a.jsonl").unlink()
            results.rmdir()
            results.symlink_to(ws.root / "state", target_is_directory=True)
        else:
            results.rename(ws.root / "state" / "results")
            results.symlink_to(ws.root / "state" / "results", target_is_directory=True)
        with pytest.raises(ManifestError, match="state folder"):
            ctx.check_result_paths(b)


def test_resolving_paths_together_rechecks_a_shared_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``resolve_together`` answers as ``resolve`` does, path by path, and with ``recheck``
    stats (and lstats) a folder the paths share once for them all, not once a path; a
    folder swapped for a symlink before the next call is still seen."""
    from batchspec.workspace import resolving
    from batchspec.workspace.resolving import FolderResolver

    (tmp_path / "results").mkdir()
    (tmp_path / "manifests").mkdir()
    paths = [
        tmp_path / "manifests" / "a.yaml",
        tmp_path / "results" / "a.jsonl",
        tmp_path / "results" / "a.errors.jsonl",
    ]
    resolver = FolderResolver(recheck=True)
    expected = [p.resolve() for p in paths]
    assert resolver.resolve_together(paths) == expected
    stats: list[str] = []
    real_stat, real_lstat = os.stat, os.lstat

    def stat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        stats.append(str(path))
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    def lstat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        stats.append(str(path))
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(resolving.os, "stat", stat)
    monkeypatch.setattr(resolving.os, "lstat", lstat)
    again = resolver.resolve_together(paths)
    monkeypatch.undo()
    assert again == expected
    assert stats.count(str(tmp_path / "results")) == 2  # its stat and its lstat, once
    (tmp_path / "results").rename(tmp_path / "elsewhere")
    (tmp_path / "results").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    moved = resolver.resolve_together(paths)
    assert moved[1:] == [tmp_path.resolve() / "elsewhere" / p.name for p in paths[1:]]


def test_a_load_tells_a_result_path_is_no_folder_from_the_lstat_that_resolved_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading looks at each result path once (the lstat that resolves it also says it is
    no folder: no stat of its own); a folder there is still refused (the test above)."""
    root = two_resources(tmp_path / "ws")
    (root / "results").mkdir(exist_ok=True)
    (root / "results" / "a.jsonl").write_text("")
    results = str((root / "results").resolve()) + os.sep
    looked: list[str] = []
    real_stat, real_lstat = os.stat, os.lstat

    def stat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).startswith(results):
            looked.append("stat " + str(path)[len(results) :])
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    def lstat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).startswith(results):
            looked.append("lstat " + str(path)[len(results) :])
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "lstat", lstat)
    ws = load_workspace([root])
    monkeypatch.undo()
    assert len(ws.resources) == 3
    for name in ("a.jsonl", "a.errors.jsonl", "b.jsonl"):
        assert looked.count("lstat " + name) == 1 and "stat " + name not in looked, looked


def test_a_result_file_the_run_just_wrote_is_resolved_without_an_lstat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``resolve(path, plain=True)`` (``RunContext.relative`` of a result file the run has
    just renamed into place: no symlink can be there) answers as ``Path.resolve`` without
    the lstat that asks whether the file is a symlink; without ``plain`` it still asks."""
    from batchspec.workspace import resolving
    from batchspec.workspace.resolving import FolderResolver

    (tmp_path / "real").mkdir()
    (tmp_path / "results").symlink_to(tmp_path / "real", target_is_directory=True)
    written = tmp_path / "results" / "a.jsonl"
    written.write_text("")
    resolver = FolderResolver()
    resolver.folder(written.parent)  # the folder resolved once a run, as by earlier paths
    expected = written.resolve()
    lstats: list[str] = []
    real_lstat = os.lstat

    def lstat(path: str, *args: object, **kwargs: object) -> os.stat_result:
        lstats.append(str(path))
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(resolving.os, "lstat", lstat)
    answers = [resolver.resolve(written, plain=True), resolver.resolve(written)]
    monkeypatch.undo()
    assert answers == [expected, expected]
    assert lstats == [str(expected)]  # the second one's only
