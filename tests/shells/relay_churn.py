"""Run by test_relay_attacks.py in a child process (a libzmq assertion
aborts the whole process): a relay whose mirror moves to a new connection
every 0.15 s (forced, as a silence timeout does: its two upstreams are one
server) while a flood streams through it and other readers ask for
snapshots.  Prints "reconnects N" and "survived"."""

from __future__ import annotations

import os
import sys

import trio
import zmq

from tests.chp import RawClient
from tests.shells.test_relay import relay_of, standalone
from trioclone._zmq import Sockets


async def main(seconds: float) -> None:
    ctx: zmq.Context = zmq.Context()
    async with trio.open_nursery() as nursery:
        server = await standalone(nursery, ctx)
        up = server.server.settings.bind
        relay = await relay_of(nursery, ctx, up, up)
        await relay.serving.wait_value(True)
        with Sockets(ctx) as sockets:
            writer = RawClient(sockets, up)
            await trio.sleep(0.3)

            async def flood() -> None:
                n = 0
                while True:
                    for _ in range(500):
                        writer.set(b"/f/%d" % (n % 20000), b"x" * 50)
                        n += 1
                    await trio.sleep(0)

            connections = 0

            async def reconnect() -> None:
                nonlocal connections
                while True:
                    await trio.sleep(0.15)
                    follower = relay._follower
                    assert follower is not None
                    before = follower.current
                    relay.mirror.poll(trio.current_time() + 1e9)  # "silence"
                    relay._dispatch()
                    connections += follower.current is not before

            async def ask() -> None:  # other readers' snapshots keep it busy
                raw = RawClient(sockets, relay.bind)
                while True:
                    with trio.move_on_after(1.0):
                        await raw.snapshot()

            async with trio.open_nursery() as inner:
                inner.start_soon(flood)
                inner.start_soon(reconnect)
                for _ in range(4):
                    inner.start_soon(ask)
                await trio.sleep(seconds)
                inner.cancel_scope.cancel()
        print("reconnects", connections, flush=True)
        print("survived", flush=True)
        # Out at once: libzmq may also abort while a flood is torn down
        # (libzmq#3442, a server alone does too), which is not the finding.
        os._exit(0)


if __name__ == "__main__":
    trio.run(main, float(sys.argv[1]))
