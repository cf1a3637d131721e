"""The Trio shell of a ``Replica``: one connection at a time to a server.

A connection is a DEALER to the server's snapshot socket and a SUB to its
publisher, each owned by one task.  ``connect`` (the replica's ``Connect``)
cancels the connection in use and opens the next; ``request`` (its
``Request``) queues a snapshot request on the connection in use; ``apply``
carries out a list of the replica's actions.  Each
connection has its own queue, so a request meant for a new connection is
never sent on the old one while that one winds down, and a batch read by
an old connection after it was replaced is never handed on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import trio
import zmq

from trioclone._zmq import Socket, Sockets
from trioclone.core.chp import encode_request
from trioclone.core.replica import Action, Connect, Replica, Request
from trioclone.endpoints import Endpoints
from trioclone.errors import RemoteProtocolError

Frames = list[bytes]
#: Called with every batch read: ``(True, replies)`` or ``(False, updates)``.
BatchHandler = Callable[[bool, list[Frames]], Awaitable[None]]

BATCH = 512


class Fed(Protocol):
    """What a connection feeds: a replica (a client core, a server core)."""

    def on_reply(self, frames: Sequence[bytes], now: float) -> None: ...

    def on_update(self, frames: Sequence[bytes], now: float) -> None: ...


def feed(
    target: Fed,
    is_reply: bool,
    batch: list[Frames],
    now: float,
    reject: Callable[[str, RemoteProtocolError], None],
) -> None:
    """Hand a batch to ``target``; a malformed message goes to ``reject``
    (with "snapshot reply" or "stream") and the rest still count."""
    handle = target.on_reply if is_reply else target.on_update
    for frames in batch:
        try:
            handle(frames, now)
        except RemoteProtocolError as exc:
            reject("snapshot reply" if is_reply else "stream", exc)


@dataclass
class Connection:
    """One attempt at one server."""

    server: int
    requests: deque[bytes] = field(default_factory=deque)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    waiting: trio.CancelScope | None = None

    def request(self, subtree: bytes) -> None:
        self.requests.append(subtree)
        if self.waiting is not None:
            self.waiting.cancel()  # the DEALER's owner sends it


class Follower:
    """Runs the connections a replica asks for."""

    def __init__(
        self,
        sockets: Sockets,
        endpoints: Sequence[Endpoints],
        subscriptions: Iterable[bytes],
        *,
        sub_options: Iterable[tuple[int, int | bytes]] = (),
        identity: Callable[[], bytes] | None = None,
    ) -> None:
        self._sockets = sockets
        self._endpoints = list(endpoints)
        self._subscriptions = list(subscriptions)
        self._sub_options = list(sub_options)
        self._identity = identity  # a fresh routing id for each DEALER
        self.current: Connection | None = None
        self._changed = trio.Event()

    def connect(self, server: int) -> None:
        old, self.current = self.current, Connection(server)
        if old is not None:
            old.scope.cancel()
        self._changed.set()

    def request(self, subtree: bytes) -> None:
        if self.current is not None:
            self.current.request(subtree)

    def apply(self, actions: Iterable[Action]) -> list[Action]:
        """Carry out the ``Connect`` and ``Request`` actions, in order; the
        others (a client's ``Send``) are returned for the caller."""
        rest: list[Action] = []
        for action in actions:
            if isinstance(action, Connect):
                self.connect(action.server)
            elif isinstance(action, Request):
                self.request(action.subtree)
            else:
                rest.append(action)
        return rest

    def close(self) -> None:
        if self.current is not None:
            self.current.scope.cancel()

    async def run(self, handle: BatchHandler) -> NoReturn:
        """Serve the connection in use, and the next one, for ever.

        ``handle(is_reply, batch)`` gets every batch from the connection in use.
        """
        while True:
            connection = self.current
            if connection is None:
                await self._changed.wait()
                self._changed = trio.Event()
                continue
            with connection.scope:
                await self._serve(connection, handle)
            if self.current is connection:  # cancelled from outside: stop
                await trio.sleep_forever()

    async def _serve(self, connection: Connection, handle: BatchHandler) -> None:
        server = self._endpoints[connection.server]
        options = [] if self._identity is None else [(zmq.ROUTING_ID, self._identity())]
        dealer = self._sockets.open(
            zmq.DEALER, connect=[server.snapshot], options=options
        )
        sub = self._sockets.open(
            zmq.SUB,
            connect=[server.publisher],
            subscribe=self._subscriptions,
            options=self._sub_options,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._replies, dealer, connection, handle)
                nursery.start_soon(self._updates, sub, connection, handle)
        finally:
            dealer.close()
            sub.close()

    async def _replies(
        self, dealer: Socket, connection: Connection, handle: BatchHandler
    ) -> NoReturn:
        requests = connection.requests
        while True:
            while requests:  # sent here: this task owns the DEALER
                await dealer.send(encode_request(requests[0]))
                requests.popleft()  # only once it really went out
            batch: list[Frames] = []
            with trio.CancelScope() as wait:  # cancelled when a request is queued
                connection.waiting = wait
                batch = await dealer.receive_batch(BATCH)  # cancel-safe
            connection.waiting = None
            if batch and not connection.scope.cancel_called:
                await handle(True, batch)

    async def _updates(
        self, sub: Socket, connection: Connection, handle: BatchHandler
    ) -> NoReturn:
        while True:
            batch = await sub.receive_batch(BATCH)
            if not connection.scope.cancel_called:
                await handle(False, batch)


class Timers:
    """A replica's timers, and its long work (catching up a backlog,
    confirming what a fresh map holds) in bounded steps with a schedule
    point after each.  In a task of its own, not in a reader: replacing
    the connection cancels the readers, never this.  ``dispatch`` carries
    out what the replica asks after each step; ``wake`` after any input
    (its deadline may have moved)."""

    def __init__(self, replica: Replica[Any], dispatch: Callable[[], None]) -> None:
        self._replica = replica
        self._dispatch = dispatch
        self._wakeup = trio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def run(self) -> NoReturn:
        replica = self._replica
        while True:
            now = trio.current_time()
            replica.poll(now)
            if replica.busy:
                replica.catch_up(now)
            self._dispatch()
            if replica.busy:
                await trio.lowlevel.checkpoint()
                continue
            self._wakeup = trio.Event()
            with trio.move_on_at(replica.next_deadline()):
                await self._wakeup.wait()
