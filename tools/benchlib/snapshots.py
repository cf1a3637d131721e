"""Filling a server, timing snapshots, and the memory a server takes per key.

* ``fill``: KVSETs for keys ``start .. stop-1`` through the collector, in
  chunks; after each chunk, KTHXBAI is polled until the server's sequence
  has caught up, so the collector's backlog (and the heap it leaves behind)
  stays small and the RSS figures are the store's, not the queue's.
* ``snapshot_once``: ICANHAZ -> KTHXBAI on one DEALER, in this process,
  checking that every KVSYNC arrived (``data == expected``).
* ``snapshot_many``: many DEALERs in a few processes ask at once; the time
  until the last one has its KTHXBAI.
"""

from __future__ import annotations

import functools
import time
import zlib
from multiprocessing.context import ForkServerContext
from typing import Any

from benchlib import workers
from benchlib.children import Children
from benchlib.servers import Server
from benchlib.wire import (
    DIGEST_MASK,
    HOT,
    Context,
    Feeder,
    build_updates,
    data_key,
    request_snapshot,
    server_sequence,
    wait_sequence,
)

KEY_AND_VALUE = 16 + 100
MIN_CHUNK = 2_000


def hot_keys(n: int) -> int:
    """How many of keys 0 .. n-1 are under ``/hot/`` (every 100th)."""
    return (n + 99) // 100


def fill(
    ctx: Context, server: Server, start: int, stop: int, timeout: float = 600.0
) -> dict[str, Any]:
    """Store keys ``start .. stop-1``; wait until the server has applied them."""
    feeder = Feeder(ctx, [server.port], server.port, b"fill")
    try:
        if not feeder.probe():
            raise RuntimeError(f"{server.name}: fill probe never came back")
        base = server_sequence(ctx, server.port, 5.0)
        if base is None:
            raise RuntimeError(f"{server.name}: no KTHXBAI before the fill")
        began = time.perf_counter()
        deadline = time.monotonic() + timeout
        done = start
        for _ in range(stop - start):
            if done >= stop:
                break
            chunk = min(max(MIN_CHUNK, done // 50), stop - done)
            for frames in build_updates(chunk, done, stop):
                feeder.send(frames)
            done += chunk
            left = deadline - time.monotonic()
            wait_sequence(ctx, server.port, base + done - start, left, every=0.05)
        seconds = time.perf_counter() - began
    finally:
        feeder.close()
    return {"keys": stop, "seconds": seconds, "rate": (stop - start) / seconds}


@functools.cache
def key_digest(keys: int) -> int:
    """The sum of the CRC-32s of data keys ``0 .. keys-1`` (``fill``'s)."""
    return sum(zlib.crc32(data_key(i)) for i in range(keys)) & DIGEST_MASK


def snapshot_once(
    ctx: Context,
    server: Server,
    subtree: bytes,
    expected: int,
    *,
    timeout: float = 120.0,
    pause_every: int = 0,
    pause: float = 0.0,
) -> dict[str, Any]:
    reply = request_snapshot(
        ctx, server.port, subtree, timeout=timeout, pause_every=pause_every, pause=pause
    )
    if reply is None:
        return {"complete": False, "expected": expected, "seconds": None}
    # a full snapshot must hold exactly keys 0 .. expected-1 (a count alone
    # would pass one key twice and another missing)
    exact = reply.data == expected and (
        subtree != b"" or reply.digest == key_digest(expected)
    )
    return {
        "complete": exact,
        "expected": expected,
        "received": reply.data,
        "kvsync": reply.kvsync,
        "seconds": reply.seconds,
        "us_per_key": reply.seconds / max(reply.kvsync, 1) * 1e6,
    }


def snapshot_many(
    mp: ForkServerContext,
    server: Server,
    *,
    clients: int,
    processes: int,
    subtree: bytes,
    expected: int,
    timeout: float = 300.0,
) -> dict[str, Any]:
    """``clients`` clients (over ``processes`` processes) ask at the same moment."""
    with Children(mp) as children:
        go = mp.Event()
        conns = []
        per = [
            clients // processes + (i < clients % processes) for i in range(processes)
        ]
        for n in per:
            parent, child = children.pipe()
            children.start(
                workers.snapshot_clients, child, server.port, n, subtree, go, timeout
            )
            conns.append(parent)
        for conn in conns:
            if not conn.poll(30) or conn.recv() != "ready":
                raise RuntimeError("snapshot clients did not start")
        time.sleep(0.2)  # let every DEALER connect
        go.set()
        reports = []
        for conn in conns:
            if not conn.poll(timeout + 30):
                raise TimeoutError("snapshot clients did not report")
            reports.append(conn.recv())
    start = min(r["start"] for r in reports)
    done = [t for r in reports for t in r["done"]]
    data = [d for r in reports for d in r["data"]]
    finished = [t for t in done if t is not None]
    return {
        "clients": clients,
        "complete": len(finished) == clients and all(d == expected for d in data),
        "finished": len(finished),
        "short": sum(d != expected for d in data),
        "seconds": (max(finished) - start) if finished else None,
        "first_seconds": (min(finished) - start) if finished else None,
    }


def snapshot_suite(
    mp: ForkServerContext,
    ctx: Context,
    servers: dict[str, Server],
    keys: int,
    *,
    fifty: bytes | None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Per server: full snapshot and 1% subtree, ``repeats`` times with the
    servers taking turns (the median reported), then optionally 50 clients at once
    asking for subtree ``fifty``.  Also the trioclone / ceiling time of each
    back-to-back pair of full snapshots."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        kind: {"full": [], "subtree": []} for kind in servers
    }
    for turn in range(max(repeats, 1)):
        order = list(servers.items())
        for kind, server in order if turn % 2 == 0 else order[::-1]:
            runs[kind]["full"].append(snapshot_once(ctx, server, b"", keys))
            runs[kind]["subtree"].append(
                snapshot_once(ctx, server, HOT, hot_keys(keys))
            )
    result: dict[str, Any] = {
        kind: {
            "keys": keys,
            "full": median_of(r["full"]),
            "subtree": median_of(r["subtree"]),
        }
        for kind, r in runs.items()
    }
    if "ceiling" in runs and "trioclone" in runs:
        result["paired_full_ratios"] = [
            t["seconds"] / c["seconds"]
            for c, t in zip(
                runs["ceiling"]["full"], runs["trioclone"]["full"], strict=True
            )
            if c["seconds"] and t["seconds"]
        ]
    if fifty is not None:
        for kind, server in servers.items():
            result[kind]["fifty"] = dict(
                snapshot_many(
                    mp,
                    server,
                    clients=50,
                    processes=2,
                    subtree=fifty,
                    expected=keys if fifty == b"" else hot_keys(keys),
                ),
                subtree=fifty.decode(),
            )
    return result


def best_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest run, if every run was complete; else the first incomplete."""
    for result in runs:
        if not result["complete"]:
            return result
    best = min(runs, key=lambda r: r["seconds"])
    return dict(best, runs=[r["seconds"] for r in runs])


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median-time run, if every run was complete (every run's time kept
    in ``runs``); else the first incomplete."""
    for result in runs:
        if not result["complete"]:
            return result
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return dict(ordered[(len(ordered) - 1) // 2], runs=[r["seconds"] for r in runs])


def memory(server: Server, empty: int, keys: int) -> dict[str, Any]:
    """RSS now, and bytes per key beyond its 16-byte key and 100-byte value."""
    time.sleep(0.5)  # let the last batch's buffers go
    rss = server.rss_bytes()
    return {
        "keys": keys,
        "rss": rss,
        "empty": empty,
        "bytes_per_key": (rss - empty) / keys - KEY_AND_VALUE,
    }
