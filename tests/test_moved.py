"""`metadata.moved: {from: old-name}`: renaming a resource keeps its state and resubmits nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from workspaces import (
    ResourceSpec,
    Workspace,
    local_provider,
    make_workspace,
    run_cli,
    write_manifest,
)

from batchspec.core.moves import apply_moves, former_names
from batchspec.errors import ManifestError, StateError
from batchspec.state.runinfo import collect_run_info
from batchspec.state.store import StateStore
from batchspec.workspace.manifest import InvalidManifestError, load_workspace

FAST = ["--poll-interval", "0.05"]


def local_workspace(root: Path, *names: str, **spec: Any) -> Workspace:
    return make_workspace(
        root,
        providers={"here": local_provider()},
        resources=[ResourceSpec(n, count=3, provider="here", spec=spec) for n in names],
    )


def rename(ws: Workspace, old: str, new: str, *, moved: bool = True, **spec: Any) -> None:
    """Rewrite ``old``'s manifest under the name ``new`` (with ``moved`` unless told not)."""
    path = ws.manifest_path(old)
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["name"] = new
    if moved:
        doc["metadata"]["moved"] = {"from": old}
    doc["spec"].update(spec)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def default_outputs(ws: Workspace, name: str) -> None:
    """Drop the explicit output/errors paths: results go to the name's default path."""
    path = ws.manifest_path(name)
    doc = yaml.safe_load(path.read_text())
    del doc["spec"]["output"], doc["spec"]["errors"]
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def own_results(name: str) -> dict[str, str]:
    """The output and errors paths (from the manifests' folder) of ``name``'s own files."""
    return {"output": f"../results/{name}.jsonl", "errors": f"../results/{name}.errors.jsonl"}


def apply(ws: Workspace, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    code, out, err = run_cli(["apply", str(ws.root), *extra, *FAST], capsys)
    assert code == 0, err
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remote_ids(ws: Workspace) -> list[str | None]:
    with ws.store() as store:
        return [b.remote_id for b in store.batches()]


# ---------------------------------------------------------------------------------------------
# End to end


def test_a_pure_rename_resubmits_nothing_and_keeps_results_and_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """apply as old-name, rename with moved, apply: no new batch, same results, the move in
    history under both names, and the new name owns the old generation."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    before = remote_ids(ws)
    output = ws.output_path("old-name")
    result_sha = sha256(output)
    rename(ws, "old-name", "new-name")

    apply(ws, capsys, "--wait")

    assert remote_ids(ws) == before
    assert sha256(output) == result_sha
    with ws.store() as store:
        assert store.get_resource("old-name") is None
        [gen] = store.generations("new-name")
        [res] = load_workspace([ws.root]).resources
        assert gen.spec_hash == res.spec_hash
        assert gen.spec["name"] == "new-name"
        assert [e.detail for e in store.events(resource="new-name") if e.action == "move"] == [
            {"from": "old-name", "to": "new-name", "generations": 1}
        ]
        assert [e.action for e in store.events(resource="old-name")][-1] == "move"
        assert former_names(store, "new-name") == ["old-name"]
    code, out, _ = run_cli(["history", str(ws.root), "--resource", "new-name"], capsys)
    assert code == 0
    assert "move [new-name]  from=old-name" in out


def test_show_of_the_old_name_points_to_the_new_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After a rename, `show`, `results` and `cancel old-name` say where it went instead of
    'no resource named'."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    rename(ws, "old-name", "new-name")
    apply(ws, capsys, "--wait")
    code, _, err = run_cli(["show", "old-name", str(ws.root)], capsys)
    assert code == 1
    assert "it was renamed to 'new-name'" in err and "batchspec show new-name" in err
    for command in ("results", "cancel"):  # they said only "did you mean ...? known: ..."
        code, _, err = run_cli([command, "old-name", str(ws.root)], capsys)
        assert code == 1
        assert "it was renamed to 'new-name'" in err and f"batchspec {command} new-name" in err


def test_plan_shows_the_move_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A read-only plan shows 'moved from', counts the move as its change (exit 2 with
    --detailed-exitcode, as Terraform counts a `moved` block: apply records a move event),
    and leaves the old name recorded."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    rename(ws, "old-name", "new-name")
    with ws.store() as store:
        serial = store.serial()

    code, out, err = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)

    assert code == 2, err
    assert "moved from old-name; in sync" in out
    assert "Plan: 1 to move." in out
    assert "orphan" not in out
    with ws.store() as store:
        assert store.serial() == serial
        assert store.get_resource("old-name") is not None
        assert store.get_resource("new-name") is None


def test_a_rename_without_moved_is_pointed_out_by_plan_and_apply(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A renamed manifest without `moved` is a new resource (paid again) beside an orphan that
    ran the same input: plan (text and --json) and apply say to add `moved: {from: OLD}`; a
    new resource with another input beside the orphan gets no such hint."""
    ws = local_workspace(tmp_path / "ws", "old-name", "other")
    first = ws.input_path("other").read_text().splitlines()[0]

    def add_line(i: int) -> None:
        with ws.input_path("other").open("a") as f:
            f.write(first.replace("-0", f"-{i}") + "\n")

    add_line(8)  # other's input differs from old-name's
    apply(ws, capsys, "--wait")
    # each to results of its own (over the orphans' results files, apply would refuse)
    rename(ws, "old-name", "new-name", moved=False, **own_results("new-name"))
    rename(ws, "other", "fresh", moved=False, **own_results("fresh"))
    add_line(9)  # fresh: another input than any orphan ran, no hint
    hint = "add `moved: {from: old-name}` under new-name's metadata"

    code, out, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0, err
    assert hint in err and "from: other" not in err
    code, out, _ = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert [w for w in json.loads(out)["warnings"] if "moved:" in w] == [
        next(line for line in err.splitlines() if hint in line).removeprefix("Warning: ")
    ]
    code, out, err = run_cli(["apply", str(ws.root), *FAST], capsys)
    assert code == 0, err
    assert out.index("Plan: 2 to create") < out.index(hint) < out.index("created batch")
    code, _, err = run_cli(["plan", str(ws.root)], capsys)  # new-name is recorded now
    assert "moved:" not in err


def test_a_resource_moved_from_its_old_name_gets_no_rename_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """hello and other share one input; other's manifest is deleted and hello is renamed
    greet with `moved: {from: hello}` and new metadata (a create). greet is a rename already:
    no hint tells it to name other instead (one `moved` per resource)."""
    ws = local_workspace(tmp_path / "ws", "hello", "other")
    ws.input_path("other").write_bytes(ws.input_path("hello").read_bytes())
    apply(ws, capsys, "--wait")
    ws.manifest_path("other").unlink()
    rename(ws, "hello", "greet", metadata={"team": "new"})

    code, out, err = run_cli(["plan", str(ws.root)], capsys)

    assert code == 0, err
    assert "greet: create (moved from hello" in out, out
    assert "moved:" not in err, err


def test_a_new_resource_over_an_orphans_results_is_refused_before_anything_is_submitted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """old-name renamed new-name without `moved`, its output and errors paths kept: its first
    collect would overwrite what old-name wrote (paid for again, too). plan lists it among
    its refusals (exit 1) and apply refuses it before any upload, the orphan's files as they
    were; once old-name is pruned, its files are the user's and new-name may write them."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    output, errors = ws.output_path("old-name"), ws.errors_path("old-name")
    kept = (sha256(output), sha256(errors))
    batches = remote_ids(ws)
    rename(ws, "old-name", "new-name", moved=False)
    said = (
        "new-name's output file results/old-name.jsonl and errors file "
        "results/old-name.errors.jsonl hold what old-name wrote, and old-name's manifest is gone"
    )

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 1, err
    [refusal] = json.loads(out)["refusals"]
    assert refusal.startswith(said) and "`moved: {from: old-name}`" in refusal
    code, _, err = run_cli(["apply", str(ws.root), "--wait", *FAST], capsys)
    assert code == 1
    assert said in err and "batchspec apply --prune --select old-name" in err
    # selected alone, the orphan is out of the plan: its files are not out of reach
    code, _, err = run_cli(["apply", str(ws.root), "--select", "new-name", "--wait"], capsys)
    assert code == 1 and said in err
    assert (sha256(output), sha256(errors)) == kept
    assert remote_ids(ws) == batches
    with ws.store() as store:
        assert store.get_resource("new-name") is None

    apply(ws, capsys, "--prune", "--select", "old-name")
    apply(ws, capsys, "--wait")
    assert len(remote_ids(ws)) == len(batches) + 1
    assert {line["custom_id"] for line in ws.outputs("old-name")} == set(ws.input_ids("old-name"))


def test_an_orphan_pruned_in_the_same_apply_leaves_its_results_to_the_new_resource(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apply --prune` forgets the orphan first: the new resource writing its files is what
    was asked, and is not refused; nor is one whose orphan's file holds other bytes now."""
    ws = local_workspace(tmp_path / "ws", "old-name", "other")
    apply(ws, capsys, "--wait")
    rename(ws, "old-name", "new-name", moved=False)
    apply(ws, capsys, "--prune", "--wait")
    with ws.store() as store:
        assert [r.name for r in store.list_resources()] == ["new-name", "other"]
    ws.output_path("other").write_text("edited by hand\n")  # no longer what other wrote
    ws.errors_path("other").unlink()
    rename(ws, "other", "fresh", moved=False)
    code, _, err = run_cli(["plan", str(ws.root)], capsys)
    assert code == 0, err


def test_a_saved_plan_with_a_move_applies_as_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`plan --out` then `apply FILE`: the plan saw the move, so it is not stale, and the
    move happens without a new batch."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    before = remote_ids(ws)
    rename(ws, "old-name", "new-name")
    saved = tmp_path / "plan.json"
    code, _, err = run_cli(["plan", str(ws.root), "--out", str(saved)], capsys)
    assert code == 0, err

    code, out, err = run_cli(["apply", str(saved), *FAST], capsys)

    assert code == 0, err
    assert "moved from old-name" in out
    assert remote_ids(ws) == before
    with ws.store() as store:
        assert store.get_resource("old-name") is None


def test_a_rename_to_a_default_output_path_restores_the_results_without_resubmitting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With default result paths the file moves with the name: restored from the state store."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    default_outputs(ws, "old-name")
    apply(ws, capsys, "--wait")
    old_output = ws.manifest_path("old-name").parent / "results" / "old-name.jsonl"
    before = remote_ids(ws)
    rename(ws, "old-name", "new-name")

    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert (
        "moved from old-name; output moved from manifests/results/old-name.jsonl, which is "
        "left as it is"
    ) in out
    apply(ws, capsys, "--wait")

    new_output = old_output.parent / "new-name.jsonl"
    assert new_output.read_bytes() == old_output.read_bytes()
    assert remote_ids(ws) == before


def test_a_changed_output_path_restores_there_and_says_where_the_old_file_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`output:` edited to name another file: the plan says the output moved and from where
    (not that it is missing), apply writes it there from the state store without a batch,
    leaves the old file, and records the new place: deleting the new file later is
    "missing", not "moved" again."""
    ws = local_workspace(tmp_path / "ws", "triage")
    apply(ws, capsys, "--wait")
    old_output = ws.output_path("triage")
    before = remote_ids(ws)
    new_output = old_output.with_name("triage-v2.jsonl")
    rename(ws, "triage", "triage", moved=False, output=str(new_output))

    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    recorded = old_output.relative_to(ws.root).as_posix()
    assert f"restore (output moved from {recorded}, which is left as it is)" in out
    apply(ws, capsys)

    assert new_output.read_bytes() == old_output.read_bytes()
    assert remote_ids(ws) == before
    new_output.unlink()
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "restore (output file is missing)" in out


def test_a_batch_in_flight_is_collected_under_the_new_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Submitted as old-name, renamed while in flight: polled and collected, never resent."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys)  # submits and returns: the batch is in flight
    before = remote_ids(ws)
    assert before and all(before)
    rename(ws, "old-name", "new-name")

    apply(ws, capsys, "--wait")

    assert remote_ids(ws) == before
    assert [r["custom_id"] for r in ws.outputs("old-name")] == ws.input_ids("old-name")
    with ws.store() as store:
        [gen] = store.generations("new-name")
        assert gen.status == "complete"


def test_a_rename_after_a_replace_keeps_the_replacement_as_the_current_generation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replaced, then renamed: plan and the first apply act on the replacement (its results
    stay on disk, nothing to restore, exit 0), not on the older generation of the same
    manifest spec, whose results the move wrote back over the replacement's."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    apply(ws, capsys, "--wait", "--replace", "old-name", "--no-reuse", "--yes")
    output = ws.output_path("old-name")
    result_sha = sha256(output)
    with ws.store() as store:
        first, replacement = store.generations("old-name")
    assert first.output_sha256 != result_sha  # each generation has its own batch ids
    rename(ws, "old-name", "new-name")

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)
    assert code == 0, err
    [action] = json.loads(out)["actions"]
    assert (action["action"], action["generation_id"]) == ("none", replacement.id)
    out = apply(ws, capsys)

    assert "restored" not in out
    assert sha256(output) == result_sha
    with ws.store() as store:
        assert store.get_resource("new-name").current_generation_id == replacement.id


def test_replace_in_the_apply_that_moves_a_replaced_resource_makes_a_new_replacement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--replace new-name` in the same run as the move of a replaced resource plans the next
    replacement, not the one recorded under the old name (planned "none": no replace)."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    apply(ws, capsys, "--wait", "--replace", "old-name", "--yes")
    rename(ws, "old-name", "new-name")

    code, out, err = run_cli(["plan", str(ws.root), "--json", "--replace", "new-name"], capsys)

    assert code == 0, err
    [action] = json.loads(out)["actions"]
    assert (action["action"], action["generation_id"]) == ("replace", None)


def test_leaving_moved_in_place_is_harmless(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After the move, further applies with `moved` still there change nothing."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    rename(ws, "old-name", "new-name")
    apply(ws, capsys, "--wait")
    with ws.store() as store:
        moves = len([e for e in store.events() if e.action == "move"])
    code, out, _ = run_cli(["plan", str(ws.root), "--detailed-exitcode"], capsys)
    assert code == 0 and "moved from" not in out
    apply(ws, capsys, "--wait")
    with ws.store() as store:
        assert len([e for e in store.events() if e.action == "move"]) == moves


def test_a_rename_with_a_spec_change_is_a_new_generation_of_the_new_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Renaming while changing the spec moves the history and submits the new spec once."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    rename(ws, "old-name", "new-name", metadata={"team": "support"})

    apply(ws, capsys, "--wait")

    with ws.store() as store:
        gens = store.generations("new-name")
        assert len(gens) == 2
        assert [g.spec["name"] for g in gens] == ["new-name", "new-name"]
        assert store.get_resource("old-name") is None


def test_a_rename_with_a_spec_change_is_planned_with_the_answers_it_keeps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The plan of a rename with a spec change counts the old name's answers the new
    generation keeps, as apply carries them over: nothing to submit, where it said every
    request (consent and budgets asked for spend that apply never made)."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    before = remote_ids(ws)
    rename(ws, "old-name", "new-name", metadata={"team": "support"})

    code, out, err = run_cli(["plan", str(ws.root), "--json"], capsys)

    assert code == 0, err
    [action] = json.loads(out)["actions"]
    assert (action["action"], action["requests"], action["reused"]) == ("create", 0, 3)
    apply(ws, capsys, "--wait")
    assert remote_ids(ws) == before


def test_a_forgotten_old_name_is_not_moved(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Forgetting is deliberate: a move from a forgotten name starts the new name afresh."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    with ws.store() as store:
        store.forget_resource("old-name")
    rename(ws, "old-name", "new-name")
    code, out, _ = run_cli(["plan", str(ws.root)], capsys)
    assert "create (new resource)" in out


# ---------------------------------------------------------------------------------------------
# Refusals


def test_a_move_onto_a_recorded_name_is_refused_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both names recorded (something already runs as new-name): plan and apply fail naming
    both and what to do, and the state is untouched."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    with ws.store() as store:
        store.upsert_resource("new-name", provider="here", manifest="m", labels={}, run_id=None)
        serial = store.serial()
    rename(ws, "old-name", "new-name")
    for command in ("plan", "apply"):
        code, _, err = run_cli([command, str(ws.root)], capsys)
        assert code == 1
        assert "both names are recorded" in err and "batchspec forget old-name" in err
    with ws.store() as store:
        assert store.serial() == serial
        assert store.get_resource("old-name") is not None


def test_a_move_onto_a_forgotten_name_does_not_advise_forgetting_the_old_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """new-name was recorded and forgotten: the move is refused saying so, and does not
    advise `forget old-name`, which would make new-name pay again for every answered request."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    with ws.store() as store:
        store.upsert_resource("new-name", provider="here", manifest="m", labels={}, run_id=None)
        store.forget_resource("new-name")
    rename(ws, "old-name", "new-name")
    for command in ("plan", "apply"):
        code, _, err = run_cli([command, str(ws.root)], capsys)
        assert code == 1
        assert "recorded before and forgotten" in err, err
        assert "keep the history of one of them" not in err
        assert "would send every request again" in err


def test_a_move_with_an_unconfirmed_create_is_refused(tmp_path: Path) -> None:
    """A batch create of the old name not confirmed by the provider blocks the move (its
    adoption key names the old resource), and nothing is renamed."""
    ws = local_workspace(tmp_path / "ws", "old-name")
    [old] = load_workspace([ws.root]).resources
    with ws.store() as store:
        run = store.start_run("apply", {}, collect_run_info(ws.root))
        store.upsert_resource("old-name", provider="here", manifest="m", labels={}, run_id=run)
        gen = store.create_generation(
            "old-name",
            spec_hash=old.spec_hash,
            spec=old.semantic_spec(),
            input_sha256=old.input_sha256,
            requests=3,
            input_bytes=1,
            output_path=None,
            errors_path=None,
            run_id=run,
        )
        batch = store.record_batch_intent(
            gen.id,
            shard=0,
            attempt=1,
            provider="here",
            key="old-name/x/0/1",
            input_sha256=old.input_sha256,
            requests=3,
            reason="test",
        )
        store.update_batch(batch.id, status="creating")
    rename(ws, "old-name", "new-name")
    [new] = load_workspace([ws.root]).resources
    with ws.store() as store, pytest.raises(ManifestError, match="not confirmed by the provider"):
        apply_moves(store, [new], run)
    with ws.store() as store:
        assert store.get_resource("old-name") is not None
        assert store.get_resource("new-name") is None


@pytest.mark.parametrize(
    ("moves", "message"),
    [
        pytest.param({"a": "a"}, "'a' cannot move from its own name", id="itself"),
        pytest.param({"a": "b"}, "'a' moves from 'b', but 'b' is still declared", id="declared"),
        pytest.param({"a": "x", "b": "x"}, "both move from 'x'", id="twice"),
    ],
)
def test_the_loader_refuses_impossible_moves(
    tmp_path: Path, moves: dict[str, str], message: str
) -> None:
    """Moves from the resource's own name, from a live name, or twice from one name."""
    ws = local_workspace(tmp_path / "ws", "a", "b")
    for name, old in moves.items():
        path = ws.manifest_path(name)
        doc = yaml.safe_load(path.read_text())
        doc["metadata"]["moved"] = {"from": old}
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(InvalidManifestError) as caught:
        load_workspace([ws.root])
    [problem] = caught.value.problems
    assert problem.pointer == "/metadata/moved/from"
    assert message in problem.message


def test_moved_is_not_part_of_the_spec_hash(tmp_path: Path) -> None:
    """Adding `moved` (same name) leaves the spec hash as it was; Resource.moved_from is set."""
    ws = local_workspace(tmp_path / "ws", "a")
    [before] = load_workspace([ws.root]).resources
    path = ws.manifest_path("a")
    doc = yaml.safe_load(path.read_text())
    doc["metadata"]["moved"] = {"from": "old-a"}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    [after] = load_workspace([ws.root]).resources
    assert after.moved_from == "old-a" and before.moved_from is None
    assert after.spec_hash == before.spec_hash


# ---------------------------------------------------------------------------------------------
# StateStore.rename_resource


def test_rename_resource_moves_generations_and_keeps_events(tmp_path: Path) -> None:
    """The row and its generations take the new name in one step; events keep the old one;
    a recorded new name is refused."""
    with StateStore.open(tmp_path / "s.db") as store:
        run = store.start_run("apply", {}, collect_run_info(tmp_path))
        store.upsert_resource("a", provider="p", manifest="m", labels={"k": "v"}, run_id=run)
        gen = store.create_generation(
            "a",
            spec_hash="h1",
            spec={"name": "a"},
            input_sha256="i",
            requests=1,
            input_bytes=1,
            output_path=None,
            errors_path=None,
            run_id=run,
        )
        store.set_current_generation("a", gen.id)
        store.record_event(run, "generation", resource="a", generation_id=gen.id)
        store.upsert_resource("c", provider="p", manifest="m", labels={}, run_id=run)

        row = store.rename_resource("a", "b", respecs={gen.id: ("h2", {"name": "b"})})

        assert (row.name, row.labels, row.current_generation_id) == ("b", {"k": "v"}, gen.id)
        assert store.get_resource("a") is None
        [moved] = store.generations("b")
        assert (moved.id, moved.spec_hash, moved.spec) == (gen.id, "h2", {"name": "b"})
        assert [e.action for e in store.events(resource="a")] == ["generation"]
        with pytest.raises(StateError, match="recorded already"):
            store.rename_resource("b", "c")
        assert store.get_resource("b") is not None


def test_a_name_given_back_after_a_move_gets_batches_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """old-name moves to new-name, whose batches keep their keys (old-name/HASH/0/1, as the
    provider's copies carry them); a new resource named old-name with the same input has the
    same spec hash, so the same first key. It gets batches of its own under a key of its
    own, and is collected: it had none (the moved batch's row was taken for its intent) and
    `apply --wait` waited for it without end. (Found by a review.)"""
    ws = local_workspace(tmp_path / "ws", "old-name")
    apply(ws, capsys, "--wait")
    rename(ws, "old-name", "new-name")
    apply(ws, capsys, "--wait")
    ws.manifest_path("old-name").rename(ws.manifest_path("new-name"))
    default_outputs(ws, "new-name")
    doc = yaml.safe_load(ws.manifest_path("new-name").read_text())
    del doc["metadata"]["moved"]  # the move is recorded: the name old-name is free again
    ws.manifest_path("new-name").write_text(yaml.safe_dump(doc, sort_keys=False))
    write_manifest(ws, ResourceSpec("old-name", count=3, provider="here"))

    apply(ws, capsys, "--wait", "--timeout", "30")

    with ws.store() as store:
        [gen] = [g for g in store.generations("old-name")]
        [batch] = store.batches(gen.id)
        [moved] = [b for g in store.generations("new-name") for b in store.batches(g.id)]
    assert batch.key != moved.key and batch.key.startswith("old-name/")
    assert batch.remote_id not in (None, moved.remote_id)
    assert len(ws.outputs("old-name")) == 3
