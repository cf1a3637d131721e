"""Load-generating processes: writers, subscribers, a latency prober, snapshot clients.

Each function here is the body of one child process (started from a
``forkserver`` context, so children never inherit a zmq context).  They talk
to the parent over a ``multiprocessing`` pipe, or, for subscribers, through a
shared array the parent polls.  Every loop is bounded in count and time.

Times are ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux: one clock for
every process on the machine), so the parent can compare the times that
different children report.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

import zmq

from benchlib.wire import (
    DATA_PREFIXES,
    ICANHAZ,
    KTHXBAI,
    PROBE,
    SUBTREE_HUGZ,
    VALUE_SIZE,
    Feeder,
    Frames,
    Security,
    build_updates,
    frame_receiver,
    frame_sender,
    socket,
    tcp,
)

MAX_COMMANDS = 10_000
DRAIN = 1000  # messages taken off a socket per poll
MIN_SLEEP = 0.0005  # a paced writer sleeps at least this long between bursts
STAMP = struct.Struct("!q")
RECV = zmq.backend.Socket.recv  # Cython, int flags: see wire.frame_receiver
NOBLOCK = int(zmq.NOBLOCK)

# -- writer --------------------------------------------------------------------


def writer(
    conn: Connection,
    index: int,
    collectors: Sequence[int],
    publisher: int,
    stop: Any,
    security: Security = (),
) -> None:
    """Connect, probe, then obey commands from the parent:

    ``("build", count, first, key_space, stride)``: pre-build KVSETs;
    ``("flood",)``: send them all as fast as possible;
    ``("pace", rate)``: send them at ``rate`` per second (until ``stop``);
    ``("stop",)``.  ``flood`` and ``pace`` answer with a send report.
    ``security``: the CURVE options of its sockets (none: plain CHP).
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    feeder = Feeder(ctx, collectors, publisher, b"w%03d" % index, security=security)
    try:
        conn.send(feeder.probe())
        updates: list[Frames] = []
        for _ in range(MAX_COMMANDS):
            command, *params = conn.recv()
            if command == "build":
                count, first, key_space, stride = params
                updates = build_updates(count, first, key_space, stride)
                conn.send(len(updates))
            elif command == "flood":
                conn.send(send_updates(feeder.pub, updates, None))
            elif command == "pace":
                conn.send(send_updates(feeder.pub, updates, params[0], stop))
            else:
                break
    finally:
        feeder.close()
        ctx.term()


def send_updates(
    pub: zmq.Socket[bytes], updates: list[Frames], rate: float | None, stop: Any = None
) -> dict[str, float]:
    """Send ``updates`` (at ``rate``/s if given); when and how fast it went."""
    send = frame_sender(pub)
    count = len(updates)
    cpu0, start = time.process_time(), time.perf_counter()
    if rate is None:
        for frames in updates:
            send(frames)
    else:
        sent = 0
        for _ in range(count + int(4 * count / rate / MIN_SLEEP) + 10):
            due = min(count, int((time.perf_counter() - start) * rate) + 1)
            while sent < due:
                send(updates[sent])
                sent += 1
            if sent >= count or (stop is not None and stop.is_set()):
                break
            time.sleep(max(start + sent / rate - time.perf_counter(), MIN_SLEEP))
        count = sent
    end = time.perf_counter()
    return {
        "sent": count,
        "start": start,
        "end": end,
        "cpu": time.process_time() - cpu0,
    }


# -- subscriber ----------------------------------------------------------------

#: Per socket, in the shared array: data count, first and last arrival, probes.
SLOTS = 4


def subscriber(
    publisher: int, sockets: int, stats: Any, stop: Any, security: Security = ()
) -> None:
    """Count data updates on ``sockets`` SUB sockets until ``stop`` is set.

    ``stats`` is a shared array of ``SLOTS * sockets + 1`` doubles; the last
    one is this process's CPU seconds.  Probes are counted apart, so the
    parent knows when each subscription is live.  ``security``: the CURVE
    options of its sockets (none: plain CHP).
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    subs = []
    poller = zmq.Poller()
    for _ in range(sockets):
        sub = socket(ctx, zmq.SUB, security)
        for prefix in (*DATA_PREFIXES, PROBE):
            sub.setsockopt(zmq.SUBSCRIBE, prefix)
        sub.connect(tcp(publisher + 1))
        poller.register(sub, zmq.POLLIN)
        subs.append(sub)
    slot = {sub: SLOTS * i for i, sub in enumerate(subs)}
    try:
        for _ in range(100_000_000):
            if stop.is_set():
                break
            for sub, _event in poller.poll(100):
                count_batch(sub, stats, slot[sub])
            stats[SLOTS * sockets] = time.process_time()
    finally:
        for sub in subs:
            sub.close(0)
        ctx.term()


def count_batch(sub: zmq.Socket[bytes], stats: Any, base: int) -> None:
    recv, noblock = RECV, NOBLOCK
    data = probes = 0
    for _ in range(DRAIN):
        try:
            key = recv(sub, noblock)
        except zmq.Again:
            break
        recv(sub, 0), recv(sub, 0), recv(sub, 0), recv(sub, 0)  # five frames each
        if key.startswith(PROBE):
            probes += 1
        elif not key.endswith(SUBTREE_HUGZ):
            data += 1
    now = time.perf_counter()
    if data:
        if not stats[base]:
            stats[base + 1] = now
        stats[base] += data
        stats[base + 2] = now
    if probes:
        stats[base + 3] += probes


# -- latency -------------------------------------------------------------------


def latency(
    conn: Connection, port: int, rate: float, duration: float, key_space: int
) -> None:
    """Write at ``rate``/s and read our own updates back, in one process.

    Each body starts with ``perf_counter_ns()`` at send time; the latency of
    an update is the time from then until its KVPUB is read here.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    feeder = Feeder(ctx, [port], port, b"lat", subscribe=DATA_PREFIXES)
    try:
        live = feeder.probe()
        updates = build_updates(int(rate * duration), 0, key_space)
        result = run_latency(feeder.pub, feeder.sub, updates, rate)
        conn.send(dict(result, live=live))
    finally:
        feeder.close()
        ctx.term()


def run_latency(
    pub: zmq.Socket[bytes], sub: zmq.Socket[bytes], updates: list[Frames], rate: float
) -> dict[str, Any]:
    count = len(updates)
    pad = b"L" * (VALUE_SIZE - STAMP.size)
    clock, pack, unpack = time.perf_counter_ns, STAMP.pack, STAMP.unpack_from
    send, recv = frame_sender(pub), frame_receiver(sub)
    latencies: list[int] = []
    sent = 0
    start = clock()
    interval = 1e9 / rate
    deadline = start + int(count * interval) + 3_000_000_000
    for _ in range(100 * count + 10_000):
        now = clock()
        due = min(count, int((now - start) / interval) + 1)
        while sent < due:
            frames = updates[sent]
            frames[4] = pack(clock()) + pad
            send(frames)
            sent += 1
        if sent >= count:
            if len(latencies) >= count or now > deadline:
                break
            wait_ms = 50
        else:
            wait_ms = max(int((start + sent * interval - clock()) / 1e6) + 1, 0)
        if sub.poll(wait_ms, zmq.POLLIN):
            for _ in range(DRAIN):
                try:
                    frames = recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                key = frames[0]
                if not key.startswith(PROBE) and not key.endswith(SUBTREE_HUGZ):
                    latencies.append(clock() - unpack(frames[4])[0])
    elapsed = (clock() - start) / 1e9
    return {
        "sent": sent,
        "received": len(latencies),
        "latencies_ns": latencies,
        "elapsed": elapsed,
    }


# -- snapshot clients ----------------------------------------------------------


def snapshot_clients(
    conn: Connection, port: int, clients: int, subtree: bytes, go: Any, timeout: float
) -> None:
    """``clients`` DEALERs ask for a snapshot at once when ``go`` is set.

    Reports, per client, the KVSYNC count, the data-key count and the time
    its KTHXBAI arrived (None if it did not in ``timeout`` seconds).
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealers = [socket(ctx, zmq.DEALER) for _ in range(clients)]
    poller = zmq.Poller()
    for dealer in dealers:
        dealer.connect(tcp(port))
        poller.register(dealer, zmq.POLLIN)
    index = {dealer: i for i, dealer in enumerate(dealers)}
    kvsync, data = [0] * clients, [0] * clients
    done: list[float | None] = [None] * clients
    try:
        conn.send("ready")
        go.wait(timeout)
        start = time.perf_counter()
        for dealer in dealers:
            dealer.send_multipart([ICANHAZ, subtree])
        remaining = clients
        for _ in range(100_000_000):
            if not remaining or time.perf_counter() - start > timeout:
                break
            for dealer, _event in poller.poll(200):
                i = index[dealer]
                if read_snapshot_batch(dealer, kvsync, data, i):
                    done[i] = time.perf_counter()
                    poller.unregister(dealer)
                    remaining -= 1
        conn.send({"start": start, "kvsync": kvsync, "data": data, "done": done})
    finally:
        for dealer in dealers:
            dealer.close(0)
        ctx.term()


def read_snapshot_batch(
    dealer: zmq.Socket[bytes], kvsync: list[int], data: list[int], i: int
) -> bool:
    """Read what is queued for client ``i``; True once its KTHXBAI came."""
    recv = frame_receiver(dealer)
    for _ in range(DRAIN):
        try:
            frames = recv(zmq.NOBLOCK)
        except zmq.Again:
            return False
        key = frames[0]
        if key == KTHXBAI:
            return True
        kvsync[i] += 1
        if key[:5] in DATA_PREFIXES:
            data[i] += 1
    return False
