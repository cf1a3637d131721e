"""Nothing is logged per update above DEBUG.

A pair runs in this process (inproc, autojump clock).  Writes go to both
servers (the active's collector and publisher, the passive's pending list
and mirror), some with a TTL that expires, and whole-map snapshots are
served.  The records at INFO and above must not grow with the number of
writes: a run with ten times the writes logs no more of them.
"""

from __future__ import annotations

import logging

import pytest
import trio

from tests.chp import RawClient, settle
from tests.shells.pair import started_pair
from trioclone._zmq import Sockets

BATCH = 100  # writes sent before their updates are read (under the PUB's HWM)


async def traffic(context: object, writes: int) -> None:
    """``writes`` writes through a fresh pair, a tenth of them expiring,
    and a whole-map snapshot after each tenth."""
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            (p, b), primary, backup, _ = await started_pair(nursery, context)  # type: ignore[arg-type]
            with Sockets(context) as sockets:  # type: ignore[arg-type]
                client = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))
                await settle()
                for start in range(0, writes, BATCH):
                    for i in range(start, start + BATCH):
                        ttl = 1.0 if i % 10 == 0 else None
                        client.set(b"/log/%d" % i, b"v%d" % i, ttl=ttl)
                    await client.updates(BATCH)
                    if start % (writes // 10) == 0:
                        await client.snapshot()
                await trio.sleep(3)  # the TTLs expire
                await settle()
                expired = writes // 10  # each TTL delete takes a sequence too
                assert backup.server.core.store.sequence == writes + expired
                assert primary.server.core.stats["rejected"] == 0
            nursery.cancel_scope.cancel()


def loud(records: list[logging.LogRecord]) -> list[str]:
    return [
        f"{r.levelname} {r.getMessage()}"
        for r in records
        if r.levelno >= logging.INFO and r.name.startswith("trioclone")
    ]


async def test_records_at_info_and_above_do_not_grow_with_the_writes(
    context: object, autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "trioclone")
    await traffic(context, 200)
    few = loud(caplog.records)
    caplog.clear()
    await traffic(context, 2000)
    many = loud(caplog.records)
    assert len(many) <= len(few) + 2, "\n".join(many)
    assert len(many) < 30, "\n".join(many)  # lifecycle and role changes only
