"""The reconciler: take the next safe step for each resource, recording every step first.

``Reconciler.advance(resource)`` re-plans the resource from fresh state and dispatches to the
step its plan names (``submit``, ``poll``, ``collect``, ``retry``, ``restore``), repeating until
the resource has to wait for the provider (``refresh`` of a running batch), is in sync, or is
stuck. It promises that no spending step runs unless allowed: a replace needs
``allow_replace``, and with a saved plan (``may_spend``) nothing outside it is spent.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from batchspec.core.plan import Action, ActionKind, DesiredResource, RecordedResource, plan_resource
from batchspec.core.reconcile.cancel import ACTIVE, cancel_ahead, record_cancels_sent_ahead
from batchspec.core.reconcile.cancel import cancel as cancel_resource
from batchspec.core.reconcile.collect import collect
from batchspec.core.reconcile.context import (
    DownloadFailure,
    Prefetched,
    ProviderFactory,
    RunContext,
)
from batchspec.core.reconcile.drain import drain_retired, report_still_stopping, retired_batches
from batchspec.core.reconcile.pipeline import submit_pass
from batchspec.core.reconcile.poll import refresh
from batchspec.core.reconcile.prefetch import (
    DEFAULT_PARALLELISM,
    BoundedCalls,
    prefetch_pass,
    report_throttles,
)
from batchspec.core.reconcile.restore import restore
from batchspec.core.reconcile.retry import retry
from batchspec.core.reconcile.submit import create, replace
from batchspec.core.recorded import (
    DEFAULT_REQUEUE_BACKOFF,
    export_paths,
    observe_disk,
    recorded_generation,
)
from batchspec.core.reporting import Progress, Reporter
from batchspec.core.sharding import ShardLimits
from batchspec.errors import ProviderError
from batchspec.providers.base import (
    RetryNotice,
    listen_for_retries,
    reset_deadline,
    reset_retry_listener,
    within,
)
from batchspec.state.connection import CommitGroup
from batchspec.state.store import GenerationRow, ResourceRow, StateStore
from batchspec.wire.inputs import InputReport
from batchspec.workspace.inputcache import InputCache
from batchspec.workspace.manifest import Project, Resource

#: the least time between two notices of calls retried on one provider
RETRY_NOTICE_SECONDS = 2.0

#: what text output says, once, for every resource whose replace waits for --allow-replace
#: (apply's summary names them all, with the hint)
REPLACE_REFUSED = (
    "not replacing resources whose spec changed while a generation is in flight: "
    "the summary below names them."
)

MAX_STEPS_PER_PASS = 12

STEPS: dict[ActionKind, Callable[[RunContext, Resource, InputReport, Action], bool]] = {
    ActionKind.CREATE: create,
    ActionKind.REPLACE: replace,
    ActionKind.REFRESH: refresh,
    ActionKind.COLLECT: collect,
    ActionKind.RETRY: retry,
    ActionKind.RESTORE: restore,
}


@dataclass(frozen=True)
class StepResult:
    action: Action
    waiting: bool  # the resource waits on the provider (in flight) or on consent


class Reconciler:
    def __init__(
        self,
        project: Project,
        store: StateStore,
        run_id: int,
        provider_for: ProviderFactory,
        report: Reporter,
        *,
        allow_replace: bool = False,
        limits_for: Callable[[Resource], ShardLimits] | None = None,
        max_in_flight: Callable[[str], int | None] = lambda provider: None,
        requeue_backoff: float = DEFAULT_REQUEUE_BACKOFF,
        clock: Callable[[], float] = time.time,
        may_spend: Callable[[Action], bool] | None = None,
        still_holds_lock: Callable[[], None] = lambda: None,
        may_touch: Callable[[str], bool] = lambda resource: True,
        sleep: Callable[[float], None] = time.sleep,
        parallelism: int = DEFAULT_PARALLELISM,
        max_concurrency: Callable[[str], int | None] = lambda provider: None,
        inputs: InputCache | None = None,
        retired_resources: Callable[[], Sequence[str]] = lambda: (),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ctx = RunContext(
            project=project,
            store=store,
            run_id=run_id,
            provider_for=provider_for,
            report=report,
            limits_for=limits_for or (lambda res: ShardLimits()),
            max_in_flight=max_in_flight,
            requeue_backoff=requeue_backoff,
            clock=clock,
            still_holds_lock=still_holds_lock,
            may_touch=may_touch,
            sleep=sleep,
            inputs=inputs,
            monotonic=monotonic,
        )
        self.allow_replace = allow_replace
        # provider reads of a pass run ahead in this many threads (maxConcurrency: per provider)
        self.parallelism = parallelism
        self.max_concurrency = max_concurrency
        # when (``time.monotonic``) ``apply --wait --timeout`` ends: the calls of a pass give
        # up then (``DeadlineReached``), not after their own timeouts and retries
        self.deadline: float | None = None
        # a saved plan (batchspec.core.planfile) limits spending to what it shows; None: no limit
        self.may_spend = may_spend
        # resources pruned from the workspace whose retired generations each pass drains
        self.retired_resources = retired_resources
        # the skips said this run: an `apply --wait` passes over a skipped resource at each
        # poll, and says why once
        self._skips_said: set[tuple[str, str]] = set()
        # when a retry was last said per provider, and its number (``_say_retry``)
        self._retries_said: dict[str, tuple[float, int]] = {}
        self._retry_lock = threading.Lock()

    @property
    def store(self) -> StateStore:
        return self.ctx.store

    @property
    def run_id(self) -> int:
        return self.ctx.run_id

    @property
    def report(self) -> Reporter:
        return self.ctx.report

    @property
    def requeue_backoff(self) -> float:
        return self.ctx.requeue_backoff

    # -----------------------------------------------------------------------------------------
    # planning from fresh state

    def plan_one(self, res: Resource, facts: InputReport) -> Action:
        return self._plan(res, facts, self.store.get_resource(res.name))

    def _plan(self, res: Resource, facts: InputReport, row: ResourceRow | None) -> Action:
        """``plan_one`` given ``res``'s resource row as it is now (None: not recorded)."""
        desired = desired_resource(res, facts)
        recorded = self._recorded(res.name, row)
        disk = observe_disk(
            [(res.name, res.output_path, res.errors_path)],
            {res.name: recorded} if recorded else {},
            export_paths([res]),
            self.ctx.disk_hashes,
        )
        return plan_resource(desired, recorded, disk.get(res.name), self.ctx.clock())

    def _recorded(self, name: str, row: ResourceRow | None) -> RecordedResource | None:
        if row is None:
            return None
        gens = tuple(
            recorded_generation(
                self.store, self.ctx.ledger, g, requeue_backoff=self.requeue_backoff
            )
            for g in self.store.generations(name)
        )
        return RecordedResource(
            name=name,
            provider=row.provider,
            generations=gens,
            forgotten=row.forgotten_at is not None,
        )

    # -----------------------------------------------------------------------------------------
    # one pass over many resources

    def advance_all(
        self, resources: Sequence[Resource], facts: Mapping[str, InputReport]
    ) -> list[Resource]:
        """One pass: fetch what the pass will read from providers ahead and side by side, then
        advance each resource in order on this thread; return those still waiting.

        The batches of retired generations (superseded, cancelled, pruned) are polled and
        fetched with the others and recorded first (``drain``), so that a generation this
        pass records keeps the answers they finished. A resource whose download fails is
        left to a later pass or apply (``collect``); the others go on."""
        self.ctx.done_in = None
        self.ctx.new_pass()
        with self._pool() as calls:  # a replace step sends its cancels ahead through it too
            try:
                return self._pass(resources, facts, calls)
            except ProviderError:
                report_throttles(self.ctx, calls)  # a pass a 429 stopped says so, first
                raise

    def _pass(
        self,
        resources: Sequence[Resource],
        facts: Mapping[str, InputReport],
        calls: BoundedCalls,
    ) -> list[Resource]:
        """``advance_all``'s pass, in its pool."""
        retired = retired_batches(self.ctx, resources, self.retired_resources())
        prefetch_pass(self.ctx, resources, calls, [r.batch for r in retired])
        drain_retired(self.ctx, retired)
        submitted = submit_pass(
            self.ctx, resources, facts, calls, spending_action=self._spending_action
        )
        # what the submitted resources wait on, read (no write) in a few queries in all
        with self.store.reading():
            submitted_waiting = {
                res.name
                for res in resources
                if res.name in submitted
                and self.plan_one(res, facts[res.name]).kind is not ActionKind.NONE
            }
        waiting = []
        # one commit for the records of many resources' reads (see ``advance``)
        with self.store.commit_group() as group, self._waits_commit(group):
            for res in resources:  # downloads under way are waited for when taken
                if res.name in submitted:  # it waits on its new batches
                    if res.name in submitted_waiting:
                        waiting.append(res)
                elif self._waits(res, self._advance_named(res, facts[res.name], group)):
                    waiting.append(res)
                if group.due:
                    group.flush()
        report_throttles(self.ctx, calls)
        return waiting

    def _advance_named(self, res: Resource, facts: InputReport, group: CommitGroup) -> StepResult:
        """``advance``; a provider's failure that stops the pass names ``res`` (``about``)."""
        try:
            return self.advance(res, facts, group)
        except ProviderError as err:
            err.about(res.name)
            raise

    def _say_skip(self, name: str, message: str, *, said_once: str | None = None) -> None:
        if (name, message) not in self._skips_said:
            self._skips_said.add((name, message))
            self.report(Progress("skip", name, message, said_once=said_once))

    def _waits(self, res: Resource, step: StepResult) -> bool:
        """Whether ``res`` keeps an ``apply --wait`` waiting: a resource left to collect only
        because a download failed does not (a later pass still tries it, while others wait);
        one with other batches (shards) still in flight does, until they have ended and been
        collected."""
        if (
            step.action.kind is ActionKind.COLLECT
            and step.action.in_flight == 0
            and any(f.resource == res.name for f in self.ctx.download_failures.values())
        ):
            return False
        return step.waiting

    def not_collected(self) -> tuple[DownloadFailure, ...]:
        """The current generations' batches whose files this run could not download (in the
        order the failures were first seen); the next apply collects them."""
        return tuple(self.ctx.download_failures.values())

    def report_retired_stopping(self, resources: Sequence[Resource]) -> None:
        """At the end of a run: the retired batches still stopping, which a later apply
        drains (``drain.report_still_stopping``)."""
        retired = retired_batches(self.ctx, resources, self.retired_resources())
        report_still_stopping(self.ctx, retired)

    def seconds_since_create(self) -> float | None:
        """How long ago (on the ``monotonic`` clock) the run's last create was answered;
        None when it created nothing yet."""
        created = self.ctx.last_create_at
        return None if created is None else self.ctx.monotonic() - created

    def expected_done_in(self) -> float | None:
        """Seconds until the soonest batch polled in the last pass should finish, at the
        pace its request counts moved since it was last seen; None when none can tell."""
        return self.ctx.done_in

    @contextmanager
    def _pool(self) -> Iterator[BoundedCalls]:
        """The bounded pool of provider calls of a pass (or of a run's cancels), open in
        ``ctx.calls`` while the block runs. If the block fails, the pool is closed first (no
        call still runs), then the cancels it had answered are recorded before the error
        goes on (``record_cancels_sent_ahead``)."""
        heard = listen_for_retries(self._say_retry)  # the steps' own calls, on this thread
        bound = within(self.deadline)  # theirs too
        try:
            with (
                BoundedCalls(
                    self.parallelism,
                    self.max_concurrency,
                    on_retry=self._say_retry,
                    deadline=self.deadline,
                ) as calls,
                calls.admitting(self._may_wait_for_a_place),
            ):
                self.ctx.calls = calls
                self.ctx.prefetched = Prefetched()
                yield calls
        except Exception as err:
            record_cancels_sent_ahead(self.ctx, err)
            raise
        finally:
            self.ctx.prefetched = Prefetched()
            self.ctx.calls = None
            reset_deadline(bound)
            reset_retry_listener(heard)

    def _say_retry(self, notice: RetryNotice) -> None:
        """A ``warning`` event for a call about to be retried (a provider down kept a run
        silent through all its backoff). Within ``RETRY_NOTICE_SECONDS`` of the last one on
        the same provider, only a later retry than it said is said: each retry of one call
        is a line, while the many calls of a pass meeting one outage together are one."""
        now = self.ctx.monotonic()
        with self._retry_lock:
            last = self._retries_said.get(notice.provider)
            recent = last is not None and now - last[0] < RETRY_NOTICE_SECONDS
            if recent and last is not None and notice.retry <= last[1]:
                return
            self._retries_said[notice.provider] = (now, notice.retry)
        data = {
            "source": "provider",
            "provider": notice.provider,
            "base_url": notice.base_url,
            "operation": notice.operation,
            "retry": notice.retry,
            "retries": notice.retries,
            "delay_seconds": round(notice.delay, 3),
        }
        self.report(Progress("warning", None, notice.text, data))

    def _may_wait_for_a_place(self) -> bool:
        """Whether a request the main thread sends may wait for a place among a provider's
        calls in flight: not inside a step's transaction (the state's writer lock would be
        held through other calls' downloads, and another runner waits on it); a commit
        group's transaction, open on its own, is committed first, as before any wait."""
        store = self.ctx.store
        if store.in_transaction and not store.in_atomic_block:
            self.ctx.before_wait()  # the commit group's (a step's ``atomic`` is not touched)
        return not store.in_transaction

    @contextmanager
    def _waits_commit(self, group: CommitGroup) -> Iterator[None]:
        """While the block runs, a step about to wait on a provider commits the group first."""
        self.ctx.before_wait = group.flush
        try:
            yield
        finally:
            self.ctx.before_wait = lambda: None

    def _spending_action(self, res: Resource, facts: InputReport) -> Action | None:
        """``res``'s planned action if it spends and this run may take it now, else None
        (the serial step then says why not, or does what else the plan says)."""
        action = self._plan(res, facts, self._track_again_if_forgotten(res))
        if not action.spends:
            return None
        if action.kind is ActionKind.REPLACE and not self.allow_replace:
            return None
        if self.may_spend is not None and not self.may_spend(action):
            return None
        return action

    # -----------------------------------------------------------------------------------------
    # one pass for one resource

    def advance(
        self, res: Resource, facts: InputReport, group: CommitGroup | None = None
    ) -> StepResult:
        """Act on ``res`` until it must wait, is in sync, or is stuck.

        With a ``group`` (one pass over many resources), the steps that only record what they
        read (poll, collect, restore) join its transaction; the group is committed before a
        step that spends or cancels, so that step's intents are committed before its calls
        are sent, as without a group, and before a step waits on a provider (a poll or a
        download not fetched ahead, or still running: ``RunContext.before_wait``), so the
        writer lock is never held while waiting on the network.
        """
        if group is not None:
            group.join()
        else:  # on its own, not in a pass: its folders are resolved anew
            self.ctx.new_pass()
        action = self._plan(res, facts, self._track_again_if_forgotten(res))
        polled = False  # a refresh step ran in this pass
        for _ in range(MAX_STEPS_PER_PASS):
            kind = action.kind
            if kind is ActionKind.NONE:
                return StepResult(action, waiting=False)
            if kind is ActionKind.REPLACE and not self.allow_replace:
                message = f"not replacing: {action.reason}; re-run with --allow-replace"
                self._say_skip(res.name, message, said_once=REPLACE_REFUSED)
                return StepResult(action, waiting=False)
            if action.spends and self.may_spend is not None and not self.may_spend(action):
                message = (
                    f"not in the saved plan: {kind.value} ({action.reason}); "
                    "run `batchspec plan` again to review it"
                )
                self._say_skip(res.name, message)
                return StepResult(action, waiting=False)
            if group is not None:
                if action.spends:  # create, replace (cancels first), retry
                    group.flush()
                else:
                    group.join()
            progressed = STEPS[kind](self.ctx, res, facts, action)
            polled = polled or kind is ActionKind.REFRESH
            following = self.plan_one(res, facts)
            if kind is ActionKind.COLLECT and following.in_flight > 0 and not polled:
                # a collect planned before any poll (a batch recorded ended, not collected,
                # when the pass began: a download that failed, a run killed): the batches
                # still in flight are polled now, done or not, or a download that keeps
                # failing would keep the resource's other shards from being seen to end
                why = f"{following.in_flight} batch(es) in flight"
                action = dataclasses.replace(following, kind=ActionKind.REFRESH, reason=why)
                continue
            if not progressed or (
                following.kind is ActionKind.REFRESH
                # after a collect, a refresh that is no poll (a requeued retry's wait) is
                # planned on; one of batches still in flight waits: they were polled in this
                # pass (above)
                and (kind is not ActionKind.COLLECT or following.in_flight > 0)
            ):
                return StepResult(following, waiting=True)
            action = following
        return StepResult(action, waiting=True)

    def _track_again_if_forgotten(self, res: Resource) -> ResourceRow | None:
        """A forgotten resource whose manifest is still here is tracked again by apply; its
        recorded generations are reused, so nothing is submitted twice. Returns its row as
        it is now (None: not recorded), which the plan that follows reads no more."""
        row = self.store.get_resource(res.name)
        if row is None or row.forgotten_at is None:
            return row
        with self.store.atomic():
            row = self.ctx.upsert_resource(res)
            self.store.record_event(self.run_id, "track", resource=res.name, detail={})
        self.report(Progress("track", res.name, "tracked again (it was forgotten)"))
        return row

    # -----------------------------------------------------------------------------------------
    # cancel

    def cancel(self, name: str, *, reason: str = "cancelled by a user", quiet: bool = False) -> int:
        """Cancel the in-flight batches of a resource's active generations; return how many
        (``quiet``: with no ``cancel`` line; the caller reports what it did)."""
        with self.cancels_ahead([name]):
            return cancel_resource(self.ctx, name, reason=reason, quiet=quiet)

    @contextmanager
    def cancels_ahead(self, names: Sequence[str]) -> Iterator[None]:
        """While the block cancels the active generations of ``names`` one after the other,
        their remote cancels run side by side in a bounded pool (``cancel.cancel_ahead``);
        the block must cancel exactly those, each cancel sent ahead being taken by its step.
        Inside an open pool (nested), the cancels join it."""
        if self.ctx.calls is not None:
            cancel_ahead(self.ctx, self._active_generations(names))
            yield
            return
        with self._pool():
            cancel_ahead(self.ctx, self._active_generations(names))
            yield

    def _active_generations(self, names: Sequence[str]) -> list[tuple[str, GenerationRow]]:
        return [
            (name, gen)
            for name in names
            for gen in self.store.generations(name)
            if gen.status in ACTIVE
        ]


# ---------------------------------------------------------------------------------------------


def desired_resource(res: Resource, facts: InputReport) -> DesiredResource:
    return DesiredResource(
        name=res.name,
        provider=res.provider,
        spec_hash=res.spec_hash,
        requests=facts.requests,
        input_bytes=facts.bytes,
        max_attempts=res.retry.max_attempts,
        suspend=res.suspend,
    )
