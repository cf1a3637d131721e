"""The Trio client against a fake of the Guide's Model Six server (master).

``ReferenceServer`` is written from the spec (spec/chp.md, "what the
reference servers send") and from the Guide's Python ``clonesrv6.py``, not
from trioclone: it builds every frame by hand with ``struct``.  It differs
from trioclone's server, and from RFC 12, the way the reference does:

* KVSYNC is the stored kvmsg whole: the writer's UUID and its properties;
* a ``ttl`` is stored as an absolute UNIX time (``%f``), and snapshots send
  that stored form; expiry is a sweep once a second;
* a TTL delete republishes the stored kvmsg with an empty body (UUID and
  absolute ``ttl`` kept);
* KTHXBAI and HUGZ carry a random UUID (the Python ``KVMsg`` makes one);
  HUGZ carries the current sequence and goes out once a second;
* a client KVSET is republished at once with the next sequence, as sent
  (relative ``ttl``), and only then stored.

Its wall clock is a fixed UNIX time plus Trio's (virtual) clock, so runs
are deterministic.  Everything runs over inproc under the autojump clock.
"""

from __future__ import annotations

import random
import struct
import uuid as uuidlib
from dataclasses import dataclass
from typing import NoReturn

import trio
import zmq

from tests.chp import RawClient, settle, unique
from trioclone import DeleteEvent, ResyncEvent, SetEvent, open_client
from trioclone._zmq import Socket, Sockets
from trioclone.endpoints import Endpoints

GUARD = 60.0
WALL_EPOCH = 1_764_300_000.0  # the fake's UNIX time at virtual time 0
SEQ = struct.Struct("!q")


@dataclass
class Stored:
    key: bytes
    sequence: int
    uuid: bytes
    properties: dict[bytes, bytes]
    body: bytes

    def frames(self) -> list[bytes]:
        return [
            self.key,
            SEQ.pack(self.sequence),
            self.uuid,
            props(self.properties),
            self.body,
        ]


def props(properties: dict[bytes, bytes]) -> bytes:
    return b"".join(b"%s=%s\n" % item for item in properties.items())


def parse_props(frame: bytes) -> dict[bytes, bytes]:
    """As the reference: split lines at '=', skip what does not parse."""
    parsed = {}
    for line in frame.split(b"\n"):
        name, sep, value = line.partition(b"=")
        if sep:
            parsed[name] = value
    return parsed


class ReferenceServer:
    """A Model Six server in the master role, as the Guide's Python code."""

    def __init__(self, sockets: Sockets, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self.router: Socket = sockets.open(zmq.ROUTER, bind=[endpoints.snapshot])
        self.publisher: Socket = sockets.open(zmq.PUB, bind=[endpoints.publisher])
        self.collector: Socket = sockets.open(
            zmq.SUB, bind=[endpoints.collector], subscribe=[b""]
        )
        self.kvmap: dict[bytes, Stored] = {}
        self.sequence = 0
        self.published: list[list[bytes]] = []

    @staticmethod
    def wall() -> float:
        return WALL_EPOCH + trio.current_time()

    def preload(self, key: bytes, body: bytes, ttl: float | None = None) -> Stored:
        """An entry as if a client had written it earlier (not published)."""
        self.sequence += 1
        properties = {b"owner": b"earlier"}
        if ttl is not None:
            properties[b"ttl"] = b"%f" % (self.wall() + ttl)
        stored = Stored(key, self.sequence, uuidlib.uuid4().bytes, properties, body)
        self.kvmap[key] = stored
        return stored

    async def run(self) -> NoReturn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._snapshots)
            nursery.start_soon(self._collect)
            nursery.start_soon(self._every_second, self._send_hugz)
            nursery.start_soon(self._every_second, self._flush_ttl)
        raise AssertionError("never returns")

    def _publish(self, frames: list[bytes]) -> None:
        self.published.append(frames)
        self.publisher.try_send(frames)

    async def _snapshots(self) -> NoReturn:
        while True:
            identity, *request = await self.router.receive()
            if len(request) != 2 or request[0] != b"ICANHAZ?":
                continue  # the reference stops its loop here (defect 1)
            subtree = request[1]
            for stored in list(self.kvmap.values()):
                if stored.key.startswith(subtree):
                    await self.router.send([identity, *stored.frames()])
            await self.router.send(
                [
                    identity,
                    b"KTHXBAI",
                    SEQ.pack(self.sequence),
                    uuidlib.uuid4().bytes,
                    b"",
                    subtree,
                ]
            )

    async def _collect(self) -> NoReturn:
        while True:
            key, _, uuid, properties, body = await self.collector.receive()
            self.sequence += 1
            self._publish([key, SEQ.pack(self.sequence), uuid, properties, body])
            parsed = parse_props(properties)
            ttl = self._ttl(parsed)
            if ttl:
                parsed[b"ttl"] = b"%f" % (self.wall() + ttl)
            if body:
                self.kvmap[key] = Stored(key, self.sequence, uuid, parsed, body)
            else:
                self.kvmap.pop(key, None)

    def _ttl(self, parsed: dict[bytes, bytes]) -> float:
        """Seconds to live, as clonesrv6.py reads them: 0 is no expiry."""
        return float(parsed.get(b"ttl", 0))

    async def _every_second(self, action) -> NoReturn:
        while True:
            await trio.sleep(1.0)
            action()

    def _send_hugz(self) -> None:
        self._publish(
            [b"HUGZ", SEQ.pack(self.sequence), uuidlib.uuid4().bytes, b"", b""]
        )

    def _flush_ttl(self) -> None:
        for stored in list(self.kvmap.values()):
            ttl = float(stored.properties.get(b"ttl", 0))
            if ttl and ttl <= self.wall():
                self.sequence += 1
                stored.sequence = self.sequence
                stored.body = b""
                self._publish(stored.frames())
                del self.kvmap[stored.key]


async def settle_links() -> None:
    """Let every task block: every link made so far is then attached (see
    tests/shells/test_client.py).  The fake's PUB does not read EVENTS before
    sending; here each update that must reach a fresh subscriber is the
    first message it ever sends, which libzmq never throttles."""
    await settle()


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[float, object]] = []

    async def run(self, watch) -> None:
        async for event in watch:
            self.seen.append((trio.current_time(), event))


async def test_client_syncs_follows_and_writes_through_a_reference_server(
    context, autojump_clock
):
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            ref = ReferenceServer(sockets, Endpoints.inproc(unique("reference")))
            plain = ref.preload(b"/ref/plain", b"p")
            lasting = ref.preload(b"/ref/lasting", b"l", ttl=100)
            ref.preload(b"/elsewhere", b"e")
            nursery.start_soon(ref.run)
            writer = RawClient(sockets, ref.endpoints)
            await settle_links()

            async with open_client([ref.endpoints], context=context) as clone:
                recorder = Recorder()
                nursery.start_soon(recorder.run, clone.watch("/ref/"))
                await clone.wait_synced()
                await settle_links()
                # synced from KVSYNCs that carry UUIDs and an absolute ttl
                assert clone.sequence == ref.sequence == 3
                assert dict(clone.items()) == {
                    "/ref/plain": b"p",
                    "/ref/lasting": b"l",
                    "/elsewhere": b"e",
                }
                # the public API shows values only: look at the core's entries
                kept = clone._core.entries[b"/ref/lasting"]
                assert kept.uuid == lasting.uuid
                assert kept.properties == {
                    "owner": "earlier",
                    "ttl": lasting.properties[b"ttl"].decode(),
                }
                assert clone._core.entries[b"/ref/plain"].uuid == plain.uuid

                # follows the stream: another writer's update
                writer.set(b"/ref/other", b"o")
                await settle()
                assert clone.get("/ref/other") == b"o"
                assert clone.sequence == 4

                # its own write, confirmed by its UUID coming back
                assert await clone.set("/ref/mine", "m") == 5
                assert clone.get("/ref/mine") == b"m"
                assert ref.kvmap[b"/ref/mine"].body == b"m"

                # a ttl: the reference stores an absolute time and sweeps
                # once a second (on whole virtual seconds here)
                await trio.sleep_until(int(trio.current_time()) + 1.5)
                t1 = trio.current_time()
                assert await clone.set("/ref/eph", "e", ttl=2) == 6
                stored_ttl = ref.kvmap[b"/ref/eph"].properties[b"ttl"]
                assert stored_ttl == b"%f" % (WALL_EPOCH + t1 + 2)

                # a second client's snapshot holds that absolute ttl
                async with open_client(
                    [ref.endpoints], "/ref/", context=context
                ) as second:
                    await second.wait_synced()
                    assert second.get("/ref/eph") == b"e"
                    assert second._core.entries[b"/ref/eph"].properties == {
                        "ttl": stored_ttl.decode()
                    }
                    assert second.get("/elsewhere") is None

                await trio.sleep(5)
                assert clone.get("/ref/eph") is None
                assert clone.failovers == 0
                assert clone.server == str(ref.endpoints)

            # HUGZ with the current sequence and a random UUID never made it
            # resync; the TTL delete came at the first sweep after t1 + 2
            assert [e for _, e in recorder.seen] == [
                ResyncEvent(
                    str(ref.endpoints), {"/ref/plain": b"p", "/ref/lasting": b"l"}
                ),
                SetEvent("/ref/other", b"o", 4),
                SetEvent("/ref/mine", b"m", 5),
                SetEvent("/ref/eph", b"e", 6),
                DeleteEvent("/ref/eph", 7),
            ]
            assert recorder.seen[-1][0] == t1 + 2.5
            # the delete the reference sent kept the writer's UUID and ttl
            delete = [f for f in ref.published if f[0] == b"/ref/eph"][-1]
            assert delete[4] == b"" and len(delete[2]) == 16
            assert parse_props(delete[3])[b"ttl"] == stored_ttl
            nursery.cancel_scope.cancel()


async def test_subtree_client_of_a_reference_server(context, autojump_clock):
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            ref = ReferenceServer(sockets, Endpoints.inproc(unique("reference")))
            ref.preload(b"/a/1", b"one", ttl=50)
            ref.preload(b"/b/1", b"two")
            nursery.start_soon(ref.run)
            async with open_client([ref.endpoints], "/a/", context=context) as clone:
                await clone.wait_synced()
                await settle_links()
                assert clone.items() == [("/a/1", b"one")]
                assert clone.sequence == 2  # KTHXBAI's: the server's sequence
                assert await clone.set("/a/2", "three") == 3
                await trio.sleep(3)  # HUGZ at the current sequence: no trouble
                assert clone.phase == "active"
                assert clone.failovers == 0
                assert sorted(clone.keys()) == ["/a/1", "/a/2"]
            nursery.cancel_scope.cancel()


class CReferenceServer(ReferenceServer):
    """The Guide's C server's collector (clonesrv6.c, spec defect 12): it reads
    ``ttl`` with ``sscanf("%d")`` into an uninitialised int, so a KVSET with
    no ``ttl`` gets whatever was on the stack: here, a random 1-3 seconds.
    (It stores the absolute time in milliseconds; the fake keeps seconds.)"""

    def __init__(self, sockets: Sockets, endpoints: Endpoints, seed: int) -> None:
        super().__init__(sockets, endpoints)
        self.garbage = random.Random(seed)

    def _ttl(self, parsed: dict[bytes, bytes]) -> float:
        text = parsed.get(b"ttl")
        return int(float(text)) if text else self.garbage.randint(1, 3)


async def test_writes_through_the_guides_c_server_do_not_vanish(
    context, autojump_clock
):
    """The client sends ttl=0 for a write without expiry, which the C server
    reads as "never"; a write with a ttl keeps its ttl."""
    with trio.fail_after(GUARD), Sockets(context) as sockets:
        async with trio.open_nursery() as nursery:
            ref = CReferenceServer(sockets, Endpoints.inproc(unique("c-ref")), seed=7)
            nursery.start_soon(ref.run)
            async with open_client([ref.endpoints], context=context) as clone:
                await clone.wait_synced()
                await settle_links()
                for n in range(5):
                    await clone.set(f"/t/{n}", "one")
                await clone.set("/t/short", "soon", ttl=2)
                await trio.sleep(5)
                assert sorted(clone.keys()) == [f"/t/{n}" for n in range(5)]
                assert sorted(ref.kvmap) == [b"/t/%d" % n for n in range(5)]
                # the fake does what the C server does: a write without ttl
                # (another client's) vanishes
                raw = RawClient(sockets, ref.endpoints)
                await settle()
                raw.set(b"/t/raw", b"no ttl")
                await settle()
                # it arrived, with a garbage ttl of 1-3 s, and the client has it
                assert b"/t/raw" in ref.kvmap
                assert b"ttl" in ref.kvmap[b"/t/raw"].properties
                assert clone.get("/t/raw") == b"no ttl"
                await trio.sleep(5)
                assert clone.get("/t/raw") is None
            nursery.cancel_scope.cancel()


async def test_a_subtree_heartbeat_with_a_strange_last_does_not_kill_the_client(
    context, autojump_clock
):
    """A Guide server republishes whatever a client writes, a key that looks
    like a subtree heartbeat with a strange ``last`` too ("²"): the client
    ignores it and keeps serving."""
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
                raw.set(b"/a/after", b"two")
                await settle()
                # The fake republished both, in that order, on its one PUB:
                # the client, which has the second, received the first before.
                assert [f[0] for f in ref.published if f[0].startswith(b"/a/")] == [
                    b"/a/\x00HUGZ",
                    b"/a/after",
                ]
                assert clone.get("/a/after") == b"two"
                await trio.sleep(2)
                assert clone.phase == "active"
                assert clone.get("/a/1") == b"one"
            nursery.cancel_scope.cancel()
