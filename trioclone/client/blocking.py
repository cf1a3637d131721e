"""A blocking client for programs that do not run Trio.

The Guide's own design: the application holds a plain object; a background
agent keeps the map.  Here the agent is ``open_client`` running in its own
thread under ``trio.run``; calls cross over with ``trio.from_thread``.
Reads (``get``, ``items``) look at the map directly: a dict lookup is
atomic under the GIL, so they cost no thread hop.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import trio

from trioclone.client.agent import DEFAULT_SERVERS, CloneClient, open_client
from trioclone.client.events import CloneEvent
from trioclone.core.client import ClientTimings
from trioclone.curve import Curve
from trioclone.errors import ClientClosedError, LocalProtocolError, NoServerError
from trioclone.server.settings import SECONDS

_CLOSED = object()


class BlockingClient:
    """``with trioclone.connect(...) as clone: clone.set("k", "v")``."""

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
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._client: CloneClient | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(
            target=self._thread_main,
            args=(servers, subtree, timings, curve),
            name="trioclone-agent",
            daemon=True,
        )
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            raise self._failure
        if sync_timeout is None:
            return
        try:
            synced = self.wait_synced(sync_timeout)
        except BaseException:  # refused by a secured server: not left running
            self.close()
            raise
        if not synced:
            self.close()
            raise NoServerError(f"no server answered within {sync_timeout} s")

    def _thread_main(self, *args: Any) -> None:
        try:
            trio.run(self._agent, *args)
        except BaseException as exc:  # reported to the constructor
            self._failure = exc
            self._started.set()

    async def _agent(
        self,
        servers: Sequence[str],
        subtree: str | Sequence[str],
        timings: ClientTimings | None,
        curve: Curve | None,
    ) -> None:
        async with open_client(
            servers, subtree, timings=timings, curve=curve
        ) as client:
            self._client = client
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._stop.wait()

    def _live(self) -> CloneClient:
        if self._client is None or self._stop is None or self._stop.is_set():
            raise ClientClosedError("the client is closed")
        return self._client

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self._live()

        async def call() -> Any:
            return await fn(*args, **kwargs)

        return trio.from_thread.run(call, trio_token=self._token)

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the client holds a snapshot; False on timeout."""
        client = self._live()
        if timeout is not None and not timeout >= 0:
            raise LocalProtocolError(f"timeout must be None or >= 0, got {timeout}")

        async def wait() -> bool:
            with trio.move_on_after(_seconds(timeout)):
                await client.wait_synced()
                return True
            return False

        result: bool = trio.from_thread.run(wait, trio_token=self._token)
        return result

    def get(self, key: str | bytes, default: bytes | None = None) -> bytes | None:
        return self._live().get(key, default)

    @property
    def synced(self) -> bool:
        """True while the client holds a complete snapshot from a live server."""
        return self._live().synced

    @property
    def phase(self) -> str:
        """ "initial", "syncing" or "active" (following a server)."""
        return self._live().phase

    @property
    def server(self) -> str | None:
        """The server in use, or None before the first one is tried."""
        return self._live().server

    @property
    def sequence(self) -> int:
        """The sequence of the last update applied."""
        return self._live().sequence

    @property
    def failovers(self) -> int:
        """How many times a silent server made the client move to the next."""
        return self._live().failovers

    def items(self, prefix: str = "") -> list[tuple[str, bytes]]:
        client = self._live()
        return trio.from_thread.run_sync(client.items, prefix, trio_token=self._token)

    def set(
        self,
        key: str | bytes,
        value: str | bytes,
        *,
        ttl: float | None = None,
        timeout: float = 5.0,
    ) -> int:
        client = self._live()
        sequence: int = self._call(client.set, key, value, ttl=ttl, timeout=timeout)
        return sequence

    def delete(self, key: str | bytes, *, timeout: float = 5.0) -> int:
        return self.set(key, b"", timeout=timeout)

    def set_nowait(
        self, key: str | bytes, value: str | bytes, *, ttl: float | None = None
    ) -> None:
        """Send a write and return at once: no confirmation, no resend."""
        client = self._live()
        trio.from_thread.run_sync(
            lambda: client.set_nowait(key, value, ttl=ttl), trio_token=self._token
        )

    def watch(self, prefix: str = "") -> Iterator[CloneEvent]:
        """Changes under ``prefix``, as a blocking iterator (ends on close)."""
        client = self._live()
        events: queue.SimpleQueue[object] = queue.SimpleQueue()
        scope = trio.CancelScope()

        async def forward() -> None:
            try:
                with scope:
                    async for event in client.watch(prefix):
                        events.put(event)
            finally:
                events.put(_CLOSED)

        trio.from_thread.run_sync(lambda: self._spawn(forward), trio_token=self._token)
        try:
            while (event := events.get()) is not _CLOSED:
                yield event  # type: ignore[misc]
        finally:  # the caller stopped early: stop forwarding
            if self._stop is not None and not self._stop.is_set():
                trio.from_thread.run_sync(scope.cancel, trio_token=self._token)

    def _spawn(self, fn: Any) -> None:
        assert self._client is not None
        self._client.nursery.start_soon(fn)

    def close(self) -> None:
        if self._stop is not None and not self._stop.is_set():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _seconds(timeout: float | None) -> float:
    """None means no limit."""
    return float("inf") if timeout is None else timeout


def connect(
    servers: Sequence[str] = DEFAULT_SERVERS,
    subtree: str | Sequence[str] = "",
    **options: Any,
) -> BlockingClient:
    """A blocking client, synced (or ``NoServerError`` after ``sync_timeout``)."""
    return BlockingClient(servers, subtree, **options)
