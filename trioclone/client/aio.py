"""The asyncio client: ``async with trioclone.aio.connect(...) as clone``.

Its agent is the blocking client's (``AgentThread``: ``open_client`` under
``trio.run`` in a thread of its own), so the protocol logic exists once;
only the crossing differs.  Nothing here makes the event loop wait on the
agent: a call is scheduled in the agent with ``TrioToken.run_sync_soon``
(which returns at once), runs there as a task of the client, and completes
an asyncio future with ``loop.call_soon_threadsafe``.  Starting and joining
the thread, the only waits on a thread, run in the loop's default executor
(``asyncio.to_thread``).

Cancelling an awaiting call cancels its task in the agent and returns once
the agent has finished with it: when ``CancelledError`` comes out of a
cancelled ``set``, the write is no longer tracked nor resent.  The agent's
errors arrive as raised there (``WriteTimeoutError``,
``PermissionDeniedError``, ``LocalProtocolError``, ``ClientClosedError``).

``get`` and the state properties look at the client directly (a dict
lookup or an attribute, atomic under the GIL); ``items`` and ``keys`` copy
the map in one step (``dict.copy`` runs no Python code, so the agent cannot
change the map halfway) and filter the copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import trio

from trioclone.client.agent import DEFAULT_SERVERS, CloneClient, Watch
from trioclone.client.events import CloneEvent, key_bytes, key_text
from trioclone.client.thread import AgentThread
from trioclone.core.client import ClientTimings
from trioclone.curve import Curve
from trioclone.errors import ClientClosedError, LocalProtocolError, NoServerError
from trioclone.server.settings import SECONDS

T = TypeVar("T")


class AsyncioClient:
    """``async with trioclone.aio.connect(...) as clone: await clone.set(...)``.

    The Trio client's API for asyncio programs: ``get``, ``items``,
    ``keys``, ``await set``, ``await delete``, ``async for event in
    watch(prefix)``, ``await wait_synced()`` and the state properties.
    """

    def __init__(
        self,
        servers: Sequence[str] = DEFAULT_SERVERS,
        subtree: str | Sequence[str] = "",
        *,
        timings: ClientTimings | None = None,
        sync_timeout: float | None = 10.0,
        curve: Curve | None = None,
    ) -> None:
        if sync_timeout is not None:
            SECONDS.check("sync_timeout", sync_timeout, LocalProtocolError)
        self._sync_timeout = sync_timeout
        self._agent = AgentThread(servers, subtree, timings=timings, curve=curve)
        self._opened = False
        #: The Trio-side queue of each watch, by watch id.  Only the agent
        #: thread touches this dict and the ``Watch`` objects in it.
        self._watches: dict[int, Watch] = {}
        self._watch_ids = itertools.count()

    # -- opening and closing ---------------------------------------------

    async def __aenter__(self) -> AsyncioClient:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Start the agent; with ``sync_timeout``, wait until synced
        (``NoServerError`` if no server answered in time)."""
        if self._opened:
            raise LocalProtocolError("this client was opened already")
        self._opened = True
        self._agent.start()
        try:
            await asyncio.to_thread(self._agent.wait_started)
            if self._sync_timeout is None:
                return
            try:
                async with asyncio.timeout(self._sync_timeout):
                    await self.wait_synced()
            except TimeoutError:
                raise NoServerError(
                    f"no server answered within {self._sync_timeout} s"
                ) from None
        except BaseException:  # failed or cancelled: no thread left running
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Close the client: calls under way raise ``ClientClosedError``,
        watches end.  Returns once the agent thread has ended."""
        self._agent.stop()
        await _through_cancellation(
            asyncio.ensure_future(asyncio.to_thread(self._agent.join))
        )
        self._watches.clear()  # (the agent that used them has ended)

    # -- reading ---------------------------------------------------------

    def get(self, key: str | bytes, default: bytes | None = None) -> bytes | None:
        return self._agent.client.get(key, default)

    def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        """The keys under ``prefix`` and their values, in the map's order."""
        entries = self._agent.client._core.entries.copy()
        raw = key_bytes(prefix)
        return [(key_text(k), e.value) for k, e in entries.items() if k.startswith(raw)]

    def keys(self, prefix: str = "") -> list[str]:
        return [key for key, _ in self.items(prefix)]

    @property
    def synced(self) -> bool:
        """True while the client holds a complete snapshot from a live server."""
        return self._agent.client.synced

    @property
    def phase(self) -> str:
        """ "initial", "syncing" or "active" (following a server)."""
        return self._agent.client.phase

    @property
    def server(self) -> str | None:
        """The server in use, or None before the first one is tried."""
        return self._agent.client.server

    @property
    def sequence(self) -> int:
        """The sequence of the last update applied."""
        return self._agent.client.sequence

    @property
    def failovers(self) -> int:
        """How many times a silent server made the client move to the next."""
        return self._agent.client.failovers

    async def wait_synced(self) -> None:
        """Wait for a complete snapshot; ``PermissionDeniedError`` if a
        secured server refused this client the subtree it asked for."""
        await self._call(lambda client: client.wait_synced())

    def watch(self, prefix: str = "", *, state: bool = False) -> AsyncioWatch:
        """Changes under ``prefix`` from now on: ``async for event in ...``.

        With ``state``, the first event is the state under ``prefix`` now,
        as a ``ResyncEvent``.  The iteration ends when the client closes;
        breaking out of it (or ``await watch.aclose()``) stops the watch.
        """
        return AsyncioWatch(self, prefix, state)

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

        As ``CloneClient.set``: ``WriteTimeoutError`` if not confirmed in
        ``timeout`` seconds (or the write horizon), ``PermissionDeniedError``
        if a secured server refused it.  An empty value deletes.
        """
        return await self._call(
            lambda client: client.set(key, value, ttl=ttl, timeout=timeout)
        )

    async def delete(self, key: str | bytes, *, timeout: float = 5.0) -> int:
        return await self.set(key, b"", timeout=timeout)

    # -- crossing over ---------------------------------------------------

    async def _call(
        self,
        fn: Callable[[CloneClient], Awaitable[T]],
        salvage: Callable[[T], object] | None = None,
    ) -> T:
        """Run ``fn(client)`` in the agent and return its result.

        Cancelled, it cancels ``fn`` and waits for the agent to finish it;
        a result that came in all the same goes to ``salvage``.
        """
        future, scope = self._submit(fn)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self._agent.run_soon_if_running(scope.cancel)
            try:  # (cancelled again meanwhile: still waits, then raises)
                await _through_cancellation(future)
            finally:
                if salvage is not None and future.exception() is None:
                    salvage(future.result())
            raise

    def _submit(
        self, fn: Callable[[CloneClient], Awaitable[T]]
    ) -> tuple[asyncio.Future[T], trio.CancelScope]:
        """Start ``fn(client)`` as a task in the agent; its outcome will
        complete the future (``ClientClosedError`` if the client closes)."""
        agent = self._agent
        client = agent.client
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        future.add_done_callback(_retrieve)
        scope = trio.CancelScope()

        def deliver(settle: Callable[[], object]) -> None:  # in the agent
            def settle_once() -> None:  # in the event loop
                if not future.done():
                    settle()

            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(settle_once)

        async def call() -> None:
            closed = ClientClosedError("the client is closed")
            settle: Callable[[], object] = partial(future.set_exception, closed)
            try:
                with scope:
                    await trio.lowlevel.checkpoint_if_cancelled()  # (not begun)
                    settle = partial(future.set_result, await fn(client))
            except Exception as exc:
                settle = partial(future.set_exception, exc)
            finally:  # also when the client's close cancelled ``fn``
                deliver(settle)

        def begin() -> None:
            try:
                agent.spawn(call)
            except RuntimeError:  # the client's tasks are ending
                deliver(
                    partial(
                        future.set_exception, ClientClosedError("the client is closed")
                    )
                )

        agent.run_soon(begin)
        return future, scope

    def _open_watch(self, prefix: str, state: bool) -> int:
        """Schedule a Trio-side watch; its id.  Calls scheduled after this
        run after it, so a write awaited next shows in the watch."""
        client = self._agent.client
        watch_id = next(self._watch_ids)

        def register() -> None:  # in the agent
            with contextlib.suppress(ClientClosedError):  # closing: it ends now
                self._watches[watch_id] = client.watch(prefix, state=state)

        self._agent.run_soon(register)
        return watch_id

    async def _take(
        self, watch_id: int, salvage: Callable[[list[CloneEvent]], object]
    ) -> list[CloneEvent]:
        """The events the watch holds, once it holds any; [] once it ended."""
        watches = self._watches

        async def take(client: CloneClient) -> list[CloneEvent]:
            watch = watches.get(watch_id)
            return [] if watch is None else await watch.next_batch()

        return await self._call(take, salvage)

    def _close_watch(self, watch_id: int) -> None:
        """Stop a watch (from any thread, without waiting)."""
        watches = self._watches

        def close() -> None:  # in the agent
            watch = watches.pop(watch_id, None)
            if watch is not None:
                watch.close()

        self._agent.run_soon_if_running(close)


class AsyncioWatch:
    """An async iterator of the changes under one prefix (``clone.watch``).

    The events wait in the agent's ``Watch``: a watcher that falls more than
    ``WATCH_BUFFER`` events behind gets a ``ResyncEvent`` in their place, as
    in the Trio client.  Each step that finds nothing taken yet fetches every
    event waiting there, in one crossing.
    """

    def __init__(self, clone: AsyncioClient, prefix: str, state: bool) -> None:
        self.prefix = prefix
        self._clone = clone
        self._events: deque[CloneEvent] = deque()
        self._ended = False
        self._taking = False
        self._id = clone._open_watch(prefix, state)
        # dropped (``break`` out of ``async for``): the agent stops it too
        self._finalizer = weakref.finalize(self, clone._close_watch, self._id)
        self._finalizer.atexit = False

    def __aiter__(self) -> AsyncioWatch:
        return self

    async def __anext__(self) -> CloneEvent:
        if self._events:
            return self._events.popleft()
        if self._ended:
            raise StopAsyncIteration
        if self._taking:
            raise LocalProtocolError("another task is iterating this watch")
        self._taking = True
        try:
            batch = await self._clone._take(self._id, self._salvage)
        except ClientClosedError:
            batch = []
        finally:
            self._taking = False
        if not batch:
            await self.aclose()
            raise StopAsyncIteration
        self._events.extend(batch)
        return self._events.popleft()

    def _salvage(self, batch: list[CloneEvent]) -> None:
        """Keep a batch the agent took as a step was cancelled, unless the
        watch was closed meanwhile."""
        if not self._ended:
            self._events.extend(batch)

    async def aclose(self) -> None:
        """Stop the watch; the iteration ends (events not taken are dropped)."""
        self._ended = True
        self._events.clear()
        self._finalizer()


async def _through_cancellation(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, even if cancelled meanwhile (its
    outcome is left in it); then raise ``CancelledError`` if cancelled.

    For waits on the agent that must not be cut short: the agent always
    settles the futures it was given, so this wait ends."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen: a caller that was cancelled, or
    that stopped waiting, does not want it (asyncio would log it)."""
    if not future.cancelled():
        future.exception()


def connect(
    servers: Sequence[str] = DEFAULT_SERVERS,
    subtree: str | Sequence[str] = "",
    *,
    timings: ClientTimings | None = None,
    sync_timeout: float | None = 10.0,
    curve: Curve | None = None,
) -> AsyncioClient:
    """An asyncio client, for ``async with``: synced on entry (or
    ``NoServerError`` after ``sync_timeout`` seconds; None: no wait)."""
    return AsyncioClient(
        servers, subtree, timings=timings, sync_timeout=sync_timeout, curve=curve
    )
