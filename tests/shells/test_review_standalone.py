"""Adversarial review: long stretches without a schedule point in a
standalone server (inproc, autojump clock; real time measured per task step)."""

from __future__ import annotations

import time

import trio
import zmq

from tests.chp import settle
from tests.shells.test_standalone import standalone
from trioclone.core.chp import encode_request


class LongestStep(trio.abc.Instrument):
    """The longest time (real seconds) any one task ran without yielding."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._started: float | None = None

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if self._started is not None:
            step = time.perf_counter() - self._started
            self.longest = max(self.longest, step)
        self._started = None


async def test_subtree_snapshot_requests_do_not_stall_the_server(
    context, autojump_clock
):
    """README: "50 clients taking 100,000-key snapshots at once ... HUGZ ...
    arrived at most 20 ms late"; "Long work runs in bounded steps with a
    schedule point between them."  That holds for whole-map requests (one
    cached key list).  A subtree request builds its key list with a scan of
    the whole map, in ``_on_request``, and the snapshot task handles up to
    64 requests per batch with no schedule point: 50 clients of 50
    subtrees of a 100,000-key map stall every task of the server (HUGZ,
    Binary Star heartbeat, collector) for 50 full scans."""
    async with standalone(context) as served:
        store = served.server.core.store
        for n in range(100_000):
            store.put(b"/k/%06d" % n, store.next_sequence(), b"", b"", b"v", None, 0)
        dealers = [
            served.sockets.open(zmq.DEALER, connect=[served.endpoints.snapshot])
            for _ in range(50)
        ]
        await settle()
        longest = LongestStep()
        trio.lowlevel.add_instrument(longest)
        try:
            for n, dealer in enumerate(dealers):
                assert dealer.try_send(encode_request(b"/sub/%02d/" % n))
            for dealer in dealers:
                await dealer.receive()  # each KTHXBAI (no key under its subtree)
        finally:
            trio.lowlevel.remove_instrument(longest)
        assert longest.longest < 0.1, f"one task step ran {longest.longest:.3f} s"
