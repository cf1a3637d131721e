"""``CloneRelay`` against trioclone servers in this process, over loopback TCP.

The relay's proxies run in threads, in real time, so these tests run on
Trio's real clock (under the autojump clock, virtual time would leap past a
heartbeat the proxy is still forwarding) with short timings, each bounded
by ``trio.fail_after``.  TCP, not inproc: a relay must reconnect to a server
that restarted, which libzmq does over TCP only.
"""

from __future__ import annotations

from typing import Any

import trio
import zmq

from tests.chp import RawClient
from tests.integration.procs import free_base_ports
from tests.shells.pair import Running, _run as run_until_killed, start
from trioclone import ClientTimings, open_client
from trioclone._zmq import Sockets
from trioclone.core.bstar import State
from trioclone.core.chp import HUGZ, LINEAGE, SUBTREE_HUGZ, KVMsg, decode_kvmsg
from trioclone.core.replica import Timings
from trioclone.core.status import decode_status_reply, encode_status_request
from trioclone.endpoints import Endpoints
from trioclone.relay import CloneRelay
from trioclone.server.clone import CloneServer
from trioclone.server.settings import PairSettings, ServerSettings

GUARD = 30.0  # real seconds
HOST = "127.0.0.1"
FAST_MIRROR = Timings(
    request_timeout=0.5, silence_timeout=0.6, backoff=0.1, max_backoff=0.5
)
FAST_CLIENT = ClientTimings(
    request_timeout=0.5, silence_timeout=0.6, backoff=0.1, max_backoff=0.5
)


def tcp() -> Endpoints:
    return Endpoints.tcp(HOST, free_base_ports(1)[0])


async def standalone(
    nursery: trio.Nursery, ctx: zmq.Context[Any], bind: Endpoints | None = None
) -> Running:
    settings = ServerSettings(bind=bind or tcp(), hugz_interval=0.1)
    return await start(nursery, settings, ctx)


async def restart(
    nursery: trio.Nursery, ctx: zmq.Context[Any], bind: Endpoints
) -> Running:
    """A new server where one was: libzmq frees a closed TCP listener in
    its I/O thread, a moment later, so the bind is tried again (bounded)."""
    for _ in range(200):
        settings = ServerSettings(bind=bind, hugz_interval=0.1)
        running = Running(CloneServer(settings, context=ctx))
        failed = False
        try:
            await nursery.start(run_until_killed, running)
        except* zmq.ZMQError:
            failed = True
        if not failed:
            return running
        await trio.sleep(0.02)
    raise TimeoutError(f"{bind} stayed in use")


async def relay_of(
    nursery: trio.Nursery, ctx: zmq.Context[Any], *upstreams: Endpoints
) -> CloneRelay:
    relay = CloneRelay(list(upstreams), tcp(), timings=FAST_MIRROR, context=ctx)
    await nursery.start(relay.run)
    return relay


async def relayed(
    nursery: trio.Nursery,
    ctx: zmq.Context[Any],
    items: dict[str, bytes] | None = None,
) -> tuple[Running, Endpoints, CloneRelay]:
    """A standalone server holding ``items``, and a relay of it in sync."""
    server = await standalone(nursery, ctx)
    up = server.server.settings.bind
    if items:
        await write(up, items)
    relay = await relay_of(nursery, ctx, up)
    await relay.serving.wait_value(True)
    return server, up, relay


async def write(server: Endpoints, items: dict[str, bytes]) -> None:
    async with open_client([server], timings=FAST_CLIENT) as client:
        await client.wait_synced()
        for key, value in items.items():
            await client.set(key, value)


async def snapshot(
    raw: RawClient, subtree: bytes = b""
) -> tuple[dict[bytes, KVMsg], KVMsg]:
    entries, end = await raw.snapshot(subtree)
    return {msg.key: msg for msg in entries}, end


async def test_a_client_on_a_relay_reads_the_map_and_writes_through_it(
    ctx: zmq.Context[Any],
) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server, up, relay = await relayed(
                nursery, ctx, {f"/a/{n}": b"v%d" % n for n in range(50)}
            )
            async with open_client([relay.bind], timings=FAST_CLIENT) as client:
                await client.wait_synced()
                assert dict(client.items()) == {
                    f"/a/{n}": b"v%d" % n for n in range(50)
                }
                assert client.sequence == 50
                # a write through the relay is confirmed with the server's sequence
                assert await client.set("/b/1", b"through") == 51
                assert server.server.core.store.get(b"/b/1") is not None
                # and the server's updates reach it on the relay's stream
                await write(up, {"/c/1": b"direct"})
                with trio.fail_after(2):
                    while client.get("/c/1") != b"direct":
                        await trio.sleep(0.01)
                assert client.failovers == 0
            assert relay.status()["sequence"] == 52
            assert relay.status()["synced"] is True
            nursery.cancel_scope.cancel()


async def test_a_guide_style_client_reads_and_writes_through_a_relay(
    ctx: zmq.Context[Any],
) -> None:
    """The Guide's client rules, frame by frame: snapshot, then every update
    on the stream newer than it; writes to the collector at P+2."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            _server, up, relay = await relayed(
                nursery, ctx, {"/a/1": b"one", "/b/1": b"two"}
            )
            with Sockets(ctx) as sockets:
                direct = RawClient(sockets, up)
                raw = RawClient(sockets, relay.bind)
                mine, my_end = await snapshot(raw)
                theirs, their_end = await snapshot(direct)
                assert mine.keys() == theirs.keys() == {b"/a/1", b"/b/1"}
                assert [m.body for m in mine.values()] == [b"one", b"two"]
                assert my_end.sequence == their_end.sequence == 2
                assert my_end.properties[LINEAGE] == their_end.properties[LINEAGE]
                # the relay's HUGZ are the server's own
                hugz = decode_kvmsg(await raw.sub.receive())
                assert (hugz.key, hugz.sequence) == (HUGZ, 2)
                uuid = b""
                while True:  # until the relay's collector took us in
                    uuid = raw.set(b"/a/2", b"guide")
                    with trio.move_on_after(0.3):
                        update = await raw.next_update()
                        break
                assert (update.key, update.body, update.uuid) == (
                    b"/a/2",
                    b"guide",
                    uuid,
                )
                assert update.sequence == 3
                # a subtree snapshot from the relay holds that subtree only
                subtree, end = await snapshot(raw, b"/a/")
                assert set(subtree) == {b"/a/1", b"/a/2"}
                assert (end.key, end.body, end.sequence) == (b"KTHXBAI", b"/a/", 3)
            nursery.cancel_scope.cancel()


async def test_a_relay_out_of_sync_answers_no_snapshot_but_its_status(
    ctx: zmq.Context[Any],
) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            relay = await relay_of(nursery, ctx, tcp())  # nobody listens there
            with Sockets(ctx) as sockets:
                raw = RawClient(sockets, relay.bind)
                with trio.move_on_after(1.0) as waited:
                    await raw.snapshot()
                assert waited.cancelled_caught
                await raw.dealer.send(encode_status_request())
                status = decode_status_reply(await raw.dealer.receive())
            assert status["role"] == "relay"
            assert status["serving"] is False
            assert relay.stats["snapshots_unready"] >= 1
            nursery.cancel_scope.cancel()


async def test_a_malformed_request_is_rejected_and_the_relay_serves_on(
    ctx: zmq.Context[Any],
) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            _server, _up, relay = await relayed(nursery, ctx, {"/k": b"v"})
            with Sockets(ctx) as sockets:
                raw = RawClient(sockets, relay.bind)
                await raw.dealer.send([b"ICANHAZ?"])  # no subtree frame
                await raw.dealer.send([b"WHAT?", b"", b"extra"])
                entries, end = await snapshot(raw)
                assert set(entries) == {b"/k"} and end.sequence == 1
            assert relay.rejections["snapshot"] == 2
            nursery.cancel_scope.cancel()


async def test_relays_chain(ctx: zmq.Context[Any]) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await standalone(nursery, ctx)
            up = server.server.settings.bind
            await write(up, {"/k": b"v"})
            first = await relay_of(nursery, ctx, up)
            second = await relay_of(nursery, ctx, first.bind)
            await second.serving.wait_value(True)
            async with open_client([second.bind], timings=FAST_CLIENT) as client:
                await client.wait_synced()
                assert client.get("/k") == b"v"
                assert await client.set("/k2", b"two hops") == 2
            assert server.server.core.store.get(b"/k2") is not None
            nursery.cancel_scope.cancel()


async def test_ttl_counts_down_on_a_relay_and_its_expiry_is_forwarded(
    ctx: zmq.Context[Any],
) -> None:
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            _server, _up, relay = await relayed(nursery, ctx)
            async with open_client([relay.bind], timings=FAST_CLIENT) as client:
                await client.wait_synced()
                await client.set("/ttl", b"short", ttl=1.0)
                await client.set("/kept", b"long")
            with Sockets(ctx) as sockets:
                raw = RawClient(sockets, relay.bind)
                entries, _ = await snapshot(raw)
                assert 0 < float(entries[b"/ttl"].properties["ttl"]) <= 1.0
                with trio.fail_after(3):
                    while b"/ttl" in relay.mirror.live:
                        await trio.sleep(0.05)
                entries, _ = await snapshot(raw)
                assert set(entries) == {b"/kept"}
            nursery.cancel_scope.cancel()


async def test_a_relay_drops_a_restarted_servers_old_map(
    ctx: zmq.Context[Any],
) -> None:
    """An in-memory server restarted empty is another map (its lineage):
    the relay, and the clients on it, take the new one, never keep the old."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await standalone(nursery, ctx)
            up = server.server.settings.bind
            await write(up, {"/old": b"gone"})
            relay = await relay_of(nursery, ctx, up)
            async with open_client([relay.bind], timings=FAST_CLIENT) as client:
                await client.wait_synced()
                assert client.get("/old") == b"gone"
                server.kill()
                await server.stopped.wait()
                server = await restart(nursery, ctx, up)
                await write(up, {"/new": b"here"})
                with trio.fail_after(5):
                    while client.get("/new") is None or client.get("/old"):
                        await trio.sleep(0.02)
                assert dict(client.items()) == {"/new": b"here"}
            assert relay.mirror.stats["resets"] >= 1
            nursery.cancel_scope.cancel()


async def test_a_relay_follows_its_pair_through_a_failover(
    ctx: zmq.Context[Any],
) -> None:
    """The relay votes like a client: the backup takes over, and every write
    confirmed through the relay, before and after, is in the map."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            primary_at, backup_at = tcp(), tcp()
            states = [f"tcp://{HOST}:{p}" for p in free_base_ports(2, span=1)]

            def side(me: Endpoints, peer: Endpoints, primary: bool) -> ServerSettings:
                mine, theirs = states if primary else states[::-1]
                pair = PairSettings(
                    primary=primary,
                    state_bind=mine,
                    state_peer=theirs,
                    peer=peer,
                    heartbeat=0.1,
                )
                return ServerSettings(bind=me, pair=pair, hugz_interval=0.1)

            primary = await start(nursery, side(primary_at, backup_at, True), ctx)
            backup = await start(nursery, side(backup_at, primary_at, False), ctx)
            await backup.server.synced.wait_value(True)
            relay = await relay_of(nursery, ctx, primary_at, backup_at)
            confirmed: dict[str, bytes] = {}
            async with open_client([relay.bind], timings=FAST_CLIENT) as client:
                await client.wait_synced()
                for n in range(20):
                    await client.set(f"/before/{n}", b"%d" % n)
                    confirmed[f"/before/{n}"] = b"%d" % n
                primary.kill()
                await backup.server.state.wait_value(State.ACTIVE)
                for n in range(20):
                    await client.set(f"/after/{n}", b"%d" % n, timeout=10)
                    confirmed[f"/after/{n}"] = b"%d" % n
                assert relay.status()["upstream"] == str(backup_at)
                assert dict(client.items()) == confirmed
            store = backup.server.core.store
            assert {k for k in confirmed if store.get(k.encode()) is None} == set()
            nursery.cancel_scope.cancel()


async def test_clients_joining_a_relay_under_load_all_end_with_the_servers_map(
    ctx: zmq.Context[Any],
) -> None:
    """Snapshots from the relay while updates stream through it: each client
    that joins mid-stream ends with exactly the server's map."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server, up, relay = await relayed(nursery, ctx)
            done = trio.Event()

            async def writer() -> None:
                async with open_client([up], timings=FAST_CLIENT) as client:
                    await client.wait_synced()
                    for n in range(3000):
                        client.set_nowait(f"/k/{n % 700}", b"%d" % n)
                        if n % 50 == 0:
                            await trio.sleep(0.005)
                    await client.set("/k/last", b"end")
                done.set()

            async with trio.open_nursery() as clients:
                clients.start_soon(writer)
                mirrors = []
                for _ in range(6):
                    await trio.sleep(0.05)
                    mirror = await clients.start(follow, relay.bind, done)
                    mirrors.append(mirror)
            expected = {
                key.decode(): msg.body
                for key in server.server.core.store.keys(b"")
                if (msg := server.server.core.store.get(key)) is not None
            }
            for mirror in mirrors:
                assert mirror == expected
            nursery.cancel_scope.cancel()


async def follow(
    at: Endpoints, done: trio.Event, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Join, report the map to fill in, and fill it once the writer is done
    and the last write has arrived."""
    found: dict[str, bytes] = {}
    async with open_client([at], timings=FAST_CLIENT) as client:
        task_status.started(found)
        await client.wait_synced()
        await done.wait()
        with trio.fail_after(5):
            while client.get("/k/last") != b"end":
                await trio.sleep(0.01)
        found.update(client.items())


async def test_subtree_heartbeats_still_reach_a_relays_clients_after_it_reconnects(
    ctx: zmq.Context[Any],
) -> None:
    """A new upstream connection subscribes to the prefixes the relay's
    clients follow, so the server keeps sending their subtree heartbeats."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server = await standalone(nursery, ctx)
            up = server.server.settings.bind
            await write(up, {"/a/x": b"1"})  # (a prefix at 0 gets none)
            relay = await relay_of(nursery, ctx, up, up)  # one server, twice
            await relay.serving.wait_value(True)
            with Sockets(ctx) as sockets:
                raw = RawClient(sockets, relay.bind, b"/a/")
                follower = relay._follower
                assert follower is not None
                for _ in range(3):
                    before = follower.current
                    relay.mirror.poll(trio.current_time() + 1e9)  # "silence"
                    relay._dispatch()
                    assert follower.current is not before
                    await relay.serving.wait_value(True)
                    while raw.sub.receive_nowait(1000):
                        pass  # heard before the reconnect
                    with trio.fail_after(2):
                        while True:
                            msg = decode_kvmsg(await raw.sub.receive())
                            if msg.key == b"/a/" + SUBTREE_HUGZ:
                                break
                assert b"/a/" in follower.topics
            nursery.cancel_scope.cancel()
