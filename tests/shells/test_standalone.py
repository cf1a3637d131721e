"""Black-box CHP conformance of the standalone server, over inproc.

A ``CloneServer`` without a pair runs as ACTIVE from the start.  Every test
here talks to it only through its three sockets, as a raw CHP peer would
(``tests.chp.RawClient`` and bare pyzmq sockets), under the autojump clock:
inproc involves no libzmq I/O thread, so virtual time is deterministic and
the timing tests assert exact values (a TTL delete at exactly ``t + 5``,
HUGZ exactly ``1.0`` apart).  The server's own counters
(``server.core.stats``, ``server.core.store.sequence``) are read only to show
that bad input left no trace.

Each test runs inside ``trio.fail_after`` in virtual time: the HUGZ loop keeps
virtual time moving, so a test that waits for something that never comes
fails at the guard instead of hanging.  The server is stopped by cancelling
its nursery.
"""

from __future__ import annotations

import itertools
import json
import logging
import struct
import uuid as uuidlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
import zmq
from hypothesis import assume, given

from tests.chp import RawClient, settle, unique
from tests.shells.steps import WorkPerStep
from trioclone._zmq import Socket, Sockets
from trioclone.core.chp import (
    HUGZ,
    ICANHAZ,
    KTHXBAI,
    SEQUENCE,
    KVMsg,
    decode_kvmsg,
    decode_request,
    encode_request,
)
from trioclone.core.snapshot import Scan
from trioclone.endpoints import Endpoints
from trioclone.errors import RemoteProtocolError
from trioclone.server.clone import CloneServer
from trioclone.server.settings import ServerSettings

Context = zmq.Context[zmq.Socket[bytes]]
Frames = list[bytes]

GUARD = 60.0  # virtual seconds; reached only if a test waits for ever

VECTORS = json.loads((Path(__file__).parent.parent / "vectors.json").read_text())


def _vectors(kind: str) -> list[Any]:
    return [
        pytest.param([bytes.fromhex(f) for f in v["frames"]], v, id=v["name"])
        for v in VECTORS[kind]
    ]


HUGZ_VECTOR = next(
    v["frames"] for v in VECTORS["valid"] if v["name"] == "hugz-rfc-zero"
)
KTHXBAI_VECTOR = next(v["frames"] for v in VECTORS["valid"] if v["name"] == "kthxbai")

INVALID: list[tuple[str, Frames]] = [
    (v["name"], [bytes.fromhex(f) for f in v["frames"]]) for v in VECTORS["invalid"]
]


# --------------------------------------------------------------------------
# harness
# --------------------------------------------------------------------------


@dataclass
class Served:
    server: CloneServer
    endpoints: Endpoints
    sockets: Sockets
    start: float  # virtual time at which the server was bound and serving

    def client(self, subscribe: bytes = b"") -> RawClient:
        return RawClient(self.sockets, self.endpoints, subscribe)

    def elapsed(self) -> float:
        return trio.current_time() - self.start

    @property
    def sequence(self) -> int:
        return self.server.core.store.sequence

    @property
    def rejected(self) -> int:
        return self.server.core.stats["rejected"]


@asynccontextmanager
async def standalone(
    context: Context,
    *,
    endpoints: Endpoints | None = None,
    guard: float = GUARD,
    **options: Any,
) -> AsyncIterator[Served]:
    """A standalone server on fresh inproc endpoints; stopped on exit."""
    endpoints = endpoints or Endpoints.inproc(unique("standalone"))
    settings = ServerSettings(endpoints, **options)
    with trio.fail_after(guard):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(CloneServer(settings, context=context).run)
            with Sockets(context) as sockets:
                yield Served(server, endpoints, sockets, trio.current_time())
            nursery.cancel_scope.cancel()


def kvset(
    key: bytes,
    body: bytes,
    *,
    uuid: bytes | None = None,
    properties: bytes = b"",
    sequence: int = 0,
) -> Frames:
    """The raw five frames of a KVSET (byte-exact, nothing normalised)."""
    uuid = uuidlib.uuid4().bytes if uuid is None else uuid
    return [key, SEQUENCE.pack(sequence), uuid, properties, body]


def kvpub(frames: Sequence[bytes], sequence: int) -> Frames:
    """What the server must publish for the KVSET ``frames``."""
    return [frames[0], SEQUENCE.pack(sequence), *frames[2:]]


async def next_raw(sock: Socket, *, skip_hugz: bool = True) -> Frames:
    while True:
        frames = await sock.receive()
        if not (skip_hugz and frames[0] == HUGZ):
            return frames


def queued(sock: Socket) -> list[Frames]:
    """Every message already delivered to ``sock``; never waits."""
    return sock.receive_nowait(100_000)


def hugz_wire(s: Served, sequence: int) -> Frames:
    """A HUGZ as the wire must carry it, built by hand (not by trioclone):
    the reference's key and sequence encoding (see the ``hugz-current-seq``
    vector), no UUID, and the map's lineage as the only property."""
    lineage = s.server.core.lineage
    assert lineage and len(lineage) == 32
    return [
        bytes.fromhex(HUGZ_VECTOR[0]),
        struct.pack(">q", sequence),
        b"",
        b"lineage=" + lineage.encode() + b"\n",
        b"",
    ]


def kthxbai_wire(s: Served, sequence: int, subtree: bytes, count: int = 0) -> Frames:
    """A KTHXBAI as the wire must carry it, built by hand (see the vector):
    for a subtree, with the count of updates published under it since the
    server began tracking it (at the latest, with this snapshot)."""
    lineage = s.server.core.lineage
    assert lineage
    counted = b"count=%d\n" % count if subtree else b""
    return [
        bytes.fromhex(KTHXBAI_VECTOR[0]),
        struct.pack(">q", sequence),
        b"",
        b"lineage=" + lineage.encode() + b"\n" + counted,
        subtree,
    ]


def without_hugz(messages: list[Frames]) -> list[Frames]:
    return [m for m in messages if m[0] != HUGZ]


async def contents(client: RawClient, subtree: bytes = b"") -> tuple[set[Any], int]:
    """A snapshot as a comparable set of entries, and its KTHXBAI sequence."""
    entries, end = await client.snapshot(subtree)
    assert end.key == KTHXBAI and end.body == subtree
    keys = [e.key for e in entries]
    assert len(keys) == len(set(keys)), "a key appears twice in one snapshot"
    found = {
        (e.key, e.sequence, e.uuid, tuple(sorted(e.properties.items())), e.body)
        for e in entries
    }
    return found, end.sequence


async def no_update_within(client: RawClient, seconds: float) -> bool:
    """True if nothing but HUGZ arrives in ``seconds`` of virtual time."""
    with trio.move_on_after(seconds) as waited:
        await client.next_update()
    return waited.cancelled_caught


# --------------------------------------------------------------------------
# 1. KVSET -> KVPUB
# --------------------------------------------------------------------------


async def test_kvset_is_republished_with_increasing_sequence(context, autojump_clock):
    async with standalone(context) as s:
        everything = s.client()
        subtree = s.client(subscribe=b"/a/")
        subtree.sub.raw.setsockopt(zmq.SUBSCRIBE, HUGZ)
        await settle()
        sent = [
            kvset(b"/a/1", b"one", properties=b"owner=svc-1\nttl=30\n"),
            kvset(b"/b/1", b"two"),
            kvset(b"/a/2", b"\x00three\xff", properties=b"owner=svc-2\n"),
            kvset(b"/a/1", b"four", uuid=b""),
        ]
        for frames in sent:
            everything.pub.try_send(frames)

        got = [await next_raw(everything.sub) for _ in sent]
        # byte-exact: key, writer's UUID, properties and body kept
        assert got == [kvpub(frames, n) for n, frames in enumerate(sent, 1)]
        decoded = decode_kvmsg(got[0])
        assert decoded.properties == {"owner": "svc-1", "ttl": "30"}
        assert decoded.ttl == 30.0
        assert s.sequence == 4
        assert s.elapsed() == 0.0  # inproc: no virtual time passes

        await settle()
        a_only = without_hugz(queued(subtree.sub))
        assert a_only == [kvpub(sent[0], 1), kvpub(sent[2], 3), kvpub(sent[3], 4)]
        assert not without_hugz(queued(everything.sub))

        # the subtree subscriber still hears HUGZ (it subscribed to them)
        hugz = await subtree.sub.receive()
        assert hugz[0] == HUGZ and SEQUENCE.unpack(hugz[1])[0] == 4


async def test_kvset_sequence_frame_is_ignored(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        client.pub.try_send(kvset(b"k", b"v", sequence=1_000_000))
        client.pub.try_send(kvset(b"k", b"w", sequence=-5))
        got = [decode_kvmsg(await next_raw(client.sub)) for _ in range(2)]
        assert [m.sequence for m in got] == [1, 2]


@pytest.mark.parametrize(("frames", "vector"), _vectors("valid"))
async def test_valid_vector(frames, vector, context, autojump_clock):
    """Every valid vector sent where a client would send it."""
    expect = vector["expect"]
    async with standalone(context) as s:
        client = s.client()
        await settle()
        if expect.get("command") == "ICANHAZ":
            await client.dealer.send(frames)
            reply = decode_kvmsg(await client.dealer.receive())
            assert reply.key == KTHXBAI and reply.sequence == 0
            assert reply.body == expect["subtree"].encode()
            return
        client.pub.try_send(frames)
        if frames[0] in (HUGZ, KTHXBAI):  # reserved: a client may not write them
            await settle()
            assert s.rejected == 1 and s.sequence == 0
            assert all(m == hugz_wire(s, 0) for m in queued(client.sub))
            return
        assert await next_raw(client.sub) == kvpub(frames, 1)
        entries, _ = await contents(client)
        if expect.get("delete"):
            assert entries == set()
        else:
            assert [e[0] for e in entries] == [frames[0]]


# --------------------------------------------------------------------------
# 2. delete
# --------------------------------------------------------------------------


async def test_empty_body_deletes_the_key(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        client.set(b"/a/1", b"one")
        client.set(b"/a/2", b"two")
        await client.updates(2)
        uuid = client.set(b"/a/1", b"")
        gone = await client.next_update()
        assert gone == KVMsg(b"/a/1", 3, uuid, {}, b"")
        entries, sequence = await contents(client)
        assert [e[0] for e in entries] == [b"/a/2"] and sequence == 3
        # deleting again (or a key never set) is still an update: new sequence
        client.set(b"/a/1", b"")
        again = await client.next_update()
        assert again.key == b"/a/1" and again.body == b"" and again.sequence == 4
        assert b"/a/1" not in s.server.core.store


# --------------------------------------------------------------------------
# 3. snapshot
# --------------------------------------------------------------------------


async def test_snapshot_of_an_empty_server_is_just_kthxbai(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        for subtree in (b"", b"/a/"):
            await client.dealer.send([ICANHAZ, subtree])
            reply = await client.dealer.receive()
            assert reply == kthxbai_wire(s, 0, subtree)
        await settle()
        assert queued(client.dealer) == []


async def test_snapshot_returns_stored_kvmsgs_then_kthxbai(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        a1 = client.set(b"/a/1", b"one")
        b1 = client.set(b"/b/1", b"two", properties={"owner": "svc-1"})
        a2 = client.set(b"/a/2", b"three")
        a1 = client.set(b"/a/1", b"four", properties={"owner": "svc-2"})
        client.set(b"/a/3", b"five")
        client.set(b"/a/3", b"")
        await client.updates(6)

        everything = {
            (b"/a/1", 4, a1, (("owner", "svc-2"),), b"four"),
            (b"/b/1", 2, b1, (("owner", "svc-1"),), b"two"),
            (b"/a/2", 3, a2, (), b"three"),
        }
        assert await contents(client) == (everything, 6)
        assert s.sequence == 6
        under_a = {e for e in everything if e[0].startswith(b"/a/")}
        assert await contents(client, b"/a/") == (under_a, 6)
        assert await contents(client, b"/zzz/") == (set(), 6)

        # KVSYNC is the stored kvmsg whole: byte-exact frames
        await client.dealer.send([ICANHAZ, b"/b/"])
        assert await client.dealer.receive() == [
            b"/b/1",
            SEQUENCE.pack(2),
            b1,
            b"owner=svc-1\n",
            b"two",
        ]
        assert await client.dealer.receive() == kthxbai_wire(s, 6, b"/b/")


async def test_kthxbai_sequence_is_the_current_one(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        for n in range(1, 4):
            client.set(b"/k", b"%d" % n)
            await client.next_update()
            _, sequence = await contents(client)
            assert sequence == n == s.sequence


async def test_many_snapshots_at_once(context, autojump_clock):
    async with standalone(context) as s:
        writer = s.client()
        readers = [s.client() for _ in range(5)]
        await settle()
        keys = {b"/k/%03d" % n for n in range(600)}  # more than one CHUNK each
        for key in sorted(keys):
            writer.set(key, b"v")
        await writer.updates(600)
        for reader in readers:
            await reader.dealer.send([ICANHAZ, b""])
        for reader in readers:
            received = []
            while (frames := await reader.dealer.receive())[0] != KTHXBAI:
                received.append(frames[0])
            assert frames == kthxbai_wire(s, 600, b"")
            assert len(received) == 600 and set(received) == keys


async def _fill(s: Served, count: int) -> RawClient:
    writer = s.client()
    await settle()
    for n in range(count):
        writer.set(b"/k/%05d" % n, b"x" * 100)
        if n % 500 == 499:
            await settle()
    await writer.updates(count)
    return writer


async def test_a_slow_snapshot_reader_gets_every_entry(context, autojump_clock):
    """Its queue fills (ROUTER high-water mark): the server waits, never drops."""
    async with standalone(context, guard=120) as s:
        await _fill(s, 25_000)
        slow = s.client()
        await settle()
        await slow.dealer.send([ICANHAZ, b""])
        received = 0
        while (await slow.dealer.receive())[0] != KTHXBAI:
            received += 1
            if received % 1000 == 0:
                await trio.sleep(1.0)  # slower than the server by far
        assert received == 25_000
        assert s.server.core.stats["snapshots_stalled"] == 0


async def test_a_snapshot_reader_that_stops_is_dropped_after_the_stall_time(
    context, autojump_clock, caplog
):
    async with standalone(context, snapshot_stall=5.0) as s:
        await _fill(s, 25_000)
        stuck = s.client()
        await settle()
        await stuck.dealer.send([ICANHAZ, b""])
        await settle()
        asked = trio.current_time()
        assert len(s.server._transfers) == 1
        # It never reads.  Others are served meanwhile.
        other = s.client()
        await settle()
        entries, end = await other.snapshot(b"/k/0000")
        assert len(entries) == 10 and end.sequence == 25_000
        while s.server._transfers:
            await trio.sleep(0.0005)
        # dropped at the first retry once 5 s passed (retries every 2 ms)
        assert 5.0 <= trio.current_time() - asked <= 5.0025
        assert s.server.core.stats["snapshots_stalled"] == 1
        assert any("took nothing for 5 s" in r.getMessage() for r in caplog.records)
        # Nothing polls for it any more: the snapshot task waits for requests.
        await settle()
        assert not s.server._transfers and s.server._snapshot_wait is not None


async def test_a_snapshot_client_that_goes_away_mid_transfer_is_forgotten(
    context, autojump_clock, caplog
):
    caplog.set_level(logging.INFO, "trioclone")
    async with standalone(context) as s:
        await _fill(s, 25_000)
        leaving = s.client()
        await settle()
        await leaving.dealer.send([ICANHAZ, b""])
        await leaving.dealer.receive()
        leaving.dealer.close()
        await trio.sleep(0.1)
        assert not s.server._transfers
        assert any("went away" in r.getMessage() for r in caplog.records)
        entries, _end = await s.client().snapshot(b"/k/0000")
        assert len(entries) == 10


# --------------------------------------------------------------------------
# 4. TTL
# --------------------------------------------------------------------------


async def test_ttl_expires_into_a_published_delete(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        start = trio.current_time()
        uuid = client.set(b"/t", b"v", ttl=5, properties={"owner": "svc-1"})
        first = await client.next_update()
        assert first.sequence == 1 and first.uuid == uuid and first.ttl == 5.0

        await trio.sleep_until(start + 3)
        entries, _ = await client.snapshot()
        assert trio.current_time() - start == 3.0
        [entry] = entries
        # remaining seconds, never an absolute time
        assert entry.properties == {"owner": "svc-1", "ttl": "2"}
        assert float(entry.properties["ttl"]) == 2.0

        gone = await client.next_update()
        assert trio.current_time() - start == 5.0
        assert gone == KVMsg(b"/t", 2, b"", {}, b"")
        assert await contents(client) == (set(), 2)
        assert s.server.core.stats["expired"] == 1
        assert await no_update_within(client, 20)


async def test_ttl_decimal_form(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        start = trio.current_time()
        client.pub.try_send(kvset(b"/t", b"v", properties=b"ttl=2.500000\n"))
        await client.next_update()
        await trio.sleep_until(start + 1)
        [entry], _ = await client.snapshot()
        assert entry.properties["ttl"] == "1.500000"
        gone = await client.next_update()
        assert trio.current_time() - start == 2.5
        assert gone.key == b"/t" and gone.body == b"" and gone.sequence == 2


async def test_ttl_zero_never_expires(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        client.pub.try_send(kvset(b"/t", b"v", properties=b"ttl=0\n"))
        await client.next_update()
        assert await no_update_within(client, 50)
        entries, sequence = await contents(client)
        assert [(e[0], e[4]) for e in entries] == [(b"/t", b"v")] and sequence == 1


async def test_overwrite_without_ttl_cancels_expiry(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        start = trio.current_time()
        client.set(b"/t", b"v1", ttl=5)
        await client.next_update()
        await trio.sleep_until(start + 2)
        client.set(b"/t", b"v2")
        assert (await client.next_update()).sequence == 2
        assert await no_update_within(client, 20)
        [entry], end = await client.snapshot()
        assert entry.body == b"v2" and "ttl" not in entry.properties
        assert end.sequence == 2


async def test_overwrite_with_new_ttl_moves_the_deadline(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        start = trio.current_time()
        client.set(b"/t", b"v1", ttl=5)
        await client.next_update()
        await trio.sleep_until(start + 2)
        client.set(b"/t", b"v2", ttl=10)
        await client.next_update()
        gone = await client.next_update()
        assert trio.current_time() - start == 12.0
        assert gone.body == b"" and gone.sequence == 3


async def test_deleted_key_with_ttl_is_not_deleted_again(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        start = trio.current_time()
        client.set(b"/t", b"v1", ttl=5)
        client.set(b"/u", b"v1", ttl=7)
        await client.updates(2)
        await trio.sleep_until(start + 1)
        client.set(b"/t", b"")
        assert (await client.next_update()).sequence == 3
        gone = await client.next_update()  # only /u expires
        assert trio.current_time() - start == 7.0
        assert gone.key == b"/u" and gone.sequence == 4
        assert await no_update_within(client, 10)


async def test_many_ttls_expire_in_deadline_order(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        start = trio.current_time()
        ttls = {b"/c": 3, b"/a": 1, b"/d": 3, b"/b": 2}
        for key, ttl in ttls.items():
            client.set(key, b"v", ttl=ttl)
        await client.updates(4)
        seen = []
        for _ in ttls:
            gone = await client.next_update()
            seen.append((gone.key, gone.sequence, trio.current_time() - start))
        assert seen == [
            (b"/a", 5, 1.0),
            (b"/b", 6, 2.0),
            (b"/c", 7, 3.0),
            (b"/d", 8, 3.0),
        ]


# --------------------------------------------------------------------------
# 5. HUGZ
# --------------------------------------------------------------------------


@pytest.mark.parametrize("interval", [1.0, 0.25])
async def test_hugz_at_exact_intervals_from_start(interval, context, autojump_clock):
    endpoints = Endpoints.inproc(unique("hugz"))
    with Sockets(context) as early:
        # connected before the server binds, so even the first HUGZ arrives
        sub = early.open(zmq.SUB, connect=[endpoints.publisher], subscribe=[HUGZ])
        async with standalone(
            context, endpoints=endpoints, hugz_interval=interval
        ) as s:
            times = []
            for _ in range(5):
                frames = await sub.receive()
                assert frames == hugz_wire(s, 0)
                times.append(s.elapsed())
            assert times == [n * interval for n in range(5)]
            assert [b - a for a, b in itertools.pairwise(times)] == [interval] * 4


async def test_hugz_carry_the_current_sequence(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        for _ in range(3):
            client.set(b"/k", b"v")
        await client.updates(3)
        frames = await client.sub.receive()
        assert frames == hugz_wire(s, 3)
        assert s.elapsed() == 1.0


async def test_hugz_keep_their_cadence_under_load(context, autojump_clock):
    async with standalone(context) as s:
        writer = s.client()
        beats = s.sockets.open(
            zmq.SUB, connect=[s.endpoints.publisher], subscribe=[HUGZ]
        )
        await settle()

        async def write() -> None:
            for burst in itertools.count():
                await trio.sleep_until(s.start + 0.125 + burst * 0.25)
                for _ in range(50):
                    writer.set(b"/k", b"v")

        heard = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            for _ in range(4):
                frames = await beats.receive()
                heard.append((s.elapsed(), SEQUENCE.unpack(frames[1])[0]))
            nursery.cancel_scope.cancel()
        # 50 updates every 0.25 s between the beats; the beats stay on time
        assert heard == [(0.0, 0), (1.0, 200), (2.0, 400), (3.0, 600)]


# --------------------------------------------------------------------------
# 6. duplicates
# --------------------------------------------------------------------------


async def test_same_uuid_twice_is_applied_once(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        uuid = uuidlib.uuid4().bytes
        client.set(b"/k", b"first", uuid=uuid)
        client.set(b"/k", b"second", uuid=uuid)
        client.set(b"/other", b"x")
        got = await client.updates(2)
        assert [(m.key, m.sequence, m.body) for m in got] == [
            (b"/k", 1, b"first"),
            (b"/other", 2, b"x"),
        ]
        await settle()
        assert not without_hugz(queued(client.sub))
        assert s.sequence == 2 and s.server.core.stats["duplicates"] == 1
        entries, _ = await contents(client, b"/k")
        assert [e[4] for e in entries] == [b"first"]


async def test_empty_uuid_is_never_a_duplicate(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        client.set(b"/k", b"first", uuid=b"")
        client.set(b"/k", b"second", uuid=b"")
        got = await client.updates(2)
        assert [(m.sequence, m.uuid, m.body) for m in got] == [
            (1, b"", b"first"),
            (2, b"", b"second"),
        ]


# --------------------------------------------------------------------------
# 7. reserved keys
# --------------------------------------------------------------------------


async def test_reserved_keys_are_rejected(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        client.set(b"/k", b"v")
        await client.next_update()
        before = await contents(client)
        client.pub.try_send(kvset(HUGZ, b"x"))
        client.pub.try_send(kvset(KTHXBAI, b"/a/"))
        client.pub.try_send(kvset(HUGZ, b""))
        await settle()
        assert s.rejected == 3
        assert s.sequence == 1
        # only the server's own heartbeats: empty body, no UUID
        assert all(m == hugz_wire(s, 1) for m in queued(client.sub))
        assert await contents(client) == before
        client.set(b"/k2", b"v")
        assert (await client.next_update()).sequence == 2


# --------------------------------------------------------------------------
# 8. bad input never changes state
# --------------------------------------------------------------------------


async def _seed(client: RawClient) -> None:
    client.set(b"/a/1", b"one", properties={"owner": "svc-1"})
    client.set(b"/a/2", b"two", ttl=100)
    client.set(b"/b/1", b"three")
    await client.updates(3)


async def test_invalid_vectors_on_every_port(context, autojump_clock):
    async with standalone(context) as s:
        client = s.client()
        collector = s.sockets.open(zmq.PUB, connect=[s.endpoints.collector])
        dealer = s.sockets.open(zmq.DEALER, connect=[s.endpoints.snapshot])
        xsub = s.sockets.open(zmq.XSUB, connect=[s.endpoints.publisher])
        await settle()
        await _seed(client)
        before = await contents(client)
        now = trio.current_time()

        sendable = [(name, frames) for name, frames in INVALID if frames]
        assert len(sendable) == len(INVALID) - 1  # zmq cannot send 0 frames
        for _, frames in sendable:
            collector.try_send(frames)
            await dealer.send(frames)
            xsub.try_send(frames)
            await settle()

        # each port rejected each message: the publisher reads what an XSUB
        # sends it as subscriptions (none of these is one) each time it
        # publishes; make it read the last one now, at the same instant
        s.server.publisher.admit()
        assert s.server.rejections == {
            "collector": len(sendable),
            "snapshot": len(sendable),
            "publisher": len(sendable),
        }
        assert s.rejected == 3 * len(sendable)
        assert s.sequence == 3
        assert trio.current_time() == now  # same instant: TTLs comparable
        assert await contents(client) == before
        assert not without_hugz(queued(client.sub))
        assert queued(dealer) == []  # a bad request gets no reply at all

        # the server keeps serving on every port
        client.set(b"/c/1", b"four")
        assert (await client.next_update()).sequence == 4
        found, sequence = await contents(client)
        assert len(found) == 4 and sequence == 4
        await dealer.send([ICANHAZ, b"/b/"])
        assert decode_kvmsg(await dealer.receive()).key == b"/b/1"
        assert decode_kvmsg(await dealer.receive()).key == KTHXBAI


@pytest.mark.parametrize(("name", "frames"), [v for v in INVALID if v[1]])
async def test_each_invalid_vector_is_rejected_alone(
    name, frames, context, autojump_clock
):
    async with standalone(context) as s:
        client = s.client()
        await settle()
        await _seed(client)
        before = await contents(client)
        client.pub.try_send(frames)
        await settle()
        assert s.rejected == 1, name
        await client.dealer.send(frames)
        await settle()
        assert s.rejected == 2, name
        assert queued(client.dealer) == []
        assert await contents(client) == before
        assert s.sequence == 3


def _applies(frames: Sequence[bytes]) -> bool:
    """Would the server apply these frames as a KVSET?"""
    try:
        msg = decode_kvmsg(frames)
    except RemoteProtocolError:
        return False
    return msg.key not in (HUGZ, KTHXBAI)


def _is_request(frames: Sequence[bytes]) -> bool:
    try:
        decode_request(frames)
    except RemoteProtocolError:
        return False
    return True


_frame = st.one_of(
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"",
            ICANHAZ,
            HUGZ,
            KTHXBAI,
            b"/a/",
            bytes(8),
            SEQUENCE.pack(-1),
            bytes(16),
            b"ttl=5\n",
            b"ttl=nan\n",
            b"ttl=inf\n",
            b"ttl=-1\n",
            b"ttl=1e999\n",
            b"ttl\n",
            b"=x\n",
            b"a=\xff\n",
        ]
    ),
)
_message = st.lists(_frame, min_size=1, max_size=7)
_messages = st.lists(_message, min_size=1, max_size=5)


@hypothesis.settings(max_examples=50, deadline=None, database=None)
@given(to_collector=_messages, to_snapshot=_messages)
def test_random_frames_never_change_state(
    to_collector: list[Frames], to_snapshot: list[Frames]
) -> None:
    assume(not any(_applies(frames) for frames in to_collector))
    context: Context = zmq.Context(io_threads=0)
    try:
        trio.run(
            _random_frames,
            context,
            to_collector,
            to_snapshot,
            clock=trio.testing.MockClock(autojump_threshold=0),
        )
    finally:
        context.destroy(linger=0)


async def _random_frames(
    context: Context, to_collector: list[Frames], to_snapshot: list[Frames]
) -> None:
    async with standalone(context) as s:
        client = s.client()
        dealer = s.sockets.open(zmq.DEALER, connect=[s.endpoints.snapshot])
        await settle()
        await _seed(client)
        before = await contents(client)
        for frames in to_collector:
            client.pub.try_send(frames)
        for frames in to_snapshot:
            await dealer.send(frames)
        await settle()

        requests = sum(map(_is_request, to_snapshot))
        assert s.rejected == len(to_collector) + len(to_snapshot) - requests
        assert s.sequence == 3
        assert await contents(client) == before
        assert not without_hugz(queued(client.sub))
        # a random message that is a valid ICANHAZ just gets its snapshot
        replies = queued(dealer)
        assert sum(m[0] == KTHXBAI for m in replies) == requests
        client.set(b"/c/1", b"four")
        assert (await client.next_update()).sequence == 4


# --------------------------------------------------------------------------
# 9. logging
# --------------------------------------------------------------------------


async def test_rejections_are_logged_at_a_limited_rate(context, autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="trioclone.server")
    async with standalone(context) as s:
        client = s.client()
        await settle()
        caplog.clear()
        for n in range(1000):
            client.pub.try_send([b"bad", b"%d" % n])
            if n % 100 == 99:
                await settle()
        await settle()
        assert s.rejected == 1000
        assert s.elapsed() == 0.0
        records = [r for r in caplog.records if r.name == "trioclone.server"]
        assert 1 <= len(records) <= 11
        assert all(r.levelno == logging.WARNING for r in records)
        assert "collector" in records[0].getMessage()

        # in the next window: one line counts the ones suppressed
        caplog.clear()
        await trio.sleep(10)
        client.pub.try_send([b"bad"])
        await settle()
        messages = [r.getMessage() for r in caplog.records]
        assert any("990 more suppressed" in m for m in messages), messages
        assert len(messages) == 2


async def test_valid_updates_are_not_logged(context, autojump_clock, caplog):
    caplog.set_level(logging.DEBUG, logger="trioclone")
    async with standalone(context) as s:
        client = s.client()
        await settle()
        caplog.clear()
        for n in range(100):
            client.set(b"/k/%d" % n, b"v")
        await client.updates(100)
        await client.snapshot()
        await trio.sleep(5)  # TTL-less updates, HUGZ ticking
        noisy = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert noisy == [], [r.getMessage() for r in noisy]
        assert s.sequence == 100


# --------------------------------------------------------------------------
# 9. trioclone's additions are invisible to a client that follows the RFC
# --------------------------------------------------------------------------


async def test_a_guide_style_client_never_stores_trioclones_additions(
    context, autojump_clock
):
    """The Guide's clients apply an update only if its sequence is newer than
    theirs, whatever its key: the lineage property of HUGZ and KTHXBAI, and
    the subtree heartbeats (sequence 0), never reach their maps."""
    async with standalone(context) as s:
        whole, under_a = s.client(), s.client(b"/a/")
        under_a.sub.raw.setsockopt(zmq.SUBSCRIBE, HUGZ)
        await settle()
        writer = s.client()
        await settle()
        maps: list[dict[bytes, bytes]] = [{}, {}]
        sequences = [0, 0]
        for n, client in enumerate((whole, under_a)):
            entries, end = await client.snapshot(b"" if n == 0 else b"/a/")
            maps[n] = {e.key: e.body for e in entries}
            sequences[n] = end.sequence
        for i in range(5):
            writer.set(b"/a/%d" % i, b"v")
            writer.set(b"/b/%d" % i, b"w")
        await trio.sleep(3.5)  # HUGZ and subtree heartbeats went out meanwhile
        kinds = set()
        for n, client in enumerate((whole, under_a)):
            for frames in queued(client.sub):
                msg = decode_kvmsg(frames)
                kinds.add(msg.key if msg.key in (HUGZ, b"/a/\x00HUGZ") else b"data")
                if msg.sequence > sequences[n]:  # the Guide's rule (a subtree
                    sequences[n] = msg.sequence  # client applies HUGZ too: an
                    if msg.body:  # empty body, so it deletes nothing)
                        maps[n][msg.key] = msg.body
                    else:
                        maps[n].pop(msg.key, None)
        assert kinds == {HUGZ, b"/a/\x00HUGZ", b"data"}  # all of them were seen
        assert maps[0] == {
            **{b"/a/%d" % i: b"v" for i in range(5)},
            **{b"/b/%d" % i: b"w" for i in range(5)},
        }
        assert maps[1] == {b"/a/%d" % i: b"v" for i in range(5)}


def scan_steps(monkeypatch: pytest.MonkeyPatch) -> WorkPerStep:
    """Keys looked at by subtree scans (``Scan.advance``)."""
    steps = WorkPerStep()
    steps.patch(monkeypatch, Scan, "advance", lambda looked, _: looked)
    return steps


async def test_subtree_snapshot_requests_do_not_stall_the_server(
    context, autojump_clock, monkeypatch
):
    """50 clients ask at once for snapshots of 50 subtrees of a 100,000-key
    map: no task step of the server may scan more than a schedule point's
    worth of keys.  Each transfer picks its subtree's keys from the shared
    list of all keys as it goes, a bounded number per step, instead of
    scanning the map when the request comes."""
    async with standalone(context) as served:
        store = served.server.core.store
        for n in range(100_000):
            store.put(b"/k/%06d" % n, store.next_sequence(), b"", b"", b"v", None, 0)
        dealers = [
            served.sockets.open(zmq.DEALER, connect=[served.endpoints.snapshot])
            for _ in range(50)
        ]
        await settle()
        steps = scan_steps(monkeypatch)
        trio.lowlevel.add_instrument(steps)
        try:
            for n, dealer in enumerate(dealers):
                assert dealer.try_send(encode_request(b"/sub/%02d/" % n))
            for dealer in dealers:
                await dealer.receive()  # each KTHXBAI (no key under its subtree)
        finally:
            trio.lowlevel.remove_instrument(steps)
        assert steps.total >= 100_000, "the subtrees were not found by a scan"
        # a schedule point's worth: PUMP (1,024) keys, plus a peek's SKIP (256)
        assert steps.largest <= 1024 + 256, (
            f"one task step scanned {steps.largest:,} keys"
        )


async def test_snapshot_requests_beyond_the_limits_wait_or_are_refused(
    context, autojump_clock, monkeypatch, caplog
):
    """At most MAX_TRANSFERS replies are in progress (each holds a key list);
    the next requests wait their turn, up to MAX_QUEUED; beyond that one is
    not answered (logged and counted), and the client asks again."""
    monkeypatch.setattr("trioclone.server.snapshots.MAX_TRANSFERS", 2)
    monkeypatch.setattr("trioclone.server.snapshots.MAX_QUEUED", 3)
    async with standalone(context) as s:
        await _fill(s, 20_000)  # more than a client's queue holds: they wait
        clients = [s.client() for _ in range(6)]
        await settle()
        for client in clients:  # all at once, none read yet
            await client.dealer.send([ICANHAZ, b""])
        await settle()
        assert len(s.server._transfers) == 2 and len(s.server._queued) == 3
        assert s.server.core.stats["snapshots_refused"] == 1
        assert any("one more is not answered" in r.getMessage() for r in caplog.records)
        answered = 0
        for client in clients[:5]:
            received = 0
            while (await client.dealer.receive())[0] != KTHXBAI:
                received += 1
            assert received == 20_000
            answered += 1
        assert answered == 5 and not s.server._transfers and not s.server._queued
        assert queued(clients[5].dealer) == []


async def test_sibling_subtree_snapshots_share_one_scan_of_the_map(
    context, autojump_clock, monkeypatch
):
    """128 clients of small subtrees ask at once; the map holds 250,000 other
    keys, and each subtree's key was written last.  Were each transfer to
    scan the whole map for its own subtree, round-robin with the others,
    every client's first message would wait for 128 scans of the map
    (seconds: past a client's 1 s request timeout).  Sibling subtrees share
    one pass, so every client has its first message by the time about one
    map's worth of keys was looked at."""
    async with standalone(context, guard=600.0) as served:
        store = served.server.core.store
        for n in range(250_000):
            store.put(b"/k/%06d" % n, store.next_sequence(), b"", b"", b"v", None, 0)
        clients = 128
        for n in range(clients):
            store.put(b"/s/%03d/x" % n, store.next_sequence(), b"", b"", b"v", None, 0)
        dealers = [
            served.sockets.open(zmq.DEALER, connect=[served.endpoints.snapshot])
            for _ in range(clients)
        ]
        await settle()
        steps = scan_steps(monkeypatch)
        for n, dealer in enumerate(dealers):
            assert dealer.try_send(encode_request(b"/s/%03d/" % n))
        scanned: list[int] = []
        for n, dealer in enumerate(dealers):
            assert (await dealer.receive())[0] == b"/s/%03d/x" % n
            scanned.append(steps.total)
            assert (await dealer.receive())[0] == KTHXBAI
        map_size = len(store)
        assert max(scanned) <= 2 * map_size, (
            f"the last client's first message came after {max(scanned):,} keys "
            f"were scanned, {max(scanned) / map_size:.1f} times the map"
        )
