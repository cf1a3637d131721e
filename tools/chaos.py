"""Chaos: SIGKILL and restart the servers of a pair under load, then check.

    python tools/chaos.py [--cycles N] [--seed S] [--modes active,passive,both]
    nox -s chaos -- --cycles 50 --seed 7
    python tools/chaos.py --analyse FOLDER   # check a run kept (--keep) again

What runs (all on 127.0.0.1, in a temporary folder, on free ports below the
kernel's ephemeral range, which a restarted server could find taken):

* a primary and a backup ``trioclone serve`` process (``--status-interval
  0.5``, ``--heartbeat``/``--hugz`` 0.5 s unless told), each with a
  ``--data-dir`` of its own when the server has durable maps;
* client processes, each its own Python process (``tools/chaos.py _writer``
  or ``_watcher``), so the checker never starves a client:
  - ``--writers`` writers (3) using confirmed ``set`` (the blocking client,
    ``trioclone.connect``) on hot keys, /chaos/k00../chaos/k40 and
    /chaos/sub/s00../chaos/sub/s09, each written over within a second or
    so, and (``--rare-share``, a fifth of the writes) on 300 rare keys,
    /chaos/r000../chaos/r239 and /chaos/sub/r00../chaos/sub/r59, each
    written about every half minute, so that a lost write stays in sight;
    every value is unique ("w1-123").  Each write is a line of
    ``w1.jsonl``: the time it was issued, and the sequence and time it was
    confirmed, or (``WriteTimeoutError``) the time the writer gave up on it;
  - a whole-map watcher and a subtree watcher (/chaos/sub/): Trio clients
    (``open_client``) that rebuild the map from ``watch(prefix,
    state=True)``;
  at the end every client dumps its own map (and a watcher its rebuilt map)
  to ``NAME.state.json``;
* here, a thread with a raw SUB on each server's publisher that records
  every HUGZ and update and when it arrived.

Then, ``--cycles`` times, drawing from ``random.Random(--seed)``: let the
writers run for a random while (0.5 s to ``--max-run``), SIGKILL the active,
the passive or both (both: killed in a random order, up to 0.3 s apart,
restarted in a random order with a random gap of up to ``--max-down``),
restart after a random down time (up to ``--max-down``), and wait (at most
``--health-timeout``) until the pair is healthy: one server's status line
says ACTIVE and it answers a snapshot; the other's says PASSIVE, it logged
"synced from the active" (and no failed sync since), and one of its status
lines, logged after that snapshot, shows the active's lineage at a sequence
at least the snapshot's.  With ``--impatient P`` a cycle skips that wait
with chance P, so the next kill may come during a restart, a sync or a
hand-over (durable maps only).  Killing both needs durable maps (``serve
--data-dir``); without them only one server is killed at a time (the
restarted one resyncs from its peer); ``--in-memory`` runs them so.  The
seed fixes the schedule (modes, waits, down times, the keys each writer
writes), not the timing of the processes, so a failing seed may pass when
run again.

At the end: stop the writers, wait until the pair is healthy and the
active's sequence stays put, take a snapshot from the active, and check
(all times are one clock: ``time.monotonic``, the same in every process of
this host):

(a) Confirmed writes are kept.  A write w to key K (issued at i_w,
    confirmed at c_w with sequence s_w) is
    - kept: the active's map holds w's value at K;
    - superseded: K holds the value of a write x that may have been applied
      after w: x was confirmed after w was issued (c_x > i_w: x came later,
      or the two overlapped and may be ordered either way), or x was never
      confirmed and its writer gave up on it less than 2 s before w was
      issued (the passive may still replay it from its pending list, but
      never over a write that reached it more than 1 s after it: README, "A
      takeover does not undo a newer write");
    - lost: otherwise.  K absent (nobody deletes, nothing has a TTL), K
      holding a value no writer wrote, or K holding a write that was
      confirmed (or given up on, 2 s) before w was even issued: the map went
      back to an older write, so w was lost (or x applied twice).
    Sequences alone do not order writes: a takeover starts a new branch of
    the lineage at the sequence the passive had heard and replays the
    writes it held in the order they reached it, so writes confirmed at
    s_x < s_w may legitimately end in the other order (counted as
    "reordered", not lost).
    The same rule is applied as the map goes, to what the servers published
    (seen by the raw SUBs).  At each takeover, the newest confirmed write to
    each key that the old active had published beyond the new active's
    branch point (a "rewind": the passive had not heard it) is followed
    until it is back: published again (replayed at the takeover, or "back
    later": the killed server's hand-over at its restart), or in the map of
    a restarted active that goes on with its history.  Once nothing more
    can bring it back (with durable maps, ``--handover-grace``, 5 s, after
    the server that had it started again and ran that long; without them,
    once the takeover is done), a write not back is judged on what its key
    holds then, by the rule above: lost, unless it holds a write that may
    follow it.  That write may have been issued after the takeover
    ("overwritten before back"), or published before it where both were
    published, an overlapping write replayed over it ("REORDERED"): both
    are printed, not failures (the key showed an older value meanwhile, the
    asynchronous replication the README admits).  A write still waiting at
    the end is judged then.
    A new lineage is the map lost: a failure by itself, and a write it
    dropped must be in what the new map published first.  A sequence the
    SUBs never saw (a SIGKILLed server's last messages, which its map on
    disk may hold) is an unknown position, not checked.
(b) Maps are equal: each writer's map, each watcher's own map and the map
    it rebuilt from its events equal the active's (the subtree watcher's,
    the active's under /chaos/sub/), and the passive's last status line shows
    the active's lineage, sequence and key count.
(c) Sequences: within one history (a lineage and the branch its active
    period started from, as the HUGZ name them) a server's updates have
    strictly increasing sequences and its HUGZ never go back; over all
    servers, a history's HUGZ never go back and no two different updates
    share a sequence; and the updates of the active's history, rebuilt into
    a map, give the active's final map (values and sequences; a key last
    written at a sequence the SUBs did not see is taken as it is).  Rewinds
    (a new branch below what the lineage had published) are counted and
    are not failures by themselves.
(d) No process crashed: every server exit was a SIGKILL of ours or the
    SIGTERM at the end (exit 0), no log holds a traceback, every client
    exited 0.

The last line gives the figures, ``cycles 50, confirmed 12345, lost 0, maps
equal, ...``; the exit status is 0 only if nothing was lost, the maps are
equal, the sequence checks hold, nothing crashed and the pair became healthy
after every cycle.  On failure the folder (logs, write records, dumps) is
kept and named.  Every wait is bounded; every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import ast
import bisect
import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from tests.integration.procs import (  # noqa: E402
    HOST,
    HUGZ,
    ICANHAZ,
    KTHXBAI,
    Processes,
    ServerProcess,
    decode,
    free_base_ports,
    recv,
    tcp,
)

TOOL = Path(__file__).resolve()
KEYS = [f"/chaos/k{i:02d}" for i in range(41)]
SUBTREE = "/chaos/sub/"
SUB_KEYS = [f"{SUBTREE}s{i:02d}" for i in range(10)]
SUB_SHARE = 0.25  # of the writes to hot keys go to the subtree
#: Keys written seldom (each every half a minute or so): a write lost on one
#: stays visible, where a hot key is written over within a second.
RARE_KEYS = [f"/chaos/r{i:03d}" for i in range(240)] + [
    f"{SUBTREE}r{i:02d}" for i in range(60)
]
UNCONFIRMED_SLACK = 2.0  # s: an unconfirmed write may be applied this late
STATUS_INTERVAL = 0.5
STATE_EVERY = 0.25  # s between a stopped client's dumps
SUBTREE_HUGZ = b"\x00HUGZ"
MAX_SHOWN = 25  # lost writes, differences... printed in full


def now() -> float:
    return time.monotonic()


def dump_json(path: Path, data: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


# == client processes ==========================================================


def _client_args(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"chaos.py {prog}")
    parser.add_argument("--name", required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--server", action="append", required=True)
    parser.add_argument("--deadline", type=float, required=True)  # monotonic
    return parser


class Control:
    """The orchestrator's signals to a client: files in the run's folder."""

    def __init__(self, folder: Path, deadline: float) -> None:
        self.stop = folder / "stop-writing"
        self.leave = folder / "exit"
        self.deadline = deadline
        self.parent = os.getppid()

    def over(self) -> bool:
        """Time to leave: told to, past the deadline, or orphaned."""
        return (
            self.leave.exists() or now() > self.deadline or os.getppid() != self.parent
        )


def writer_main(argv: list[str]) -> int:
    parser = _client_args("_writer")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--write-timeout", type=float, required=True)
    parser.add_argument("--rare-share", type=float, required=True)
    args = parser.parse_args(argv)
    import trioclone

    rng = random.Random(args.seed)
    control = Control(args.dir, args.deadline)
    state = args.dir / f"{args.name}.state.json"
    written = 0
    with (
        (args.dir / f"{args.name}.jsonl").open("a") as out,
        trioclone.connect(args.server, sync_timeout=60.0) as clone,
    ):
        next_at = now()
        while not control.stop.exists() and not control.over():
            written += 1
            if rng.random() < args.rare_share:
                key = rng.choice(RARE_KEYS)
            elif rng.random() < SUB_SHARE:
                key = rng.choice(SUB_KEYS)
            else:
                key = rng.choice(KEYS)
            value = f"{args.name}-{written}"
            record: dict[str, Any] = {"key": key, "value": value, "issued": now()}
            try:
                sequence = clone.set(key, value, timeout=args.write_timeout)
            except trioclone.WriteTimeoutError:
                record.update(seq=None, confirmed=None, ended=now())
            else:
                done = now()
                record.update(seq=sequence, confirmed=done, ended=done)
            out.write(json.dumps(record) + "\n")
            out.flush()
            next_at = max(next_at + rng.uniform(0.5, 1.5) / args.rate, now())
            while now() < next_at:
                time.sleep(min(next_at - now(), 0.05))
        while True:
            dump_json(
                state,
                {
                    "name": args.name,
                    "writing": False,
                    "writes": written,
                    "synced": clone.synced,
                    "sequence": clone.sequence,
                    "failovers": clone.failovers,
                    "map": {k: text(v) for k, v in clone.items("")},
                },
            )
            if control.over():
                break
            time.sleep(STATE_EVERY)
    return 0


def watcher_main(argv: list[str]) -> int:
    parser = _client_args("_watcher")
    parser.add_argument("--subtree", default="")
    args = parser.parse_args(argv)
    import trio

    trio.run(_watch, args)
    return 0


async def _watch(args: argparse.Namespace) -> None:
    import trio

    import trioclone

    control = Control(args.dir, args.deadline)
    state = args.dir / f"{args.name}.state.json"
    rebuilt: dict[str, bytes] = {}
    counts: Counter[str] = Counter()
    async with trioclone.open_client(args.server, args.subtree) as clone:
        with trio.move_on_after(60):
            await clone.wait_synced()
        watch = clone.watch(args.subtree, state=True)

        async def consume() -> None:
            async for event in watch:
                if isinstance(event, trioclone.ResyncEvent):
                    counts["resyncs"] += 1
                    for key, value in event.changes.items():
                        if value is None:
                            rebuilt.pop(key, None)
                        else:
                            rebuilt[key] = value
                elif isinstance(event, trioclone.SetEvent):
                    counts["sets"] += 1
                    rebuilt[event.key] = event.value
                else:
                    counts["deletes"] += 1
                    rebuilt.pop(event.key, None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consume)
            while True:
                stopping = control.stop.exists()
                if stopping or control.over():
                    dump_json(
                        state,
                        {
                            "name": args.name,
                            "subtree": args.subtree,
                            "synced": clone.synced,
                            "sequence": clone.sequence,
                            "failovers": clone.failovers,
                            "events": dict(counts),
                            "map": {k: text(v) for k, v in clone.items(args.subtree)},
                            "rebuilt": {k: text(v) for k, v in rebuilt.items()},
                        },
                    )
                if control.over():
                    break
                await trio.sleep(STATE_EVERY if stopping else 1.0)
            nursery.cancel_scope.cancel()


# == the orchestrator's view of the servers ========================================


class LogTail:
    """New complete lines of a growing log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def poll(self) -> list[str]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *complete, self.partial = (self.partial + data).split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]


def parse_status(line: str) -> dict[str, Any] | None:
    """The dict of a ``status {...}`` log line."""
    at = line.find(" status {")
    if at < 0:
        return None
    try:
        value = ast.literal_eval(line[at + len(" status ") :])
    except (ValueError, SyntaxError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Server:
    name: str  # "primary" or "backup"
    port: int
    state_port: int
    data_dir: Path
    proc: ServerProcess | None = None
    tail: LogTail | None = None
    starts: list[float] = field(default_factory=list)
    ends: dict[int, float] = field(default_factory=dict)  # process -> killed at
    statuses: list[dict[str, Any]] = field(default_factory=list)  # this process's
    synced_line: int = -1  # index of the last "synced from the active" line
    retry_line: int = -1  # index of the last failed-sync warning
    lines: int = 0

    @property
    def latest(self) -> dict[str, Any]:
        return self.statuses[-1] if self.statuses else {}

    @property
    def synced(self) -> bool:
        return self.synced_line > self.retry_line


@dataclass
class Snap:
    entries: dict[str, tuple[int, str]]  # key -> (sequence, value)
    sequence: int
    lineage: str | None
    branch: int | None


def snapshot(
    ctx: zmq.Context[zmq.Socket[bytes]], port: int, timeout: float
) -> Snap | None:
    """A whole-map snapshot (a Binary Star vote too: ask only the active)."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(tcp(port))
        dealer.send_multipart([ICANHAZ, b""])
        entries: dict[str, tuple[int, str]] = {}
        deadline = now() + timeout
        for _ in range(10_000_000):
            frames = recv(dealer, deadline - now())
            if frames is None:
                return None
            kv = decode(frames)
            if kv.key == KTHXBAI:
                branch = kv.properties.get("branch")
                return Snap(
                    entries,
                    kv.sequence,
                    kv.properties.get("lineage"),
                    int(branch) if branch and branch.isdigit() else None,
                )
            entries[text(kv.key)] = (kv.sequence, text(kv.body))
        return None
    finally:
        dealer.close(linger=0)


@dataclass(frozen=True)
class Seen:
    """One message from a server's publisher, as the raw SUB got it."""

    t: float
    server: str
    hugz: bool
    seq: int
    lineage: str | None = None
    branch: int | None = None
    key: str = ""
    value: str = ""


class Observer:
    """A thread with a raw SUB on each server's publisher."""

    def __init__(self, ports: dict[str, int]) -> None:
        self.ports = ports
        self.seen: list[Seen] = []
        self.malformed: list[str] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="observer", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        names: dict[zmq.Socket[bytes], str] = {}
        try:
            poller = zmq.Poller()
            for name, port in self.ports.items():
                sock = ctx.socket(zmq.SUB)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, 0)
                sock.setsockopt(
                    zmq.RECONNECT_IVL, 10
                )  # a restarted server publishes at once
                sock.setsockopt(zmq.SUBSCRIBE, b"")
                sock.connect(tcp(port + 1))
                poller.register(sock, zmq.POLLIN)
                names[sock] = name
            self._ready.set()
            while not self._stop.is_set():
                for sock, _ in poller.poll(100):
                    for _ in range(10_000):
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._record(now(), names[sock], frames)
        finally:
            for sock in names:
                sock.close(linger=0)
            ctx.term()

    def _record(self, t: float, server: str, frames: list[bytes]) -> None:
        try:
            kv = decode(frames)
        except (AssertionError, ValueError, struct.error) as exc:
            self.malformed.append(f"{server}: {exc}")
            return
        if kv.key == HUGZ:
            branch = kv.properties.get("branch")
            self.seen.append(
                Seen(
                    t,
                    server,
                    True,
                    kv.sequence,
                    kv.properties.get("lineage"),
                    int(branch) if branch and branch.isdigit() else None,
                )
            )
        elif not kv.key.endswith(SUBTREE_HUGZ):
            self.seen.append(
                Seen(
                    t, server, False, kv.sequence, key=text(kv.key), value=text(kv.body)
                )
            )


# == the run ================================================================


def pick_ports() -> tuple[int, int, int, int]:
    """Two base ports P (P to P+2 free) and two Binary Star ports, below the
    kernel's range of ephemeral ports when there is room (else from
    ``free_base_ports``).  A server restarted on a port of that range can
    find it taken by an outgoing connection: even by its peer's connection
    to it, which meets itself (a TCP self-connect) while nothing listens
    there, and holds the port."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    if low < 12_000:
        p1, p2 = free_base_ports(2)
        s1, s2 = free_base_ports(2, span=1)
        return p1, p2, s1, s2
    pick = random.Random()  # not the schedule's: ports do not change what runs
    bases: list[int] = []
    for _ in range(10_000):
        base = pick.randrange(10_000, low - 3)
        if any(abs(base - b) < 3 for b in bases):
            continue
        if all(_bindable(p) for p in range(base, base + 3)):
            bases.append(base)
            if len(bases) == 4:
                return bases[0], bases[1], bases[2], bases[3]
    raise RuntimeError("no free ports on 127.0.0.1")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def has_durable_maps() -> bool:
    """Does ``trioclone serve`` know ``--data-dir`` (durable maps)?"""
    help_text = subprocess.run(
        [sys.executable, "-m", "trioclone", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    return "--data-dir" in help_text


@dataclass
class Client:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    subtree: str | None  # None: a writer
    told_to_exit: bool = False


class Chaos:
    """One run: the servers, the clients, the cycles, the checks."""

    def __init__(self, args: argparse.Namespace, folder: Path, durable: bool) -> None:
        self.args = args
        self.folder = folder
        self.durable = durable
        self.rng = random.Random(args.seed)
        self.t0 = now()
        (folder / "logs").mkdir()
        self.procs = Processes(folder / "logs")
        p1, p2, s1, s2 = pick_ports()
        self.servers = {
            "primary": Server("primary", p1, s1, folder / "data-primary"),
            "backup": Server("backup", p2, s2, folder / "data-backup"),
        }
        self.endpoints = [tcp(p1), tcp(p2)]
        self.clients: list[Client] = []
        self.killed: set[int] = set()  # PIDs we SIGKILLed
        self.timeline: list[tuple[float, str]] = []
        self.crashes: list[str] = []
        self.crashed: Counter[str] = Counter()  # by server
        self.unhealthy: list[str] = []
        self.modes: Counter[str] = Counter()
        self.impatient = 0  # cycles that did not wait for health
        self.guess = random.Random(args.seed + 1)  # (timing decides when it is used)
        self.cycles_done = 0
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.observer = Observer({n: s.port for n, s in self.servers.items()})
        self.deadline = (
            self.t0
            + 120
            + args.cycles * (args.max_run + 2 * args.max_down + args.health_timeout + 5)
        )

    def note(self, message: str) -> None:
        self.timeline.append((now(), message))
        if self.args.verbose:
            print(f"{now() - self.t0:8.2f} {message}", flush=True)

    def close(self) -> None:
        """Stop every process we started, by PID (idempotent)."""
        for client in self.clients:
            _stop_popen(client.popen)
        self.procs.stop_all()
        self.observer.stop()
        self.ctx.destroy(linger=0)

    # -- servers --

    def server_args(self, name: str) -> list[str]:
        me = self.servers[name]
        peer = self.servers["backup" if name == "primary" else "primary"]
        args = [
            "--role",
            name,
            "--bind",
            HOST,
            "--peer",
            HOST,
            "--port",
            str(me.port),
            "--peer-port",
            str(peer.port),
            "--state-port",
            str(me.state_port),
            "--peer-state-port",
            str(peer.state_port),
            "--heartbeat",
            str(self.args.heartbeat),
            "--hugz",
            str(self.args.hugz),
            "--status-interval",
            str(STATUS_INTERVAL),
        ]
        if self.args.in_memory:
            args += ["--in-memory"]
        elif self.durable:
            args += ["--data-dir", str(me.data_dir)]
            if self.args.fsync:
                args += ["--fsync", self.args.fsync]
        return args + list(self.args.server_arg)

    def start(self, name: str, why: str = "") -> None:
        server = self.servers[name]
        server.starts.append(now())
        server.proc = self.procs.start(name, *self.server_args(name), port=server.port)
        server.tail = LogTail(server.proc.log_path)
        server.statuses, server.lines = [], 0
        server.synced_line = server.retry_line = -1
        self.note(f"started {name} (pid {server.proc.pid}){why}")

    def kill(self, name: str, why: str) -> None:
        server = self.servers[name]
        proc = server.proc
        assert proc is not None
        self.poll()  # a process that died on its own is a crash, not a kill
        if proc.alive:
            self.killed.add(proc.pid)
            server.ends[len(server.starts) - 1] = now()
            self.procs.kill(proc, signal.SIGKILL)
        self.note(f"SIGKILL {name} (pid {proc.pid}, {why})")

    def poll(self) -> None:
        """Read the logs; catch servers and clients that died on their own."""
        for server in self.servers.values():
            if server.proc is None or server.tail is None:
                continue
            for line in server.tail.poll():
                status = parse_status(line)
                if status is not None:
                    server.statuses.append(status)
                elif "synced from the active" in line:
                    server.synced_line = server.lines
                elif "connecting again" in line:
                    server.retry_line = server.lines
                server.lines += 1
            proc = server.proc
            if not proc.alive and proc.pid not in self.killed:
                self.killed.add(proc.pid)  # reported once
                server.ends[len(server.starts) - 1] = now()
                code = proc.popen.returncode
                self.crashes.append(
                    f"{server.name} (pid {proc.pid}) exited on its own with code "
                    f"{code}; its log ends:\n{_tail(proc.log(), 1500)}"
                )
                self.crashed[server.name] += 1
                if self.crashed[server.name] > 3:
                    self.note(f"{server.name} died on its own (code {code}) again")
                    continue
                self.note(f"{server.name} died on its own (code {code}): restarting")
                self.start(server.name, " after a crash")
        for client in self.clients:
            code = client.popen.poll()
            if code is not None and not client.told_to_exit:
                client.told_to_exit = True  # reported once
                self.crashes.append(
                    f"client {client.name} exited on its own with code {code}; its "
                    f"output ends:\n{_tail(_read(client.log), 1500)}"
                )

    def sleep(self, seconds: float) -> None:
        """Sleep, watching the processes."""
        until = now() + seconds
        while (left := until - now()) > 0:
            time.sleep(min(left, 0.1))
            self.poll()

    def guess_roles(self) -> tuple[str, str]:
        """(active, passive) as the last status lines say, when the pair may
        not be healthy: a server that says ACTIVE, else either."""
        self.poll()
        active = [
            n for n, s in self.servers.items() if s.latest.get("state") == "ACTIVE"
        ]
        name = (
            active[0] if len(active) == 1 else self.guess.choice(sorted(self.servers))
        )
        return name, "backup" if name == "primary" else "primary"

    def wait_healthy(self, timeout: float) -> tuple[str, str] | None:
        """(active, passive) once the pair is healthy; None after ``timeout``."""
        deadline = now() + timeout
        mark: tuple[str, Snap, int] | None = None
        while now() < deadline:
            self.poll()
            states = {n: s.latest.get("state") for n, s in self.servers.items()}
            active = [n for n, st in states.items() if st == "ACTIVE"]
            passive = [n for n, st in states.items() if st == "PASSIVE"]
            if len(active) == 1 and len(passive) == 1:
                a, p = active[0], passive[0]
                pas = self.servers[p]
                if mark is None or mark[0] != a:
                    snap = snapshot(self.ctx, self.servers[a].port, 1.0)
                    mark = None if snap is None else (a, snap, len(pas.statuses))
                else:
                    _, snap, index = mark
                    caught_up = any(
                        st.get("state") == "PASSIVE"
                        and st.get("lineage") == snap.lineage
                        and int(st.get("sequence", -1)) >= snap.sequence
                        for st in pas.statuses[index:]
                    )
                    if caught_up and pas.synced:
                        return a, p
            else:
                mark = None
            time.sleep(0.1)
        states = {
            n: {k: s.latest.get(k) for k in ("state", "lineage", "sequence")}
            for n, s in self.servers.items()
        }
        self.note(f"not healthy within {timeout:g} s: {states}")
        return None

    # -- clients --

    def start_clients(self) -> None:
        common = ["--dir", str(self.folder), "--deadline", str(self.deadline)]
        for server in self.endpoints:
            common += ["--server", server]
        for i in range(1, self.args.writers + 1):
            self._start_client(
                f"w{i}",
                None,
                [
                    "_writer",
                    "--name",
                    f"w{i}",
                    *common,
                    "--seed",
                    str(self.args.seed * 1000 + i),
                    "--rate",
                    str(self.args.rate),
                    "--write-timeout",
                    str(self.args.write_timeout),
                    "--rare-share",
                    str(self.args.rare_share),
                ],
            )
        for name, subtree in (("watch-all", ""), ("watch-sub", SUBTREE)):
            self._start_client(
                name,
                subtree,
                ["_watcher", "--name", name, *common, "--subtree", subtree],
            )

    def _start_client(self, name: str, subtree: str | None, argv: list[str]) -> None:
        log = self.folder / "logs" / f"client-{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, str(TOOL), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.clients.append(Client(name, popen, log, subtree))

    def client_states(self) -> dict[str, dict[str, Any]]:
        states = {}
        for client in self.clients:
            path = self.folder / f"{client.name}.state.json"
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                states[client.name] = json.loads(path.read_text())
        return states

    # -- the run --

    def run(self) -> int:
        args = self.args
        kinds = args.modes
        self.observer.start()
        self.start("primary")
        self.start("backup")
        pair = self.wait_healthy(max(args.health_timeout, 30.0))
        if pair is None:
            self.unhealthy.append("the pair never became healthy at the start")
            return self.finish(None)
        self.start_clients()
        for number in range(1, args.cycles + 1):
            active, passive = pair
            kind = self.rng.choice(kinds)
            self.sleep(self.rng.uniform(0.5, args.max_run))
            victims = {"active": [active], "passive": [passive]}.get(
                kind, [active, passive]
            )
            self.rng.shuffle(victims)
            for i, name in enumerate(victims):
                if i:
                    self.sleep(self.rng.uniform(0.0, 0.3))
                role = "active" if name == active else "passive"
                self.kill(name, f"cycle {number}: {kind}, the {role}")
            self.sleep(self.rng.uniform(0.1, args.max_down))
            order = list(victims)
            self.rng.shuffle(order)
            for i, name in enumerate(order):
                if i:
                    self.sleep(self.rng.uniform(0.0, args.max_down))
                self.start(name, f" (cycle {number})")
            self.modes[kind] += 1
            self.cycles_done = number
            if args.impatient and self.rng.random() < args.impatient:
                self.impatient += 1
                pair = self.guess_roles()
                self.note(f"cycle {number} ({kind}): not waiting for health")
                continue
            healthy = self.wait_healthy(args.health_timeout)
            if healthy is None:
                self.unhealthy.append(
                    f"cycle {number} ({kind}): not healthy within "
                    f"{args.health_timeout:g} s"
                )
                break
            pair = healthy
            self.note(f"cycle {number} ({kind}) done: {pair[0]} active")
        return self.finish(pair)

    def finish(self, pair: tuple[str, str] | None) -> int:
        args = self.args
        (self.folder / "stop-writing").touch()
        self.note("writers told to stop")
        writers = {c.name for c in self.clients if c.subtree is None}
        bound = now() + args.write_timeout + 15
        while now() < bound:
            self.poll()
            states = self.client_states()
            if all(w in states for w in writers):
                break
            time.sleep(0.1)
        final: Snap | None = None
        passive_status: dict[str, Any] | None = None
        pair = self.wait_healthy(args.health_timeout) if not self.unhealthy else None
        if pair is None and not self.unhealthy:
            self.unhealthy.append("not healthy at the end")
        if pair is not None:
            final = self.quiesce(pair[0])
            if final is None:
                self.unhealthy.append("the active's sequence never settled at the end")
        if pair is not None and final is not None:
            passive_status = self.passive_caught_up(pair[1], final)
            self.wait_clients_equal(final)
        states = self.client_states()
        for client in self.clients:
            client.told_to_exit = True
        (self.folder / "exit").touch()
        bound = now() + 15
        while now() < bound and any(c.popen.poll() is None for c in self.clients):
            time.sleep(0.1)
        self.poll()
        for client in self.clients:
            _stop_popen(client.popen)
        self.observer.stop()
        self.procs.stop_all()
        self.note("stopped everything")
        with (self.folder / "observed.jsonl").open("w") as out:
            for seen in self.observer.seen:
                out.write(json.dumps(dataclasses.asdict(seen)) + "\n")
        report = Report(self, final, pair, passive_status, states)
        code = report.show()
        self.save(final, pair, passive_status, now() - self.t0)
        return code

    def save(
        self,
        final: Snap | None,
        pair: tuple[str, str] | None,
        passive_status: dict[str, Any] | None,
        wall: float,
    ) -> None:
        """What ``--analyse`` needs to check this run again (run.json)."""
        record = {
            "t0": self.t0,
            "wall": wall,
            "durable": self.durable,
            "args": {k: v for k, v in vars(self.args).items() if k != "workdir"},
            "servers": {
                n: {"starts": s.starts, "ends": {str(k): v for k, v in s.ends.items()}}
                for n, s in self.servers.items()
            },
            "clients": [{"name": c.name, "subtree": c.subtree} for c in self.clients],
            "final": None if final is None else dataclasses.asdict(final),
            "pair": pair,
            "passive_status": passive_status,
            "crashes": self.crashes,
            "unhealthy": self.unhealthy,
            "timeline": self.timeline,
            "modes": self.modes,
            "impatient": self.impatient,
            "cycles_done": self.cycles_done,
            "malformed": self.observer.malformed,
        }
        dump_json(self.folder / "run.json", record)

    def quiesce(self, active: str) -> Snap | None:
        """The active's snapshot once its sequence stays put for 1 s."""
        port = self.servers[active].port
        bound = now() + 30
        last: Snap | None = None
        while now() < bound:
            snap = snapshot(self.ctx, port, 2.0)
            if snap is not None and last is not None and snap.sequence == last.sequence:
                return snap
            last = snap
            self.sleep(1.0)
        return None

    def passive_caught_up(self, name: str, final: Snap) -> dict[str, Any] | None:
        """The passive's first status line that shows the final map, or its
        last one after 10 s."""
        server = self.servers[name]
        index = len(server.statuses)
        bound = now() + 10
        while now() < bound:
            self.poll()
            for status in server.statuses[index:]:
                if (
                    status.get("lineage") == final.lineage
                    and status.get("sequence") == final.sequence
                    and status.get("keys") == len(final.entries)
                ):
                    return status
            time.sleep(0.1)
        return server.statuses[-1] if server.statuses else None

    def wait_clients_equal(self, final: Snap) -> None:
        bound = now() + 20
        while now() < bound:
            self.poll()
            states = self.client_states()
            if len(states) == len(self.clients) and not map_differences(final, states):
                return
            time.sleep(0.2)


def _stop_popen(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, signal.SIGTERM)
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGKILL)
            popen.wait(5)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _tail(text: str, size: int) -> str:
    return text if len(text) <= size else "..." + text[-size:]


def map_differences(final: Snap, states: dict[str, dict[str, Any]]) -> list[str]:
    """How each client's maps differ from the active's (empty: all equal)."""
    truth = {k: v for k, (_, v) in final.entries.items()}
    out = []
    for name, state in sorted(states.items()):
        subtree = state.get("subtree", "")
        expected = {k: v for k, v in truth.items() if k.startswith(subtree)}
        for field_name in ("map", "rebuilt"):
            held = state.get(field_name)
            if held is None or held == expected:
                continue
            keys = sorted(
                k
                for k in held.keys() | expected.keys()
                if held.get(k) != expected.get(k)
            )
            shown = ", ".join(
                f"{k}: {held.get(k)!r} (active {expected.get(k)!r})" for k in keys[:5]
            )
            out.append(
                f"{name} {field_name} differs from the active's at {len(keys)} keys "
                f"(client sequence {state.get('sequence')}, synced "
                f"{state.get('synced')}): {shown}"
            )
    return out


# == the analysis ============================================================


@dataclass
class Write:
    writer: str
    key: str
    value: str
    issued: float
    seq: int | None
    confirmed: float | None
    ended: float

    @property
    def ok(self) -> bool:
        return self.confirmed is not None


def may_follow(x: Write, w: Write) -> bool:
    """May write ``x`` have been applied after write ``w``?  (See (a).)"""
    if x.confirmed is not None:
        return x.confirmed > w.issued
    return x.ended + UNCONFIRMED_SLACK > w.issued


def read_writes(folder: Path, names: list[str]) -> list[Write]:
    writes = []
    for name in names:
        path = folder / f"{name}.jsonl"
        for line in _read(path).splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            writes.append(
                Write(
                    name,
                    r["key"],
                    r["value"],
                    r["issued"],
                    r["seq"],
                    r["confirmed"],
                    r["ended"],
                )
            )
    return writes


@dataclass
class Update:
    t: float
    seq: int
    key: str
    value: str
    gen: int = 0  # which process of its server published it


@dataclass
class History:
    """What one server process published in one history (lineage, branch)."""

    server: str
    gen: int
    lineage: str | None
    branch: int | None
    first: float
    last: float
    settled: float = math.inf  # first HUGZ that names the branch: taken over
    inferred: bool = False  # branch inferred from its first update
    hugz: list[tuple[float, int]] = field(default_factory=list)
    updates: list[Update] = field(default_factory=list)

    @property
    def high(self) -> int | None:
        seqs = [s for _, s in self.hugz[-1:]] + [u.seq for u in self.updates[-1:]]
        return max(seqs) if seqs else None

    @property
    def name(self) -> str:
        lineage = (self.lineage or "?")[:8]
        branch = "?" if self.branch is None else self.branch
        return f"{lineage}/{branch}"


def split_histories(
    seen: list[Seen], starts: dict[str, list[float]]
) -> tuple[list[History], list[str]]:
    """Each server process's stream cut into histories, with (c)'s
    per-process violations.

    Updates are named by the HUGZ around them: those after a HUGZ belong to
    its history; those before the first HUGZ of a history (a takeover's
    replay) to the history of the HUGZ that follows.  A HUGZ without a
    branch (sent while a takeover is in progress) continues into the first
    one with a branch.
    """
    streams: dict[tuple[str, int], list[Seen]] = defaultdict(list)
    for item in seen:
        gen = bisect.bisect_right(starts[item.server], item.t) - 1
        streams[(item.server, gen)].append(item)
    histories: list[History] = []
    violations: list[str] = []
    for (server, gen), items in streams.items():
        current: History | None = None
        loose: History | None = None  # updates not yet named by a HUGZ
        for item in items:
            if not item.hugz:
                high = current.high if current is not None else None
                if (
                    loose is None
                    and current is not None
                    and (high is None or item.seq > high)
                ):
                    current.updates.append(
                        Update(item.t, item.seq, item.key, item.value, gen)
                    )
                    current.last = item.t
                    continue
                if loose is None:
                    loose = History(server, gen, None, None, item.t, item.t)
                elif loose.updates and item.seq <= loose.updates[-1].seq:
                    violations.append(
                        f"{server} (process {gen}) published sequence {item.seq} "
                        f"after {loose.updates[-1].seq} with no HUGZ between"
                    )
                loose.updates.append(
                    Update(item.t, item.seq, item.key, item.value, gen)
                )
                loose.last = item.t
                continue
            same = (
                current is not None
                and current.lineage == item.lineage
                and not (current.branch is not None and item.branch is None)
                and (item.branch is None or current.branch in (None, item.branch))
            )
            if loose is not None and loose.updates:
                if same and current is not None:
                    violations.append(
                        f"{server} (process {gen}) went back from sequence "
                        f"{current.high} to {loose.updates[0].seq} in history "
                        f"{current.name}"
                    )
                    current.updates.extend(loose.updates)
                else:
                    current = loose
                    current.lineage, current.branch = item.lineage, item.branch
                    histories.append(current)
                    same = True
                loose = None
            if not same or current is None:
                current = History(
                    server, gen, item.lineage, item.branch, item.t, item.t
                )
                histories.append(current)
            high = current.high
            if high is not None and item.seq < high:
                violations.append(
                    f"{server} (process {gen}) sent HUGZ {item.seq} after sequence "
                    f"{high} in history {current.name}"
                )
            if current.branch is None and item.branch is not None:
                current.branch = item.branch
            if item.branch is not None and current.settled == math.inf:
                current.settled = item.t
            current.hugz.append((item.t, item.seq))
            current.last = item.t
        if loose is not None and loose.updates:
            loose.lineage = current.lineage if current is not None else None
            histories.append(loose)  # never named: a process killed early
    for history in histories:
        if history.branch is None and history.updates and history.lineage:
            history.branch = min(u.seq for u in history.updates) - 1
            history.inferred = True
    return histories, violations


@dataclass
class Dropped:
    """A confirmed write a takeover dropped (the newest to its key in what
    it dropped), until it is back or superseded."""

    write: Write
    seq: int  # where the dropped history had it
    by: History  # the history whose takeover dropped it
    kind: str  # "a rewind" or "a new lineage"
    rel: Any  # Report.rel
    holder: str  # the server that published it
    deadline: float | None  # back by then (its hand-over), if maps are durable
    last: tuple[float, str] | None = None  # last value published to its key since
    #: when its key first held a write that may follow it, since
    superseded_at: float | None = None

    def reason(self, outcome: str) -> str:
        return (
            f"published at seq {self.seq}, dropped by {self.kind} when "
            f"{self.by.server} started history {self.by.name} at "
            f"{self.rel(self.by.first)}: {outcome}"
        )


@dataclass
class Loss:
    write: Write
    reason: str


class Report:
    """The checks (a) to (d), printed; the exit status."""

    def __init__(
        self,
        chaos: Chaos,
        final: Snap | None,
        pair: tuple[str, str] | None,
        passive_status: dict[str, Any] | None,
        states: dict[str, dict[str, Any]],
    ) -> None:
        self.chaos = chaos
        self.final = final
        self.pair = pair
        self.passive_status = passive_status
        self.states = states
        self.t0 = chaos.t0
        writers = [c.name for c in chaos.clients if c.subtree is None]
        self.writes = read_writes(chaos.folder, writers)
        self.by_value = {w.value: w for w in self.writes}
        self.losses: dict[str, Loss] = {}
        self.notes: list[str] = []
        self.figures: Counter[str] = Counter()
        #: (value, sequence) -> the lineage it was published in, seen by a SUB
        self.lineage_at: dict[tuple[str, int | None], str | None] = {}
        self.lineage_changes: list[str] = []
        #: where the SUBs missed updates (the first few)
        self.unseen_at: list[str] = []
        self.histories: list[History] = []
        #: dropped at a takeover and published again later (a hand-over)
        self.back_later: list[tuple[Dropped, float]] = []
        #: dropped at a takeover, overwritten by a newer write before back
        self.hidden: list[tuple[Dropped, float, Write]] = []
        #: dropped at a takeover, then an overlapping write published before it
        #: where both were published came back instead (its key went back)
        self.reordered: list[tuple[Dropped, float, Write]] = []

    def rel(self, t: float | None) -> str:
        return "-" if t is None else f"{t - self.t0:.3f}"

    def describe(self, w: Write | None) -> str:
        if w is None:
            return "a value no writer wrote"
        if w.confirmed is None:
            return (
                f"{w.value} (unconfirmed, issued {self.rel(w.issued)}, given up "
                f"{self.rel(w.ended)})"
            )
        return (
            f"{w.value} (seq {w.seq}, issued {self.rel(w.issued)}, confirmed "
            f"{self.rel(w.confirmed)})"
        )

    def lose(self, w: Write, reason: str) -> None:
        if w.value in self.losses:
            self.losses[w.value].reason += "; " + reason
        else:
            self.losses[w.value] = Loss(w, reason)

    # -- (a) the final map --

    def check_final(self) -> None:
        final = self.final
        if final is None:
            return
        for w in self.writes:
            if not w.ok:
                continue
            held = final.entries.get(w.key)
            if held is not None and held[1] == w.value:
                self.figures["kept"] += 1
                continue
            x = None if held is None else self.by_value.get(held[1])
            if (
                held is not None
                and x is not None
                and x.key == w.key
                and may_follow(x, w)
            ):
                self.figures["superseded"] += 1
                if x.issued < (w.confirmed or 0):
                    self.figures["superseded by an overlapping write"] += 1
                lineage = self.lineage_at.get((w.value, w.seq))
                same = lineage is not None and lineage == self.lineage_at.get(
                    (x.value, x.seq)
                )
                if same and x.seq is not None and w.seq is not None and x.seq < w.seq:
                    self.figures["reordered"] += 1
                continue
            holds = (
                "nothing" if held is None else f"{self.describe(x)} at seq {held[0]}"
            )
            self.lose(w, f"at the end the active holds {holds}")

    # -- (c) and the takeovers of (a) --

    def check_streams(self) -> list[str]:
        chaos = self.chaos
        starts = {n: s.starts for n, s in chaos.servers.items()}
        histories, violations = split_histories(chaos.observer.seen, starts)
        self.histories = histories
        violations += [f"malformed: {m}" for m in chaos.observer.malformed]
        # A history's HUGZ, over every server, never go back; no fork.
        by_name: dict[tuple[str | None, int | None], list[History]] = defaultdict(list)
        for h in histories:
            if h.lineage is not None and h.branch is not None:
                by_name[(h.lineage, h.branch)].append(h)
        for (lineage, branch), group in by_name.items():
            hugz = sorted(p for h in group for p in h.hugz)
            for (_, s1), (t2, s2) in itertools.pairwise(hugz):
                if s2 < s1:
                    violations.append(
                        f"history {(lineage or '?')[:8]}/{branch}: HUGZ went back from "
                        f"{s1} to {s2} at {self.rel(t2)}"
                    )
                    break
            at: dict[int, str] = {}
            for h in group:
                for u in h.updates:
                    if at.setdefault(u.seq, u.value) != u.value:
                        violations.append(
                            f"history {(lineage or '?')[:8]}/{branch}: two updates at "
                            f"sequence {u.seq}: {at[u.seq]} and {u.value}"
                        )
        for h in histories:
            for u in h.updates:
                self.lineage_at[(u.value, u.seq)] = h.lineage
        self.figures["histories"] = len(by_name)
        lineages = {h.lineage for h in histories if h.lineage}
        self.figures["lineages"] = len(lineages)
        unnamed = [h for h in histories if h.lineage is None]
        if unnamed:
            self.notes.append(
                f"{len(unnamed)} stretches of updates were never named by a HUGZ"
            )
        self.rebuild(histories, violations)
        return violations

    def rebuild(self, histories: list[History], violations: list[str]) -> None:
        """Follow the map from history to history, in the order they were
        first heard: at a takeover (a new branch) the updates beyond the
        branch point are dropped, at a new lineage everything is.  The
        newest confirmed write to each key dropped waits (``awaiting``)
        until its key is published again: with its value (replayed at the
        takeover, or back later: a hand-over), or with a write that may
        follow it (superseded; if that came after the takeover, the key
        showed an older value until then).  One still waiting at the end is
        lost.  At a new lineage, a write must be back in what the new map
        published first (no hand-over crosses lineages).  At the end the
        map rebuilt from the updates is compared with the active's.

        A sequence the SUBs never saw (the messages a SIGKILLed server had
        not sent yet; its map on disk may hold them) is an unknown position:
        it is not checked, and the rebuilt map accepts the active's entry
        for a key written there.  Overlapping histories (dual actives), a
        lineage seen again or a repeated sequence stop the checks from there
        on."""
        chain: list[History] = []
        for h in sorted(histories, key=lambda h: h.first):
            if h.lineage is None or h.branch is None:
                continue
            last = chain[-1] if chain else None
            if last is not None and (last.lineage, last.branch, last.server) == (
                h.lineage,
                h.branch,
                h.server,
            ):
                last.updates += h.updates  # (a restarted process went on with it)
                last.last = max(last.last, h.last)
                continue
            chain.append(h)
        timeline: dict[int, tuple[str, str, str, int] | None] = {}
        lineage: str | None = None
        lineages: set[str] = set()
        complete, why = True, ""
        awaiting: dict[str, Dropped] = {}
        for index, h in enumerate(chain):
            b = h.branch if h.branch is not None else 0
            if index and chain[index - 1].last > h.first + 0.5 and complete:
                complete = False
                why = f"histories {chain[index - 1].name} and {h.name} overlap"
            if h.lineage != lineage:
                kind = "a new lineage"
                dropped = timeline
                timeline = {}
                if lineage is not None:
                    self.lineage_changes.append(
                        f"{h.server} started lineage {h.name} at {self.rel(h.first)}, "
                        f"after {lineage[:8]} (the map was lost: "
                        f"{len(dropped)} updates dropped)"
                    )
                if h.lineage in lineages and complete:
                    complete, why = False, f"lineage {h.name} came back"
                lineage = h.lineage
                if lineage is not None:
                    lineages.add(lineage)
            elif (prior := self.resumes(chain, index)) is not None:
                # A server that was this history's active, restarted with its
                # map: it goes on with it (and hands over what others wrote).
                kind = "a resumption"
                if (
                    min(c.branch or 0 for c in chain[prior + 1 : index]) < b
                    and complete
                ):
                    complete, why = False, f"{h.name} resumed below a later branch"
                restored = {s: kv for s, kv in timeline.items() if s <= b}
                for u in chain[prior].updates:
                    restored[u.seq] = (u.key, u.value, h.server, u.gen)
                dropped = {s: kv for s, kv in timeline.items() if restored.get(s) != kv}
                for key, d in list(awaiting.items()):
                    kv = restored.get(d.seq)
                    if kv is not None and kv[1] == d.write.value:
                        del awaiting[key]
                        self.figures["dropped, back with a restarted map"] += 1
                timeline = restored
                self.figures["resumptions"] += 1
            else:
                kind = "a rewind"
                dropped = {s: kv for s, kv in timeline.items() if s > b}
                for s in dropped:
                    del timeline[s]
                if dropped:
                    self.figures["rewinds"] += 1
                    self.figures["rewound updates"] += len(dropped)
            self.unseen(timeline, b, f"before {h.server} took over at {b}")
            if dropped:
                self.chaos.note(
                    f"{kind}: {h.name} ({h.server}) from {self.rel(h.first)} drops "
                    f"{len(dropped)} updates up to {max(dropped)}"
                )
            if not complete:
                if dropped or awaiting:
                    self.figures["takeovers not checked"] += 1
                awaiting.clear()
            else:
                if kind == "a new lineage":
                    for d in awaiting.values():
                        self.lose(
                            d.write, d.reason("never back before the map was lost")
                        )
                    awaiting.clear()
                newest: dict[str, tuple[int, Write, str, int]] = {}
                for s, kv in sorted(dropped.items()):
                    w = None if kv is None else self.by_value.get(kv[1])
                    if kv is None:
                        self.figures["dropped unseen updates"] += 1
                    elif w is not None and w.ok:
                        newest[kv[0]] = (s, w, kv[2], kv[3])
                for key, (s, w, server, gen) in newest.items():
                    self.figures["dropped confirmed writes"] += 1
                    awaiting[key] = Dropped(
                        w, s, h, kind, self.rel, server, self.deadline(server, gen)
                    )
            previous: Update | None = None
            for u in sorted(h.updates, key=lambda u: (u.seq, u.t)):
                if previous is not None and u.seq <= previous.seq:
                    if complete:
                        complete = False
                        why = f"{h.server}'s history {h.name} repeats {u.seq}"
                    continue
                if u.seq > max(timeline, default=0) + 1:
                    at = (
                        f"in {h.server}'s history {h.name} between {previous.seq} "
                        f"(process {previous.gen}, {self.rel(previous.t)}) and "
                        f"{u.seq} (process {u.gen}, {self.rel(u.t)})"
                        if previous is not None
                        else f"before {h.server}'s first update {u.seq} in {h.name} "
                        f"(process {u.gen}, {self.rel(u.t)}; "
                        f"{sum(t < u.t for t, _ in h.hugz)} of its HUGZ heard before)"
                    )
                    killed = previous is None or previous.gen != u.gen
                    self.unseen(timeline, u.seq - 1, at, killed=killed)
                if complete and u.t >= h.settled:
                    self.end_of_takeover(awaiting, h)
                timeline[u.seq] = (u.key, u.value, h.server, u.gen)
                if complete:
                    self.resolve(awaiting, h, u)
                previous = u
            if complete:
                self.end_of_takeover(awaiting, h)
        for key in list(awaiting):
            self.judge(awaiting, key, "by the end")
        self.figures["takeovers"] += max(len(chain) - 1, 0)
        if not complete:
            self.notes.append(
                f"the SUBs' view stops making sense ({why}): takeovers from there "
                "on, and the rebuilt map, not checked"
            )
        final = self.final
        if final is None or not complete or lineage != final.lineage:
            self.figures["map not rebuilt"] += 1
            return
        self.unseen(timeline, final.sequence, "at the end")
        if max(timeline, default=0) != final.sequence:
            self.figures["map not rebuilt"] += 1
            self.notes.append(
                f"the SUBs saw up to {max(timeline, default=0)}, the active is at "
                f"{final.sequence}: the rebuilt map not checked"
            )
            return
        rebuilt: dict[str, tuple[int, str]] = {}
        unknown = set()
        for s in sorted(timeline):
            kv = timeline[s]
            if kv is None:
                unknown.add(s)
            else:
                rebuilt[kv[0]] = (s, kv[1])
        differ = []
        for key in sorted(rebuilt.keys() | final.entries.keys()):
            mine, theirs = rebuilt.get(key), final.entries.get(key)
            if mine == theirs:
                continue
            if (
                theirs is not None
                and theirs[0] in unknown
                and (mine is None or theirs[0] > mine[0])
            ):
                self.figures["keys last written where the SUBs did not see"] += 1
                continue
            differ.append(f"{key}: published {mine}, holds {theirs}")
        if differ:
            violations.append(
                f"the active's map is not what its history published, at "
                f"{len(differ)} keys: {', '.join(differ[:5])}"
            )
        else:
            self.figures["map rebuilt"] += 1

    def unseen(
        self,
        timeline: dict[int, tuple[str, str, str, int] | None],
        upto: int,
        at: str,
        *,
        killed: bool = True,
    ) -> None:
        """Sequences up to ``upto`` the SUBs never saw: unknown positions."""
        first = max(timeline, default=0) + 1
        if upto < first:
            return
        for s in range(first, upto + 1):
            timeline[s] = None
        count = upto - first + 1
        self.figures["updates not seen" + (" (at a kill)" if killed else "")] += count
        if len(self.unseen_at) < 5:
            self.unseen_at.append(f"{count} updates ({first}..{upto}) {at}")

    @staticmethod
    def resumes(chain: list[History], index: int) -> int | None:
        """The earlier history in ``chain`` that ``chain[index]`` goes on
        with (the same server, lineage and branch), if any."""
        h = chain[index]
        for j in range(index - 1, -1, -1):
            c = chain[j]
            if (c.lineage, c.branch, c.server) == (h.lineage, h.branch, h.server):
                return j
        return None

    def deadline(self, server: str, gen: int) -> float | None:
        """With durable maps: when a write that process ``gen`` of ``server``
        published, and a takeover dropped, must be back: ``--handover-grace``
        after the first later process of that server that lived that long
        (it hands over at its start, again if killed meanwhile)."""
        chaos = self.chaos
        if not chaos.durable:
            return None
        grace, record = chaos.args.handover_grace, chaos.servers[server]
        for k in range(gen + 1, len(record.starts)):
            start = record.starts[k]
            if record.ends.get(k, math.inf) - start >= grace:
                return start + grace
        return math.inf  # it never ran that long again: back by the end

    def resolve(self, awaiting: dict[str, Dropped], h: History, u: Update) -> None:
        """Update ``u`` of history ``h`` to the key of a dropped write: it is
        back, or it is what the key holds when the write is judged."""
        d = awaiting.get(u.key)
        if d is None:
            return
        w = d.write
        if u.value == w.value:
            del awaiting[u.key]
            if d.by is h and u.t < h.settled:
                self.figures["dropped, replayed at the takeover"] += 1
            else:
                self.figures["dropped, back later"] += 1
                self.back_later.append((d, u.t))
            return
        if d.deadline is not None and u.t > d.deadline:
            self.judge(awaiting, u.key, f"by {self.rel(d.deadline)}")
            return
        d.last = (u.t, u.value)
        x = self.by_value.get(u.value)
        if d.superseded_at is None and x is not None and may_follow(x, w):
            d.superseded_at = u.t
        if d.deadline is None and d.kind == "a rewind" and u.t >= d.by.settled:
            self.judge(awaiting, u.key, "")  # nothing hands it over: now

    def end_of_takeover(self, awaiting: dict[str, Dropped], h: History) -> None:
        """``h`` took over: judge what it dropped and nothing will bring back
        (a new lineage; without durable maps, a key written since)."""
        for key, d in list(awaiting.items()):
            if d.by is h and (
                d.kind == "a new lineage" or (d.deadline is None and d.last)
            ):
                self.judge(awaiting, key, "when the takeover was done")

    def judge(self, awaiting: dict[str, Dropped], key: str, when: str) -> None:
        """A dropped write that is not back: superseded by what its key holds
        (``d.last``, the last write published to it since), or lost."""
        d = awaiting.pop(key)
        w = d.write
        x = None if d.last is None else self.by_value.get(d.last[1])
        wait = ""
        if d.deadline is not None:
            wait = (
                f" ({self.chaos.args.handover_grace:g} s after {d.holder}, which "
                "had it, started again)"
            )
        if x is None or x.key != w.key or not may_follow(x, w):
            holds = (
                "the value it had before"
                if d.last is None
                else f"{self.describe(x)} (published at {self.rel(d.last[0])})"
            )
            self.lose(w, d.reason(f"not back {when}{wait}; its key held {holds}"))
            return
        assert d.last is not None
        if (
            x.seq is not None
            and x.seq < d.seq
            and self.lineage_at.get((x.value, x.seq)) == d.by.lineage
        ):
            # x came before w where both were published (they overlapped in
            # time): an older write replayed over a newer one, for good
            self.figures["dropped, an older overlapping write replayed over it"] += 1
            self.reordered.append((d, d.superseded_at or d.last[0], x))
        elif x.issued < d.by.first:
            self.figures["dropped, superseded at the takeover"] += 1
        elif d.kind == "a new lineage":
            self.lose(w, d.reason("not in what the new map published first"))
        else:
            self.figures["dropped, overwritten before back"] += 1
            self.hidden.append((d, d.superseded_at or d.last[0], x))

    # -- the output --

    def show(self) -> int:
        chaos, final = self.chaos, self.final
        violations = self.check_streams()
        self.check_final()
        differences = self.check_maps()
        self.scan_logs()
        crashes = chaos.crashes
        confirmed = sum(w.ok for w in self.writes)
        durable = "durable maps" if chaos.durable else "no durable maps"
        print(f"folder {chaos.folder}")
        print(
            f"servers: --heartbeat {chaos.args.heartbeat} --hugz {chaos.args.hugz}, "
            f"{durable}, fsync {chaos.args.fsync or 'default'}; "
            f"modes {','.join(chaos.args.modes)}"
        )
        if final is not None:
            print(
                f"final: {len(final.entries)} keys at sequence {final.sequence}, "
                f"lineage {final.lineage}, branch {final.branch}"
            )
        for name, state in sorted(self.states.items()):
            extra = state.get("events") or f"{state.get('writes')} writes"
            print(
                f"client {name}: synced {state.get('synced')}, sequence "
                f"{state.get('sequence')}, failovers {state.get('failovers')}, {extra}"
            )
        figures = ", ".join(f"{k} {v}" for k, v in sorted(self.figures.items()))
        print(f"figures: {figures}")
        for note in self.notes:
            print(f"note: {note}")
        for where in self.unseen_at:
            print(f"not seen by the SUBs: {where}")
        self.show_unconfirmed()
        if self.back_later:
            delays = [t - d.by.first for d, t in self.back_later]
            print(
                f"back later: {len(self.back_later)} confirmed writes dropped at a "
                f"takeover were published again later (a hand-over), after up to "
                f"{max(delays):.2f} s"
            )
            for d, t in self.back_later[:5]:
                w = d.write
                print(
                    f"BACK LATER: {w.key} = {self.describe(w)}: "
                    f"{d.reason(f'back at {self.rel(t)}')}"
                )
        for d, t, x in self.hidden[:MAX_SHOWN]:
            w = d.write
            print(
                f"OVERWRITTEN BEFORE BACK: {w.key} = {self.describe(w)}: "
                + d.reason(
                    f"the key showed an older value until {self.rel(t)}, then "
                    f"newer writes; it held {self.describe(x)} when judged"
                )
            )
        for d, t, x in self.reordered[:MAX_SHOWN]:
            w = d.write
            print(
                f"REORDERED: {w.key} = {self.describe(w)}: "
                + d.reason(
                    f"{self.describe(x)}, published before it there (both were "
                    f"in flight together), was published again at {self.rel(t)} "
                    "and the key went back to it"
                )
            )
        for problem in chaos.unhealthy:
            print(f"UNHEALTHY: {problem}")
        for crash in crashes:
            print(f"CRASH: {crash}")
        for change in self.lineage_changes:
            print(f"LINEAGE: {change}")
        for violation in violations[:MAX_SHOWN]:
            print(f"SEQUENCE: {violation}")
        if len(violations) > MAX_SHOWN:
            print(f"SEQUENCE: ... {len(violations) - MAX_SHOWN} more")
        for difference in differences:
            print(f"MAPS: {difference}")
        losses = sorted(self.losses.values(), key=lambda loss: loss.write.issued)
        for loss in losses[:MAX_SHOWN]:
            w = loss.write
            reason = loss.reason
            if final is not None and "at the end" not in reason:
                held = final.entries.get(w.key)
                holds = "nothing"
                if held is not None:
                    x = self.by_value.get(held[1])
                    holds = f"{self.describe(x)} at seq {held[0]}"
                reason += f"; at the end the active holds {holds}"
            print(f"LOST: {w.key} = {self.describe(w)} by {w.writer}: {reason}")
        if len(losses) > MAX_SHOWN:
            print(f"LOST: ... {len(losses) - MAX_SHOWN} more")
        failed = bool(
            losses
            or differences
            or violations
            or crashes
            or chaos.unhealthy
            or self.lineage_changes
        )
        if failed:
            print("timeline:")
            for t, message in sorted(chaos.timeline):
                print(f"  {t - self.t0:8.3f} {message}")
        modes = ", ".join(f"{k} {v}" for k, v in sorted(chaos.modes.items()))
        if chaos.impatient:
            modes += f" ({chaos.impatient} not waiting for health)"
        trouble = [
            *([f"crashes {len(crashes)}"] if crashes else []),
            *(["sequences went wrong"] if violations else []),
            *(["map lost (new lineage)"] if self.lineage_changes else []),
            *(["UNHEALTHY"] if chaos.unhealthy else []),
        ]
        print(
            f"cycles {chaos.cycles_done}, confirmed {confirmed}, lost {len(losses)}, "
            f"maps {'differ' if differences else 'equal'}"
            + "".join(f", {t}" for t in trouble)
            + f"; unconfirmed {len(self.writes) - confirmed}"
            f", dropped at takeovers {self.figures['dropped confirmed writes']}"
            f" (back later {len(self.back_later)}, overwritten before back "
            f"{len(self.hidden)}, reordered {len(self.reordered)}); {modes}; "
            f"seed {chaos.args.seed}, "
            f"{getattr(chaos, 'wall', now() - self.t0):.1f} s",
            flush=True,
        )
        return 1 if failed else 0

    def show_unconfirmed(self) -> None:
        """Writes that timed out: applied or not, as the SUBs saw."""
        published = {
            u.value for h in self.histories for u in h.updates if u.value is not None
        }
        unconfirmed = [w for w in self.writes if not w.ok]
        if not unconfirmed:
            return
        applied = [w for w in unconfirmed if w.value in published]
        print(
            f"unconfirmed: {len(unconfirmed)} writes timed out, {len(applied)} of "
            "them were applied all the same (published)"
        )
        final = self.final
        for w in unconfirmed[:5]:
            held = final is not None and final.entries.get(w.key, (0, ""))[1] == w.value
            print(
                f"UNCONFIRMED: {w.key} = {self.describe(w)} by {w.writer}, "
                f"{'published' if w in applied else 'never published'}"
                f"{', held at the end' if held else ''}"
            )

    def check_maps(self) -> list[str]:
        """(b): the clients' maps and the passive's copy."""
        chaos, final = self.chaos, self.final
        if final is None:
            return ["no final snapshot from the active"]
        differences = map_differences(final, self.states)
        missing = [c.name for c in chaos.clients if c.name not in self.states]
        differences += [f"{name}: no dump of its map" for name in missing]
        ps = self.passive_status
        if not (
            ps is not None
            and ps.get("lineage") == final.lineage
            and ps.get("sequence") == final.sequence
            and ps.get("keys") == len(final.entries)
        ):
            shown = None
            if ps is not None:
                shown = {k: ps.get(k) for k in ("state", "lineage", "sequence", "keys")}
            differences.append(
                f"the passive's copy: {shown}, the active's: lineage {final.lineage}, "
                f"sequence {final.sequence}, {len(final.entries)} keys"
            )
        return differences

    def scan_logs(self) -> None:
        """(d): tracebacks in any log, servers that did not stop cleanly."""
        chaos = self.chaos
        if isinstance(chaos, Replay):
            return  # (the crashes the run found, as it saved them)
        for proc in chaos.procs.started:
            log = proc.log()
            if "Traceback" in log:
                at = log.index("Traceback")
                chaos.crashes.append(
                    f"traceback in {proc.log_path.name}:\n{log[at : at + 2000]}"
                )
            code = proc.popen.returncode
            if proc.pid in chaos.killed:
                continue
            if code != 0:
                chaos.crashes.append(
                    f"{proc.name} (pid {proc.pid}) ended with code {code} at the end "
                    "(SIGTERM should end it with 0)"
                )
        for client in chaos.clients:
            log = _read(client.log)
            if "Traceback" in log:
                chaos.crashes.append(
                    f"traceback in client {client.name}:\n{_tail(log, 2000)}"
                )
            elif client.popen.returncode not in (0, None):
                chaos.crashes.append(
                    f"client {client.name} ended with code {client.popen.returncode}"
                )
        errors = Counter()
        for proc in chaos.procs.started:
            for line in proc.log().splitlines():
                if " ERROR " in line:
                    errors[line.split(" ERROR ", 1)[1][:90]] += 1
        for message, count in errors.most_common(8):
            self.notes.append(f"logged {count}x as ERROR: {message}")


# == main ==================================================================


class Replay:
    """A run kept on disk (run.json, observed.jsonl, the writers' records and
    the clients' dumps), for ``--analyse``: the checks again, as they are now."""

    def __init__(self, folder: Path) -> None:
        record = json.loads((folder / "run.json").read_text())
        self.folder = folder
        self.t0 = record["t0"]
        self.wall = record["wall"]
        self.durable = record["durable"]
        self.args = argparse.Namespace(**record["args"])
        self.servers = {
            n: Server(
                n,
                0,
                0,
                folder,
                starts=v["starts"],
                ends={int(k): e for k, e in v["ends"].items()},
            )
            for n, v in record["servers"].items()
        }
        self.clients = [SimpleNamespace(**c) for c in record["clients"]]
        final = record["final"]
        self.final = None
        if final is not None:
            entries = {k: (v[0], v[1]) for k, v in final.pop("entries").items()}
            self.final = Snap(entries, **final)
        self.pair = record["pair"]
        self.passive_status = record["passive_status"]
        self.crashes = record["crashes"]
        self.unhealthy = record["unhealthy"]
        self.timeline = [tuple(t) for t in record["timeline"]]
        self.modes = Counter(record["modes"])
        self.impatient = record["impatient"]
        self.cycles_done = record["cycles_done"]
        self.observer = SimpleNamespace(
            seen=[
                Seen(**json.loads(line))
                for line in _read(folder / "observed.jsonl").splitlines()
            ],
            malformed=record["malformed"],
        )

    def note(self, message: str) -> None:
        pass  # (the run's own timeline is shown)

    def report(self) -> int:
        states = {}
        for client in self.clients:
            path = self.folder / f"{client.name}.state.json"
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                states[client.name] = json.loads(path.read_text())
        report = Report(self, self.final, self.pair, self.passive_status, states)  # type: ignore[arg-type]
        return report.show()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_writer":
        return writer_main(argv[1:])
    if argv and argv[0] == "_watcher":
        return watcher_main(argv[1:])
    if argv and argv[0] == "--analyse":
        if len(argv) != 2:
            print("usage: chaos.py --analyse FOLDER (a run kept with --keep)")
            return 2
        return Replay(Path(argv[1])).report()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--cycles", type=int, default=10, help="kill cycles (10)")
    parser.add_argument("--seed", type=int, default=1, help="the schedule's seed (1)")
    parser.add_argument(
        "--modes",
        help="what to kill, drawn per cycle: active,passive,both "
        "(default: all three with durable maps, else active,passive)",
    )
    parser.add_argument("--writers", type=int, default=3, help="writer processes (3)")
    parser.add_argument(
        "--rate", type=float, default=40.0, help="writes per second per writer (40)"
    )
    parser.add_argument(
        "--write-timeout", type=float, default=8.0, help="set()'s timeout (8 s)"
    )
    parser.add_argument(
        "--rare-share",
        type=float,
        default=0.2,
        help="share of the writes to the 300 rarely written keys (0.2)",
    )
    parser.add_argument(
        "--handover-grace",
        type=float,
        default=5.0,
        help="with durable maps, a confirmed write a takeover dropped is back "
        "within this long after its server started again (5 s)",
    )
    parser.add_argument("--heartbeat", type=float, default=0.5, help="servers' (0.5)")
    parser.add_argument("--hugz", type=float, default=0.5, help="servers' (0.5)")
    parser.add_argument(
        "--max-run", type=float, default=3.0, help="writers run 0.5 s to this (3)"
    )
    parser.add_argument(
        "--max-down", type=float, default=3.0, help="down time, restart gap (3)"
    )
    parser.add_argument(
        "--health-timeout", type=float, default=30.0, help="per cycle (30 s)"
    )
    parser.add_argument(
        "--fsync",
        choices=["always", "interval", "off"],
        help="servers' --fsync, with durable maps",
    )
    parser.add_argument(
        "--in-memory",
        action="store_true",
        help="servers keep no map on disk (then one kill at a time)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="one more option for both servers (--server-arg=--x=y), repeatable",
    )
    parser.add_argument(
        "--impatient",
        type=float,
        default=0.0,
        help="the chance that a cycle does not wait for the pair to be healthy "
        "before the next kill (during a restart, sync or hand-over); needs "
        "durable maps (default 0)",
    )
    parser.add_argument("--workdir", type=Path, help="run here (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="print events")
    args = parser.parse_args(argv)
    durable = has_durable_maps() and not args.in_memory
    kinds = ["active", "passive", "both"] if durable else ["active", "passive"]
    args.modes = args.modes.split(",") if args.modes else kinds
    if not set(args.modes) <= {"active", "passive", "both"} or not args.modes:
        parser.error("--modes takes active, passive and both")
    if "both" in args.modes and not durable:
        parser.error(
            "killing both needs durable maps (serve --data-dir, no --in-memory)"
        )
    if args.impatient and not durable:
        parser.error("--impatient needs durable maps")
    if not 0 <= args.impatient <= 1:
        parser.error("--impatient is a chance, 0 to 1")
    if args.fsync and not durable:
        parser.error("--fsync needs durable maps")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True)
        folder = args.workdir.resolve()
    else:
        folder = Path(tempfile.mkdtemp(prefix="trioclone-chaos-"))
    os.environ["XDG_DATA_HOME"] = str(folder / "xdg")  # the servers' default
    chaos = Chaos(args, folder, durable)
    status = 1
    try:
        status = chaos.run()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        status = 130
    finally:
        chaos.close()
        if status == 0 and not args.keep and args.workdir is None:
            shutil.rmtree(folder, ignore_errors=True)
        elif status != 0:
            print(f"kept {folder}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
