"""CHP on the wire for the benchmark: keys, KVSETs, probes, snapshot requests.

Plain synchronous pyzmq, decoded with ``struct`` (not trioclone's codec), so
the same client code measures the ceiling and trioclone.  Every wait is
bounded by a timeout and every loop by a count.

Key layout (16 bytes): ``/key/`` or ``/hot/`` (every 100th key) and 11
digits, so the ``/hot/`` subtree holds 1% of the keys.  Probes use ``/pr/``
keys; they are stored by the servers but never counted as data.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

HOST = "127.0.0.1"
SEQUENCE = struct.Struct("!q")
ZERO_SEQUENCE = SEQUENCE.pack(0)
ICANHAZ = b"ICANHAZ?"
KTHXBAI = b"KTHXBAI"
HUGZ = b"HUGZ"
PROBE = b"/pr/"
KEY = b"/key/"
HOT = b"/hot/"
DATA_PREFIXES = (KEY, HOT)
#: trioclone's subtree heartbeats (key: a subscribed prefix and this marker,
#: sequence 0, empty body) reach subscribers of data prefixes: not data.
SUBTREE_HUGZ = b"\x00HUGZ"


def is_data(key: bytes) -> bool:
    return key[:5] in DATA_PREFIXES and not key.endswith(SUBTREE_HUGZ)


NO_SUBTREE = b"/none/"  # a subtree with no keys: the reply is just KTHXBAI
KEY_SIZE = 16
VALUE_SIZE = 100
VALUE = b"v" * VALUE_SIZE

Frames = list[bytes]
Context = zmq.Context[zmq.Socket[bytes]]
#: The CURVE options of a connecting socket (CURVE_SERVERKEY, CURVE_PUBLICKEY,
#: CURVE_SECRETKEY), set before it connects; empty for plain CHP.
Security = tuple[tuple[int, int | bytes], ...]
PLAIN: Security = ()


def tcp(port: int) -> str:
    return f"tcp://{HOST}:{port}"


DIGEST_MASK = (1 << 64) - 1


def data_key(index: int) -> bytes:
    """The 16-byte key number ``index``; every 100th is under ``/hot/``."""
    return (HOT if index % 100 == 0 else KEY) + b"%011d" % index


def kvset(key: bytes, body: bytes = VALUE, uuid: bytes | None = None) -> Frames:
    return [key, ZERO_SEQUENCE, os.urandom(16) if uuid is None else uuid, b"", body]


def build_updates(
    count: int, first: int, key_space: int, stride: int = 1
) -> list[Frames]:
    """``count`` KVSETs over keys ``first, first+stride, ...`` (mod ``key_space``).

    Each has a fresh random 16-byte UUID (trioclone drops repeated UUIDs).
    """
    uuids = os.urandom(16 * count)
    return [
        [
            data_key((first + j * stride) % key_space),
            ZERO_SEQUENCE,
            uuids[16 * j : 16 * j + 16],
            b"",
            VALUE,
        ]
        for j in range(count)
    ]


# pyzmq's Cython methods with plain int flags: the ``zmq.Socket`` wrappers
# (and ``send_multipart``/``recv_multipart`` most of all) cost more per frame
# than moving it, and the load generator must stay cheap.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_MORE = int(zmq.SNDMORE)


def frame_sender(sock: zmq.Socket[bytes]) -> Callable[[Frames], None]:
    """Send a five-frame message frame by frame (blocking: a writer's PUB
    has SNDHWM 0, so it never blocks there)."""
    more = _MORE

    def send_frames(frames: Frames, send: Callable[..., Any] = _send) -> None:
        send(sock, frames[0], more)
        send(sock, frames[1], more)
        send(sock, frames[2], more)
        send(sock, frames[3], more)
        send(sock, frames[4], 0)

    return send_frames


def frame_receiver(sock: zmq.Socket[bytes]) -> Callable[[int], Frames]:
    """Receive a five-frame message (every CHP message from a server has five).

    Raises ``zmq.Again`` (with ``zmq.NOBLOCK``) only before the first frame:
    the rest of a message is always queued with it.
    """

    def receive_frames(flags: int = 0, recv: Callable[..., Any] = _recv) -> Frames:
        return [
            recv(sock, int(flags)),
            recv(sock, 0),
            recv(sock, 0),
            recv(sock, 0),
            recv(sock, 0),
        ]

    return receive_frames


def socket(
    ctx: Context, kind: int, security: Security = PLAIN, **options: int
) -> zmq.Socket[bytes]:
    """A socket with LINGER 0, ``security``'s CURVE options and ``options``."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    for option, setting in security:
        sock.setsockopt(option, setting)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    return sock


def receive(sock: zmq.Socket[bytes], timeout: float) -> Frames | None:
    """One message, or None after ``timeout`` seconds."""
    if sock.poll(max(int(timeout * 1000), 0), zmq.POLLIN):
        return sock.recv_multipart(zmq.NOBLOCK)
    return None


class Feeder:
    """A writer in this process: PUB to collector(s), SUB for probe echoes."""

    def __init__(
        self,
        ctx: Context,
        collectors: Sequence[int],
        publisher: int,
        name: bytes,
        subscribe: Sequence[bytes] = (),
        security: Security = PLAIN,
    ):
        self.probe_key = PROBE + name
        self.pub = socket(ctx, zmq.PUB, security, SNDHWM=0)
        for port in collectors:
            self.pub.connect(tcp(port + 2))
        # every subscription before connect: once the probe echoes, all are live
        self.sub = socket(ctx, zmq.SUB, security, RCVHWM=0)
        for prefix in (self.probe_key, *subscribe):
            self.sub.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sub.connect(tcp(publisher + 1))
        self.send = frame_sender(self.pub)

    def probe(self, timeout: float = 10.0, every: float = 0.02) -> bool:
        """Send probe KVSETs until one comes back: both paths are live."""
        return probe_until_echo(self.pub, self.sub, self.probe_key, timeout, every)

    def close(self) -> None:
        self.pub.close(0)
        self.sub.close(0)


def probe_until_echo(
    pub: zmq.Socket[bytes],
    sub: zmq.Socket[bytes],
    key: bytes,
    timeout: float,
    every: float = 0.02,
) -> bool:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / every) + 2):
        pub.send_multipart(kvset(key, b"probe"))
        if receive(sub, every) is not None:
            while receive(sub, 0.05) is not None:  # drain the other echoes
                pass
            return True
        if time.monotonic() > deadline:
            break
    return False


@dataclass
class SnapshotReply:
    kvsync: int  # KVSYNC messages before KTHXBAI
    data: int  # of which with a data key (not a probe)
    sequence: int  # the KTHXBAI's
    seconds: float  # ICANHAZ sent -> KTHXBAI received
    keys: set[bytes] | None = None
    #: The sum of the data keys' CRC-32s (mod 2**64): a key twice, or one
    #: missing, changes it.
    digest: int = 0


def request_snapshot(
    ctx: Context,
    port: int,
    subtree: bytes = b"",
    *,
    timeout: float = 10.0,
    keep_keys: bool = False,
    pause_every: int = 0,
    pause: float = 0.0,
    max_messages: int = 20_000_000,
    security: Security = PLAIN,
) -> SnapshotReply | None:
    """ICANHAZ on a fresh DEALER; None if KTHXBAI does not come in time.

    ``pause_every``/``pause``: a slow reader that sleeps ``pause`` seconds
    every ``pause_every`` messages.
    """
    dealer = socket(ctx, zmq.DEALER, security)
    dealer.connect(tcp(port))
    try:
        keys: set[bytes] | None = set() if keep_keys else None
        start = time.perf_counter()
        dealer.send_multipart([ICANHAZ, subtree])
        deadline = time.monotonic() + timeout
        recv, poll = frame_receiver(dealer), dealer.poll
        kvsync = data = digest = 0
        crc = zlib.crc32
        for _ in range(max_messages):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                left = deadline - time.monotonic()
                if left <= 0 or not poll(int(left * 1000) + 1, zmq.POLLIN):
                    return None
                continue
            key = frames[0]
            if key == KTHXBAI:
                seconds = time.perf_counter() - start
                return SnapshotReply(
                    kvsync,
                    data,
                    SEQUENCE.unpack(frames[1])[0],
                    seconds,
                    keys,
                    digest & DIGEST_MASK,
                )
            kvsync += 1
            if key[:5] in DATA_PREFIXES:
                data += 1
                digest += crc(key)
            if keys is not None:
                keys.add(key)
            if pause_every and kvsync % pause_every == 0:
                time.sleep(pause)
        return None
    finally:
        dealer.close(0)


def server_sequence(
    ctx: Context, port: int, timeout: float = 2.0, security: Security = PLAIN
) -> int | None:
    """The server's current sequence (a KTHXBAI for an empty subtree)."""
    reply = request_snapshot(ctx, port, NO_SUBTREE, timeout=timeout, security=security)
    return None if reply is None else reply.sequence


def wait_sequence(
    ctx: Context, port: int, target: int, timeout: float, every: float = 0.02
) -> int:
    """Poll KTHXBAI until the server's sequence reaches ``target``."""
    deadline = time.monotonic() + timeout
    sequence = -1
    for _ in range(int(timeout / every) + 2):
        seq = server_sequence(ctx, port, max(deadline - time.monotonic(), 0.1))
        sequence = sequence if seq is None else seq
        if sequence >= target:
            return sequence
        if time.monotonic() > deadline:
            break
        time.sleep(every)
    raise TimeoutError(f"port {port}: sequence {sequence} < {target} after {timeout} s")
