"""Real ``trioclone serve`` processes on 127.0.0.1 and a raw CHP client.

Everything here is synchronous: plain pyzmq sockets with poll timeouts and
the real (monotonic) clock, so the tests do not depend on the Trio shell
they exercise.  Every wait is bounded in time, every loop in count.

* ``free_base_ports`` / ``free_ports``: ports the kernel says are free now.
* ``Processes``: starts servers (log to a file), kills them by PID and, on
  exit, stops every process it started (SIGTERM, then SIGKILL after 5 s).
* ``ChpClient`` and ``request_snapshot``: CHP on the wire, decoded here
  with ``struct`` rather than with trioclone's own codec.
* ``Pair``: a primary and a backup with a steady writer and subscribers,
  used by the pair tests and by ``tools/failover.py``.

pytest is not imported, so the tool can use this module too.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq

HOST = "127.0.0.1"
SEQUENCE = struct.Struct("!q")
ICANHAZ = b"ICANHAZ?"
KTHXBAI = b"KTHXBAI"
HUGZ = b"HUGZ"
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL

Frames = list[bytes]

# -- ports -------------------------------------------------------------------

_handed_out: set[int] = set()


def _is_free(port: int) -> bool:
    if port in _handed_out or not 1024 <= port <= 65535:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _outside_ephemeral() -> range:
    """Ports the kernel never picks for an outgoing connection: a port
    handed out here stays free until its server binds it (one in the
    ephemeral range could be taken meanwhile by any client's connect)."""
    try:
        low, high = map(
            int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        )
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    if low - 10_000 >= 2_000:
        return range(10_000, low - 16)
    return range(high + 1, 65_536 - 16)


_CANDIDATES = _outside_ephemeral()
_random = random.Random()


def _candidate_port() -> int:
    return _random.choice(_CANDIDATES)


def free_base_ports(count: int = 1, span: int = 3) -> list[int]:
    """``count`` base ports P, each with P .. P+span-1 free (never reused)."""
    bases: list[int] = []
    for _ in range(500):
        if len(bases) == count:
            return bases
        base = _candidate_port()
        block = range(base, base + span)
        if all(_is_free(p) for p in block):
            _handed_out.update(block)
            bases.append(base)
    raise RuntimeError("no free block of ports on 127.0.0.1")


def free_ports(count: int = 1) -> list[int]:
    return free_base_ports(count, span=1)


# -- processes ---------------------------------------------------------------


@dataclass
class ServerProcess:
    name: str
    args: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    port: int | None = None  # the base port P, when known

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float, *, count: int = 1) -> bool:
        """True once ``text`` appears ``count`` times in the log."""
        deadline = time.monotonic() + timeout
        while True:
            if self.log().count(text) >= count:
                return True
            if time.monotonic() >= deadline or not self.alive:
                return self.log().count(text) >= count
            time.sleep(0.05)

    def wait_for_status(self, timeout: float, **expected: object) -> bool:
        """True once one status line shows every ``expected`` field's value.

        The server logs a status line every ``--status-interval`` seconds,
        e.g. ``status {'state': 'PASSIVE', 'sequence': 7, 'pending': 0, ...}``.
        """
        wanted = [
            re.compile(rf"[{{ ]{re.escape(f'{name!r}: {value!r}')}[,}}]")
            for name, value in expected.items()
        ]

        def seen() -> bool:
            return any(
                " status {" in line and all(w.search(line) for w in wanted)
                for line in self.log().splitlines()
            )

        deadline = time.monotonic() + timeout
        while True:
            if seen():
                return True
            if time.monotonic() >= deadline or not self.alive:
                return seen()
            time.sleep(0.05)


def serve_command(*serve_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "trioclone",
        "--log-level",
        "INFO",
        "serve",
        *serve_args,
    ]


class Processes:
    """Starts servers; on exit stops each one it started, by PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ServerProcess] = []
        self._names = itertools.count()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        *serve_args: str,
        port: int | None = None,
        prefix: Sequence[str] = (),
        new_session: bool = False,
    ) -> ServerProcess:
        """``trioclone serve`` with ``serve_args``, run under ``prefix`` (e.g.
        ``ip netns exec NS``, which execs it: the PID is the server's)."""
        return self.run(
            name,
            [*prefix, *serve_command(*serve_args)],
            port=port,
            new_session=new_session,
        )

    def run(
        self,
        name: str,
        args: Sequence[str],
        *,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        new_session: bool = False,
    ) -> ServerProcess:
        """Any command, its output logged to a file, stopped like a server;
        ``new_session``: in a session (and process group) of its own."""
        args = list(args)
        log_path = self.log_dir / f"{next(self._names):02d}-{name}.log"
        # A server's default data folder is under the log folder, never the
        # user's (the tests' own fixture does the same per test), and no
        # TRIOCLONE_ variable of the test runner's reaches it: serve would
        # take it as a setting, or refuse one that names none.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOCLONE_")}
        env.update(extra_env or {}, XDG_DATA_HOME=str(self.log_dir / "data"))
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=new_session,
            )
        proc = ServerProcess(name, args, log_path, popen, port)
        self.started.append(proc)
        return proc

    def kill(self, proc: ServerProcess, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the process and reap it (SIGKILL after 5 s)."""
        if proc.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        self._reap(proc, time.monotonic() + STOP_GRACE)

    def stop_all(self) -> None:
        running = [p for p in self.started if p.alive]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in self.started:
            self._reap(proc, deadline)

    @staticmethod
    def _reap(proc: ServerProcess, deadline: float) -> None:
        try:
            proc.popen.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=STOP_GRACE)


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (a hard guard)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"test took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- CHP on the wire -----------------------------------------------------------


@dataclass(frozen=True)
class Kv:
    key: bytes
    sequence: int
    uuid: bytes
    properties: dict[str, str]
    body: bytes


def decode(frames: Sequence[bytes]) -> Kv:
    """A five-frame kvmsg, checked strictly: a server must send valid ones."""
    assert len(frames) == 5, f"a kvmsg has 5 frames, got {len(frames)}: {frames!r}"
    key, seq, uuid, props, body = frames
    assert len(seq) == 8, f"sequence frame of {len(seq)} bytes"
    assert len(uuid) in (0, 16), f"uuid frame of {len(uuid)} bytes"
    properties = {}
    for line in props.decode().splitlines():
        name, _, value = line.partition("=")
        properties[name] = value
    return Kv(key, SEQUENCE.unpack(seq)[0], uuid, properties, body)


def kvset(
    key: bytes,
    body: bytes,
    uuid: bytes | None = None,
    *,
    ttl: str | None = None,
    properties: bytes = b"",
) -> Frames:
    if ttl is not None:
        properties += b"ttl=%s\n" % ttl.encode()
    uuid = uuidlib.uuid4().bytes if uuid is None else uuid
    return [key, SEQUENCE.pack(0), uuid, properties, body]


@dataclass
class Snapshot:
    entries: dict[bytes, Kv]
    sequence: int  # the KTHXBAI's
    subtree: bytes  # the KTHXBAI's body

    def values(self) -> dict[bytes, bytes]:
        return {key: kv.body for key, kv in self.entries.items()}


def recv(sock: zmq.Socket[bytes], timeout: float) -> Frames | None:
    """One multipart message, or None after ``timeout`` seconds."""
    if sock.poll(max(int(timeout * 1000), 0), zmq.POLLIN):
        return sock.recv_multipart(zmq.NOBLOCK)
    return None


def tcp(port: int) -> str:
    return f"tcp://{HOST}:{port}"


# Sockets opened per context, closed by ``destroy``: a pyzmq socket collected
# before it is closed is a ResourceWarning, an error under this test suite.
_opened: dict[int, list[zmq.Socket[bytes]]] = {}


def destroy(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    for sock in _opened.pop(id(ctx), []):
        sock.close(linger=0)
    ctx.destroy(linger=0)


def open_socket(
    ctx: zmq.Context[zmq.Socket[bytes]],
    kind: int,
    connect: Sequence[int],
    subscribe: Sequence[bytes] = (),
) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    _opened.setdefault(id(ctx), []).append(sock)
    sock.setsockopt(zmq.LINGER, 0)
    if kind == zmq.SUB:
        sock.setsockopt(zmq.RCVHWM, 0)
        for prefix in subscribe:
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
    for port in connect:
        sock.connect(tcp(port))
    return sock


class SnapshotReader:
    """Collects one snapshot reply from a DEALER."""

    def __init__(self) -> None:
        self.entries: dict[bytes, Kv] = {}
        self.started = False

    def feed(self, frames: Frames) -> Snapshot | None:
        self.started = True
        kv = decode(frames)
        if kv.key == KTHXBAI:
            return Snapshot(self.entries, kv.sequence, kv.body)
        assert kv.key != HUGZ, "HUGZ inside a snapshot reply"
        self.entries[kv.key] = kv
        return None


def request_snapshot(
    ctx: zmq.Context[zmq.Socket[bytes]],
    port: int,
    subtree: bytes = b"",
    timeout: float = 2.0,
) -> Snapshot | None:
    """ICANHAZ on a fresh DEALER; the snapshot, or None if not complete in time."""
    dealer = open_socket(ctx, zmq.DEALER, [port])
    try:
        dealer.send_multipart([ICANHAZ, subtree])
        reader = SnapshotReader()
        deadline = time.monotonic() + timeout
        for _ in range(10_000_000):
            frames = recv(dealer, deadline - time.monotonic())
            if frames is None:
                return None
            snapshot = reader.feed(frames)
            if snapshot is not None:
                return snapshot
        raise AssertionError("snapshot reply never ended")
    finally:
        dealer.close(linger=0)


def wait_snapshot(
    ctx: zmq.Context[zmq.Socket[bytes]],
    port: int,
    timeout: float = 15.0,
    attempt: float = 0.5,
) -> Snapshot:
    """Ask again and again (bounded) until the server answers: it is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snapshot = request_snapshot(ctx, port, timeout=attempt)
        if snapshot is not None:
            return snapshot
    raise TimeoutError(f"no snapshot from port {port} within {timeout} s")


def vote_until_snapshot(
    ctx: zmq.Context[zmq.Socket[bytes]],
    port: int,
    every: float = 1.0,
    timeout: float = 12.0,
) -> tuple[Snapshot, float, int]:
    """ICANHAZ every ``every`` s, like a failing-over client: snapshot, time, votes."""
    start = time.monotonic()
    for votes in range(1, int(timeout / every) + 2):
        snapshot = request_snapshot(ctx, port, timeout=every)
        if snapshot is not None:
            return snapshot, time.monotonic() - start, votes
        if time.monotonic() - start > timeout:
            break
    raise TimeoutError(f"port {port} did not answer a vote within {timeout} s")


class ChpClient:
    """SUB to P+1, PUB to the collectors P+2 of ``write_to`` (default: P)."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        port: int,
        *,
        subscribe: Sequence[bytes] = (b"",),
        write_to: Sequence[int] = (),
    ) -> None:
        self.ctx = ctx
        self.port = port
        self.sub = open_socket(ctx, zmq.SUB, [port + 1], subscribe)
        self.pub = open_socket(ctx, zmq.PUB, [p + 2 for p in write_to or [port]])
        self._probes = itertools.count()

    def send(self, frames: Sequence[bytes]) -> None:
        self.pub.send_multipart(list(frames))

    def set(self, key: bytes, body: bytes, **options: object) -> bytes:
        frames = kvset(key, body, **options)  # type: ignore[arg-type]
        self.send(frames)
        return frames[2]

    def next_update(self, timeout: float, *, skip_hugz: bool = True) -> Kv | None:
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            frames = recv(self.sub, deadline - time.monotonic())
            if frames is None:
                return None
            kv = decode(frames)
            if not (skip_hugz and kv.key == HUGZ):
                return kv
        return None

    def wait_for(self, key: bytes, timeout: float, *, deleted: bool = False) -> Kv:
        """The next KVPUB of ``key`` (of its delete, with ``deleted``)."""
        deadline = time.monotonic() + timeout
        for _ in range(1_000_000):
            kv = self.next_update(deadline - time.monotonic())
            if kv is None:
                break
            if kv.key == key and (not kv.body) == deleted:
                return kv
        raise TimeoutError(f"no KVPUB for {key!r} within {timeout} s")

    def probe(self, timeout: float = 5.0, every: float = 0.1) -> Kv:
        """Write a probe until its KVPUB comes back: the PUB/SUB links are up."""
        key = b"/probe/%d" % next(self._probes)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.set(key, b"probe")
            with contextlib.suppress(TimeoutError):
                seen = self.wait_for(key, every)
                settle(self.sub)  # a later attempt may be published too
                return seen
        raise TimeoutError(f"probe never came back from port {self.port}")

    def snapshot(self, subtree: bytes = b"", timeout: float = 2.0) -> Snapshot:
        snapshot = request_snapshot(self.ctx, self.port, subtree, timeout)
        if snapshot is None:
            raise TimeoutError(f"no snapshot from port {self.port}")
        return snapshot


@contextlib.contextmanager
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield ctx
    finally:
        destroy(ctx)


# -- standalone servers --------------------------------------------------------


def start_standalone(
    procs: Processes, *extra: str, name: str = "standalone", port: int | None = None
) -> ServerProcess:
    """``serve --standalone`` on 127.0.0.1 at ``port`` (a free one if None)."""
    if port is None:
        (port,) = free_base_ports(1)
    return procs.start(
        name,
        "--standalone",
        "--bind",
        HOST,
        "--peer",
        HOST,
        "--port",
        str(port),
        *extra,
        port=port,
    )


# -- a Binary Star pair under a steady writer ----------------------------------

DEFAULT_TIMING: tuple[str, ...] = ()
FAST_TIMING: tuple[str, ...] = ("--heartbeat", "0.2", "--hugz", "0.2")


@dataclass
class StreamResult:
    """What one streaming phase saw."""

    written: dict[bytes, bytes] = field(default_factory=dict)
    written_before_kill: list[bytes] = field(default_factory=list)
    written_after_kill: list[bytes] = field(default_factory=list)
    from_primary: dict[bytes, bytes] = field(default_factory=dict)
    from_backup: dict[bytes, bytes] = field(default_factory=dict)
    primary_sequences: list[int] = field(default_factory=list)
    primary_times: list[float] = field(default_factory=list)  # every message
    kill_time: float | None = None
    snapshot: Snapshot | None = None
    failover: float | None = None  # seconds from SIGKILL to the full snapshot
    votes: int = 0

    def lost(self, snapshot: Snapshot) -> list[bytes]:
        """Keys seen published by the primary but missing or different."""
        values = snapshot.values()
        return sorted(k for k, v in self.from_primary.items() if values.get(k) != v)

    def max_silence(self, after: float) -> float:
        """Longest gap between messages from the primary after time ``after``."""
        times = [t for t in self.primary_times if t >= after]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


class Pair:
    """A primary and a backup process, a writer to both, SUBs on both."""

    def __init__(self, procs: Processes, timing: Sequence[str] = DEFAULT_TIMING):
        self.procs = procs
        self.timing = list(timing)
        self.p1, self.p2 = free_base_ports(2)
        self.s1, self.s2 = free_ports(2)
        self.known: dict[bytes, bytes] = {}  # every key written -> its value
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.writer = open_socket(self._ctx, zmq.PUB, [self.p1 + 2, self.p2 + 2])
        self.sub_primary = open_socket(self._ctx, zmq.SUB, [self.p1 + 1], [b""])
        self.sub_backup = open_socket(self._ctx, zmq.SUB, [self.p2 + 1], [b""])
        self._serial = itertools.count()

    @property
    def ctx(self) -> zmq.Context[zmq.Socket[bytes]]:
        return self._ctx

    def close(self) -> None:
        destroy(self._ctx)

    def __enter__(self) -> Pair:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- processes --

    def _args(self, role: str) -> list[str]:
        own, peer, state, peer_state = (
            (self.p1, self.p2, self.s1, self.s2)
            if role == "primary"
            else (self.p2, self.p1, self.s2, self.s1)
        )
        return [
            "--role",
            role,
            "--bind",
            HOST,
            "--peer",
            HOST,
            "--port",
            str(own),
            "--peer-port",
            str(peer),
            "--state-port",
            str(state),
            "--peer-state-port",
            str(peer_state),
            *self.timing,
        ]

    def start_primary(self, name: str = "primary", *extra: str) -> ServerProcess:
        return self.procs.start(name, *self._args("primary"), *extra, port=self.p1)

    def start_backup(self, name: str = "backup") -> ServerProcess:
        return self.procs.start(name, *self._args("backup"), port=self.p2)

    def start(self, timeout: float = 15.0) -> tuple[ServerProcess, ServerProcess]:
        """Both servers; returns once the primary answers and the backup synced."""
        primary, backup = self.start_primary(), self.start_backup()
        wait_snapshot(self._ctx, self.p1, timeout)
        if not backup.wait_for_log("synced from the active", timeout):
            raise TimeoutError("the backup never synced:\n" + backup.log()[-2000:])
        return primary, backup

    # -- writing --

    def write(self, prefix: bytes) -> bytes:
        """One KVSET with a new key, a distinct value and a fresh UUID, to both."""
        n = next(self._serial)
        key = b"%s/%07d" % (prefix, n)
        uuid = uuidlib.uuid4().bytes
        body = b"v%d-%s" % (n, uuid.hex()[:8].encode())
        self.writer.send_multipart(kvset(key, body, uuid))
        self.known[key] = body
        return key

    def probe(self, sub: zmq.Socket[bytes], timeout: float = 5.0) -> None:
        """Write a probe until it is published back on ``sub`` (slow joiner).

        Every attempt has the same key and value, so whichever attempts the
        servers applied, the map holds ``known[key]``.
        """
        n = next(self._serial)
        key, body = b"/probe/%07d" % n, b"probe-%d" % n
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.writer.send_multipart(kvset(key, body))
            until = time.monotonic() + 0.1
            while (frames := recv(sub, until - time.monotonic())) is not None:
                if frames[0] == key:
                    self.known[key] = body
                    settle(sub)  # a later attempt may be published too
                    return
        raise TimeoutError("probe never published")

    def write_until_seen(
        self, prefix: bytes, count: int, sub: zmq.Socket[bytes], timeout: float = 5.0
    ) -> list[bytes]:
        """Write ``count`` keys (~2 ms apart) and wait until ``sub`` saw all."""
        keys = []
        for _ in range(count):
            keys.append(self.write(prefix))
            time.sleep(0.002)
        missing = set(keys)
        deadline = time.monotonic() + timeout
        while missing and (frames := recv(sub, deadline - time.monotonic())):
            missing.discard(frames[0])
        if missing:
            raise TimeoutError(f"{len(missing)} of {count} writes never published")
        return keys

    # -- the streaming phase --

    def stream_and_kill(
        self,
        victim: ServerProcess,
        *,
        vote_port: int | None = None,
        before: float = 1.0,
        after: float = 0.5,
        interval: float = 0.002,
        vote_every: float = 1.0,
        timeout: float = 15.0,
        prefix: bytes = b"/w",
    ) -> StreamResult:
        """Write every ``interval`` s; SIGKILL ``victim`` after ``before`` s and
        write ``after`` s more.  With ``vote_port``, a client votes there every
        ``vote_every`` s from the kill on, until it holds a full snapshot."""
        res = StreamResult()
        poller = zmq.Poller()
        poller.register(self.sub_primary, zmq.POLLIN)
        poller.register(self.sub_backup, zmq.POLLIN)
        start = time.monotonic()
        kill_at, hard_deadline = start + before, start + before + timeout
        stop_writing_at = next_vote = math.inf
        next_write = start
        dealer: zmq.Socket[bytes] | None = None
        reader = SnapshotReader()
        snapshot_at = math.inf
        for _ in range(10_000_000):
            now = time.monotonic()
            if now >= hard_deadline:
                break
            if res.kill_time is None and now >= kill_at:
                res.kill_time = now
                self.procs.kill(victim, signal.SIGKILL)
                stop_writing_at = now + after
                next_vote = now if vote_port is not None else math.inf
                now = time.monotonic()
            if now < stop_writing_at and now >= next_write:
                key = self.write(prefix)
                res.written[key] = self.known[key]
                killed = res.kill_time is not None
                (res.written_after_kill if killed else res.written_before_kill).append(
                    key
                )
                next_write = max(next_write + interval, now - 0.05)
            if now >= next_vote and vote_port is not None:
                if dealer is None or not reader.started:
                    if dealer is not None:
                        poller.unregister(dealer)
                        dealer.close(linger=0)
                    dealer = open_socket(self._ctx, zmq.DEALER, [vote_port])
                    poller.register(dealer, zmq.POLLIN)
                    reader = SnapshotReader()
                dealer.send_multipart([ICANHAZ, b""])
                res.votes += 1
                next_vote += vote_every
            # Drain a little longer: takeover publishes may trail the snapshot.
            done_at = stop_writing_at + 0.5
            if vote_port is not None:
                done_at = max(done_at, snapshot_at + 0.5)
            if now >= done_at:
                break
            wake = min(next_write if now < stop_writing_at else math.inf, next_vote)
            wake = min(wake, kill_at if res.kill_time is None else math.inf, done_at)
            wait = min(max(wake - now, 0.0), 0.05)
            ready = dict(poller.poll(int(wait * 1000)))
            if self.sub_primary in ready:
                self._drain_primary(res)
            if self.sub_backup in ready:
                for frames in _drain(self.sub_backup):
                    if frames[0] != HUGZ:
                        res.from_backup[frames[0]] = frames[4]
            if dealer is not None and dealer in ready:
                for frames in _drain(dealer):
                    snapshot = reader.feed(frames)
                    if snapshot is not None and res.snapshot is None:
                        assert res.kill_time is not None
                        res.snapshot = snapshot
                        snapshot_at = time.monotonic()
                        res.failover = snapshot_at - res.kill_time
                        next_vote = math.inf
        if dealer is not None:
            dealer.close(linger=0)
        return res

    def _drain_primary(self, res: StreamResult) -> None:
        for frames in _drain(self.sub_primary):
            res.primary_times.append(time.monotonic())
            if frames[0] == HUGZ:
                continue
            res.from_primary[frames[0]] = frames[4]
            res.primary_sequences.append(SEQUENCE.unpack(frames[1])[0])


def settle(sock: zmq.Socket[bytes], seconds: float = 0.2) -> None:
    """Let in-flight messages arrive for ``seconds`` and discard them."""
    deadline = time.monotonic() + seconds
    while recv(sock, deadline - time.monotonic()) is not None:
        pass


def _drain(sock: zmq.Socket[bytes], limit: int = 10_000) -> list[Frames]:
    messages = []
    for _ in range(limit):
        try:
            messages.append(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            break
    return messages
