"""The Trio client (``open_client``) against trioclone servers, over inproc.

Servers run in this process (``tests.shells.pair.start``): a standalone
server, or a Binary Star pair where "killing" the primary is cancelling its
scope.  Every test runs under the autojump clock inside ``trio.fail_after``
(virtual time), so the times asserted are exact (see ``settle_links`` for
how libzmq's real-time command throttling is kept out).

Timings are the defaults unless a test says otherwise: the client's
request_timeout 1.0, silence_timeout 2.0, back-off 0.5 doubling to 5.0,
resend_interval 1.0; the servers' HUGZ every 1.0 and Binary Star heartbeats
every 1.0 with the peer expiring after 2.0 of silence.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import trio
import zmq

from tests.chp import RawClient, settle, unique
from tests.shells.pair import Running, pair_settings, start, started_pair
from trioclone import (
    ClientClosedError,
    ClientTimings,
    DeleteEvent,
    LocalProtocolError,
    ResyncEvent,
    SetEvent,
    WriteTimeoutError,
    open_client,
)
from trioclone._zmq import Socket, Sockets
from trioclone.core.bstar import State
from trioclone.core.chp import (
    HUGZ,
    ICANHAZ,
    KVMsg,
    decode_kvmsg,
    encode_kvmsg,
    kthxbai,
)
from trioclone.endpoints import Endpoints
from trioclone.server.settings import ServerSettings

GUARD = 60.0  # virtual seconds


async def settle_links() -> None:
    """Let every task block: every link made so far is then attached.

    inproc connects and binds at once; the peer takes the new pipe in when
    its task next reads the socket, which it does before every task is
    blocked.  A PUB is the exception: nobody reads it, and while sending it
    takes in new subscribers at most once per ~1 ms of *real* time
    (libzmq's command throttling), which under the autojump clock would
    decide whether a message published right after a SUB connected reaches
    it.  So every PUB here reads EVENTS before it sends, which takes them in
    at once: the server's publisher (``admit``, before each batch), a
    ``RawClient`` (``set``) and a ``Gate``.  No real time is involved.
    """
    await settle()


# --------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------


async def standalone(nursery: trio.Nursery, context: Any) -> tuple[Endpoints, Running]:
    endpoints = Endpoints.inproc(unique("solo"))
    return endpoints, await start(nursery, ServerSettings(bind=endpoints), context)


class Recorder:
    """Everything a watch yields, with the virtual time it arrived."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, Any]] = []

    async def run(self, watch: Any) -> None:
        async for event in watch:
            self.seen.append((trio.current_time(), event))

    @property
    def events(self) -> list[Any]:
        return [event for _, event in self.seen]

    def of(self, kind: type) -> list[tuple[float, Any]]:
        return [(t, e) for t, e in self.seen if isinstance(e, kind)]


class Tally:
    """Every KVPUB a server publishes (HUGZ left out), as a raw subscriber."""

    def __init__(self, sockets: Sockets, server: Endpoints) -> None:
        self._sub: Socket = sockets.open(
            zmq.SUB, connect=[server.publisher], subscribe=[b""]
        )
        self.updates: list[KVMsg] = []

    async def run(self) -> None:
        while True:
            for frames in await self._sub.receive_batch():
                msg = decode_kvmsg(frames)
                if msg.key != HUGZ:
                    self.updates.append(msg)

    def per_key(self) -> Counter[bytes]:
        return Counter(u.key for u in self.updates)

    def per_uuid(self) -> Counter[bytes]:
        return Counter(u.uuid for u in self.updates)


class Gate:
    """A link to a server's collector that forwards only while ``is_open()``.

    Give the client ``gate.endpoints`` instead of the server's: snapshots and
    the stream are direct, writes go through the gate.
    """

    def __init__(
        self, sockets: Sockets, server: Endpoints, is_open: Callable[[], bool]
    ) -> None:
        address = f"inproc://{unique('gate')}"
        self.endpoints = Endpoints(server.snapshot, server.publisher, address)
        self.is_open = is_open
        self.passed = 0
        self.dropped = 0
        self._in = sockets.open(zmq.SUB, bind=[address], subscribe=[b""])
        self._out = sockets.open(zmq.PUB, connect=[server.collector])

    async def run(self) -> None:
        while True:
            for frames in await self._in.receive_batch():
                if self.is_open():
                    self._out.refresh()  # take in the collector: see settle_links
                    self._out.try_send(frames)
                    self.passed += 1
                else:
                    self.dropped += 1


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


async def test_sync_and_read(context, autojump_clock):
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            server, running = await standalone(nursery, context)
            writer = RawClient(sockets, server)
            await settle()
            for key, value in [(b"/cfg/a", b"1"), (b"/cfg/b", b"2"), (b"/x", b"3")]:
                writer.set(key, value)
            await settle()
            start_time = trio.current_time()
            async with open_client([server], context=context) as clone:
                await clone.wait_synced()
                assert clone.server == str(server)
                assert trio.current_time() == start_time  # inproc: no time passes
                assert clone.phase == "active"
                assert clone.sequence == 3
                assert clone.failovers == 0
                assert clone.get("/cfg/a") == b"1"
                assert clone.get(b"/x") == b"3"
                assert clone.get("/missing") is None
                assert clone.get("/missing", b"dflt") == b"dflt"
                assert sorted(clone.keys()) == ["/cfg/a", "/cfg/b", "/x"]
                assert sorted(clone.items("/cfg/")) == [
                    ("/cfg/a", b"1"),
                    ("/cfg/b", b"2"),
                ]
                view = clone.view("/cfg/")
                assert dict(view) == {"/cfg/a": b"1", "/cfg/b": b"2"}
                assert len(view) == 2
                assert "/x" not in view
                with pytest.raises(KeyError):
                    view["/x"]
                assert len(clone.view()) == 3
                await settle_links()
                writer.set(b"/cfg/c", b"4")
                await settle()
                assert view["/cfg/c"] == b"4"  # the view is live
                assert clone.sequence == 4
                assert running.server.core.store.sequence == 4
            nursery.cancel_scope.cancel()


async def test_subtree_clients_hold_only_their_subtrees(context, autojump_clock):
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            server, _ = await standalone(nursery, context)
            writer = RawClient(sockets, server)
            await settle()
            for key in (b"/a/1", b"/b/1", b"/c/1"):
                writer.set(key, b"before")
            await settle()
            async with (
                open_client([server], "/a/", context=context) as one,
                open_client([server], ["/a/", "/b/"], context=context) as two,
            ):
                await one.wait_synced()
                await two.wait_synced()
                await settle_links()
                for key in (b"/a/2", b"/b/2", b"/c/2"):
                    writer.set(key, b"after")
                await settle()
                assert sorted(one.keys()) == ["/a/1", "/a/2"]
                assert sorted(two.keys()) == ["/a/1", "/a/2", "/b/1", "/b/2"]
                seq = await two.set("/b/3", "mine")
                assert two.get("/b/3") == b"mine"
                assert seq == 7
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


async def test_set_returns_the_sequence_and_the_map_changes_only_when_confirmed(
    context, autojump_clock
):
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            server, running = await standalone(nursery, context)
            opened_at = math.inf  # the gate opens when the test says so
            gate = Gate(sockets, server, lambda: trio.current_time() >= opened_at)
            nursery.start_soon(gate.run)
            tally = Tally(sockets, server)
            nursery.start_soon(tally.run)
            await settle_links()
            async with open_client([gate.endpoints], context=context) as clone:
                await clone.wait_synced()
                await settle_links()
                t0 = trio.current_time()
                returned: list[tuple[float, int]] = []

                async def write() -> None:
                    sequence = await clone.set("/k", "v")
                    returned.append((trio.current_time(), sequence))

                nursery.start_soon(write)
                await trio.sleep(2.5)
                # sent at t0, resent at t0 + 1 and t0 + 2: all lost on the way
                assert gate.dropped == 3
                assert returned == []
                assert clone.get("/k") is None  # not confirmed: not in the map
                assert running.server.core.store.get(b"/k") is None
                opened_at = trio.current_time()
                await trio.sleep(2.0)
                # the next resend, at t0 + 3, gets through and is confirmed
                assert returned == [(t0 + 3.0, 1)]
                assert clone.get("/k") == b"v"
                assert gate.passed == 1
                assert tally.per_key() == {b"/k": 1}
            nursery.cancel_scope.cancel()


async def test_writes_are_applied_and_confirmed_once(context, autojump_clock):
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            server, running = await standalone(nursery, context)
            tally = Tally(sockets, server)
            nursery.start_soon(tally.run)
            await settle_links()
            async with open_client([server], context=context) as clone:
                await clone.wait_synced()
                await settle_links()
                sequences = [await clone.set(f"/s/{i}", f"v{i}") for i in range(10)]
                assert sequences == list(range(1, 11))
                concurrent: dict[int, int] = {}

                async def write(i: int) -> None:
                    concurrent[i] = await clone.set(f"/c/{i}", b"x")

                async with trio.open_nursery() as writers:
                    for i in range(10):
                        writers.start_soon(write, i)
                assert sorted(concurrent.values()) == list(range(11, 21))
                assert await clone.delete("/s/0") == 21
                assert clone.get("/s/0") is None
                await trio.sleep(5.0)  # long past any resend interval
                assert len(tally.updates) == 21
                assert set(tally.per_uuid().values()) == {1}
                assert len(tally.per_uuid()) == 21
                assert running.server.core.store.sequence == 21
                assert running.server.core.stats["duplicates"] == 0
                for i, sequence in concurrent.items():
                    assert running.server.core.store.get(b"/c/%d" % i).sequence == (
                        sequence
                    )
            nursery.cancel_scope.cancel()


async def test_write_timeout_when_no_server_is_up(context, autojump_clock):
    with trio.fail_after(GUARD):
        nobody = Endpoints.inproc(unique("nobody"))
        async with open_client([nobody], context=context) as clone:
            start_time = trio.current_time()
            with pytest.raises(WriteTimeoutError):
                await clone.set("/k", "v", timeout=2.5)
            assert trio.current_time() - start_time == 2.5
            assert not clone.synced
            assert clone.get("/k") is None
            with pytest.raises(WriteTimeoutError):
                await clone.delete("/k", timeout=0.5)


async def test_a_write_waits_at_most_the_write_horizon(context, autojump_clock):
    """A longer timeout ends at the horizon: the write is no longer resent."""
    with trio.fail_after(GUARD):
        nobody = Endpoints.inproc(unique("nobody"))
        timings = ClientTimings(write_horizon=3.0)
        async with open_client([nobody], timings=timings, context=context) as clone:
            start_time = trio.current_time()
            with pytest.raises(WriteTimeoutError, match="not confirmed within 3 s"):
                await clone.set("/k", "v", timeout=60)
            assert trio.current_time() - start_time == 3.0
            with pytest.raises(WriteTimeoutError, match="within 3 s"):
                await clone.delete("/k", timeout=math.inf)
            for bad in (0, -1.0, math.nan):
                with pytest.raises(LocalProtocolError, match="timeout"):
                    await clone.set("/k", "v", timeout=bad)


# --------------------------------------------------------------------------
# watching
# --------------------------------------------------------------------------


async def test_watch_yields_changes_in_order_and_ttl_expiry_at_the_deadline(
    context, autojump_clock
):
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server, _ = await standalone(nursery, context)
            async with open_client([server], context=context) as clone:
                everything, under_w = Recorder(), Recorder()
                nursery.start_soon(everything.run, clone.watch())
                nursery.start_soon(under_w.run, clone.watch("/w/"))
                await clone.wait_synced()
                await settle_links()
                await clone.set("/w/a", "1")
                await clone.set("/w/b", "2")
                await clone.delete("/w/a")
                await clone.set("/x/other", "o")
                await trio.sleep(0.25)
                t1 = trio.current_time()
                await clone.set("/w/ttl", "soon", ttl=3)
                assert clone.get("/w/ttl") == b"soon"
                await trio.sleep(5)
                assert clone.get("/w/ttl") is None
                assert under_w.events == [
                    ResyncEvent(str(server), {}),  # watching since before the sync
                    SetEvent("/w/a", b"1", 1),
                    SetEvent("/w/b", b"2", 2),
                    DeleteEvent("/w/a", 3),
                    SetEvent("/w/ttl", b"soon", 5),
                    DeleteEvent("/w/ttl", 6),
                ]
                # the server's expiry, exactly ttl after the write was applied
                assert under_w.of(DeleteEvent)[-1][0] == t1 + 3.0
                first, *rest = everything.events
                assert first == ResyncEvent(str(server), {})
                assert SetEvent("/x/other", b"o", 4) in rest
                assert len(rest) == 6  # under_w's five and /x/other
            nursery.cancel_scope.cancel()


async def test_a_watch_with_state_starts_with_the_state_under_its_prefix(
    context, autojump_clock
):
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server, _ = await standalone(nursery, context)
            async with open_client([server], context=context) as clone:
                await clone.wait_synced()
                await settle_links()
                await clone.set("/w/a", "1")
                await clone.set("/x", "2")
                watch = clone.watch("/w/", state=True)
                await clone.set("/w/b", "3")
                assert [await watch.__anext__() for _ in range(2)] == [
                    ResyncEvent(str(server), {"/w/a": b"1"}),
                    SetEvent("/w/b", b"3", 3),
                ]
            nursery.cancel_scope.cancel()


async def test_a_watcher_that_falls_behind_gets_a_resync_instead(
    context, autojump_clock, monkeypatch
):
    monkeypatch.setattr("trioclone.client.agent.WATCH_BUFFER", 5)
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server, _ = await standalone(nursery, context)
            async with open_client([server], context=context) as clone:
                watch = clone.watch("/w/")  # nobody iterates it for a while
                await clone.wait_synced()
                await settle_links()
                for n in range(8):
                    await clone.set(f"/w/{n % 3}", f"{n}")
                await clone.set("/other", "x")  # not under the prefix
                events = [await watch.__anext__() for _ in range(5)]
                # Five events were queued (the first sync's and four sets);
                # the sixth overflowed the buffer: what was queued is replaced
                # by the state then, and the events from that one on follow.
                state = {"/w/0": b"3", "/w/1": b"4", "/w/2": b"2"}
                assert events == [
                    ResyncEvent(str(server), state),
                    SetEvent("/w/1", b"4", 5),
                    SetEvent("/w/2", b"5", 6),
                    SetEvent("/w/0", b"6", 7),
                    SetEvent("/w/1", b"7", 8),
                ]
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# start-up, failover
# --------------------------------------------------------------------------


async def test_a_client_started_before_the_servers_syncs_when_they_come_up(
    context, autojump_clock
):
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            p, b = pair_settings()
            async with open_client([p.bind, b.bind], context=context) as clone:
                recorder = Recorder()
                nursery.start_soon(recorder.run, clone.watch())
                written: list[tuple[float, int]] = []

                async def early_write() -> None:
                    sequence = await clone.set("/early", "bird", timeout=30)
                    written.append((trio.current_time(), sequence))

                nursery.start_soon(early_write)
                await trio.sleep(5.25)
                assert not clone.synced
                primary = await start(nursery, p, context)
                await start(nursery, b, context)
                await clone.wait_synced()
                # Asking: p at 0, b at 1; back-off 0.5 -> p at 2.5, b at 3.5;
                # back-off 1 -> p at 5.5.  The servers come up at 5.25: the
                # backup binds after the primary's heartbeat SUB connected, so
                # the primary hears the backup's first heartbeat at once and
                # is ACTIVE at 5.25.  The request at 5.5 is answered.
                assert trio.current_time() == 5.5
                assert clone.server == str(p.bind)
                assert primary.server.state.value == State.ACTIVE
                await trio.sleep(10.0)
                # The write made while no server was up is resent right after
                # the sync (5.5), applied once and confirmed at once: the
                # primary's publisher takes in the client's SUB (connected
                # before it asked) before it publishes the update, and the
                # client's PUB takes in the new collector before it resends
                # (both read EVENTS first; see settle_links).
                ((when, sequence),) = written
                assert sequence == 1
                assert when == 5.5
                assert primary.server.core.store.sequence == 1  # applied once
                assert clone.get("/early") == b"bird"
                assert recorder.events[0] == ResyncEvent(str(p.bind), {})
            nursery.cancel_scope.cancel()


async def test_failover_while_writing_loses_nothing_and_applies_nothing_twice(
    context, autojump_clock
):
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            settings, primary, backup, _ = await started_pair(nursery, context)
            p, b = (side.bind for side in settings)
            tallies = [Tally(sockets, p), Tally(sockets, b)]
            for tally in tallies:
                nursery.start_soon(tally.run)
            await settle_links()
            async with open_client([p, b], context=context) as clone:
                recorder = Recorder()
                nursery.start_soon(recorder.run, clone.watch())
                await clone.wait_synced()
                assert clone.server == str(p)
                await trio.sleep_until(math.ceil(trio.current_time()) + 1)
                t0 = trio.current_time()
                confirmed: dict[str, tuple[int, float]] = {}  # key -> seq, when

                async def write_forever() -> None:
                    for i in range(10_000):
                        key = f"/w/{i:04d}"
                        sequence = await clone.set(key, f"v{i}")
                        confirmed[key] = (sequence, trio.current_time())
                        await trio.sleep(0.25)

                clone.nursery.start_soon(write_forever)  # ends with the client
                await trio.sleep_until(t0 + 2.6)
                primary.kill()
                killed_at = trio.current_time()
                await clone._synced.wait_value(False)
                lost_at = trio.current_time()
                await clone.wait_synced()
                synced_at = trio.current_time()
                # Writes go out at t0 + 0.25 n; the primary's HUGZ on whole
                # seconds.  The last word the client heard from the primary
                # was the KVPUB of the write at t0 + 2.5, so silence_timeout
                # (2.0) runs out at t0 + 4.5: next server, ICANHAZ.  The
                # backup last heard the primary's heartbeat at t0 + 2, so its
                # peer expired at t0 + 4.0 and it accepts this vote at once,
                # takes over and answers: synced on the backup at t0 + 4.5.
                assert killed_at == t0 + 2.6
                assert lost_at == synced_at == t0 + 4.5
                assert clone.server == str(b)
                assert clone.failovers == 1
                assert backup.server.state.value == State.ACTIVE
                await trio.sleep(3.0)  # writes keep going on the backup
                done = dict(confirmed)
            nursery.cancel_scope.cancel()

    store = backup.server.core.store
    # every write that returned is in the backup's map, at its sequence
    for key, (sequence, _) in done.items():
        entry = store.get(key.encode())
        assert entry is not None and entry.sequence == sequence, key
    # ... and nothing was applied twice: one KVPUB per key, across both servers
    published = tallies[0].per_key() + tallies[1].per_key()
    assert set(published.values()) == {1}
    assert set(published) >= {k.encode() for k in done}
    assert store.sequence == len(store)  # one sequence per distinct key
    # before the kill each write returned at once (every 0.25 s); the one
    # made at t0 + 2.75, after the kill, waited for the takeover
    times = sorted(t for _, t in done.values())
    assert [t for t in times if t0 <= t < killed_at] == [
        t0 + 0.25 * n for n in range(11)
    ]
    assert [t for t in times if killed_at < t <= synced_at] == [synced_at]
    # the writer carried on at once on the backup
    after = sorted(t for _, t in done.values() if t > synced_at)
    assert after[:2] == [synced_at + 0.25, synced_at + 0.5]
    resyncs = recorder.of(ResyncEvent)
    assert [(t, e.server) for t, e in resyncs] == [
        (resyncs[0][0], str(p)),
        (synced_at, str(b)),
    ]


@pytest.mark.parametrize("offset", [0.0, 0.3, 0.6, 0.9])
async def test_failover_takes_at_most_the_documented_time(
    context, autojump_clock, offset
):
    """The README: with the default timings a client is synced on the backup
    at most 4.5 s after the active's last message.  The primary dies at
    ``offset`` into a second, against its HUGZ and heartbeats on whole
    seconds; here the backup's peer has expired when the client's silence
    runs out (2 s), so its first vote is answered.  The worst case, a vote
    the backup cannot answer yet, adds one request timeout and a back-off
    (``test_a_successful_sync_starts_the_back_off_afresh``): 2.5 s more."""
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            settings, primary, _, _ = await started_pair(nursery, context)
            p, b = (side.bind for side in settings)
            await settle_links()
            async with open_client([p, b], context=context) as clone:
                await clone.wait_synced()
                assert clone.server == str(p)
                await trio.sleep_until(math.ceil(trio.current_time()) + 2 + offset)
                primary.kill()
                killed_at = trio.current_time()
                await clone._synced.wait_value(False)
                await clone.wait_synced()
                assert clone.server == str(b)
                assert trio.current_time() - killed_at <= 4.5
            nursery.cancel_scope.cancel()


async def test_a_write_lost_before_failover_is_resent_after_it_and_applied_once(
    context, autojump_clock
):
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            settings, primary, backup, _ = await started_pair(nursery, context)
            p, b = (side.bind for side in settings)

            def backup_active() -> bool:
                return backup.server.state.value == State.ACTIVE

            # The backup's collector hears nothing until it is active: only a
            # resend after the failover can bring it the write.
            gate = Gate(sockets, b, backup_active)
            nursery.start_soon(gate.run)
            tally = Tally(sockets, b)
            nursery.start_soon(tally.run)
            await settle_links()
            async with open_client([p, gate.endpoints], context=context) as clone:
                await clone.wait_synced()
                await trio.sleep_until(math.ceil(trio.current_time()) + 0.5)
                t0 = trio.current_time()
                primary.kill()
                result: list[tuple[float, int]] = []

                async def write() -> None:
                    sequence = await clone.set("/lost", "found")
                    result.append((trio.current_time(), sequence))

                nursery.start_soon(write)
                await clone._synced.wait_value(False)
                await clone.wait_synced()
                synced_at = trio.current_time()
                # last HUGZ from the primary at t0 - 0.5: silent at t0 + 1.5;
                # the backup's peer expired at t0 + 1.5 too: vote accepted.
                assert synced_at == t0 + 1.5
                await trio.sleep(5.0)
                # sent at t0 and resent at t0 + 1: dropped; resent after the sync
                assert gate.dropped == 2
                assert gate.passed == 1
                # Applied and confirmed at synced_at: the backup's publisher
                # takes in the client's SUB, connected in that very instant,
                # before it publishes the update (see settle_links).
                ((when, sequence),) = result
                assert sequence == backup.server.core.store.sequence
                assert when == synced_at
                assert [u.key for u in tally.updates] == [b"/lost"]
                assert clone.get("/lost") == b"found"
                assert backup.server.core.stats["duplicates"] == 0
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# the client's life
# --------------------------------------------------------------------------


async def test_body_exceptions_propagate_unwrapped(context, autojump_clock):
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server, _ = await standalone(nursery, context)
            with pytest.raises(ValueError, match="boom") as info:
                async with open_client([server], context=context) as clone:
                    await clone.wait_synced()
                    raise ValueError("boom")
            assert type(info.value) is ValueError
            nobody = Endpoints.inproc(unique("nobody"))
            with pytest.raises(KeyError):
                async with open_client([nobody], context=context):
                    await trio.sleep(3)
                    raise KeyError("unsynced")
            nursery.cancel_scope.cancel()


async def test_an_outer_cancel_ends_the_client_quietly(context, autojump_clock):
    with trio.fail_after(GUARD):
        nobody = Endpoints.inproc(unique("nobody"))
        with trio.move_on_after(2.5) as scope:
            async with open_client([nobody], context=context) as clone:
                await clone.wait_synced()
        assert scope.cancelled_caught
        assert trio.current_time() == 2.5


async def test_a_closed_client_refuses_writes_and_watches(context, autojump_clock):
    with trio.fail_after(GUARD):
        async with trio.open_nursery() as nursery:
            server, _ = await standalone(nursery, context)
            async with open_client([server], context=context) as clone:
                await clone.wait_synced()
                await clone.set("/k", "v")
            with pytest.raises(ClientClosedError):
                await clone.set("/k", "w")
            with pytest.raises(ClientClosedError):
                await clone.delete("/k")
            with pytest.raises(ClientClosedError):
                clone.set_nowait("/k", "w")
            with pytest.raises(ClientClosedError):
                clone.watch()
            nursery.cancel_scope.cancel()


async def test_a_subtree_client_stays_synced_while_other_subtrees_change(
    context, autojump_clock
):
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            server, running = await standalone(nursery, context)
            writer = RawClient(sockets, server)
            await settle()

            async def elsewhere() -> None:
                for i in range(10_000):
                    writer.set(b"/other/%d" % (i % 10), b"%d" % i)
                    await trio.sleep(0.1)

            async with open_client([server], "/mine/", context=context) as clone:
                recorder = Recorder()
                nursery.start_soon(recorder.run, clone.watch())
                await clone.wait_synced()
                nursery.start_soon(elsewhere)
                await trio.sleep(10)
                assert running.server.core.store.sequence >= 100
                assert len(recorder.of(ResyncEvent)) == 1  # the first sync only
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# catching up
# --------------------------------------------------------------------------


async def test_a_reconnect_during_a_long_catch_up_does_not_hold_back_confirmations(
    context, autojump_clock
):
    """Catching up a long backlog is the agent's work, not the reader's that
    got the snapshot: a connection replaced meanwhile (its readers cancelled)
    does not stop it, so a write it confirms returns at once, not when the
    new connection's first batch comes in (here: never)."""
    backlog = 20_000
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        server = Endpoints.inproc(unique("catch-up"))
        router = sockets.open(zmq.ROUTER, bind=[server.snapshot])
        publisher = sockets.open(
            zmq.PUB, bind=[server.publisher], options=[(zmq.SNDHWM, 0)]
        )
        collector = sockets.open(zmq.SUB, bind=[server.collector], subscribe=[b""])

        def publish(key: bytes, sequence: int, uuid: bytes = b"") -> None:
            publisher.refresh()  # take in the client's SUB: see settle_links
            publisher.try_send(encode_kvmsg(KVMsg(key, sequence, uuid, {}, b"v")))

        async with open_client([server], context=context) as clone:
            identity, *request = await router.receive()
            assert request == [ICANHAZ, b""]
            written: list[tuple[float, int]] = []

            async def write() -> None:
                sequence = await clone.set("/mine", "v", timeout=5)
                written.append((trio.current_time(), sequence))

            clone.nursery.start_soon(write)
            uuid = decode_kvmsg(await collector.receive()).uuid
            # The stream while the snapshot is made: our write, confirmed late
            # in the backlog and then replaced, so only its turn among the
            # backlog's confirmations confirms it.
            mine = backlog - 1000
            for sequence in range(1, backlog + 1):
                if sequence == mine:
                    publish(b"/mine", sequence, uuid)
                elif sequence == mine + 1:
                    publish(b"/mine", sequence, bytes(16))
                else:
                    publish(b"/other/%d" % sequence, sequence)
            await settle()
            assert clone.phase == "syncing" and written == []
            router.try_send([identity, *kthxbai(0, b"")])
            core = clone._core
            while core.sequence < backlog:  # the backlog goes in, in steps
                await trio.lowlevel.checkpoint()
            assert core.busy and written == []  # confirmations still to do
            # The stream says the client missed updates, twice: it asks again,
            # then connects again (a request is in flight).
            publish(b"/other/late", backlog + 2)
            publish(b"/other/older", backlog + 1)
            now = trio.current_time()
            await settle()
            assert written == [(now, mine)]
            assert not core.busy
