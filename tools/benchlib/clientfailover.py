"""Failover as a client sees it: SIGKILL of the active -> a real client following.

A fresh trioclone pair per run.  Two child processes run the real Trio client
(``trioclone.open_client``, both servers given, as an application would):

* the **writer** writes distinct keys at a steady rate with ``set`` (each
  write confirmed or timed out; the client resends until then) and records
  the keys it got confirmed and the keys it saw published (its own watch);
* the **observer** only reads: it records, with ``time.perf_counter()``
  (CLOCK_MONOTONIC: the parent's clock too), every resync (a snapshot taken,
  with the server it came from) and every update.

The parent SIGKILLs the primary (the active) and measures, per run:
``snapshot_s``, kill -> the observer holds the backup's snapshot; and
``update_s``, kill -> the observer's first update from the backup.  After
the failover the writer goes on for a moment, stops and reports; the
observer then must hold every key the writer got confirmed or saw
published: ``missed`` counts those it lacks (must be 0).

Settings: ``default`` (servers' and clients' defaults) and ``fast`` (the
servers with ``--heartbeat 0.2 --hugz 0.2``, the clients with the shorter
timings in ``FAST_CLIENT``).
"""

from __future__ import annotations

import logging
import math
import signal
import statistics
import time
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from typing import Any

import trio

import trioclone
from benchlib.children import Children
from benchlib.servers import Fleet
from benchlib.wire import tcp

#: A client's timings against servers with ``--heartbeat 0.2 --hugz 0.2``:
#: it gives up on a server after three missed HUGZ.
FAST_CLIENT = trioclone.ClientTimings(
    request_timeout=0.5, silence_timeout=0.6, backoff=0.1, max_backoff=0.5
)
PREFIX = "/fo/"
RATE = 200  # writes per second
WRITE_TIMEOUT = 15.0  # s: a confirmed write may wait this long through a failover
MAX_SECONDS = 120.0  # no child runs longer than this
FOLLOW_TIMEOUT = 30.0  # s after the kill for the observer to follow the backup


def timings(fast: bool) -> trioclone.ClientTimings:
    return FAST_CLIENT if fast else trioclone.ClientTimings()


# -- child processes -----------------------------------------------------------


def quiet() -> None:
    """A client's failover warnings are expected here: not on the bench's stderr."""
    logging.getLogger("trioclone").setLevel(logging.ERROR)


def observer(conn: Connection, servers: list[str], fast: bool, backup: str) -> None:
    """Follow the pair; report resyncs and updates; check keys on demand."""
    quiet()
    trio.run(_observe, conn, servers, fast, backup)


async def _observe(
    conn: Connection, servers: list[str], fast: bool, backup: str
) -> None:
    clock = time.perf_counter
    resyncs: list[tuple[float, str]] = []
    updates: list[tuple[float, str | None]] = []  # (time, server in use)
    followed = False
    with trio.fail_after(MAX_SECONDS):
        async with trioclone.open_client(servers, timings=timings(fast)) as client:
            await client.wait_synced()
            watch = client.watch()
            conn.send("synced")

            async def record() -> None:
                nonlocal followed
                async for event in watch:
                    now = clock()
                    if isinstance(event, trioclone.ResyncEvent):
                        resyncs.append((now, event.server))
                    else:
                        updates.append((now, client.server))
                        on_backup = any(s == backup for _, s in resyncs)
                        if on_backup and not followed and client.server == backup:
                            followed = True
                            conn.send("followed")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(record)
                command = await trio.to_thread.run_sync(
                    conn.recv, abandon_on_cancel=True
                )
                missing: set[str] = set()
                if command[0] == "check":
                    expected: set[str] = command[1]
                    deadline = trio.current_time() + command[2]
                    for _ in range(10_000):
                        missing = {k for k in expected if client.get(k) is None}
                        if not missing or trio.current_time() > deadline:
                            break
                        await trio.sleep(0.05)
                conn.send(
                    {
                        "resyncs": resyncs,
                        "updates": updates,
                        "missing": sorted(missing),
                        "keys": len(client.keys(PREFIX)),
                        "server": client.server,
                        "failovers": client.failovers,
                    }
                )
                nursery.cancel_scope.cancel()


def writer(conn: Connection, servers: list[str], fast: bool, rate: float) -> None:
    """Write distinct keys at ``rate``/s from ("start",) until ("stop",)."""
    quiet()
    trio.run(_write, conn, servers, fast, rate)


async def _write(conn: Connection, servers: list[str], fast: bool, rate: float) -> None:
    confirmed: list[str] = []
    published: set[str] = set()
    failed: list[str] = []
    written = 0
    with trio.fail_after(MAX_SECONDS):
        async with trioclone.open_client(servers, timings=timings(fast)) as client:
            await client.wait_synced()
            watch = client.watch(PREFIX)
            conn.send("synced")
            if (await trio.to_thread.run_sync(conn.recv))[0] != "start":
                return
            stop = trio.Event()

            async def listen() -> None:
                async for event in watch:
                    if isinstance(event, trioclone.SetEvent):
                        published.add(event.key)

            async def one(key: str) -> None:
                try:
                    await client.set(
                        key, b"%.9f" % time.perf_counter(), timeout=WRITE_TIMEOUT
                    )
                    confirmed.append(key)
                except trioclone.WriteTimeoutError:
                    failed.append(key)

            async def stopper() -> None:
                await trio.to_thread.run_sync(conn.recv, abandon_on_cancel=True)
                stop.set()

            async with trio.open_nursery() as outer:
                outer.start_soon(listen)
                outer.start_soon(stopper)
                async with trio.open_nursery() as writes:
                    start = trio.current_time()
                    for i in range(int(rate * MAX_SECONDS)):
                        if stop.is_set():
                            break
                        writes.start_soon(one, f"{PREFIX}{i:09d}")
                        written += 1
                        await trio.sleep_until(start + (i + 1) / rate)
                await trio.sleep(0.3)  # the last publications reach the watch
                outer.cancel_scope.cancel()
    conn.send(
        {
            "written": written,
            "confirmed": confirmed,
            "published": sorted(published),
            "failed": len(failed),
        }
    )


# -- the parent ----------------------------------------------------------------


def one_run(
    mp: ForkServerContext,
    fleet: Fleet,
    *,
    fast: bool,
    steady: float,
    after: float,
    tag: str,
) -> dict[str, Any]:
    primary, backup = fleet.start_pair(fast=fast, tag=tag)
    servers = [tcp(primary.port), tcp(backup.port)]
    try:
        with Children(mp) as children:
            watch_conn, child = children.pipe()
            children.start(observer, child, servers, fast, servers[1])
            write_conn, child = children.pipe()
            children.start(writer, child, servers, fast, RATE)
            for conn in (watch_conn, write_conn):
                expect(conn, "synced", 30.0)
            write_conn.send(("start",))
            time.sleep(steady)
            killed = time.perf_counter()
            fleet.kill(primary, signal.SIGKILL)
            followed = watch_conn.poll(FOLLOW_TIMEOUT) and watch_conn.recv()
            time.sleep(after)  # the writer goes on against the new active
            write_conn.send(("stop",))
            written = receive(write_conn, WRITE_TIMEOUT + 10)
            expected = set(written["confirmed"]) | set(written["published"])
            watch_conn.send(("check", expected, 5.0))
            seen = receive(watch_conn, 30.0)
    finally:
        fleet.stop(backup)
    return summarize(seen, written, killed, servers[1], followed == "followed")


def summarize(
    seen: dict[str, Any],
    written: dict[str, Any],
    killed: float,
    backup: str,
    followed: bool,
) -> dict[str, Any]:
    resynced = [t for t, s in seen["resyncs"] if t > killed and s == backup]
    snapshot = min(resynced, default=None)
    first = None
    if snapshot is not None:
        first = min(
            (t for t, s in seen["updates"] if t > snapshot and s == backup),
            default=None,
        )
    before = [t for t, _ in seen["updates"] if t <= killed]
    return {
        "followed": followed,
        "snapshot_s": None if snapshot is None else round(snapshot - killed, 3),
        "update_s": None if first is None else round(first - killed, 3),
        "last_update_before_kill_ms": (
            round((killed - max(before)) * 1e3, 1) if before else None
        ),
        "written": written["written"],
        "confirmed": len(written["confirmed"]),
        "published_seen_by_writer": len(written["published"]),
        "write_timeouts": written["failed"],
        "observer_keys": seen["keys"],
        "missed": len(seen["missing"]),
        "missed_keys": seen["missing"][:10],
        "observer_failovers": seen["failovers"],
    }


def run(
    mp: ForkServerContext, fleet: Fleet, *, runs: int, steady: float = 2.0
) -> dict[str, Any]:
    """``runs`` failovers per setting, default and fast alternating."""
    out: dict[str, Any] = {"runs": runs, "rate": RATE}
    per: dict[str, list[dict[str, Any]]] = {"default": [], "fast": []}
    for i in range(runs):
        for settings in per:
            per[settings].append(
                one_run(
                    mp,
                    fleet,
                    fast=settings == "fast",
                    steady=steady,
                    after=1.0,
                    tag=f"cfo-{settings}-{i}",
                )
            )
    for settings, results in per.items():
        out[settings] = {"runs": results, **medians(results)}
    return out


def medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    def median(name: str) -> float | None:
        # a run where the client never got there counts as never (inf), so
        # a failover that did not happen cannot improve the median
        values = [math.inf if r[name] is None else r[name] for r in results]
        return round(statistics.median(values), 3) if values else None

    return {
        "median_snapshot_s": median("snapshot_s"),
        "median_update_s": median("update_s"),
        "all_followed": all(r["followed"] for r in results),
        "missed_total": sum(r["missed"] for r in results),
    }


def expect(conn: Connection, what: str, timeout: float) -> None:
    got = receive(conn, timeout)
    if got != what:
        raise RuntimeError(f"expected {what!r} from a client process, got {got!r}")


def receive(conn: Connection, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"a client process was silent for {timeout} s")
    return conn.recv()


# -- report --------------------------------------------------------------------


def render(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return []
    lines = [
        "",
        "j. Failover as a client sees it (trioclone.open_client in a child process;",
        f"   a writer client writes {result['rate']}/s, confirmed; SIGKILL of the active)",
        f"{'':10} {'run':>4} {'snapshot':>10} {'1st update':>11} "
        f"{'confirmed':>10} {'timeouts':>9} {'missed':>7}",
    ]
    for settings in ("default", "fast"):
        block = result.get(settings)
        if not block:
            continue
        for i, r in enumerate(block["runs"]):
            lines.append(
                f"{settings if i == 0 else '':10} {i + 1:>4} "
                f"{fmt(r['snapshot_s'])} {fmt(r['update_s'], 11)} "
                f"{r['confirmed']:>10,} {r['write_timeouts']:>9} {r['missed']:>7}"
            )
        lines.append(
            f"{'':10} {'med':>4} {fmt(block['median_snapshot_s'])} "
            f"{fmt(block['median_update_s'], 11)} {'':>10} {'':>9} "
            f"{block['missed_total']:>7}  (target: 0 missed: "
            f"{'PASS' if block['missed_total'] == 0 and block['all_followed'] else 'FAIL'})"
        )
    lines.append(
        "   fast: servers --heartbeat 0.2 --hugz 0.2 (peer expiry 0.4 s); clients "
        f"silence {FAST_CLIENT.silence_timeout} s, request {FAST_CLIENT.request_timeout} s"
    )
    return lines


def fmt(value: float | None, width: int = 10) -> str:
    return f"{'-' if value is None else f'{value:.3f} s':>{width}}"
