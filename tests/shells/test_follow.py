"""The connections of a replica (trioclone._follow), over inproc."""

from __future__ import annotations

import trio
import zmq

from tests.chp import settle, unique
from trioclone._follow import Follower
from trioclone._zmq import Sockets
from trioclone.core.chp import ICANHAZ
from trioclone.endpoints import Endpoints


async def test_a_request_for_the_new_connection_never_leaves_on_the_old_one(
    context, autojump_clock
):
    """A failover: the old connection's task may still be winding down when
    the new one's ICANHAZ is queued.  Each connection has its own queue, so
    the old DEALER never takes it (the new server would wait out a timeout)."""
    with trio.fail_after(10), Sockets(context) as sockets:
        servers = [Endpoints.inproc(unique("follow")) for _ in range(2)]
        routers = [sockets.open(zmq.ROUTER, bind=[s.snapshot]) for s in servers]
        for server in servers:
            sockets.open(zmq.PUB, bind=[server.publisher])
        follower = Follower(sockets, servers, [b""])
        batches: list[tuple[bool, list[list[bytes]]]] = []

        async def handle(is_reply: bool, batch: list[list[bytes]]) -> None:
            batches.append((is_reply, batch))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.run, handle)
            follower.connect(0)
            follower.request(b"/first/")
            await settle()
            old, *request = await routers[0].receive()
            assert request == [ICANHAZ, b"/first/"]
            # Both in one step, with no schedule point: the old connection's
            # task is still alive when the request is queued.
            follower.connect(1)
            follower.request(b"/second/")
            await settle()
            new, *request = await routers[1].receive()
            assert request == [ICANHAZ, b"/second/"]
            assert routers[0].receive_nowait(10) == []
            # Only the new server's replies are handed on.
            routers[0].try_send([old, b"from the old server"])
            routers[1].try_send([new, b"from the new server"])
            await settle()
            nursery.cancel_scope.cancel()
        assert batches == [(True, [[b"from the new server"]])]


async def test_each_connection_can_carry_a_fresh_routing_id(context, autojump_clock):
    """The passive's DEALER says who it is (its requests are not votes)."""
    with trio.fail_after(10), Sockets(context) as sockets:
        server = Endpoints.inproc(unique("follow"))
        router = sockets.open(zmq.ROUTER, bind=[server.snapshot])
        sockets.open(zmq.PUB, bind=[server.publisher])
        ids = iter([b"peer:1", b"peer:2"])
        follower = Follower(sockets, [server], [b""], identity=lambda: next(ids))

        async def handle(is_reply: bool, batch: list[list[bytes]]) -> None:
            pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follower.run, handle)
            seen = []
            for _ in range(2):
                follower.connect(0)
                follower.request(b"")
                await settle()
                seen.append((await router.receive())[0])
            assert seen == [b"peer:1", b"peer:2"]
            nursery.cancel_scope.cancel()
