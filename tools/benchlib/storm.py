"""A snapshot storm: many clients ask the active for the whole map at once.

A trioclone pair (fast settings: HUGZ every 0.2 s) holds ``keys`` keys
(``snapshots.fill``: keys ``0 .. keys-1``, 100-byte values).  ``clients``
DEALERs over a few processes send ICANHAZ at the same moment and read to
KTHXBAI.  Each client checks its reply's content, not just its length:
the number of data keys, that every value is the one written, and a digest
of the key set (the sum of each key's CRC-32) against the digest of the
keys written, so a duplicate or a wrong key shows.  Meanwhile an observer
(``benchlib.heartbeats``) times the active's HUGZ: how late they come
against the configured interval while the active serves the storm.
Reported: every client exact or not, the time until the first and the last
KTHXBAI, the active's CPU, the client processes' CPU (the harness's
share), and the HUGZ lateness.
"""

from __future__ import annotations

import time
import zlib
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from typing import Any

import zmq

from benchlib import snapshots
from benchlib.children import Children
from benchlib.heartbeats import Observer, Stream, lateness
from benchlib.servers import Fleet
from benchlib.wire import (
    DATA_PREFIXES,
    DIGEST_MASK,
    ICANHAZ,
    KTHXBAI,
    VALUE,
    Context,
    frame_receiver,
    socket,
    tcp,
)

HUGZ_INTERVAL = 0.2  # the pair's --hugz (fast settings)
DRAIN = 1000
# -- child process -------------------------------------------------------------


def clients(conn: Connection, port: int, count: int, go: Any, timeout: float) -> None:
    """``count`` DEALERs ask for the whole map when ``go`` is set; per
    client: data keys, wrong values, key digest, KTHXBAI time (or None)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    dealers = [socket(ctx, zmq.DEALER) for _ in range(count)]
    poller = zmq.Poller()
    for dealer in dealers:
        dealer.connect(tcp(port))
        poller.register(dealer, zmq.POLLIN)
    index = {dealer: i for i, dealer in enumerate(dealers)}
    data, wrong, sums = [0] * count, [0] * count, [0] * count
    done: list[float | None] = [None] * count
    try:
        conn.send("ready")
        go.wait(timeout)
        cpu0, start = time.process_time(), time.perf_counter()
        for dealer in dealers:
            dealer.send_multipart([ICANHAZ, b""])
        remaining = count
        for _ in range(100_000_000):
            if not remaining or time.perf_counter() - start > timeout:
                break
            for dealer, _event in poller.poll(200):
                i = index[dealer]
                if read_batch(dealer, i, data, wrong, sums):
                    done[i] = time.perf_counter()
                    poller.unregister(dealer)
                    remaining -= 1
        conn.send(
            {
                "start": start,
                "data": data,
                "wrong": wrong,
                "sums": [s & DIGEST_MASK for s in sums],
                "done": done,
                "cpu": time.process_time() - cpu0,
            }
        )
    finally:
        for dealer in dealers:
            dealer.close(0)
        ctx.term()


def read_batch(
    dealer: zmq.Socket[bytes],
    i: int,
    data: list[int],
    wrong: list[int],
    sums: list[int],
) -> bool:
    """Read what is queued for client ``i``; True once its KTHXBAI came."""
    recv, crc = frame_receiver(dealer), zlib.crc32
    n = bad = total = 0
    finished = False
    for _ in range(DRAIN):
        try:
            frames = recv(zmq.NOBLOCK)
        except zmq.Again:
            break
        key = frames[0]
        if key == KTHXBAI:
            finished = True
            break
        if key[:5] in DATA_PREFIXES:
            n += 1
            total += crc(key)
            bad += frames[4] != VALUE
    data[i] += n
    wrong[i] += bad
    sums[i] += total
    return finished


# -- the parent ----------------------------------------------------------------


def run(
    mp: ForkServerContext,
    ctx: Context,
    fleet: Fleet,
    *,
    keys: int,
    clients_count: int,
    processes: int,
    timeout: float = 600.0,
) -> dict[str, Any]:
    primary, backup = fleet.start_pair(fast=True, tag="storm")
    try:
        fill = snapshots.fill(ctx, primary, 0, keys)
        expected = snapshots.key_digest(keys)
        with Children(mp) as children:
            observer = Observer(
                children,
                [Stream("active.hugz", tcp(primary.port + 1), True)],
                ["active.hugz"],
            )
            go = mp.Event()
            conns = []
            per = [
                clients_count // processes + (i < clients_count % processes)
                for i in range(processes)
            ]
            for n in per:
                parent, child = children.pipe()
                children.start(clients, child, primary.port, n, go, timeout)
                conns.append(parent)
            for conn in conns:
                if not conn.poll(30) or conn.recv() != "ready":
                    raise RuntimeError("snapshot clients did not start")
            observer.wait_warm()
            time.sleep(1.0)  # every DEALER connected; a few HUGZ before
            cpu0, backup0 = primary.cpu_seconds(), backup.cpu_seconds()
            began = time.perf_counter()
            go.set()
            reports = []
            for conn in conns:
                if not conn.poll(timeout + 30):
                    raise TimeoutError("snapshot clients did not report")
                reports.append(conn.recv())
            ended = time.perf_counter()
            cpu = primary.cpu_seconds() - cpu0
            backup_cpu = backup.cpu_seconds() - backup0
            time.sleep(2 * HUGZ_INTERVAL)
            heard = observer.finish()
        states = (primary.alive, backup.alive)
    finally:
        fleet.stop(primary, backup)
    hugz = [t for t, _ in heard["arrivals"]["active.hugz"]]
    start = min(r["start"] for r in reports)
    done = [t for r in reports for t in r["done"]]
    finished = [t for t in done if t is not None]
    data = [d for r in reports for d in r["data"]]
    wrong = [w for r in reports for w in r["wrong"]]
    sums = [s for r in reports for s in r["sums"]]
    exact = [
        t is not None and d == keys and w == 0 and s == expected
        for t, d, w, s in zip(done, data, wrong, sums, strict=True)
    ]
    seconds = ended - began
    harness_cpu = sum(r["cpu"] for r in reports)
    return {
        "keys": keys,
        "clients": clients_count,
        "processes": processes,
        "fill": fill,
        "exact": sum(exact),
        "all_exact": all(exact),
        "short": sum(d != keys for d in data),
        "wrong_values": sum(wrong),
        "digest_mismatch": sum(s != expected for s in sums),
        "first_s": round(min(finished) - start, 3) if finished else None,
        "last_s": round(max(finished) - start, 3) if finished else None,
        "keys_per_s": round(sum(data) / (max(finished) - start), 0)
        if finished
        else None,
        "active_cpu_s": round(cpu, 2),
        "active_cpu_us_per_key": round(cpu / max(sum(data), 1) * 1e6, 3),
        "active_cpu_share": round(cpu / seconds, 2),
        "backup_cpu_share": round(backup_cpu / seconds, 2),
        "clients_cpu_share": round(harness_cpu / seconds, 2),
        "clients_cpu_us_per_key": round(harness_cpu / max(sum(data), 1) * 1e6, 3),
        "hugz": lateness(hugz, HUGZ_INTERVAL, start, max(finished or [ended])),
        "observer_late_ms": round(
            max((us for _, us in heard["own_late"]), default=0) / 1e3, 1
        ),
        "pair_alive": all(states),
    }


def render(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return []
    hugz = result["hugz"]
    return [
        "",
        f"l. Snapshot storm: {result['clients']} clients ask a fast-settings pair's "
        f"active for all {result['keys']:,} keys at once",
        f"  every client exact (count, values, key digest): "
        f"{result['exact']}/{result['clients']} "
        f"({'PASS' if result['all_exact'] else 'FAIL'}; short {result['short']}, "
        f"wrong values {result['wrong_values']}, digest {result['digest_mismatch']})",
        f"  first / last KTHXBAI: {result['first_s']} s / {result['last_s']} s "
        f"({result['keys_per_s'] or 0:,.0f} keys/s delivered in all)",
        f"  active CPU {result['active_cpu_s']} s ({result['active_cpu_us_per_key']} us "
        f"per key sent, {result['active_cpu_share']:.2f} of a core); client processes "
        f"{result['clients_cpu_share']:.2f} cores ({result['clients_cpu_us_per_key']} "
        "us per key read: the harness)",
        f"  active's HUGZ (every {HUGZ_INTERVAL} s) during the storm: {hugz['gaps']} "
        f"gaps, worst {hugz['worst_ms']} ms late ({hugz.get('worst_pct')}% of the "
        f"interval), p99 {hugz['p99_ms']} ms; the observer's own worst wake-up "
        f"{result['observer_late_ms']} ms",
    ]
