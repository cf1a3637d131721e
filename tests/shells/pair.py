"""A Binary Star pair in one process, over inproc://, for autojump tests."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple
from weakref import WeakValueDictionary

import trio
import zmq

from tests.chp import unique
from trioclone._zmq import Sockets
from trioclone.endpoints import Endpoints
from trioclone.server.clone import CloneServer
from trioclone.server.settings import PairSettings, ServerSettings


def pair_settings(
    name: str | None = None, *, relayed: bool = False, **options: Any
) -> tuple[ServerSettings, ServerSettings]:
    """Settings of a pair; ``relayed``: heartbeats go through a ``Relay``."""
    name = name or unique("pair")
    chp = {side: Endpoints.inproc(f"{name}-{side}") for side in ("primary", "backup")}
    state = {side: f"inproc://{name}-{side}-state" for side in ("primary", "backup")}
    heard = {
        side: f"inproc://{name}-{side}-relayed" if relayed else state[side]
        for side in state
    }
    heartbeat = options.pop("heartbeat", 1.0)

    def side(me: str, peer: str) -> ServerSettings:
        pair = PairSettings(
            primary=me == "primary",
            state_bind=state[me],
            state_peer=heard[peer],
            peer=chp[peer],
            heartbeat=heartbeat,
        )
        return ServerSettings(bind=chp[me], pair=pair, name=me, **options)

    return side("primary", "backup"), side("backup", "primary")


@dataclass
class Running:
    """A server in its own cancel scope: ``kill`` is cancelling it."""

    server: CloneServer
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Set once the server's task has ended (its sockets are closed).
    stopped: trio.Event = field(default_factory=trio.Event)

    def kill(self) -> None:
        self.scope.cancel()


async def _run(
    running: Running, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    try:
        with running.scope:
            await running.server.run(task_status=task_status)
    finally:
        running.stopped.set()


#: The last server started at each snapshot endpoint.
_servers: WeakValueDictionary[str, Running] = WeakValueDictionary()


async def start(
    nursery: trio.Nursery, settings: ServerSettings, context: zmq.Context[Any]
) -> Running:
    """Start a server; a restart first waits for the killed one to stop.

    Names are reused (peers and clients find a restarted server where it
    was), so the test ``context`` fixture (tests/conftest.py) must be used:
    its sockets free their inproc names when closed, where libzmq would free
    them later in its reaper thread.  Once the previous server's task has
    ended, its names are free: the bind cannot fail, whatever the real time.
    """
    where = settings.bind.snapshot
    previous = _servers.get(where)
    if previous is not None:
        assert previous.scope.cancel_called, f"a server still runs at {where}"
        await previous.stopped.wait()
    running = Running(CloneServer(settings, context=context))
    _servers[where] = running
    await nursery.start(_run, running)
    return running


class Relay:
    """Carries one server's heartbeats to its peer; ``cut`` drops them.

    Over inproc a SUB does not reconnect to a peer that died and bound its
    endpoint again (over tcp it does): ``reconnect`` makes the relay do it.
    """

    def __init__(self, sockets: Sockets, source: str, target: str) -> None:
        self.cut = False
        self._sockets = sockets
        self._source = source
        self._out = sockets.open(zmq.PUB, bind=[target])
        self._session = trio.CancelScope()

    def reconnect(self) -> None:
        self._session.cancel()

    async def run(self) -> None:
        while True:
            with trio.CancelScope() as self._session:
                await self._forward()

    async def _forward(self) -> None:
        source = self._sockets.open(zmq.SUB, connect=[self._source], subscribe=[b""])
        try:
            while True:
                for frames in await source.receive_batch():
                    if not self.cut:
                        self._out.try_send(frames)
        finally:
            source.close()

    @classmethod
    def between(
        cls, nursery: trio.Nursery, sockets: Sockets, settings: ServerSettings
    ) -> Relay:
        """Relay ``settings``' server's heartbeats to where its peer listens."""
        assert settings.pair is not None
        source = settings.pair.state_bind
        relay = cls(sockets, source, source.replace("-state", "-relayed"))
        nursery.start_soon(relay.run)
        return relay


class StartedPair(NamedTuple):
    """A running pair: its settings, servers and (if relayed) heartbeat relays."""

    settings: tuple[ServerSettings, ServerSettings]
    primary: Running
    backup: Running
    relays: list[Relay]


async def started_pair(
    nursery: trio.Nursery,
    context: zmq.Context[Any],
    sockets: Sockets | None = None,
    **options: Any,
) -> StartedPair:
    """Start primary then backup; return once the backup has synced.

    With ``sockets``, each side's heartbeats go through a ``Relay`` the test
    can cut."""
    settings = pair_settings(relayed=sockets is not None, **options)
    relays = (
        []
        if sockets is None
        else [Relay.between(nursery, sockets, side) for side in settings]
    )
    primary = await start(nursery, settings[0], context)
    backup = await start(nursery, settings[1], context)
    await backup.server.synced.wait_value(True)
    return StartedPair(settings, primary, backup, relays)


__all__ = [
    "Relay",
    "Running",
    "StartedPair",
    "pair_settings",
    "replace",
    "start",
    "started_pair",
]
