"""``trioclone relay`` under attack and churn: forged messages from its
readers, snapshot requests during a flood, reconnects under a busy stream,
and clients that write through two relays.  (Found by an adversarial
review; each test failed before its fix.)

Real clock, bounded waits, as tests/shells/test_relay.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
import zmq

from tests.chp import RawClient
from tests.shells.test_relay import (
    FAST_CLIENT,
    GUARD,
    relay_of,
    relayed,
    standalone,
)
from trioclone import open_client
from trioclone._zmq import Sockets

ASKERS = 3
ROOT = Path(__file__).resolve().parents[2]


async def test_updates_forged_by_a_reader_on_the_stream_port_never_reach_the_mirror(
    ctx: zmq.Context[Any],
) -> None:
    """A reader of P+1 may connect an XSUB and send anything upstream, five
    frames that look like an update included.  The proxy forwards it up
    (the server rejects it); the mirror reads only what the relay publishes,
    so it never sees it: no gap, no reset, never out of sync.  (When the
    mirror read the proxy's copy of both directions, each forged message
    knocked it out of sync.)"""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            _server, _up, relay = await relayed(nursery, ctx, {"/k": b"v"})
            with Sockets(ctx) as sockets:
                evil = sockets.open(zmq.XSUB, connect=[relay.bind.publisher])
                evil.raw.send(b"\x01/evil/")  # connected once the relay has it
                follower = relay._follower
                assert follower is not None
                while b"/evil/" not in follower.topics:
                    await trio.sleep(0.01)
                flips = 0

                async def watch() -> None:
                    nonlocal flips
                    async for value in relay.serving.eventual_values():
                        if value is False:
                            flips += 1

                async with trio.open_nursery() as inner:
                    inner.start_soon(watch)
                    for n in range(10):
                        evil.raw.send_multipart(
                            [
                                b"/forged",
                                (0x4242_4242_4242_4242 + n).to_bytes(8, "big"),
                                b"\x42" * 16,
                                b"",
                                b"x",
                            ]
                        )
                        await trio.sleep(0.1)
                    inner.cancel_scope.cancel()
            stats = relay.mirror.stats
            assert (flips, stats["gaps"], stats["resets"]) == (0, 0, 0), (
                f"a reader forced the relay out of sync {flips} times "
                f"(gaps {stats['gaps']}, resets {stats['resets']})"
            )
            nursery.cancel_scope.cancel()


async def test_snapshot_requests_during_a_flood_do_not_make_the_mirror_resync(
    ctx: zmq.Context[Any],
) -> None:
    """The mirror's stream has one reader: the stream task and a snapshot's
    drain take messages with the same call, and neither holds a batch over
    a schedule point.  (When the stream task held one while a drain fed the
    mirror the messages after it, the mirror saw a gap, then a sequence
    going back, and resynced from upstream, refusing snapshots meanwhile.)"""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            _server, up, relay = await relayed(nursery, ctx)
            done = trio.Event()

            async def writer() -> None:
                async with open_client([up], timings=FAST_CLIENT) as client:
                    await client.wait_synced()
                    for n in range(60_000):
                        client.set_nowait(f"/k/{n % 500}", b"%d" % n)
                        if n % 2000 == 0:
                            await trio.sleep(0)
                    await client.set("/k/last", b"end")
                done.set()

            async def asker() -> None:
                with Sockets(ctx) as sockets:
                    while not done.is_set():
                        raw = RawClient(sockets, relay.bind)
                        with trio.move_on_after(1.0):
                            await raw.snapshot()
                        raw.dealer.close()
                        raw.sub.close()
                        raw.pub.close()

            async with trio.open_nursery() as inner:
                inner.start_soon(writer)
                for _ in range(ASKERS):
                    inner.start_soon(asker)
            stats = relay.mirror.stats
            assert (stats["gaps"], stats["resets"]) == (0, 0), dict(stats)
            nursery.cancel_scope.cancel()


async def test_a_relay_snapshot_is_never_older_than_the_stream_a_client_got(
    ctx: zmq.Context[Any],
) -> None:
    """A snapshot never says a sequence older than what the relay's clients
    were already sent (a Guide client, with no gap check, would never get
    the updates in between): a client reads a burst's last update on the
    relay's stream, then asks for a snapshot, while other clients' snapshots
    keep the relay busy; its KTHXBAI must say that sequence at least."""
    with trio.fail_after(GUARD * 2):
        async with trio.open_nursery() as nursery:
            _server, up, relay = await relayed(nursery, ctx)
            stale: list[tuple[int, int]] = []
            timeouts = 0
            with Sockets(ctx) as sockets:
                writer = RawClient(sockets, up)
                raw = RawClient(sockets, relay.bind)
                sequence = await probe(writer, raw)

                async def busy() -> None:  # other clients' snapshots load it
                    other = RawClient(sockets, relay.bind)
                    while True:
                        with trio.move_on_after(1.0):
                            await other.snapshot()

                async with trio.open_nursery() as others:
                    others.start_soon(busy)
                    for burst in range(25):
                        for n in range(700):
                            writer.set(b"/b/%d" % n, b"%d.%d" % (burst, n))
                        sequence += 700
                        with trio.move_on_after(5):
                            while (msg := await raw.next_update()).sequence < sequence:
                                pass
                        sequence = msg.sequence  # (a write lost on the way: go on)
                        await relay.serving.wait_value(True)
                        with trio.move_on_after(2) as slow:
                            _, end = await raw.snapshot()
                        if slow.cancelled_caught:
                            timeouts += 1
                            continue
                        if end.sequence < sequence:
                            stale.append((end.sequence, sequence))
                    others.cancel_scope.cancel()
            assert not stale, f"snapshots older than the stream sent: {stale}"
            assert timeouts <= 5, f"{timeouts} of 25 snapshots never came"
            nursery.cancel_scope.cancel()


async def probe(writer: RawClient, reader: RawClient) -> int:
    """Write a probe until ``reader`` sees it on its stream (the writer's
    and the reader's links are up); its sequence."""
    while True:
        writer.set(b"/probe", b"p")
        with trio.move_on_after(0.2):
            while (msg := await reader.next_update()).key != b"/probe":
                pass
            return msg.sequence


def _child(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_relay_reconnecting_under_a_busy_stream_does_not_abort() -> None:
    """The mirror moves to a new connection (here forced every 0.15 s, as a
    silence timeout does) while a flood streams through the relay and other
    readers ask for snapshots: each connection has an XSUB of its own (libzmq
    aborts the process, fq.cpp's ``!_more``, if a socket's pipe is
    disconnected with a message part still queued and read again later).
    In a child process: an abort would take pytest down with it."""
    done = _child("-m", "tests.shells.relay_churn", "5")
    assert done.returncode == 0, (done.returncode, done.stderr[-600:])
    assert "survived" in done.stdout
    reconnects = int(done.stdout.split("reconnects ")[1].split()[0])
    assert reconnects >= 5, done.stdout


async def test_two_relays_per_group_double_the_writes_the_active_reads(
    ctx: zmq.Context[Any],
) -> None:
    """docs/sizing.md: with two relays listed (``--server`` both), each write
    reaches the active twice (once per relay); the second copy is read,
    checked against the repeat window and dropped: every key is written
    once."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await standalone(nursery, ctx)
            up = server.server.settings.bind
            one = await relay_of(nursery, ctx, up)
            two = await relay_of(nursery, ctx, up)
            await one.serving.wait_value(True)
            await two.serving.wait_value(True)
            stats = server.server.core.stats
            async with open_client([one.bind, two.bind], timings=FAST_CLIENT) as client:
                await client.wait_synced()
                while not stats["duplicates"]:  # both relays' collectors took us in
                    await client.set("/probe", b"p")
                    await trio.sleep(0.05)  # (the second copy may come later)
                written, read_twice = (
                    server.server.core.store.sequence,
                    stats["duplicates"],
                )
                for n in range(20):
                    await client.set(f"/d/{n}", b"%d" % n)
                with trio.fail_after(5):
                    while stats["duplicates"] < read_twice + 20:
                        await trio.sleep(0.02)
            assert server.server.core.store.sequence == written + 20
            assert stats["duplicates"] == read_twice + 20
            nursery.cancel_scope.cancel()
