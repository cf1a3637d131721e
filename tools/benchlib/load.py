"""Update load against one server: flood throughput, loss-free rate, latency.

* ``flood``: writer processes send pre-built KVSETs as fast as they can to
  the collector; subscriber processes count what the server publishes.
  Wall rate is measured from the writers' start to the last arrival; server
  CPU from /proc before and after.  Nothing is dropped between writers and
  server (the writers' queues are unbounded, SNDHWM 0, and TCP pushes
  back), so when the writers outpace the server the backlog waits in the
  queues and the server, not the generator, sets the pace; when they do not
  (writers' send rate close to the received rate), the result says the
  generator was saturated.
* ``ladder``: paced writers at rising offered rates with one subscriber.
  A step passes when every update arrived and the last one arrived within
  ``LAG_LIMIT`` of the end of sending: a server that falls behind builds a
  backlog rather than losing updates, so lag is the honest loss signal here.
  A failed step is run once more (a busy machine stalls processes now and
  then); the second run decides.
* ``latency``: one process writes at a fixed rate with a send timestamp in
  each body and reads its own updates back.

``flood`` and ``ladder`` also load a pair: given its ``backup``, the
writers send each update to both collectors (as the Guide's Model Six
clients do) and the subscriber listens to ``server``, the active.  Every
socket uses the CURVE options of ``server.security`` (none: plain CHP).
"""

from __future__ import annotations

import os
import time
from multiprocessing.context import ForkServerContext
from typing import Any

from benchlib import workers
from benchlib.children import Children, Subscriber, Writer
from benchlib.servers import Server
from benchlib.wire import Context, Feeder, kvset

LAG_LIMIT = 0.25  # s: the last update of a step may arrive this late ...
LAG_SHARE = 0.1  # ... or this share of the step's duration, if longer
GENERATOR_SLACK = 0.97  # a paced step below this share of its rate: generator limit
SERVER_BOUND = 1.2  # writers this much faster than the server: server-bound
SUBSCRIBER_BUSY = 0.9  # a subscriber process this busy (CPU / wall) is the bound
MACHINE_BUSY = 0.9  # server and harness together this busy (share of all CPUs)


def wait_live(
    ctx: Context, server: Server, subs: list[Subscriber], timeout: float = 10.0
) -> None:
    """Probe until every subscriber socket has seen a probe."""
    feeder = Feeder(
        ctx, [server.port], server.port, b"parent", security=server.security
    )
    try:
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.02) + 2):
            if all(sub.live() for sub in subs):
                return
            if time.monotonic() > deadline:
                break
            feeder.send(kvset(feeder.probe_key, b"probe"))
            time.sleep(0.02)
    finally:
        feeder.close()
    raise RuntimeError("subscribers never saw a probe")


def wait_counts(
    subs: list[Subscriber], target: int, idle: float, timeout: float
) -> bool:
    """Until every socket counted ``target``, no progress for ``idle`` s, or timeout."""
    deadline = time.monotonic() + timeout
    last_total, last_change = -1, time.monotonic()
    for _ in range(int(timeout / 0.02) + 2):
        counts = [c for sub in subs for c in sub.counts()]
        if min(counts) >= target:
            return True
        now = time.monotonic()
        if sum(counts) != last_total:
            last_total, last_change = sum(counts), now
        elif now - last_change > idle or now > deadline:
            return False
        time.sleep(0.02)
    return False


def settled_cpu(server: Server, quiet: float = 0.3, timeout: float = 10.0) -> float:
    """The server's CPU seconds once it has stopped working (a backup may
    still be applying the tail of a flood): no more than a tick over
    ``quiet`` seconds, or ``timeout``."""
    deadline = time.monotonic() + timeout
    cpu = server.cpu_seconds()
    for _ in range(int(timeout / quiet) + 2):
        time.sleep(quiet)
        now = server.cpu_seconds()
        if now - cpu <= 0.01 or time.monotonic() > deadline:
            return now
        cpu = now
    return server.cpu_seconds()


def collect(writers: list[Writer], timeout: float) -> list[dict[str, float]]:
    return [writer.receive(timeout) for writer in writers]


def flood(
    mp: ForkServerContext,
    ctx: Context,
    server: Server,
    *,
    subscribers: int,
    sockets: int = 1,
    writers: int = 3,
    count: int,
    key_space: int,
    backup: Server | None = None,
) -> dict[str, Any]:
    """Writers send ``count`` updates at full speed; subscribers count them.

    With a ``backup``, its CPU per update is reported too (``backup_cpu_us``).
    ``main_cpu_us``: the part of ``cpu_us`` in the server's main thread (the
    rest is libzmq's I/O threads); ``load_cpu_us``: the CPU per update of
    the writer and subscriber processes, all threads (on this machine too).
    """
    collectors = [server.port] + ([backup.port] if backup else [])
    with Children(mp) as children:
        subs = children.subscribers(
            subscribers, server.port, sockets, security=server.security
        )
        senders = children.writers(
            writers, collectors, server.port, security=server.security
        )
        wait_live(ctx, server, subs)
        for i, writer in enumerate(senders):
            share = count // writers + (i < count % writers)
            writer.call("build", share, i, key_space, writers)
        total = count
        sub_cpu0 = [sub.cpu() for sub in subs]
        load_cpu0 = children.cpu_seconds()
        cpu0 = server.cpu_seconds()
        main0 = server.main_thread_cpu_seconds()
        backup_cpu0 = backup.cpu_seconds() if backup else 0.0
        backup_main0 = backup.main_thread_cpu_seconds() if backup else 0.0
        for writer in senders:
            writer.send("flood")
        sent = collect(senders, 120.0)
        complete = wait_counts(subs, total, idle=2.0, timeout=30 + total / 2000)
        cpu = server.cpu_seconds() - cpu0
        main = server.main_thread_cpu_seconds() - main0
        load_cpu = children.cpu_seconds() - load_cpu0
        backup_cpu = settled_cpu(backup) - backup_cpu0 if backup else None
        backup_main = backup.main_thread_cpu_seconds() - backup_main0 if backup else 0
        counts = [c for sub in subs for c in sub.counts()]
        last = max(t for sub in subs for t in sub.lasts())
        sub_cpu = [sub.cpu() - c0 for sub, c0 in zip(subs, sub_cpu0, strict=True)]
    start = min(s["start"] for s in sent)
    writers_end = max(s["end"] for s in sent)
    wall = last - start
    rate = sum(counts) / len(counts) / wall
    writer_rate = total / (writers_end - start)
    writer_busy = sum(s["cpu"] for s in sent) / sum(s["end"] - s["start"] for s in sent)
    sub_busy = max(sub_cpu) / wall
    losses = [total - c for c in counts]
    result = {
        "subscribers": subscribers * sockets,
        "updates": total,
        "rate": rate,
        "cpu_us": cpu / total * 1e6,
        "main_cpu_us": main / total * 1e6,
        "load_cpu_us": load_cpu / total * 1e6,
        "lost_total": sum(losses),
        "lost_max": max(losses),
        "complete": complete,
        "writer_rate": writer_rate,
        "writer_busy": writer_busy,
        "subscriber_busy": sub_busy,
        "generator_saturated": writer_rate < SERVER_BOUND * rate,
        "subscriber_saturated": sub_busy > SUBSCRIBER_BUSY,
    }
    result["harness_saturated"] = (
        result["generator_saturated"] or result["subscriber_saturated"]
    )
    # every CPU busy (server and harness together): the processes compete
    # for the cores, and the harness's share bounds the server's
    busy = (cpu + load_cpu) / wall / (os.cpu_count() or 1)
    result["machine_busy"] = busy
    result["machine_saturated"] = busy > MACHINE_BUSY
    if backup_cpu is not None:
        result["backup_cpu_us"] = backup_cpu / total * 1e6
        result["backup_main_cpu_us"] = backup_main / total * 1e6
    return result


def ladder(
    mp: ForkServerContext,
    ctx: Context,
    server: Server,
    *,
    rates: list[int],
    duration: float,
    bisect: bool,
    key_space: int,
    writers: int = 3,
    backup: Server | None = None,
) -> dict[str, Any]:
    """The highest offered rate of ``rates`` that one subscriber gets whole.

    Linear: rates in order until the first failure.  Bisect: a binary search
    over ``rates`` (fewer steps; assumes a failure at r means failure above).
    The offered rate is split over ``writers`` processes.  With a
    ``backup``, the writers send to both servers of the pair.

    Each step records the server's CPU per update (``cpu_us``, from /proc
    over the whole step: sending and the tail until the last arrival) and
    whether the harness was the bound (``harness_saturated``: the writers
    fell short of the offered rate, or the subscriber process was busy for
    more than ``SUBSCRIBER_BUSY`` of the step).  ``cpu_us`` of the result
    is that of the step at the highest loss-free rate.
    """
    steps: list[dict[str, Any]] = []
    collectors = [server.port] + ([backup.port] if backup else [])
    with Children(mp) as children:
        subs = children.subscribers(1, server.port, security=server.security)
        senders = children.writers(
            writers, collectors, server.port, security=server.security
        )
        wait_live(ctx, server, subs)
        sub = subs[0]

        def step(rate: int) -> dict[str, Any]:
            result = attempt(rate)
            if not result["ok"] and not result["harness_saturated"]:
                result = attempt(rate)
            return result

        def attempt(rate: int) -> dict[str, Any]:
            share = int(rate * duration / writers)
            first = len(steps) * share * writers
            for i, writer in enumerate(senders):
                writer.call("build", share, first + i, key_space, writers)
            base = sub.counts()[0]
            cpu0, sub_cpu0 = server.cpu_seconds(), sub.cpu()
            for writer in senders:
                writer.send("pace", rate / writers)
            sent = collect(senders, duration * 3 + 30)
            total = sum(int(s["sent"]) for s in sent)
            wait_counts(subs, base + total, idle=1.0, timeout=duration * 4 + 30)
            cpu = server.cpu_seconds() - cpu0
            received = sub.counts()[0] - base
            start = min(s["start"] for s in sent)
            end = max(s["end"] for s in sent)
            achieved = total / (end - start)
            last = sub.lasts()[0]
            lag = last - end
            sub_busy = (sub.cpu() - sub_cpu0) / max(last - start, end - start)
            generator = achieved < GENERATOR_SLACK * rate
            result = {
                "offered": rate,
                "achieved": achieved,
                "received": received,
                "lost": total - received,
                "lag": lag,
                "ok": received == total and lag <= max(LAG_LIMIT, LAG_SHARE * duration),
                "cpu_us": cpu / max(total, 1) * 1e6,
                "subscriber_busy": sub_busy,
                "generator_saturated": generator,
                "harness_saturated": generator or sub_busy > SUBSCRIBER_BUSY,
            }
            steps.append(result)
            return result

        best, saturated = search(rates, step, bisect)
    passed = [s for s in steps if s["ok"] and s["offered"] == best]
    return {
        "rate": best,
        "cpu_us": passed[-1]["cpu_us"] if passed else None,
        "capped": best == rates[-1],
        "generator_saturated": saturated,
        "harness_saturated": saturated,
        "writers": writers,
        "steps": steps,
        "duration": duration,
    }


def search(rates: list[int], step: Any, bisect: bool) -> tuple[int | None, bool]:
    """The highest passing rate, and whether the harness fell short of one.

    A step where the writers could not reach the offered rate, or the
    subscriber was saturated, tested nothing about the server: it counts as
    a failure, flagged as the harness's.
    """
    saturated = False
    if not bisect:
        best = None
        for rate in rates:
            result = step(rate)
            if result["harness_saturated"] or not result["ok"]:
                return best, result["harness_saturated"]
            best = rate
        return best, False
    low, high = -1, len(rates)  # rates[low] passed, rates[high] failed
    for _ in range(len(rates)):
        if high - low <= 1:
            break
        middle = (low + high) // 2
        result = step(rates[middle])
        if result["ok"] and not result["harness_saturated"]:
            low = middle
        else:
            high = middle
            saturated = saturated or result["harness_saturated"]
    return (rates[low] if low >= 0 else None), saturated


def latency(
    mp: ForkServerContext,
    servers: dict[str, Server],
    *,
    rate: float,
    duration: float,
    key_space: int,
    rounds: int = 2,
) -> dict[str, Any]:
    """Per server: latency percentiles at ``rate``, over ``rounds`` runs of
    ``duration / rounds`` seconds with the servers taking turns."""
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
    for turn in range(rounds):
        order = list(servers.items())
        for kind, server in order if turn % 2 == 0 else order[::-1]:
            runs[kind].append(
                latency_run(mp, server, rate, duration / rounds, key_space)
            )
    return {kind: summarize(rate, r) for kind, r in runs.items()}


def latency_run(
    mp: ForkServerContext, server: Server, rate: float, duration: float, key_space: int
) -> dict[str, Any]:
    with Children(mp) as children:
        parent, child = children.pipe()
        children.start(workers.latency, child, server.port, rate, duration, key_space)
        if not parent.poll(duration * 3 + 60):
            raise TimeoutError("the latency prober did not report")
        result: dict[str, Any] = parent.recv()
    return result


def summarize(rate: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """p50 and p99: the median of the runs' own; max: over every run.  Each
    run's figures are kept (``runs``), and the pooled percentiles too."""
    samples = sorted(ns for r in runs for ns in r["latencies_ns"])
    sent = sum(r["sent"] for r in runs)
    result = {
        "rate": rate,
        "achieved": sent / sum(r["elapsed"] for r in runs),
        "sent": sent,
        "lost": sent - len(samples),
        "live": all(r["live"] for r in runs),
    }
    if not samples:
        return result
    each = [percentiles(sorted(r["latencies_ns"])) for r in runs]
    each = [dict(e, sent=r["sent"]) for e, r in zip(each, runs, strict=True) if e]
    pooled = percentiles(samples)
    return dict(
        result,
        p50_ms=median([e["p50_ms"] for e in each]),
        p99_ms=median([e["p99_ms"] for e in each]),
        max_ms=pooled["max_ms"],
        pooled_p50_ms=pooled["p50_ms"],
        pooled_p99_ms=pooled["p99_ms"],
        runs=each,
    )


def percentiles(samples: list[int]) -> dict[str, float]:
    """p50, p99 and max (ms) of sorted nanosecond ``samples``."""
    if not samples:
        return {}

    def quantile(q: float) -> float:
        return samples[min(int(q * len(samples)), len(samples) - 1)] / 1e6

    return {
        "p50_ms": quantile(0.5),
        "p99_ms": quantile(0.99),
        "max_ms": samples[-1] / 1e6,
    }


def median(values: list[float]) -> float:
    """The median (the mean of the middle two of an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def timer_lateness(samples: int = 1000, interval: float = 0.001) -> dict[str, float]:
    """How late ``time.sleep(1 ms)`` returns here (ms): the scheduler's share
    of any latency measured on this machine at this moment."""
    late = []
    for _ in range(samples):
        start = time.perf_counter()
        time.sleep(interval)
        late.append(time.perf_counter() - start - interval)
    late.sort()
    return {
        "p50_ms": late[len(late) // 2] * 1e3,
        "p99_ms": late[int(0.99 * len(late))] * 1e3,
        "max_ms": late[-1] * 1e3,
    }
