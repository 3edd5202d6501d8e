"""The worker's request slots: at most N requests in flight, a freed slot to the oldest batch.

A plain semaphore wakes its waiters in the order they queued, so the drivers of several
batches take turns and every batch finishes at about the end of all of them. Here a freed slot
goes to the batch created first among those with lines still to send (its driver's
``order``), as a queue serves: batches finish one after another, in the order they were
created, and each one's answers can be collected while the later ones still run. The
upstream's throughput is the same either way.

A slot is given to a driver as credit, not to a waiting call: a driver woken for one slot is
not back in line yet when the next slot frees, and that slot must still be its own, not the
younger batch's that happens to be waiting. A driver leaving (every line sent, or its batch
stopped) gives its unused credit on. A batch that stops while its driver waits for a slot is
let go at once (``BatchControl.stop`` settles the wait with False), not after the older
batches. Everything here runs on the worker's event loop thread.
"""

from __future__ import annotations

import asyncio
import heapq


class Demand:
    """One driver's claim on the slots: its ``order``, the slots given to it and not used
    yet, and its wait for one."""

    __slots__ = ("order", "credit", "waiting", "left")

    def __init__(self, order: int) -> None:
        self.order = order
        self.credit = 0
        self.waiting: asyncio.Future[bool] | None = None
        self.left = False

    def __lt__(self, other: Demand) -> bool:  # the heap's order: the oldest batch first
        return self.order < other.order


class OldestFirstSlots:
    """``count`` slots, each freed one given to the oldest ``Demand`` that has joined."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._demands: list[Demand] = []  # a heap; a demand that left is dropped lazily

    def join(self, order: int) -> Demand:
        """A driver with lines to send (``order``: its batch's place, lowest first)."""
        demand = Demand(order)
        heapq.heappush(self._demands, demand)
        return demand

    def leave(self, demand: Demand) -> None:
        """The driver sends no more lines: its unused slots go to the next oldest."""
        demand.left = True
        credit, demand.credit = demand.credit, 0
        for _ in range(credit):
            self.release()

    def wait(self, demand: Demand) -> asyncio.Future[bool] | None:
        """A slot for ``demand`` now (None: take it), or the future that is set True when
        one is given to it (or False by whoever ends the wait first: ``BatchControl.stop``);
        on True, ``take`` it."""
        if demand.credit > 0:
            demand.credit -= 1
            return None
        if self._free > 0:
            self._free -= 1
            return None
        demand.waiting = asyncio.get_running_loop().create_future()
        return demand.waiting

    def take(self, demand: Demand) -> None:
        """Use the slot the wait of ``demand`` was woken for."""
        demand.waiting = None
        demand.credit -= 1

    def release(self) -> None:
        """A request ended: its slot to the oldest demand still sending, else to the pool."""
        demands = self._demands
        while demands and demands[0].left:
            heapq.heappop(demands)
        if not demands:
            self._free += 1
            return
        oldest = demands[0]
        oldest.credit += 1
        if oldest.waiting is not None and not oldest.waiting.done():
            oldest.waiting.set_result(True)
