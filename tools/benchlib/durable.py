"""Durable (SQLite, ``--fsync always``) against in-memory, side by side.

Two fresh standalone servers, one keeping its map in memory and one in a
data folder, measured in the same run, taking turns: filling 100k keys,
floods with one subscriber (also with ``--fsync interval`` and ``off``),
the highest loss-free rate, a 100k-key snapshot, and how long the durable
server takes to serve again after SIGKILL with 100k keys kept.
"""

from __future__ import annotations

import time
from typing import Any

from benchlib import load, snapshots
from benchlib.report import dig
from benchlib.servers import Fleet, Server
from benchlib.wire import Context, server_sequence

KINDS = ("trioclone", "durable")
LABELS = {"trioclone": "in memory", "durable": "durable"}
RATES = list(range(10_000, 300_001, 10_000))  # bisected


def run(
    mp: Any,
    ctx: Context,
    fleet: Fleet,
    *,
    keys: int,
    flood: int,
    repeats: int,
    step: float,
    key_space: int,
) -> dict[str, Any]:
    servers = {kind: fleet.start(kind, f"{kind}-vs") for kind in KINDS}
    out: dict[str, Any] = {kind: {} for kind in KINDS}
    for kind, server in servers.items():
        out[kind]["fill"] = snapshots.fill(ctx, server, 0, keys)
    for server in servers.values():  # warm-up, not counted
        load.flood(mp, ctx, server, subscribers=1, count=10_000, key_space=key_space)
    tries: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for _ in range(repeats):
        for kind, server in servers.items():
            tries[kind].append(
                load.flood(
                    mp, ctx, server, subscribers=1, count=flood, key_space=key_space
                )
            )
    for kind in KINDS:
        out[kind]["flood"] = min(tries[kind], key=lambda r: r["cpu_us"])
    for kind, server in servers.items():
        out[kind]["lossfree"] = load.ladder(
            mp,
            ctx,
            server,
            rates=RATES,
            duration=step,
            bisect=True,
            key_space=key_space,
        )
    for kind, server in servers.items():
        runs = [snapshots.snapshot_once(ctx, server, b"", keys) for _ in range(3)]
        out[kind]["snapshot"] = snapshots.best_of(runs)
    out["durable"]["restart"] = restart(ctx, fleet, servers["durable"], keys)
    fleet.stop(*servers.values())
    for mode in ("interval", "off"):
        server = fleet.start("durable", f"durable-{mode}", extra=["--fsync", mode])
        snapshots.fill(ctx, server, 0, key_space)
        load.flood(mp, ctx, server, subscribers=1, count=10_000, key_space=key_space)
        out[f"fsync {mode}"] = load.flood(
            mp, ctx, server, subscribers=1, count=flood, key_space=key_space
        )
        fleet.stop(server)
    return out


def restart(ctx: Context, fleet: Fleet, server: Server, keys: int) -> dict[str, Any]:
    """SIGKILL, start again on the same folder: seconds until it serves its map."""
    sequence = server_sequence(ctx, server.port, 5.0)
    fleet.kill(server)
    began = time.monotonic()
    again = fleet.start("durable", server.name, timeout=120.0, port=server.port)
    ready = time.monotonic() - began
    snapshot = snapshots.snapshot_once(ctx, again, b"", keys)
    return {
        "seconds": ready,
        "sequence_before": sequence,
        "sequence_after": server_sequence(ctx, again.port, 5.0),
        "keys_back": snapshot.get("received"),
    }


def render(result: dict[str, Any] | None) -> list[str]:
    """The table: in memory | durable | ratio."""
    if not result:
        return []
    lines = [
        "",
        "h. Durable map (SQLite WAL, --fsync always) vs in memory, same run",
        f"{'':46}  {'in memory':>17}  {'durable':>17}  {'ratio':>8}",
    ]

    def row(label: str, path: tuple[str, ...], spec: str, unit: str = "") -> None:
        values = [dig(result, kind, *path) for kind in KINDS]
        shown = [
            "-"
            if v is None
            else f"{v:{spec}}{unit}"
            if not isinstance(v, bool)
            else str(v)
            for v in values
        ]
        ratio = (
            f"{values[1] / values[0]:.2f}x"
            if all(isinstance(v, int | float) and v for v in values)
            else ""
        )
        lines.append(f"{label:46}  {shown[0]:>17}  {shown[1]:>17}  {ratio:>8}")

    row("  fill 100k keys, updates/s", ("fill", "rate"), ",.0f")
    row("  flood, 1 subscriber: updates/s", ("flood", "rate"), ",.0f")
    row("  flood: server CPU per update", ("flood", "cpu_us"), ".1f", " us")
    row("  flood: lost", ("flood", "lost_max"), ",")
    row("  flood: generator saturated?", ("flood", "generator_saturated"), "")
    row("  highest loss-free rate (ladder to 100k/s)", ("lossfree", "rate"), ",")
    row("  snapshot of 100k keys, seconds", ("snapshot", "seconds"), ".3f")
    for mode in ("interval", "off"):
        flood = result.get(f"fsync {mode}") or {}
        if flood:
            lines.append(
                f"  flood with --fsync {mode}: {flood['rate']:,.0f} updates/s, "
                f"{flood['cpu_us']:.1f} us CPU per update, {flood['lost_max']} lost"
            )
    again = dig(result, "durable", "restart")
    if again:
        lines.append(
            f"  SIGKILL, restart with {again['keys_back']} keys kept: serving in "
            f"{again['seconds']:.2f} s, sequence {again['sequence_before']} -> "
            f"{again['sequence_after']}"
        )
    return lines
