"""The agent thread: ``open_client`` running under ``trio.run`` in a thread
of its own, for programs that do not run Trio.

The blocking client (``trioclone.connect``) and the asyncio client
(``trioclone.aio``) are both this thread plus a way of crossing over to it,
so the protocol logic exists once, in ``CloneClient``.  Only the agent
thread touches the client's state, except for reads that are atomic under
the GIL (a dict lookup or copy, an attribute).

Crossing over: ``run`` and ``run_sync`` block the calling thread until the
agent has done the work; ``run_soon`` only schedules a call and returns at
once (calls scheduled this way run in the order they were scheduled).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio

from trioclone.client.agent import CloneClient, open_client
from trioclone.core.client import ClientTimings
from trioclone.curve import Curve
from trioclone.errors import ClientClosedError

T = TypeVar("T")

log = logging.getLogger("trioclone.client")


class AgentThread:
    """One ``open_client`` in a daemon thread, from ``start`` until ``stop``."""

    def __init__(
        self,
        servers: Sequence[str],
        subtree: str | Sequence[str],
        *,
        timings: ClientTimings | None = None,
        curve: Curve | None = None,
    ) -> None:
        self._started = threading.Event()
        self._lock = threading.Lock()  # orders ``stop`` against start-up
        self._stopping = False
        self._failure: BaseException | None = None
        self._client: CloneClient | None = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(
            target=self._main,
            args=(servers, subtree, timings, curve),
            name="trioclone-agent",
            daemon=True,
        )

    def start(self) -> None:
        """Start the thread; returns at once (``wait_started`` waits)."""
        self._thread.start()

    def wait_started(self) -> None:
        """Block until the agent runs, or raise what kept it from starting
        (a bad server address, a bad key)."""
        self._started.wait()
        if self._failure is not None:
            raise self._failure

    def _main(self, *args: Any) -> None:
        try:
            trio.run(self._agent, *args)
        except BaseException as exc:  # before start: raised by ``wait_started``
            self._failure = exc
            if self._started.is_set():  # the agent failed while in use
                log.error("the client's agent failed: %r", exc, exc_info=exc)
        finally:
            with self._lock:  # no more calls: the map is no longer kept
                self._stopping = True
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
            self._stop = trio.Event()
            with self._lock:
                self._client = client
                self._token = trio.lowlevel.current_trio_token()
                stopping = self._stopping
            self._started.set()
            if not stopping:  # (a stop asked for during start-up ends it now)
                await self._stop.wait()

    @property
    def client(self) -> CloneClient:
        """The running client; ``ClientClosedError`` once ``stop`` was called
        or the agent ended (an error in the agent, logged)."""
        client = self._client
        if client is None or self._stopping:
            failure = self._failure if client is not None else None
            if failure is not None:
                raise ClientClosedError(f"the client's agent failed: {failure!r}")
            raise ClientClosedError("the client is closed")
        return client

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        self.client  # noqa: B018 (raises if closed)
        assert self._token is not None
        return self._token

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn()`` in the agent and wait for its result (blocking)."""
        return trio.from_thread.run(fn, trio_token=self.token)

    def run_sync(self, fn: Callable[[], T]) -> T:
        """Call ``fn()`` in the agent and wait for its result (blocking)."""
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def run_soon(self, fn: Callable[[], object]) -> None:
        """Schedule ``fn()`` in the agent and return at once.

        ``fn`` must not raise (Trio would end the run).  Raises
        ``ClientClosedError`` if the agent has stopped; a call that was
        scheduled is carried out, even while the agent stops.
        """
        try:
            self.token.run_sync_soon(fn)
        except trio.RunFinishedError:
            raise ClientClosedError("the client is closed") from None

    def run_soon_if_running(self, fn: Callable[[], object]) -> None:
        """``run_soon``, or nothing if the agent has stopped."""
        token = self._token
        if token is None:
            return
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(fn)

    def spawn(self, fn: Callable[[], Awaitable[object]]) -> None:
        """Start ``fn()`` as a task of the client (call in the agent thread);
        it is cancelled when the client closes.  ``RuntimeError`` if the
        client's tasks are already ending."""
        assert self._client is not None
        self._client.nursery.start_soon(fn)

    def stop(self) -> None:
        """Ask the agent to close the client and end; returns at once."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            token, stop = self._token, self._stop
        if token is not None and stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stop.set)

    def join(self) -> None:
        """Wait until the thread has ended (after ``stop``)."""
        if self._thread.ident is not None:
            self._thread.join()
