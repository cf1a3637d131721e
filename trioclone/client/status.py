"""Asking servers for their status (``trioclone status``; core/status.py).

Every server is asked at once, each over a DEALER of its own on its
snapshot socket; one that does not answer in time is unreachable.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio
import zmq

from trioclone._zmq import Socket, Sockets
from trioclone.core.status import decode_status_reply, encode_status_request
from trioclone.curve import Curve
from trioclone.endpoints import Endpoints
from trioclone.errors import RemoteProtocolError

log = logging.getLogger("trioclone.status")


@dataclass(frozen=True)
class ServerStatus:
    """What one server said, or why it said nothing (``error``)."""

    server: Endpoints
    status: dict[str, object] | None = None
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.status is not None and self.status.get("state") == "ACTIVE"


def open_status_socket(sockets: Sockets, server: Endpoints) -> Socket:
    """The socket a status request goes out on: the one place that makes it
    (``sockets`` adds its CURVE options, for a secured server)."""
    return sockets.open(zmq.DEALER, connect=[server.snapshot])


async def ask_status(
    sockets: Sockets, server: Endpoints, timeout: float
) -> ServerStatus:
    """One server's status, within ``timeout`` seconds."""
    sock = open_status_socket(sockets, server)
    try:
        with trio.move_on_after(timeout):
            await sock.send(encode_status_request())
            frames = await sock.receive()
            try:
                return ServerStatus(server, decode_status_reply(frames))
            except RemoteProtocolError as exc:
                return ServerStatus(server, error=f"bad reply: {exc}")
        return ServerStatus(server, error=f"no answer within {timeout:g} s")
    finally:
        sock.close()


async def ask_all(
    servers: Sequence[Endpoints],
    timeout: float,
    context: zmq.Context[zmq.Socket[bytes]] | None = None,
    curve: Curve | None = None,
) -> list[ServerStatus]:
    """Every server's status, asked in parallel, in the order given;
    ``curve``: the client's keys, for secured servers (docs/security.md)."""
    results: list[ServerStatus | None] = [None] * len(servers)

    async def ask(index: int, sockets: Sockets) -> None:
        results[index] = await ask_status(sockets, servers[index], timeout)

    with Sockets(context, curve) as sockets:
        async with trio.open_nursery() as nursery:
            for index in range(len(servers)):
                nursery.start_soon(ask, index, sockets)
    return [result for result in results if result is not None]
