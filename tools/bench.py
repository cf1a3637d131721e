"""Benchmark trioclone against the bare pyzmq ceiling (``tools/ceiling.py``).

    python tools/bench.py [--quick] [--out bench-results/bench.json]
    python tools/bench.py --secured-only [--quick]
    nox -s bench -- --quick

Real server processes on 127.0.0.1 (free ports), load from separate
processes, every server stopped by PID at the end.  Measured side by side
for the ceiling (``tools/ceiling.py``: the cheapest CHP loop pyzmq allows)
and a trioclone standalone server (and a trioclone pair for failover):

a. flood throughput with 1, 10 (and 100) subscribers: wall updates/s and
   server CPU per update (from /proc over the whole run: the headline, as
   it is steady on a shared machine), losses, whether the harness was the
   bound;
b. the highest loss-free offered rate with one subscriber (the rate split
   over three writer processes) and the server CPU per update there;
c. KVSET -> KVPUB latency at 1,000/s and at half the loss-free rate;
d. snapshot times (full, 1% subtree, 50 clients at once, a slow reader);
e. failover time of a pair (default and fast settings) and lost updates;
f. RSS per key;
g. how (a), (d) and (f) grow with the number of keys and subscribers;
h. a durable server against an in-memory one (``--durable-only``);
i. a secured pair (CURVE, ZAP, permissions) against a plain one, and the
   ceiling with and without CURVE (``--secured-only``);
j-m. scale (``--scale-only``, ``benchlib.scale``): failover as a real client
   sees it; 1,000 subscribers at rising rates; 100 clients snapshotting at
   once; 1,000 subscribers on one server against two relays (about 2.5
   minutes quick, 5 full).

(a)-(d) run in rounds (2 in quick mode, 3 in full; snapshots 3 and 5),
the contenders alternating within each round; the medians are reported
and every run's figures kept in the JSON.  The load generator is not the
bound: writers and subscribers run in their own processes on pyzmq's
Cython frame calls, and a run where the writers fell short of the offered
rate or a subscriber process was over 90% busy says so
(``harness_saturated``), and a flood where server and harness together
kept every CPU over 90% busy says that (``machine_saturated``: on two
cores the ceiling's floods are, so read its CPU per update, not its rate).  Issue 12's four targets against the ceiling
(loss-free rate, CPU per update at each one's loss-free rate, p99 at
1,000/s, a 100k-key snapshot) are computed from the same run.

Quick mode takes about 8 minutes on a busy 2-core machine, of which
section i (``--secured-only``) about 4.5; full mode took about 10 minutes
for sections a-h, and section i adds about as much again.  Run on a busy
machine, the ratios to the ceiling (measured in the same run, back to
back) are the figures to read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib import children, durable, load, pair, report, scale, secured, snapshots
from benchlib.servers import Fleet, Server, new_context
from benchlib.wire import HOT

KINDS = report.KINDS
SMALL = 10_000  # keys stored for the floods, the ladder and latency
# The slow reader sleeps 0.3 s every 10k messages: slower than the server,
# so the server's send queue to it fills and it must wait, not drop.
SLOW_EVERY, SLOW_PAUSE = 10_000, 0.3
# Section i runs six bisected ladders twice: shorter steps than a-h's.
SECURED_STEP = 3.0


@dataclass(frozen=True)
class Mode:
    name: str
    large: int  # keys in the memory / large-store server
    floods: dict[str, tuple[int, int, int]]  # label: (processes, sockets each, updates)
    large_flood: int
    ladder_step: float  # seconds per offered rate
    bisect: bool
    latency_seconds: float
    fifty: dict[int, bytes]  # keys stored: subtree the 50 clients ask for
    repeats: int  # rounds of floods, ladders and latency runs; medians reported
    all_floods_repeated: bool  # the 10- and 100-subscriber floods too
    snapshot_repeats: (
        int  # runs of each single-client snapshot (up to 100k); median reported
    )
    medium_on_small: bool  # fill the small server to 100k for the 100k snapshots
    idle_seconds: float | None
    rates: list[int]


QUICK = Mode(
    name="quick",
    large=100_000,
    floods={"1": (1, 1, 40_000), "10": (10, 1, 15_000)},
    large_flood=30_000,
    ladder_step=2.0,
    bisect=True,
    latency_seconds=3.0,
    fifty={100_000: HOT},
    repeats=2,
    all_floods_repeated=False,
    snapshot_repeats=3,
    medium_on_small=False,
    idle_seconds=None,
    rates=list(range(5_000, 300_001, 5_000)),  # bisected: 6 steps
)
FULL = Mode(
    name="full",
    large=1_000_000,
    floods={"1": (1, 1, 100_000), "10": (10, 1, 40_000), "100": (10, 10, 10_000)},
    large_flood=100_000,
    ladder_step=4.0,
    bisect=True,
    latency_seconds=5.0,
    fifty={SMALL: b"", 100_000: HOT},
    repeats=3,
    all_floods_repeated=True,
    snapshot_repeats=5,
    medium_on_small=True,
    idle_seconds=60.0,
    rates=list(range(2_500, 300_001, 2_500)),  # bisected: 7 steps
)


class Bench:
    def __init__(
        self,
        mode: Mode,
        log_dir: Path,
        *,
        durable_only: bool = False,
        secured_only: bool = False,
        scale_only: bool = False,
    ) -> None:
        self.mode = mode
        self.durable_only = durable_only
        self.secured_only = secured_only
        self.scale_only = scale_only
        self.scale = scale.settings(mode.name)
        self.mp = children.context()
        self.ctx = new_context()
        self.fleet = Fleet(self.ctx, log_dir)
        self.results: dict[str, Any] = {"mode": mode.name, "errors": {}}

    def section(self, name: str, run: Callable[[], None]) -> None:
        """Run one section; an error is recorded and the bench goes on."""
        began = time.monotonic()
        print(f"-- {name} ...", flush=True)
        try:
            run()
        except Exception:
            self.results["errors"][name] = traceback.format_exc()
            print(traceback.format_exc(), file=sys.stderr, flush=True)
        print(f"   {name}: {time.monotonic() - began:.1f} s", flush=True)

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.results.update(
            started=datetime.datetime.now().isoformat(timespec="seconds"),
            cpus=os.cpu_count(),
            load_before=round(os.getloadavg()[0], 2),
            trioclone_commit=git_commit(),
        )
        with self.fleet:
            if self.durable_only or self.secured_only or self.scale_only:
                if self.durable_only:
                    self.section("durable vs in memory", self.durable)
                if self.secured_only:
                    self.section("secured vs plain", self.secured)
                if self.scale_only:
                    self.scale_sections()
            else:
                self.all_sections()
        self.results.update(
            load_after=round(os.getloadavg()[0], 2),
            elapsed=time.monotonic() - started,
            growth=growth(self.results),
        )
        self.results["targets"] = (
            report.targets(self.results)
            + secured.targets(self.results.get("secured"))
            + scale.targets(self.results)
        )
        return self.results

    def all_sections(self) -> None:
        small = {kind: self.fleet.start(kind, f"{kind}-small") for kind in KINDS}
        self.section("fill 10k", lambda: self.fill(small, 0, SMALL))
        self.section("snapshots 10k", lambda: self.snapshots(small, SMALL))
        self.section("floods", lambda: self.floods(small))
        self.section("loss-free ladder", lambda: self.ladder(small))
        self.section("latency", lambda: self.latency(small))
        if self.mode.medium_on_small:
            self.section("fill 100k", lambda: self.fill(small, SMALL, 100_000))
            self.section("snapshots 100k", lambda: self.snapshots(small, 100_000))
        self.fleet.stop(*small.values())
        self.section("durable vs in memory", self.durable)
        self.section("secured vs plain", self.secured)
        self.section("memory and large store", self.large_store)
        self.section("failover", self.failover)
        if self.mode.idle_seconds:
            self.section("idle pair", self.idle)
        self.scale_sections()

    def scale_sections(self) -> None:
        """Sections j-m (``benchlib.scale``); also ``--scale-only``."""
        s, mp, ctx, fleet, out = self.scale, self.mp, self.ctx, self.fleet, self.results
        self.section(
            "client failover",
            lambda: out.update(client_failover=scale.client_failover(mp, fleet, s)),
        )
        self.section(
            "subscribers",
            lambda: out.update(subscribers=scale.subscribers(mp, ctx, fleet, s)),
        )
        self.section(
            "snapshot storm",
            lambda: out.update(storm=scale.snapshot_storm(mp, ctx, fleet, s)),
        )
        self.section(
            "relay fan-out", lambda: out.update(relays=scale.relays(mp, ctx, fleet, s))
        )

    # -- sections ------------------------------------------------------------

    def fill(self, servers: dict[str, Server], start: int, stop: int) -> None:
        fills = self.results.setdefault("fills", {})
        for kind, server in servers.items():
            fills.setdefault(kind, []).append(
                snapshots.fill(self.ctx, server, start, stop)
            )

    def snapshots(self, servers: dict[str, Server], keys: int) -> None:
        self.results.setdefault("snapshots", {})[str(keys)] = snapshots.snapshot_suite(
            self.mp,
            self.ctx,
            servers,
            keys,
            fifty=self.mode.fifty.get(keys),
            repeats=self.mode.snapshot_repeats if keys <= 100_000 else 1,
        )

    def floods(self, servers: dict[str, Server]) -> None:
        """Floods in rounds, the kinds alternating in each; medians reported."""
        runs = self.results.setdefault("throughput", {})
        self.results["warmup_cpu_us"] = {  # a first flood costs more: not counted
            kind: load.flood(
                self.mp, self.ctx, server, subscribers=1, count=10_000, key_space=SMALL
            )["cpu_us"]
            for kind, server in servers.items()
        }
        for label, (processes, sockets, updates) in self.mode.floods.items():
            tries: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
            repeated = label == "1" or self.mode.all_floods_repeated
            for turn in range(self.mode.repeats if repeated else 1):
                for kind, server in in_turn(servers, turn):
                    result = load.flood(
                        self.mp,
                        self.ctx,
                        server,
                        subscribers=processes,
                        sockets=sockets,
                        count=updates,
                        key_space=SMALL,
                    )
                    tries[kind].append(result)
            runs[label] = {kind: median_flood(t, SMALL) for kind, t in tries.items()}
            runs[label]["paired_cpu_ratios"] = paired_ratios(tries)

    def ladder(self, servers: dict[str, Server]) -> None:
        """Ladders in rounds, the kinds alternating; median rate and CPU."""
        tries: dict[str, list[dict[str, Any]]] = {kind: [] for kind in servers}
        for turn in range(self.mode.repeats):
            for kind, server in in_turn(servers, turn):
                tries[kind].append(
                    load.ladder(
                        self.mp,
                        self.ctx,
                        server,
                        rates=self.mode.rates,
                        duration=self.mode.ladder_step,
                        bisect=self.mode.bisect,
                        key_space=SMALL,
                    )
                )
        self.results["lossfree"] = {kind: median_ladder(t) for kind, t in tries.items()}

    def latency(self, servers: dict[str, Server]) -> None:
        # how late this busy machine wakes a sleeping process: the floor under p99
        self.results["timer_lateness"] = load.timer_lateness()
        # the same offered load for both: half of trioclone's loss-free rate
        best = report.dig(self.results, "lossfree", "trioclone", "rate") or 5_000
        runs = self.results.setdefault("latency", {})
        rounds = max(self.mode.repeats, 2)
        for label, rate in (("1000", 1_000), ("half", best / 2)):
            runs[label] = load.latency(
                self.mp,
                servers,
                rate=rate,
                duration=self.mode.latency_seconds * rounds / 2,
                key_space=SMALL,
                rounds=rounds,
            )

    def durable(self) -> None:
        mode = self.mode
        self.results["durable"] = durable.run(
            self.mp,
            self.ctx,
            self.fleet,
            keys=100_000,
            flood=mode.floods["1"][2],
            repeats=mode.repeats,
            step=mode.ladder_step,
            key_space=SMALL,
        )

    def secured(self) -> None:
        mode = self.mode
        self.results["secured"] = secured.run(
            self.mp,
            self.ctx,
            self.fleet,
            flood=mode.floods["1"][2],
            rounds=max(mode.repeats - 1, 2),
            step=min(mode.ladder_step, SECURED_STEP),
            key_space=SMALL,
        )

    def large_store(self) -> None:
        """Fresh servers: RSS empty, at 100k (and 1M); snapshots and a flood there."""
        mode = self.mode
        large = {kind: self.fleet.start(kind, f"{kind}-large") for kind in KINDS}
        memory = self.results.setdefault("memory", {})
        for kind, server in large.items():
            memory[kind] = {"empty": server.rss_bytes()}
        sizes = sorted({100_000, mode.large})
        done = 0
        for keys in sizes:
            for kind, server in large.items():
                snapshots.fill(self.ctx, server, done, keys)
                memory[kind][str(keys)] = snapshots.memory(
                    server, memory[kind]["empty"], keys
                )
            done = keys
        if mode.large > 100_000 or not mode.medium_on_small:
            self.snapshots(large, mode.large)
        if mode.large >= 1_000_000:  # trioclone only: the ceiling's sends block
            self.results["snapshots"][str(mode.large)]["trioclone"]["slow_reader"] = (
                snapshots.snapshot_once(
                    self.ctx,
                    large["trioclone"],
                    b"",
                    mode.large,
                    timeout=600.0,
                    pause_every=SLOW_EVERY,
                    pause=SLOW_PAUSE,
                )
            )
        tries: dict[str, list[dict[str, Any]]] = {kind: [] for kind in large}
        for _ in range(mode.repeats - 1):
            for kind, server in large.items():
                tries[kind].append(
                    load.flood(
                        self.mp,
                        self.ctx,
                        server,
                        subscribers=1,
                        count=mode.large_flood,
                        key_space=mode.large,
                    )
                )
        self.results["throughput_large"] = {
            kind: median_flood(t, mode.large) for kind, t in tries.items()
        }
        self.results["throughput_large"]["paired_cpu_ratios"] = paired_ratios(tries)
        self.fleet.stop(*large.values())

    def failover(self) -> None:
        runs = self.results.setdefault("failover", {})
        for settings in ("default", "fast"):
            runs[settings] = pair.failover(
                self.mp, self.ctx, self.fleet, fast=settings == "fast"
            )

    def idle(self) -> None:
        assert self.mode.idle_seconds is not None
        self.results.setdefault("failover", {})["idle"] = pair.idle(
            self.fleet, self.mode.idle_seconds
        )


def in_turn(servers: dict[str, Server], turn: int) -> list[tuple[str, Server]]:
    """The contenders in the order of round ``turn``: reversed every other
    round, so neither always runs first (after the other's load)."""
    order = list(servers.items())
    return order if turn % 2 == 0 else order[::-1]


def median_flood(tries: list[dict[str, Any]], keys: int) -> dict[str, Any]:
    """The median rate and CPU per update of the runs (each run kept whole
    in ``runs``); the other fields are the median-CPU run's."""
    middle = sorted(tries, key=lambda r: r["cpu_us"])[(len(tries) - 1) // 2]
    summary = {
        field: load.median([r[field] for r in tries])
        for field in ("rate", "cpu_us", "main_cpu_us", "load_cpu_us", "writer_rate")
    }
    return dict(
        middle,
        **summary,
        keys_stored=keys,
        harness_saturated=any(r["harness_saturated"] for r in tries),
        machine_saturated=any(r["machine_saturated"] for r in tries),
        lost_max=max(r["lost_max"] for r in tries),
        runs_cpu_us=[r["cpu_us"] for r in tries],
        runs_rate=[r["rate"] for r in tries],
        runs=tries,
    )


def median_ladder(tries: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of the rounds' highest loss-free rates, and of the CPU per
    update at each round's highest loss-free rate; every round kept."""
    rates = [r["rate"] or 0 for r in tries]
    cpus = [r["cpu_us"] for r in tries if r["cpu_us"] is not None]
    return {
        "rate": load.median(rates),
        "cpu_us": load.median(cpus) if cpus else None,
        "capped": any(r["capped"] for r in tries),
        "generator_saturated": any(r["generator_saturated"] for r in tries),
        "harness_saturated": any(r["harness_saturated"] for r in tries),
        "duration": tries[0]["duration"],
        "writers": tries[0]["writers"],
        "runs_rate": [r["rate"] for r in tries],
        "runs_cpu_us": [r["cpu_us"] for r in tries],
        "steps": tries[-1]["steps"],
        "runs": tries,
    }


def paired_ratios(tries: dict[str, list[dict[str, Any]]]) -> list[float]:
    """trioclone / ceiling CPU per update for each back-to-back pair of runs."""
    return [
        t["cpu_us"] / c["cpu_us"]
        for c, t in zip(tries["ceiling"], tries["trioclone"], strict=True)
    ]


def growth(results: dict[str, Any]) -> dict[str, dict[str, str]]:
    """How the per-update, per-key figures move with keys and subscribers."""
    dig = report.dig
    rows: dict[str, dict[str, str]] = {}
    large = results.get("throughput_large") or {}
    keys = dig(large, "trioclone", "keys_stored")
    if keys:
        label = f"server CPU per update, {SMALL:,} -> {keys:,} keys stored"
        rows[label] = {}
        for kind in KINDS:
            small_cpu = dig(results, "throughput", "1", kind, "cpu_us")
            large_cpu = dig(large, kind, "cpu_us")
            if small_cpu and large_cpu:
                rows[label][kind] = (
                    f"{small_cpu:.1f} -> {large_cpu:.1f} us ({large_cpu / small_cpu:.2f}x)"
                )
    floods = results.get("throughput") or {}
    if floods:
        labels = sorted(floods, key=int)
        label = (
            "flood with "
            + " / ".join(labels)
            + " subscribers: updates/s (CPU us/update)"
        )
        rows[label] = {
            kind: " / ".join(
                f"{dig(floods, n, kind, 'rate') or 0:,.0f} ({dig(floods, n, kind, 'cpu_us') or 0:.1f})"
                for n in labels
            )
            for kind in KINDS
        }
    snaps = results.get("snapshots") or {}
    if snaps:
        sizes = sorted(snaps, key=int)
        label = "full snapshot, us per key at " + " / ".join(
            f"{int(n):,}" for n in sizes
        )
        rows[label] = {
            kind: " / ".join(
                fmt_or_dash(dig(snaps, n, kind, "full", "us_per_key"), ".2f")
                for n in sizes
            )
            for kind in KINDS
        }
    memory = results.get("memory") or {}
    sizes = sorted({k for m in memory.values() for k in m if k.isdigit()}, key=int)
    if sizes:
        label = "bytes per key at " + " / ".join(f"{int(n):,}" for n in sizes)
        rows[label] = {
            kind: " / ".join(
                fmt_or_dash(dig(memory, kind, n, "bytes_per_key"), ",.0f")
                for n in sizes
            )
            for kind in KINDS
        }
    return rows


def git_commit() -> str:
    """The commit of the trioclone tree measured (``+dirty`` if modified)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "trioclone"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def fmt_or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Benchmark trioclone against the ceiling."
    )
    parser.add_argument("--quick", action="store_true", help="about a minute or two")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results/bench.json"),
        help="JSON results",
    )
    parser.add_argument(
        "--durable-only",
        action="store_true",
        help="only the durable vs in-memory section (h)",
    )
    parser.add_argument(
        "--secured-only",
        action="store_true",
        help="only the secured vs plain section (i)",
    )
    parser.add_argument(
        "--scale-only",
        action="store_true",
        help="only the scale sections (j-m: client failover, subscribers, "
        "snapshot storm, relay fan-out)",
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every server is still stopped by PID
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    mode = QUICK if args.quick else FULL
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = Bench(
        mode,
        args.out.parent / "logs",
        durable_only=args.durable_only,
        secured_only=args.secured_only,
        scale_only=args.scale_only,
    ).run()
    text = "\n".join(
        [
            report.render(results),
            *durable.render(results.get("durable")),
            *secured.render(results.get("secured")),
            *scale.render(results),
        ]
    )
    print(text)
    args.out.write_text(json.dumps(results, indent=2, default=str))
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(f"\nwritten: {args.out} and {args.out.with_suffix('.txt')}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
