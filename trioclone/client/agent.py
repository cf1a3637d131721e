"""The Trio client: ``open_client`` and the agent that runs ``ClientCore``.

The agent owns the sockets: one PUB connected to every server's collector
(writes), and for the server in use a DEALER (snapshots) and a SUB
(updates).  Switching server cancels the connection scope and opens a new
one; the connection supervisor re-reads which server to use after every
exit, as the server's role supervisor does.  Connection trouble is state
(``phase``, ``server``, logs), never an exception out of ``open_client``.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import trio
import zmq
from trio_util import AsyncValue, wait_any

from trioclone._follow import Follower, Timers, feed
from trioclone._log import Limited
from trioclone._zmq import Socket, Sockets
from trioclone.client.events import (
    CloneEvent,
    DeleteEvent,
    ResyncEvent,
    SetEvent,
    key_bytes,
    key_text,
)
from trioclone.core.chp import HUGZ, decode_denial
from trioclone.core.client import (
    ClientCore,
    ClientTimings,
    Confirmed,
    Deleted,
    Entry,
    Phase,
    Resynced,
    Send,
    Unconfirmed,
    Updated,
)
from trioclone.curve import Curve
from trioclone.endpoints import Endpoints
from trioclone.errors import (
    ClientClosedError,
    LocalProtocolError,
    PermissionDeniedError,
    RemoteProtocolError,
    WriteTimeoutError,
)

log = logging.getLogger("trioclone.client")

DEFAULT_SERVERS = ("tcp://localhost:5556", "tcp://localhost:5566")
WATCH_BUFFER = 100_000  # events a slow watcher may fall behind before a resync

Context = zmq.Context[zmq.Socket[bytes]]


@asynccontextmanager
async def open_client(
    servers: Sequence[str | Endpoints] = DEFAULT_SERVERS,
    subtree: str | Sequence[str] = "",
    *,
    timings: ClientTimings | None = None,
    context: Context | None = None,
    sockets: Callable[[], Sockets] | None = None,
    curve: Curve | None = None,
) -> AsyncIterator[CloneClient]:
    """Mirror the map held by ``servers`` (one server, or a Binary Star pair).

    ``subtree`` is a key prefix (or several) to mirror; "" is everything.
    The client starts syncing at once; ``await clone.wait_synced()`` to wait.
    ``sockets`` makes the client's sockets (a simulated network, in tests).
    ``curve`` (``Curve.for_client(server_key, own_keys)``): talk to secured
    servers (docs/security.md).
    """
    endpoints = [s if isinstance(s, Endpoints) else Endpoints.parse(s) for s in servers]
    subtrees = [subtree] if isinstance(subtree, str) else list(subtree)
    core = ClientCore(len(endpoints), [key_bytes(s) for s in subtrees], timings)
    client = CloneClient(core, endpoints, sockets or (lambda: Sockets(context, curve)))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client._run)
            try:
                yield client
            finally:
                client._close()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:  # the body's own error, unwrapped
            raise group.exceptions[0] from None
        raise


class CloneClient:
    """A live mirror of the map, and writes that return when applied."""

    def __init__(
        self,
        core: ClientCore,
        endpoints: list[Endpoints],
        sockets: Callable[[], Sockets],
    ) -> None:
        self._core = core
        self._endpoints = endpoints
        self._open_sockets = sockets
        self._closed = False
        self._log = Limited(log)
        #: uuid -> (set when settled, [its sequence, None if unconfirmed, or
        #: the reason a server refused it])
        self._waiters: dict[bytes, tuple[trio.Event, list[int | str | None]]] = {}
        self._watchers: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._timers = Timers(self._core, self._dispatch)
        self._pub: Socket
        self._follower: Follower
        #: The agent's nursery: tasks started here end with the client.
        self.nursery: trio.Nursery
        self._synced = AsyncValue(False)
        #: Why a server refused this client's snapshot request, if one did.
        self._refused: AsyncValue[str | None] = AsyncValue(None)

    # -- reading ---------------------------------------------------------

    def get(self, key: str | bytes, default: bytes | None = None) -> bytes | None:
        entry = self._core.entries.get(key_bytes(key))
        return default if entry is None else entry.value

    def entry(self, key: str | bytes) -> Entry | None:
        """``key``'s value with its sequence, UUID and properties, or None.

        Its ``ttl`` property, if any, is the seconds it had left when this
        client received it (snapshots carry the time remaining; updates,
        the writer's TTL).
        """
        return self._core.entries.get(key_bytes(key))

    def view(self, prefix: str = "") -> MapView:
        """A read-only, live mapping of the keys under ``prefix``."""
        return MapView(self._core, prefix)

    def keys(self, prefix: str = "") -> list[str]:
        return list(self.view(prefix))

    def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        return list(self.view(prefix).items())

    @property
    def sequence(self) -> int:
        """The sequence of the last update applied."""
        return self._core.sequence

    @property
    def server(self) -> str | None:
        """The server in use, or None before the first one is tried."""
        index = self._core.server
        return None if index < 0 else str(self._endpoints[index])

    @property
    def phase(self) -> str:
        return self._core.phase.value

    @property
    def failovers(self) -> int:
        return self._core.failovers

    @property
    def snapshot_progress(self) -> int | None:
        """Keys received so far of the snapshot being synced, or None when
        no snapshot is in progress.  It counts the map the snapshot builds:
        it starts again from 0 when the client asks again (another server,
        a gap, a reset), and a key received twice counts once."""
        incoming = self._core.incoming
        return None if incoming is None else len(incoming)

    @property
    def synced(self) -> bool:
        """True while the client holds a complete snapshot from a live server."""
        return bool(self._synced.value)

    async def wait_synced(self) -> None:
        """Wait for a complete snapshot; ``PermissionDeniedError`` if a
        secured server refused this client the subtree it asked for."""
        await wait_any(
            lambda: self._synced.wait_value(True),
            lambda: self._refused.wait_value(lambda reason: reason is not None),
        )
        if not self._synced.value and self._refused.value is not None:
            raise PermissionDeniedError(self._refused.value)

    def watch(self, prefix: str = "", *, state: bool = False) -> Watch:
        """Changes under ``prefix`` from now on: ``async for event in ...``.

        With ``state``, the first event is the state under ``prefix`` now, as
        a ``ResyncEvent``: applied in order, the events rebuild the map.
        """
        self._check_open()
        watch = Watch(prefix)
        if state:
            watch.put_state(self)
        self._watchers.add(watch)
        return watch

    # -- writing ---------------------------------------------------------

    async def set(
        self,
        key: str | bytes,
        value: str | bytes,
        *,
        ttl: float | None = None,
        timeout: float = 5.0,
    ) -> int:
        """Write and wait until the active server applied it; its sequence.

        Raises ``PermissionDeniedError`` at once if a secured server refused
        it (the client's key may not write ``key``), and ``WriteTimeoutError``
        if no server confirmed it in ``timeout``
        seconds, or within the client's write horizon if that is shorter
        (``ClientTimings.write_horizon``, 30 s by default: past it the write
        is no longer resent, as a resend could no longer be told from a new
        write).  The write may still have been applied.  An empty value
        deletes.
        """
        self._check_open()
        if not timeout > 0:
            raise LocalProtocolError(f"timeout must be more than 0, got {timeout}")
        body = value.encode() if isinstance(value, str) else value
        uuid = self._core.write(key_bytes(key), body, trio.current_time(), ttl=ttl)
        done = trio.Event()
        result: list[int | str | None] = []
        self._waiters[uuid] = (done, result)
        self._dispatch()
        try:
            with trio.move_on_after(timeout):  # or Unconfirmed at the horizon
                await done.wait()
        finally:  # confirmed, timed out or cancelled: stop tracking it
            self._waiters.pop(uuid, None)
            self._core.forget(uuid)
        if result and isinstance(result[0], str):
            raise PermissionDeniedError(result[0])
        if result and isinstance(result[0], int):
            return result[0]
        waited = min(timeout, self._core.timings.write_horizon)
        raise WriteTimeoutError(
            f"write of {key!r} not confirmed within {waited:g} s "
            f"(server {self.server}, {self.phase})"
        )

    async def delete(self, key: str | bytes, *, timeout: float = 5.0) -> int:
        return await self.set(key, b"", timeout=timeout)

    def set_nowait(
        self, key: str | bytes, value: str | bytes, *, ttl: float | None = None
    ) -> None:
        """Send a write and return at once: no confirmation, no resend."""
        self._check_open()
        body = value.encode() if isinstance(value, str) else value
        self._core.write(
            key_bytes(key), body, trio.current_time(), ttl=ttl, confirm=False
        )
        self._dispatch()

    # -- the agent -------------------------------------------------------

    async def _run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> NoReturn:
        with self._open_sockets() as sockets:
            self._pub = sockets.open(
                zmq.PUB, connect=[e.collector for e in self._endpoints]
            )
            self._follower = Follower(
                sockets, self._endpoints, [*self._core.subtrees, HUGZ]
            )
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                nursery.start_soon(self._timers.run)
                nursery.start_soon(self._follower.run, self._handle)
                task_status.started()
        raise AssertionError("the agent's tasks never return")

    async def _handle(self, is_reply: bool, batch: list[list[bytes]]) -> None:
        if is_reply:
            batch = [frames for frames in batch if not self._refusal(frames)]
        feed(self._core, is_reply, batch, trio.current_time(), self._reject)
        self._dispatch()  # wakes the timers: the rest of a catch-up is their work

    def _refusal(self, frames: list[bytes]) -> bool:
        """True if ``frames`` is a secured server's refusal, which settles
        the refused write, or (a refused snapshot) fails ``wait_synced``."""
        denial = decode_denial(frames)
        if denial is None:
            return False
        if denial.uuid:
            self._core.forget(denial.uuid)  # never resent
            self._settle_write(denial.uuid, denial.reason)
        else:
            log.error("the server refused a snapshot: %s", denial.reason)
            self._refused.value = denial.reason
        return True

    def _reject(self, where: str, exc: RemoteProtocolError) -> None:
        self._log.log(logging.WARNING, where, "rejected %s from server: %s", where, exc)

    def _dispatch(self) -> None:
        """Carry out the core's actions and deliver its events."""
        core = self._core
        actions, core.actions = core.actions, []
        connection = self._follower.current
        sends = self._follower.apply(actions)
        if self._follower.current is not connection and self._synced.value:
            log.warning("lost sync with the server; now trying %s", self.server)
        if sends:
            self._pub.refresh()  # take in collectors that connected meanwhile
        for send in sends:
            assert isinstance(send, Send)
            self._pub.try_send(send.frames)
        events, core.events = core.events, []
        for event in events:
            if isinstance(event, Confirmed):
                self._settle_write(event.uuid, event.sequence)
            elif isinstance(event, Unconfirmed):
                self._settle_write(event.uuid, None)
            else:
                self._deliver(event)
        self._synced.value = core.phase is Phase.ACTIVE
        if self._synced.value and self._refused.value is not None:
            self._refused.value = None  # allowed now (permissions change)
        self._timers.wake()

    def _settle_write(self, uuid: bytes, sequence: int | str | None) -> None:
        waiter = self._waiters.pop(uuid, None)
        if waiter is not None:
            waiter[1].append(sequence)
            waiter[0].set()

    def _deliver(self, event: Updated | Deleted | Resynced) -> None:
        if not self._watchers:
            return
        if isinstance(event, Resynced):
            server = str(self._endpoints[event.server])
            changes = {key_text(k): v for k, v in event.changes.items()}
            for watch in list(self._watchers):
                watch.put_resync(server, changes)
            return
        key = key_text(event.key)
        public: CloneEvent = (
            SetEvent(key, event.value, event.sequence)
            if isinstance(event, Updated)
            else DeleteEvent(key, event.sequence)
        )
        for watch in list(self._watchers):
            if key.startswith(watch.prefix):
                watch.put(public, self)

    def _close(self) -> None:
        self._closed = True
        self._follower.close()
        for watch in list(self._watchers):
            watch.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("the client is closed")


class Watch:
    """An async iterator of the changes under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._events: deque[CloneEvent] = deque()
        self._ready = trio.Event()
        self._closed = False

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> CloneEvent:
        if not await self._wait():
            raise StopAsyncIteration
        return self._events.popleft()

    async def next_batch(self) -> list[CloneEvent]:
        """Wait for an event, then take every event queued; [] once closed
        and empty.  (For a consumer in another thread: one crossing per
        batch, and what it has not taken stays here, under WATCH_BUFFER.)"""
        if not await self._wait():
            return []
        batch = list(self._events)
        self._events.clear()
        return batch

    async def _wait(self) -> bool:
        """Wait until an event is queued (True) or the watch is closed and
        empty (False)."""
        while not self._events:
            if self._closed:
                return False
            self._ready = trio.Event()
            await self._ready.wait()
        return True

    def close(self) -> None:
        """End the iteration once the events already queued are taken."""
        self._closed = True
        self._ready.set()

    def put(self, event: CloneEvent, client: CloneClient) -> None:
        if len(self._events) >= WATCH_BUFFER:  # too slow: replace by a resync
            self.put_state(client)
        self._events.append(event)
        self._ready.set()

    def put_state(self, client: CloneClient) -> None:
        """Replace what is queued by the state under the prefix, as a resync."""
        self._events.clear()
        state = dict(client.view(self.prefix).items())
        self._events.append(ResyncEvent(client.server or "", state))
        self._ready.set()

    def put_resync(self, server: str, changes: Mapping[str, bytes | None]) -> None:
        mine = {k: v for k, v in changes.items() if k.startswith(self.prefix)}
        self._events.append(ResyncEvent(server, mine))
        self._ready.set()


class MapView(Mapping[str, bytes]):
    """Read-only, live view of the client's map under a prefix."""

    def __init__(self, core: ClientCore, prefix: str) -> None:
        self._core = core
        self._prefix = key_bytes(prefix)

    def __getitem__(self, key: str) -> bytes:
        raw = key_bytes(key)
        if not raw.startswith(self._prefix):
            raise KeyError(key)
        return self._core.entries[raw].value

    def __iter__(self) -> Iterator[str]:
        prefix = self._prefix
        return iter([key_text(k) for k in self._core.entries if k.startswith(prefix)])

    def __len__(self) -> int:
        if not self._prefix:
            return len(self._core.entries)
        return sum(1 for k in self._core.entries if k.startswith(self._prefix))
