"""Adversarial review: a Binary Star pair over inproc, autojump clock."""

from __future__ import annotations

import trio

from tests.chp import RawClient, settle
from tests.shells.pair import Relay, pair_settings, start
from trioclone._zmq import Sockets
from trioclone.core.bstar import State


async def test_the_passives_own_resync_is_not_a_vote_for_an_empty_restarted_primary(
    context, autojump_clock
):
    """The passive's replica asks its peer for snapshots on the peer's
    snapshot socket, and every ICANHAZ there is a Binary Star vote.  The
    primary restarts (empty) while the heartbeat link is down: no client
    votes for anyone, yet the backup's own resync, retried until answered,
    makes the empty primary ACTIVE (peer expired + "a client request"), and
    the backup, still PASSIVE, throws the map away for the primary's empty
    one.  No dual actives, no error: the whole map is gone."""
    with trio.fail_after(120), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            p, b = pair_settings(relayed=True)
            relays = [Relay.between(nursery, sockets, side) for side in (p, b)]
            primary = await start(nursery, p, context)
            backup = await start(nursery, b, context)
            await backup.server.synced.wait_value(True)
            writer = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))
            await settle()
            for i in range(5):
                writer.set(b"/map/%d" % i, b"v")
            await writer.updates(5)
            await settle()
            assert len(backup.server.core.store) == 5
            for relay in relays:  # the heartbeat link goes down
                relay.cut = True
            primary.kill()
            primary = await start(nursery, p, context)  # back at once, empty
            await trio.sleep(30)  # no client votes at all
            assert backup.server.core.bstar.state is State.PASSIVE
            assert len(backup.server.core.store) == 5, "the passive dropped the map"
            assert primary.server.state.value is not State.ACTIVE or len(
                primary.server.core.store
            ), "the empty primary was voted ACTIVE by its passive peer"
            nursery.cancel_scope.cancel()
