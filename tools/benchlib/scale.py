"""Scale sections of the bench: j-m, their settings (quick, full) and report.

j. failover as a client sees it (``benchlib.clientfailover``);
k. 1,000 subscribers following one standalone server, rates stepped up
   until the harness runs out (``benchlib.fanout``);
l. a snapshot storm with the active's HUGZ timed (``benchlib.storm``), and
   the 1M-key snapshot and memory figures of section f, quoted;
m. relay fan-out: the same 1,000 subscribers spread over two relays of
   that server, side by side with section k's one server, and how many
   subscribers one relay carries at 100 updates/s.

Relays are started as ``trioclone relay --upstream tcp://127.0.0.1:P
--port R --bind 127.0.0.1``; the writer writes to the server itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from multiprocessing.context import ForkServerContext
from typing import Any

from benchlib import clientfailover, fanout, storm
from benchlib.fanout import Target
from benchlib.report import dig, status
from benchlib.servers import Fleet, Server, free_ports
from benchlib.wire import HOST, Context


@dataclass(frozen=True)
class Scale:
    failover_runs: int
    sockets: int  # subscribers of sections k and m ...
    processes: int  # ... over this many processes
    rates: list[int]  # section k's steps (updates/s)
    seconds: float  # per step
    storm_keys: int
    storm_clients: int
    storm_processes: int
    relay_rates: list[int]  # section m's steps
    capacity: list[int]  # subscribers on one relay at 100/s, stepped


QUICK = Scale(
    failover_runs=3,
    sockets=1000,
    processes=10,
    rates=[100, 500],
    seconds=2.0,
    storm_keys=10_000,
    storm_clients=100,
    storm_processes=4,
    relay_rates=[100],
    capacity=[500, 1000],
)
FULL = Scale(
    failover_runs=5,
    sockets=1000,
    processes=10,
    rates=[100, 200, 500, 1000, 2000],
    seconds=4.0,
    storm_keys=100_000,
    storm_clients=100,
    storm_processes=4,
    relay_rates=[100, 200, 500, 1000],
    capacity=[500, 1000, 1500, 2000, 3000],
)


def settings(mode: str) -> Scale:
    return QUICK if mode == "quick" else FULL


# -- sections ------------------------------------------------------------------


def client_failover(mp: ForkServerContext, fleet: Fleet, s: Scale) -> dict[str, Any]:
    return clientfailover.run(mp, fleet, runs=s.failover_runs)


def subscribers(
    mp: ForkServerContext, ctx: Context, fleet: Fleet, s: Scale
) -> dict[str, Any]:
    """The subscribers on a trioclone server, then on the ceiling (the same
    fan-out in libzmq, nothing else): whose cost is the server's own."""
    out: dict[str, Any] = {}
    for kind in ("trioclone", "ceiling"):
        server = fleet.start(kind, f"fanout-{kind}")
        try:
            target = Target(
                f"one {kind} server", [server.port], [server.port], {kind: server.pid}
            )
            out[kind] = fanout.follow(
                mp,
                ctx,
                target,
                sockets=s.sockets,
                processes=s.processes,
                rates=s.rates,
                seconds=s.seconds,
            )
        finally:
            fleet.stop(server)
    return out


def snapshot_storm(
    mp: ForkServerContext, ctx: Context, fleet: Fleet, s: Scale
) -> dict[str, Any]:
    return storm.run(
        mp,
        ctx,
        fleet,
        keys=s.storm_keys,
        clients_count=s.storm_clients,
        processes=s.storm_processes,
    )


def start_relay(fleet: Fleet, upstream: list[Server], name: str) -> Server:
    port = free_ports()
    args = [sys.executable, "-m", "trioclone", "--log-level", "INFO", "relay"]
    for server in upstream:
        args += ["--upstream", f"tcp://{HOST}:{server.port}"]
    args += ["--port", str(port), "--bind", HOST]
    relay = fleet._spawn(name, "relay", port, args)
    fleet.wait_ready(relay, 30.0)
    return relay


def relays(
    mp: ForkServerContext, ctx: Context, fleet: Fleet, s: Scale
) -> dict[str, Any]:
    """The same subscribers spread over two relays of one server; then one
    relay's capacity at 100 updates/s."""
    server = fleet.start("trioclone", "relay-upstream")
    tier: list[Server] = []
    out: dict[str, Any] = {}
    try:
        tier = [start_relay(fleet, [server], f"relay-{i}") for i in (1, 2)]
        collectors = [server.port]  # the writer writes to the server itself
        watched = {"server": server.pid} | {
            f"relay{i}": r.pid for i, r in enumerate(tier, 1)
        }
        out["two"] = fanout.follow(
            mp,
            ctx,
            Target("two relays", [r.port for r in tier], collectors, watched),
            sockets=s.sockets,
            processes=s.processes,
            rates=s.relay_rates,
            seconds=s.seconds,
        )
        capacity = []
        one = Target("one relay", [tier[0].port], collectors, watched)
        for sockets in s.capacity:
            result = fanout.follow(
                mp,
                ctx,
                one,
                sockets=sockets,
                processes=max(s.processes, sockets // 100),
                rates=[100],
                seconds=s.seconds,
            )
            capacity.append(result)
            if result["highest_measurable"] is None:
                break
        out["capacity"] = capacity
        out["one_relay_carries"] = max(
            (c["sockets"] for c in capacity if c["highest_measurable"]), default=None
        )
    finally:
        fleet.stop(*tier, server)
    return out


# -- report --------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's yes/no targets for sections j-m (no time limits are set)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, limit: str, ok: bool | None) -> None:
        out.append(
            {"target": name, "value": value, "limit": limit, "status": status(ok)}
        )

    for settings in ("default", "fast"):
        block = dig(results, "client_failover", settings)
        if block:
            add(
                f"client failover, {settings}: updates missed",
                block["missed_total"],
                "= 0",
                block["missed_total"] == 0 and block["all_followed"],
            )
    first = dig(results, "subscribers", "trioclone", "steps")
    if first:
        add(
            f"one server, {dig(results, 'subscribers', 'trioclone', 'sockets'):,} "
            f"subs, {first[0]['rate']}/s: short",
            first[0]["sockets_short"],
            "= 0",
            first[0]["every_update"],
        )
    storm_result = results.get("storm")
    if storm_result:
        add(
            f"{storm_result['clients']} snapshots at once: clients exact",
            storm_result["exact"],
            f"= {storm_result['clients']}",
            storm_result["all_exact"],
        )
    two = dig(results, "relays", "two", "steps")
    if two:
        add(
            f"two relays, {dig(results, 'relays', 'two', 'sockets'):,} subs, "
            f"{two[0]['rate']}/s: short",
            two[0]["sockets_short"],
            "= 0",
            two[0]["every_update"],
        )
    return out


def render(results: dict[str, Any]) -> list[str]:
    lines = clientfailover.render(results.get("client_failover"))
    lines += render_subscribers(results.get("subscribers"))
    lines += storm.render(results.get("storm"))
    lines += render_million(results)
    lines += render_relays(
        results.get("relays"), dig(results, "subscribers", "trioclone")
    )
    return lines


HEAD = (
    f"  {'rate/s':>7} {'every?':>6} {'short':>5} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'deliv/s':>9} {'subs CPU':>8} {'host':>5}  server CPU share (main thread)"
)


def step_line(step: dict[str, Any]) -> str:
    shares = ", ".join(
        f"{n} {v:.2f} ({step['main_thread_share'][n]:.2f})"
        for n, v in step["cpu_share"].items()
    )
    flag = "  <- harness" if step["harness_saturated"] else ""
    host = step["host_busy"]
    return (
        f"  {step['rate']:>7,} {'yes' if step['every_update'] else 'NO':>6} "
        f"{step['sockets_short']:>5} {fmt(step['p50_ms'])} {fmt(step['p99_ms'])} "
        f"{step['deliveries_per_s']:>9,.0f} {step['subscriber_cpu_share_sum']:>8.2f} "
        f"{'-' if host is None else f'{host:.0%}':>5}  {shares}{flag}"
    )


def fmt(value: float | None) -> str:
    return f"{'-' if value is None else f'{value:.1f}':>8}"


def render_subscribers(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return []
    first = next(iter(result.values()))
    lines = [
        "",
        f"k. {first['sockets']:,} subscribers ({first['processes']} processes, "
        f"fast frame path) on one server, {first['seconds']:g} s per rate",
        HEAD,
    ]
    for kind, block in result.items():
        lines.append(f"  {kind}:")
        lines += [step_line(step) for step in block["steps"]]
        lines.append(
            f"    highest rate measured whole (every socket every update, p99 "
            f"< 1 s): {block['highest_measurable']}/s"
        )
    lines.append(
        "  'subs CPU': the subscriber processes' cores (all threads); 'host': the"
        " whole machine busy, every process (others' too); '<- harness': the "
        "subscriber processes took over half the machine or one a whole core"
    )
    return lines


def render_million(results: dict[str, Any]) -> list[str]:
    """1M keys: quoted from section f (large store), not measured again."""
    snap = dig(results, "snapshots", "1000000", "trioclone", "full")
    memory = dig(results, "memory", "trioclone", "1000000")
    if not snap and not memory:
        return []
    parts = []
    if snap:
        parts.append(
            f"snapshot {snap['seconds']:.2f} s ({snap['us_per_key']:.2f} us per key,"
            f" complete: {snap['complete']})"
        )
    if memory:
        parts.append(
            f"{memory['bytes_per_key']:,.0f} bytes per key over key and value "
            f"(RSS {memory['rss'] / 2**20:,.0f} MiB)"
        )
    return ["  1M keys (from section f): " + "; ".join(parts)]


def render_relays(
    result: dict[str, Any] | None, one: dict[str, Any] | None
) -> list[str]:
    """Section m, with section k's trioclone server as the one-server side."""
    if not result:
        return []
    two = result["two"]
    what = "two relays (`trioclone relay`) of a standalone server"
    lines = [
        "",
        f"m. Relay fan-out: {two['sockets']:,} subscribers on one server (section k) "
        f"against {what}",
        HEAD,
        "  one server:" if one else "",
        *([step_line(s) for s in one["steps"]] if one else []),
        "  two relays:",
        *[step_line(s) for s in two["steps"]],
        "  one relay, more subscribers at 100 updates/s:",
    ]
    for c in result["capacity"]:
        step = c["steps"][0]
        lines.append(f"  {c['sockets']:>5,} subscribers:" + step_line(step)[9:])
    failed = [c for c in result["capacity"] if c["highest_measurable"] is None]
    if not failed:
        why = "every step was measured whole"
    elif failed[0]["steps"] and failed[0]["steps"][0]["harness_saturated"]:
        why = (
            f"at {failed[0]['sockets']:,} the subscriber processes (the harness) "
            "had run out of this machine's cores"
        )
    else:
        why = f"at {failed[0]['sockets']:,} it was not measured whole"
    lines.append(
        f"  one relay carried {result['one_relay_carries']} subscribers at 100/s "
        f"measured whole; {why}"
    )
    return [line for line in lines if line]
