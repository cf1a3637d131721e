"""A Binary Star pair in one process over inproc://, with the autojump clock.

"Killing" a server is cancelling its scope: its sockets close, as when a
process dies.  Times asserted are exact virtual times.
"""

import logging
import math

import trio
import zmq

from tests.chp import RawClient, settle
from tests.shells.pair import Relay, pair_settings, start, started_pair
from tests.shells.steps import WorkPerStep
from trioclone._zmq import Sockets
from trioclone.core.applied import Applied
from trioclone.core.bstar import DUAL_ACTIVES, State
from trioclone.core.chp import decode_kvmsg, encode_request
from trioclone.core.server import HISTORY_BATCH


async def vote_until_answered(sockets, endpoints, interval=1.0):
    """ICANHAZ every ``interval`` (like a client failing over) until a reply."""
    client = RawClient(sockets, endpoints)
    await settle()
    while True:
        with trio.move_on_after(interval):
            return client, await client.snapshot()
        client.dealer.close()
        client = RawClient(sockets, endpoints)


async def write_map(sockets, p, b, count=5):
    """``count`` keys written to the pair through a raw client, published."""
    writer = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))
    await settle()
    for i in range(count):
        writer.set(b"/map/%d" % i, b"v")
    await writer.updates(count)


async def test_pair_starts_primary_active_backup_passive_and_mirrors(
    context, autojump_clock
):
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            (p, b), primary, backup, _ = await started_pair(nursery, context)
            # The first heartbeats go out before the links are up (slow joiner).
            assert trio.current_time() <= 1.0
            assert backup.server.state.value == State.PASSIVE
            # One lineage; the primary's map is no longer "fresh" once its
            # peer copied it (it asked for the window), and the backup's
            # requests were no votes.
            await settle()
            primary_core, backup_core = primary.server.core, backup.server.core
            assert backup_core.lineage == primary_core.lineage is not None
            assert not primary_core.fresh and not backup_core.fresh
            assert primary_core.bstar.faults == {}
            with Sockets(context) as sockets:
                client = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))
                await settle()
                uuids = [client.set(b"/k/%d" % i, b"v%d" % i) for i in range(10)]
                updates = await client.updates(10)
                assert [u.uuid for u in updates] == uuids
                await settle()
                mirror = backup.server.core
                assert mirror.store.sequence == 10
                assert mirror.store.get(b"/k/9").body == b"v9"
                assert len(mirror.pending) == 0  # every client copy matched
            nursery.cancel_scope.cancel()


async def test_failover_needs_peer_silence_and_a_vote(context, autojump_clock):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (_p, b), primary, backup, _ = await started_pair(nursery, context)
            await trio.sleep_until(math.floor(trio.current_time()) + 0.5)
            killed = trio.current_time()
            primary.kill()
            expiry = backup.server.core.bstar.peer_expiry
            # Heartbeats go out on whole seconds: last heard at floor(killed).
            assert expiry == math.floor(killed) + 2.0
            with Sockets(context) as sockets:
                client = RawClient(sockets, b.bind)
                await trio.sleep_until(expiry - 0.001)
                await client.dealer.send(encode_request(b""))
                with trio.move_on_after(10):  # a rejected vote is never answered
                    await client.dealer.receive()
                    raise AssertionError("passive answered while its peer was alive")
                assert backup.server.state.value == State.PASSIVE
                # Silence alone does not make it active: only a vote does.
                client2 = RawClient(sockets, b.bind)
                await settle()
                _entries, _end = await client2.snapshot()
                assert backup.server.state.value == State.ACTIVE
                assert trio.current_time() == expiry - 0.001 + 10
            nursery.cancel_scope.cancel()


async def test_takeover_publishes_pending_and_keeps_published(context, autojump_clock):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (p, b), primary, backup, _ = await started_pair(nursery, context)
            with Sockets(context) as sockets:
                writer = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))
                watcher = RawClient(sockets, b.bind)
                await settle()
                for i in range(100):
                    writer.set(b"/k/%d" % i, b"before")
                await writer.updates(100)
                primary.kill()
                await settle()
                # The primary is dead: these reach the backup's pending list only.
                late = [writer.set(b"/late/%d" % i, b"pending") for i in range(5)]
                await settle()
                assert len(backup.server.core.pending) == 5
                await trio.sleep(2.0)
                _, (entries, end) = await vote_until_answered(sockets, b.bind)
                assert backup.server.state.value == State.ACTIVE
                keys = {e.key for e in entries}
                assert {b"/k/%d" % i for i in range(100)} <= keys
                assert {b"/late/%d" % i for i in range(5)} <= keys
                assert end.sequence == 105
                published = await watcher.updates(5)
                assert [u.uuid for u in published] == late
                assert [u.sequence for u in published] == [101, 102, 103, 104, 105]
            nursery.cancel_scope.cancel()


async def test_ttl_expires_at_the_same_deadline_after_takeover(context, autojump_clock):
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (p, b), primary, _backup, _ = await started_pair(nursery, context)
            with Sockets(context) as sockets:
                writer = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))
                await settle()
                start = trio.current_time()
                writer.set(b"/ttl", b"soon", ttl=10)
                await writer.next_update()
                await trio.sleep(3)
                primary.kill()
                await trio.sleep(2.5)
                client, (entries, _) = await vote_until_answered(sockets, b.bind)
                (entry,) = [e for e in entries if e.key == b"/ttl"]
                assert float(entry.properties["ttl"]) == 10 - (
                    trio.current_time() - start
                )
                gone = await client.next_update()
                assert gone.key == b"/ttl" and gone.body == b""
                assert trio.current_time() - start == 10.0
            nursery.cancel_scope.cancel()


async def test_restarted_primary_resyncs_then_double_failover(context, autojump_clock):
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            (p, b), primary, backup, _ = await started_pair(nursery, context)
            with Sockets(context) as sockets:
                writer = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))
                await settle()
                for i in range(50):
                    writer.set(b"/a/%d" % i, b"1")
                await writer.updates(50)
                primary.kill()
                await trio.sleep(2)
                await vote_until_answered(sockets, b.bind)
                for i in range(50, 80):
                    writer.set(b"/a/%d" % i, b"2")
                await settle()
                assert len(backup.server.core.store) == 80

                primary = await start(nursery, p, context)
                await primary.server.state.wait_value(State.PASSIVE)
                await primary.server.synced.wait_value(True)
                assert len(primary.server.core.store) == 80
                await trio.sleep(10)  # failback happens only when the backup dies
                assert primary.server.state.value == State.PASSIVE
                assert backup.server.state.value == State.ACTIVE

                backup.kill()
                await trio.sleep(2)
                _, (entries, _end) = await vote_until_answered(sockets, p.bind)
                assert primary.server.state.value == State.ACTIVE
                assert {e.key for e in entries} == {b"/a/%d" % i for i in range(80)}
            nursery.cancel_scope.cancel()


async def test_dual_actives_converge_on_the_primary(context, autojump_clock, caplog):
    with trio.fail_after(60), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            (_, b), primary, backup, relays = await started_pair(
                nursery, context, sockets
            )
            for relay in relays:  # partition the heartbeat link both ways
                relay.cut = True
            await trio.sleep(3)
            await vote_until_answered(sockets, b.bind)
            assert backup.server.state.value == State.ACTIVE
            assert primary.server.state.value == State.ACTIVE
            for relay in relays:  # heal: each hears the other ACTIVE
                relay.cut = False
            await backup.server.state.wait_value(State.PASSIVE)
            await backup.server.synced.wait_value(True)
            assert primary.server.state.value == State.ACTIVE
            assert primary.server.core.bstar.faults[DUAL_ACTIVES] >= 1
            assert backup.server.core.bstar.faults[DUAL_ACTIVES] >= 1
            # the status line (README): role, lineage, sequence, keys,
            # pending size and the fault counters
            status = backup.server.status()
            assert status["lineage"] == primary.server.core.lineage
            assert status[DUAL_ACTIVES] == backup.server.core.bstar.faults[DUAL_ACTIVES]
            assert {"state", "role", "sequence", "keys", "pending"} <= set(status)
            assert any(
                "dual actives" in r.getMessage() and r.levelno == logging.ERROR
                for r in caplog.records
            )
            nursery.cancel_scope.cancel()


class Timeline:
    """Role scopes entered and left, and messages published, in order."""

    def __init__(self, server):
        self.events = []
        server.trace = lambda role, step: self.events.append((role, step))
        server.publisher.observer = lambda frames: self.events.append(
            ("publish", frames[0])
        )

    def check_roles_never_overlap(self):
        inside = set()
        seen_role = False
        for what, step in self.events:
            if what == "publish":
                assert inside == {"active"}, f"published while in {inside or 'no role'}"
            elif step == "enter":
                assert not inside, f"{what} entered while {inside} was running"
                inside.add(what)
            elif seen_role or what in inside:
                inside.remove(what)
            # else: left a scope entered before we started watching
            seen_role = seen_role or what != "publish"
        return inside


async def test_passive_sync_and_active_publishing_never_overlap(
    context, autojump_clock
):
    with trio.fail_after(120), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            p, b = pair_settings(heartbeat=0.5)
            primary = await start(nursery, p, context)
            backup = await start(nursery, b, context)
            timelines = [Timeline(primary.server), Timeline(backup.server)]
            writer = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))

            async def write_forever():
                for i in range(100_000):
                    writer.set(b"/w/%d" % (i % 50), b"%d" % i, ttl=0.7)
                    await trio.sleep(0.01)

            nursery.start_soon(write_forever)
            await backup.server.synced.wait_value(True)
            await trio.sleep(1)
            primary.kill()
            await trio.sleep(1)
            await vote_until_answered(sockets, b.bind)
            primary = await start(nursery, p, context)
            timelines.append(Timeline(primary.server))
            await primary.server.synced.wait_value(True)
            await trio.sleep(1)
            backup.kill()
            await trio.sleep(1)
            await vote_until_answered(sockets, p.bind)
            await trio.sleep(1)
            for timeline in timelines:
                timeline.check_roles_never_overlap()
            assert timelines[-1].check_roles_never_overlap() == {"active"}
            assert sum(e[0] == "publish" for e in timelines[1].events) > 50
            nursery.cancel_scope.cancel()


async def test_quick_flap_ends_with_the_right_scope(context, autojump_clock):
    with trio.fail_after(60), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            (_, b), primary, backup, _ = await started_pair(nursery, context)
            primary.kill()
            await trio.sleep(2)
            await vote_until_answered(sockets, b.bind)
            server = backup.server
            await settle()  # the passive scope has finished winding down
            timeline = Timeline(server)
            now = trio.current_time()
            # ACTIVE -> PASSIVE (dual actives) -> ACTIVE (peer restarted), with
            # no checkpoint between: a watcher of state changes would miss both.
            for _ in range(3):  # no claim heard from the peer: patience, then
                server.core.on_peer_state([b"3"], now)  # the primary wins
            server._after(now)
            assert server.state.value == State.PASSIVE
            server.core.on_peer_state([b"1"], now)
            server._after(now)
            assert server.state.value == State.ACTIVE
            await trio.sleep(1.5)
            assert timeline.check_roles_never_overlap() == {"active"}
            assert timeline.events[:2] == [("active", "exit"), ("active", "enter")]
            assert ("publish", b"HUGZ") in timeline.events  # active work resumed
            nursery.cancel_scope.cancel()


async def test_active_dies_mid_snapshot_passive_survives_and_serves(
    context, autojump_clock, caplog
):
    with trio.fail_after(120), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            p, b = pair_settings(sync_timeout=3.0)
            primary = await start(nursery, p, context)
            await vote_until_answered(sockets, p.bind)  # alone: a vote activates it
            writer = RawClient(sockets, p.bind)
            await settle()
            for i in range(20_000):
                writer.set(b"/big/%05d" % i, b"x" * 100)
                if i % 500 == 0:
                    await settle()
            await settle()
            assert primary.server.core.store.sequence == 20_000
            backup = await start(nursery, b, context)
            core = backup.server.core
            load, loaded = core.on_reply, []

            def load_then_kill(frames, now):
                loaded.append(frames[0])
                if len(loaded) == 1000:  # the active dies mid-snapshot
                    primary.kill()
                return load(frames, now)

            core.on_reply = load_then_kill
            await backup.server.state.wait_value(State.PASSIVE)
            while len(loaded) < 1000:
                await trio.sleep(0.001)
            killed = trio.current_time()
            await settle()
            assert len(loaded) < 20_000 and not core.synced
            # The passive keeps its heartbeat, collector and votes going, gives
            # up on the snapshot after sync_timeout and keeps retrying.
            await trio.sleep(4)
            assert backup.server.state.value == State.PASSIVE
            assert any(
                "no snapshot or stream from the active" in r.getMessage()
                for r in caplog.records
            )
            _, (entries, end) = await vote_until_answered(sockets, b.bind)
            assert backup.server.state.value == State.ACTIVE
            assert trio.current_time() - killed < 6
            assert (entries, end.sequence) == ([], 0)  # no complete copy yet: empty
            # It serves: writes are applied and published.
            client = RawClient(sockets, b.bind)
            await settle()
            client.set(b"/after", b"1")
            assert (await client.next_update()).key == b"/after"
            nursery.cancel_scope.cancel()


async def test_peer_restarting_mid_snapshot_converges(context, autojump_clock, caplog):
    with trio.fail_after(120), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            p, b = pair_settings(sync_timeout=3.0, relayed=True)
            relays = [Relay.between(nursery, sockets, side) for side in (p, b)]
            primary = await start(nursery, p, context)
            await vote_until_answered(sockets, p.bind)
            writer = RawClient(sockets, p.bind)
            await settle()
            for i in range(5_000):
                writer.set(b"/big/%05d" % i, b"x" * 100)
                if i % 500 == 0:
                    await settle()
            await settle()
            backup = await start(nursery, b, context)
            core = backup.server.core
            load, loaded = core.on_reply, []

            def load_then_kill(frames, now):
                loaded.append(frames[0])
                if len(loaded) == 1000:
                    primary.kill()
                return load(frames, now)

            core.on_reply = load_then_kill
            while len(loaded) < 1000:
                await trio.sleep(0.001)
            primary = await start(nursery, p, context)  # back at once, empty
            relays[0].reconnect()  # as a tcp SUB would
            # The passive hears PEER_PRIMARY (its peer restarted) and takes
            # over; the restarted primary hears it ACTIVE and syncs from it.
            await backup.server.state.wait_value(State.ACTIVE)
            await primary.server.state.wait_value(State.PASSIVE)
            await primary.server.synced.wait_value(True)
            await trio.sleep(5)
            assert backup.server.state.value == State.ACTIVE
            assert primary.server.state.value == State.PASSIVE
            assert backup.server.core.stats["unsynced_takeovers"] == 1
            assert any(
                r.levelname == "ERROR"
                and "before any complete snapshot" in r.getMessage()
                for r in caplog.records
            )
            client = RawClient(sockets, b.bind, writes_to=(p.bind, b.bind))
            await settle()
            client.set(b"/after", b"1")
            assert (await client.next_update()).key == b"/after"
            await settle()
            assert primary.server.core.store.get(b"/after").body == b"1"
            nursery.cancel_scope.cancel()


async def test_a_healed_split_loses_no_write_and_applies_none_twice(
    context, autojump_clock, caplog
):
    """Islands: writers who reach only the primary, or only the backup, while
    the link between the servers is cut.  When it heals, the backup (same
    map, not the primary) steps down, hands its island's writes to the
    primary, and resyncs: every confirmed write is there, each applied once."""
    with trio.fail_after(120), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            (p, b), primary, backup, relays = await started_pair(
                nursery, context, sockets
            )
            stream = RawClient(sockets, p.bind)  # what the primary publishes
            await settle()
            for relay in relays:
                relay.cut = True
            await trio.sleep(3)
            await vote_until_answered(sockets, b.bind)
            assert backup.server.state.value == State.ACTIVE
            west = RawClient(sockets, p.bind, writes_to=(p.bind,))
            east = RawClient(sockets, b.bind, writes_to=(b.bind,))
            both = RawClient(sockets, p.bind, writes_to=(p.bind, b.bind))
            await settle()
            west_uuids = [west.set(b"/west/%d" % i, b"w") for i in range(3)]
            east_uuids = [east.set(b"/east/%d" % i, b"e") for i in range(3)]
            shared = both.set(b"/both", b"x")
            gone = east.set(b"/west/0", b"")  # an island's client deletes
            await settle()
            for relay in relays:
                relay.cut = False
            await backup.server.state.wait_value(State.PASSIVE)
            await backup.server.synced.wait_value(True)
            await trio.sleep(3)  # hand-overs resent, if any were lost
            assert primary.server.state.value == State.ACTIVE
            store = primary.server.core.store
            assert sorted(store.keys()) == [
                b"/both",
                b"/east/0",
                b"/east/1",
                b"/east/2",
                b"/west/1",
                b"/west/2",
            ]
            assert [store.uuid_of(b"/east/%d" % i) for i in range(3)] == east_uuids
            published = [decode_kvmsg(f) for f in stream.sub.receive_nowait(10_000)]
            uuids = [m.uuid for m in published if m.key != b"HUGZ"]
            for name, uuid in [
                *[("west", u) for u in west_uuids],
                *[("east", u) for u in east_uuids],
                ("shared", shared),
                ("gone", gone),
            ]:
                assert uuids.count(uuid) == 1, (name, [m.key for m in published])
            assert backup.server.core.store.keys() == store.keys()
            assert len(backup.server.core.pending) == 0
            assert any("handing the writes" in r.getMessage() for r in caplog.records)
            nursery.cancel_scope.cancel()


async def test_an_empty_restarted_primary_never_wins_over_the_map(
    context, autojump_clock
):
    """The primary dies; the backup takes over with the map.  The primary
    comes back empty, cut off from the backup, and a client votes for it.
    When the link heals it is the one that steps down: the map survives."""
    with trio.fail_after(120), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            (p, b), primary, backup, relays = await started_pair(
                nursery, context, sockets
            )
            await write_map(sockets, p, b)
            primary.kill()
            await trio.sleep(3)
            await vote_until_answered(sockets, b.bind)
            relays[1].cut = True  # the restarted primary cannot hear the backup
            primary = await start(nursery, p, context)
            relays[0].reconnect()
            await trio.sleep(3)
            await vote_until_answered(sockets, p.bind)
            assert primary.server.state.value == State.ACTIVE
            assert primary.server.core.fresh and len(primary.server.core.store) == 0
            relays[1].cut = False
            await primary.server.state.wait_value(State.PASSIVE)
            await primary.server.synced.wait_value(True)
            assert backup.server.state.value == State.ACTIVE
            assert len(backup.server.core.store) == 5
            assert primary.server.core.store.keys() == backup.server.core.store.keys()
            nursery.cancel_scope.cancel()


async def test_the_passives_own_resync_is_not_a_vote_for_an_empty_restarted_primary(
    context, autojump_clock
):
    """The passive's snapshot requests are no Binary Star votes: the primary
    restarts (empty) while the heartbeat link is down and no client votes
    for anyone; the backup's own resyncs must not make the empty primary
    ACTIVE, and the backup keeps the map."""
    with trio.fail_after(120), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            (p, b), primary, backup, relays = await started_pair(
                nursery, context, sockets
            )
            await write_map(sockets, p, b)
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


async def test_a_passive_loads_a_large_window_in_bounded_steps(
    context, autojump_clock, monkeypatch
):
    """The active's window of replaced writes holds 1,000,000 UUIDs (the
    default ``--applied-limit``; a busy hour, or a split).  The backup syncs:
    the HISTORY reply is 245 messages of 4,096 UUIDs, which arrive in one
    receive batch.  Long work must run in bounded steps (heartbeats are not
    late, README): no task step may load more than a few batches."""
    steps = WorkPerStep()  # UUIDs loaded into a window
    steps.patch(
        monkeypatch,
        Applied,
        "load",
        lambda _, args: sum(len(uuids) for _age, uuids in args[1]),
    )
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            settings, primary, backup, _ = await started_pair(nursery, context)
            applied, now = primary.server.core.applied, trio.current_time()
            for n in range(1_000_000):
                applied.add(n.to_bytes(16, "big"), now)
            backup.kill()  # it restarts, and syncs the map and the window again
            trio.lowlevel.add_instrument(steps)
            try:
                backup = await start(nursery, settings[1], context)
                await backup.server.synced.wait_value(True)
            finally:
                trio.lowlevel.remove_instrument(steps)
            assert len(backup.server.core.applied) == 1_000_000
            assert steps.total == 1_000_000
            assert steps.largest <= 3 * HISTORY_BATCH, (
                f"one task step loaded {steps.largest:,} UUIDs"
            )
            nursery.cancel_scope.cancel()


async def test_the_passive_reads_what_subscribers_send_its_publisher(
    context, autojump_clock
):
    """Nothing is published while passive, but subscribers still connect to
    the publisher (an XPUB) and send it subscriptions, or anything else from
    an XSUB.  libzmq queues what they send, and frees the connections that
    went away, only when the socket is used: the passive must read it too,
    at least once a HUGZ interval, or every connection made to it stays in
    its memory with all it sent (live fuzzing found it: 100 MB a
    connection, never freed; tests/integration/test_stranger_memory.py)."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            (_p, b), _primary, backup, _ = await started_pair(nursery, context)
            with Sockets(context) as sockets:
                xsub = sockets.open(zmq.XSUB, connect=[b.bind.publisher])
                await settle()
                xsub.try_send([b"\x02not a subscription"])
                xsub.try_send([b"\x01/watched/"])
                await trio.sleep(1.5 * backup.server.settings.hugz_interval)
                server = backup.server
                assert server.state.value == State.PASSIVE
                assert server.rejections["publisher"] == 1
                assert b"/watched/" in server.core.subtrees.tracked
            nursery.cancel_scope.cancel()
