"""How late HUGZ and the Binary Star heartbeat are while a server works hard.

    python tools/lateness.py [--quick] [--json] [--out FILE]
    nox -s lateness -- --quick

A real trioclone pair (two processes, default timings: HUGZ and heartbeat
every 1 s, peer expiry 2 heartbeats) on 127.0.0.1, a fresh pair for each
scenario.  An observer process subscribes to HUGZ on each server's publisher
and to each server's state port and records arrival times (CLOCK_MONOTONIC).
Lateness of a beat = the gap since the previous one - the interval; the
target is "never more than 10% of the interval late".  Scenarios, each
measuring the active server:

baseline. an idle pair: the machine's own jitter (and the observer's);
a. N keys expiring at once: N KVSETs (to both collectors, as clients write)
   paced so each key's ttl = target - now lands every deadline within a few
   ms of the same instant; observed through the expiry burst;
b. an N-entry takeover: N KVSETs to the backup's collector only (so the
   active never publishes them: they wait on the backup's pending list),
   then SIGKILL of the primary and votes (ICANHAZ) on the backup until it
   takes over and replays them; the backup's heartbeats and HUGZ observed;
c. concurrent whole-map snapshots: N keys stored (100-byte values), then
   K clients (in a few processes) ask ICANHAZ at once and read to KTHXBAI;
d. a and c together: N stored keys plus N keys expiring while K clients
   snapshot the whole map.

A stall shorter than the interval delays a beat only if one falls due
during it, so the work of a, b and d is timed to begin just before a beat
of the measured server is due (runs alternate between HUGZ and the
heartbeat); each stream's figure is its worst over the runs.

Full mode: N = 100,000, K = 50, two runs of each scenario (about 7 minutes
here).  Quick mode: N = 20,000, K = 10, one run, a 10 s baseline (about a
minute).  Each scenario also reports the Binary
Star states seen on the state ports before and after (a false failover),
whether a gap passed the clients' 2 s silence timeout or the 2 s peer
expiry, and the observer's own worst wake-up delay in the window.

Every server is stopped by PID, every child process joined or killed by
PID; all traffic is on 127.0.0.1.  JSON goes to ``--out`` (default
``bench-results/lateness.json``, ignored by git; runs worth keeping go to
``tools/results/``), the table beside it as ``.txt``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import sys
import textwrap
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq
from bench import git_commit
from benchlib import children, load, pair, snapshots
from benchlib.children import Children
from benchlib.heartbeats import (
    TARGET,
    Observer,
    lateness,
    own_lateness,
    pair_streams,
    states,
)
from benchlib.servers import Fleet, Server, new_context
from benchlib.wire import (
    HUGZ,
    ICANHAZ,
    KTHXBAI,
    NO_SUBTREE,
    SEQUENCE,
    VALUE,
    ZERO_SEQUENCE,
    Context,
    Feeder,
    build_updates,
    data_key,
    frame_sender,
    server_sequence,
    socket,
    tcp,
)

INTERVAL = 1.0  # the servers' defaults: --hugz and --heartbeat
CLIENT_SILENCE = 2.0  # a client's silence timeout (trioclone and the Guide's)
PEER_EXPIRY = 2.0 * INTERVAL  # --peer-expiry 2 heartbeats
LEAD = 1.0  # the window opens this long before the work starts
TAIL = 4.0  # and closes this long after it ended
# KVSETs/s with a ttl.  The pair must apply them as they come: here, at
# 20,000/s, a pair fell behind and its deadlines spread over 280 ms; at
# 10,000/s they fell within 2 ms (the spread is measured and reported).
TTL_RATE = 10_000
SPREAD_LIMIT = 20.0  # ms: deadlines further apart than this are not "at once"
TTL_SETTLE = 3.0  # s between the last ttl write and the common deadline
SNAP_LEAD = 1.0  # d: snapshot clients start this long before the deadline
# (they take 0.3-0.5 s to start, so the transfers are running at the deadline)
PENDING_AGE = 600.0  # b: the pending list keeps every entry until the takeover
STATUS_EVERY = 0.5  # b: the backup logs its status this often
VOTE_TIMEOUT = 60.0
WAIT = 300.0  # the bound on every wait for the servers' work
# A stall shorter than the interval makes a beat late only if one falls due
# during it, so the work of a, b and d is timed to begin this long before a
# beat of the measured server is due (the stall then shows in full rather
# than by chance of phase).  Runs alternate between the two streams.
ALIGN_EARLY = 0.03
ALIGNED = ("heartbeat", "hugz")
STATE_NAMES = {1: "PRIMARY", 2: "BACKUP", 3: "ACTIVE", 4: "PASSIVE"}


@dataclass(frozen=True)
class Mode:
    name: str
    keys: int  # N: keys expiring, held pending, stored for the snapshots
    clients: int  # K: concurrent whole-map snapshots
    processes: int  # the processes the snapshot clients run in
    baseline: float  # seconds of the idle pair
    repeats: int  # runs of each scenario (a fresh pair each); the worst counts


QUICK = Mode("quick", keys=20_000, clients=10, processes=2, baseline=10.0, repeats=1)
FULL = Mode("full", keys=100_000, clients=50, processes=2, baseline=60.0, repeats=2)

Window = tuple[float, float, dict[str, Any]]  # start, end, what the work saw
Work = Callable[[Server, Server, int], Window]


class Lateness:
    def __init__(self, mode: Mode, log_dir: Path) -> None:
        self.mode = mode
        self.mp = children.context()
        self.ctx = new_context()
        self.fleet = Fleet(self.ctx, log_dir)
        self.results: dict[str, Any] = {
            "mode": mode.name,
            "sizes": asdict(mode),
            "interval": INTERVAL,
            "target_pct": TARGET * 100,
            "errors": {},
            "scenarios": {},
        }

    def run(self) -> dict[str, Any]:
        began = time.monotonic()
        self.results.update(
            started=datetime.datetime.now().isoformat(timespec="seconds"),
            cpus=os.cpu_count(),
            load_before=round(os.getloadavg()[0], 2),
            trioclone_commit=git_commit(),
            timer_lateness=load.timer_lateness(),
        )
        n, k = self.mode.keys, self.mode.clients
        with self.fleet:
            self.scenario(
                "baseline", f"idle pair, {self.mode.baseline:.0f} s", self.idle
            )
            self.scenario("a", f"{n:,} keys expiring at once", self.expiry)
            self.scenario(
                "b", f"{n:,}-entry takeover", self.takeover, measured="backup"
            )
            self.scenario("c", f"{k} concurrent {n:,}-key snapshots", self.snapshots)
            self.scenario("d", f"a and c together ({k} clients)", self.together)
        self.results.update(
            load_after=round(os.getloadavg()[0], 2),
            elapsed=round(time.monotonic() - began, 1),
        )
        return self.results

    def scenario(
        self, name: str, title: str, work: Work, *, measured: str = "primary"
    ) -> None:
        """Run ``work`` on fresh pairs (``repeats`` times); errors are recorded."""
        print(f"-- {name}: {title} ...", file=sys.stderr, flush=True)
        began = time.monotonic()
        runs = []
        for run in range(self.mode.repeats):
            try:
                runs.append(self.observe(work, measured, run))
            except Exception:
                self.results["errors"][name] = traceback.format_exc()
                print(traceback.format_exc(), file=sys.stderr, flush=True)
        if runs:
            self.results["scenarios"][name] = combine(runs, title)
        print(
            f"   {name}: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True
        )

    def observe(self, work: Work, measured: str, run: int) -> dict[str, Any]:
        """A fresh pair, the observer on it, ``work``; lateness in its window."""
        extra: tuple[str, ...] = ()
        if measured == "backup":  # the takeover: keep every pending entry, say so
            extra = (
                "--pending-age",
                str(PENDING_AGE),
                "--status-interval",
                str(STATUS_EVERY),
            )
        primary, backup = self.fleet.start_pair(fast=False, extra=extra)
        try:
            with Children(self.mp) as kids:
                observer = Observer(
                    kids,
                    pair_streams(primary, backup),
                    warm=("primary.hugz", "primary.state", "backup.state"),
                )
                observer.wait_warm()
                load_before = os.getloadavg()[0]
                start, end, info = work(primary, backup, run)
                info["load"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                seen = observer.finish()
        finally:
            self.fleet.stop(primary, backup)
        return dict(analyse(seen, measured, start, end), **info)

    # -- the scenarios -----------------------------------------------------------

    def idle(self, primary: Server, backup: Server, run: int) -> Window:
        start = time.perf_counter()
        time.sleep(self.mode.baseline)
        return start, time.perf_counter(), {}

    def expiry(self, primary: Server, backup: Server, run: int) -> Window:
        n = self.mode.keys
        aligned = ALIGNED[run % 2]
        target = aligned_deadline(self.ctx, primary, aligned, n)
        info: dict[str, Any] = {
            "aligned_to": aligned,
            "writes": write_expiring(self.ctx, primary, backup, 0, n, target),
        }
        info["deadline_spread"] = deadlines(self.ctx, primary.port, 0, n, target)
        start = target - LEAD
        info["writes_into_window"] = time.perf_counter() > start
        sleep_until(start)
        info["expiry"] = wait_expired(self.ctx, primary, info["writes"], n, target)
        sleep_until(max(time.perf_counter(), target) + TAIL)
        return start, time.perf_counter(), info

    def takeover(self, primary: Server, backup: Server, run: int) -> Window:
        n = self.mode.keys
        info: dict[str, Any] = {
            "aligned_to": "heartbeat",
            "held": hold_on_backup(self.ctx, backup, n),
        }
        phase = beat_phase(self.ctx, backup, "heartbeat")
        start = time.perf_counter()
        time.sleep(LEAD)
        killed = time.perf_counter()
        self.fleet.kill(primary, signal.SIGKILL)
        # the backup counts its peer dead 2 heartbeats after the last it heard
        voted = just_before_beat(phase, killed + PEER_EXPIRY + 0.3)
        sleep_until(voted)
        took, votes, _ = pair.vote(
            self.ctx, backup.port, voted, VOTE_TIMEOUT, subtree=NO_SUBTREE
        )
        info["takeover"] = {
            "killed_at_s": round(killed - start, 3),
            "first_vote_at_s": round(voted - start, 3),
            "first_vote_s_after_kill": round(voted - killed, 3),
            # sent every 0.2 s until the answer: the first is accepted (the peer
            # has expired), but its answer waits for the replay
            "votes": votes,
            "answered_s_after_vote": None if took is None else round(took, 3),
        }
        time.sleep(TAIL)
        end = time.perf_counter()
        info["takeover"]["replayed"] = status_figure(backup, "takeover_applied", 0)
        return start, end, info

    def snapshots(self, primary: Server, backup: Server, run: int) -> Window:
        n = self.mode.keys
        info: dict[str, Any] = {"fill": snapshots.fill(self.ctx, primary, 0, n)}
        start = time.perf_counter()
        time.sleep(LEAD)
        info["snapshots"] = self.many(primary, n)
        time.sleep(TAIL)
        return start, time.perf_counter(), info

    def together(self, primary: Server, backup: Server, run: int) -> Window:
        n = self.mode.keys
        aligned = ALIGNED[run % 2]
        info: dict[str, Any] = {
            "aligned_to": aligned,
            "fill": snapshots.fill(self.ctx, primary, 0, n),
        }
        target = aligned_deadline(self.ctx, primary, aligned, n)
        info["writes"] = write_expiring(self.ctx, primary, backup, n, 2 * n, target)
        info["deadline_spread"] = deadlines(self.ctx, primary.port, n, 2 * n, target)
        start = target - SNAP_LEAD - LEAD
        info["writes_into_window"] = time.perf_counter() > start
        sleep_until(start + LEAD)
        asked = time.perf_counter()
        info["snapshots"] = self.many(primary, None)
        returned = time.perf_counter()
        went = returned - (info["snapshots"]["seconds"] or 0.0)  # about: go
        info["snapshots"].update(
            called_s_before_deadline=round(target - asked, 3),
            asked_s_before_deadline=round(target - went, 3),
            returned_s_after_deadline=round(returned - target, 3),
            running_at_deadline=asked < target < returned and went < target,
        )
        info["expiry"] = wait_expired(self.ctx, primary, info["writes"], n, target)
        time.sleep(TAIL)
        return start, time.perf_counter(), info

    def many(self, primary: Server, expected: int | None) -> dict[str, Any]:
        """K clients ask for the whole map at once and read it at full speed."""
        result = snapshots.snapshot_many(
            self.mp,
            primary,
            clients=self.mode.clients,
            processes=self.mode.processes,
            subtree=b"",
            expected=-1 if expected is None else expected,
            timeout=WAIT,
        )
        if expected is None:  # keys expire mid-transfer: no count to check
            result.pop("complete")
            result.pop("short")
        return result


# -- timing --------------------------------------------------------------------------


def beat_phase(
    ctx: Context, server: Server, stream: str, timeout: float = 5.0
) -> float:
    """When a beat of ``stream`` ("hugz" or "heartbeat") next arrives here."""
    sub = socket(ctx, zmq.SUB)
    if stream == "hugz":
        sub.setsockopt(zmq.SUBSCRIBE, HUGZ)
        sub.connect(tcp(server.port + 1))
    else:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(tcp(server.state_port or 0))
    try:
        if not sub.poll(int(timeout * 1000), zmq.POLLIN):
            raise RuntimeError(f"no {stream} from {server.name} in {timeout} s")
        sub.recv_multipart()
        return time.perf_counter()
    finally:
        sub.close(0)


def just_before_beat(phase: float, earliest: float) -> float:
    """The first moment from ``earliest`` that is ``ALIGN_EARLY`` before a beat
    is due (beats come every ``INTERVAL`` from ``phase``)."""
    beats = math.ceil((earliest + ALIGN_EARLY - phase) / INTERVAL)
    return phase + beats * INTERVAL - ALIGN_EARLY


def aligned_deadline(ctx: Context, server: Server, stream: str, keys: int) -> float:
    """A common deadline for ``keys`` ttl writes, just before a beat is due."""
    phase = beat_phase(ctx, server, stream)
    earliest = time.perf_counter() + keys / TTL_RATE * 1.2 + TTL_SETTLE
    return just_before_beat(phase, earliest)


# -- load ---------------------------------------------------------------------------


def write_expiring(
    ctx: Context, primary: Server, backup: Server, first: int, stop: int, target: float
) -> dict[str, Any]:
    """Keys ``first .. stop-1`` with ttl = ``target`` - now, to both collectors.

    Paced at ``TTL_RATE`` (below what the server applies), so each KVSET is
    applied within about a millisecond of being sent and its deadline (the
    server adds the ttl to its arrival time) falls on ``target``.
    """
    feeder = Feeder(ctx, [primary.port, backup.port], primary.port, b"ttl")
    try:
        if not feeder.probe():
            raise RuntimeError("the ttl writer's probe never came back")
        base = server_sequence(ctx, primary.port, 5.0)
        if base is None:
            raise RuntimeError("no KTHXBAI before the ttl writes")
        count, sent = stop - first, 0
        uuids = os.urandom(16 * count)
        send, clock = feeder.send, time.perf_counter
        began = clock()
        for _ in range(count + int(4 * count / TTL_RATE / 0.0005) + 10):
            due = min(count, int((clock() - began) * TTL_RATE) + 1)
            for i in range(sent, due):
                ttl = b"ttl=%.6f\n" % (target - clock())
                send(
                    [
                        data_key(first + i),
                        ZERO_SEQUENCE,
                        uuids[16 * i : 16 * i + 16],
                        ttl,
                        VALUE,
                    ]
                )
            sent = due
            if sent >= count:
                break
            time.sleep(max(began + sent / TTL_RATE - clock(), 0.0005))
        seconds = clock() - began
        applied = hugz_sequence(ctx, primary, base + count, WAIT)
    finally:
        feeder.close()
    return {
        "keys": count,
        "seconds": round(seconds, 3),
        "rate": round(count / seconds),
        "sequence": applied,
        "settled_s_before_deadline": round(target - time.perf_counter(), 3),
    }


def hold_on_backup(ctx: Context, backup: Server, count: int) -> dict[str, Any]:
    """``count`` KVSETs to the backup's collector only: its pending list."""
    pub = socket(ctx, zmq.PUB, SNDHWM=0)
    pub.connect(tcp(backup.port + 2))
    try:
        time.sleep(0.5)  # the collector's subscription reaches our PUB
        send = frame_sender(pub)
        began = time.perf_counter()
        for frames in build_updates(count, 0, count):
            send(frames)
        held = None
        for _ in range(int(WAIT / STATUS_EVERY) + 2):
            time.sleep(STATUS_EVERY)
            held = status_figure(backup, "pending")
            if held is not None and held >= count:
                break
            if time.perf_counter() - began > WAIT:
                break
        seconds = time.perf_counter() - began
    finally:
        pub.close(0)
    if held is None or held < count:
        raise RuntimeError(f"the backup holds {held} of {count} pending writes")
    return {"sent": count, "pending": held, "seconds": round(seconds, 3)}


def wait_expired(
    ctx: Context, primary: Server, writes: dict[str, Any], count: int, target: float
) -> dict[str, Any]:
    """Until a HUGZ shows the ``count`` deletes published (bounded)."""
    wanted = writes["sequence"] + count
    sequence = hugz_sequence(ctx, primary, wanted, WAIT)
    return {
        "all_deleted": sequence is not None and sequence >= wanted,
        "hugz_showed_it_s_after_deadline": round(time.perf_counter() - target, 3),
    }


def hugz_sequence(
    ctx: Context, server: Server, wanted: int, timeout: float
) -> int | None:
    """The sequence of the first HUGZ at or past ``wanted`` (None: timeout)."""
    sub = socket(ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, HUGZ)
    sub.connect(tcp(server.port + 1))
    deadline = time.monotonic() + timeout
    try:
        for _ in range(int(timeout * 10) + 10):
            left = deadline - time.monotonic()
            if left <= 0 or not sub.poll(min(int(left * 1000) + 1, 100), zmq.POLLIN):
                if left <= 0:
                    return None
                continue
            sequence = SEQUENCE.unpack(sub.recv_multipart()[1])[0]
            if sequence >= wanted:
                return int(sequence)
        return None
    finally:
        sub.close(0)


def deadlines(
    ctx: Context, port: int, first: int, stop: int, target: float, samples: int = 21
) -> dict[str, Any]:
    """Where the deadlines of keys ``first .. stop-1`` fell, from a sample.

    For each sampled key a snapshot of that key alone (a 16-byte key is a
    subtree of one): the server sends its remaining ttl as of the moment it
    sends, so the deadline is about the reply's arrival + that ttl (within
    the loopback transit).  Reported relative to ``target``, in ms.
    """
    dealer = socket(ctx, zmq.DEALER)
    dealer.connect(tcp(port))
    offsets = []
    try:
        for j in range(samples):
            key = data_key(first + (stop - 1 - first) * j // (samples - 1))
            dealer.send_multipart([ICANHAZ, key])
            for _ in range(3):
                if not dealer.poll(10_000, zmq.POLLIN):
                    break
                frames = dealer.recv_multipart()
                arrived = time.perf_counter()
                if frames[0] == KTHXBAI:
                    break
                for line in frames[3].split(b"\n"):
                    if line.startswith(b"ttl="):
                        offsets.append(arrived + float(line[4:]) - target)
    finally:
        dealer.close(0)
    if not offsets:
        return {"sampled": 0, "spread_ms": None}
    return {
        "sampled": len(offsets),
        "spread_ms": round((max(offsets) - min(offsets)) * 1e3, 1),
        "after_target_ms": [round(min(offsets) * 1e3, 1), round(max(offsets) * 1e3, 1)],
    }


def status_figure(server: Server, name: str, default: int | None = None) -> int | None:
    """A figure from the server's last status line (``--status-interval``)."""
    lines = [line for line in server.log().splitlines() if " status {" in line]
    if not lines:
        return default
    marker = f"'{name}': "
    tail = lines[-1].partition(marker)[2]
    digits = tail[: len(tail) - len(tail.lstrip("0123456789"))]
    return int(digits) if digits else default


def sleep_until(moment: float) -> None:
    time.sleep(max(moment - time.perf_counter(), 0.0))


# -- analysis -------------------------------------------------------------------------


def analyse(
    seen: dict[str, Any], measured: str, start: float, end: float
) -> dict[str, Any]:
    """Lateness of the measured server's HUGZ and heartbeat in [start, end]."""
    arrivals = seen["arrivals"]
    other = "primary" if measured == "backup" else "backup"
    beats = arrivals[f"{measured}.state"]
    hugz = [t for t, _ in arrivals[f"{measured}.hugz"]]
    if measured == "backup":  # HUGZ are due from when it announces ACTIVE
        active = [t for t, state in beats if t > start and state == 3]
        hugz = ([active[0]] + [t for t in hugz if t > active[0]]) if active else []
    result: dict[str, Any] = {
        "measured": measured,
        "window_s": round(end - start, 3),
        "hugz": lateness(hugz, INTERVAL, start, end),
        "heartbeat": lateness([t for t, _ in beats], INTERVAL, start, end),
        "states": {
            role: states(arrivals[f"{role}.state"], start, end)
            for role in ("primary", "backup")
        },
        "observer_own_worst_ms": own_lateness(seen["own_late"], start, end),
        "observer_nice": seen["nice"],
    }
    if measured == "primary":  # the passive's heartbeat, for information
        peer = [t for t, _ in arrivals[f"{other}.state"]]
        result["peer_heartbeat"] = lateness(peer, INTERVAL, start, end)
    hugz_gap = result["hugz"].get("max_gap_s") or 0.0
    beat_gap = result["heartbeat"].get("max_gap_s") or 0.0
    result["client_silence_passed"] = hugz_gap > CLIENT_SILENCE
    result["peer_expiry_passed"] = beat_gap > PEER_EXPIRY
    result["false_failover"] = false_failover(result["states"], measured)
    result["pass"] = bool(result["hugz"]["pass"] and result["heartbeat"]["pass"])
    return result


def false_failover(seen: dict[str, Any], measured: str) -> bool:
    """Any state change but the takeover the scenario asked for."""
    if measured == "backup":  # expected: the backup PASSIVE -> ACTIVE, once
        changes = seen["backup"]["changes"]
        return [(c["from"], c["to"]) for c in changes] != [(4, 3)]
    return any(seen[role]["changes"] for role in seen) or (
        seen["primary"]["after"],
        seen["backup"]["after"],
    ) != (3, 4)


def combine(runs: list[dict[str, Any]], title: str) -> dict[str, Any]:
    """A scenario's figures: each stream's worst run; every run kept."""

    def worst(stream: str) -> dict[str, Any]:
        figures = [run[stream] for run in runs]
        return max(
            figures, key=lambda f: math.inf if f["worst_ms"] is None else f["worst_ms"]
        )

    result: dict[str, Any] = {
        "title": title,
        "measured": runs[0]["measured"],
        "hugz": worst("hugz"),
        "heartbeat": worst("heartbeat"),
    }
    if all("peer_heartbeat" in run for run in runs):
        result["peer_heartbeat"] = worst("peer_heartbeat")
    for flag in ("false_failover", "client_silence_passed", "peer_expiry_passed"):
        result[flag] = any(run[flag] for run in runs)
    result["pass"] = all(run["pass"] for run in runs)
    result["observer_own_worst_ms"] = max(run["observer_own_worst_ms"] for run in runs)
    result["runs"] = runs
    return result


# -- the table ----------------------------------------------------------------------


def render(results: dict[str, Any]) -> str:
    lines = [
        f"trioclone HUGZ / heartbeat lateness ({results['mode']} mode, "
        f"commit {results.get('trioclone_commit')}, {results.get('cpus')} CPUs, "
        f"load {results.get('load_before')} -> {results.get('load_after')})",
        f"target: never more than {results['target_pct']:.0f}% of the "
        f"{results['interval']:g} s interval late; lateness = gap - interval",
        f"this machine: time.sleep(1 ms) late by p50 "
        f"{results['timer_lateness']['p50_ms']:.2f} / p99 "
        f"{results['timer_lateness']['p99_ms']:.2f} / max "
        f"{results['timer_lateness']['max_ms']:.2f} ms",
        "",
        f"{'scenario':<40}{'stream':<11}{'gaps':>5}{'worst ms (%)':>17}"
        f"{'p99 ms (%)':>17}{'max gap':>9}  result",
    ]
    for name, run in results["scenarios"].items():
        label = (
            f"{name}. {run['title']}"
            if name != "baseline"
            else f"baseline ({run['title']})"
        )
        rows = [("HUGZ", run["hugz"]), ("heartbeat", run["heartbeat"])]
        if "peer_heartbeat" in run:
            rows.append(("passive hb", run["peer_heartbeat"]))
        for i, (stream, figures) in enumerate(rows):
            verdict = ("PASS" if figures["pass"] else "FAIL") if i < 2 else "(info)"
            lines.append(
                f"{label if i == 0 else '':<40}{stream:<11}{figures['gaps']:>5}"
                f"{pct(figures, 'worst'):>17}{pct(figures, 'p99'):>17}"
                f"{gap(figures):>9}  {verdict}"
            )
        for i, each in enumerate(run["runs"]):
            lines.append(
                textwrap.fill(
                    f"run {i + 1}: {notes(each)}",
                    width=100,
                    initial_indent=" " * 4,
                    subsequent_indent=" " * 6,
                )
            )
    for name, error in results["errors"].items():
        lines.append(f"ERROR in {name}: {error.strip().splitlines()[-1]}")
    return "\n".join(lines)


def pct(figures: dict[str, Any], which: str) -> str:
    ms = figures.get(f"{which}_ms")
    if ms is None:
        return "-"
    return f"{ms:,.1f} ({figures[f'{which}_pct']:.1f}%)"


def gap(figures: dict[str, Any]) -> str:
    value = figures.get("max_gap_s")
    if value is None:
        return "-"
    return f"{value:.2f} s" + ("+" if figures.get("open_gap_s") == value else "")


def notes(run: dict[str, Any]) -> str:
    seen = run["states"]
    parts = [
        f"HUGZ {fmt_ms(run['hugz'])}, heartbeat {fmt_ms(run['heartbeat'])} late",
        "states "
        + ", ".join(
            f"{role} {state_name(seen[role]['before'])}->{after(seen[role])}"
            for role in ("primary", "backup")
        ),
        "FALSE FAILOVER" if run["false_failover"] else "no false failover",
    ]
    if run["client_silence_passed"]:
        parts.append("HUGZ gap > 2 s client timeout")
    if run["peer_expiry_passed"]:
        parts.append("heartbeat gap > 2 s peer expiry")
    if "aligned_to" in run:
        parts.append(
            f"work timed {ALIGN_EARLY * 1e3:.0f} ms before a {run['aligned_to']}"
        )
    parts.append(f"observer's own worst wake-up {run['observer_own_worst_ms']} ms")
    parts.append("load {} -> {}".format(*run["load"]))
    if "deadline_spread" in run:
        spread = run["deadline_spread"]["spread_ms"]
        parts.append(f"deadlines within {spread} ms")
        if spread is None or spread > SPREAD_LIMIT:
            parts.append("DEADLINES NOT AT ONCE")
    if "expiry" in run:
        parts.append(
            "all deletes published"
            if run["expiry"]["all_deleted"]
            else "DELETES MISSING"
        )
    if "takeover" in run:
        t = run["takeover"]
        parts.append(
            f"{t['replayed']:,} of {run['held']['pending']:,} pending replayed, "
            f"{t['votes']} vote(s) from {t['first_vote_s_after_kill']} s after the "
            f"kill, answered {t['answered_s_after_vote']} s after the first"
        )
        active = [c["at_s"] for c in seen["backup"]["changes"] if c["to"] == 3]
        parts.append(
            "ACTIVE announced "
            + (f"{active[0] - t['first_vote_at_s']:.3f} s" if active else "never")
            + " after the first vote"
        )
    if "snapshots" in run:
        s = run["snapshots"]
        took = "-" if s["seconds"] is None else f"{s['seconds']:.1f}"
        parts.append(f"{s['finished']}/{s['clients']} snapshots in {took} s")
        if s.get("running_at_deadline") is False:
            parts.append("SNAPSHOTS NOT RUNNING AT THE DEADLINE")
    return "; ".join(parts)


def fmt_ms(figures: dict[str, Any]) -> str:
    ms = figures.get("worst_ms")
    return "-" if ms is None else f"{ms:,.1f} ms"


def state_name(state: int | None) -> str:
    return "?" if state is None else STATE_NAMES.get(state, str(state))


def after(seen: dict[str, Any]) -> str:
    """The last state heard, or "silent" if none came for a peer expiry."""
    heard = seen["last_heard_s"]
    return (
        "silent" if heard is None or heard > PEER_EXPIRY else state_name(seen["after"])
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description="HUGZ and heartbeat lateness under load."
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes, a few minutes"
    )
    parser.add_argument("--json", action="store_true", help="print JSON, not the table")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench-results/lateness.json"),
        help="JSON results (the table beside it, .txt)",
    )
    parser.add_argument(
        "--logs",
        type=Path,
        default=Path("bench-results/logs/lateness"),
        help="server logs",
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every server is still stopped by PID
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results = Lateness(QUICK if args.quick else FULL, args.logs).run()
    text = render(results)
    print(json.dumps(results, indent=2) if args.json else text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".txt").write_text(text + "\n")
    print(f"written: {args.out} and {args.out.with_suffix('.txt')}", file=sys.stderr)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
