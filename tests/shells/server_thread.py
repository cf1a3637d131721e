"""Servers in a thread of the test process, over TCP on 127.0.0.1.

For clients that run their own event loop (the asyncio client): the servers
run under ``trio.run`` in a thread, the test drives them from its own thread
(``kill``), and ``with`` stops them all.  Real clock: every wait is bounded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import trio
import zmq

from tests.integration.procs import HOST, free_base_ports, free_ports
from tests.shells.pair import Running, start
from trioclone.server.settings import ServerSettings, pair_settings

START_LIMIT = 30.0  # seconds the servers may take to start (and sync)


def tcp_pair(**options: Any) -> list[ServerSettings]:
    """A primary and a backup on free ports of 127.0.0.1."""
    p1, p2 = free_base_ports(2, 3)
    s1, s2 = free_ports(2)
    sides = {"primary": (p1, p2, s1, s2), "backup": (p2, p1, s2, s1)}
    return [
        pair_settings(
            role,
            port=port,
            bind_host=HOST,
            peer_host=HOST,
            peer_port=peer,
            state_port=state,
            peer_state_port=peer_state,
            **options,
        )
        for role, (port, peer, state, peer_state) in sides.items()
    ]


def tcp_standalone(**options: Any) -> list[ServerSettings]:
    """One standalone server on a free port of 127.0.0.1."""
    (port,) = free_base_ports(1, 3)
    return [pair_settings("standalone", port=port, bind_host=HOST, **options)]


class ServerThread:
    """``with ServerThread(settings) as servers:`` the servers run (a pair's
    backup has synced from the primary when ``with`` is entered)."""

    def __init__(self, settings: Sequence[ServerSettings]) -> None:
        self.settings = list(settings)
        #: Each server's address, for clients.
        self.servers = [str(s.bind) for s in settings]
        self.running: list[Running] = []
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="test-servers")

    def __enter__(self) -> ServerThread:
        self._thread.start()
        started = self._ready.wait(START_LIMIT)
        if self._failure is not None or not started:
            self._finish()
            raise RuntimeError("the servers did not start") from self._failure
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._finish()

    def _finish(self) -> None:
        if self._token is not None and self._stop is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(START_LIMIT)
        assert not self._thread.is_alive(), "the servers did not stop"

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        context: zmq.Context[Any] = zmq.Context()
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(START_LIMIT):
                    for settings in self.settings:
                        self.running.append(await start(nursery, settings, context))
                    if len(self.running) == 2:
                        await self.running[1].server.synced.wait_value(True)
                self._stop = trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            context.destroy(linger=0)

    def kill(self, index: int) -> None:
        """Stop server ``index`` at once, as a crash would; returns once its
        sockets are closed."""
        running = self.running[index]

        async def kill() -> None:
            running.kill()
            await running.stopped.wait()

        trio.from_thread.run(kill, trio_token=self._token)
