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
    standalone,
    write,
)
from trioclone import open_client
from trioclone._zmq import Sockets

ASKERS = 3
ROOT = Path(__file__).resolve().parents[2]


async def test_a_subscriber_on_p1_can_knock_the_relay_out_of_sync(
    ctx: zmq.Context[Any],
) -> None:
    """The stream proxy copies *both* directions to the mirror's capture,
    and ``updates_only`` keeps any message of more than one frame.  A
    subscriber that connects an XSUB (it may send anything) to P+1 and
    sends a five-frame message gets it into the mirror as a stream update:
    a forged sequence (one whose first byte is not 0 or 1, so the XPUB does
    not take the frame for an (un)subscription) is a gap or a reset, and the
    relay stops answering snapshots.  Repeated, the relay never serves."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await standalone(nursery, ctx)
            up = server.server.settings.bind
            await write(up, {"/k": b"v"})
            relay = await relay_of(nursery, ctx, up)
            await relay.serving.wait_value(True)
            with Sockets(ctx) as sockets:
                evil = sockets.open(zmq.XSUB, connect=[relay.bind.publisher])
                await trio.sleep(0.3)  # connected
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
    """``_updates`` takes a batch off ``copies`` and then passes a schedule
    point (``receive_batch``'s fairness checkpoint) before handing it on;
    ``_drain`` (the snapshot task) may run in between and feed the mirror
    the messages *after* that batch: the mirror sees a gap (then the held
    batch as a sequence going back: a reset) and resyncs from upstream,
    refusing snapshots meanwhile.  Nothing was lost on the wire."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await standalone(nursery, ctx)
            up = server.server.settings.bind
            relay = await relay_of(nursery, ctx, up)
            await relay.serving.wait_value(True)
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
            print(dict(stats), dict(relay.stats))
            assert (stats["gaps"], stats["resets"]) == (0, 0), dict(stats)
            nursery.cancel_scope.cancel()


async def test_a_relay_snapshot_is_never_older_than_the_stream_a_client_got(
    ctx: zmq.Context[Any],
) -> None:
    """The docstring's promise: a snapshot never says a sequence older than
    what the relay's clients were already sent.  A client reads a burst's
    last update on the relay's stream, then asks for a snapshot: its
    KTHXBAI must say that sequence at least.  When the mirror lags (a burst
    of more than one batch), ``_updates`` holds the burst's last batch over
    ``receive_batch``'s fairness checkpoint; ``_drain`` then finds ``copies``
    empty and the snapshot starts from the mirror without that batch.  A
    Guide client (no gap check) would never get those updates."""
    with trio.fail_after(GUARD * 2):
        async with trio.open_nursery() as nursery:
            server = await standalone(nursery, ctx)
            up = server.server.settings.bind
            relay = await relay_of(nursery, ctx, up)
            await relay.serving.wait_value(True)
            stale: list[tuple[int, int]] = []
            timeouts = 0
            with Sockets(ctx) as sockets:
                writer = RawClient(sockets, up)
                raw = RawClient(sockets, relay.bind)
                await trio.sleep(0.3)  # both connected

                async def busy() -> None:  # other clients' snapshots load it
                    other = RawClient(sockets, relay.bind)
                    while True:
                        with trio.move_on_after(1.0):
                            await other.snapshot()

                busy_scope = trio.CancelScope()

                async def busy_until_done() -> None:
                    with busy_scope:
                        await busy()

                nursery.start_soon(busy_until_done)
                sequence = 0
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
                busy_scope.cancel()
                await trio.sleep(0.05)  # (its socket is closed after it ends)
            print(stale, timeouts, dict(relay.mirror.stats))
            assert not stale, f"snapshots older than the stream sent: {stale}"
            nursery.cancel_scope.cancel()


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
            async with open_client([one.bind, two.bind], timings=FAST_CLIENT) as client:
                await client.wait_synced()
                await trio.sleep(0.5)  # both relays' collectors took us in
                for n in range(20):
                    await client.set(f"/d/{n}", b"%d" % n)
                stats = server.server.core.stats
                with trio.fail_after(5):
                    while stats["duplicates"] < 20:
                        await trio.sleep(0.02)
            assert server.server.core.store.sequence == 20
            assert stats["duplicates"] == 20
            nursery.cancel_scope.cancel()
