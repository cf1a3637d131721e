"""Many subscribers: every socket counted, latency from a stamp in each body.

The harness behind sections k (1,000 subscribers on one server, rates
stepped up) and m (the same subscribers on one server against spread over
relays).  Subscriber processes each hold many SUB sockets (the fast frame
path, ``frame by frame``, as ``benchlib.workers.subscriber``), each socket
connected to one of the publishers given; a paced writer process stamps
``perf_counter_ns()`` (CLOCK_MONOTONIC, one clock for every process here)
into each body at send time, and every receiving socket files the update's
latency in its process's histogram (10 us buckets).

Per step (one offered rate for some seconds) the result says whether every
socket got every update, the latency percentiles over all deliveries, the
CPU of the servers (and relays) and of the subscriber processes: each
process's share of a core, and their sum.  A subscriber process busy more
than ``BUSY`` of a core, or all of them together using more than half the
machine, is the harness's limit, not the server's: ``harness_saturated``.
A step is ``measurable`` if every socket got every update and the p99
stayed under a second; the stepping stops at the first that is not.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from typing import Any

import zmq

from benchlib.children import Children
from benchlib.servers import CLOCK_TICKS, process_cpu_seconds
from benchlib.wire import (
    DATA_PREFIXES,
    PROBE,
    SUBTREE_HUGZ,
    VALUE_SIZE,
    ZERO_SEQUENCE,
    Context,
    Feeder,
    data_key,
    frame_sender,
    kvset,
    socket,
    tcp,
)

STAMP = struct.Struct("!q")
PAD = b"s" * (VALUE_SIZE - STAMP.size)
BUCKET_NS = 10_000  # latency histogram resolution: 10 us
BUCKETS = 200_000  # up to 2 s; later ones land in the last bucket
DRAIN = 1000  # messages taken off one socket per poll
BUSY = 0.9  # a subscriber process busier than this share of a core: saturated
CORES = os.cpu_count() or 1
HARNESS = (
    0.5  # subscriber processes using more of the machine: the harness is the limit
)
MEASURABLE_P99_MS = 1000.0  # a step past this p99 (or short) ends the stepping
MIN_SLEEP = 0.0005
KEY_SPACE = 10_000
MAX_COMMANDS = 100_000
EVENTS, POLLIN = zmq.EVENTS, zmq.POLLIN


# -- child processes -----------------------------------------------------------


def subscriber(conn: Connection, ports: Sequence[int], stats: Any) -> None:
    """SUB sockets on ``ports`` (publishers at port + 1); obey the parent:

    ``("reset",)``: counts and histogram to zero (answers "reset");
    ``("report",)``: per-socket counts, histogram, CPU and wall since reset;
    ``("stop",)``.  ``stats`` (shared doubles): deliveries since reset, this
    process's CPU seconds, sockets that have seen a probe.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    poller = zmq.Poller()
    subs = []
    for port in ports:
        sub = socket(ctx, zmq.SUB)
        for prefix in (*DATA_PREFIXES, PROBE):
            sub.setsockopt(zmq.SUBSCRIBE, prefix)
        sub.connect(tcp(port + 1))
        poller.register(sub, zmq.POLLIN)
        subs.append(sub)
    index = {sub: i for i, sub in enumerate(subs)}
    counts = [0] * len(subs)
    probed = [False] * len(subs)
    hist = [0] * (BUCKETS + 1)
    total = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    main0 = time.thread_time()
    clock, unpack = time.perf_counter_ns, STAMP.unpack_from
    try:
        for _ in range(MAX_COMMANDS * 100):
            if conn.poll():
                command = conn.recv()[0]
                if command == "reset":
                    counts = [0] * len(subs)
                    hist = [0] * (BUCKETS + 1)
                    total = 0
                    stats[0] = 0
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    main0 = time.thread_time()
                    conn.send("reset")
                elif command == "report":
                    conn.send(
                        {
                            "counts": counts,
                            "hist": {b: n for b, n in enumerate(hist) if n},
                            "cpu": time.process_time() - cpu0,
                            "main_cpu": time.thread_time() - main0,
                            "wall": time.perf_counter() - wall0,
                        }
                    )
                else:
                    break
            for sub, _event in poller.poll(50):
                i = index[sub]
                recv, ready = sub.recv, sub.get
                got = 0
                for _ in range(DRAIN):  # no zmq.Again raised: it costs more
                    if not ready(EVENTS) & POLLIN:
                        break
                    key = recv()
                    recv(), recv(), recv()
                    body = recv()  # every KVPUB has five frames
                    if key.startswith(PROBE):
                        probed[i] = True
                    elif len(body) >= 8 and not key.endswith(SUBTREE_HUGZ):
                        late = (clock() - unpack(body)[0]) // BUCKET_NS
                        hist[late if late < BUCKETS else BUCKETS] += 1
                        got += 1
                counts[i] += got
                total += got
            stats[0] = total
            stats[1] = time.process_time()
            stats[2] = sum(probed)
    finally:
        for sub in subs:
            sub.close(0)
        ctx.term()


def writer(conn: Connection, collectors: Sequence[int]) -> None:
    """A paced writer: ``("pace", rate, seconds, first)`` sends stamped
    KVSETs (keys ``first ...``) to every collector; answers a send report."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = socket(ctx, zmq.PUB, SNDHWM=0)
    for port in collectors:
        pub.connect(tcp(port + 2))
    send = frame_sender(pub)
    try:
        conn.send("ready")
        for _ in range(MAX_COMMANDS):
            command, *params = conn.recv()
            if command != "pace":
                break
            rate, seconds, first = params
            conn.send(pace(send, rate, seconds, first))
    finally:
        pub.close(0)
        ctx.term()


def pace(send: Any, rate: float, seconds: float, first: int) -> dict[str, float]:
    count = int(rate * seconds)
    uuids = os.urandom(16 * count)
    keys = [data_key((first + j) % KEY_SPACE) for j in range(count)]
    clock = time.perf_counter_ns
    cpu0, start = time.process_time(), time.perf_counter()
    sent = 0
    for _ in range(count + int(4 * seconds / MIN_SLEEP) + 10):
        due = min(count, int((time.perf_counter() - start) * rate) + 1)
        while sent < due:
            send(
                [
                    keys[sent],
                    ZERO_SEQUENCE,
                    uuids[16 * sent : 16 * sent + 16],
                    b"",
                    STAMP.pack(clock()) + PAD,
                ]
            )
            sent += 1
        if sent >= count:
            break
        time.sleep(max(start + sent / rate - time.perf_counter(), MIN_SLEEP))
    end = time.perf_counter()
    return {
        "sent": sent,
        "start": start,
        "end": end,
        "cpu": time.process_time() - cpu0,
    }


# -- the parent ----------------------------------------------------------------


def host_jiffies() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (``/proc/stat``):
    every process, ours and whatever else shares the machine."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


def host_busy(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The machine's busy share (all cores) between two ``host_jiffies``."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 2) if total else None


def main_thread_cpu(pid: int) -> float:
    """CPU seconds of ``pid``'s main thread (a Python server's interpreter;
    the rest of its CPU is libzmq's I/O thread)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Target:
    """Where the subscribers listen and the writer writes, and whose CPU counts."""

    name: str
    publishers: list[int]  # base ports; subscribers are spread over them
    collectors: list[int]  # base ports the writer sends to
    watched: dict[str, int] = field(default_factory=dict)  # name: PID (CPU)


def follow(
    mp: ForkServerContext,
    ctx: Context,
    target: Target,
    *,
    sockets: int,
    processes: int,
    rates: Sequence[int],
    seconds: float,
    keep_going: bool = False,
) -> dict[str, Any]:
    """``sockets`` subscribers over ``processes`` processes follow a writer
    at each of ``rates`` in turn, until a step that is not every update to
    every socket (unless ``keep_going``)."""
    per = [sockets // processes + (i < sockets % processes) for i in range(processes)]
    steps: list[dict[str, Any]] = []
    began = time.perf_counter()
    with Children(mp) as children:
        subs: list[tuple[Connection, Any]] = []
        n = 0
        for count in per:
            ports = [
                target.publishers[(n + j) % len(target.publishers)]
                for j in range(count)
            ]
            n += count
            stats = mp.RawArray("d", 3)
            conn, child = children.pipe()
            children.start(subscriber, child, ports, stats)
            subs.append((conn, stats))
        wconn, child = children.pipe()
        children.start(writer, child, target.collectors)
        if not wconn.poll(30) or wconn.recv() != "ready":
            raise RuntimeError("the stamped writer did not start")
        connected = wait_live(ctx, target, subs, sockets)
        first = 0
        for rate in rates:
            step = run_step(target, subs, wconn, sockets, rate, seconds, first)
            first += int(rate * seconds)
            steps.append(step)
            if not step["measurable"] and not keep_going:
                break
    return {
        "target": target.name,
        "sockets": sockets,
        "processes": processes,
        "publishers": len(target.publishers),
        "connect_s": round(connected, 2),
        "seconds": seconds,
        "steps": steps,
        "highest_measurable": max(
            (s["rate"] for s in steps if s["measurable"]), default=None
        ),
        "elapsed": round(time.perf_counter() - began, 1),
    }


def wait_live(
    ctx: Context,
    target: Target,
    subs: list[tuple[Connection, Any]],
    sockets: int,
    timeout: float = 60.0,
) -> float:
    """Probe through the collectors until every socket has seen one."""
    began = time.monotonic()
    feeder = Feeder(ctx, target.collectors, target.collectors[0], b"fanout")
    try:
        for _ in range(int(timeout / 0.05) + 2):
            if sum(int(stats[2]) for _, stats in subs) >= sockets:
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                break
            feeder.send(kvset(feeder.probe_key, b"probe"))
            time.sleep(0.05)
    finally:
        feeder.close()
    live = sum(int(stats[2]) for _, stats in subs)
    raise RuntimeError(f"{target.name}: {live} of {sockets} sockets never saw a probe")


def run_step(
    target: Target,
    subs: list[tuple[Connection, Any]],
    wconn: Connection,
    sockets: int,
    rate: int,
    seconds: float,
    first: int,
) -> dict[str, Any]:
    for conn, _ in subs:
        conn.send(("reset",))
    for conn, _ in subs:
        if not conn.poll(30) or conn.recv() != "reset":
            raise RuntimeError("a subscriber process did not reset")
    watched0 = {name: process_cpu_seconds(pid) for name, pid in target.watched.items()}
    main0 = {name: main_thread_cpu(pid) for name, pid in target.watched.items()}
    host0 = host_jiffies()
    began = time.perf_counter()
    wconn.send(("pace", rate, seconds, first))
    if not wconn.poll(seconds * 3 + 30):
        raise TimeoutError("the stamped writer did not report")
    sent = wconn.recv()
    expected = int(sent["sent"]) * sockets
    drained = drain(subs, expected, idle=1.0, timeout=seconds * 2 + 10)
    watched = {
        name: process_cpu_seconds(pid) - watched0[name]
        for name, pid in target.watched.items()
    }
    main = {
        name: main_thread_cpu(pid) - main0[name] for name, pid in target.watched.items()
    }
    host = host_busy(host0, host_jiffies())
    span = time.perf_counter() - began  # the step: sending and draining
    reports = []
    for conn, _ in subs:
        conn.send(("report",))
    for conn, _ in subs:
        if not conn.poll(30):
            raise TimeoutError("a subscriber process did not report")
        reports.append(conn.recv())
    wall = sent["end"] - sent["start"]
    counts = [c for r in reports for c in r["counts"]]
    hist: dict[int, int] = {}
    for r in reports:
        for bucket, n in r["hist"].items():
            hist[bucket] = hist.get(bucket, 0) + n
    shares = [r["cpu"] / r["wall"] for r in reports]
    every = min(counts) == sent["sent"] and max(counts) == sent["sent"]
    late = quantiles(hist)
    sub_cpu = sum(r["cpu"] for r in reports)
    busiest = max(shares)
    return {
        "rate": rate,
        "sent": sent["sent"],
        "achieved": round(sent["sent"] / wall, 1),
        "every_update": every,
        "sockets_short": sum(c < sent["sent"] for c in counts),
        "delivered": sum(counts),
        "expected": expected,
        "delivered_share": round(sum(counts) / expected, 4) if expected else None,
        "deliveries_per_s": round(sum(counts) / (wall + drained), 0),
        "drain_s": round(drained, 2),
        **late,
        "measurable": every and (late["p99_ms"] or 0) < MEASURABLE_P99_MS,
        "subscriber_cpu_share_max": round(busiest, 2),
        "subscriber_cpu_share_sum": round(sum(shares), 2),
        "subscriber_cpu_us_per_delivery": (
            round(sub_cpu / sum(counts) * 1e6, 2) if sum(counts) else None
        ),
        "harness_saturated": busiest > BUSY or sum(shares) > HARNESS * CORES,
        "machine_share": round(
            (sum(shares) + sum(watched.values()) / span + sent["cpu"] / wall) / CORES,
            2,
        ),
        "cpu_share": {name: round(cpu / span, 3) for name, cpu in watched.items()},
        "main_thread_share": {name: round(cpu / span, 3) for name, cpu in main.items()},
        "host_busy": host,
        "subscriber_main_thread_share": round(
            sum(r["main_cpu"] for r in reports) / sum(r["cpu"] for r in reports), 2
        )
        if sum(r["cpu"] for r in reports)
        else None,
        "cpu_us_per_update": {
            name: round(cpu / max(sent["sent"], 1) * 1e6, 1)
            for name, cpu in watched.items()
        },
        "writer_cpu_share": round(sent["cpu"] / wall, 3),
    }


def drain(
    subs: list[tuple[Connection, Any]], expected: int, idle: float, timeout: float
) -> float:
    """Wait until every delivery is counted, or none came for ``idle`` s,
    or ``timeout``; the seconds it waited."""
    began = time.perf_counter()
    last_total, last_change = -1, began
    for _ in range(int(timeout / 0.02) + 2):
        total = sum(int(stats[0]) for _, stats in subs)
        now = time.perf_counter()
        if total >= expected:
            break
        if total != last_total:
            last_total, last_change = total, now
        elif now - last_change > idle or now - began > timeout:
            break
        time.sleep(0.02)
    return time.perf_counter() - began


def quantiles(hist: dict[int, int]) -> dict[str, float | None]:
    total = sum(hist.values())
    if not total:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    marks = {"p50_ms": 0.50, "p99_ms": 0.99, "p999_ms": 0.999}
    out: dict[str, float | None] = {}
    seen = 0
    pending = sorted(marks.items(), key=lambda kv: kv[1])
    for bucket in sorted(hist):
        seen += hist[bucket]
        while pending and seen >= pending[0][1] * total:
            out[pending.pop(0)[0]] = round((bucket + 1) * BUCKET_NS / 1e6, 2)
    out["max_ms"] = round((max(hist) + 1) * BUCKET_NS / 1e6, 2)
    if max(hist) >= BUCKETS:
        out["max_ms"] = None  # past the histogram: more than 2 s
    return out
