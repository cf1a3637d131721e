"""Run a server (or a relay) until a signal stops it."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from typing import Any, Protocol

import trio

log = logging.getLogger("trioclone")

#: Each stops a server gracefully (SIGHUP: its terminal hung up; with
#: ``--pair`` the children have sessions of their own, so only the
#: supervisor gets it, and stops them).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stoppable(Protocol):
    async def run(self, *, task_status: Any = ...) -> None: ...

    def stop(self) -> None: ...

    @property
    def stopping(self) -> bool: ...


async def run_until_signalled(server: Stoppable) -> None:
    """Serve until SIGTERM, SIGINT or SIGHUP, then stop gracefully (bounded:
    see ``CloneServer.stop``); a second signal meanwhile stops at once."""
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signals, signals, server, nursery.cancel_scope)
            await server.run()
            nursery.cancel_scope.cancel()


async def _stop_on_signals(
    signals: AsyncIterator[int], server: Stoppable, scope: trio.CancelScope
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not server.stopping:
            log.info("stopping on %s", name)
            server.stop()
        else:
            log.warning("stopping at once on a second signal (%s)", name)
            scope.cancel()
            return
