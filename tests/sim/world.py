"""One seeded run of a whole trioclone system: a Binary Star pair, writers
and watchers, a simulated network, faults, and the invariants at the end.

The servers are ``CloneServer`` and the clients ``open_client``: the
production shells and cores, unchanged, on ``tests.sim.net``'s sockets,
under Trio's mock clock.  A seed decides everything: the network's delays,
the fault schedule, what the writers write and when, and the order in which
Trio runs tasks that are ready at the same moment (see ``deterministic``).

Faults (``World._faults``), from ``FAULT_START`` to ``duration``
---------------------------------------------------------------
* SIGKILL of either server, restarted after a while: with the map it kept on
  disk (two seeds in three, ``durable``: each server has a data folder, and
  the wall clock is Trio's) or empty.  With maps on disk a server is
  killed at any moment: what its peer did not receive comes back when it
  restarts.  Without, only while its peer holds the whole map (active, or
  a passive that completed a copy) and nothing else is wrong with the peer
  (no cut or stall, no node frozen, not slow or behind): the pair then
  promises to survive one failure at a time, as its replication is
  asynchronous.
* SIGKILL of both servers (in one seed in ten or so), restarted in either
  order: the map comes back from disk (``durable``), or is lost, and then
  writes confirmed before it bind nothing; clients must notice the new map.
* SIGKILL of a client, restarted after a while.
* A cut (connections reset, what was in flight lost) or a stall (a
  partition TCP rides out: everything waits) between a server and a
  client, or between the two servers (a split).
* A frozen node (cut off from everyone, losing nothing; see net.py).
* A slow reader: its links serialise messages, so a publisher's high-water
  mark (40 or 200 in half the seeds) drops some.
Each server runs with ``--sync-timeout`` 5 s, or 1 s in a third of the
seeds (more failed sync attempts).

Invariants
----------
All along (``_monitor``, every 0.25 s, and ``published``):

* ``entries_published``: a synced client holds only entries that a server
  published, at that sequence, in the history it follows (lineage and
  branch, ``chp.map_of``; below the branch, in the lineage).
* ``applied_once``: no server process (no server, over its restarts, when
  ``durable``) publishes one UUID twice in one history (lineage and
  branch: a fork it abandoned is another history).
* ``sequence_increases``: within one active period of a server, the
  sequences it publishes in a lineage strictly increase.
* ``takeover_keeps_heard``: a server that takes over holds, for each key,
  the newest update its passive heard on the stream (in the lineage it
  serves), or a newer one.
* ``livelock``: tasks never run for ever at one virtual instant.
* ``crashed``: no task of any server or client raises.

Once every fault healed (``_heal``) and the system settled (``_settle``):

* ``settled``: within ``SETTLE_LIMIT`` s one server is active and serving,
  the other passive and synced, every client synced and idle, nothing
  waits behind a slow link, and nothing changes for ``STEADY`` s.
* ``maps_equal``: every client's map (values and sequences) and the
  passive's copy equal the active's, restricted to their subtrees.
* ``confirmed_kept``: for each key, the value held is that of the last
  confirmed write to it or of a write issued after that one (a delete or
  a TTL write may leave it absent).
* ``ttl_expires``: the active holds no value more than 1 s past its TTL.
* ``watch_rebuilds``: a watcher's events, applied in order, rebuild its
  client's map under the watched prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import trio
import trio.testing
from trio._core import _run as trio_run

from tests.sim.net import Network
from trioclone.client.agent import CloneClient, open_client
from trioclone.client.events import DeleteEvent, ResyncEvent, SetEvent
from trioclone.core.chp import (
    HUGZ,
    KTHXBAI,
    SEQUENCE,
    TTL,
    decode_kvmsg,
    map_of,
)
from trioclone.core.replica import Phase, _same as same_history
from trioclone.core.server import Role
from trioclone.endpoints import Endpoints
from trioclone.errors import RemoteProtocolError, WriteTimeoutError
from trioclone.server.clone import CloneServer
from trioclone.server.settings import PairSettings, ServerSettings

SERVERS = ("primary", "backup")
FAULT_START = 3.0
SETTLE_LIMIT = 120.0
STEADY = 3.0
WRITE_TIMEOUT = 5.0


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


@dataclass
class Write:
    writer: str
    key: bytes
    value: bytes  # b"": a delete
    ttl: float | None
    issued: float
    sequence: int | None = None  # confirmed at
    confirmed: float | None = None  # when
    timed_out: bool = False


@dataclass
class Result:
    seed: int
    violations: list[Violation]
    trace: list[str]
    end: float
    faults: list[str]
    writes: int
    confirmed: int

    @property
    def ok(self) -> bool:
        return not self.violations

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()[:16]

    def summary(self) -> str:
        verdict = "ok" if self.ok else "FAILED " + "; ".join(map(str, self.violations))
        return (
            f"seed {self.seed}: {verdict} ({len(self.faults)} faults, "
            f"{self.confirmed}/{self.writes} writes confirmed, "
            f"{self.end:.1f} s simulated, trace {self.digest()})"
        )


# -- determinism --------------------------------------------------------------


@contextlib.contextmanager
def deterministic(seed: int) -> Iterator[None]:
    """Trio's scheduler, seeded: the order of tasks that are ready together,
    and of cancel scopes whose deadlines are equal (Trio breaks those ties by
    ``id()``, a memory address: here by the order they were set)."""
    for name in ("Deadlines", "_r", "_ALLOW_DETERMINISTIC_SCHEDULING", "heappush"):
        if not hasattr(trio_run, name):  # Trio's internals moved: say so
            raise RuntimeError(
                f"trio {trio.__version__} has no trio._core._run.{name}: the "
                "simulation cannot make its scheduling deterministic"
            )
    deadlines = trio_run.Deadlines
    original = deadlines.add
    order = itertools.count()

    def add(self: Any, deadline: float, cancel_scope: Any) -> None:
        trio_run.heappush(self._heap, (deadline, next(order), cancel_scope))
        self._active += 1

    state = trio_run._r.getstate()
    trio_run._r.seed(seed)
    deadlines.add = add  # type: ignore[method-assign]
    # Trio picks its ordering by whether Hypothesis was imported (pytest
    # loads its plugin): the same choice everywhere, so a seed run by the
    # test suite and by tools/sim.py is the same run.
    allowed = trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    try:
        yield
    finally:
        deadlines.add = original  # type: ignore[method-assign]
        trio_run._r.setstate(state)
        trio_run._ALLOW_DETERMINISTIC_SCHEDULING = allowed  # type: ignore[misc]


# -- the system ---------------------------------------------------------------


def settings_for(rng: random.Random, folder: str | None) -> dict[str, ServerSettings]:
    chp = {
        name: Endpoints(
            f"sim://{name}/snapshot",
            f"sim://{name}/publisher",
            f"sim://{name}/collector",
        )
        for name in SERVERS
    }
    hwm = rng.choice([100_000, 100_000, 200, 40])
    sync_timeout = rng.choice([5.0, 5.0, 1.0])  # 1 s: more failed sync attempts
    result = {}
    for me, peer in (SERVERS, SERVERS[::-1]):
        pair = PairSettings(
            primary=me == "primary",
            state_bind=f"sim://{me}/state",
            state_peer=f"sim://{peer}/state",
            peer=chp[peer],
        )
        result[me] = ServerSettings(
            bind=chp[me],
            pair=pair,
            name=me,
            publisher_hwm=hwm,
            sync_timeout=sync_timeout,
            status_interval=3600,
            data_dir=None if folder is None else f"{folder}/{me}",
        )
    return result


class ServerNode:
    """A server process: started, killed (SIGKILL), started again empty."""

    def __init__(self, world: World, name: str, settings: ServerSettings) -> None:
        self.world = world
        self.name = name
        self.settings = settings
        self.server: CloneServer | None = None
        self.scope: trio.CancelScope | None = None
        self.incarnation = 0
        self.period = 0
        #: What this server's passive heard on the stream: key -> (sequence,
        #: history (lineage/branch), body, has a TTL), the newest; checked
        #: once it took over, against the history of the map it took over.
        self.heard: dict[bytes, tuple[int, str | None, bytes, bool]] = {}
        self.to_check: dict[bytes, tuple[int, str | None, bytes, bool]] | None = None
        self._lineage: str | None = None
        self._connection: object = None
        self._unsure: dict[bytes, tuple[int, str | None, bytes, bool]] | None = None
        self._stopped: trio.Event | None = None  # set once its task ended
        self.took_history: str | None = None  # of the map its passive held

    @property
    def alive(self) -> bool:
        return self.server is not None

    def _observe(self, server: CloneServer) -> None:
        """Watch what the passive's replica is fed (an observer: the shell's
        handler is called as it is)."""
        handler = server._mirror

        async def mirror(is_reply: bool, batch: list[list[bytes]]) -> None:
            if server.core.role is Role.PASSIVE:
                connection = server._follower.current if server._follower else None
                if connection is not self._connection:  # a new connection:
                    self._connection, self._unsure = connection, {}  # whose map?
                for frames in batch:
                    (self._snapshot if is_reply else self._heard)(frames, server)
            await handler(is_reply, batch)

        server._mirror = mirror  # type: ignore[method-assign]
        core, become_active = server.core, server.core._become_active

        def taking_over(now: float) -> None:
            replica = core.replica  # (the history of the map it takes over)
            self.took_history = replica.history if replica is not None else None
            become_active(now)

        core._become_active = taking_over  # type: ignore[method-assign]

    def _snapshot(self, frames: list[bytes], server: CloneServer) -> None:
        """A snapshot's end: it speaks for every key up to its sequence
        (a key it lacks was deleted), so what was heard before is moot; and
        it says whose map the connection carries."""
        if frames and frames[0] == KTHXBAI and len(frames) == 5:
            self._sure()
            upto = SEQUENCE.unpack(frames[1])[0]
            self.heard = {k: v for k, v in self.heard.items() if v[0] > upto}

    def _heard(self, frames: list[bytes], server: CloneServer) -> None:
        """An update the passive heard counts once its connection said (a
        HUGZ naming the history of the map it holds, lineage and branch, or
        a snapshot) that it carries that map: before, it could be another
        map's (a restarted server's)."""
        try:
            msg = decode_kvmsg(frames)
        except RemoteProtocolError:
            return
        if msg.key == HUGZ:
            self._lineage = map_of(msg)
            # the map's history is the replica's (a map kept on disk and not
            # synced since holds its own: another branch is another map)
            replica = server.core.replica
            ours = replica.history if replica is not None else None
            if ours is not None and same_history(map_of(msg), ours):
                self._sure()
            else:
                self._unsure = {}
        elif msg.sequence:
            target = self.heard if self._unsure is None else self._unsure
            held = target.get(msg.key)
            if held is None or held[0] < msg.sequence:
                ttl = TTL in msg.properties
                target[msg.key] = (msg.sequence, self._lineage, msg.body, ttl)

    def _sure(self) -> None:
        unsure, self._unsure = self._unsure, None
        for key, value in (unsure or {}).items():
            held = self.heard.get(key)
            if held is None or held[0] < value[0]:
                self.heard[key] = value

    async def start(self, nursery: trio.Nursery) -> None:
        if self._stopped is not None:
            await self._stopped.wait()  # (its data folder is free again)
        self.incarnation += 1
        server = CloneServer(
            self.settings,
            sockets=self.world.net.sockets(self.name),
            wall=trio.current_time,
        )
        self.server = server
        self.heard, self.to_check, self._lineage = {}, None, None
        self._observe(server)
        self.world.log(f"start {self.name} #{self.incarnation}")
        await nursery.start(self._run, server)
        incarnation = self.incarnation

        def traced(role: str, step: str) -> None:
            if role == "active" and step == "enter":
                self.period += 1
            if role == "passive":
                self.to_check = self.heard if step == "exit" else None
                self.heard = {}
            core = server.core
            self.world.log(
                f"{self.name} {step}s {role} (sequence {core.sequence}, "
                f"lineage {self.world.alias(core.lineage)}, pending {len(core.pending)})"
            )

        server.trace = traced
        server.publisher.observer = lambda frames: self.world.published(
            self, incarnation, frames
        )

    async def _run(self, server: CloneServer, *, task_status: Any) -> None:
        self._stopped = stopped = trio.Event()
        with trio.CancelScope() as self.scope:
            try:
                await server.run(task_status=task_status)
            except Exception as exc:
                self.world.crash(f"{self.name}: {exc!r}")
            finally:
                stopped.set()

    def kill(self) -> None:
        self.world.log(f"kill {self.name}")
        if self.scope is not None:
            self.scope.cancel()  # first: no task of it runs again
        self.world.net.kill(self.name)
        self.server = None

    def holds_map(self) -> bool:
        """Active, or a passive that completed a copy of the active's map
        (and follows it: what it misses meanwhile is in its backlog)."""
        server = self.server
        if server is None:
            return False
        core = server.core
        if core.role is Role.ACTIVE:
            return True
        return core.replica is not None and core.replica.synced_once


class ClientNode:
    """A client process: a writer, a watcher, or both."""

    def __init__(
        self,
        world: World,
        name: str,
        subtrees: list[str],
        keys: list[bytes],
        watch: str | None,
    ) -> None:
        self.world = world
        self.name = name
        self.subtrees = subtrees
        self.keys = keys
        self.watch_prefix = watch
        self.clone: CloneClient | None = None
        self.rebuilt: dict[str, bytes] = {}
        self.writing = bool(keys)
        self.rng = random.Random(world.rng.random())
        self.number = 0  # of the writes issued, over every incarnation
        self.incarnation = 0
        self.scope: trio.CancelScope | None = None
        self._restart = trio.Event()

    async def run(self, endpoints: list[Endpoints], start_at: float) -> None:
        """The process, started at ``start_at`` and again after each kill."""
        await trio.sleep_until(start_at)
        while True:
            self.incarnation += 1
            self.world.log(f"start {self.name} #{self.incarnation}")
            with trio.CancelScope() as self.scope:
                await self._session(endpoints)
            self._restart = trio.Event()
            await self._restart.wait()

    async def _session(self, endpoints: list[Endpoints]) -> None:
        try:
            async with open_client(
                endpoints, self.subtrees, sockets=self.world.net.sockets(self.name)
            ) as clone:
                self.clone = clone
                async with trio.open_nursery() as nursery:
                    if self.watch_prefix is not None:
                        nursery.start_soon(self._watch, clone, self.watch_prefix)
                    await self._write(clone)
                    await trio.sleep_forever()
        except Exception as exc:
            self.world.crash(f"{self.name}: {exc!r}")

    @property
    def alive(self) -> bool:
        return self.scope is not None and not self.scope.cancel_called

    def kill(self) -> None:
        """SIGKILL: its sockets, and what waited in them, are gone; the
        writes it was waiting on stay unconfirmed (they may be applied)."""
        self.world.log(f"kill {self.name}")
        if self.scope is not None:
            self.scope.cancel()
        self.world.net.kill(self.name)
        self.clone = None
        self.rebuilt = {}

    def restart(self) -> None:
        if not self.alive:
            self._restart.set()

    async def _write(self, clone: CloneClient) -> None:
        """Confirmed writes, one at a time or (a burst) one to each key at
        once; never two to one key at once, so each key's writes have an
        order: the order issued."""
        rng, world = self.rng, self.world
        while self.keys and trio.current_time() < world.stop_writing:
            await trio.sleep(rng.uniform(0.02, 0.6))
            burst = self.keys if rng.random() < 0.15 else [rng.choice(self.keys)]
            async with trio.open_nursery() as nursery:
                for key in burst:
                    self.number += 1
                    nursery.start_soon(self._set, clone, key, self.number)
        self.writing = False

    async def _set(self, clone: CloneClient, key: bytes, number: int) -> None:
        rng, world = self.rng, self.world
        roll = rng.random()
        value = b"" if roll < 0.1 else f"{self.name}-{number}".encode()
        ttl = rng.uniform(0.5, 4.0) if 0.1 <= roll < 0.2 else None
        write = Write(self.name, key, value, ttl, trio.current_time())
        world.writes.append(write)
        try:
            write.sequence = await clone.set(key, value, ttl=ttl, timeout=WRITE_TIMEOUT)
            write.confirmed = trio.current_time()
        except WriteTimeoutError:
            write.timed_out = True
        world.log(
            f"{self.name} {key.decode()}={value.decode()!r} ttl={ttl} -> {write.sequence}"
        )

    async def _watch(self, clone: CloneClient, prefix: str) -> None:
        rebuilt = self.rebuilt
        async for event in clone.watch(prefix, state=True):
            if isinstance(event, SetEvent):
                rebuilt[event.key] = event.value
            elif isinstance(event, DeleteEvent):
                rebuilt.pop(event.key, None)
            elif isinstance(event, ResyncEvent):
                for key, value in event.changes.items():
                    if value is None:
                        rebuilt.pop(key, None)
                    else:
                        rebuilt[key] = value

    def map(self) -> dict[bytes, tuple[bytes, int]]:
        assert self.clone is not None
        entries = self.clone._core.entries
        return {k: (e.value, e.sequence) for k, e in entries.items()}


class World:
    def __init__(self, seed: int, *, duration: float = 30.0) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.net = Network(random.Random(self.rng.random()))
        self.duration = duration
        self.stop_writing = duration
        self.trace: list[str] = []
        self.violations: list[Violation] = []
        self.writes: list[Write] = []
        self.faults: list[str] = []
        #: When both servers were killed: the map, and what it held, is lost.
        self.outages: list[float] = []
        self.final: dict[bytes, tuple[bytes, int]] = {}
        self.end = 0.0
        #: Servers keep their maps on disk (two seeds in three).
        self.durable = seed % 3 != 2
        self.folder = (
            tempfile.mkdtemp(prefix="trioclone-sim-") if self.durable else None
        )
        settings = settings_for(self.rng, self.folder)
        self.endpoints = [settings[name].bind for name in SERVERS]
        self.servers = {
            name: ServerNode(self, name, settings[name]) for name in SERVERS
        }
        self.clients = [
            ClientNode(self, "w0", [""], [b"w0/a", b"w0/b", b"w0/c"], None),
            ClientNode(self, "w1", ["w1/"], [b"w1/a", b"w1/b"], "w1/"),
            ClientNode(self, "w2", ["w2/", "w0/"], [b"w2/a", b"w2/b"], "w0/"),
            ClientNode(self, "watch", [""], [], ""),
            ClientNode(self, "sub", ["w1/", "w2/a"], [], "w2/"),
        ]
        #: (server, incarnation, history) -> UUIDs published
        self._uuids: dict[tuple[str, int, str], set[bytes]] = {}
        #: (server, incarnation, period, lineage) -> last sequence published
        self._last: dict[tuple[str, int, int, str], int] = {}
        #: (history, key, sequence, value) of every update published, where
        #: the history is "lineage/branch" (``chp.map_of``)
        self._published: set[tuple[str, bytes, int, bytes]] = set()
        self._stale: set[str] = set()  # clients already reported
        self._aliases: dict[str, str] = {}
        self._scope = trio.CancelScope()  # the run's, once it started

    @property
    def nodes(self) -> list[str]:
        return [*SERVERS, *(c.name for c in self.clients)]

    def alias(self, lineage: str | None) -> str:
        """A lineage's name in the trace: L1, L2, ... in order of appearance
        (the identities themselves are random, the run is not)."""
        if lineage is None:
            return "-"
        return self._aliases.setdefault(lineage, f"L{len(self._aliases) + 1}")

    def log(self, line: str) -> None:
        self.trace.append(f"{trio.current_time():9.4f} {line}")

    def crash(self, what: str) -> None:
        self.log(f"CRASH {what}")
        self.violations.append(Violation("crashed", what))

    def published(self, node: ServerNode, incarnation: int, frames: Any) -> None:
        key, uuid = frames[0], frames[2]
        sequence = SEQUENCE.unpack(frames[1])[0]
        if key == HUGZ or not sequence:
            return
        server = node.server
        lineage = (server.core.lineage if server is not None else None) or ""
        branch = server.core.branch if server is not None else 0
        self._published.add((f"{lineage}/{branch}", key, sequence, frames[4]))
        self._published.add((lineage, key, sequence, frames[4]))
        period = (node.name, incarnation, node.period, lineage)
        last = self._last.get(period, 0)
        if sequence <= last:
            self.violations.append(
                Violation(
                    "sequence_increases",
                    f"{node.name} published {key!r} at {sequence} after {last} "
                    f"(lineage {self.alias(lineage)})",
                )
            )
        self._last[period] = sequence
        if uuid:  # (per history: a fork a server left, and its writes, is gone)
            history = f"{lineage}/{branch}"
            run = 0 if self.durable else incarnation  # a map kept is one history
            seen = self._uuids.setdefault((node.name, run, history), set())
            if uuid in seen:
                self.violations.append(
                    Violation(
                        "applied_once",
                        f"{node.name} published a write to {key!r} a second time, "
                        f"at {sequence}",
                    )
                )
            seen.add(uuid)

    # -- running --------------------------------------------------------------

    def stop(self) -> None:
        """End the run now (a violation that leaves nothing to settle)."""
        self._scope.cancel()

    async def main(self) -> None:
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            nursery.start_soon(self.net.run)
            nursery.start_soon(self._monitor)
            await self.servers["primary"].start(nursery)
            await trio.sleep(self.rng.uniform(0, 1.5))
            await self.servers["backup"].start(nursery)
            for client in self.clients:
                nursery.start_soon(client.run, self.endpoints, self.rng.uniform(0, 2))
            await self._faults(nursery)
            await self._heal(nursery)
            await self._settle()
            nursery.cancel_scope.cancel()
        self.end = trio.current_time()

    async def _faults(self, nursery: trio.Nursery) -> None:
        rng, net = random.Random(self.rng.random()), self.net
        await trio.sleep_until(FAULT_START)
        while trio.current_time() < self.duration:
            await trio.sleep(rng.expovariate(1 / 2.0))
            if trio.current_time() >= self.duration:
                break
            kind = rng.choice(
                ["kill", "kill", "cut", "cut", "cut", "freeze", "slow", "crash"]
                + ["outage"] * (rng.random() < 0.1)
            )
            length = rng.uniform(0.2, 8.0)
            if kind == "cut" and rng.random() < 0.3:
                kind = "split"
            stall = kind in ("cut", "split") and rng.random() < 0.4
            if kind == "kill":
                name = rng.choice(SERVERS)
                node, peer = self.servers[name], self.servers[_peer(name)]
                if not node.alive:
                    continue
                peer_name = _peer(name)
                servers = frozenset(SERVERS)
                if not self.durable and not peer.holds_map():
                    continue
                if not self.durable and (
                    net.cuts[servers]
                    or net.stalls[servers]
                    or net.frozen
                    or peer_name in net.slowness
                    or net.lagging(peer_name)
                ):
                    continue  # a second failure: not what a pair survives
                node.kill()
                self._fault(f"kill {name}, restart after {length:.2f} s")
                nursery.start_soon(self._restart, node, length, nursery)
            elif kind in ("cut", "split"):
                if kind == "split":
                    a, b = SERVERS
                else:
                    a = rng.choice(SERVERS)
                    b = rng.choice([c.name for c in self.clients])
                if stall:
                    net.stall(a, b)
                    self._fault(f"stall {a} | {b} for {length:.2f} s")
                    heal = lambda a=a, b=b: net.unstall(a, b)  # noqa: E731
                else:
                    net.cut(a, b)
                    self._fault(f"cut {a} | {b} for {length:.2f} s")
                    heal = lambda a=a, b=b: net.heal(a, b)  # noqa: E731
                nursery.start_soon(self._later, length, heal)
            elif kind == "outage":
                if not all(node.alive for node in self.servers.values()):
                    continue
                for node in self.servers.values():
                    node.kill()
                if not self.durable:
                    self.outages.append(trio.current_time())
                self._fault(
                    f"kill both servers (the map is {'kept' if self.durable else 'lost'}),"
                    f" restart after {length:.2f} s"
                )
                first, second = rng.sample(list(self.servers.values()), 2)
                nursery.start_soon(self._restart, first, length, nursery)
                gap = length + rng.uniform(0, 1.5)
                nursery.start_soon(self._restart, second, gap, nursery)
            elif kind == "crash":
                client = rng.choice(self.clients)
                if not client.alive:
                    continue
                length = min(length, 5.0)
                client.kill()
                self._fault(f"kill {client.name}, restart after {length:.2f} s")
                nursery.start_soon(self._later, length, client.restart)
            elif kind == "freeze":
                name = rng.choice(self.nodes)
                length = min(length, 5.0)
                net.freeze(name)
                self._fault(f"freeze {name} for {length:.2f} s")
                nursery.start_soon(self._later, length, lambda n=name: net.thaw(n))
            else:
                name = rng.choice(self.nodes)
                net.slowness[name] = rng.uniform(0.02, 0.5)
                self._fault(f"slow {name} for {length:.2f} s")
                nursery.start_soon(
                    self._later, length, lambda n=name: net.slowness.pop(n, None)
                )

    async def _monitor(self) -> None:
        """All along: a synced client holds only what was published, at that
        sequence, in the map it follows (never a mix of two maps); a server
        that took over holds what its passive heard."""
        while True:
            await trio.sleep(0.25)
            for node in self.servers.values():
                self._check_takeover(node)
            for client in self.clients:
                clone = client.clone
                if clone is None or client.name in self._stale:
                    continue
                core = clone._core
                if core.phase is not Phase.ACTIVE or core.busy:
                    continue
                history = core.history or ""
                lineage, _, branch = history.partition("/")
                for key, entry in core.entries.items():
                    published = (key, entry.sequence, entry.value)
                    if (history, *published) in self._published:
                        continue  # published in this history
                    inherited = branch and entry.sequence <= int(branch)
                    if inherited and (lineage, *published) in self._published:
                        continue  # below where this history began
                    self._stale.add(client.name)
                    self.violations.append(
                        Violation(
                            "entries_published",
                            f"{client.name} holds {key.decode()}={entry.value.decode()!r} "
                            f"at {entry.sequence}, which no server published in "
                            f"the history it follows ({self.alias(lineage)}, "
                            f"branch {branch or '-'})",
                        )
                    )
                    break

    def _check_takeover(self, node: ServerNode) -> None:
        """Nothing the active published and the passive heard is lost when
        it takes over: each key holds what it heard, or something newer."""
        server, heard = node.server, node.to_check
        if server is None or heard is None or not server.core.serving:
            return
        node.to_check = None
        store, lineage = server.core.store, server.core.lineage
        took = node.took_history
        for key, (sequence, of, body, ttl) in heard.items():
            if (of or "").partition("/")[0] != lineage:
                continue  # another map's
            if took is not None and not same_history(of, took):
                continue  # it took over a map of another branch (kept on disk)
            if store.sequence_of(key) >= sequence:
                continue
            if key not in store and (not body or ttl):
                continue  # deleted, or expired since
            tombstone = server.core._tombstones.get(key)
            if key not in store and tombstone is not None and tombstone[0] > sequence:
                continue  # deleted since (a delete it replayed)
            self.violations.append(
                Violation(
                    "takeover_keeps_heard",
                    f"{node.name} took over without {key.decode()}="
                    f"{body.decode()!r} at {sequence}, which its passive heard "
                    f"(it holds {store.sequence_of(key) or 'nothing'})",
                )
            )
            return

    def _fault(self, what: str) -> None:
        self.faults.append(what)
        self.log(f"FAULT {what}")

    async def _later(self, delay: float, action: Callable[[], object]) -> None:
        await trio.sleep(delay)
        action()

    async def _restart(
        self, node: ServerNode, delay: float, nursery: trio.Nursery
    ) -> None:
        await trio.sleep(delay)
        if not node.alive:
            await node.start(nursery)

    async def _heal(self, nursery: trio.Nursery) -> None:
        self.log("heal")
        self.net.heal_all()
        self.net.unstall_all()
        for name in list(self.net.frozen):
            self.net.thaw(name)
        self.net.slowness.clear()
        for node in self.servers.values():
            if not node.alive:
                await node.start(nursery)
        for client in self.clients:
            client.restart()

    async def _settle(self) -> None:
        deadline = trio.current_time() + SETTLE_LIMIT
        steady_since: float | None = None
        last: object = None
        while trio.current_time() < deadline and not self.violations:
            await trio.sleep(0.5)
            problems = self._unsettled()
            state = None if problems else self._state()
            if problems or state != last:
                steady_since = None if problems else trio.current_time()
                last = state
                continue
            assert steady_since is not None
            if trio.current_time() - steady_since >= STEADY:
                self.log("settled")
                self._check()
                return
        if not self.violations:
            why = "; ".join(self._unsettled()) or "the maps kept changing"
            self.violations.append(
                Violation(
                    "settled", f"not settled {SETTLE_LIMIT:g} s after healing: {why}"
                )
            )

    # -- the checks -----------------------------------------------------------

    def _active(self) -> ServerNode | None:
        actives = [
            n
            for n in self.servers.values()
            if n.server is not None and n.server.core.serving
        ]
        return actives[0] if len(actives) == 1 else None

    def _unsettled(self) -> list[str]:
        problems = []
        roles = {
            name: (n.server.core.role.value if n.server else "dead")
            for name, n in self.servers.items()
        }
        active = self._active()
        if active is None:
            problems.append(f"no single serving active ({roles})")
        for node in self.servers.values():
            server = node.server
            if node is not active and (
                server is None
                or server.core.role is not Role.PASSIVE
                or not server.core.synced
                or server.core.busy
            ):
                problems.append(f"{node.name} is not a synced passive ({roles})")
        for name in self.nodes:
            if self.net.lagging(name):
                problems.append(f"messages to {name} wait behind a slow link")
        for client in self.clients:
            if client.clone is None or not client.clone.synced or client.writing:
                problems.append(f"{client.name} is not synced and idle")
            elif client.clone._core.busy:
                problems.append(f"{client.name} is catching up")
        return problems

    def _server_map(self, node: ServerNode) -> dict[bytes, tuple[bytes, int]]:
        assert node.server is not None
        store = node.server.core.store
        result = {}
        for key in store.keys(b""):
            msg = store.get(key)
            assert msg is not None
            result[key] = (msg.body, msg.sequence)
        return result

    def _state(self) -> object:
        active = self._active()
        assert active is not None
        maps = [self._server_map(n) for n in self.servers.values()]
        return (active.name, maps, [c.map() for c in self.clients])

    def _check(self) -> None:
        active = self._active()
        assert active is not None
        truth = self._server_map(active)
        self.final = truth
        for node in self.servers.values():
            if node is not active:
                self._compare(
                    f"passive {node.name}", self._server_map(node), truth, [""]
                )
        for client in self.clients:
            self._compare(client.name, client.map(), truth, client.subtrees)
            if client.watch_prefix is not None:
                assert client.clone is not None
                expected = dict(client.clone.items(client.watch_prefix))
                if client.rebuilt != expected:
                    self.violations.append(
                        Violation(
                            "watch_rebuilds",
                            f"{client.name}'s events rebuild {_short(client.rebuilt)}, "
                            f"its map holds {_short(expected)}",
                        )
                    )
        self._check_writes(truth)
        self._check_expiry(active)

    def _check_expiry(self, active: ServerNode) -> None:
        """The active expires what is due (a TTL made again at a takeover
        counts from then)."""
        assert active.server is not None
        store, now = active.server.core.store, trio.current_time()
        for key in store.keys(b""):
            deadline = store.deadline(key)
            if deadline is not None and deadline < now - 1.0:
                self.violations.append(
                    Violation(
                        "ttl_expires",
                        f"{key.decode()} is still held {now - deadline:.1f} s "
                        "after its TTL ran out",
                    )
                )

    def _compare(
        self,
        who: str,
        held: dict[bytes, tuple[bytes, int]],
        truth: dict[bytes, tuple[bytes, int]],
        subtrees: list[str],
    ) -> None:
        prefixes = [s.encode() for s in subtrees]
        mine = {k: v for k, v in truth.items() if k.startswith(tuple(prefixes))}
        if held != mine:
            diff = sorted(
                k for k in held.keys() | mine.keys() if held.get(k) != mine.get(k)
            )
            detail = ", ".join(
                f"{k.decode()}: {held.get(k)} vs {mine.get(k)}" for k in diff[:4]
            )
            self.violations.append(
                Violation("maps_equal", f"{who} differs from the active: {detail}")
            )

    def _check_writes(self, truth: dict[bytes, tuple[bytes, int]]) -> None:
        by_key: dict[bytes, list[Write]] = {}
        for write in self.writes:
            by_key.setdefault(write.key, []).append(write)
        # A write confirmed before both servers were last killed was lost
        # with the map (unless it was kept on disk): it binds nothing.
        lost_before = max(self.outages, default=-1.0)
        for key, writes in by_key.items():
            confirmed = [
                i
                for i, w in enumerate(writes)
                if w.confirmed is not None and w.confirmed > lost_before
            ]
            since = writes[confirmed[-1] :] if confirmed else writes
            held = truth.get(key)
            allowed = {w.value for w in since if w.value}
            may_be_absent = not confirmed or any(not w.value or w.ttl for w in since)
            if held is None and may_be_absent:
                continue
            if held is not None and held[0] in allowed:
                continue
            last = writes[confirmed[-1]] if confirmed else None
            self.violations.append(
                Violation(
                    "confirmed_kept",
                    f"{key.decode()} holds {held[0] if held else None!r}; the last "
                    f"confirmed write was {last.value if last else None!r} at "
                    f"{last.sequence if last else None}"
                    + (f" (issued at {last.issued:.3f})" if last else ""),
                )
            )


def _peer(name: str) -> str:
    return SERVERS[1 - SERVERS.index(name)]


def _short(mapping: dict[str, bytes]) -> str:
    return (
        "{"
        + ", ".join(f"{k}={v.decode()}" for k, v in sorted(mapping.items())[:6])
        + "}"
    )


class Watchdog(trio.abc.Instrument):
    """A livelock is a failure too: tasks that run for ever at one virtual
    instant (the clock never moves again) end the run."""

    LIMIT = 200_000  # task steps at one instant

    def __init__(self, world: World) -> None:
        self.world = world
        self.instant = -1.0
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        now = trio.current_time()
        if now != self.instant:
            self.instant, self.steps = now, 0
            return
        self.steps += 1
        if self.steps == self.LIMIT:
            self.world.violations.append(
                Violation(
                    "livelock",
                    f"{self.LIMIT} task steps at {now:.6f} s without time moving "
                    f"(the last: {task.name})",
                )
            )
            self.world.stop()


def run(seed: int, *, duration: float = 30.0) -> Result:
    """Run the system from ``seed``; the same seed gives the same run."""
    world = World(seed, duration=duration)
    logger = logging.getLogger("trioclone")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with deterministic(seed):
            trio.run(
                world.main,
                clock=trio.testing.MockClock(autojump_threshold=0),
                instruments=[Watchdog(world)],
            )
    finally:
        logger.setLevel(level)
        if world.folder is not None:
            shutil.rmtree(world.folder, ignore_errors=True)
    world.trace.extend(
        f"final {k.decode()}={v.decode()!r}@{s}"
        for k, (v, s) in sorted(world.final.items())
    )
    return Result(
        seed,
        world.violations,
        world.trace,
        world.end,
        world.faults,
        len(world.writes),
        sum(w.sequence is not None for w in world.writes),
    )
