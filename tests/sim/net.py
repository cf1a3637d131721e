"""A simulated ZeroMQ network for the deterministic simulation.

It stands in for ``trioclone._zmq.Sockets``: the servers' and clients' Trio
shells run unchanged on top of it, under Trio's mock clock, in one thread.
Every delay comes from the network's seeded random numbers, and deliveries
happen in (time, order sent) order, so one seed is one run.

What it keeps of libzmq
-----------------------
* A *link* joins a connecting socket to the address it connects to.  It is
  up while a live socket is bound there and the two nodes are not cut off
  from each other; it comes up again (a reconnect) a few milliseconds after
  that becomes true.  Each direction of a link is FIFO.
* The connecting side's pipe outlives its connection: what a DEALER or a
  connected PUB sends while the link is down waits in it (up to its
  high-water mark) and goes out when the link comes up, to whichever
  process is bound there by then.  A connected PUB keeps the subscriptions
  it learned.  The bound side's pipe dies with the connection.
* A link that goes down loses everything in flight on it, both ways.
* PUB (and XPUB) sends only to links whose subscription has *arrived*
  (a SUB's subscriptions travel over the link when it comes up), and drops
  a message for a link that holds ``SNDHWM`` messages in flight.  A slow
  link (``rate``) serialises its messages, so a slow subscriber meets the
  high-water mark.
* XPUB hands up ``\\x01prefix`` when a prefix gets its first subscriber and
  ``\\x00prefix`` when the last one goes.
* ROUTER (with ROUTER_MANDATORY) raises ``UnroutableError`` for a peer id
  it does not know: one whose connection went away.  A DEALER is known by
  its ``ROUTING_ID``, or by a fresh id per connection.
* A *cut* between two nodes breaks their connections (as a peer that
  reset them, or a partition long enough for TCP to give up): what was in
  flight is lost, and they reconnect when it heals.  A *stall* is a
  partition TCP rides out: the connections stay up and what is sent waits,
  in order, and counts against the high-water mark, until it heals.
* A frozen node neither receives nor sends: what is sent to it, or by it,
  is held and delivered in order when it thaws.  Its own tasks and timers
  keep running (this is not a stopped process: it is one cut off from
  every peer that loses nothing).

Not modelled: receive-side high-water marks (a SUB's queue is unbounded;
only what is in flight on a link counts against the sender's), and TCP
buffers (a connecting pipe's messages are "in flight" as soon as the link
is up).
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
import zmq

from trioclone._zmq import UnroutableError

Frames = list[bytes]
POLLIN, POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
PIPE_HWM = 1000  # libzmq's default high-water mark


class Network:
    """Addresses, links, partitions and frozen nodes; one delivery queue."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.bound: dict[str, SimSocket] = {}
        self.links: list[Link] = []
        self.cuts: Counter[frozenset[str]] = Counter()  # overlapping cuts count
        self.frozen: dict[str, list[Callable[[], None]]] = {}
        #: Stalled pairs (a partition TCP rides out): what goes between them
        #: waits, in order, until it heals.
        self.stalls: Counter[frozenset[str]] = Counter()
        self._stalled: dict[frozenset[str], list[Callable[[], None]]] = {}
        #: Per node: extra seconds per message on links into it (slow reader).
        self.slowness: dict[str, float] = {}
        #: Every open socket of each node (``kill`` closes them).
        self.by_node: dict[str, list[SimSocket]] = {}
        self.stats: Counter[str] = Counter()
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._ids = itertools.count(1)
        self._wakeup = trio.Event()

    # -- the delivery queue ---------------------------------------------------

    def at(self, when: float, action: Callable[[], None]) -> None:
        if (self._queue and when < self._queue[0][0]) or not self._queue:
            self._wakeup.set()
        heapq.heappush(self._queue, (when, next(self._order), action))

    async def run(self) -> None:
        """Carry out every delivery when it is due; for ever."""
        queue = self._queue
        while True:
            now = trio.current_time()
            while queue and queue[0][0] <= now:
                heapq.heappop(queue)[2]()
            self._wakeup = trio.Event()
            with trio.move_on_at(queue[0][0] if queue else math.inf):
                await self._wakeup.wait()

    def latency(self) -> float:
        return 0.0002 + self.rng.expovariate(1 / 0.001)

    # -- sockets --------------------------------------------------------------

    def sockets(self, node: str) -> Callable[[], SimSockets]:
        """A factory of ``Sockets`` for the shells of ``node``."""
        return lambda: SimSockets(self, node)

    def new_id(self) -> bytes:
        return b"\x00" + next(self._ids).to_bytes(4, "big")

    def bind(self, sock: SimSocket, address: str) -> None:
        holder = self.bound.get(address)
        if holder is not None and not holder.closed:
            raise zmq.ZMQError(zmq.EADDRINUSE, f"{address} is in use")
        self.bound[address] = sock
        self.refresh()

    def connect(self, sock: SimSocket, address: str) -> None:
        self.links.append(Link(self, sock, address))
        self.refresh()

    def closed(self, sock: SimSocket) -> None:
        for address in [a for a, s in self.bound.items() if s is sock]:
            del self.bound[address]
        for link in self.links:
            if link.connecting is sock:
                link.break_(closed=True)
        self.links = [link for link in self.links if link.connecting is not sock]
        self.refresh()

    # -- faults ---------------------------------------------------------------

    def cut(self, a: str, b: str) -> None:
        self.cuts[frozenset((a, b))] += 1
        self.refresh()

    def heal(self, a: str, b: str) -> None:
        pair = frozenset((a, b))
        self.cuts[pair] -= 1
        if self.cuts[pair] <= 0:
            del self.cuts[pair]
        self.refresh()

    def heal_all(self) -> None:
        self.cuts.clear()
        self.refresh()

    def reachable(self, a: str, b: str) -> bool:
        return a == b or not self.cuts[frozenset((a, b))]

    def lagging(self, node: str) -> bool:
        """Messages to ``node`` wait behind a slow reader's queue."""
        now = trio.current_time()
        for link in self.links:
            peer = link.peer
            if peer is None:
                continue
            if (peer.node == node and link.last[0] > now + 0.05) or (
                link.connecting.node == node and link.last[1] > now + 0.05
            ):
                return True
        return False

    def stall(self, a: str, b: str) -> None:
        pair = frozenset((a, b))
        self.stalls[pair] += 1
        self._stalled.setdefault(pair, [])

    def unstall(self, a: str, b: str) -> None:
        pair = frozenset((a, b))
        self.stalls[pair] -= 1
        if self.stalls[pair] > 0:
            return
        del self.stalls[pair]
        for action in self._stalled.pop(pair, []):
            action()

    def unstall_all(self) -> None:
        for pair in list(self.stalls):
            self.stalls[pair] = 1
            self.unstall(*pair)

    def held_between(self, a: str, b: str) -> list[Callable[[], None]] | None:
        """Where messages between ``a`` and ``b`` wait, if they are stalled."""
        return self._stalled.get(frozenset((a, b))) if a != b else None

    def freeze(self, node: str) -> None:
        self.frozen.setdefault(node, [])

    def thaw(self, node: str) -> None:
        for action in self.frozen.pop(node, []):
            action()

    def kill(self, node: str) -> None:
        """The node's process is gone: every socket of it closes now."""
        for sock in list(self.by_node.get(node, ())):
            sock.close()
        self.frozen.pop(node, None)

    def refresh(self) -> None:
        """Bring links up or down after a bind, close, cut or heal."""
        for link in self.links:
            link.check()


@dataclass
class Link:
    """A connecting socket and the address it connects to."""

    net: Network
    connecting: SimSocket
    address: str
    peer: SimSocket | None = None  # the bound socket, while up
    epoch: int = 0  # bumped on every break: what was in flight is lost
    connecting_up: bool = False  # a reconnect is scheduled or done
    #: The connecting side's pipe while down (it outlives connections).
    waiting: deque[Frames] = field(default_factory=deque)
    #: Subscriptions the PUB side of this link knows.
    subscriptions: list[bytes] = field(default_factory=list)
    routing_id: bytes = b""
    in_flight: list[int] = field(default_factory=lambda: [0, 0])
    last: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def _target(self) -> SimSocket | None:
        sock = self.net.bound.get(self.address)
        if sock is None or sock.closed or self.connecting.closed:
            return None
        if not self.net.reachable(self.connecting.node, sock.node):
            return None
        return sock

    def check(self) -> None:
        target = self._target()
        if self.peer is not None and target is not self.peer:
            self.break_()
        if target is not None and self.peer is None and not self.connecting_up:
            self.connecting_up = True
            epoch = self.epoch
            delay = 0.001 + self.net.rng.uniform(0, 0.1)  # reconnect interval
            self.net.at(trio.current_time() + delay, lambda: self._up(epoch))

    def _up(self, epoch: int) -> None:
        if epoch != self.epoch:
            return
        self.connecting_up = False
        target = self._target()
        if target is None:
            return
        self.peer = target
        target.accepted.append(self)
        conn = self.connecting
        self.routing_id = conn.routing_id or self.net.new_id()
        if conn.kind == zmq.SUB:  # our subscriptions travel to the PUB
            self.send_subscriptions(conn.subscriptions, up_stream=True)
        elif target.kind == zmq.SUB:  # the bound SUB's travel to us
            self.send_subscriptions(target.subscriptions, up_stream=False)
        waiting, self.waiting = self.waiting, deque()
        for frames in waiting:
            self.carry(frames, up_stream=True)

    def break_(self, *, closed: bool = False) -> None:
        """The connection is gone: what was in flight is lost."""
        self.epoch += 1
        self.connecting_up = False
        self.in_flight = [0, 0]
        peer, self.peer = self.peer, None
        if peer is not None:
            peer.accepted.remove(self)
            if peer.kind == zmq.XPUB:
                peer.lose_subscriptions(self.subscriptions)
            if self.connecting.kind != zmq.PUB:
                self.subscriptions = []  # a bound PUB's pipe dies with it
            self.net.stats["breaks"] += 1
        if closed:
            self.waiting.clear()

    def send_subscriptions(self, prefixes: Sequence[bytes], *, up_stream: bool) -> None:
        """Subscriptions of the SUB side arrive at the PUB side later."""
        epoch, prefixes = self.epoch, list(prefixes)

        def arrive() -> None:
            if epoch != self.epoch:
                return
            new = [p for p in prefixes if p not in self.subscriptions]
            self.subscriptions.extend(new)
            pub = self.peer if up_stream else self.connecting
            if pub is not None and pub.kind == zmq.XPUB:
                pub.gain_subscriptions(new)

        self.net.at(self._when(0 if up_stream else 1), arrive)

    def _when(self, direction: int) -> float:
        """When a message sent now in ``direction`` arrives (FIFO)."""
        net = self.net
        now = trio.current_time()
        reader = (self.peer if direction == 0 else self.connecting) or self.connecting
        rate = net.slowness.get(reader.node, 0.0)
        when = max(now + net.latency(), self.last[direction] + rate)
        self.last[direction] = when
        return when

    def carry(self, frames: Frames, *, up_stream: bool) -> None:
        """Send ``frames`` over the link: to the bound side if ``up_stream``."""
        direction = 0 if up_stream else 1
        sender = self.connecting if up_stream else self.peer
        assert sender is not None
        hold = self.net.frozen.get(sender.node)
        epoch = self.epoch
        receiver = self.peer if up_stream else self.connecting
        assert receiver is not None
        if hold is not None:  # a frozen sender: it goes when it thaws

            def thawed() -> None:
                if epoch == self.epoch and self.peer is not None:
                    self.carry(frames, up_stream=up_stream)

            hold.append(thawed)
            return
        self.in_flight[direction] += 1

        def arrive() -> None:
            if epoch != self.epoch:
                self.net.stats["lost_in_flight"] += 1
                return
            receiver = self.peer if up_stream else self.connecting
            if receiver is None or receiver.closed:
                return
            held = self.net.frozen.get(receiver.node)
            if held is not None:  # a frozen receiver: later, in order
                held.append(arrive)
                return
            peer = self.peer
            stalled = (
                None
                if peer is None
                else self.net.held_between(self.connecting.node, peer.node)
            )
            if stalled is not None:  # a stalled path: when it heals, in order
                stalled.append(lambda: self.net.at(self._when(direction), arrive))
                return
            self.in_flight[direction] -= 1
            receiver.deliver(
                [self.routing_id, *frames] if receiver.kind == zmq.ROUTER else frames
            )

        self.net.at(self._when(direction), arrive)


class SimSocket:
    """The methods of ``trioclone._zmq.Socket`` the shells use."""

    def __init__(self, net: Network, node: str, kind: int, options: dict[int, Any]):
        self.net = net
        self.node = node
        self.kind = kind
        self.hwm = int(options.get(zmq.SNDHWM, PIPE_HWM)) or math.inf
        self.routing_id: bytes = options.get(zmq.ROUTING_ID, b"")
        self.subscriptions: list[bytes] = []
        self.inbox: deque[Frames] = deque()
        self.accepted: list[Link] = []  # links to us, while up
        self._xpub_counts: Counter[bytes] = Counter()
        self._readable = trio.Event()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("socket was closed")

    # -- receiving --------------------------------------------------------------

    def deliver(self, frames: Frames) -> None:
        self.inbox.append(frames)
        self._readable.set()

    async def wait(self, flag: int) -> bool:
        self._check_open()
        if not flag & POLLIN:
            return False  # always room: sends that cannot go are dropped
        waited = False
        while not self.inbox:
            self._readable = trio.Event()
            await self._readable.wait()
            waited = True
            self._check_open()
        return waited

    async def receive(self) -> Frames:
        return (await self.receive_batch(1))[0]

    async def receive_batch(
        self, max_messages: int = 256, users: list[str] | None = None
    ) -> list[Frames]:
        assert users is None, "the simulated network has no CURVE"
        await trio.lowlevel.checkpoint_if_cancelled()
        batch = self.receive_nowait(max_messages)
        waited = False
        while not batch:
            waited = await self.wait(POLLIN) or waited
            batch = self.receive_nowait(max_messages)
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return batch

    def receive_nowait(
        self, max_messages: int = 256, users: list[str] | None = None
    ) -> list[Frames]:
        assert users is None, "the simulated network has no CURVE"
        self._check_open()
        inbox = self.inbox
        return [inbox.popleft() for _ in range(min(max_messages, len(inbox)))]

    def refresh(self) -> int:
        self._check_open()
        return (POLLIN if self.inbox else 0) | POLLOUT

    # -- XPUB subscriptions -----------------------------------------------------

    def gain_subscriptions(self, prefixes: Iterable[bytes]) -> None:
        for prefix in prefixes:
            self._xpub_counts[prefix] += 1
            if self._xpub_counts[prefix] == 1:
                self.deliver([b"\x01" + prefix])

    def lose_subscriptions(self, prefixes: Iterable[bytes]) -> None:
        for prefix in prefixes:
            self._xpub_counts[prefix] -= 1
            if self._xpub_counts[prefix] == 0:
                del self._xpub_counts[prefix]
                if not self._closed:
                    self.deliver([b"\x00" + prefix])

    # -- sending ----------------------------------------------------------------

    def try_send_each(self, messages: Iterable[Sequence[bytes]]) -> int:
        """As ``trioclone._zmq.Socket.try_send_each``: each in turn."""
        return sum(self.try_send(frames) for frames in messages)

    def try_send(self, frames: Sequence[bytes]) -> bool:
        self._check_open()
        message = list(frames)
        if self.kind in (zmq.PUB, zmq.XPUB):
            self._publish(message)
            return True
        if self.kind == zmq.ROUTER:
            return self._route(message)
        if self.kind == zmq.DEALER:
            return self._deal(message)
        raise AssertionError(f"cannot send on socket type {self.kind}")

    def _links(self) -> list[Link]:
        own = [link for link in self.net.links if link.connecting is self]
        return own + self.accepted

    def _publish(self, message: Frames) -> None:
        topic = message[0]
        for link in self._links():
            if not any(topic.startswith(p) for p in link.subscriptions):
                continue
            up_stream = link.connecting is self
            if link.peer is None:  # a connected PUB's pipe waits for the link
                if len(link.waiting) < self.hwm:
                    link.waiting.append(message)
                else:
                    self.net.stats["pub_dropped_hwm"] += 1
                continue
            if link.in_flight[0 if up_stream else 1] >= self.hwm:
                self.net.stats["pub_dropped_hwm"] += 1
                continue
            link.carry(message, up_stream=up_stream)

    def _route(self, message: Frames) -> bool:
        identity, rest = message[0], message[1:]
        for link in self.accepted:
            if link.routing_id == identity:
                if link.in_flight[1] >= self.hwm:
                    return False
                link.carry(rest, up_stream=False)
                return True
        raise UnroutableError("peer is not connected")

    def _deal(self, message: Frames) -> bool:
        links = [link for link in self.net.links if link.connecting is self]
        if not links:
            return False
        link = links[0]
        if link.peer is None:
            if len(link.waiting) >= self.hwm:
                return False
            link.waiting.append(message)
            return True
        link.carry(message, up_stream=True)
        return True

    async def send(self, frames: Sequence[bytes]) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self.try_send(frames):
            await trio.sleep(0.002)
        await trio.lowlevel.cancel_shielded_checkpoint()

    def close(self, linger: int = 0) -> None:
        if self._closed:
            return
        self._closed = True
        self._readable.set()
        self.net.closed(self)
        mine = self.net.by_node.get(self.node)
        if mine is not None and self in mine:
            mine.remove(self)


class SimSockets:
    """``trioclone._zmq.Sockets`` on the simulated network, for one node."""

    def __init__(self, net: Network, node: str) -> None:
        self.net = net
        self.node = node
        self._sockets: list[SimSocket] = []

    def open(
        self,
        kind: int,
        *,
        bind: Iterable[str] = (),
        connect: Iterable[str] = (),
        subscribe: Iterable[bytes] = (),
        options: Iterable[tuple[int, int | bytes]] = (),
    ) -> SimSocket:
        sock = SimSocket(self.net, self.node, kind, dict(options))
        sock.subscriptions = list(subscribe)
        for address in bind:
            self.net.bind(sock, address)
        for address in connect:
            self.net.connect(sock, address)
        self._sockets.append(sock)
        self.net.by_node.setdefault(self.node, []).append(sock)
        return sock

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def __enter__(self) -> SimSockets:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
