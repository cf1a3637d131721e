"""Adversarial review: the Trio client against a fake of the Guide's server
(``tests/shells/test_reference_server.py``), which republishes any key."""

from __future__ import annotations

import trio

from tests.chp import RawClient, settle, unique
from tests.shells.test_reference_server import GUARD, ReferenceServer, settle_links
from trioclone import open_client
from trioclone._zmq import Sockets
from trioclone.endpoints import Endpoints


async def test_a_subtree_heartbeat_with_a_strange_last_does_not_kill_the_client(
    context, autojump_clock
):
    """A Guide server republishes whatever a client writes, including a key
    that looks like a subtree heartbeat.  ``integer_property`` accepts any
    ``str.isdigit()`` text, which includes "²" (and digit strings longer
    than Python's int() limit), then ``int()`` raises ValueError, which no
    handler catches (only RemoteProtocolError is): the agent dies and takes
    every subtree client of /a/ down with it."""
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            ref = ReferenceServer(sockets, Endpoints.inproc(unique("reference")))
            ref.preload(b"/a/1", b"one")
            nursery.start_soon(ref.run)
            raw = RawClient(sockets, ref.endpoints)
            async with open_client([ref.endpoints], "/a/", context=context) as clone:
                await clone.wait_synced()
                await settle_links()
                raw.set(b"/a/\x00HUGZ", b"", properties={"last": "\u00b2"})
                await settle()
                await trio.sleep(2)
                assert clone.phase == "active"
                assert clone.get("/a/1") == b"one"
            nursery.cancel_scope.cancel()
