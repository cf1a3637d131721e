"""A raw CHP peer for tests: speaks the wire protocol with nothing hidden."""

from __future__ import annotations

import itertools
import uuid as uuidlib

import trio
import trio.testing
import zmq

from trioclone._zmq import Socket, Sockets
from trioclone.core.chp import (
    KTHXBAI,
    KVMsg,
    decode_kvmsg,
    encode_kvmsg,
    encode_request,
)
from trioclone.endpoints import Endpoints

_names = itertools.count()


def unique(prefix: str) -> str:
    """A fresh inproc name."""
    return f"{prefix}-{next(_names)}"


class RawClient:
    """DEALER to the snapshot port, SUB to the publisher, PUB to the collector."""

    def __init__(
        self,
        sockets: Sockets,
        server: Endpoints,
        subscribe: bytes = b"",
        *,
        writes_to: tuple[Endpoints, ...] = (),
    ) -> None:
        self.dealer: Socket = sockets.open(zmq.DEALER, connect=[server.snapshot])
        self.sub: Socket = sockets.open(
            zmq.SUB, connect=[server.publisher], subscribe=[subscribe]
        )
        collectors = [e.collector for e in writes_to or (server,)]
        self.pub: Socket = sockets.open(zmq.PUB, connect=collectors)

    async def snapshot(self, subtree: bytes = b"") -> tuple[list[KVMsg], KVMsg]:
        """KVSYNC messages and the KTHXBAI of one snapshot."""
        await self.dealer.send(encode_request(subtree))
        entries = []
        while True:
            msg = decode_kvmsg(await self.dealer.receive())
            if msg.key == KTHXBAI:
                return entries, msg
            entries.append(msg)

    def set(
        self,
        key: bytes,
        body: bytes,
        *,
        ttl: float | None = None,
        uuid: bytes | None = None,
        properties: dict[str, str] | None = None,
    ) -> bytes:
        """Send a KVSET; return its UUID."""
        uuid = uuidlib.uuid4().bytes if uuid is None else uuid
        props = dict(properties or {})
        if ttl is not None:
            props["ttl"] = str(ttl)
        # A PUB takes in new subscribers at most once a millisecond of real
        # time when sending; reading EVENTS makes it do so now, so a collector
        # that connected (and settled) is never missed.
        self.pub.refresh()
        self.pub.try_send(encode_kvmsg(KVMsg(key, 0, uuid, props, body)))
        return uuid

    async def next_update(self, *, skip_hugz: bool = True) -> KVMsg:
        while True:
            msg = decode_kvmsg(await self.sub.receive())
            if not (skip_hugz and msg.key == b"HUGZ"):
                return msg

    async def updates(self, count: int) -> list[KVMsg]:
        return [await self.next_update() for _ in range(count)]


async def settle() -> None:
    """Let every task run until all are blocked (inproc delivery is immediate)."""
    await trio.testing.wait_all_tasks_blocked()
