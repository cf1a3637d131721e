"""How late a pair's heartbeats arrive: an observer process and the arithmetic.

``observer`` is the body of a child process with one SUB socket per stream:
a server's publisher (P+1) subscribed to ``HUGZ`` only, or a server's Binary
Star state PUB (one frame, an ASCII digit).  It records the arrival time
(``time.perf_counter()``: CLOCK_MONOTONIC, the same clock in every process)
and value of every message: the HUGZ sequence, or the state number.  It also
records how late its own poll timeouts return (its own scheduling delay), so
a reader can tell the observer's stalls from the server's.

``lateness`` turns arrivals into gaps and lateness (gap - interval) inside a
window of the run.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import zmq

from benchlib.wire import HUGZ, socket, tcp

POLL_MS = 10  # the observer's poll timeout; a late return is its own delay
SELF_LATE = 0.0005  # own wake-ups later than this are recorded (s)
DRAIN = 100  # messages taken off one socket per poll
TARGET = 0.10  # never more than this share of the interval late
SEQUENCE = struct.Struct("!q")

Arrivals = list[tuple[float, int]]


@dataclass(frozen=True)
class Stream:
    name: str  # e.g. "primary.hugz", "backup.state"
    endpoint: str
    hugz: bool  # True: a publisher (subscribe HUGZ); False: a state PUB


def pair_streams(primary: Any, backup: Any) -> list[Stream]:
    """The four streams of a pair (``benchlib.servers.Server`` objects)."""
    streams = []
    for role, server in (("primary", primary), ("backup", backup)):
        streams.append(Stream(f"{role}.hugz", tcp(server.port + 1), True))
        streams.append(Stream(f"{role}.state", tcp(server.state_port), False))
    return streams


def observer(
    conn: Connection,
    streams: Sequence[Stream],
    warm: Sequence[str],
    stop: Any,
    max_seconds: float,
) -> None:
    """Record arrivals until ("stop",) comes on ``conn``; then send them.

    Sends "warm" once every stream named in ``warm`` has had two arrivals.
    """
    with contextlib.suppress(OSError):  # a higher priority if we may: less noise
        os.nice(-10)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    poller = zmq.Poller()
    names: dict[zmq.Socket[bytes], Stream] = {}
    for stream in streams:
        sub = socket(ctx, zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, HUGZ if stream.hugz else b"")
        sub.connect(stream.endpoint)
        poller.register(sub, zmq.POLLIN)
        names[sub] = stream
    arrivals: dict[str, Arrivals] = {s.name: [] for s in streams}
    own: Arrivals = []  # (time, microseconds late) of our own late wake-ups
    try:
        record(conn, poller, names, arrivals, own, warm, stop, max_seconds)
        conn.send(
            {
                "arrivals": arrivals,
                "own_late": own,
                "nice": os.getpriority(os.PRIO_PROCESS, 0),
            }
        )
    finally:
        for sub in names:
            sub.close(0)
        ctx.term()


def record(
    conn: Connection,
    poller: zmq.Poller,
    names: dict[zmq.Socket[bytes], Stream],
    arrivals: dict[str, Arrivals],
    own: Arrivals,
    warm: Sequence[str],
    stop: Any,
    max_seconds: float,
) -> None:
    clock = time.perf_counter
    end = clock() + max_seconds
    warmed = False
    for _ in range(int(max_seconds * 1000 / POLL_MS) * 10 + 100):
        before = clock()
        events = poller.poll(POLL_MS)
        now = clock()
        if not events and now - before - POLL_MS / 1000 > SELF_LATE:
            own.append((now, round((now - before - POLL_MS / 1000) * 1e6)))
        for sub, _event in events:
            stream = names[sub]
            for _ in range(DRAIN):
                try:
                    frames = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                arrivals[stream.name].append((now, decode(stream, frames)))
        if not warmed and all(len(arrivals[name]) >= 2 for name in warm):
            conn.send("warm")
            warmed = True
        if now > end or stop.is_set() or conn.poll():
            return


def decode(stream: Stream, frames: list[bytes]) -> int:
    """The HUGZ sequence or the state number; -1 if malformed."""
    try:
        if stream.hugz:
            return int(SEQUENCE.unpack(frames[1])[0])
        return int(frames[0])
    except (IndexError, ValueError, struct.error):
        return -1


class Observer:
    """The parent's end of an ``observer`` process."""

    def __init__(self, children: Any, streams: Sequence[Stream], warm: Sequence[str]):
        self.conn, child = children.pipe()
        children.start(
            observer, child, list(streams), list(warm), children.stop_event, 3600.0
        )

    def wait_warm(self, timeout: float = 20.0) -> None:
        if not self.conn.poll(timeout) or self.conn.recv() != "warm":
            raise RuntimeError(f"the observer heard no heartbeats in {timeout} s")

    def finish(self, timeout: float = 30.0) -> dict[str, Any]:
        self.conn.send(("stop",))
        if not self.conn.poll(timeout):
            raise TimeoutError("the observer did not report")
        result: dict[str, Any] = self.conn.recv()
        return result


# -- arithmetic ----------------------------------------------------------------


def lateness(
    times: Sequence[float],
    interval: float,
    start: float,
    end: float,
    *,
    alive_at_end: bool = True,
) -> dict[str, Any]:
    """Gaps between consecutive arrivals that end inside ``[start, end]``.

    Lateness = gap - interval.  If the stream is expected to be alive at
    ``end`` and its last arrival is more than an interval before, that open
    gap counts too (a lower bound: the next beat is later still).
    """
    gaps = [b - a for a, b in itertools.pairwise(times) if start < b <= end]
    before = [t for t in times if t <= end]
    open_gap = None
    if alive_at_end and before and end - before[-1] > interval:
        open_gap = end - before[-1]
        gaps.append(open_gap)
    if not gaps:
        return {"gaps": 0, "pass": False, "worst_ms": None, "p99_ms": None}
    late = sorted(g - interval for g in gaps)
    worst, p99 = late[-1], late[max(math.ceil(0.99 * len(late)) - 1, 0)]
    return {
        "gaps": len(gaps),
        "interval": interval,
        "worst_ms": round(worst * 1e3, 1),
        "p99_ms": round(p99 * 1e3, 1),
        "worst_pct": round(worst / interval * 100, 1),
        "p99_pct": round(p99 / interval * 100, 1),
        "max_gap_s": round(max(gaps), 3),
        "open_gap_s": None if open_gap is None else round(open_gap, 3),
        "pass": worst <= TARGET * interval,
    }


def states(arrivals: Arrivals, start: float, end: float) -> dict[str, Any]:
    """The Binary Star state seen before ``start`` and at ``end``, and changes."""
    before = [v for t, v in arrivals if t <= start]
    inside = [(t, v) for t, v in arrivals if start < t <= end]
    changes = []
    last = before[-1] if before else None
    for t, value in inside:
        if value != last:
            changes.append({"at_s": round(t - start, 3), "from": last, "to": value})
            last = value
    return {
        "before": before[-1] if before else None,
        "after": last,
        "last_heard_s": round(end - inside[-1][0], 3) if inside else None,
        "changes": changes,
    }


def own_lateness(own: Arrivals, start: float, end: float) -> float:
    """The observer's worst own wake-up delay inside the window (ms)."""
    inside = [us for t, us in own if start < t <= end]
    return round(max(inside, default=0) / 1e3, 1)
