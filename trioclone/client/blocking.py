"""A blocking client for programs that do not run Trio.

The Guide's own design: the application holds a plain object; a background
agent keeps the map.  Here the agent is ``open_client`` running in its own
thread (``AgentThread``); calls cross over with ``trio.from_thread`` and
block until the agent has done them.  ``get`` and the state properties look
at the client directly (a dict lookup is atomic under the GIL, so they cost
no thread hop); ``items`` runs in the agent, as iterating the map while the
agent changes it could fail.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any

import trio

from trioclone.client.agent import DEFAULT_SERVERS, CloneClient
from trioclone.client.events import CloneEvent
from trioclone.client.thread import AgentThread
from trioclone.core.client import ClientTimings
from trioclone.curve import Curve
from trioclone.errors import LocalProtocolError, NoServerError
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
        self._agent = AgentThread(servers, subtree, timings=timings, curve=curve)
        self._agent.start()
        self._agent.wait_started()
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

    def _live(self) -> CloneClient:
        return self._agent.client

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self._live()

        async def call() -> Any:
            return await fn(*args, **kwargs)

        return self._agent.run(call)

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

        result: bool = self._agent.run(wait)
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
        return self._agent.run_sync(lambda: client.items(prefix))

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
        self._agent.run_sync(lambda: client.set_nowait(key, value, ttl=ttl))

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

        self._agent.run_sync(lambda: self._agent.spawn(forward))
        try:
            while (event := events.get()) is not _CLOSED:
                yield event  # type: ignore[misc]
        finally:  # the caller stopped early: stop forwarding
            self._agent.run_soon_if_running(scope.cancel)

    def close(self) -> None:
        self._agent.stop()
        self._agent.join()

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
